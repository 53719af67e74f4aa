//! The outbox's read side: the commit-ordered feed, one order's events, the wake-up when
//! events commit, and the retention purge. The events themselves are written by each change,
//! in its own transaction (`orders::place`, `orders::lifecycle`, `products`).
//!
//! **Commit order.** A feed that reads events in id order skips events: a transaction that
//! drew a smaller id can commit after a reader has gone past it (the bug Marten, Eventuous and
//! Emmett shipped). Here a position is (writing transaction id, event id), and the feed hands
//! out only events whose transaction id is below the oldest transaction still running in the
//! service's database (`events_watermark()`, sql/0006): every transaction below it has ended,
//! so no event can appear there later, and any transaction still to commit has a larger id, so
//! its events come after every position handed out. A full re-read from the start gives
//! exactly the sequence an incremental reader saw. The price: a long writing transaction in
//! the service's database holds the feed back until it ends. Alternatives not taken: numbering
//! events after commit by one writer (a second write of every event, and one process that must
//! always run), PgQ-style snapshot ticks (the same watermark, with a table of ticks to keep).
//!
//! **Waking up.** One LISTEN connection per process turns `NOTIFY order_api_events` into a
//! signal that long-polls and the webhook dispatcher wait on. Cancels, status changes and
//! restocks send the NOTIFY in their own transaction (delivered at its commit). Order batches
//! do not: a transaction that notifies holds PostgreSQL's notify lock from its commit until
//! its WAL is flushed, so the two order lanes could not commit together (without it, batched
//! orders went 7 % faster, 10 % on one hot product: `make bench`). After a batch commits, its
//! `Announcer` wakes this process's waiters at once and has the LISTEN connection send one
//! NOTIFY, for the other replicas, for every batch that committed while the last was being
//! sent. A process that dies between a commit and its NOTIFY leaves the other replicas' waiters
//! to the next notification or their own timeouts. While the LISTEN connection is down, or
//! while committed events wait for an older transaction to end (no notification comes then),
//! the waiters look again every `RECHECK_EVERY`.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use postgres_types::{ToSql, Type};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, watch};
use tokio_postgres::Row;

use super::{Pool, Sql};
use crate::{domain::EVENT_TYPES, error::Error};

/// Events committed by this process, by type (in `EVENT_TYPES` order), for `/metrics`:
/// process-wide, like the counters of any Prometheus client.
static WRITTEN: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Counts `count` events of `kind` as committed.
pub(super) fn count_written(kind: &str, count: u64) {
    if let Some(i) = EVENT_TYPES.iter().position(|known| *known == kind) {
        WRITTEN[i].fetch_add(count, Ordering::Relaxed);
    }
}

/// Each event type with how many events of it this process has committed.
pub fn written() -> impl Iterator<Item = (&'static str, u64)> {
    EVENT_TYPES.iter().zip(&WRITTEN).map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
}

/// Sent by the transactions that write events (but order batches: see `Announcer`);
/// delivered when it commits.
pub(super) const NOTIFY_EVENTS: Sql = Sql { params: &[], text: "NOTIFY order_api_events" };

/// The listening connection also sends the order batches' NOTIFY, each in a transaction of
/// its own, whose commit need not wait for its WAL to reach the disk: a notification is not
/// durable anyway, and these commits' flushes queued beside the batches', which hold their
/// product locks until their own flush is done.
const LISTEN_EVENTS: &str = "SET synchronous_commit = off; LISTEN order_api_events";

/// How often a waiter looks again when no notification can be relied on.
pub const RECHECK_EVERY: Duration = Duration::from_millis(50);

/// A place in the feed: (writing transaction, event id). Opaque to clients: `"{tx}-{id}"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub tx: i64,
    pub id: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx, self.id)
    }
}

impl FromStr for Position {
    type Err = Error;

