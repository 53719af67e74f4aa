//! Many concurrent requests on stock, orders and cancellation, with the invariants checked
//! afterwards: stock never negative, stock + live ordered quantity = seeded stock, a
//! cancellation restores stock exactly once, no deadlock, no 5xx, no leaked connection.
//!
//! Each test runs twice, under both settings of `ORDER_BATCH_MAX` (a documented setting):
//! `batched` (64, the default), where concurrent orders share a transaction and at most two
//! order transactions run at once, and `one_order_per_transaction` (1), where every order is
//! a transaction of its own on its own pooled connection, so that transactions really race
//! each other for the product locks.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::common::{self, Reply, TestApp, raw, spawn_app_with, wait};

/// Each test function below, as one test per `ORDER_BATCH_MAX` setting: `NAME::batched` and
/// `NAME::one_order_per_transaction`.
macro_rules! under_both_batch_settings {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn batched() {
                super::$test(64).await
            }

            #[tokio::test]
            async fn one_order_per_transaction() {
                super::$test(1).await
            }
        }
    )*};
}

under_both_batch_settings!(
    forty_concurrent_orders_for_ten_units_sell_exactly_ten,
    twenty_concurrent_cancels_restore_stock_exactly_once,
    opposite_line_orders_never_deadlock,
    rejected_orders_leak_no_connection,
    concurrent_orders_and_cancels_keep_stock_balanced,
    orders_racing_restocks_and_cancels_are_created_or_refused_never_500,
);

/// A server with `ORDER_BATCH_MAX = batch_max`.
async fn app_batching(batch_max: usize) -> TestApp {
    spawn_app_with(|config| config.order_batch_max = batch_max).await
}

/// Sends all bodies as orders at once and returns the replies.
async fn post_orders_concurrently(app: &TestApp, bodies: Vec<Value>) -> Vec<Reply> {
    let requests = bodies.iter().map(|body| app.post_order(body));
    join_all(requests).await
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

/// 40 concurrent orders of one unit on a product with stock 10: exactly 10 succeed, the rest
/// are INSUFFICIENT_STOCK, stock ends at 0, never below.
async fn forty_concurrent_orders_for_ten_units_sell_exactly_ten(batch_max: usize) {
    let app = app_batching(batch_max).await;
    let bodies = (0..40).map(|_| json!({"userId": 1, "items": [{"productId": 1, "quantity": 1}]})).collect();
    let replies = post_orders_concurrently(&app, bodies).await;

    let created = replies.iter().filter(|r| r.status == 201).count();
    let refused = replies.iter().filter(|r| r.status == 400 && r.json["code"] == "INSUFFICIENT_STOCK").count();
    assert_eq!((created, refused), (10, 30), "statuses: {:?}", statuses(&replies));
    assert_eq!(app.stock(1).await, 0);
    assert_eq!(app.count("orders").await, 10);
    assert_eq!(app.count("payments").await, 10);
    app.assert_invariants().await;
}

/// 20 concurrent cancels of one order all answer 200 and restore its stock exactly once.
async fn twenty_concurrent_cancels_restore_stock_exactly_once(batch_max: usize) {
    let app = app_batching(batch_max).await;
    let order_id = app
        .post_order(&json!({"userId": 1, "items": [{"productId": 2, "quantity": 7}, {"productId": 3, "quantity": 4}]}))
        .await
        .json["orderId"]
        .as_i64()
        .unwrap();
    assert_eq!((app.stock(2).await, app.stock(3).await), (43, 16));

    let replies = join_all((0..20).map(|_| app.cancel(order_id))).await;
    assert!(replies.iter().all(|r| r.status == 200 && r.json["status"] == "cancelled"), "{:?}", statuses(&replies));
    assert_eq!((app.stock(2).await, app.stock(3).await), (50, 20));
    app.assert_invariants().await;
}

/// 60 concurrent two-line orders naming the same products in opposite orders ([1,2] and
/// [2,1]) all succeed: locks are taken in id order, so they cannot deadlock. The test holds
/// product 1's lock until the server has read every order, so that they all start together:
/// an order that locked product 2 first would then be waiting for product 1 while holding 2.
async fn opposite_line_orders_never_deadlock(batch_max: usize) {
    let app = app_batching(batch_max).await;
    app.restock(1, 990).await;
    app.restock(2, 950).await;
    let requests: Vec<_> = (0..60)
        .map(|i| {
            let (first, second) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
            let body = json!({"userId": 1, "items": [{"productId": first, "quantity": 1}, {"productId": second, "quantity": 2}]});
            raw::Request::order(None, &body)
        })
        .collect();
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN; SELECT 1 FROM products WHERE id = 1 FOR UPDATE").await.unwrap();
    let in_flight = app.send_all(&requests).await;
    wait::for_lock_waiters(&app.db, &app.database_name, 1).await;
    in_flight.read_by_the_server().await;
    holder.batch_execute("COMMIT").await.unwrap();
    let replies = in_flight.replies().await;
    assert!(replies.iter().all(|r| r.status == 201), "statuses: {:?}", statuses(&replies));
    // Each order takes 1 of its first product and 2 of its second: 30 * (1 + 2) of each.
    assert_eq!((app.stock(1).await, app.stock(2).await), (1000 - 90, 1000 - 90));
    assert_eq!(app.count("order_items").await, 120);
    app.assert_invariants().await;
}

/// 200 rejected orders in a row (each kind of rejection) leave no connection behind: with a
/// pool of two connections, none is checked out or left in a transaction afterwards, and a
/// valid order right after succeeds (a leaked pair would make it wait out the pool and fail).
async fn rejected_orders_leak_no_connection(batch_max: usize) {
    let app = spawn_app_with(|config| {
        config.order_batch_max = batch_max;
        config.pool_size = 2;
        config.pool_timeout = Duration::from_secs(2);
    })
    .await;
    let rejections = [
        (json!({"userId": 1, "items": [{"productId": 5, "quantity": 1}]}), "INSUFFICIENT_STOCK"),
        (json!({"userId": 1, "items": [{"productId": 999, "quantity": 1}]}), "PRODUCT_NOT_FOUND"),
        (json!({"userId": 999, "items": [{"productId": 1, "quantity": 1}]}), "USER_NOT_FOUND"),
        (json!({"userId": 1, "items": [{"productId": 1, "quantity": 0}]}), "INVALID_REQUEST"),
    ];
    for i in 0..200 {
        let (body, code) = &rejections[i % rejections.len()];
        let reply = app.post_order(body).await;
        assert_eq!((reply.status, reply.json["code"].as_str()), (400, Some(*code)), "{}", reply.text);
    }
    // The webhook router and claimer check out a connection for a moment every 250 ms, so "none
    // in use" is polled for: a leaked connection never comes back, theirs do within milliseconds.
    wait::until("no connection checked out and none left inside a transaction", wait::PATIENCE, || async {
        let metrics = app.get("/metrics").await.text;
        let in_transaction: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND application_name = 'order-api' AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        metrics.lines().any(|l| l == "order_api_db_pool_in_use_connections 0") && in_transaction == 0
    })
    .await;
    app.order(1, 1).await;
    app.assert_invariants().await;
}

/// Concurrent orders and cancels on the same products, including repeated cancels of the same
/// orders: afterwards stock + live ordered quantity = seeded stock for every product.
async fn concurrent_orders_and_cancels_keep_stock_balanced(batch_max: usize) {
    let app = &app_batching(batch_max).await;
    // A first wave of orders to cancel later.
    let first_wave: Vec<Value> = (0..20)
        .map(|i| json!({"userId": 1 + i % 2, "items": [{"productId": 2, "quantity": 1}, {"productId": 3, "quantity": 1}]}))
        .collect();
    let created: Vec<i64> = post_orders_concurrently(app, first_wave)
        .await
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.json["orderId"].as_i64().unwrap())
        .collect();
    assert_eq!(created.len(), 20);

    // Now cancel each of them twice while new orders compete for the same stock.
    let cancels = created.iter().flat_map(|id| [*id, *id]).map(|id| async move {
        let reply = app.cancel(id).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    });
    let orders = (0..40).map(|i| async move {
        let body = json!({"userId": 1, "items": [{"productId": 3 - i % 2, "quantity": 1 + i % 3}, {"productId": 4, "quantity": 1}]});
        let reply = app.post_order(&body).await;
        assert!(reply.status == 201 || reply.json["code"] == "INSUFFICIENT_STOCK", "{}", reply.text);
    });
    let cancel_all = join_all(cancels);
    let order_all = join_all(orders);
    tokio::join!(cancel_all, order_all);

    let cancelled: i64 =
        app.db.query_one("SELECT count(*) FROM orders WHERE status = 'cancelled'", &[]).await.unwrap().get(0);
    assert_eq!(cancelled, 20);
    app.assert_invariants().await;
}

