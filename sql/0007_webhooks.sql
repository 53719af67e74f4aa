-- Webhooks (CONTRACT part 5): endpoints the operators register, one delivery per (endpoint,
-- event) with its retries, and every attempt kept for GET /api/webhooks/:id/deliveries.

CREATE TABLE webhook_endpoints (
    id                    bigserial PRIMARY KEY,
    url                   text NOT NULL,
    description           text NOT NULL DEFAULT '',
    -- The event types sent; empty: every type.
    types                 text[] NOT NULL DEFAULT '{}',
    enabled               boolean NOT NULL DEFAULT true,
    -- Why it is disabled (410 from the endpoint, failing too long, an operator).
    disabled_reason       text,
    -- whsec_ and base64 of 32 random bytes; shown once, at creation and rotation.
    secret                text NOT NULL,
    -- The secret before the last rotation: it signs beside the new one until then.
    previous_secret       text,
    previous_secret_until timestamptz,
    -- The feed position up to which events are routed to deliveries: a new endpoint gets the
    -- events committed after its creation (replay for earlier ones).
    routed_tx             xid8 NOT NULL DEFAULT events_watermark(),
    routed_id             bigint NOT NULL DEFAULT 0,
    -- When the current run of failed attempts began; NULL after a delivered one.
    failing_since         timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    -- The event's order or product, and its sequence there: one stream's events are sent in
    -- sequence order, each after the one before was delivered or given up.
    order_id        bigint,
    product_id      integer,
    sequence        integer NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- In flight from one replica until then (its lease); past it, another may take it over.
    leased_until    timestamptz,
    -- The lease's holder: an attempt's outcome is recorded only by the holder of the lease.
    lease           bigint,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);
-- The indexes below are what the dispatcher's statements probe (src/db/webhooks.rs); each
-- leads with the column compared for equality, so that the planner picks it even before the
-- tables have statistics (a table growing by thousands of rows a second is often ahead of them).
-- None covers `leased_until`: leasing a delivery then changes no indexed column, and PostgreSQL
-- updates the row in place (HOT), without a new entry in every index.
-- Deliveries due, per endpoint, in the order they are claimed.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (endpoint_id, next_attempt_at, id)
    WHERE state = 'pending';
-- A stream's deliveries still to go: the first of them is the one that may go.
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (order_id, endpoint_id, sequence)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_product_idx ON webhook_deliveries (product_id, endpoint_id, sequence)
    WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    endpoint_id  bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status answered; NULL when none came (refused, timed out, connection failed).
    status       integer,
    latency_ms   double precision NOT NULL,
    -- delivered, retry (another attempt is scheduled), failed (given up), disabled (the
    -- endpoint was disabled by this attempt).
    outcome      text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'failed', 'disabled')),
    error        text
);
CREATE INDEX webhook_attempts_endpoint_idx ON webhook_attempts (endpoint_id, id);
