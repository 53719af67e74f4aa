//! Who is calling, and what they may do (`AUTH_MODE`, `OPERATOR_TOKEN`, JWTs).
//!
//! - `AUTH_MODE=open` (the default, the replaced service's behaviour): customer paths need no
//!   credentials and any caller may act as any user. The service says so in a warning at start.
//! - `AUTH_MODE=jwt`: every customer request carries `Authorization: Bearer <JWT>` from the
//!   shop's identity provider; the token's `sub` is the user (see `jwt.rs`).
//! - Operator endpoints (restock, status changes, every user's orders) need, in both modes,
//!   `Authorization: Bearer <OPERATOR_TOKEN>` or, in jwt mode, a JWT whose `scope` or `roles`
//!   holds `operator`. With neither configured they are disabled (403 saying how to enable
//!   them).
//!
//! This module says who the caller is; the handlers apply the ownership rules with it.

pub mod jwks;
pub mod jwt;

use std::{fmt, sync::Arc};

use subtle::ConstantTimeEq;

use crate::error::Error;

/// The least length of `OPERATOR_TOKEN`: 32 characters from a random generator are beyond
/// guessing; shorter ones are refused at start.
pub const MIN_OPERATOR_TOKEN_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Open,
    Jwt,
}

impl AuthMode {
    pub fn parse(text: &str) -> Option<AuthMode> {
        match text {
            "open" => Some(AuthMode::Open),
            "jwt" => Some(AuthMode::Jwt),
            _ => None,
        }
    }
}

/// A secret from the configuration: its `Debug` never shows it, so a logged or printed
/// configuration leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Who made a request, as far as its credentials tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The user the request acts as: a JWT's `sub`. `None` for a caller without a token (open
    /// mode) and for the static operator token.
    pub user_id: Option<i32>,
    /// The operator token, or a JWT with the `operator` scope or role.
    pub operator: bool,
}

impl Caller {
    const ANONYMOUS: Caller = Caller { user_id: None, operator: false };
    const OPERATOR: Caller = Caller { user_id: None, operator: true };

    /// The user whose orders this caller may see, or `None` for all of them (an operator,
    /// or anyone in open mode).
    pub fn owner_filter(&self) -> Option<i32> {
        if self.operator { None } else { self.user_id }
    }
}

/// The credentials the service accepts, built once at start.
pub struct Auth {
    mode: AuthMode,
    operator_token: Option<Secret>,
    /// Only in jwt mode.
    jwt: Option<jwt::Verifier>,
}

