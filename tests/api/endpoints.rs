//! The happy path of every endpoint of the contract, with exact bodies, and the database
//! state each one leaves behind.

use serde_json::json;

use crate::common::{self, SEED_STOCK, spawn_app};

/// `GET /health` answers 200 with the contract's body when the database is up.
#[tokio::test]
async fn health_is_ok_when_the_database_answers() {
    let app = spawn_app().await;
    let reply = app.get("/health").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text, r#"{"status":"ok","db":"healthy"}"#);
}

/// `GET /openapi.json` answers 200 with the OpenAPI 3 document, JSON, naming the contract's
/// paths (that every route, method and error code is in it is src/api/openapi.rs's unit test).
#[tokio::test]
async fn openapi_json_is_served() {
    let app = spawn_app().await;
    let reply = app.get("/openapi.json").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.json["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", reply.json["openapi"]);
    for path in ["/health", "/api/products", "/api/orders", "/api/orders/{orderId}", "/api/orders/{orderId}/cancel"] {
        assert!(reply.json["paths"][path].is_object(), "{path} missing from /openapi.json");
    }
}

/// `GET /api/products` lists the seed, ordered by id, with money as exact JSON numbers.
#[tokio::test]
async fn products_lists_the_seed_in_id_order_with_exact_prices() {
    let app = spawn_app().await;
    let reply = app.get("/api/products").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(
        reply.text,
        concat!(
            r#"[{"id":1,"name":"Laptop","price":75000.00,"stock":10},"#,
            r#"{"id":2,"name":"Mouse","price":500.00,"stock":50},"#,
            r#"{"id":3,"name":"Keyboard","price":1500.00,"stock":20},"#,
            r#"{"id":4,"name":"Headphones","price":2500.00,"stock":5},"#,
            r#"{"id":5,"name":"Out of Stock Item","price":999.00,"stock":0}]"#
        )
    );
}

/// `POST /api/orders` answers 201 with the contract's body, and writes the order, its lines
/// with the unit price, the payment for the total and the stock decrement.
#[tokio::test]
async fn creating_an_order_writes_order_lines_payment_and_takes_stock() {
    let app = spawn_app().await;
    let reply = app
        .post_order(&json!({"userId": 1, "items": [{"productId": 1, "quantity": 1}, {"productId": 2, "quantity": 3}]}))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.text, r#"{"orderId":1,"status":"processing","totalAmount":76500.00}"#);

    assert_eq!(app.stock(1).await, 9);
    assert_eq!(app.stock(2).await, 47);
    let order =
        app.db.query_one("SELECT user_id, status, total_amount::text FROM orders WHERE id = 1", &[]).await.unwrap();
    assert_eq!(
        (order.get::<_, i32>(0), order.get::<_, &str>(1), order.get::<_, &str>(2)),
        (1, "processing", "76500.00")
    );
    let lines = app
        .db
        .query("SELECT product_id, quantity, price::text FROM order_items WHERE order_id = 1 ORDER BY id", &[])
        .await
        .unwrap();
    let lines: Vec<(i32, i32, String)> = lines.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(lines, vec![(1, 1, "75000.00".to_owned()), (2, 3, "500.00".to_owned())]);
    let payment = app.db.query_one("SELECT amount::text, status FROM payments WHERE order_id = 1", &[]).await.unwrap();
    assert_eq!((payment.get::<_, &str>(0), payment.get::<_, &str>(1)), ("76500.00", "completed"));
    app.assert_invariants().await;
}

