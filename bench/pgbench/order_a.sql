-- pgbench reference (a): the order transaction of POST /api/orders (one line, quantity 1),
-- written the plain way, one statement per network round trip: lock the product row, take the
-- stock, insert the order, its line, its payment, its inventory movement and its
-- `order.created` event (its data as the service builds it). Nine round trips with BEGIN and
-- COMMIT. The same rows as the API writes, without its checks on the user
-- and on the whole order (reference (b), order_b.sql, makes every check in one statement).
-- Variables: -D products=N spreads orders over products 1..N (N=1: one hot product),
-- -D user_id=1 -D quantity=1.
\set product_id random(1, :products)
BEGIN;
SELECT price, name AS product_name FROM products WHERE id = :product_id FOR UPDATE \gset
UPDATE products SET stock = stock - :quantity WHERE id = :product_id AND stock >= :quantity;
INSERT INTO orders (user_id, status, total_amount) VALUES (:user_id, 'processing', :price::numeric * :quantity)
    RETURNING id AS order_id, created_at \gset
INSERT INTO order_items (order_id, product_id, quantity, price) VALUES (:order_id, :product_id, :quantity, :price);
INSERT INTO payments (order_id, amount, status) VALUES (:order_id, :price::numeric * :quantity, 'completed');
INSERT INTO inventory_movements (product_id, delta, reason, order_id) VALUES (:product_id, -:quantity::int4, 'order', :order_id);
INSERT INTO events (type, order_id, user_id, sequence, data)
    SELECT 'order.created', :order_id, id, 1,
           order_json(:order_id, 'processing', :price::numeric * :quantity, :created_at::timestamptz, id, email,
                      order_item_json(:product_id, :product_name::text, :quantity::int4, :price::numeric))
    FROM users WHERE id = :user_id;
COMMIT;
