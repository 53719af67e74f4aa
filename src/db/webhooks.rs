//! Webhook endpoints and their deliveries: the operators' endpoints (create, list, change,
//! delete, rotate the secret, replay, the attempts made), and what the dispatcher of
//! `crate::events` needs: routing new events to deliveries, claiming deliveries due, and
//! recording each attempt's outcome. What a delivery sends and how is `crate::events`'.
//!
//! - **Routing.** Each endpoint has a position in the event feed (`routed_tx`, `routed_id`)
//!   up to which events became its deliveries, read below the feed's watermark in position
//!   order, like any reader of the feed, so none is skipped.
//! - **One stream in order.** A delivery is due only once every earlier event of its order
//!   (or product) for this endpoint is delivered or given up: none of them is still pending,
//!   and none is still to be routed.
//! - **One replica at a time.** A claim leases its deliveries (`leased_until`, and a random
//!   `lease` token), each re-checked on the row as it is now, so a delivery is leased to one
//!   claim at a time; a replica that dies leaves its leases to expire, and the deliveries are
//!   claimed again elsewhere. An outcome is recorded only under the lease that made the
//!   attempt (and `crate::events` starts no attempt its lease may not cover).
//! - **Turns, not waits.** Replicas route an endpoint in turn (its row locked `SKIP LOCKED`)
//!   and claim its deliveries in turn (an advisory lock per endpoint, tried, never waited
//!   for): two locks, so that routing never stops a claim, and neither is `FOR UPDATE`, so
//!   recording attempts (whose rows reference the endpoint) never waits for either. Measured
//!   with one lock for both (`make bench`, events.delivery): routing held the endpoint 54 ms
//!   a pass, the claims made meanwhile found it locked and claimed nothing, and each batch of
//!   outcomes waited 28 ms on the lock.

use std::time::Duration;

use postgres_types::{ToSql, Type};
use serde::Serialize;
use tokio_postgres::Row;

use super::{
    Pool, Sql,
    events::{Event, Position, event_from},
};
use crate::{domain::NewWebhook, domain::WebhookChange, error::Error};

/// An endpoint as the API shows it (never its secret, but when it is made).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub id: i64,
    pub url: String,
    pub description: String,
    pub types: Vec<String>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// When its current run of failed attempts began.
    pub failing_since: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

macro_rules! endpoint_columns {
    () => {
        "id, url, description, types, enabled, disabled_reason,
         to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
         to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
         to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
    };
}

impl Endpoint {
    fn from_row(row: &Row) -> Endpoint {
        Endpoint {
            id: row.get(0),
            url: row.get(1),
            description: row.get(2),
            types: row.get(3),
            enabled: row.get(4),
            disabled_reason: row.get(5),
            failing_since: row.get(6),
            created_at: row.get(7),
            updated_at: row.get(8),
        }
    }
}

/// $1 url, $2 description, $3 types, $4 secret.
const CREATE: Sql = Sql {
    params: &[Type::TEXT, Type::TEXT, Type::TEXT_ARRAY, Type::TEXT],
    text: concat!(
        "INSERT INTO webhook_endpoints (url, description, types, secret) VALUES ($1, $2, $3, $4) RETURNING ",
        endpoint_columns!()
    ),
};

pub(super) async fn create(pool: &Pool, hook: &NewWebhook, secret: &str) -> Result<Endpoint, Error> {
    let rows = pool.get().await?.write(&CREATE, &[&hook.url.text, &hook.description, &hook.types, &secret]).await?;
    rows.first().map(Endpoint::from_row).ok_or_else(|| Error::Internal("an endpoint made without a row".into()))
}

/// The most endpoints a listing shows: they are made by hand, a few per shop.
const MAX_ENDPOINTS_LISTED: i64 = 1_000;

const LIST: Sql = Sql {
    params: &[Type::INT8],
    text: concat!("SELECT ", endpoint_columns!(), " FROM webhook_endpoints ORDER BY id LIMIT $1"),
};

pub(super) async fn list(pool: &Pool) -> Result<Vec<Endpoint>, Error> {
    let rows = pool.get().await?.query(&LIST, &[&MAX_ENDPOINTS_LISTED]).await?;
    Ok(rows.iter().map(Endpoint::from_row).collect())
}

const GET: Sql = Sql {
    params: &[Type::INT8],
    text: concat!("SELECT ", endpoint_columns!(), " FROM webhook_endpoints WHERE id = $1"),
};

