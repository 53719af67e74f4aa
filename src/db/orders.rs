//! Orders: creation, reading, cancellation and status changes, each one transaction.
//!
//! Every write follows one locking order, so that no two transactions can deadlock:
//! the order row first (when there is one), then product rows in ascending id.
//!
//! Each transaction costs one round trip. Creating an order is a single statement, which
//! PostgreSQL runs as a transaction of its own: it commits whole or not at all. Cancelling and
//! moving an order along its lifecycle are pipelines (`PooledConn::transaction`): BEGIN, the
//! locking statements, the writing statement and COMMIT, sent back to back. PostgreSQL runs a
//! connection's statements one after the other, so the writing statement starts only when the
//! locking ones have taken every lock, and (at READ COMMITTED) reads the rows as they are now
//! that they are locked.
//!
//! A write that must not happen (not enough stock, order already cancelled) is not an error
//! inside the transaction: the writing statement checks the same conditions and writes
//! nothing, and the Rust code then says precisely why from what the locking part saw.

use serde::Serialize;
use tokio_postgres::error::SqlState;

use postgres_types::ToSql;

use super::{Pool, PooledConn, pool::Sql};
use crate::{
    domain::{NewOrder, OrderStatus, Page},
    error::Error,
    money::Money,
};
use postgres_types::Type;

/// The response to a created order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrder {
    pub order_id: i64,
    pub status: OrderStatus,
    pub total_amount: Money,
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
/// the user exists, and the locked products' ids and stock, from which the caller tells why an
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

/// Creates an order in one transaction, or rejects it whole.
pub async fn create(pool: &Pool, order: &NewOrder) -> Result<CreatedOrder, Error> {
    let mut conn = pool.get().await?;
    place(&mut conn, order, Transaction::Whole).await
}

/// Creates an order inside the transaction the caller opened on `conn` (to claim an
/// idempotency key first); the caller commits or rolls back. On a rejection the transaction
/// is still open and nothing of the order was written.
pub async fn create_in_transaction(conn: &mut PooledConn, order: &NewOrder) -> Result<CreatedOrder, Error> {
    place(conn, order, Transaction::AlreadyOpen).await
}

enum Transaction {
    /// The order's statement on its own: a transaction by itself.
    Whole,
    /// The caller's open transaction.
    AlreadyOpen,
}

async fn place(conn: &mut PooledConn, order: &NewOrder, transaction: Transaction) -> Result<CreatedOrder, Error> {
    let product_ids: Vec<i32> = order.lines.iter().map(|line| line.product_id).collect();
    let quantities: Vec<i32> = order.lines.iter().map(|line| line.quantity).collect();
    let params: [&(dyn ToSql + Sync); 3] = [&order.user_id, &product_ids, &quantities];
    let rows = match transaction {
        Transaction::Whole => conn.query(&CREATE_ORDER, &params).await,
        Transaction::AlreadyOpen => conn.then([(&CREATE_ORDER, &params)]).await.map(|[rows]| rows),
    };
    let rows = rows.map_err(|e| {
        if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
            Error::invalid("the order total is larger than an order can hold")
        } else {
            Error::from(e)
        }
    })?;
    let row = rows.first().ok_or_else(|| Error::Internal("order statement returned no row".into()))?;

    if let Some(order_id) = row.get::<_, Option<i64>>(0) {
        return Ok(CreatedOrder { order_id, status: OrderStatus::Processing, total_amount: row.get(1) });
    }
    // Nothing was written: say why, from what the statement saw once the rows were locked.
    let user_exists: bool = row.get(2);
    if !user_exists {
        return Err(Error::UserNotFound { user_id: order.user_id });
    }
    let locked_ids: Vec<i32> = row.get(3);
    let locked_stock: Vec<i32> = row.get(4);
    let stock_of = |product_id: i32| locked_ids.iter().position(|id| *id == product_id).map(|i| locked_stock[i]);
    if let Some(line) = order.lines.iter().find(|line| stock_of(line.product_id).is_none()) {
        return Err(Error::ProductNotFound { product_id: line.product_id });
    }
    for line in &order.lines {
        let available = stock_of(line.product_id).unwrap_or(0);
        if available < line.quantity {
            return Err(Error::InsufficientStock { product_id: line.product_id, requested: line.quantity, available });
        }
    }
    Err(Error::Internal("order not written although every check passed".into()))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderDetails {
    pub order_id: i64,
    pub status: OrderStatus,
    pub total_amount: Money,
    pub created_at: String,
    pub user: OrderUser,
    pub items: Vec<OrderItem>,
}

#[derive(Debug, Serialize)]
pub struct OrderUser {
    pub id: i32,
    pub email: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub product_id: i32,
    pub product_name: String,
    pub quantity: i32,
    pub price: Money,
}

/// An order with its user and lines, one row per line (an order always has at least one).
/// `createdAt` is formatted by PostgreSQL as RFC 3339 in UTC with milliseconds.
const GET_ORDER: Sql = Sql {
    params: &[Type::INT8],
    text: r#"
    SELECT o.id, o.status, o.total_amount,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
           u.id, u.email,
           i.product_id, p.name, i.quantity, i.price
    FROM orders o
    JOIN users u ON u.id = o.user_id
    JOIN order_items i ON i.order_id = o.id
    JOIN products p ON p.id = i.product_id
    WHERE o.id = $1
    ORDER BY i.id"#,
};

