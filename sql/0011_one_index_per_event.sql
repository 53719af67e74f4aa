-- Two more checks written while a batch holds its product locks, each cost more than it guards
-- (`make bench`'s A B B A pairs, 2026-12-05: with both gone, batched orders 1.09x, one hot
-- product 1.07x, keyed orders 1.06x):
--
-- 1. Every event was indexed twice by its position: by id (the primary key) and by (tx, id)
--    (the feed's order). Nothing looks an event up by its id alone but the webhook deliveries,
--    which now name the event by its position, so (tx, id) is the primary key, and each event
--    costs one index entry fewer.
ALTER TABLE webhook_deliveries ADD COLUMN event_tx xid8;
UPDATE webhook_deliveries AS d SET event_tx = e.tx FROM events AS e WHERE e.id = d.event_id;
ALTER TABLE webhook_deliveries ALTER COLUMN event_tx SET NOT NULL,
    DROP CONSTRAINT webhook_deliveries_event_id_fkey;
ALTER TABLE events DROP CONSTRAINT events_pkey;
DROP INDEX events_position_idx;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (tx, id);
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_event_fkey
    FOREIGN KEY (event_tx, event_id) REFERENCES events (tx, id) ON DELETE CASCADE;

-- 2. An idempotency key's foreign key to its order ran a query per key at every commit
--    (a trigger, like the events' foreign keys dropped by 0009). A key gets its order in the
--    statement that writes the order, and orders are never deleted; `order-api audit` reports
--    a key naming an order that does not exist.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_order_id_fkey;
