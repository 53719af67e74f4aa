//! Every row of the contract's error table, and every kind of bad input: each gets a 4xx with
//! a JSON body naming the problem, and leaves the database exactly as it was.

use serde_json::{Value, json};

use crate::common::{TestApp, spawn_app, spawn_app_without_database};

/// Posts `body` as an order and asserts the error and that nothing changed.
async fn assert_rejected(app: &TestApp, case: &str, body: &Value, status: u16, code: &str) -> Value {
    let before = app.snapshot().await;
    let reply = app.post_order(body).await;
    assert_eq!(reply.status, status, "{case}: {}", reply.text);
    assert_eq!(reply.json["code"], code, "{case}: {}", reply.text);
    assert!(reply.json["error"].as_str().is_some_and(|e| !e.is_empty()), "{case}: {}", reply.text);
    assert_eq!(app.snapshot().await, before, "{case} changed the database");
    reply.json
}

fn order_with_quantity(quantity: Value) -> Value {
    json!({"userId": 1, "items": [{"productId": 1, "quantity": quantity}]})
}

fn order_with_product(product_id: Value) -> Value {
    json!({"userId": 1, "items": [{"productId": product_id, "quantity": 1}]})
}

/// Bodies that are not JSON, or JSON of the wrong shape, are 400 INVALID_REQUEST.
#[tokio::test]
async fn malformed_and_wrongly_shaped_bodies_are_invalid_requests() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    for (case, body) in [
        ("truncated JSON", r#"{"userId": 1, "items": ["#),
        ("not JSON", "userId=1"),
        ("empty body", ""),
        ("trailing garbage", r#"{"userId":1,"items":[{"productId":1,"quantity":1}]} x"#),
        ("array", "[1, 2]"),
        ("number", "42"),
        ("null", "null"),
        ("string", r#""order""#),
    ] {
        let reply = app.post_raw("/api/orders", "application/json", body).await;
        reply.assert_error(400, "INVALID_REQUEST");
        assert!(reply.json["error"].as_str().unwrap().len() > 10, "{case}: {}", reply.text);
    }
    assert_eq!(app.snapshot().await, before);
}

/// Missing or null fields, and items that are not a non-empty array of objects.
#[tokio::test]
async fn missing_null_and_empty_fields_are_invalid_requests() {
    let app = spawn_app().await;
    for (case, body) in [
        ("no userId", json!({"items": [{"productId": 1, "quantity": 1}]})),
        ("null userId", json!({"userId": null, "items": [{"productId": 1, "quantity": 1}]})),
        ("no items", json!({"userId": 1})),
        ("null items", json!({"userId": 1, "items": null})),
        ("empty items", json!({"userId": 1, "items": []})),
        ("items an object", json!({"userId": 1, "items": {"productId": 1, "quantity": 1}})),
        ("item a number", json!({"userId": 1, "items": [1]})),
        ("no productId", json!({"userId": 1, "items": [{"quantity": 1}]})),
        ("null productId", json!({"userId": 1, "items": [{"productId": null, "quantity": 1}]})),
        ("no quantity", json!({"userId": 1, "items": [{"productId": 1}]})),
        ("null quantity", json!({"userId": 1, "items": [{"productId": 1, "quantity": null}]})),
        ("empty object", json!({})),
    ] {
        assert_rejected(&app, case, &body, 400, "INVALID_REQUEST").await;
    }
}

/// Quantities must be positive integers within int4: 0, -1, 1.5, "2", 2^31 are refused.
#[tokio::test]
async fn quantities_that_are_not_positive_int4_are_invalid_requests() {
    let app = spawn_app().await;
    for quantity in [json!(0), json!(-1), json!(1.5), json!("2"), json!(2147483648i64), json!(true), json!([1])] {
        let error = assert_rejected(
            &app,
            &format!("quantity {quantity}"),
            &order_with_quantity(quantity),
            400,
            "INVALID_REQUEST",
        )
        .await;
        assert!(error["error"].as_str().unwrap().contains("items[0].quantity"), "{error}");
    }
}

/// Ids must be positive integers within int4: 0, -3, "1", 1.0 and 2^31 are refused.
#[tokio::test]
async fn ids_that_are_not_positive_int4_are_invalid_requests() {
    let app = spawn_app().await;
    for product_id in [json!(0), json!(-3), json!("1"), json!(1.0), json!(2147483648i64)] {
        let case = format!("productId {product_id}");
        let error = assert_rejected(&app, &case, &order_with_product(product_id), 400, "INVALID_REQUEST").await;
        assert!(error["error"].as_str().unwrap().contains("items[0].productId"), "{error}");
    }
    for user_id in [json!(0), json!(-1), json!("1"), json!(1.5)] {
        let body = json!({"userId": user_id, "items": [{"productId": 1, "quantity": 1}]});
        assert_rejected(&app, &format!("userId {user_id}"), &body, 400, "INVALID_REQUEST").await;
    }
}

/// The same product twice in one order, and more lines than the maximum, are refused.
#[tokio::test]
async fn duplicate_lines_and_too_many_lines_are_invalid_requests() {
    let app = spawn_app().await;
    let duplicate = json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}, {"productId": 2, "quantity": 2}]});
    assert_rejected(&app, "duplicate product", &duplicate, 400, "INVALID_REQUEST").await;
    let lines: Vec<Value> = (1..=101).map(|id| json!({"productId": id, "quantity": 1})).collect();
    assert_rejected(&app, "101 lines", &json!({"userId": 1, "items": lines}), 400, "INVALID_REQUEST").await;
}

