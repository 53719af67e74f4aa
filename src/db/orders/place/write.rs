//! Step 3 of a batch: one statement writes every placed order, with its lines, payment,
//! inventory movements, the stock it takes and its `order.created` event, and gives each keyed
//! order's key its order.

use postgres_types::{ToSql, Type};

use crate::{db::Sql, domain::NewOrder};

/// Writes the placed orders of a batch. $1 each order's user and $2 its id if drawn already
/// (with its idempotency key's claim, which holds it since), in arrival order; then its lines,
/// order after order: $3 the (1-based) order each line belongs to, $4 product, $5 quantity.
/// The other ids are drawn in arrival order; prices are the locked products' (this
/// statement's snapshot is taken after the locks, so it reads them as locked); the stock taken
/// is what the batch's lines add up to per product, which the service checked against the
/// stock it read under those locks, so `CHECK (stock >= 0)` holds.
///
/// The events go with it (`sql/0006_order_events.sql`): each order's `order.created`, whose
/// data the feed builds from the order's rows when it reads it (`sql/0010`), then
/// `product.sold_out` for each product whose stock this batch took to zero, numbered after the
/// product's last event (read after the lock, so no other transaction can number one
/// meanwhile). Returns each order's id and total, in arrival order, and on every row the
/// number of products sold out.
pub(super) const WRITE_ORDERS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::INT8_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY],
    text: "
    WITH placed AS (
        SELECT o.n, o.user_id, coalesce(o.id, nextval('orders_id_seq')) AS id
        FROM (SELECT * FROM unnest($1::int4[], $2::int8[]) WITH ORDINALITY AS o (user_id, id, n)
              ORDER BY n) AS o
    ),
    line AS (
        SELECT l.position, l.n, l.product_id, l.quantity, products.price
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
        INSERT INTO events (type, order_id, user_id, sequence)
        SELECT 'order.created', new_orders.id, placed.user_id, 1
        FROM new_orders JOIN placed USING (id)
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

/// Orders as the statements take them: each order's user, in order; its lines, order after
/// order, as the (1-based) order each belongs to, product and quantity.
#[derive(Default)]
struct OrderArrays {
    users: Vec<i32>,
    line_order: Vec<i32>,
    products: Vec<i32>,
    quantities: Vec<i32>,
}

impl OrderArrays {
    fn push(&mut self, order: &NewOrder) {
        self.users.push(order.user_id);
        let n = self.users.len() as i32;
        for line in &order.lines {
            self.line_order.push(n);
            self.products.push(line.product_id);
            self.quantities.push(line.quantity);
        }
    }
}

/// WRITE_ORDERS' parameters for the placed orders.
pub(super) struct Written {
    orders: OrderArrays,
    ids: Vec<Option<i64>>,
}

impl Written {
    /// The placed orders, each with its id if drawn already (with its key's claim, CLAIM_KEYS).
    pub(super) fn of<'a>(placed: impl Iterator<Item = (&'a NewOrder, Option<i64>)>) -> Written {
        let mut written = Written { orders: OrderArrays::default(), ids: Vec::new() };
        for (order, id) in placed {
            written.orders.push(order);
            written.ids.push(id);
        }
        written
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 5] {
        let orders = &self.orders;
        [&orders.users, &self.ids, &orders.line_order, &orders.products, &orders.quantities]
    }
}
