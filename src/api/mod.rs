//! The application over HTTP: the route table (`routes.rs`) and one file per resource, each
//! handler taking parsed input, making one call into `db`, and rendering the response
//! (`reply.rs`; request bodies and queries are read by `input.rs`). No SQL here, no
//! transaction, no socket handling.

pub mod access;
pub mod events;
pub mod health;
pub mod input;
pub mod openapi;
pub mod orders;
pub mod products;
pub mod reply;
pub mod routes;
pub mod webhooks;

use std::sync::Arc;

use hyper::header::{HeaderValue, LINK};

use crate::{auth::Auth, config::Config, db::Db, domain::Page, metrics::Metrics, rate_limit::RateLimiter};
use reply::Reply;

/// What every request handler shares.
pub struct AppState {
    pub config: Config,
    /// The one door to the database.
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// The credentials accepted (`AUTH_MODE`, `OPERATOR_TOKEN`, JWT keys).
    pub auth: Auth,
    /// `RATE_LIMIT_ORDERS_PER_MINUTE`, per user and per client address; `None`: no limit.
    pub order_limit: Option<RateLimiter>,
    /// The WAL archiving that backups need, as last read (`WAL_ARCHIVE_CHECK_SECS`).
    pub archiving: Arc<crate::archiving::ArchiveWatch>,
}

/// The raw listing parameters of a query string (`limit`, `after`), parsed by the endpoint.
#[derive(Debug, Default)]
pub struct Listing {
    pub limit: Option<String>,
    pub after: Option<String>,
}

/// Adds `Link: <path?filters&limit=L&after=ID>; rel="next"` when the page came back full, so
/// there may be more (RFC 8288; the body stays a plain array, as for the unpaginated listing).
/// `filters` are already-validated `(name, value)` pairs whose values need no escaping.
pub fn next_page_link(
    reply: &mut Reply,
    path: &str,
    filters: &[(&str, String)],
    page: Page,
    rows: usize,
    last_id: Option<i64>,
) {
    let Some(last_id) = last_id.filter(|_| rows as i64 >= page.limit) else { return };
    let mut query: Vec<String> = filters.iter().map(|(name, value)| format!("{name}={value}")).collect();
    query.push(format!("limit={}", page.limit));
    query.push(format!("after={last_id}"));
    let link = format!("<{path}?{}>; rel=\"next\"", query.join("&"));
    if let Ok(value) = HeaderValue::from_str(&link) {
        reply.headers_mut().insert(LINK, value);
    }
}