pub(super) async fn get(pool: &Pool, id: i64) -> Result<Endpoint, Error> {
    let rows = pool.get().await?.query(&GET, &[&id]).await?;
    rows.first().map(Endpoint::from_row).ok_or(Error::WebhookNotFound { webhook_id: id })
}

/// $1 id; $2 url, $3 types, $4 description, $5 enabled, each NULL to keep it. Enabling clears
/// the reason it was disabled and its run of failures; disabling says an operator did it.
const CHANGE: Sql = Sql {
    params: &[Type::INT8, Type::TEXT, Type::TEXT_ARRAY, Type::TEXT, Type::BOOL],
    text: concat!(
        "UPDATE webhook_endpoints
         SET url = coalesce($2, url), types = coalesce($3, types), description = coalesce($4, description),
             enabled = coalesce($5, enabled),
             disabled_reason = CASE WHEN $5 THEN NULL WHEN NOT $5 THEN 'disabled by an operator' ELSE disabled_reason END,
             failing_since = CASE WHEN $5 THEN NULL ELSE failing_since END,
             updated_at = now()
         WHERE id = $1
         RETURNING ",
        endpoint_columns!()
    ),
};

pub(super) async fn change(pool: &Pool, id: i64, change: &WebhookChange) -> Result<Endpoint, Error> {
    let url = change.url.as_ref().map(|url| url.text.as_str());
    let params: [&(dyn ToSql + Sync); 5] = [&id, &url, &change.types, &change.description, &change.enabled];
    let rows = pool.get().await?.write(&CHANGE, &params).await?;
    rows.first().map(Endpoint::from_row).ok_or(Error::WebhookNotFound { webhook_id: id })
}

const DELETE: Sql = Sql { params: &[Type::INT8], text: "DELETE FROM webhook_endpoints WHERE id = $1 RETURNING id" };

pub(super) async fn delete(pool: &Pool, id: i64) -> Result<(), Error> {
    let rows = pool.get().await?.write(&DELETE, &[&id]).await?;
    rows.first().map(drop).ok_or(Error::WebhookNotFound { webhook_id: id })
}

/// How long a rotated secret keeps signing beside the new one.
pub const SECRET_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// $1 id, $2 the new secret, $3 the overlap in seconds. Returns when the old one stops.
const ROTATE: Sql = Sql {
    params: &[Type::INT8, Type::TEXT, Type::FLOAT8],
    text: "
    UPDATE webhook_endpoints
    SET previous_secret = secret, previous_secret_until = now() + make_interval(secs => $3), secret = $2,
        updated_at = now()
    WHERE id = $1
    RETURNING to_char(previous_secret_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
};

/// Gives the endpoint `secret`; the old one signs beside it for `SECRET_OVERLAP`. Returns
/// when the old one stops signing.
pub(super) async fn rotate(pool: &Pool, id: i64, secret: &str) -> Result<String, Error> {
    let overlap = SECRET_OVERLAP.as_secs_f64();
    let rows = pool.get().await?.write(&ROTATE, &[&id, &secret, &overlap]).await?;
    rows.first().map(|row| row.get(0)).ok_or(Error::WebhookNotFound { webhook_id: id })
}

/// Sends again every event after $2, $3 (a position) that the endpoint $1 was routed, as a
/// new delivery or by putting its delivery back to pending (an attempt in flight is not
/// recorded then: it no longer holds the lease). Events not routed yet go by routing anyway.
/// Returns one row per delivery queued.
const REPLAY: Sql = Sql {
    params: &[Type::INT8, Type::TEXT, Type::INT8],
    text: "
    INSERT INTO webhook_deliveries (endpoint_id, event_tx, event_id, order_id, product_id, sequence)
    SELECT w.id, e.tx, e.id, e.order_id, e.product_id, e.sequence
    FROM webhook_endpoints AS w
    JOIN events AS e ON (e.tx, e.id) > ($2::text::xid8, $3) AND (e.tx, e.id) <= (w.routed_tx, w.routed_id)
    WHERE w.id = $1 AND (cardinality(w.types) = 0 OR e.type = ANY (w.types))
    ON CONFLICT (endpoint_id, event_id) DO UPDATE
        SET state = 'pending', attempts = 0, next_attempt_at = now(), leased_until = NULL, lease = NULL,
            updated_at = now()
    RETURNING 1",
};

/// Queues every event after `after` for the endpoint again; how many.
pub(super) async fn replay(pool: &Pool, id: i64, after: Position) -> Result<u64, Error> {
    get(pool, id).await?;
    let tx = after.tx.to_string();
    let rows = pool.get().await?.write(&REPLAY, &[&id, &tx, &after.id]).await?;
    Ok(rows.len() as u64)
}

/// An attempt, as the API lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub attempted_at: String,
    /// The status answered, if any.
    pub status: Option<i32>,
    pub latency_ms: f64,
    pub outcome: String,
    pub error: Option<String>,
}

