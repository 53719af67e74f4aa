//! Where the service connects and how: `DATABASE_URL` read the way libpq reads it, TLS
//! included.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and nothing of certificates, so the
//! two TLS parameters libpq users write, `sslmode` (all five values) and `sslrootcert`, are
//! taken out of the string here and turned into a rustls configuration (`crate::tls`):
//!
//! | sslmode       | encrypted                 | certificate checked                         |
//! |---------------|---------------------------|---------------------------------------------|
//! | `disable`     | never                     | -                                           |
//! | `prefer`      | if the server offers it   | no (the default, as in libpq)               |
//! | `require`     | always                    | no; chain only if `sslrootcert` is given    |
//! | `verify-ca`   | always                    | chain leads to `sslrootcert`                |
//! | `verify-full` | always                    | chain, and the certificate names the host   |
//!
//! `sslrootcert` is a PEM file, or `system` for the system's store; left out, verify-ca and
//! verify-full use the system's store (libpq would look for `~/.postgresql/root.crt`).

use std::str::FromStr;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{self, Verify};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` (plaintext first) is left out: it never encrypts against a server
            // that accepts plaintext, which is worse than prefer and has no use here.
            other => {
                return Err(format!(
                    "sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }
}

/// A parsed `DATABASE_URL`: the connection settings and the TLS connector they need.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub ssl_mode: SslMode,
}

impl FromStr for Target {
    type Err = String;

    /// Reads a libpq URL (`postgresql://...?sslmode=verify-full`) or key=value string
    /// (`host=db sslmode=require`). Certificates named by `sslrootcert` are read now, so a
    /// missing file stops the start instead of failing every connection.
    fn from_str(url: &str) -> Result<Target, String> {
        let (rest, tls_params) = take_tls_params(url);
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        for (key, value) in tls_params {
            match key {
                TlsParam::SslMode => ssl_mode = SslMode::parse(&value)?,
                TlsParam::RootCert => root_cert = Some(value),
            }
        }
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e| format!("DATABASE_URL is not a valid connection string: {e}"))?;
        // As libpq: `require` with a root certificate given checks the chain, like verify-ca.
        let verify = match (ssl_mode, &root_cert) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => Verify::Nothing,
            (SslMode::Require | SslMode::VerifyCa, _) => Verify::Chain(tls::roots(root_cert.as_deref())?),
            (SslMode::VerifyFull, _) => Verify::Full(tls::roots(root_cert.as_deref())?),
        };
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Prefer => WireSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireSslMode::Require,
        });
        let tls = MakeRustlsConnect::new(tls::client_config(verify)?);
        Ok(Target { config, tls, ssl_mode })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsParam {
    SslMode,
    RootCert,
}

impl TlsParam {
    fn of(key: &str) -> Option<TlsParam> {
        match key {
            "sslmode" => Some(TlsParam::SslMode),
            "sslrootcert" => Some(TlsParam::RootCert),
            _ => None,
        }
    }
}

/// Splits the TLS parameters off a connection string: the string without them (for
/// tokio-postgres) and their decoded values, in order (a later one wins, as in libpq).
fn take_tls_params(url: &str) -> (String, Vec<(TlsParam, String)>) {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_from_query(url)
    } else {
        take_from_key_values(url)
    }
}

/// URL form: the parameters are the query string's `key=value` pairs, percent-encoded.
fn take_from_query(url: &str) -> (String, Vec<(TlsParam, String)>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), Vec::new()) };
    let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match TlsParam::of(&decode(key)) {
            Some(param) => taken.push((param, decode(value))),
            None => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    (rest, taken)
}

/// key=value form: `key = value` separated by spaces, a value either bare (a backslash escapes
/// the next character) or single-quoted. Anything this does not understand is left in place
/// for tokio-postgres to report.
fn take_from_key_values(text: &str) -> (String, Vec<(TlsParam, String)>) {
    let mut taken = Vec::new();
    let mut rest = String::new();
    let mut chars = text.char_indices().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_spaces(&mut chars);
        let Some(&(start, _)) = chars.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_spaces(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not key=value: hand the remainder over untouched.
            rest.push_str(&text[start..]);
            break;
        }
        skip_spaces(&mut chars);
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
                '\'' if quoted => break,
                c if c.is_whitespace() && !quoted => break,
                c => value.push(c),
            }
        }
        let end = chars.peek().map_or(text.len(), |&(at, _)| at);
        match TlsParam::of(&key) {
            Some(param) => taken.push((param, value)),
            None => {
                rest.push_str(text[start..end].trim_end());
                rest.push(' ');
            }
        }
    }
    (rest.trim_end().to_owned(), taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_tls_parameters_are_taken_out_and_decoded() {
        let (rest, taken) = take_tls_params(
            "postgresql://u:p@db:5432/shop?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgresql://u:p@db:5432/shop?connect_timeout=5");
        assert_eq!(
            taken,
            vec![(TlsParam::SslMode, "verify-full".to_owned()), (TlsParam::RootCert, "/etc/ca.pem".to_owned())]
        );
        let (rest, taken) = take_tls_params("postgresql://db/shop?sslmode=require");
        assert_eq!((rest.as_str(), taken.len()), ("postgresql://db/shop", 1));
        let (rest, taken) = take_tls_params("postgresql://db/shop");
        assert_eq!((rest.as_str(), taken.len()), ("postgresql://db/shop", 0));
    }

    #[test]
    fn key_value_tls_parameters_are_taken_out() {
        let (rest, taken) =
            take_tls_params(r"host=db  sslmode = verify-ca password='it\'s' sslrootcert='/my certs/ca.pem' user=shop");
        assert_eq!(rest, r"host=db password='it\'s' user=shop");
        assert_eq!(
            taken,
            vec![(TlsParam::SslMode, "verify-ca".to_owned()), (TlsParam::RootCert, "/my certs/ca.pem".to_owned())]
        );
        let (rest, taken) = take_tls_params(r"host=db sslrootcert=/a\ b.pem");
        assert_eq!((rest.as_str(), taken), ("host=db", vec![(TlsParam::RootCert, "/a b.pem".to_owned())]));
    }

    #[test]
    fn modes_and_their_checks() {
        assert_eq!("postgresql://db/shop".parse::<Target>().unwrap().ssl_mode, SslMode::Prefer);
        let disabled = "host=db dbname=shop sslmode=disable".parse::<Target>().unwrap();
        assert_eq!(disabled.config.get_ssl_mode(), WireSslMode::Disable);
        let full = "postgresql://db/shop?sslmode=verify-full&sslrootcert=/nonexistent.pem".parse::<Target>();
        assert!(full.err().unwrap().contains("/nonexistent.pem"));
        let allow = "postgresql://db/shop?sslmode=allow".parse::<Target>();
        assert!(allow.err().unwrap().contains("sslmode=allow is not supported"));
    }
}
