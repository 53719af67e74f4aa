//! JWT verification for `AUTH_MODE=jwt`, with the `jsonwebtoken` crate: no signature code of
//! our own.
//!
//! Keys: an HS256 secret (`AUTH_JWT_HS256_SECRET`) and/or public keys from a JWKS file
//! (`AUTH_JWT_JWKS_FILE`) or URL (`AUTH_JWT_JWKS_URL`, cached and refreshed: `jwks.rs`):
//! RS256, ES256, EdDSA, chosen by the token's `kid`. Each key is
//! pinned to one algorithm when it is loaded (its `alg`, else the one its key type implies), and
//! a token must name that algorithm: `none` is never accepted, and a public key is never used
//! as an HMAC secret. `exp` is required, `nbf` honoured, with `AUTH_JWT_LEEWAY_SECS` (at most
//! 60 s) of clock leeway; `iss` and `aud` are checked when configured. The user is `sub`, a
//! positive int4 as a string or a number; `scope` (space-separated) or `roles` (an array)
//! holding `operator` makes the caller an operator.
//!
//! Every way a token can be wrong is a 401 `UNAUTHORIZED` with `error="invalid_token"`, and a
//! reason that names the check, never the token.

use std::{collections::HashMap, str::FromStr, sync::Arc};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
};
use serde::Deserialize;
use serde_json::Value;

use super::{
    Secret,
    jwks::{Keys, RemoteJwks},
};
use crate::error::Error;

/// The most clock leeway allowed between the identity provider and the service.
pub const MAX_LEEWAY_SECS: u64 = 60;

/// Longest token looked at: far above any real JWT, and a bound on the work a forged one costs.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a verifier is built from (from the configuration).
#[derive(Debug, Clone, Default)]
pub struct JwtSettings {
    pub hs256_secret: Option<Secret>,
    /// The text of a JWKS document (`{"keys": [...]}`).
    pub jwks: Option<String>,
    /// An https URL serving the JWKS, and the CA file to check its certificate against
    /// (the system's store when `None`).
    pub jwks_url: Option<String>,
    pub jwks_ca_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
}

/// What a valid token says about its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub user_id: i32,
    pub operator: bool,
}

pub struct Verifier {
    hs256: Option<DecodingKey>,
    /// Public keys by `kid`, each with the one algorithm it verifies (from the JWKS file).
    keys: Keys,
    /// Keys from the JWKS URL.
    remote: Option<Arc<RemoteJwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

/// The claims read from a token besides the ones `jsonwebtoken` validates.
#[derive(Deserialize)]
struct TokenClaims {
    #[serde(default)]
    sub: Value,
    #[serde(default)]
    scope: Value,
    #[serde(default)]
    roles: Value,
}

impl Verifier {
    /// Loads the keys; `Ok(None)` when there are none (no verifier to build).
    pub fn new(settings: &JwtSettings) -> Result<Option<Verifier>, String> {
        if settings.leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!("AUTH_JWT_LEEWAY_SECS may be at most {MAX_LEEWAY_SECS}"));
        }
        let hs256 = match &settings.hs256_secret {
            Some(secret) if secret.expose().len() < 32 => {
                return Err("AUTH_JWT_HS256_SECRET must be at least 32 bytes (RFC 7518 3.2)".into());
            }
            Some(secret) => Some(DecodingKey::from_secret(secret.expose().as_bytes()).map_err(|e| e.to_string())?),
            None => None,
        };
        let keys = match &settings.jwks {
            Some(text) => public_keys(text)?,
            None => HashMap::new(),
        };
        let remote = match &settings.jwks_url {
            Some(url) => Some(Arc::new(RemoteJwks::new(url, settings.jwks_ca_file.as_deref(), public_keys)?)),
            None => None,
        };
        if hs256.is_none() && keys.is_empty() && remote.is_none() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            hs256,
            keys,
            remote,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_secs: settings.leeway_secs,
        }))
    }

    /// The keys served at `AUTH_JWT_JWKS_URL`, for the fetches at start and every few minutes.
    pub fn remote(&self) -> Option<Arc<RemoteJwks>> {
        self.remote.clone()
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, Error> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(rejected("the token is too large"));
        }
        let header = decode_header(token).map_err(|_| rejected("the token is not a well-formed JWT"))?;
        // A public-key token whose kid neither the file nor the cached URL keys hold: the
        // provider may have rotated its keys, so look again (rate-limited in `jwks.rs`).
        let remote = match (&header.kid, &self.remote) {
            (Some(kid), Some(remote)) if !self.keys.contains_key(kid) => {
                if header.alg != Algorithm::HS256 && !remote.keys().contains_key(kid) {
                    remote.refresh_for_unknown_kid(kid).await;
                }
                Some(remote.keys())
            }
            _ => None,
        };
        let public_key = header.kid.as_ref().and_then(|kid| self.keys.get(kid).or_else(|| remote.as_deref()?.get(kid)));
        let (key, algorithm) = match (public_key, &self.hs256) {
            (Some((key, algorithm)), _) => (key, *algorithm),
            (None, Some(secret)) if header.alg == Algorithm::HS256 => (secret, Algorithm::HS256),
            (None, _) if header.kid.is_some() => return Err(rejected("the token's key (kid) is not known")),
            (None, _) => return Err(rejected("the token names no known key (kid)")),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        // `sub` is checked below, as a number or a string: jsonwebtoken's own check of a
        // required `sub` takes only a string, and calls a numeric one missing.
        validation.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let claims = decode::<TokenClaims>(token, key, &validation).map_err(|e| rejected(reason(e.kind())))?.claims;
        let user_id = user_id(&claims.sub).ok_or_else(|| rejected("the token's sub is not a user id"))?;
        let operator = claims.scope.as_str().is_some_and(|scope| scope.split_whitespace().any(|s| s == "operator"))
            || claims.roles.as_array().is_some_and(|roles| roles.iter().any(|role| role == "operator"));
        Ok(Claims { user_id, operator })
    }
}

fn rejected(reason: &'static str) -> Error {
    Error::Unauthorized { reason, token_rejected: true }
}

/// Why `jsonwebtoken` refused a token, in words safe to send back.
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
        ErrorKind::InvalidAudience => "the token's audience is not accepted",
        ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim (exp, sub, iss or aud)",
        ErrorKind::InvalidSignature => "the token's signature is not valid",
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not the one of its key",
        _ => "the token is not valid",
    }
}

/// `sub` as a user id: a positive int4, as a JSON number or a string of digits.
fn user_id(sub: &Value) -> Option<i32> {
    let number = match sub {
        Value::Number(number) => number.as_i64()?,
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok()?,
        _ => return None,
    };
    i32::try_from(number).ok().filter(|id| *id > 0)
}

/// The public keys of a JWKS document by `kid`, each pinned to one algorithm.
fn public_keys(text: &str) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("the JWKS is not valid: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone().ok_or("a JWKS key has no kid; keys are chosen by kid")?;
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return Err(format!("JWKS key {kid}: only RSA, EC P-256 and Ed25519 public keys are accepted")),
        };
        let algorithm = match &jwk.common.key_algorithm {
            None => implied,
            Some(named) => Algorithm::from_str(&named.to_string())
                .ok()
                .filter(|named| *named == implied)
                .ok_or(format!("JWKS key {kid}: its alg {named} is not {implied:?}, the one of its key type"))?,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key {kid}: {e}"))?;
        keys.insert(kid, (key, algorithm));
    }
    Ok(keys)
}
