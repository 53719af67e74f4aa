//! Placing an order, with or without an idempotency key: one call, one transaction.
//!
//! Without a key the order is a single statement, which PostgreSQL runs as a transaction of
//! its own: it commits whole or not at all, in one round trip.
//!
//! With a key, one transaction claims the key, places the order and stores the outcome with
//! the key, so other transactions see a key either absent or with its final outcome, never
//! half there. Claiming inserts the key row: a concurrent request with the same key blocks on
//! the primary key's unique index until the first transaction ends. If that one committed, the
//! waiter finds the stored outcome and replays it; if it rolled back (a 5xx, nothing stored),
//! the waiter claims the key itself. Either way there is never a second order. A waiter that
//! waits past `lock_timeout` (or its deadline) gets 409 IDEMPOTENCY_IN_PROGRESS.

use std::time::Duration;

use postgres_types::{ToSql, Type};
use serde::Serialize;
use tokio_postgres::{Row, error::SqlState};

use crate::{
    db::{Failure, Pool, Sql, Tx, orders::Batcher},
    domain::{IdempotencyKey, NewOrder, OrderStatus},
    error::Error,
    money::Money,
};

/// A created order: the body of the 201.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrder {
    pub order_id: i64,
    pub status: OrderStatus,
    pub total_amount: Money,
}

/// What placing an order did.
#[derive(Debug)]
pub enum Placed {
    /// The order was written now.
    Created(CreatedOrder),
    /// The key was used before for the same request: the outcome stored then, to be answered
    /// again byte for byte (a 201, or the 4xx that refused the order).
    Replayed(StoredOutcome),
}

/// The status a created order is answered with (201), stored with its key like any other.
const CREATED: u16 = 201;

/// An outcome stored with an idempotency key: the status and JSON body it was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    pub status: u16,
    pub body: String,
}

/// Creates an order, or writes nothing. $1 user id, $2 product ids, $3 quantities (same length,
/// in the client's line order; ids distinct).
///
/// `locked` locks the ordered products in ascending id order (the ORDER BY is applied before the
/// row locks are taken) and reads their stock as it is once locked, the latest committed
/// values. The order, its lines (unit price copied), the payment for the total, the stock
/// decrement and its inventory movements are written only if the user exists and every line's
/// product exists with enough stock. Every product row written was locked by `locked` first:
/// the UPDATE in `taken` joins `new_order`, whose aggregate yields its row only after reading
/// every line, hence every locked row, so no lock is ever taken out of id order.
///
/// `taken` sets the stock from `locked`'s reading, not from `products.stock`: the UPDATE finds
/// each row as the statement's snapshot saw it, which may predate a restock or cancellation
/// that `locked` waited for, and PostgreSQL checks `CHECK (stock >= 0)` on the row computed
/// from that old version before it moves on to the current one. From the old, lower stock an
/// order that fits the current stock would fail the check (the soak saw it as a 500). The
/// current version is the one `locked` read and still holds locked, so both agree.
///
/// One row comes back: the new order's id and total (NULL when nothing was written), whether
/// the user exists, and the locked products' ids and stock, from which `outcome` tells why an
/// order was refused.
const CREATE_ORDER: Sql = Sql {
    params: &[Type::INT4, Type::INT4_ARRAY, Type::INT4_ARRAY],
    text: "
    WITH locked AS (
        SELECT id, price, stock
        FROM products
        WHERE id = ANY($2::int4[])
        ORDER BY id
        FOR UPDATE
    ),
    line AS (
        SELECT r.position, r.product_id, r.quantity, locked.price, locked.stock
        FROM unnest($2::int4[], $3::int4[]) WITH ORDINALITY AS r (product_id, quantity, position)
        JOIN locked ON locked.id = r.product_id
        WHERE locked.stock >= r.quantity
    ),
    new_order AS (
        INSERT INTO orders (user_id, status, total_amount)
        SELECT $1::int4, 'processing', sum(line.price * line.quantity)
        FROM line
        HAVING count(*) = cardinality($2::int4[])
           AND EXISTS (SELECT 1 FROM users WHERE id = $1::int4)
        RETURNING id, total_amount
    ),
    new_lines AS (
        INSERT INTO order_items (order_id, product_id, quantity, price)
        SELECT new_order.id, line.product_id, line.quantity, line.price
        FROM new_order CROSS JOIN line
        ORDER BY line.position
    ),
    payment AS (
        INSERT INTO payments (order_id, amount, status)
        SELECT id, total_amount, 'completed' FROM new_order
    ),
    taken AS (
        UPDATE products
        SET stock = line.stock - line.quantity
        FROM line CROSS JOIN new_order
        WHERE products.id = line.product_id
    ),
    ledger AS (
        INSERT INTO inventory_movements (product_id, delta, reason, order_id)
        SELECT line.product_id, -line.quantity, 'order', new_order.id
        FROM line CROSS JOIN new_order
    )
    SELECT new_order.id,
           new_order.total_amount,
           EXISTS (SELECT 1 FROM users WHERE id = $1::int4),
           ARRAY(SELECT id FROM locked ORDER BY id),
           ARRAY(SELECT stock FROM locked ORDER BY id)
    FROM (VALUES (1)) AS always_one_row
    LEFT JOIN new_order ON true",
};

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
/// stored outcome (NULL when it is our own claim). Same parameters as CLAIM_KEY.
const FIND_KEY: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::TEXT],
    text: "
    SELECT request_hash = md5($3), response_status, response_body
    FROM idempotency_keys
    WHERE user_id = $1 AND key = $2",
};

