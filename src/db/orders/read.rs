//! Reading one order with its lines, and listing orders a keyset page at a time.

use postgres_types::Type;
use serde::Serialize;
use tokio_postgres::Row;

use super::status_of;
use crate::{
    db::{
        Pool, Sql,
        batch::{Batches, Job},
    },
    domain::{OrderStatus, Page},
    error::Error,
    money::Money,
};

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

/// Orders with their users and lines, one row per line (an order always has at least one),
/// for several lookups at once. $1 order ids, $2 each one's owner or NULL for any (same
/// length): another user's order reads as no order. Returns each row's lookup (its 1-based
/// position in $1), ordered by lookup and line. `createdAt` is formatted by PostgreSQL as
/// RFC 3339 in UTC with milliseconds. (Each lookup is an index probe of `orders_pkey`: the
/// planner's guess of 100 lookups already picks nested loops over index scans.)
const GET_ORDERS: Sql = Sql {
    params: &[Type::INT8_ARRAY, Type::INT4_ARRAY],
    text: r#"
    SELECT r.n,
           o.id, o.status, o.total_amount,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
           u.id, u.email,
           i.product_id, p.name, i.quantity, i.price
    FROM unnest($1::int8[], $2::int4[]) WITH ORDINALITY AS r (order_id, owner, n)
    JOIN orders o ON o.id = r.order_id AND (r.owner IS NULL OR o.user_id = r.owner)
    JOIN users u ON u.id = o.user_id
    JOIN order_items i ON i.order_id = o.id
    JOIN products p ON p.id = i.product_id
    ORDER BY r.n, i.id"#,
};

/// Reads of one order, served in batches: requests for orders that arrive while earlier reads
/// are in flight share one statement (`GET_ORDERS`), so that under load an order read costs
/// PostgreSQL a fraction of a round trip. A batch's query is sent after its requests arrived,
/// so a client reads its own writes, as with a query of its own.
pub type ReadBatches = Batches<OrderLookup, OrderDetails>;

/// One order to read: its id, and (for a customer) its owner.
pub struct OrderLookup {
    pub order_id: i64,
    pub owner: Option<i32>,
}

/// The most lookups in one statement.
const MAX_READ_BATCH: usize = 64;

/// Starts serving order reads in batches on `pool`, `slots` at a time.
pub fn read_in_batches(pool: Pool, slots: usize) -> ReadBatches {
    Batches::start(MAX_READ_BATCH, slots, move |lookups: Vec<Job<OrderLookup>>| {
        let pool = pool.clone();
        async move { get_all(&pool, &lookups).await }
    })
}

/// Each lookup's order, or 404, in order.
async fn get_all(pool: &Pool, lookups: &[Job<OrderLookup>]) -> Vec<Result<OrderDetails, Error>> {
    let ids: Vec<i64> = lookups.iter().map(|lookup| lookup.request.order_id).collect();
    let owners: Vec<Option<i32>> = lookups.iter().map(|lookup| lookup.request.owner).collect();
    let rows = match pool.get().await {
        Ok(mut conn) => conn.query(&GET_ORDERS, &[&ids, &owners]).await.map_err(Error::from),
        Err(error) => Err(error),
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => return lookups.iter().map(|_| Err(error.clone())).collect(),
    };
    let mut by_lookup: Vec<Vec<&Row>> = lookups.iter().map(|_| Vec::new()).collect();
    for row in &rows {
        let n: i64 = row.get(0);
        if let Some(lines) = by_lookup.get_mut(n as usize - 1) {
            lines.push(row);
        }
    }
    lookups.iter().zip(by_lookup).map(|(lookup, lines)| details(lookup.request.order_id, &lines)).collect()
}

/// An order from its rows (GET_ORDERS' columns), or 404 when there are none.
fn details(order_id: i64, rows: &[&Row]) -> Result<OrderDetails, Error> {
    let first = rows.first().ok_or(Error::OrderNotFound { order_id })?;
    Ok(OrderDetails {
        order_id: first.get(1),
        status: status_of(first.get(2))?,
        total_amount: first.get(3),
        created_at: first.get(4),
        user: OrderUser { id: first.get(5), email: first.get(6) },
        items: rows
            .iter()
            .map(|row| OrderItem {
                product_id: row.get(7),
                product_name: row.get(8),
                quantity: row.get(9),
                price: row.get(10),
            })
            .collect(),
    })
}

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
        .read_transaction([
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
