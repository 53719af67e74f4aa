-- pgbench reference for GET /api/orders/:id: one order read with one statement, the
-- statement the service sent per request before its reads were batched (src/db/orders/read.rs,
-- GET_ORDER, until 2026-11-30): the order, its user and its lines, one row per line. Kept as
-- the reference of "one read per query". (The ':' of the time format are kept out of
-- pgbench's variable substitution by splitting the string around them.)
-- Variables: -D orders=N reads ids in 1..N.
\set order_id random(1, :orders)
SELECT o.id, o.status, o.total_amount,
       to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24' || ':' || 'MI' || ':' || 'SS.MS"Z"'),
       u.id, u.email,
       i.product_id, p.name, i.quantity, i.price
FROM orders o
JOIN users u ON u.id = o.user_id
JOIN order_items i ON i.order_id = o.id
JOIN products p ON p.id = i.product_id
WHERE o.id = :order_id AND (NULL::int4 IS NULL OR o.user_id = NULL)
ORDER BY i.id;
