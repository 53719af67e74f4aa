-- The inventory ledger: every change of a product's stock is a row here, written in the same
-- transaction as the change. For every product, stock = sum(delta) of its movements, so
-- "restored exactly once" can be audited from the data alone.

CREATE TABLE inventory_movements (
    id         bigserial PRIMARY KEY,
    product_id integer NOT NULL REFERENCES products (id),
    -- Signed: negative when stock leaves (an order), positive when it comes back or arrives.
    delta      integer NOT NULL CHECK (delta <> 0),
    -- seed: the opening balance (stock when the ledger started, or the seeded stock);
    -- order: taken by an order; cancel: given back by a cancellation; restock: added by an operator.
    reason     text NOT NULL CHECK (reason IN ('seed', 'order', 'cancel', 'restock')),
    order_id   bigint REFERENCES orders (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((reason IN ('order', 'cancel')) = (order_id IS NOT NULL)),
    -- One 'order' and at most one 'cancel' movement per order line: a cancellation that
    -- tried to restore twice would fail here.
    UNIQUE (order_id, product_id, reason)
);
-- No index on product_id alone: every write would pay for it, and the audit (sum by product)
-- reads the whole table anyway.

-- Opening balances for the products that exist when the ledger starts.
INSERT INTO inventory_movements (product_id, delta, reason)
SELECT id, stock, 'seed' FROM products WHERE stock > 0;