/// $1 endpoint, $2 attempts before this id, $3 the most: newest first.
const ATTEMPTS: Sql = Sql {
    params: &[Type::INT8, Type::INT8, Type::INT8],
    text: "
    SELECT a.id, 'evt_' || replace(e.event_id::text, '-', ''), e.type,
           to_char(a.attempted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
           a.status, a.latency_ms, a.outcome, a.error
    FROM webhook_attempts AS a
    JOIN webhook_deliveries AS d ON d.id = a.delivery_id
    JOIN events AS e ON (e.tx, e.id) = (d.event_tx, d.event_id)
    WHERE a.endpoint_id = $1 AND a.id < $2
    ORDER BY a.id DESC
    LIMIT $3",
};

/// The endpoint's attempts before `before` (all when None), newest first.
pub(super) async fn attempts(pool: &Pool, id: i64, before: Option<i64>, limit: i64) -> Result<Vec<Attempt>, Error> {
    get(pool, id).await?;
    let before = before.unwrap_or(i64::MAX);
    let rows = pool.get().await?.query(&ATTEMPTS, &[&id, &before, &limit]).await?;
    Ok(rows
        .iter()
        .map(|row| Attempt {
            id: row.get(0),
            event_id: row.get(1),
            event_type: row.get(2),
            attempted_at: row.get(3),
            status: row.get(4),
            latency_ms: row.get(5),
            outcome: row.get(6),
            error: row.get(7),
        })
        .collect())
}

/// The enabled endpoints no other replica is routing now, locked for this transaction: `NO KEY
/// UPDATE`, the lock routing's UPDATE of the position takes anyway, which leaves the endpoint
/// free to be referenced (attempts recorded) meanwhile.
const LOCK_ENDPOINTS: Sql = Sql {
    params: &[],
    text: "SELECT id FROM webhook_endpoints WHERE enabled ORDER BY id FOR NO KEY UPDATE SKIP LOCKED",
};

/// The class of the advisory locks that give replicas their turns to claim an endpoint's
/// deliveries (the second key is the endpoint's id). Advisory locks of two keys never clash
/// with the migrations' lock of one key.
const CLAIM_TURN_LOCK_CLASS: i32 = 0x6f72_6465; // "orde"

/// Routes to endpoint $1 (locked) the events after its position, below the feed's
/// watermark, at most $2: a delivery each for those of its types, and its position moves past
/// all of them (to the watermark when it took everything). Returns how many were routed.
const ROUTE: Sql = Sql {
    params: &[Type::INT8, Type::INT8],
    text: "
    WITH w AS (
        SELECT routed_tx, routed_id, types FROM webhook_endpoints WHERE id = $1
    ), mark AS (
        SELECT events_watermark() AS xmin
    ), picked AS (
        -- LATERAL, so that the position bounds the index scan: joined plainly, the planner
        -- read the events index from its start and filtered (54 ms a pass at 120,000 events,
        -- growing with the table).
        SELECT e.id, e.tx, e.type, e.order_id, e.product_id, e.sequence
        FROM w CROSS JOIN mark CROSS JOIN LATERAL (
            SELECT e.id, e.tx, e.type, e.order_id, e.product_id, e.sequence
            FROM events AS e
            WHERE (e.tx, e.id) > (w.routed_tx, w.routed_id) AND e.tx < mark.xmin
            ORDER BY e.tx, e.id
            LIMIT $2
        ) AS e
    ), routed AS (
        INSERT INTO webhook_deliveries (endpoint_id, event_tx, event_id, order_id, product_id, sequence)
        SELECT $1, p.tx, p.id, p.order_id, p.product_id, p.sequence
        FROM picked AS p, w
        WHERE cardinality(w.types) = 0 OR p.type = ANY (w.types)
        ON CONFLICT (endpoint_id, event_id) DO NOTHING
        RETURNING 1
    ), reached AS (
        SELECT t.tx, t.id
        FROM (SELECT routed_tx AS tx, routed_id AS id FROM w
              UNION ALL SELECT tx, id FROM picked
              UNION ALL SELECT mark.xmin, 0 FROM mark WHERE (SELECT count(*) FROM picked) < $2) AS t
        ORDER BY t.tx DESC, t.id DESC
        LIMIT 1
    )
    UPDATE webhook_endpoints
    SET routed_tx = reached.tx, routed_id = reached.id
    FROM reached
    WHERE webhook_endpoints.id = $1
    RETURNING (SELECT count(*) FROM routed)",
};

/// Most events routed to one endpoint per pass.
const ROUTE_BATCH: i64 = 1_000;

/// Routes new events to every endpoint no other replica is routing now.
pub(super) async fn route(pool: &Pool) -> Result<Routed, Error> {
    let conn = pool.get().await?;
    let (tx, rows) = conn.begin(&[(&LOCK_ENDPOINTS, &[])]).await?;
    let endpoints: Vec<i64> = rows[0].iter().map(|row| row.get(0)).collect();
    let params: Vec<[&(dyn ToSql + Sync); 2]> = endpoints.iter().map(|id| [id as _, &ROUTE_BATCH as _]).collect();
    let steps: Vec<_> = params.iter().map(|params| (&ROUTE, &params[..])).collect();
    let routed = tx.commit(&steps).await?;
    let deliveries = routed.iter().filter_map(|rows| rows.first()).map(|row| row.get::<_, i64>(0) as u64).sum();
    Ok(Routed { endpoints: endpoints.len(), deliveries })
}

/// What a routing pass did.
#[derive(Debug, Clone, Copy)]
pub struct Routed {
    /// Endpoints routed (enabled, and not being routed by another replica).
    pub endpoints: usize,
    /// Deliveries made.
    pub deliveries: u64,
}

/// Claims the deliveries due: for each enabled endpoint no other replica is claiming now (its
/// turn lock, class $6), the earliest due whose stream has nothing before them still to go, up
/// to $1 less what this replica holds of the endpoint already ($4 endpoints, $5 how many
/// each); leases them for $2 seconds under token $3. Returns each with its event and where and how to send it (the secrets signing now: the current
/// one, and the previous one while it overlaps). The checks of a stream are scalar subqueries,
/// each an index probe per candidate: written as NOT EXISTS, the planner turns them into
/// anti-joins whose plan depends on statistics a table growing by thousands of rows a second
/// does not have (seen: nested loops scanning every pending delivery per candidate).
const CLAIM: Sql = Sql {
    params: &[Type::INT8, Type::FLOAT8, Type::INT8, Type::INT8_ARRAY, Type::INT8_ARRAY, Type::INT4],
    text: concat!(
        "
    WITH ep AS MATERIALIZED (
        -- The endpoints whose turn this claim got (the id's low 31 bits: a clash of two ids
        -- only skips a turn).
        SELECT w.id
        FROM webhook_endpoints AS w
        WHERE w.enabled AND pg_try_advisory_xact_lock($6, (w.id & 2147483647)::int4)
    ), room AS (
        -- The routed position as of this statement's snapshot (never from a row locked in
        -- it, which would be its newest version: a routing that committed after the snapshot
        -- would show a position past deliveries the snapshot cannot see, letting a product's
        -- later event go while its earlier one is pending).
        SELECT w.id, w.routed_tx, w.routed_id, w.types,
               $1 - coalesce((SELECT q.held FROM unnest($4::int8[], $5::int8[]) AS q (endpoint_id, held)
                              WHERE q.endpoint_id = w.id), 0) AS free
        FROM ep JOIN webhook_endpoints AS w ON w.id = ep.id
    ), picked AS (
        SELECT d.id
        FROM room CROSS JOIN LATERAL (
            SELECT d.id
            FROM webhook_deliveries AS d
            WHERE d.endpoint_id = room.id AND d.state = 'pending' AND d.next_attempt_at <= now()
              AND (d.leased_until IS NULL OR d.leased_until <= now())
              -- The first of its stream still to go...
              AND d.sequence = CASE
                  WHEN d.order_id IS NOT NULL THEN
                      (SELECT min(p.sequence) FROM webhook_deliveries AS p
                       WHERE p.order_id = d.order_id AND p.endpoint_id = d.endpoint_id AND p.state = 'pending')
                  ELSE
                      (SELECT min(p.sequence) FROM webhook_deliveries AS p
                       WHERE p.product_id = d.product_id AND p.endpoint_id = d.endpoint_id AND p.state = 'pending')
                  END
              -- ...and no earlier event of it still to be routed (a product's events can commit
              -- in another order than their numbers: see the module's comment).
              AND CASE
                  WHEN d.order_id IS NOT NULL THEN
                      (SELECT e.id FROM events AS e
                       WHERE e.order_id = d.order_id AND e.sequence < d.sequence
                         AND (e.tx, e.id) > (room.routed_tx, room.routed_id)
                         AND (cardinality(room.types) = 0 OR e.type = ANY (room.types))
                       LIMIT 1)
                  ELSE
                      (SELECT e.id FROM events AS e
                       WHERE e.product_id = d.product_id AND e.sequence < d.sequence
                         AND (e.tx, e.id) > (room.routed_tx, room.routed_id)
                         AND (cardinality(room.types) = 0 OR e.type = ANY (room.types))
                       LIMIT 1)
                  END IS NULL
            ORDER BY d.next_attempt_at, d.id
            LIMIT greatest(room.free, 0)
        ) AS d
    ), claimed AS (
        UPDATE webhook_deliveries AS d
        SET leased_until = now() + make_interval(secs => $2), lease = $3
        -- By id (an array, so the primary key is used whatever the statistics say), and checked
        -- again on the row as it is now: `picked` read it in this statement's snapshot, and a
        -- claim that committed since may have leased it (the UPDATE re-reads it).
        WHERE d.id = ANY (ARRAY(SELECT id FROM picked))
          AND d.state = 'pending' AND (d.leased_until IS NULL OR d.leased_until <= now())
        RETURNING d.id, d.endpoint_id, d.attempts, d.event_tx, d.event_id
    )
    SELECT c.id, c.endpoint_id, c.attempts, w.url, w.secret,
           CASE WHEN w.previous_secret_until > now() THEN w.previous_secret END, ",
        event_columns!(),
        "
    FROM claimed AS c
    JOIN webhook_endpoints AS w ON w.id = c.endpoint_id
    JOIN events AS e ON (e.tx, e.id) = (c.event_tx, c.event_id)"
    ),
};

/// Set for the claim's transaction: its plan must not depend on statistics. Deliveries come
/// and go by thousands a second, and statistics taken while the table was nearly empty (a new
/// endpoint, an ANALYZE between bursts) make a sequential scan look free: then each candidate's
/// stream check scans every pending delivery, and a claim took 2-8 s with 5,000 pending
/// (`make bench`, events.delivery: 82 deliveries/s against 3,000 events/s) where the indexes
/// take 2 ms.
const PLAN_BY_INDEX: Sql = Sql { params: &[], text: "SET LOCAL enable_seqscan = off" };

/// A delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The token of the lease this attempt holds.
    pub lease: i64,
    pub url: String,
    /// The secrets that sign it: the current one first.
    pub secrets: Vec<String>,
    pub event: Event,
}

