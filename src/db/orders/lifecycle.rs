//! Cancelling an order (its stock restored exactly once) and moving it along its lifecycle,
//! each with its event (`order.cancelled`, `order.shipped`, `order.delivered`) in the same
//! transaction.

use postgres_types::{ToSql, Type};

use super::status_of;
use crate::{
    db::{
        Pool, Sql,
        events::{self, NOTIFY_EVENTS},
    },
    domain::OrderStatus,
    error::Error,
};

/// Locks the order row: concurrent cancels of one order queue here, one at a time.
/// $1 order id, $2 its owner or NULL for any (another user's order is not there to lock).
const LOCK_ORDER: Sql = Sql {
    params: &[Type::INT8, Type::INT4],
    text: "SELECT status FROM orders WHERE id = $1 AND ($2::int4 IS NULL OR user_id = $2) FOR UPDATE",
};

/// Locks, in ascending id order, the products whose stock a cancel will restore. Empty unless
/// the order (already locked) is still processing, so a repeated cancel takes no product lock.
const LOCK_ORDER_PRODUCTS: Sql = Sql {
    params: &[Type::INT8, Type::INT4],
    text: "
    SELECT p.id
    FROM products p
    WHERE p.id IN (SELECT i.product_id
                   FROM order_items i JOIN orders o ON o.id = i.order_id
                   WHERE o.id = $1 AND o.status = 'processing'
                     AND ($2::int4 IS NULL OR o.user_id = $2))
    ORDER BY p.id
    FOR UPDATE OF p",
};

/// Cancels a processing order: marks it cancelled (the lifecycle trigger timestamps it), puts
/// each line's quantity back in stock with its inventory movement, and marks the payment
/// refunded. The `status = 'processing'` condition on the locked row is what makes the restore
/// happen exactly once. Returns one row if it cancelled. $1 order id, $2 owner or NULL, as in
/// LOCK_ORDER.
const CANCEL_ORDER: Sql = Sql {
    params: &[Type::INT8, Type::INT4],
    text: "
    WITH cancelled AS (
        UPDATE orders
        SET status = 'cancelled'
        WHERE id = $1 AND status = 'processing' AND ($2::int4 IS NULL OR user_id = $2)
        RETURNING id
    ),
    restored AS (
        UPDATE products
        SET stock = products.stock + i.quantity
        FROM order_items i JOIN cancelled c ON c.id = i.order_id
        WHERE products.id = i.product_id
    ),
    ledger AS (
        INSERT INTO inventory_movements (product_id, delta, reason, order_id)
        SELECT i.product_id, i.quantity, 'cancel', c.id
        FROM order_items i JOIN cancelled c ON c.id = i.order_id
    ),
    refunded AS (
        UPDATE payments
        SET status = 'refunded'
        FROM cancelled c
        WHERE payments.order_id = c.id
    )
    SELECT id FROM cancelled",
};

/// Writes an order's event: $2 its type, if (and only if) the order ($1, locked by this
/// transaction) now has $3 as its status and no event of that type yet, i.e. this transaction
/// made the change (an order reaches each status at most once). Numbered after the order's last
/// event; the data is the order as it stands now. A statement of its own, after the change, so
/// that it sees it.
const ORDER_EVENT: Sql = Sql {
    params: &[Type::INT8, Type::TEXT, Type::TEXT],
    text: "
    INSERT INTO events (type, order_id, user_id, sequence, data)
    SELECT $2, o.id, o.user_id,
           (SELECT coalesce(max(e.sequence), 0) + 1 FROM events AS e WHERE e.order_id = o.id),
           order_json(o.id)
    FROM orders AS o
    WHERE o.id = $1 AND o.status = $3
      AND NOT EXISTS (SELECT 1 FROM events AS e WHERE e.order_id = o.id AND e.type = $2)
    RETURNING 1",
};

/// Cancels an order (with `owner`, only that user's: another's is `OrderNotFound`).
/// Cancelling a cancelled order is a success that changes nothing.
pub async fn cancel(pool: &Pool, order_id: i64, owner: Option<i32>) -> Result<(), Error> {
    let mut conn = pool.get().await?;
    let order: [&(dyn ToSql + Sync); 2] = [&order_id, &owner];
    let event: [&(dyn ToSql + Sync); 3] = [&order_id, &"order.cancelled", &"cancelled"];
    let [locked, _products, cancelled, event, _notify] = conn
        .transaction([
            (&LOCK_ORDER, &order),
            (&LOCK_ORDER_PRODUCTS, &order),
            (&CANCEL_ORDER, &order),
            (&ORDER_EVENT, &event),
            (&NOTIFY_EVENTS, &[]),
        ])
        .await?;
    events::count_written("order.cancelled", event.len() as u64);

    let status = status_of(locked.first().ok_or(Error::OrderNotFound { order_id })?.get(0))?;
    match status {
        OrderStatus::Processing if !cancelled.is_empty() => Ok(()),
        OrderStatus::Cancelled => Ok(()),
        OrderStatus::Shipped | OrderStatus::Delivered => {
            Err(Error::OrderNotCancellable { order_id, status: status.to_string() })
        }
        OrderStatus::Processing => Err(Error::Internal("processing order was not cancelled".into())),
    }
}

/// Moves a processing order to shipped or a shipped one to delivered. $1 order id, $2 the
/// new status, $3 the status the order must have now. Runs after LOCK_ORDER in the same
/// transaction; the lifecycle trigger refuses any other move and timestamps this one.
const ADVANCE_ORDER: Sql = Sql {
    params: &[Type::INT8, Type::TEXT, Type::TEXT],
    text: "UPDATE orders SET status = $2 WHERE id = $1 AND status = $3 RETURNING id",
};

/// Moves an order along its lifecycle. Setting the status it already has changes nothing and
/// succeeds (PUT is idempotent); cancelling goes through `cancel`, which restores stock.
pub async fn set_status(pool: &Pool, order_id: i64, target: OrderStatus) -> Result<(), Error> {
    if target == OrderStatus::Cancelled {
        return cancel(pool, order_id, None).await;
    }
    let mut conn = pool.get().await?;
    let (locked, advanced) = match target.reached_from() {
        Some(from) => {
            let event_type = format!("order.{target}");
            let [locked, advanced, event, _notify] = conn
                .transaction([
                    (&LOCK_ORDER, &[&order_id, &None::<i32>]),
                    (&ADVANCE_ORDER, &[&order_id, &target.as_str(), &from.as_str()]),
                    (&ORDER_EVENT, &[&order_id, &event_type, &target.as_str()]),
                    (&NOTIFY_EVENTS, &[]),
                ])
                .await?;
            events::count_written(&event_type, event.len() as u64);
            (locked, !advanced.is_empty())
        }
        None => (conn.query(&ORDER_STATUS, &[&order_id]).await?, false),
    };
    let current = status_of(locked.first().ok_or(Error::OrderNotFound { order_id })?.get(0))?;
    if advanced || current == target {
        return Ok(());
    }
    Err(Error::InvalidStatusTransition { order_id, status: current.to_string(), requested: target.to_string() })
}

/// The status alone, for a move that can only be a no-op (back to processing).
const ORDER_STATUS: Sql = Sql { params: &[Type::INT8], text: "SELECT status FROM orders WHERE id = $1" };
