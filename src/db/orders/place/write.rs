//! Step 3 of a batch: one statement writes every placed order, with its lines, payment,
//! inventory movements and the stock it takes, and gives each keyed order's key its order.
//! Part of it goes ahead, with step 2: the `order.created` events of the orders without a key
//! (`WRITE_EARLY_EVENTS`); the keyed orders' go with their keys' claim (keys.rs).

use postgres_types::{ToSql, Type};

use tokio_postgres::Row;

use super::OrderRequest;
use crate::{db::Sql, domain::NewOrder, error::Error};

/// Writes the placed orders of a batch. $1 each order's user, $2 its id if drawn already
/// (with its idempotency key's claim, which holds it since, or with its early event) and $6
/// whether its `order.created` is written already (`WRITE_EARLY_EVENTS`), in arrival order;
/// then its lines, order after order: $3 the (1-based) order each line belongs to, $4
/// product, $5 quantity. The other ids are drawn in arrival order; prices
/// are the locked products' (this statement's snapshot is taken after the locks, so it reads
/// them as locked); the stock taken is what the batch's lines add up to per product, which the
/// service checked against the stock it read under those locks, so `CHECK (stock >= 0)` holds.
///
/// The events go with it (`sql/0006_order_events.sql`): each order's `order.created` unless
/// written early, its data the order as `GET /api/orders/:id` shows it (built here from what
/// is written: the rows are not visible to this statement), then `product.sold_out` for each product whose stock this
/// batch took to zero, numbered after the product's last event (read after the lock, so no
/// other transaction can number one meanwhile). Returns each order's id and total, in arrival
/// order, and on every row the number of products sold out.
pub(super) const WRITE_ORDERS: Sql = Sql {
    params: &[
        Type::INT4_ARRAY,
        Type::INT8_ARRAY,
        Type::INT4_ARRAY,
        Type::INT4_ARRAY,
        Type::INT4_ARRAY,
        Type::BOOL_ARRAY,
    ],
    text: "
    WITH placed AS (
        SELECT o.n, o.user_id, coalesce(o.id, nextval('orders_id_seq')) AS id, o.early
        FROM (SELECT * FROM unnest($1::int4[], $2::int8[], $6::bool[]) WITH ORDINALITY AS o (user_id, id, early, n)
              ORDER BY n) AS o
    ),
    line AS (
        SELECT l.position, l.n, l.product_id, l.quantity, products.price, products.name
        FROM unnest($3::int4[], $4::int4[], $5::int4[]) WITH ORDINALITY AS l (n, product_id, quantity, position)
        JOIN products ON products.id = l.product_id
    ),
    total AS (
        SELECT placed.n, placed.id, placed.user_id, sum(line.price * line.quantity) AS amount
        FROM placed JOIN line USING (n)
        GROUP BY placed.n, placed.id, placed.user_id
    ),
    new_orders AS (
        INSERT INTO orders (id, user_id, status, total_amount)
        SELECT id, user_id, 'processing', amount FROM total ORDER BY n
        RETURNING id, total_amount, created_at
    ),
    new_lines AS (
        INSERT INTO order_items (order_id, product_id, quantity, price)
        SELECT placed.id, line.product_id, line.quantity, line.price
        FROM line JOIN placed USING (n)
        ORDER BY line.position
    ),
    payment AS (
        INSERT INTO payments (order_id, amount, status)
        SELECT id, amount, 'completed' FROM total
    ),
    taken AS (
        UPDATE products
        SET stock = products.stock - t.quantity
        FROM (SELECT product_id, sum(quantity)::int4 AS quantity FROM line GROUP BY product_id) AS t
        WHERE products.id = t.product_id
        RETURNING products.id, products.name, products.price, products.stock
    ),
    ledger AS (
        INSERT INTO inventory_movements (product_id, delta, reason, order_id)
        SELECT line.product_id, -line.quantity, 'order', placed.id
        FROM line JOIN placed USING (n)
    ),
    order_events AS (
        INSERT INTO events (type, order_id, user_id, sequence, data)
        SELECT 'order.created', o.id, users.id, 1,
               order_created_json(o.id, o.total_amount, o.created_at, users.id, users.email, items.json)
        FROM new_orders AS o
        JOIN placed USING (id)
        JOIN users ON users.id = placed.user_id
        JOIN (SELECT line.n,
                     string_agg(order_created_item(line.product_id, line.name, line.quantity, line.price), ','
                                ORDER BY line.position) AS json
              FROM line GROUP BY line.n) AS items ON items.n = placed.n
        WHERE NOT placed.early
        ORDER BY placed.n
        RETURNING id
    ),
    sold_out_events AS (
        INSERT INTO events (type, product_id, sequence, data)
        SELECT 'product.sold_out', taken.id,
               (SELECT coalesce(max(e.sequence), 0) + 1 FROM events AS e WHERE e.product_id = taken.id),
               product_json(taken.id, taken.name, taken.price, taken.stock)
        FROM taken
        -- Reading the orders' events first makes them be written first (unread data-modifying
        -- CTEs run last to first), so a product sells out after the orders that emptied it.
        CROSS JOIN (SELECT count(*) FROM order_events) AS orders_first
        WHERE taken.stock = 0
        ORDER BY taken.id
        RETURNING 1
    )
    SELECT new_orders.id, new_orders.total_amount, (SELECT count(*) FROM sold_out_events)
    FROM new_orders JOIN total USING (id)
    ORDER BY total.n",
};

