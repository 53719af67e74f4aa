//! The invariants of the shop's data, checked from the tables alone: what `order-api audit`
//! prints for an operator, and what the tests, `make chaos` and `make soak` check after their
//! traffic. Read-only, in one REPEATABLE READ transaction so the three reads see one moment
//! while orders keep coming.
//!
//! - Every product: stock >= 0; stock + quantity held by live (not cancelled) orders =
//!   opening balance + restocked quantity; stock = the sum of its ledger movements.
//! - Every order: at least one line, a payment for exactly its total, total = sum of its
//!   lines, payment refunded exactly when the order is cancelled.
//! - Every order line: exactly one 'order' movement taking its quantity, and one 'cancel'
//!   movement giving it back if (and only if) the order is cancelled.
//!
//! - Every order placed since events are written: its events match its history (one
//!   `order.created`, one event per status reached); every order's and product's events are
//!   numbered 1, 2, 3... without a gap.
//! - Every event and idempotency key names an order (or product) that exists.
//!
//! Orders placed before the ledger started (see `ledger_start!`) count in the order checks
//! but not in the stock and movement checks.

use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel};

/// One product's balance, with every figure the stock should agree with.
#[derive(Debug, Clone, Serialize)]
pub struct ProductBalance {
    pub product_id: i32,
    pub stock: i64,
    /// Quantity in order lines of orders that are not cancelled.
    pub held_by_orders: i64,
    /// The ledger's opening balance ('seed' movements).
    pub opening: i64,
    pub restocked: i64,
    /// Sum of all the product's ledger movements.
    pub ledger: i64,
}

impl ProductBalance {
    fn violations(&self) -> impl Iterator<Item = String> + '_ {
        let id = self.product_id;
        let expected = self.opening + self.restocked;
        [
            (self.stock < 0).then(|| format!("product {id}: stock {} is negative", self.stock)),
            (self.stock + self.held_by_orders != expected).then(|| {
                format!(
                    "product {id}: stock {} + held by orders {} != opening {} + restocked {}",
                    self.stock, self.held_by_orders, self.opening, self.restocked
                )
            }),
            (self.stock != self.ledger)
                .then(|| format!("product {id}: stock {} != ledger balance {}", self.stock, self.ledger)),
        ]
        .into_iter()
        .flatten()
    }
}

/// Orders or lines that break an invariant: how many, and the first few order ids.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Broken {
    pub count: i64,
    pub first_order_ids: Vec<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub products: Vec<ProductBalance>,
    pub orders: i64,
    pub cancelled_orders: i64,
    pub order_lines: i64,
    /// Orders without lines or payment, or whose payment, total and lines disagree.
    pub broken_orders: Broken,
    /// Order lines whose ledger movements do not match the line and the order's status.
    pub unbalanced_lines: Broken,
    /// Orders (placed since events are written) whose events do not match their history:
    /// not exactly one `order.created`, or not exactly one event for each status reached.
    pub orders_with_wrong_events: Broken,
    /// Orders and products whose events are not numbered 1, 2, 3... without a gap (the ids
    /// listed are order ids, and product ids negated).
    pub sequence_gaps: Broken,
    /// Events of an order or a product that does not exist (the ids listed are order ids, and
    /// product ids negated): what the events' foreign keys refused until migration 0009.
    pub events_of_nothing: Broken,
    /// Idempotency keys committed with no outcome (neither an order nor a stored answer): a
    /// claim that should have been given back. (The database itself refuses a key with both.)
    pub keys_without_outcome: i64,
    /// Idempotency keys naming an order that does not exist (the ids listed are those
    /// orders'): what the keys' foreign key refused until migration 0011.
    pub keys_of_nothing: Broken,
}

impl Audit {
    /// Every broken invariant, one sentence each; empty when the data is sound.
    pub fn violations(&self) -> Vec<String> {
        let mut found: Vec<String> = self.products.iter().flat_map(ProductBalance::violations).collect();
        if self.broken_orders.count > 0 {
            found.push(format!(
                "{} orders lack lines or payment or have a wrong total (first: {:?})",
                self.broken_orders.count, self.broken_orders.first_order_ids
            ));
        }
        if self.orders_with_wrong_events.count > 0 {
            found.push(format!(
                "{} orders have missing, doubled or wrong events (first: {:?})",
                self.orders_with_wrong_events.count, self.orders_with_wrong_events.first_order_ids
            ));
        }
        if self.sequence_gaps.count > 0 {
            found.push(format!(
                "{} orders or products have events not numbered 1, 2, 3... (first: {:?})",
                self.sequence_gaps.count, self.sequence_gaps.first_order_ids
            ));
        }
        if self.events_of_nothing.count > 0 {
            found.push(format!(
                "{} events name an order or product that does not exist (first: {:?})",
                self.events_of_nothing.count, self.events_of_nothing.first_order_ids
            ));
        }
        if self.keys_without_outcome > 0 {
            found.push(format!("{} idempotency keys hold no outcome", self.keys_without_outcome));
        }
        if self.keys_of_nothing.count > 0 {
            found.push(format!(
                "{} idempotency keys name an order that does not exist (first: {:?})",
                self.keys_of_nothing.count, self.keys_of_nothing.first_order_ids
            ));
        }
        if self.unbalanced_lines.count > 0 {
            found.push(format!(
                "{} order lines do not match their ledger movements (orders {:?})",
                self.unbalanced_lines.count, self.unbalanced_lines.first_order_ids
            ));
        }
        found
    }

