//! Who may do what (the rules of `AUTH_MODE`), applied to one request's credentials: the
//! `Authorization` header read once by the route table and handed to the handler that needs it.

use std::net::IpAddr;

use crate::{
    auth::{Auth, AuthMode, Caller},
    error::Error,
};

/// A request's credentials, before anything is decided from them.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub auth: &'a Auth,
    /// The raw `Authorization` header, if any; never logged, never echoed.
    pub authorization: Option<&'a [u8]>,
    /// The client's address as the server sees it: the peer of the TCP connection (behind a
    /// proxy, the proxy; `X-Forwarded-For` is not trusted).
    pub address: IpAddr,
}

impl Credentials<'_> {
    /// The caller of a customer path: anyone in open mode; in jwt mode a token's holder.
    pub async fn customer(&self) -> Result<Caller, Error> {
        self.auth.customer(self.authorization).await
    }

    /// An operator, or the refusal (401 or 403).
    pub async fn operator(&self) -> Result<Caller, Error> {
        self.auth.operator(self.authorization).await
    }

    /// The user whose orders a listing shows, `None` for everyone's, from the `userId` the
    /// query asked for: in open mode any user's are public and everyone's are an operator's;
    /// in jwt mode a customer sees their own (another `userId` is 403), an operator any.
    pub async fn order_listing(&self, requested: Option<i32>) -> Result<Option<i32>, Error> {
        match (self.auth.mode(), requested) {
            (AuthMode::Open, Some(user_id)) => Ok(Some(user_id)),
            (AuthMode::Open, None) => self.operator().await.map(|_| None),
            (AuthMode::Jwt, _) => {
                let caller = self.customer().await?;
                match (caller.operator, caller.user_id, requested) {
                    (true, _, requested) => Ok(requested),
                    (false, Some(own), Some(other)) if other != own => {
                        Err(Error::Forbidden("a customer may list only their own orders"))
                    }
                    (false, own, _) => Ok(own),
                }
            }
        }
    }
}
