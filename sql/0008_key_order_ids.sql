-- A keyed order's id is drawn when its key is claimed, and the key stores it from the start,
-- before the order is written later in the same transaction: the key is then written once,
-- in the claim, instead of claimed and updated again while the batch holds its product locks
-- (the update was a fifth of a keyed batch's write statement). So the key's reference to its
-- order is checked at commit, when the order exists. A refused order's key gives the id up
-- (order_id NULL, its answer stored instead); a deferred order's key is deleted.

ALTER TABLE idempotency_keys ALTER CONSTRAINT idempotency_keys_order_id_fkey DEFERRABLE INITIALLY DEFERRED;