    fn from_str(text: &str) -> Result<Position, Error> {
        let invalid = || Error::invalid(format!("after must be a position the feed handed out, got {text:?}"));
        let (tx, id) = text.split_once('-').ok_or_else(invalid)?;
        let number =
            |part: &str| part.parse::<i64>().ok().filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()));
        Ok(Position { tx: number(tx).ok_or_else(invalid)?, id: number(id).ok_or_else(invalid)? })
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An event, as the feed and the webhooks send it (CONTRACT part 5).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub position: Position,
    pub sequence: i32,
    pub occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<i32>,
    /// The order (or product) as the API shows it at that moment, as written.
    pub data: Box<RawValue>,
}

/// The columns of an event, the position first; every query below selects them as `e`.
macro_rules! event_columns {
    () => {
        "e.tx::text::int8, e.id, 'evt_' || replace(e.event_id::text, '-', ''), e.type, e.sequence,
         to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
         e.order_id, e.user_id, e.product_id, coalesce(e.data, order_created_json(e.order_id))::text"
    };
}

/// The event whose columns (`event_columns!`) start at `first`.
pub(super) fn event_from(row: &Row, first: usize) -> Result<Event, Error> {
    let data: String = row.get(first + 9);
    Ok(Event {
        position: Position { tx: row.get(first), id: row.get(first + 1) },
        id: row.get(first + 2),
        kind: row.get(first + 3),
        sequence: row.get(first + 4),
        occurred_at: row.get(first + 5),
        order_id: row.get(first + 6),
        user_id: row.get(first + 7),
        product_id: row.get(first + 8),
        data: RawValue::from_string(data).map_err(|e| Error::Internal(format!("event data is not JSON: {e}")))?,
    })
}

/// One page of the feed. $1, $2 the position after which to read (tx as text, id); $3 the types
/// wanted (NULL: all); $4 the most events. One row always: the watermark (the oldest
/// transaction still running in this database, or the next to start: events at or past it are
/// not handed out yet), the purge point,
/// whether committed events wait behind the watermark; then an event's columns, or NULLs
/// when there is none (`LEFT JOIN`), one row per event.
const FEED: Sql = Sql {
    params: &[Type::TEXT, Type::INT8, Type::TEXT_ARRAY, Type::INT8],
    text: concat!(
        "
    WITH w AS (
        SELECT events_watermark() AS xmin, p.tx AS purged_tx, p.id AS purged_id
        FROM events_purged AS p
    )
    SELECT w.xmin::text::int8, w.purged_tx::text::int8, w.purged_id,
           EXISTS (SELECT 1 FROM events AS late WHERE late.tx >= w.xmin),
           page.*
    FROM w
    LEFT JOIN LATERAL (
        SELECT ",
        event_columns!(),
        "
        FROM events AS e
        WHERE (e.tx, e.id) > ($1::text::xid8, $2)
          AND e.tx < w.xmin
          AND ($3::text[] IS NULL OR e.type = ANY ($3))
        ORDER BY e.tx, e.id
        LIMIT $4
    ) AS page ON true"
    ),
};

/// What to read from the feed.
#[derive(Debug, Clone)]
pub struct FeedQuery {
    /// None: from the oldest event kept.
    pub after: Option<Position>,
    pub limit: i64,
    /// None: every type.
    pub types: Option<Vec<String>>,
}

/// One page of the feed.
#[derive(Debug)]
pub struct FeedPage {
    pub events: Vec<Event>,
    /// Where the next read starts: the last event's position, or, when the page took every
    /// event handed out so far, the watermark itself (every later event comes after it).
    pub next: Position,
    /// Committed events wait behind a transaction still running: look again soon.
    pub held_back: bool,
}