/// An unknown user is 400 USER_NOT_FOUND, an unknown product 400 PRODUCT_NOT_FOUND.
#[tokio::test]
async fn unknown_user_and_unknown_product_are_rejected_by_name() {
    let app = spawn_app().await;
    let error = assert_rejected(
        &app,
        "unknown user",
        &json!({"userId": 999, "items": [{"productId": 1, "quantity": 1}]}),
        400,
        "USER_NOT_FOUND",
    )
    .await;
    assert_eq!(error["userId"], 999);
    let error = assert_rejected(
        &app,
        "unknown product",
        &json!({"userId": 1, "items": [{"productId": 1, "quantity": 1}, {"productId": 77, "quantity": 1}]}),
        400,
        "PRODUCT_NOT_FOUND",
    )
    .await;
    assert_eq!(error["productId"], 77);
}

/// Out of stock: 400 INSUFFICIENT_STOCK with the product, what was asked and what is left;
/// when the second line lacks stock the first line's stock is untouched too.
#[tokio::test]
async fn insufficient_stock_rejects_the_whole_order() {
    let app = spawn_app().await;
    let error =
        assert_rejected(&app, "out of stock item", &order_with_product(json!(5)), 400, "INSUFFICIENT_STOCK").await;
    assert_eq!(
        (error["productId"].clone(), error["requested"].clone(), error["available"].clone()),
        (json!(5), json!(1), json!(0))
    );

    let second_line_short =
        json!({"userId": 1, "items": [{"productId": 2, "quantity": 5}, {"productId": 4, "quantity": 6}]});
    let error = assert_rejected(&app, "second line short", &second_line_short, 400, "INSUFFICIENT_STOCK").await;
    assert_eq!(
        (error["productId"].clone(), error["requested"].clone(), error["available"].clone()),
        (json!(4), json!(6), json!(5))
    );
    assert_eq!(app.stock(2).await, 50);
}

/// An order whose total does not fit the money column is refused, not a 500.
#[tokio::test]
async fn an_order_total_beyond_the_money_column_is_an_invalid_request() {
    let app = spawn_app().await;
    app.restock(1, i32::MAX - 10).await;
    let before = app.snapshot().await;
    let reply = app.post_order(&order_with_quantity(json!(i32::MAX))).await;
    reply.assert_error(400, "INVALID_REQUEST");
    assert_eq!(app.snapshot().await, before);
}

/// A body declared as anything but JSON is 415, whatever it contains.
#[tokio::test]
async fn a_body_that_is_not_declared_json_is_415() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    let valid = order_with_quantity(json!(1)).to_string();
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "application/jsonp"] {
        let reply = app.post_raw("/api/orders", content_type, valid.clone()).await;
        reply.assert_error(415, "UNSUPPORTED_MEDIA_TYPE");
    }
    let no_type = app.http.post(app.url("/api/orders")).body(valid.clone()).send().await.unwrap();
    assert_eq!(no_type.status().as_u16(), 415);
    let with_charset = app.post_raw("/api/orders", "application/json; charset=utf-8", valid).await;
    assert_eq!(with_charset.status, 201, "a charset parameter is fine: {}", with_charset.text);
    assert_eq!(app.snapshot().await.orders, before.orders + 1);
}