/// The part of the write that needs no product lock, sent with step 2 before the lock
/// statement by the batches that do not wait for their locks (round.rs says why): for the
/// orders without a key ($1 each one's user, in arrival order; its lines, order after order:
/// $2 the 1-based order, $3 product, $4 quantity), draws each one's id and writes its
/// `order.created`. (A keyed order's is written by its key's claim, CLAIM_KEYS, even when
/// waiting: the claim gives the transaction its id anyway.) Written here, the events are not
/// written while the batch holds its product locks, which other batches on the same products
/// wait for (in WRITE_ORDERS they lengthened that time by a fifth). Their cost is not where
/// they are written but that they are: about a fifth of batched throughput either way
/// (docs/performance.md).
/// The bet is that the order is placed; step 3 drops the events of those that are not
/// (DROP_EARLY_EVENTS), or the rollback does. Prices and names are read without a lock:
/// neither ever changes. `now()` is the transaction's start, the order's `created_at`. An
/// order naming a user or product that does not exist (refused later) may get no event or one
/// missing a line; it is dropped all the same. Returns the ids, in arrival order.
pub(super) const WRITE_EARLY_EVENTS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY],
    text: concat!(
        "
    WITH placed AS (
        SELECT o.n, o.user_id, nextval('orders_id_seq') AS id
        FROM (SELECT * FROM unnest($1::int4[]) WITH ORDINALITY AS o (user_id, n) ORDER BY n) AS o
    ),
    ",
        created_items!("$2", "$3", "$4"),
        ",
    written AS (
        INSERT INTO events (type, order_id, user_id, sequence, data)
        SELECT 'order.created', placed.id, users.id, 1,
               order_created_json(placed.id, items.total, now(), users.id, users.email, items.json)
        FROM placed JOIN items USING (n) JOIN users ON users.id = placed.user_id
        ORDER BY placed.n
    )
    SELECT id FROM placed ORDER BY n"
    ),
};

/// Drops the early events of orders that were not placed. $1 their ids.
pub(super) const DROP_EARLY_EVENTS: Sql = Sql {
    params: &[Type::INT8_ARRAY],
    text: "DELETE FROM events WHERE order_id = ANY($1::int8[]) AND type = 'order.created'",
};

/// Orders as the statements take them: each order's user, in order; its lines, order after
/// order, as the (1-based) order each belongs to, product and quantity.
#[derive(Default)]
pub(super) struct OrderArrays {
    pub users: Vec<i32>,
    pub line_order: Vec<i32>,
    pub products: Vec<i32>,
    pub quantities: Vec<i32>,
}

impl OrderArrays {
    pub(super) fn push(&mut self, order: &NewOrder) {
        self.users.push(order.user_id);
        let n = self.users.len() as i32;
        for line in &order.lines {
            self.line_order.push(n);
            self.products.push(line.product_id);
            self.quantities.push(line.quantity);
        }
    }
}

/// WRITE_EARLY_EVENTS' parameters: the orders of a batch that have no key.
pub(super) struct EarlyEvents {
    positions: Vec<usize>,
    orders: OrderArrays,
}

impl EarlyEvents {
    pub(super) fn of(batch: &[&OrderRequest]) -> EarlyEvents {
        let mut early = EarlyEvents { positions: Vec::new(), orders: OrderArrays::default() };
        for (position, request) in batch.iter().enumerate().filter(|(_, request)| request.key.is_none()) {
            early.positions.push(position);
            early.orders.push(&request.order);
        }
        early
    }

    pub(super) fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        let orders = &self.orders;
        [&orders.users, &orders.line_order, &orders.products, &orders.quantities]
    }

    /// The order id of each position in the batch whose event was written, from
    /// WRITE_EARLY_EVENTS' rows.
    pub(super) fn ids(&self, rows: &[Row], batch_len: usize) -> Result<Vec<Option<i64>>, Error> {
        if rows.len() != self.positions.len() {
            return Err(Error::Internal("the early events answered the wrong number of orders".into()));
        }
        let mut ids = vec![None; batch_len];
        for (&position, row) in self.positions.iter().zip(rows) {
            ids[position] = Some(row.get(0));
        }
        Ok(ids)
    }
}

/// WRITE_ORDERS' parameters for the placed orders.
pub(super) struct Written {
    orders: OrderArrays,
    ids: Vec<Option<i64>>,
    early: Vec<bool>,
}

impl Written {
    /// The placed orders, each with its id if drawn already: an order's id is drawn ahead
    /// only with its `order.created` (CLAIM_KEYS, WRITE_EARLY_EVENTS).
    pub(super) fn of<'a>(placed: impl Iterator<Item = (&'a NewOrder, Option<i64>)>) -> Written {
        let mut written = Written { orders: OrderArrays::default(), ids: Vec::new(), early: Vec::new() };
        for (order, id) in placed {
            written.orders.push(order);
            written.ids.push(id);
            written.early.push(id.is_some());
        }
        written
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        let orders = &self.orders;
        [&orders.users, &self.ids, &orders.line_order, &orders.products, &orders.quantities, &self.early]
    }
}