impl Auth {
    pub fn new(mode: AuthMode, operator_token: Option<Secret>, jwt: Option<jwt::Verifier>) -> Result<Auth, String> {
        if let Some(token) = &operator_token
            && token.expose().chars().count() < MIN_OPERATOR_TOKEN_LEN
        {
            return Err(format!("OPERATOR_TOKEN must be at least {MIN_OPERATOR_TOKEN_LEN} characters"));
        }
        let jwt = match mode {
            AuthMode::Open => None,
            AuthMode::Jwt => Some(
                jwt.ok_or("AUTH_MODE=jwt needs a key: AUTH_JWT_HS256_SECRET (or its _FILE), AUTH_JWT_JWKS_FILE or AUTH_JWT_JWKS_URL")?,
            ),
        };
        Ok(Auth { mode, operator_token, jwt })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The keys served at `AUTH_JWT_JWKS_URL`, when jwt mode uses one.
    pub fn remote_jwks(&self) -> Option<Arc<jwks::RemoteJwks>> {
        self.jwt.as_ref()?.remote()
    }

    /// The caller of a customer path (`/api/orders...`): anyone in open mode; in jwt mode the
    /// holder of a valid token (a user, or an operator), else 401.
    pub async fn customer(&self, authorization: Option<&[u8]>) -> Result<Caller, Error> {
        match self.mode {
            AuthMode::Open => Ok(Caller::ANONYMOUS),
            AuthMode::Jwt => match authorization {
                None => Err(Error::Unauthorized { reason: "this path needs a Bearer token", token_rejected: false }),
                Some(header) => self.identify(header).await,
            },
        }
    }

    /// The caller of an operator endpoint: an operator, else 401 (no or bad credentials) or
    /// 403 (a customer's token, or operator access not configured at all).
    pub async fn operator(&self, authorization: Option<&[u8]>) -> Result<Caller, Error> {
        if self.operator_token.is_none() && self.mode == AuthMode::Open {
            return Err(Error::Forbidden(
                "operator endpoints are disabled: set OPERATOR_TOKEN (at least 32 characters) to enable them",
            ));
        }
        let Some(header) = authorization else {
            return Err(Error::Unauthorized {
                reason: "this endpoint needs operator credentials",
                token_rejected: false,
            });
        };
        let caller = self.identify(header).await?;
        if caller.operator { Ok(caller) } else { Err(Error::Forbidden("this endpoint is for operators")) }
    }

    /// Who an `Authorization` header names: the operator token, or a valid JWT in jwt mode.
    async fn identify(&self, header: &[u8]) -> Result<Caller, Error> {
        let token = bearer_token(header)?;
        if let Some(operator_token) = &self.operator_token
            && bool::from(operator_token.expose().as_bytes().ct_eq(token.as_bytes()))
        {
            return Ok(Caller::OPERATOR);
        }
        let Some(verifier) = &self.jwt else {
            return Err(Error::Unauthorized { reason: "the token is not valid", token_rejected: true });
        };
        let claims = verifier.verify(token).await?;
        Ok(Caller { user_id: Some(claims.user_id), operator: claims.operator })
    }
}

/// The token of `Bearer <token>` (the scheme in any case, RFC 6750 and 9110).
fn bearer_token(header: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(header)
        .ok()
        .and_then(|text| text.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or(Error::Unauthorized { reason: "Authorization must be \"Bearer <token>\"", token_rejected: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATOR: &str = "an-operator-token-of-32-characters-or-more";

    fn open_with_operator() -> Auth {
        Auth::new(AuthMode::Open, Some(Secret::new(OPERATOR)), None).unwrap()
    }

    #[test]
    fn short_operator_tokens_and_jwt_mode_without_keys_are_refused_at_start() {
        assert!(Auth::new(AuthMode::Open, Some(Secret::new("short")), None).is_err());
        assert!(Auth::new(AuthMode::Jwt, None, None).is_err());
    }

    #[tokio::test]
    async fn operator_endpoints_take_the_operator_token_only() {
        let auth = open_with_operator();
        let bearer = |token: &str| format!("Bearer {token}");
        assert_eq!(auth.operator(Some(bearer(OPERATOR).as_bytes())).await.unwrap(), Caller::OPERATOR);
        assert_eq!(auth.operator(Some(format!("bearer  {OPERATOR}").as_bytes())).await.unwrap(), Caller::OPERATOR);
        for wrong in [bearer("nope"), bearer(&OPERATOR[1..]), format!("Basic {OPERATOR}"), "Bearer".into()] {
            let error = auth.operator(Some(wrong.as_bytes())).await.unwrap_err();
            assert!(matches!(error, Error::Unauthorized { token_rejected: true, .. }), "{wrong}: {error:?}");
        }
        assert!(matches!(auth.operator(None).await.unwrap_err(), Error::Unauthorized { token_rejected: false, .. }));
        assert!(matches!(auth.operator(Some(&[0xff, 0xfe])).await.unwrap_err(), Error::Unauthorized { .. }));
    }

    #[tokio::test]
    async fn without_an_operator_token_operator_endpoints_are_disabled_in_open_mode() {
        let auth = Auth::new(AuthMode::Open, None, None).unwrap();
        assert!(matches!(auth.operator(Some(b"Bearer anything")).await.unwrap_err(), Error::Forbidden(_)));
        // Customer paths stay open, whatever the header says.
        assert_eq!(auth.customer(Some(b"Bearer whatever")).await.unwrap(), Caller::ANONYMOUS);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let text = format!("{:?}", Secret::new(OPERATOR));
        assert!(!text.contains(OPERATOR), "{text}");
    }
}
