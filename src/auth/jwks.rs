//! Public keys fetched from the identity provider's JWKS URL (`AUTH_JWT_JWKS_URL`, https only).
//!
//! - **Cached.** Tokens are checked against the keys of the last good fetch; nothing waits on
//!   the network while the token's `kid` is known.
//! - **Refreshed** at start, every `REFRESH_EVERY` (so a key the provider withdrew stops
//!   being accepted), and when a token names a `kid` the cache does not hold (a key rotation),
//!   at most once per `UNKNOWN_KID_REFRESH_EVERY`, so tokens with made-up `kid`s cannot make
//!   the service hammer the provider.
//! - **Kept while the URL is down.** A failed fetch (unreachable, not 200, a certificate that
//!   does not check out, a document that does not parse) is logged and changes nothing: the
//!   service goes on with the keys it has.
//!
//! The fetch is one HTTP/1.1 GET with hyper's client over rustls, the certificate checked
//! against the system's CA store or `AUTH_JWT_JWKS_CA_FILE`.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{self, Verify};

/// Keys by `kid`, each pinned to the one algorithm it verifies.
pub type Keys = HashMap<String, (DecodingKey, Algorithm)>;

/// How often the keys are fetched again, whatever the tokens say.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The least time between two fetches caused by an unknown `kid`.
pub const UNKNOWN_KID_REFRESH_EVERY: Duration = Duration::from_secs(60);
/// A fetch, connection to body, gives up after this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read; real ones are a few kB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

pub struct RemoteJwks {
    url: HttpsUrl,
    tls: TlsConnector,
    /// `parse` turns a fetched document into keys (`jwt::public_keys`).
    parse: fn(&str) -> Result<Keys, String>,
    keys: RwLock<Arc<Keys>>,
    /// When an unknown `kid` last caused a fetch; the lock also makes concurrent requests with
    /// the same new `kid` wait for one fetch instead of each starting their own.
    last_unknown_kid_refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl RemoteJwks {
    /// Checks the URL and loads the CA certificates; fetches nothing yet (see `refresh`).
    pub fn new(url: &str, ca_file: Option<&str>, parse: fn(&str) -> Result<Keys, String>) -> Result<Self, String> {
        let url = HttpsUrl::parse(url)?;
        let config = tls::client_config(Verify::Full(tls::roots(ca_file)?))?;
        Ok(RemoteJwks {
            url,
            tls: TlsConnector::from(Arc::new(config)),
            parse,
            keys: RwLock::new(Arc::new(Keys::new())),
            last_unknown_kid_refresh: tokio::sync::Mutex::new(None),
        })
    }

    /// The keys of the last good fetch.
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap().clone()
    }

    /// Fetches the keys and replaces the cached ones; on any failure keeps them and says why.
    pub async fn refresh(&self) -> Result<(), String> {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", FETCH_TIMEOUT.as_secs())))
            .and_then(|text| (self.parse)(&text));
        match fetched {
            Ok(keys) => {
                let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
                kids.sort_unstable();
                tracing::info!(url = %self.url.text, kids = %kids.join(","), "JWKS fetched");
                *self.keys.write().unwrap() = Arc::new(keys);
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(
                    url = %self.url.text,
                    error = %reason,
                    cached_keys = self.keys().len(),
                    "JWKS fetch failed; the cached keys stay in use"
                );
                Err(reason)
            }
        }
    }

    /// For a token whose `kid` the cache lacks: fetches again unless an unknown `kid` already
    /// did so within `UNKNOWN_KID_REFRESH_EVERY`. Returns once the keys are as fresh as they
    /// will get.
    pub async fn refresh_for_unknown_kid(&self, kid: &str) {
        let mut last = self.last_unknown_kid_refresh.lock().await;
        if self.keys().contains_key(kid) {
            return; // fetched by the request this one waited behind
        }
        if last.is_some_and(|at| at.elapsed() < UNKNOWN_KID_REFRESH_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.refresh().await;
    }

    /// Fetches again every `REFRESH_EVERY`, for as long as the service runs.
    pub async fn refresh_periodically(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REFRESH_EVERY).await;
            let _ = self.refresh().await;
        }
    }

    async fn fetch(&self) -> Result<String, String> {
        let url = &self.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
        let name = ServerName::try_from(url.host.clone()).map_err(|e| format!("host {}: {e}", url.host))?;
        let stream = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get(url.path.as_str())
            .header(header::HOST, url.authority.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("order-api/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
    }
}

/// An `https://host[:port]/path` URL, in the pieces a request needs.
#[derive(Debug, PartialEq, Eq)]
struct HttpsUrl {
    text: String,
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// The path and query, `/` when the URL has none.
    path: String,
}

impl HttpsUrl {
    fn parse(text: &str) -> Result<HttpsUrl, String> {
        let invalid = |why: &str| format!("AUTH_JWT_JWKS_URL {why}: {text}");
        let rest = text.strip_prefix("https://").ok_or_else(|| invalid("must be an https:// URL"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        if authority.contains('@') {
            return Err(invalid("may not hold credentials"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse::<u16>().map_err(|_| invalid("has an invalid port"))?)
            }
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("has no host"));
        }
        Ok(HttpsUrl { text: text.to_owned(), host: host.to_owned(), port, authority: authority.to_owned(), path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_are_read_into_their_parts() {
        let url = HttpsUrl::parse("https://id.example.com/realms/shop/certs?x=1").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("id.example.com", 443, "/realms/shop/certs?x=1"));
        let url = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.authority.as_str(), url.path.as_str()),
            ("127.0.0.1", 8443, "127.0.0.1:8443", "/")
        );
        let url = HttpsUrl::parse("https://[::1]:9/jwks").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 9));
    }

    #[test]
    fn anything_but_a_plain_https_url_is_refused() {
        for url in [
            "http://id.example.com/jwks",
            "https://",
            "https://user:pw@id.example.com/",
            "https://h:99999/",
            "file:///jwks",
        ] {
            assert!(HttpsUrl::parse(url).is_err(), "{url}");
        }
    }
}