/// Reads one page of the feed; `CursorExpired` when `after` is older than the retention purge.
pub(super) async fn read_feed(pool: &Pool, query: &FeedQuery) -> Result<FeedPage, Error> {
    let after = query.after.unwrap_or_default();
    let after_tx = after.tx.to_string();
    let params: [&(dyn ToSql + Sync); 4] = [&after_tx, &after.id, &query.types, &query.limit];
    let rows = pool.get().await?.query(&FEED, &params).await?;
    let first = rows.first().ok_or_else(|| Error::Internal("the feed answered no row".into()))?;
    let watermark: i64 = first.get(0);
    let purged = Position { tx: first.get(1), id: first.get(2) };
    if query.after.is_some_and(|after| after < purged) {
        return Err(Error::CursorExpired);
    }
    let held_back: bool = first.get(3);
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.get::<_, Option<i64>>(4).is_some() {
            events.push(event_from(row, 4)?);
        }
    }
    let next = match events.last() {
        Some(last) if events.len() as i64 >= query.limit => last.position,
        last => {
            let caught_up = Position { tx: watermark, id: 0 };
            last.map_or(caught_up, |last| last.position.max(caught_up)).max(after)
        }
    };
    Ok(FeedPage { events, next, held_back })
}

/// One order's events, in sequence order; $2 its owner or NULL for any.
const ORDER_EVENTS: Sql = Sql {
    params: &[Type::INT8, Type::INT4],
    text: concat!(
        "SELECT ",
        event_columns!(),
        "
    FROM events AS e
    WHERE e.order_id = $1 AND ($2::int4 IS NULL OR e.user_id = $2)
    ORDER BY e.sequence"
    ),
};

/// The committed events of one order (with `owner`, only if it is that user's).
pub(super) async fn order_events(pool: &Pool, order_id: i64, owner: Option<i32>) -> Result<Vec<Event>, Error> {
    let rows = pool.get().await?.query(&ORDER_EVENTS, &[&order_id, &owner]).await?;
    rows.iter().map(|row| event_from(row, 0)).collect()
}

/// Wakes whoever waits for events: bumped on every notification, and when the LISTEN
/// connection comes or goes (notifications may have been missed meanwhile).
#[derive(Clone)]
pub struct EventSignal {
    changes: watch::Receiver<u64>,
    /// Whether the LISTEN connection is up: while it is not, waiters look again on their own.
    listening: Arc<AtomicBool>,
}

impl EventSignal {
    /// Waits until events may have committed since `self` was cloned or last waited, or
    /// `RECHECK_EVERY` when nothing can be relied on (`recheck`, or no LISTEN connection), or
    /// `until`, whichever comes first.
    pub async fn wait(&mut self, recheck: bool, until: tokio::time::Instant) {
        let mut until = until;
        if recheck || !self.listening.load(Ordering::Relaxed) {
            until = until.min(tokio::time::Instant::now() + RECHECK_EVERY);
        }
        let _ = tokio::time::timeout_at(until, self.changes.changed()).await;
    }
}

/// Says that events committed, after the commit (see the module's comment): wakes this
/// process's waiters now, and the other replicas' by a NOTIFY from the LISTEN connection.
#[derive(Clone)]
pub struct Announcer {
    local: Arc<watch::Sender<u64>>,
    /// One permit for the LISTEN connection's task: every announcement since its last NOTIFY.
    to_notify: Arc<Notify>,
}

impl Announcer {
    pub fn committed(&self) {
        self.local.send_modify(|n| *n += 1);
        self.to_notify.notify_one();
    }
}

/// How long the LISTEN connection waits before connecting again after losing the database.
const LISTEN_RETRY: Duration = Duration::from_millis(500);