/// Claims the deliveries due (see CLAIM): per endpoint, up to `per_endpoint` less what `held`
/// says this replica holds of it already; leased for `lease_for` under the token `lease`.
pub(super) async fn claim(
    pool: &Pool,
    per_endpoint: i64,
    held: &[(i64, i64)],
    lease_for: Duration,
    lease: i64,
) -> Result<Vec<Claimed>, Error> {
    let lease_secs = lease_for.as_secs_f64();
    let (endpoints, counts): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let params: [&(dyn ToSql + Sync); 6] =
        [&per_endpoint, &lease_secs, &lease, &endpoints, &counts, &CLAIM_TURN_LOCK_CLASS];
    let [_, rows] = pool.get().await?.transaction([(&PLAN_BY_INDEX, &[]), (&CLAIM, &params)]).await?;
    rows.iter()
        .map(|row| {
            let mut secrets = vec![row.get::<_, String>(4)];
            secrets.extend(row.get::<_, Option<String>>(5));
            Ok(Claimed {
                delivery_id: row.get(0),
                endpoint_id: row.get(1),
                attempts: row.get(2),
                lease,
                url: row.get(3),
                secrets,
                event: event_from(row, 6)?,
            })
        })
        .collect()
}

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the delivery is done.
    Delivered,
    /// Failed; another attempt after the delay.
    Retry(Duration),
    /// Failed, and it was the last attempt: given up.
    Failed,
    /// 410 Gone: the endpoint is disabled; the delivery waits, pending, until it is enabled.
    Disabled,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry(_) => "retry",
            Outcome::Failed => "failed",
            Outcome::Disabled => "disabled",
        }
    }
}

