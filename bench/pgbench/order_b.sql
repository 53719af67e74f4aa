-- pgbench reference (b): one order, one statement, one transaction, one round trip. This is
-- the statement the service sent per order before commit batching (src/db/orders/place.rs,
-- CREATE_ORDER, until 2026-11-30): it locks the products, checks the user, the products and
-- the stock, and writes the order, its lines, payment, stock and inventory movements, or
-- nothing; since order events (2026-12-04) also the order's `order.created` event, built as
-- src/db/orders/place/write.rs builds it (so the audit after a run finds every order's event,
-- and the reference does the work the service does). Kept as the reference of "one order per transaction": the fastest form of it, with
-- every check the service makes. Variables: -D products=N spreads orders over products 1..N
-- (N=1: one hot product), -D user_id=1 -D quantity=1.
\set product_id random(1, :products)
WITH locked AS (
    SELECT id, price, stock, name
    FROM products
    WHERE id = ANY(ARRAY[:product_id]::int4[])
    ORDER BY id
    FOR UPDATE
),
line AS (
    SELECT r.position, r.product_id, r.quantity, locked.price, locked.stock, locked.name
    FROM unnest(ARRAY[:product_id]::int4[], ARRAY[:quantity]::int4[]) WITH ORDINALITY AS r (product_id, quantity, position)
    JOIN locked ON locked.id = r.product_id
    WHERE locked.stock >= r.quantity
),
new_order AS (
    INSERT INTO orders (user_id, status, total_amount)
    SELECT :user_id::int4, 'processing', sum(line.price * line.quantity)
    FROM line
    HAVING count(*) = cardinality(ARRAY[:product_id]::int4[])
       AND EXISTS (SELECT 1 FROM users WHERE id = :user_id::int4)
    RETURNING id, total_amount, created_at
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
),
order_event AS (
    INSERT INTO events (type, order_id, user_id, sequence, data)
    SELECT 'order.created', new_order.id, users.id, 1,
           order_json(new_order.id, 'processing', new_order.total_amount, new_order.created_at, users.id, users.email,
                      (SELECT string_agg(order_item_json(line.product_id, line.name, line.quantity, line.price),
                                         ',' ORDER BY line.position) FROM line))
    FROM new_order JOIN users ON users.id = :user_id::int4
)
SELECT new_order.id,
       new_order.total_amount,
       EXISTS (SELECT 1 FROM users WHERE id = :user_id::int4),
       ARRAY(SELECT id FROM locked ORDER BY id),
       ARRAY(SELECT stock FROM locked ORDER BY id)
FROM (VALUES (1)) AS always_one_row
LEFT JOIN new_order ON true;
