//! The request id: the client's `X-Request-Id` when it is sane, else one made here. It is
//! echoed in the response and carried by every log line written while serving the request.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use hyper::{Request, body::Incoming};

/// Longest `X-Request-Id` taken from a client; longer or odd ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `X-Request-Id` if it is sane (1 to 128 visible ASCII characters from a
/// conservative set), else a new one: unique within this process and, through the start
/// time and pid, very likely across replicas.
pub fn request_id(request: &Request<Incoming>) -> String {
    if let Some(id) = request.headers().get("x-request-id").and_then(|v| v.to_str().ok())
        && is_acceptable(id)
    {
        return id.to_owned();
    }
    generate()
}

fn is_acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'='))
}

fn generate() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: OnceLock<String> = OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        format!("{:010x}{:06x}", started & 0xff_ffff_ffff, std::process::id() & 0xff_ffff)
    });
    format!("{prefix}-{:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sane_request_ids_only() {
        assert!(is_acceptable("abc-123_DEF.4"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("has space"));
        assert!(!is_acceptable(&"a".repeat(MAX_REQUEST_ID_LEN + 1)));
        assert_ne!(generate(), generate());
    }
}
