//! The order lifecycle: processing -> shipped -> delivered, processing -> cancelled; every
//! other move refused with 409, by the API and by the database itself.

use futures::future::join_all;
use serde_json::json;

use crate::common::spawn_app;

/// An order moves processing -> shipped -> delivered; each move answers 200 with the new
/// status and is timestamped.
#[tokio::test]
async fn an_order_ships_then_is_delivered_with_timestamps() {
    let app = spawn_app().await;
    let order_id = app.order(1, 1).await;
    for status in ["shipped", "delivered"] {
        let reply = app.put_json(&format!("/api/orders/{order_id}/status"), &json!({"status": status})).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.text, format!(r#"{{"orderId":{order_id},"status":"{status}"}}"#));
        assert_eq!(app.get(&format!("/api/orders/{order_id}")).await.json["status"], status);
    }
    let row = app
        .db
        .query_one(
            "SELECT shipped_at IS NOT NULL, delivered_at IS NOT NULL, cancelled_at IS NULL,
                    updated_at >= shipped_at AND delivered_at >= shipped_at
             FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await
        .unwrap();
    assert!((0..4).all(|i| row.get::<_, bool>(i)), "timestamps: {row:?}");
    app.assert_invariants().await;
}

/// Every move off the lifecycle is 409 INVALID_STATUS_TRANSITION with the current status,
/// and changes nothing; setting the status an order already has is a 200 no-op.
#[tokio::test]
async fn moves_off_the_lifecycle_are_refused_with_the_current_status() {
    let app = spawn_app().await;
    let processing = app.order(2, 1).await;
    let shipped = app.order(2, 1).await;
    app.set_status(shipped, "shipped").await;
    let delivered = app.order(2, 1).await;
    app.set_status(delivered, "shipped").await;
    app.set_status(delivered, "delivered").await;
    let cancelled = app.order(2, 1).await;
    app.cancel(cancelled).await;

    for (order_id, current, requested) in [
        (processing, "processing", "delivered"),
        (shipped, "shipped", "processing"),
        (delivered, "delivered", "shipped"),
        (delivered, "delivered", "processing"),
        (cancelled, "cancelled", "shipped"),
        (cancelled, "cancelled", "processing"),
        (cancelled, "cancelled", "delivered"),
    ] {
        let before = app.snapshot().await;
        let reply = app.put_json(&format!("/api/orders/{order_id}/status"), &json!({"status": requested})).await;
        reply.assert_error(409, "INVALID_STATUS_TRANSITION");
        assert_eq!((reply.json["status"].as_str(), reply.json["requested"].as_str()), (Some(current), Some(requested)));
        assert_eq!(app.snapshot().await, before, "{current} -> {requested} changed something");
    }
    for (order_id, status) in
        [(processing, "processing"), (shipped, "shipped"), (delivered, "delivered"), (cancelled, "cancelled")]
    {
        let before = app.snapshot().await;
        let reply = app.put_json(&format!("/api/orders/{order_id}/status"), &json!({"status": status})).await;
        assert_eq!(reply.status, 200, "{status} again: {}", reply.text);
        assert_eq!(app.snapshot().await, before);
    }
    app.assert_invariants().await;
}

/// Cancelling through the status endpoint is a cancellation: stock comes back once; a
/// shipped order is not cancellable (409 ORDER_NOT_CANCELLABLE).
#[tokio::test]
async fn cancelling_through_the_status_endpoint_restores_stock() {
    let app = spawn_app().await;
    let order_id = app.order(3, 4).await;
    assert_eq!(app.stock(3).await, 16);
    app.set_status(order_id, "cancelled").await;
    app.set_status(order_id, "cancelled").await;
    assert_eq!(app.stock(3).await, 20);

    let shipped = app.order(3, 1).await;
    app.set_status(shipped, "shipped").await;
    let reply = app.put_json(&format!("/api/orders/{shipped}/status"), &json!({"status": "cancelled"})).await;
    reply.assert_error(409, "ORDER_NOT_CANCELLABLE");
    assert_eq!(app.stock(3).await, 19);
    app.assert_invariants().await;
}

/// Bad bodies are 400, unknown orders 404, and a body is required as JSON.
#[tokio::test]
async fn status_changes_validate_their_input() {
    let app = spawn_app().await;
    let order_id = app.order(1, 1).await;
    let path = format!("/api/orders/{order_id}/status");
    for body in
        [json!({}), json!({"status": "SHIPPED"}), json!({"status": "lost"}), json!({"status": 2}), json!(["shipped"])]
    {
        app.put_json(&path, &body).await.assert_error(400, "INVALID_REQUEST");
    }
    let plain = app.http.put(app.url(&path)).header("content-type", "text/plain").body("shipped").send().await.unwrap();
    assert_eq!(plain.status().as_u16(), 415);
    app.put_json("/api/orders/777/status", &json!({"status": "shipped"})).await.assert_error(404, "ORDER_NOT_FOUND");
    app.put_json("/api/orders/x/status", &json!({"status": "shipped"})).await.assert_error(400, "INVALID_REQUEST");
    assert_eq!(app.get(&format!("/api/orders/{order_id}")).await.json["status"], "processing");
}

/// The database refuses an illegal move even when the API is bypassed.
#[tokio::test]
async fn the_database_enforces_the_lifecycle_itself() {
    let app = spawn_app().await;
    let order_id = app.order(1, 1).await;
    let error = app.db.execute("UPDATE orders SET status = 'delivered' WHERE id = $1", &[&order_id]).await.unwrap_err();
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION), "{error:?}");
    app.set_status(order_id, "cancelled").await;
    assert!(app.db.execute("UPDATE orders SET status = 'processing' WHERE id = $1", &[&order_id]).await.is_err());
}

/// Shipping races cancelling on the same orders: each order ends either shipped (stock still
/// taken, every cancel refused with 409) or cancelled (stock back exactly once, every ship
/// refused with 409); never both, never a 5xx.
#[tokio::test]
async fn shipping_racing_cancelling_has_one_winner_per_order() {
    let app = &spawn_app().await;
    app.restock(2, 100).await;
    let mut orders = Vec::new();
    for _ in 0..10 {
        orders.push(app.order(2, 3).await);
    }
    let attempts = orders.iter().flat_map(|order_id| {
        (0..6).map(move |i| async move {
            let target = if i % 2 == 0 { "shipped" } else { "cancelled" };
            let reply = app.put_json(&format!("/api/orders/{order_id}/status"), &json!({"status": target})).await;
            (*order_id, target, reply)
        })
    });
    let results = join_all(attempts).await;

    for order_id in &orders {
        let status = app.get(&format!("/api/orders/{order_id}")).await.json["status"].as_str().unwrap().to_owned();
        assert!(status == "shipped" || status == "cancelled", "order {order_id} ended {status}");
        for (_, target, reply) in results.iter().filter(|(id, _, _)| id == order_id) {
            let expected = match (status.as_str(), *target) {
                (won, asked) if won == asked => (200, None),
                ("shipped", "cancelled") => (409, Some("ORDER_NOT_CANCELLABLE")),
                _ => (409, Some("INVALID_STATUS_TRANSITION")),
            };
            assert_eq!(
                (reply.status, reply.json["code"].as_str()),
                expected,
                "order {order_id} {target}: {}",
                reply.text
            );
        }
    }
    app.assert_invariants().await;
}