/// How often the LISTEN connection is checked: a connection whose peer vanished says nothing.
const LISTEN_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Starts listening for events on a dedicated connection of `pool`'s database; the signal,
/// the announcer of order batches, and the task to abort at shutdown. Behind a
/// transaction-mode pooler a session is not ours, so LISTEN cannot work: `listen = false`
/// leaves the waiters looking every `RECHECK_EVERY`.
pub(super) fn listen(pool: Pool, enabled: bool) -> (EventSignal, Announcer, tokio::task::JoinHandle<()>) {
    let (notify, changes) = watch::channel(0u64);
    let notify = Arc::new(notify);
    let to_notify = Arc::new(Notify::new());
    let announcer = Announcer { local: notify.clone(), to_notify: to_notify.clone() };
    let listening = Arc::new(AtomicBool::new(false));
    let signal = EventSignal { changes, listening: listening.clone() };
    let task = tokio::spawn(async move {
        if !enabled {
            return;
        }
        loop {
            let bump = notify.clone();
            match pool.dedicated("events", move |_| bump.send_modify(|n| *n += 1)).await {
                Ok((client, connection)) => {
                    if client.batch_execute(LISTEN_EVENTS).await.is_ok() {
                        listening.store(true, Ordering::Relaxed);
                        notify.send_modify(|n| *n += 1);
                        let mut checks = tokio::time::interval(LISTEN_CHECK_EVERY);
                        checks.tick().await;
                        loop {
                            let sent = tokio::select! {
                                _ = checks.tick() => client.simple_query("SELECT 1"),
                                () = to_notify.notified() => client.simple_query(NOTIFY_EVENTS.text),
                            };
                            let answered = tokio::time::timeout(LISTEN_CHECK_EVERY, sent).await;
                            if !matches!(answered, Ok(Ok(_))) || connection.is_finished() {
                                break;
                            }
                        }
                        listening.store(false, Ordering::Relaxed);
                        notify.send_modify(|n| *n += 1);
                        tracing::warn!("the connection listening for events was lost; reconnecting");
                    }
                    connection.abort();
                }
                Err(_) => listening.store(false, Ordering::Relaxed),
            }
            tokio::time::sleep(LISTEN_RETRY).await;
        }
    });
    (signal, announcer, task)
}

/// The first events in position order (among those handed out), each with whether it is
/// older than the retention, for the purge. $1 how many, $2 the retention in seconds.
const OLDEST_EVENTS: Sql = Sql {
    params: &[Type::INT8, Type::FLOAT8],
    text: "
    SELECT tx::text::int8, id, occurred_at < now() - make_interval(secs => $2)
    FROM events
    WHERE tx < events_watermark()
    ORDER BY tx, id
    LIMIT $1",
};

/// Deletes the events up to a position and records it as purged. $1, $2 the position.
const PURGE_THROUGH: Sql = Sql {
    params: &[Type::TEXT, Type::INT8],
    text: "
    WITH purged AS (
        DELETE FROM events WHERE (tx, id) <= ($1::text::xid8, $2)
    )
    UPDATE events_purged
    SET tx = $1::text::xid8, id = $2
    WHERE (tx, id) < ($1::text::xid8, $2)",
};

/// Events deleted per statement.
const PURGE_BATCH: i64 = 1_000;

/// Deletes the events older than `retention`, oldest first, and moves the purge point past
/// them (readers before it get 410 CURSOR_EXPIRED); returns how many.
pub async fn purge(pool: &Pool, retention: Duration) -> Result<u64, Error> {
    let retention_secs = retention.as_secs_f64();
    let mut deleted = 0;
    loop {
        let rows = pool.get().await?.query(&OLDEST_EVENTS, &[&PURGE_BATCH, &retention_secs]).await?;
        let expired = rows.iter().take_while(|row| row.get::<_, bool>(2)).count();
        let Some(last) = expired.checked_sub(1).map(|i| &rows[i]) else { return Ok(deleted) };
        let through = Position { tx: last.get(0), id: last.get(1) };
        let tx = through.tx.to_string();
        pool.get().await?.write(&PURGE_THROUGH, &[&tx, &through.id]).await?;
        deleted += expired as u64;
        if expired < rows.len() || (rows.len() as i64) < PURGE_BATCH {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_refuse_anything_else() {
        let position = Position { tx: 7_351, id: 42 };
        assert_eq!(position.to_string().parse::<Position>().unwrap(), position);
        for bad in ["", "1", "1-", "-1", "a-1", "1-b", "1--1", "+1-2", "1-2-3", "99999999999999999999-1"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
        assert!(Position { tx: 1, id: 9 } < Position { tx: 2, id: 1 });
    }
}
