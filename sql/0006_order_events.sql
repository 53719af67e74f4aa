-- Order events (CONTRACT part 5): the outbox. Every change other systems hear of writes its
-- event here, in the change's own transaction, so an event exists if and only if its change
-- committed. The feed (GET /api/events) and the webhook deliveries read this table.

CREATE TABLE events (
    -- The order in which one transaction wrote its events; with `tx`, the feed's position.
    id          bigserial PRIMARY KEY,
    -- The public id (`evt_` and 32 hex digits): random, so never reused, not even after a
    -- restore to an earlier point in time, whose sequences would hand out old numbers again.
    event_id    uuid NOT NULL DEFAULT gen_random_uuid(),
    -- The writing transaction. The feed hands out an event only once every transaction with a
    -- smaller id has ended (`pg_snapshot_xmin`), so no event can commit before a position a
    -- reader was given. Ordered by (tx, id).
    tx          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type        text NOT NULL CHECK (type IN ('order.created', 'order.cancelled', 'order.shipped',
                                              'order.delivered', 'product.restocked', 'product.sold_out')),
    order_id    bigint REFERENCES orders (id),
    user_id     integer,
    product_id  integer REFERENCES products (id),
    -- Counts the events of one order (or one product) from 1, without gaps: each is written
    -- under the order's (product's) row lock, as max + 1.
    sequence    integer NOT NULL CHECK (sequence > 0),
    occurred_at timestamptz NOT NULL DEFAULT now(),
    -- The order as GET /api/orders/:id shows it at that moment (the product as
    -- GET /api/products/:id): `json`, not `jsonb`, to keep the API's key order.
    data        json NOT NULL,
    CHECK ((order_id IS NOT NULL) = (type LIKE 'order.%')),
    CHECK ((product_id IS NOT NULL) = (type LIKE 'product.%')),
    CHECK ((order_id IS NULL) = (user_id IS NULL)),
    UNIQUE (order_id, sequence),
    UNIQUE (product_id, sequence)
);
-- The feed reads in position order.
CREATE INDEX events_position_idx ON events (tx, id);

-- How far the feed may hand out events: the oldest transaction still running in this database
-- (from the snapshot's running transactions, less those pg_stat_activity shows in another
-- database of the server; one not shown there counts), or the next transaction to start when
-- none is. Every event of a transaction below it has committed or never will, and every event
-- still to commit will have a larger transaction id: so positions handed out below it are
-- final. (pg_snapshot_xmin alone would let a long transaction in another database of the
-- server hold the feed back.)
CREATE FUNCTION events_watermark() RETURNS xid8 LANGUAGE sql STABLE AS $$
    WITH s AS (SELECT pg_current_snapshot() AS snapshot)
    SELECT least(pg_snapshot_xmax(s.snapshot),
                 (SELECT min(running) FROM pg_snapshot_xip(s.snapshot) AS running
                  WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                                    WHERE a.backend_xid = xid(running) AND a.datname <> current_database())))
    FROM s
$$;

-- How far the retention purge has deleted (a position): a cursor before it has missed events.
CREATE TABLE events_purged (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    tx       xid8 NOT NULL DEFAULT '0',
    id       bigint NOT NULL DEFAULT 0
);
INSERT INTO events_purged DEFAULT VALUES;

-- An order line as GET /api/orders/:id shows it, compact, keys in the API's order.
CREATE FUNCTION order_item_json(product_id integer, product_name text, quantity integer, price numeric)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT row_to_json(i)::text
    FROM (SELECT product_id AS "productId", product_name AS "productName", quantity AS "quantity",
                 price AS "price") AS i
$$;

-- An order as GET /api/orders/:id shows it, from its parts; `items` is its lines'
-- order_item_json, comma-separated, in line order.
CREATE FUNCTION order_json(order_id bigint, status text, total_amount numeric, created_at timestamptz,
                           user_id integer, email text, items text)
RETURNS json LANGUAGE sql STABLE AS $$
    SELECT row_to_json(o)
    FROM (SELECT order_id AS "orderId", status AS "status", total_amount AS "totalAmount",
                 to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS "createdAt",
                 (SELECT row_to_json(u) FROM (SELECT user_id AS "id", email AS "email") AS u) AS "user",
                 ('[' || items || ']')::json AS "items") AS o
$$;

-- The order `id` as it stands now.
CREATE FUNCTION order_json(id bigint) RETURNS json LANGUAGE sql STABLE AS $$
    SELECT order_json(o.id, o.status, o.total_amount, o.created_at, u.id, u.email,
                      (SELECT string_agg(order_item_json(i.product_id, p.name, i.quantity, i.price), ',' ORDER BY i.id)
                       FROM order_items i JOIN products p ON p.id = i.product_id
                       WHERE i.order_id = o.id))
    FROM orders o JOIN users u ON u.id = o.user_id
    WHERE o.id = $1
$$;

-- A product as GET /api/products/:id shows it.
CREATE FUNCTION product_json(id integer, name text, price numeric, stock integer)
RETURNS json LANGUAGE sql IMMUTABLE AS $$
    SELECT row_to_json(p) FROM (SELECT id AS "id", name AS "name", price AS "price", stock AS "stock") AS p
$$;
