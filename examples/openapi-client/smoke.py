"""The generated client (openapi-python-client) imported and used against a live server: the
catalogue read, an order placed with an Idempotency-Key and placed again with it (a replay of
the same order), the order read back, its typed fields checked.

Usage: python smoke.py GENERATED_PROJECT_DIR BASE_URL
"""

import sys
import uuid

sys.path.insert(0, sys.argv[1])

from order_api_client import Client  # noqa: E402
from order_api_client.api.orders import create_order, get_order  # noqa: E402
from order_api_client.api.products import list_products  # noqa: E402
from order_api_client.models import CreatedOrder, NewOrder, NewOrderLine, Order, OrderStatus, Product  # noqa: E402

client = Client(base_url=sys.argv[2], raise_on_unexpected_status=True)

products = list_products.sync(client=client)
assert isinstance(products, list) and all(isinstance(p, Product) for p in products), products
assert [p.name for p in products[:2]] == ["Laptop", "Mouse"], products

order = NewOrder(user_id=1, items=[NewOrderLine(product_id=2, quantity=2)])
key = str(uuid.uuid4())
first = create_order.sync_detailed(client=client, body=order, idempotency_key=key)
again = create_order.sync_detailed(client=client, body=order, idempotency_key=key)
assert first.status_code == 201 and isinstance(first.parsed, CreatedOrder), first
assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true", again
assert again.parsed.order_id == first.parsed.order_id, (first.parsed, again.parsed)

read = get_order.sync(client=client, order_id=first.parsed.order_id)
assert isinstance(read, Order) and read.status == OrderStatus.PROCESSING, read
assert read.user.email == "testuser@example.com" and read.items[0].product_name == "Mouse", read
assert read.created_at.tzinfo is not None, read.created_at
print(f"openapi client: generated client placed order {read.order_id} ({read.total_amount}) and read it back")