    pub fn product(&self, product_id: i32) -> Option<&ProductBalance> {
        self.products.iter().find(|p| p.product_id == product_id)
    }
}

/// When the ledger started: its first opening balance. Orders placed before it (a database
/// that had orders when migration 0003 added the ledger) took stock that the opening balances
/// already leave out, and have no movements; the checks of stock and movements skip them.
macro_rules! ledger_start {
    () => {
        "(SELECT coalesce(min(created_at), '-infinity') FROM inventory_movements WHERE reason = 'seed')"
    };
}

const PRODUCT_BALANCES: &str = concat!(
    "
    WITH held AS (
        SELECT i.product_id, sum(i.quantity)::int8 AS quantity
        FROM order_items i JOIN orders o ON o.id = i.order_id
        WHERE o.status <> 'cancelled' AND o.created_at >= ",
    ledger_start!(),
    "
        GROUP BY i.product_id
    ), ledger AS (
        SELECT product_id,
               sum(delta)::int8 AS balance,
               coalesce(sum(delta) FILTER (WHERE reason = 'seed'), 0)::int8 AS opening,
               coalesce(sum(delta) FILTER (WHERE reason = 'restock'), 0)::int8 AS restocked
        FROM inventory_movements
        GROUP BY product_id
    )
    SELECT p.id, p.stock::int8, coalesce(held.quantity, 0), coalesce(ledger.opening, 0),
           coalesce(ledger.restocked, 0), coalesce(ledger.balance, 0)
    FROM products p
    LEFT JOIN held ON held.product_id = p.id
    LEFT JOIN ledger ON ledger.product_id = p.id
    ORDER BY p.id"
);

const ORDER_COUNTS: &str = "
    SELECT (SELECT count(*) FROM orders),
           (SELECT count(*) FROM orders WHERE status = 'cancelled'),
           (SELECT count(*) FROM order_items)";

const BROKEN_ORDERS: &str = "
    WITH lines AS (
        SELECT order_id, sum(price * quantity) AS total FROM order_items GROUP BY order_id
    )
    SELECT count(*), coalesce((array_agg(o.id ORDER BY o.id))[1:10], '{}')
    FROM orders o
    LEFT JOIN lines l ON l.order_id = o.id
    LEFT JOIN payments p ON p.order_id = o.id
    WHERE l.order_id IS NULL OR p.id IS NULL
       OR p.amount <> o.total_amount OR o.total_amount <> l.total
       OR (o.status = 'cancelled') <> (p.status = 'refunded')";

const UNBALANCED_LINES: &str = concat!(
    "
    WITH moves AS (
        SELECT order_id, product_id,
               count(*) FILTER (WHERE reason = 'order') AS taken_times,
               coalesce(sum(-delta) FILTER (WHERE reason = 'order'), 0) AS taken,
               count(*) FILTER (WHERE reason = 'cancel') AS restored_times,
               coalesce(sum(delta) FILTER (WHERE reason = 'cancel'), 0) AS restored
        FROM inventory_movements
        WHERE order_id IS NOT NULL
        GROUP BY order_id, product_id
    )
    SELECT count(*), coalesce((array_agg(i.order_id ORDER BY i.order_id))[1:10], '{}')
    FROM order_items i
    JOIN orders o ON o.id = i.order_id
    LEFT JOIN moves m ON m.order_id = i.order_id AND m.product_id = i.product_id
    WHERE o.created_at >= ",
    ledger_start!(),
    "
      AND (m.order_id IS NULL
           OR m.taken_times <> 1 OR m.taken <> i.quantity
           OR m.restored_times <> (o.status = 'cancelled')::int
           OR (o.status = 'cancelled' AND m.restored <> i.quantity))"
);

