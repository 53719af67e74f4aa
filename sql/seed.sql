-- Seed data of the contract. Idempotent: rows that exist are left as they are (a second run
-- must not reset stock that orders have taken), and the sequences are moved past the seeded
-- ids so that new rows never collide with them. Runs after all migrations.

INSERT INTO users (id, email) VALUES
    (1, 'testuser@example.com'),
    (2, 'user2@example.com')
ON CONFLICT (id) DO NOTHING;

-- Each product inserted here gets its opening balance in the inventory ledger.
WITH seeded AS (
    INSERT INTO products (id, name, price, stock) VALUES
        (1, 'Laptop', 75000.00, 10),
        (2, 'Mouse', 500.00, 50),
        (3, 'Keyboard', 1500.00, 20),
        (4, 'Headphones', 2500.00, 5),
        (5, 'Out of Stock Item', 999.00, 0)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, stock
)
INSERT INTO inventory_movements (product_id, delta, reason)
SELECT id, stock, 'seed' FROM seeded WHERE stock > 0;

SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT max(id) FROM users));
SELECT setval(pg_get_serial_sequence('products', 'id'), (SELECT max(id) FROM products));