/// Orders racing stock that comes back (restocks and cancellations) on a product that keeps
/// running out: every order is created or refused INSUFFICIENT_STOCK, never a 500. The
/// soak found this: an order's UPDATE computed the new stock from the row as its statement
/// first saw it, and PostgreSQL checks `CHECK (stock >= 0)` on that candidate row before it
/// moves to the current (locked, restocked) one, so an order that had enough stock failed.
async fn orders_racing_restocks_and_cancels_are_created_or_refused_never_500(batch_max: usize) {
    let app = &app_batching(batch_max).await;
    let ordering = join_all((0..8).map(|worker| async move {
        let mut statuses = Vec::new();
        for round in 0..25 {
            let quantity = (worker + round) % 3 + 1;
            let reply = app.post_order(&json!({"userId": 1, "items": [{"productId": 4, "quantity": quantity}]})).await;
            if reply.status == 201 && round % 2 == 0 {
                assert_eq!(app.cancel(reply.json["orderId"].as_i64().unwrap()).await.status, 200);
            }
            statuses.push((reply.status, reply.json["code"].as_str().unwrap_or("").to_owned()));
        }
        statuses
    }));
    let restocking = join_all((0..2).map(|_| async move {
        for _ in 0..25 {
            app.restock(4, 1).await;
        }
    }));
    let (statuses, _) = tokio::join!(ordering, restocking);
    let statuses: Vec<_> = statuses.into_iter().flatten().collect();
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|(status, code)| *status != 201 && (*status, code.as_str()) != (400, "INSUFFICIENT_STOCK"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} unexpected answers: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert!(statuses.iter().any(|(status, _)| *status == 400), "the product never ran out: the test proves nothing");
    app.assert_invariants().await;
}
