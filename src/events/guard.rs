//! Where webhooks may go (server-side request forgery): an endpoint's URL must not let anyone
//! who can register one make the service call into its own network. A destination whose
//! address is loopback, private, link-local (cloud metadata among them), shared (carrier NAT),
//! unspecified, multicast, broadcast or reserved is refused, unless its host is listed in
//! `WEBHOOK_ALLOWED_HOSTS`.
//!
//! Checked twice: when an endpoint is registered or changed (the name is resolved, so a
//! refusal is a clear 400 at once), and on the address each delivery actually connects to,
//! resolved again then: a name that resolved to a public address at registration and to a
//! private one later (DNS rebinding) is refused at connect time. The connection goes to the
//! checked address itself, never to the name again.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// The destinations allowed despite their addresses: hosts (names or addresses) as written in
/// `WEBHOOK_ALLOWED_HOSTS`, compared without case.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allowed_hosts: HashSet<String>,
}

impl Guard {
    pub fn new(allowed_hosts: &[String]) -> Guard {
        Guard { allowed_hosts: allowed_hosts.iter().map(|host| host.trim().to_ascii_lowercase()).collect() }
    }

    /// The addresses of `host:port` that may be connected to, in the resolver's order; an
    /// error saying why when there is none.
    pub async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let resolved: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect(),
        };
        if resolved.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        if self.allowed_hosts.contains(&host.to_ascii_lowercase()) {
            return Ok(resolved);
        }
        let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|address| is_public(address.ip())).collect();
        match allowed.is_empty() {
            true => Err(format!(
                "{host} resolves to {} (a loopback, private, link-local or reserved address); \
                 list the host in WEBHOOK_ALLOWED_HOSTS to allow it",
                resolved[0].ip()
            )),
            false => Ok(allowed),
        }
    }
}

/// Whether `ip` is an address on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, the cloud metadata address 169.254.169.254 among them
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // 100.64/10, shared address space (carrier NAT)
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15, benchmarking
        || a >= 240) // 240/4 reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local (fd00:ec2::254, a metadata address, among them)
        || (first & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (first & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0100) // 100::/64 discard
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96`) or 6to4 (`2002:ab:cd::`) address: it is where the packet goes.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(mapped) = ip.to_ipv4_mapped() {
        return Some(mapped);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34", "64:ff9b::808:808"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for inside in [
            "127.0.0.1",
            "127.0.0.2",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(inside.parse().unwrap()), "{inside}");
        }
    }

    #[tokio::test]
    async fn private_destinations_are_refused_unless_their_host_is_allowed() {
        let guard = Guard::new(&["127.0.0.1".to_owned(), "Localhost".to_owned()]);
        assert!(guard.addresses("127.0.0.2", 80).await.unwrap_err().contains("WEBHOOK_ALLOWED_HOSTS"));
        assert_eq!(guard.addresses("127.0.0.1", 80).await.unwrap(), vec!["127.0.0.1:80".parse().unwrap()]);
        assert!(!guard.addresses("localhost", 80).await.unwrap().is_empty());
        assert!(Guard::default().addresses("localhost", 80).await.is_err());
        assert!(Guard::default().addresses("169.254.169.254", 80).await.is_err());
    }
}