/// One attempt, to be recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    pub lease: i64,
    pub status: Option<i32>,
    pub latency_ms: f64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

/// Records attempts, one row each in the arrays: $1 delivery, $2 lease, $3 state after it,
/// $4 seconds until the next attempt (retries). Only a delivery still under the attempt's lease
/// is changed.
const RECORD_DELIVERIES: Sql = Sql {
    params: &[Type::INT8_ARRAY, Type::INT8_ARRAY, Type::TEXT_ARRAY, Type::FLOAT8_ARRAY],
    text: "
    UPDATE webhook_deliveries AS d
    SET state = r.state, attempts = d.attempts + 1, leased_until = NULL, lease = NULL, updated_at = now(),
        next_attempt_at = now() + make_interval(secs => coalesce(r.retry_in, 0))
    FROM unnest($1::int8[], $2::int8[], $3::text[], $4::float8[]) AS r (id, lease, state, retry_in)
    WHERE d.id = r.id AND d.lease = r.lease",
};

/// $1 endpoint, $2 delivery, $3 status, $4 latency, $5 outcome, $6 error: the attempt rows.
const RECORD_ATTEMPTS: Sql = Sql {
    params: &[
        Type::INT8_ARRAY,
        Type::INT8_ARRAY,
        Type::INT4_ARRAY,
        Type::FLOAT8_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
    ],
    text: "
    INSERT INTO webhook_attempts (endpoint_id, delivery_id, status, latency_ms, outcome, error)
    SELECT * FROM unnest($1::int8[], $2::int8[], $3::int4[], $4::float8[], $5::text[], $6::text[])",
};

