-- Idempotency keys of POST /api/orders (the Idempotency-Key header). A key is claimed, and its
-- response stored, in the transaction that creates the order, so other transactions see a key
-- either absent or with its final response, never half there. A duplicate request that
-- arrives meanwhile waits on the key's unique index until the first transaction ends.
-- Keys are scoped per user.

CREATE TABLE idempotency_keys (
    -- No foreign key: a request naming an unknown user has its rejection stored too.
    user_id         integer NOT NULL,
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- md5 of the canonical request (user and lines), to tell a retry from a reuse of the key.
    request_hash    text NOT NULL,
    -- NULL only inside the transaction that claimed the key; set before it commits.
    response_status smallint,
    response_body   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
-- Purging expired keys scans by age.
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