/// A write to a stored key that changes nothing, so that the replay's commit waits for the
/// synchronous standby like any write's. $1 user, $2 key.
const TOUCH_KEY: Sql = Sql {
    params: &[Type::INT4, Type::TEXT],
    text: "UPDATE idempotency_keys SET response_status = response_status WHERE user_id = $1 AND key = $2",
};

/// $1 user, $2 key, $3 status, $4 body.
const SAVE_OUTCOME: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::INT2, Type::TEXT],
    text: "
    UPDATE idempotency_keys SET response_status = $3, response_body = $4
    WHERE user_id = $1 AND key = $2",
};

/// Places `order` in one transaction, or rejects it whole. With `key`, the outcome is stored
/// with the key (kept for `key_retention`) in that same transaction, and a retry of the same
/// request gets it back as `Placed::Replayed` instead of a second order.
///
/// Without a key and with a `batcher` (ORDER_BATCH_MAX > 1), the order joins the next batch
/// instead (`batch.rs`): its own outcome all the same.
pub async fn place(
    pool: &Pool,
    batcher: Option<&Batcher>,
    order: &NewOrder,
    key: Option<&IdempotencyKey>,
    key_retention: Duration,
) -> Result<Placed, Error> {
    if let (None, Some(batcher)) = (key, batcher) {
        return batcher.place(order.clone()).await.map(Placed::Created);
    }
    let product_ids: Vec<i32> = order.lines.iter().map(|line| line.product_id).collect();
    let quantities: Vec<i32> = order.lines.iter().map(|line| line.quantity).collect();
    let create: [&(dyn ToSql + Sync); 3] = [&order.user_id, &product_ids, &quantities];
    let conn = pool.get().await?;

    let Some(key) = key else {
        let rows = { conn }.write(&CREATE_ORDER, &create).await.map_err(refusal_or_failure)?;
        return outcome(order, &rows).map(Placed::Created);
    };

    let fingerprint = order.fingerprint();
    let retention_secs = key_retention.as_secs_f64();
    let claim: [&(dyn ToSql + Sync); 4] = [&order.user_id, &key.as_str(), &fingerprint, &retention_secs];
    // The only wait here is on a concurrent request holding the key; if that wait ends in a
    // lock or statement timeout (or the request's deadline), the first request is still running.
    let (tx, [claimed, found]) =
        conn.begin([(&CLAIM_KEY, &claim), (&FIND_KEY, &claim[..3])]).await.map_err(|e| match e.code() {
            Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED => {
                Error::IdempotencyInProgress
            }
            _ => Error::from(e),
        })?;
    if claimed.is_empty() {
        let stored = match replay(&found) {
            Ok(stored) => stored,
            Err(refusal) => {
                tx.rollback().await?;
                return Err(refusal);
            }
        };
        // The stored outcome may be one whose commit was answered 504 because the synchronous
        // standby never confirmed it: committed here, maybe nowhere else. Replaying it as a
        // 201 would promise what the first answer could not. So the replay commits a write of
        // its own, whose wait for the standby covers every earlier commit of this server (WAL
        // is one sequence): acknowledged, the stored order is replicated too; if the wait is
        // cancelled again, the replay is 504 OUTCOME_UNKNOWN like the first answer.
        tx.commit([(&TOUCH_KEY, &claim[..2])]).await?;
        return Ok(Placed::Replayed(stored));
    }

    // A failed statement has rolled the transaction back, the claim of the key with it.
    let (tx, [rows]) = tx.then([(&CREATE_ORDER, &create)]).await.map_err(refusal_or_failure)?;
    let placed = outcome(order, &rows);
    // Outcomes a retry would get again are stored: the order, or the 4xx that refused it.
    let stored = match &placed {
        Ok(created) => stored(CREATED, created),
        Err(refusal) if refusal.status().is_client_error() => {
            let answer = refusal.answer();
            stored(answer.status.as_u16(), &answer.body)
        }
        Err(_) => None,
    };
    let Some(stored) = stored else {
        tx.rollback().await?;
        return placed.map(Placed::Created);
    };
    save(tx, order, key, &stored).await?;
    placed.map(Placed::Created)
}

