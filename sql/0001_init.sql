-- The schema of the system this service replaces: same tables, same columns, so that outside
-- tools reading them keep working. Money is exact (numeric(12,2)); every invariant the service
-- relies on is also a constraint, so a bug in the code cannot write a row that breaks it.

CREATE TABLE users (
    id         serial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    id         serial PRIMARY KEY,
    name       text NOT NULL,
    price      numeric(12, 2) NOT NULL CHECK (price >= 0),
    -- Stock can never go negative, whatever the code does: the last line of defence against overselling.
    stock      integer NOT NULL CHECK (stock >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id           bigserial PRIMARY KEY,
    user_id      integer NOT NULL REFERENCES users (id),
    status       text NOT NULL DEFAULT 'processing'
                 CHECK (status IN ('processing', 'shipped', 'delivered', 'cancelled')),
    total_amount numeric(12, 2) NOT NULL CHECK (total_amount >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- Listing a user's orders, newest first.
CREATE INDEX orders_user_id_idx ON orders (user_id, id);

CREATE TABLE order_items (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL REFERENCES orders (id),
    product_id integer NOT NULL REFERENCES products (id),
    quantity   integer NOT NULL CHECK (quantity > 0),
    -- The unit price at order time: later price changes must not rewrite history.
    price      numeric(12, 2) NOT NULL CHECK (price >= 0),
    -- One line per product: cancellation restores stock with one UPDATE ... FROM order_items,
    -- which would apply only one of two lines for the same product.
    UNIQUE (order_id, product_id)
);
-- The foreign key to products needs its own index (deleting or locking a product scans it).
CREATE INDEX order_items_product_id_idx ON order_items (product_id);

CREATE TABLE payments (
    id         bigserial PRIMARY KEY,
    order_id   bigint NOT NULL UNIQUE REFERENCES orders (id),
    amount     numeric(12, 2) NOT NULL CHECK (amount >= 0),
    status     text NOT NULL CHECK (status IN ('completed', 'refunded')),
    created_at timestamptz NOT NULL DEFAULT now()
);
