-- A key whose request created an order keeps the order itself as its outcome: a replay renders
-- the 201 again from the order's id and total, exactly as the first answer was rendered, and
-- the key gets its outcome in the same statement that writes the order (its id is not known
-- before). A key whose request was refused keeps the answer as it was given (status, body).
-- Keys stored before this migration keep their 201 bodies, replayed as they are.

ALTER TABLE idempotency_keys
    ADD COLUMN order_id bigint REFERENCES orders (id),
    -- One outcome or the other (both NULL only inside the transaction that claimed the key).
    ADD CONSTRAINT idempotency_keys_one_outcome CHECK (order_id IS NULL OR response_status IS NULL);
-- No index on order_id: orders are never deleted by the service, and every keyed order would
-- pay for it.
