//! `GET /api/events` (the operators' feed of every event, in commit order, with long-polling)
//! and `GET /api/orders/{orderId}/events` (one order's events, for its customer).

use std::time::Duration;

use hyper::StatusCode;
use serde::Serialize;

use super::{
    AppState,
    access::Credentials,
    reply::{Reply, json},
};
use crate::{
    db::{Event, EventSignal, FeedQuery, Position},
    domain::EVENT_TYPES,
    error::Error,
};

/// Most events one page holds, and how many when the reader does not say.
pub const MAX_FEED_LIMIT: i64 = 1_000;
pub const DEFAULT_FEED_LIMIT: i64 = 100;

/// The longest a reader may ask to wait for events (`wait`, seconds).
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The raw parameters of `GET /api/events`.
#[derive(Debug, Default)]
pub struct FeedParams {
    pub after: Option<String>,
    pub limit: Option<String>,
    pub types: Option<String>,
    pub wait: Option<String>,
}

/// The feed's answer: `{"events":[...],"next":"<position>"}`.
#[derive(Serialize)]
struct FeedReply<'a> {
    events: &'a [Event],
    next: Position,
}

/// How long `GET /api/events?wait=` asks to wait, for the request's deadline: the HTTP layer
/// adds it to the usual time a request may take. Nothing for a bad value (the handler refuses
/// it).
pub fn wait_allowance(wait: Option<&str>) -> Duration {
    wait.and_then(|text| parse_wait(text).ok()).unwrap_or_default()
}

fn parse_wait(text: &str) -> Result<Duration, Error> {
    text.parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .filter(|wait| *wait <= MAX_WAIT)
        .ok_or_else(|| Error::invalid(format!("wait must be a whole number of seconds from 0 to 30, got {text:?}")))
}

/// One page of the feed after `after` (from the oldest event kept without it). With `wait`,
/// an empty page is held until an event commits or the time is up (woken by the commit's
/// NOTIFY, see `db::events`).
pub async fn feed(state: &AppState, credentials: Credentials<'_>, params: FeedParams) -> Result<Reply, Error> {
    credentials.operator().await?;
    let mut query = FeedQuery {
        after: params.after.as_deref().map(str::parse).transpose()?,
        limit: match params.limit.as_deref() {
            None => DEFAULT_FEED_LIMIT,
            Some(text) => text.parse::<i64>().ok().filter(|n| (1..=MAX_FEED_LIMIT).contains(n)).ok_or_else(|| {
                Error::invalid(format!("limit must be an integer from 1 to {MAX_FEED_LIMIT}, got {text:?}"))
            })?,
        },
        types: params.types.as_deref().map(parse_types).transpose()?,
    };
    let wait = params.wait.as_deref().map(parse_wait).transpose()?.unwrap_or_default();
    let until = tokio::time::Instant::now() + wait;
    // Subscribed before the first read, so that a commit in between still wakes the wait.
    let mut signal: EventSignal = state.db.event_signal();
    let _open = state.metrics.long_poll_opened();
    loop {
        let page = state.db.events(&query).await?;
        if !page.events.is_empty() || tokio::time::Instant::now() >= until {
            return Ok(json(StatusCode::OK, &FeedReply { events: &page.events, next: page.next }));
        }
        query.after = Some(page.next);
        signal.wait(page.held_back, until).await;
    }
}

/// `types=order.created,order.cancelled`: each a known type.
fn parse_types(text: &str) -> Result<Vec<String>, Error> {
    text.split(',')
        .map(|name| match EVENT_TYPES.contains(&name) {
            true => Ok(name.to_owned()),
            false => Err(Error::invalid(format!("types holds {name:?}; known types: {}", EVENT_TYPES.join(", ")))),
        })
        .collect()
}

/// One order's events, oldest first: `{"events":[...]}`. In jwt mode only the customer's own
/// (another's order is 404, as on every order path).
pub async fn of_order(state: &AppState, credentials: Credentials<'_>, order_id: i64) -> Result<Reply, Error> {
    let owner = credentials.customer().await?.owner_filter();
    let events = state.db.order_events(order_id, owner).await?;
    if events.is_empty() {
        // No event: the order does not exist (for this caller), or it predates the events.
        state.db.order(order_id, owner).await?;
    }
    #[derive(Serialize)]
    struct OrderEvents<'a> {
        events: &'a [Event],
    }
    Ok(json(StatusCode::OK, &OrderEvents { events: &events }))
}
