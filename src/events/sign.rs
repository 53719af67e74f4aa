//! Standard Webhooks 1.0 signatures: `webhook-signature: v1,<base64 of HMAC-SHA256 over
//! "{webhook-id}.{webhook-timestamp}.{body}">`, keyed with the base64-decoded part of the
//! endpoint's `whsec_` secret; one `v1,` signature per secret signing now (two while a rotated
//! secret overlaps), separated by spaces. HMAC and the random secrets are ring's (already in
//! the build through rustls): cryptography is never written here.

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::{hmac, rand::SecureRandom};

/// The prefix of every secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Bytes of randomness in a secret.
const SECRET_BYTES: usize = 32;

/// A new secret: `whsec_` and the base64 of 32 random bytes from the system's generator.
pub fn new_secret() -> Result<String, String> {
    let mut key = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new().fill(&mut key).map_err(|_| "the system's random generator failed".to_owned())?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

/// The `webhook-signature` value for `body` sent as message `id` at `timestamp` (seconds since
/// the epoch), signed with each of `secrets`. A secret that is not `whsec_` and base64 (it
/// cannot be: the service makes them) signs nothing.
pub fn signature(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    secrets
        .iter()
        .filter_map(|secret| STANDARD.decode(secret.strip_prefix(SECRET_PREFIX)?).ok())
        .map(|key| {
            let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &signed);
            format!("v1,{}", STANDARD.encode(tag.as_ref()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (and of its reference libraries).
    #[test]
    fn signs_the_specification_example() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned();
        let body = br#"{"test": 2432232314}"#;
        let signature = signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signs_with_every_secret_and_makes_new_ones() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_") && STANDARD.decode(&a[6..]).unwrap().len() == 32);
        let both = signature(&[a.clone(), b], "evt_1", 1, b"{}");
        assert_eq!(both.split(' ').count(), 2);
        assert!(both.starts_with(&signature(&[a], "evt_1", 1, b"{}")));
    }
}