/// Each endpoint's run of failures after its latest attempt of the batch: $1 endpoints, $2
/// whether that attempt failed; an endpoint that answered 410 ($3) is disabled, and so is one
/// failing for longer than $4 seconds. One UPDATE (a row changed twice by one statement keeps
/// only one change). Returns the endpoints this disabled, with the reason.
const RECORD_ENDPOINTS: Sql = Sql {
    params: &[Type::INT8_ARRAY, Type::BOOL_ARRAY, Type::INT8_ARRAY, Type::FLOAT8],
    text: "
    WITH decided AS (
        SELECT w.id,
               CASE WHEN f.failed THEN coalesce(w.failing_since, now()) END AS failing_since,
               CASE WHEN NOT w.enabled THEN NULL
                    WHEN w.id = ANY ($3) THEN 'the endpoint answered 410 Gone'
                    WHEN f.failed AND coalesce(w.failing_since, now()) < now() - make_interval(secs => $4)
                    THEN 'every attempt failed since '
                         || to_char(w.failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               END AS disabled_for
        FROM unnest($1::int8[], $2::bool[]) AS f (id, failed)
        JOIN webhook_endpoints AS w ON w.id = f.id
    )
    UPDATE webhook_endpoints AS w
    SET failing_since = d.failing_since,
        enabled = w.enabled AND d.disabled_for IS NULL,
        disabled_reason = coalesce(d.disabled_for, w.disabled_reason),
        updated_at = CASE WHEN d.disabled_for IS NULL THEN w.updated_at ELSE now() END
    FROM decided AS d
    -- Only a change is written: most batches change nothing, and an endpoint written would
    -- wait for a routing pass that has it locked.
    WHERE w.id = d.id AND (w.failing_since IS DISTINCT FROM d.failing_since OR d.disabled_for IS NOT NULL)
    RETURNING w.id, d.disabled_for",
};

/// Records a batch of attempts in one transaction; returns the endpoints it disabled, with
/// the reason. `disable_after`: how long an endpoint may fail without a break.
pub(super) async fn record(
    pool: &Pool,
    attempts: &[AttemptRecord],
    disable_after: Duration,
) -> Result<Vec<(i64, String)>, Error> {
    let deliveries: Vec<i64> = attempts.iter().map(|a| a.delivery_id).collect();
    let leases: Vec<i64> = attempts.iter().map(|a| a.lease).collect();
    let states: Vec<&str> = attempts
        .iter()
        .map(|a| match a.outcome {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Retry(_) | Outcome::Disabled => "pending",
        })
        .collect();
    let retry_in: Vec<Option<f64>> = attempts
        .iter()
        .map(|a| match a.outcome {
            Outcome::Retry(delay) => Some(delay.as_secs_f64()),
            _ => None,
        })
        .collect();
    let endpoints: Vec<i64> = attempts.iter().map(|a| a.endpoint_id).collect();
    let statuses: Vec<Option<i32>> = attempts.iter().map(|a| a.status).collect();
    let latencies: Vec<f64> = attempts.iter().map(|a| a.latency_ms).collect();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.name()).collect();
    let errors: Vec<Option<&str>> = attempts.iter().map(|a| a.error.as_deref()).collect();
    // The latest attempt of each endpoint says whether it is failing now.
    let mut latest: Vec<(i64, bool)> = Vec::new();
    for attempt in attempts {
        let failed = attempt.outcome != Outcome::Delivered;
        match latest.iter_mut().find(|(id, _)| *id == attempt.endpoint_id) {
            Some(entry) => entry.1 = failed,
            None => latest.push((attempt.endpoint_id, failed)),
        }
    }
    let (failing_ids, failing): (Vec<i64>, Vec<bool>) = latest.into_iter().unzip();
    let gone: Vec<i64> = attempts.iter().filter(|a| a.outcome == Outcome::Disabled).map(|a| a.endpoint_id).collect();
    let disable_after = disable_after.as_secs_f64();
    let [_, _, disabled] = pool
        .get()
        .await?
        .transaction([
            (&RECORD_DELIVERIES, &[&deliveries, &leases, &states, &retry_in]),
            (&RECORD_ATTEMPTS, &[&endpoints, &deliveries, &statuses, &latencies, &outcomes, &errors]),
            (&RECORD_ENDPOINTS, &[&failing_ids, &failing, &gone, &disable_after]),
        ])
        .await?;
    Ok(disabled.iter().filter_map(|row| Some((row.get(0), row.get::<_, Option<String>>(1)?))).collect())
}

