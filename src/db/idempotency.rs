//! Expired idempotency keys: deleted in the background (`Db::purge_periodically`), a batch at
//! a time. Keys are claimed
//! and their outcomes stored by `orders::place`, in the order's own transaction.

use std::time::Duration;

use postgres_types::Type;

use super::{Pool, Sql};
use crate::error::Error;

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