/// Orders placed since migration 0006 added the events, whose events disagree with them: one
/// `order.created`; one `order.cancelled` exactly when cancelled; one `order.shipped` when
/// shipped or delivered; one `order.delivered` when delivered. (Orders placed before have no
/// `order.created`, and may have moved before events were written.)
const ORDERS_WITH_WRONG_EVENTS: &str = "
    WITH counted AS (
        SELECT o.id, o.status,
               count(e.id) FILTER (WHERE e.type = 'order.created') AS created,
               count(e.id) FILTER (WHERE e.type = 'order.cancelled') AS cancelled,
               count(e.id) FILTER (WHERE e.type = 'order.shipped') AS shipped,
               count(e.id) FILTER (WHERE e.type = 'order.delivered') AS delivered
        FROM orders AS o
        LEFT JOIN events AS e ON e.order_id = o.id
        WHERE o.created_at >= (SELECT applied_at FROM schema_migrations WHERE name = '0006_order_events.sql')
        GROUP BY o.id, o.status
    )
    SELECT count(*), coalesce((array_agg(id ORDER BY id))[1:10], '{}')
    FROM counted
    WHERE created <> 1
       OR cancelled <> (status = 'cancelled')::int
       OR shipped <> (status IN ('shipped', 'delivered'))::int
       OR delivered <> (status = 'delivered')::int";

/// Streams (orders, and products as negated ids) whose events are not numbered 1..n.
const SEQUENCE_GAPS: &str = "
    WITH streams AS (
        SELECT coalesce(order_id, -product_id) AS stream, count(*) AS events, max(sequence) AS last,
               count(DISTINCT sequence) AS numbers
        FROM events
        GROUP BY coalesce(order_id, -product_id)
    )
    SELECT count(*), coalesce((array_agg(stream ORDER BY stream))[1:10], '{}')
    FROM streams
    WHERE events <> last OR numbers <> events";

/// Events whose order or product does not exist.
const EVENTS_OF_NOTHING: &str = "
    SELECT count(*), coalesce((array_agg(coalesce(e.order_id, -e.product_id) ORDER BY e.id))[1:10], '{}')
    FROM events AS e
    WHERE (e.order_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM orders AS o WHERE o.id = e.order_id))
       OR (e.product_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM products AS p WHERE p.id = e.product_id))";

const KEYS_WITHOUT_OUTCOME: &str =
    "SELECT count(*) FROM idempotency_keys WHERE order_id IS NULL AND response_status IS NULL";

/// Idempotency keys whose order does not exist (no foreign key refuses one since sql/0011).
const KEYS_OF_NOTHING: &str = "
    SELECT count(*), coalesce((array_agg(k.order_id ORDER BY k.order_id))[1:10], '{}')
    FROM idempotency_keys AS k
    WHERE k.order_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM orders AS o WHERE o.id = k.order_id)";

/// Reads the whole database once and returns what it found.
pub async fn audit(client: &mut Client) -> Result<Audit, tokio_postgres::Error> {
    let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let products = tx
        .query(PRODUCT_BALANCES, &[])
        .await?
        .iter()
        .map(|row| ProductBalance {
            product_id: row.get(0),
            stock: row.get(1),
            held_by_orders: row.get(2),
            opening: row.get(3),
            restocked: row.get(4),
            ledger: row.get(5),
        })
        .collect();
    let counts = tx.query_one(ORDER_COUNTS, &[]).await?;
    let broken = |row: tokio_postgres::Row| Broken { count: row.get(0), first_order_ids: row.get(1) };
    let broken_orders = broken(tx.query_one(BROKEN_ORDERS, &[]).await?);
    let unbalanced_lines = broken(tx.query_one(UNBALANCED_LINES, &[]).await?);
    let orders_with_wrong_events = broken(tx.query_one(ORDERS_WITH_WRONG_EVENTS, &[]).await?);
    let sequence_gaps = broken(tx.query_one(SEQUENCE_GAPS, &[]).await?);
    let events_of_nothing = broken(tx.query_one(EVENTS_OF_NOTHING, &[]).await?);
    let keys_without_outcome = tx.query_one(KEYS_WITHOUT_OUTCOME, &[]).await?.get(0);
    let keys_of_nothing = broken(tx.query_one(KEYS_OF_NOTHING, &[]).await?);
    tx.commit().await?;
    Ok(Audit {
        products,
        orders: counts.get(0),
        cancelled_orders: counts.get(1),
        order_lines: counts.get(2),
        broken_orders,
        unbalanced_lines,
        orders_with_wrong_events,
        sequence_gaps,
        events_of_nothing,
        keys_without_outcome,
        keys_of_nothing,
    })
}
