//! Idempotency keys of order creation: claimed at the start of the order's transaction,
//! stored with the response at its end, replayed to retries.
//!
//! Claiming inserts the key row. A concurrent request with the same key blocks on the
//! primary key's unique index until the first transaction ends: if it committed, the waiter
//! finds the stored response and replays it; if it rolled back (a 5xx, nothing stored), the
//! waiter claims the key itself. Either way there is never a second order. A waiter that
//! waits past `lock_timeout` (or its deadline) gets 409 IDEMPOTENCY_IN_PROGRESS.

use std::time::Duration;

use postgres_types::Type;
use tokio_postgres::error::SqlState;

use super::{Pool, PooledConn, pool::Sql};
use crate::{domain::IdempotencyKey, error::Error, log};

/// What a key says about a request.
#[derive(Debug)]
pub enum Claim {
    /// The key is new (or expired) and now ours; the transaction is open: do the work, then
    /// `save` (or `PooledConn::rollback` to give the key back).
    Claimed,
    /// The same request was done before: its stored response. The transaction is closed.
    Replay { status: u16, body: String },
}

/// Inserts the key, or takes over an expired one; returns a row only if the key is now ours.
/// $1 user, $2 key, $3 request fingerprint, $4 retention in seconds.
const CLAIM_KEY: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::TEXT, Type::FLOAT8],
    text: "
    INSERT INTO idempotency_keys AS k (user_id, key, request_hash)
    VALUES ($1, $2, md5($3))
    ON CONFLICT (user_id, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = NULL, response_body = NULL, created_at = now()
        WHERE k.created_at < now() - make_interval(secs => $4)
    RETURNING true",
};

/// The key as it stands after the claim: whether it was made for the same request, and its
/// stored response (NULL when it is our own claim). Same parameters as CLAIM_KEY.
const FIND_KEY: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::TEXT],
    text: "
    SELECT request_hash = md5($3), response_status, response_body
    FROM idempotency_keys
    WHERE user_id = $1 AND key = $2",
};

/// $1 user, $2 key, $3 status, $4 body.
const SAVE_RESPONSE: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::INT2, Type::TEXT],
    text: "
    UPDATE idempotency_keys SET response_status = $3, response_body = $4
    WHERE user_id = $1 AND key = $2",
};

/// Opens a transaction on `conn` and claims `key` for `fingerprint`, waiting for a concurrent
/// request with the same key to finish first.
pub async fn claim(
    conn: &mut PooledConn,
    user_id: i32,
    key: &IdempotencyKey,
    fingerprint: &str,
    retention: Duration,
) -> Result<Claim, Error> {
    let retention_secs = retention.as_secs_f64();
    let params: [&(dyn postgres_types::ToSql + Sync); 4] = [&user_id, &key.as_str(), &fingerprint, &retention_secs];
    // The only wait here is on a concurrent request holding the key; if that wait ends in a
    // lock or statement timeout (or the request's deadline), the first request is still running.
    let [claimed, found] =
        conn.begin([(&CLAIM_KEY, &params), (&FIND_KEY, &params[..3])]).await.map_err(|e| match e.code() {
            Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED => {
                Error::IdempotencyInProgress
            }
            _ => Error::from(e),
        })?;
    if !claimed.is_empty() {
        return Ok(Claim::Claimed);
    }
    conn.rollback().await?;
    let row = found.first().ok_or_else(|| Error::Internal("idempotency key neither claimed nor found".into()))?;
    let same_request: bool = row.get(0);
    let status: Option<i16> = row.get(1);
    let body: Option<String> = row.get(2);
    match (same_request, status, body) {
        (false, _, _) => Err(Error::IdempotencyKeyReused),
        (true, Some(status), Some(body)) => Ok(Claim::Replay { status: status as u16, body }),
        (true, _, _) => Err(Error::Internal("committed idempotency key without a response".into())),
    }
}

/// Stores the response with the claimed key and commits the whole transaction.
pub async fn save(
    conn: &mut PooledConn,
    user_id: i32,
    key: &IdempotencyKey,
    status: u16,
    body: &str,
) -> Result<(), Error> {
    let status = status as i16;
    conn.commit([(&SAVE_RESPONSE, &[&user_id, &key.as_str(), &status, &body])]).await?;
    Ok(())
}

/// Deletes up to $2 keys older than $1 seconds and counts them. SKIP LOCKED: a key that a
/// request holds right now is left for the next round, so purging never makes a request wait.
const PURGE_EXPIRED: Sql = Sql {
    params: &[Type::FLOAT8, Type::INT8],
    text: "
    WITH purged AS (
        DELETE FROM idempotency_keys
        WHERE ctid IN (SELECT ctid FROM idempotency_keys
                       WHERE created_at < now() - make_interval(secs => $1)
                       LIMIT $2
                       FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*) FROM purged",
};

/// Keys deleted per statement: small enough that each delete is brief.
const PURGE_BATCH: i64 = 1_000;

/// Deletes every key older than `retention`, a batch at a time; returns how many.
pub async fn purge_expired(pool: &Pool, retention: Duration) -> Result<u64, Error> {
    let retention_secs = retention.as_secs_f64();
    let mut deleted = 0;
    loop {
        let rows = pool.get().await?.query(&PURGE_EXPIRED, &[&retention_secs, &PURGE_BATCH]).await?;
        let batch: i64 = rows.first().map_or(0, |row| row.get(0));
        deleted += batch as u64;
        if batch < PURGE_BATCH {
            return Ok(deleted);
        }
    }
}

/// Runs `purge_expired` every `interval`, forever (the server aborts it at shutdown).
pub async fn purge_periodically(pool: Pool, retention: Duration, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        match purge_expired(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => log::info("expired idempotency keys purged", serde_json::json!({"deleted": deleted})),
            Err(e) => log::warn("purging idempotency keys failed", serde_json::json!({"error": format!("{e:?}")})),
        }
    }
}
