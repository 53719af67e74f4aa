-- An order's `order.created` row is written while its batch holds the product locks, so every
-- check on it lengthens the time other batches wait for those locks. Two checks cost more than
-- they guard (pgbench, 64-order batches: the foreign-key triggers 28 us an event):
-- - the foreign keys: each event is written in the statement that writes its order (or
--   changes its product), and neither orders nor products are ever deleted;
-- - the NULL entries of the per-product sequence index: every order event has no product,
--   and a unique index never compares NULLs, so it indexed them for nothing.
ALTER TABLE events DROP CONSTRAINT events_order_id_fkey, DROP CONSTRAINT events_product_id_fkey;
ALTER TABLE events DROP CONSTRAINT events_product_id_sequence_key;
CREATE UNIQUE INDEX events_product_id_sequence_key ON events (product_id, sequence) WHERE product_id IS NOT NULL;

-- An order's `order.created` data, as order_json(id) makes it, from its parts (`items` its
-- lines' order_created_item, comma-separated, in line order): spelled out by concatenation,
-- the keys and numbers as row_to_json writes them and the strings escaped by to_json, because
-- row_to_json per order and per line cost 31 us an order (pgbench, 64-order batches).
-- tests/api/events.rs checks that the two agree byte for byte. STABLE, so PostgreSQL inlines
-- them.
CREATE FUNCTION order_created_item(product_id integer, product_name text, quantity integer, price numeric)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT '{"productId":' || product_id || ',"productName":' || to_json(product_name)::text
           || ',"quantity":' || quantity || ',"price":' || price || '}'
$$;

CREATE FUNCTION order_created_json(order_id bigint, total_amount numeric, created_at timestamptz,
                                   user_id integer, email text, items text)
RETURNS json LANGUAGE sql STABLE AS $$
    SELECT ('{"orderId":' || order_id || ',"status":"processing","totalAmount":' || total_amount
            || ',"createdAt":"' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
            || '","user":{"id":' || user_id || ',"email":' || to_json(email)::text
            || '},"items":[' || items || ']}')::json
$$;