pub async fn get(pool: &Pool, order_id: i64) -> Result<OrderDetails, Error> {
    let rows = pool.get().await?.query(&GET_ORDER, &[&order_id]).await?;
    let first = rows.first().ok_or(Error::OrderNotFound { order_id })?;
    Ok(OrderDetails {
        order_id: first.get(0),
        status: status_of(first.get(1))?,
        total_amount: first.get(2),
        created_at: first.get(3),
        user: OrderUser { id: first.get(4), email: first.get(5) },
        items: rows
            .iter()
            .map(|row| OrderItem {
                product_id: row.get(6),
                product_name: row.get(7),
                quantity: row.get(8),
                price: row.get(9),
            })
            .collect(),
    })
}

/// Locks the order row: concurrent cancels of one order queue here, one at a time.
const LOCK_ORDER: Sql = Sql { params: &[Type::INT8], text: "SELECT status FROM orders WHERE id = $1 FOR UPDATE" };

/// Locks, in ascending id order, the products whose stock a cancel will restore. Empty unless
/// the order (already locked) is still processing, so a repeated cancel takes no product lock.
const LOCK_ORDER_PRODUCTS: Sql = Sql {
    params: &[Type::INT8],
    text: "
    SELECT p.id
    FROM products p
    WHERE p.id IN (SELECT i.product_id
                   FROM order_items i JOIN orders o ON o.id = i.order_id
                   WHERE o.id = $1 AND o.status = 'processing')
    ORDER BY p.id
    FOR UPDATE OF p",
};

/// Cancels a processing order: marks it cancelled (the lifecycle trigger timestamps it), puts
/// each line's quantity back in stock with its inventory movement, and marks the payment refunded. The `status = 'processing'` condition on the locked row
/// is what makes the restore happen exactly once. Returns one row if it cancelled.
const CANCEL_ORDER: Sql = Sql {
    params: &[Type::INT8],
    text: "
    WITH cancelled AS (
        UPDATE orders
        SET status = 'cancelled'
        WHERE id = $1 AND status = 'processing'
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

/// Cancels an order. Cancelling a cancelled order is a success that changes nothing.
pub async fn cancel(pool: &Pool, order_id: i64) -> Result<(), Error> {
    let mut conn = pool.get().await?;
    let [locked, _products, cancelled] = conn
        .transaction([(&LOCK_ORDER, &[&order_id]), (&LOCK_ORDER_PRODUCTS, &[&order_id]), (&CANCEL_ORDER, &[&order_id])])
        .await?;

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
        return cancel(pool, order_id).await;
    }
    let mut conn = pool.get().await?;
    let (locked, advanced) = match target.reached_from() {
        Some(from) => {
            let [locked, advanced] = conn
                .transaction([
                    (&LOCK_ORDER, &[&order_id]),
                    (&ADVANCE_ORDER, &[&order_id, &target.as_str(), &from.as_str()]),
                ])
                .await?;
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

/// One row of an order listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderSummary {
    pub order_id: i64,
    pub user_id: i32,
    pub status: OrderStatus,
    pub total_amount: Money,
    pub created_at: String,
}

/// Which orders to list.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderFilter {
    pub user_id: Option<i32>,
    pub status: Option<OrderStatus>,
}

/// For the transaction of a listing: plan its statement for the values it is given each time.
/// A prepared statement otherwise switches to a generic plan, made without the values, once
/// five executions suggest that plan is no dearer; for the optional filters of `LIST_ORDERS`
/// that plan cannot use the index of a filter that may be absent and walks the table in id
/// order (the soak saw 44 ms per page at 250,000 orders). Skewed data (one customer with
/// most of the orders) fools the estimate that guards the switch. Planning costs a fraction
/// of a millisecond.
const PLAN_FOR_THE_VALUES_GIVEN: Sql = Sql { params: &[], text: "SET LOCAL plan_cache_mode = force_custom_plan" };

/// One keyset page of orders, optionally of one user and/or one status. A NULL filter
/// parameter matches everything. $1 user id, $2 status, $3 after this id, $4 limit.
const LIST_ORDERS: Sql = Sql {
    params: &[Type::INT4, Type::TEXT, Type::INT8, Type::INT8],
    text: r#"
    SELECT id, user_id, status, total_amount,
           to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
    FROM orders
    WHERE ($1::int4 IS NULL OR user_id = $1)
      AND ($2::text IS NULL OR status = $2)
      AND id > $3
    ORDER BY id
    LIMIT $4"#,
};

pub async fn list(pool: &Pool, filter: OrderFilter, page: Page) -> Result<Vec<OrderSummary>, Error> {
    let status = filter.status.map(OrderStatus::as_str);
    let [_, rows] = pool
        .get()
        .await?
        .transaction([
            (&PLAN_FOR_THE_VALUES_GIVEN, &[]),
            (&LIST_ORDERS, &[&filter.user_id, &status, &page.after, &page.limit]),
        ])
        .await?;
    rows.iter()
        .map(|row| {
            Ok(OrderSummary {
                order_id: row.get(0),
                user_id: row.get(1),
                status: status_of(row.get(2))?,
                total_amount: row.get(3),
                created_at: row.get(4),
            })
        })
        .collect()
}

fn status_of(text: &str) -> Result<OrderStatus, Error> {
    OrderStatus::parse(text).ok_or_else(|| Error::Internal(format!("unknown order status {text:?} in the database")))
}
