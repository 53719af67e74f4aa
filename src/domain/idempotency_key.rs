//! The `Idempotency-Key` header of `POST /api/orders`.

use crate::error::Error;

/// Longest `Idempotency-Key` accepted: room for a UUID or a client's own scheme, bounded so a
/// key cannot be used to store arbitrary data.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A validated `Idempotency-Key` header: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(header: &[u8]) -> Result<IdempotencyKey, Error> {
        let valid = !header.is_empty()
            && header.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && header.iter().all(|b| b.is_ascii_graphic());
        match std::str::from_utf8(header) {
            Ok(key) if valid => Ok(IdempotencyKey(key.to_owned())),
            _ => Err(Error::invalid(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_bounded_visible_ascii() {
        assert!(IdempotencyKey::parse(b"a1b2-c3d4").is_ok());
        assert!(IdempotencyKey::parse(b"").is_err());
        assert!(IdempotencyKey::parse(b"has space").is_err());
        assert!(IdempotencyKey::parse("é".as_bytes()).is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_err());
    }
}