/// Stores `outcome` with the claimed key and commits the whole transaction.
async fn save(tx: Tx, order: &NewOrder, key: &IdempotencyKey, outcome: &StoredOutcome) -> Result<(), Error> {
    let status = outcome.status as i16;
    tx.commit([(&SAVE_OUTCOME, &[&order.user_id, &key.as_str(), &status, &outcome.body])]).await?;
    Ok(())
}

/// The outcome as it is stored: the status and the JSON body it is answered with. The body is
/// the same serialization of the same value that the first answer renders, so a replay is
/// byte for byte the first answer.
fn stored(status: u16, body: &impl Serialize) -> Option<StoredOutcome> {
    serde_json::to_string(body).ok().map(|body| StoredOutcome { status, body })
}

/// The outcome stored with a key that was already taken, or why it cannot be replayed.
fn replay(found: &[Row]) -> Result<StoredOutcome, Error> {
    let row = found.first().ok_or_else(|| Error::Internal("idempotency key neither claimed nor found".into()))?;
    let same_request: bool = row.get(0);
    let status: Option<i16> = row.get(1);
    let body: Option<String> = row.get(2);
    match (same_request, status, body) {
        (false, _, _) => Err(Error::IdempotencyKeyReused),
        (true, Some(status), Some(body)) => Ok(StoredOutcome { status: status as u16, body }),
        (true, _, _) => Err(Error::Internal("committed idempotency key without a response".into())),
    }
}

/// An order total beyond `numeric(12,2)` is the request's doing; any other failure is not.
fn refusal_or_failure(error: Failure) -> Error {
    if error.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
        Error::invalid("the order total is larger than an order can hold")
    } else {
        Error::from(error)
    }
}

/// The created order, or why nothing was written, from what CREATE_ORDER saw once the rows
/// were locked.
pub(super) fn outcome(order: &NewOrder, rows: &[Row]) -> Result<CreatedOrder, Error> {
    let row = rows.first().ok_or_else(|| Error::Internal("order statement returned no row".into()))?;
    if let Some(order_id) = row.get::<_, Option<i64>>(0) {
        return Ok(CreatedOrder { order_id, status: OrderStatus::Processing, total_amount: row.get(1) });
    }
    let user_exists: bool = row.get(2);
    if !user_exists {
        return Err(Error::UserNotFound { user_id: order.user_id });
    }
    let locked_ids: Vec<i32> = row.get(3);
    let locked_stock: Vec<i32> = row.get(4);
    let stock_of = |product_id: i32| locked_ids.iter().position(|id| *id == product_id).map(|i| locked_stock[i]);
    if let Some(line) = order.lines.iter().find(|line| stock_of(line.product_id).is_none()) {
        return Err(Error::OrderedProductNotFound { product_id: line.product_id });
    }
    for line in &order.lines {
        let available = stock_of(line.product_id).unwrap_or(0);
        if available < line.quantity {
            return Err(Error::InsufficientStock { product_id: line.product_id, requested: line.quantity, available });
        }
    }
    Err(Error::Internal("order not written although every check passed".into()))
}