/// A 2 MB body is 413 PAYLOAD_TOO_LARGE, declared by Content-Length or streamed chunked.
#[tokio::test]
async fn a_two_megabyte_body_is_413() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    let huge = format!(r#"{{"userId":1,"items":[{{"productId":1,"quantity":1}}],"pad":"{}"}}"#, "x".repeat(2 << 20));
    let reply = app.post_raw("/api/orders", "application/json", huge.clone()).await;
    reply.assert_error(413, "PAYLOAD_TOO_LARGE");

    // Chunked, so no Content-Length announces the size: the limit must hold while reading.
    let head = "POST /api/orders HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut body = Vec::new();
    for chunk in huge.as_bytes().chunks(64 * 1024) {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let response = app.raw_exchange(head.as_bytes(), &body).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains(r#""code":"PAYLOAD_TOO_LARGE""#), "{response}");
    assert_eq!(app.snapshot().await, before);
}

/// Order ids in the path that are not positive integers are 400; unknown ones are 404.
#[tokio::test]
async fn bad_and_unknown_order_ids() {
    let app = spawn_app().await;
    for id in ["abc", "0", "-1", "99999999999999999999", "1.5", "%20"] {
        app.get(&format!("/api/orders/{id}")).await.assert_error(400, "INVALID_REQUEST");
        app.put(&format!("/api/orders/{id}/cancel")).await.assert_error(400, "INVALID_REQUEST");
    }
    let reply = app.get("/api/orders/424242").await;
    reply.assert_error(404, "ORDER_NOT_FOUND");
    assert_eq!(reply.json["orderId"], 424242);
    app.put("/api/orders/424242/cancel").await.assert_error(404, "ORDER_NOT_FOUND");
}

/// An unknown path is 404 NOT_FOUND; a known path with the wrong method is 405 with `Allow`.
#[tokio::test]
async fn unknown_paths_and_wrong_methods() {
    let app = spawn_app().await;
    for path in ["/", "/api", "/api/product", "/api/orders/1/refund", "/api/products/", "/health/x"] {
        app.get(path).await.assert_error(404, "NOT_FOUND");
    }
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/api/orders", "GET, HEAD, POST"),
        (reqwest::Method::PUT, "/api/orders", "GET, HEAD, POST"),
        (reqwest::Method::GET, "/api/products/1/restock", "POST"),
        (reqwest::Method::POST, "/api/orders/1/status", "PUT"),
        (reqwest::Method::POST, "/api/products", "GET, HEAD"),
        (reqwest::Method::PUT, "/health", "GET, HEAD"),
        (reqwest::Method::POST, "/health/live", "GET, HEAD"),
        (reqwest::Method::POST, "/api/orders/1", "GET, HEAD"),
        (reqwest::Method::GET, "/api/orders/1/cancel", "PUT"),
        (reqwest::Method::PATCH, "/api/orders/1/cancel", "PUT"),
    ] {
        let reply = app.request(method.clone(), path).await;
        reply.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
    }
}

/// A shipped or delivered order cannot be cancelled: 409, and nothing is restored.
#[tokio::test]
async fn shipped_and_delivered_orders_are_not_cancellable() {
    let app = spawn_app().await;
    for status in ["shipped", "delivered"] {
        let order_id = app.order(3, 2).await;
        app.set_status(order_id, "shipped").await;
        if status == "delivered" {
            app.set_status(order_id, "delivered").await;
        }
        let before = app.snapshot().await;
        let reply = app.cancel(order_id).await;
        reply.assert_error(409, "ORDER_NOT_CANCELLABLE");
        assert_eq!(reply.json["status"], status);
        assert_eq!(app.snapshot().await, before);
    }
}

/// With the database unreachable, health is 503 unhealthy and the API answers 503
/// SERVICE_UNAVAILABLE with Retry-After, quickly.
#[tokio::test]
async fn an_unreachable_database_gives_503_with_retry_after() {
    let app = spawn_app_without_database().await;
    let started = std::time::Instant::now();
    let health = app.get("/health").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.text, r#"{"status":"error","db":"unhealthy"}"#);
    for reply in [
        app.get("/api/products").await,
        app.post_order(&order_with_quantity(json!(1))).await,
        app.get("/api/orders/1").await,
    ] {
        reply.assert_error(503, "SERVICE_UNAVAILABLE");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "503s must be fast, took {:?}", started.elapsed());
}
