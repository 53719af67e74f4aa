-- The order lifecycle: processing -> shipped -> delivered, and processing -> cancelled.
-- The API moves orders only along these edges; this trigger makes the database refuse any
-- other move too, whoever writes it, and timestamps each change.

ALTER TABLE orders
    ADD COLUMN shipped_at   timestamptz,
    ADD COLUMN delivered_at timestamptz,
    ADD COLUMN cancelled_at timestamptz;

CREATE FUNCTION orders_follow_lifecycle() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT ((OLD.status = 'processing' AND NEW.status IN ('shipped', 'cancelled'))
         OR (OLD.status = 'shipped' AND NEW.status = 'delivered')) THEN
        RAISE EXCEPTION 'order % cannot move from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation', CONSTRAINT = 'orders_lifecycle';
    END IF;
    NEW.updated_at := now();
    CASE NEW.status
        WHEN 'shipped' THEN NEW.shipped_at := now();
        WHEN 'delivered' THEN NEW.delivered_at := now();
        WHEN 'cancelled' THEN NEW.cancelled_at := now();
    END CASE;
    RETURN NEW;
END $$;

CREATE TRIGGER orders_lifecycle
    BEFORE UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_follow_lifecycle();

-- Listing orders by status (GET /api/orders?status=...), in id order for keyset pagination.
CREATE INDEX orders_status_id_idx ON orders (status, id);