/// `GET /api/orders/{id}` returns the order with its user and lines, `createdAt` in RFC 3339
/// UTC, and the unit price of the order even after the product's price changed.
#[tokio::test]
async fn an_order_reads_back_with_user_lines_and_the_price_at_order_time() {
    let app = spawn_app().await;
    let order_id = app.order(3, 2).await;
    app.db.execute("UPDATE products SET price = 1.00 WHERE id = 3", &[]).await.unwrap();

    let reply = app.get(&format!("/api/orders/{order_id}")).await;
    assert_eq!(reply.status, 200);
    let created_at = reply.json["createdAt"].as_str().unwrap().to_owned();
    assert_eq!(
        reply.text,
        format!(
            concat!(
                r#"{{"orderId":{},"status":"processing","totalAmount":3000.00,"createdAt":"{}","#,
                r#""user":{{"id":1,"email":"testuser@example.com"}},"#,
                r#""items":[{{"productId":3,"productName":"Keyboard","quantity":2,"price":1500.00}}]}}"#
            ),
            order_id, created_at
        )
    );
    // 2026-11-25T16:31:35.123Z
    let shape = created_at.len() == 24
        && created_at.ends_with('Z')
        && created_at.as_bytes()[10] == b'T'
        && created_at.as_bytes()[19] == b'.';
    assert!(shape, "createdAt {created_at} is not RFC 3339 UTC with milliseconds");
    let in_database: String = app
        .db
        .query_one(
            r#"SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') FROM orders WHERE id = $1"#,
            &[&order_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created_at, in_database);
}

/// Lines read back in the order the client sent them.
#[tokio::test]
async fn order_lines_keep_the_clients_order() {
    let app = spawn_app().await;
    let reply = app
        .post_order(&json!({"userId": 2, "items": [
            {"productId": 4, "quantity": 1}, {"productId": 1, "quantity": 1}, {"productId": 3, "quantity": 1}
        ]}))
        .await;
    assert_eq!(reply.status, 201);
    let order = app.get(&format!("/api/orders/{}", reply.json["orderId"])).await;
    let ids: Vec<i64> =
        order.json["items"].as_array().unwrap().iter().map(|i| i["productId"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![4, 1, 3]);
    assert_eq!(order.json["user"], json!({"id": 2, "email": "user2@example.com"}));
    assert!(order.text.contains(r#""totalAmount":79000.00,"#), "{}", order.text);
}

/// `PUT /api/orders/{id}/cancel` answers 200, restores the stock, refunds the payment, and
/// answers 200 again on a repeat without restoring anything more.
#[tokio::test]
async fn cancelling_restores_stock_once_and_repeats_answer_200() {
    let app = spawn_app().await;
    let order_id = app.order(2, 5).await;
    assert_eq!(app.stock(2).await, 45);

    for _ in 0..3 {
        let reply = app.cancel(order_id).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.text, format!(r#"{{"orderId":{order_id},"status":"cancelled"}}"#));
        assert_eq!(app.stock(2).await, 50);
    }
    let order = app.get(&format!("/api/orders/{order_id}")).await;
    assert_eq!(order.json["status"], "cancelled");
    let payment: String =
        app.db.query_one("SELECT status FROM payments WHERE order_id = $1", &[&order_id]).await.unwrap().get(0);
    assert_eq!(payment, "refunded");
    app.assert_invariants().await;
}

/// An order may take the last unit; the next one is refused.
#[tokio::test]
async fn the_last_unit_can_be_ordered_and_then_no_more() {
    let app = spawn_app().await;
    app.order(4, 5).await;
    assert_eq!(app.stock(4).await, 0);
    let reply = app.post_order(&json!({"userId": 1, "items": [{"productId": 4, "quantity": 1}]})).await;
    reply.assert_error(400, "INSUFFICIENT_STOCK");
    assert_eq!(reply.json["available"], 0);
}

/// Every response carries an `X-Request-Id`: the client's own when it is sane, else a new one.
#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app().await;
    let mine = app.http.get(app.url("/health")).header("x-request-id", "trace-abc-123").send().await.unwrap();
    assert_eq!(mine.headers()["x-request-id"], "trace-abc-123");
    let generated = app.get("/api/products").await;
    let id = generated.header("x-request-id").unwrap().to_owned();
    assert!(!id.is_empty());
    let bad = app.http.get(app.url("/health")).header("x-request-id", "x".repeat(500)).send().await.unwrap();
    let replaced = bad.headers()["x-request-id"].to_str().unwrap();
    assert!(replaced.len() < 100 && replaced != id);
    let unknown = app.get("/nope").await;
    assert!(unknown.header("x-request-id").is_some());
}

/// `GET /metrics` is Prometheus text with request counts by route and the pool gauges.
#[tokio::test]
async fn metrics_count_requests_and_orders() {
    let app = spawn_app().await;
    app.order(1, 1).await;
    app.post_order(&json!({"userId": 1, "items": [{"productId": 5, "quantity": 1}]})).await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("text/plain"));
    let build_info =
        format!(r#"order_api_build_info{{version="{}",revision="{}"}} 1"#, order_api::VERSION, order_api::GIT_COMMIT);
    for line in [
        r#"order_api_http_requests_total{route="/api/orders",method="POST",status="201"} 1"#,
        r#"order_api_http_requests_total{route="/api/orders",method="POST",status="400"} 1"#,
        r#"order_api_orders_total{outcome="created"} 1"#,
        r#"order_api_orders_total{outcome="INSUFFICIENT_STOCK"} 1"#,
        "order_api_db_pool_max_connections 8",
        build_info.as_str(),
    ] {
        assert!(reply.text.lines().any(|l| l == line), "missing {line} in\n{}", reply.text);
    }
}

/// The seed is the contract's, idempotent, and leaves the sequences past the seeded ids.
#[tokio::test]
async fn seeding_twice_changes_nothing_and_new_rows_get_new_ids() {
    let app = spawn_app().await;
    app.order(2, 1).await;
    let before = app.snapshot().await;
    let mut client = common::connect(&app.database_url).await;
    order_api::db::seed(&mut client).await.unwrap();
    assert_eq!(app.snapshot().await, before, "a second seed must not reset stock");
    // What clients see: the seeded catalogue, with only the order's unit taken.
    let listed: Vec<(i64, i64)> = app
        .get("/api/products")
        .await
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_i64().unwrap(), p["stock"].as_i64().unwrap()))
        .collect();
    let expected: Vec<(i64, i64)> =
        SEED_STOCK.iter().map(|&(id, stock)| (i64::from(id), i64::from(stock) - i64::from(id == 2))).collect();
    assert_eq!(listed, expected);

    let user: i32 = app
        .db
        .query_one("INSERT INTO users (email) VALUES ('new@example.com') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let product: i32 = app
        .db
        .query_one("INSERT INTO products (name, price, stock) VALUES ('New', 1, 1) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((user, product), (3, 6));
}