/// Per enabled endpoint: deliveries still to go and the age in seconds of the oldest event
/// among them or among the events not routed to it yet (0 when none).
const BACKLOG: Sql = Sql {
    params: &[],
    text: "
    SELECT w.id,
           (SELECT count(*) FROM webhook_deliveries AS d WHERE d.endpoint_id = w.id AND d.state = 'pending'),
           coalesce(extract(epoch FROM now() - least(
               (SELECT min(e.occurred_at) FROM webhook_deliveries AS d
                JOIN events AS e ON (e.tx, e.id) = (d.event_tx, d.event_id)
                WHERE d.endpoint_id = w.id AND d.state = 'pending'),
               (SELECT min(e.occurred_at) FROM events AS e
                WHERE (e.tx, e.id) > (w.routed_tx, w.routed_id)
                  AND (cardinality(w.types) = 0 OR e.type = ANY (w.types))))), 0)::float8
    FROM webhook_endpoints AS w
    WHERE w.enabled
    ORDER BY w.id",
};

/// One endpoint's backlog, for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    pub endpoint_id: i64,
    pub undelivered: i64,
    pub oldest_age_secs: f64,
}

pub(super) async fn backlog(pool: &Pool) -> Result<Vec<Backlog>, Error> {
    let rows = pool.get().await?.query(&BACKLOG, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| Backlog { endpoint_id: row.get(0), undelivered: row.get(1), oldest_age_secs: row.get(2) })
        .collect())
}

/// Takes new statistics of the deliveries. Their number swings from none to tens of thousands
/// in seconds (an endpoint down, a burst of orders), faster than autovacuum looks (a minute,
/// if it runs at all): with statistics taken while few were pending, the claim's check of a
/// delivery's stream may read the endpoint's whole pending index per candidate instead of the
/// order's (264-296 ms a claim with 30,000 pending, against 4.5 ms once analyzed); delivery
/// fell to a quarter of the order rate (`make bench`, events.delivery, without autovacuum).
const ANALYZE_DELIVERIES: &str = "ANALYZE webhook_deliveries";

pub(super) async fn analyze_deliveries(pool: &Pool) -> Result<(), Error> {
    pool.get().await?.client().batch_execute(ANALYZE_DELIVERIES).await?;
    Ok(())
}
