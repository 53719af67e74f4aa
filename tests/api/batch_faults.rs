//! A fault stays with the order or the connection it belongs to (issue 19): an order waiting
//! for a locked product, an order out of time, a connect cut short by a request's deadline, a
//! connection that hangs while statements are prepared. Each test sets the fault up so that
//! the service as it was before the fix answers the bystanders wrongly, and checks that they
//! now get their own answers.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::common::{self, order_body, proxy::HangingProxy, spawn_app_with};

/// Orders for product 1 wait behind a row lock an operator holds: one, then another (each a
/// batch of its own, so every lane of the old design was busy), then a third sent with ten
/// orders for product 2. The product-2 orders are all placed while the lock is still held.
/// (Before: the third product-1 order and the ten shared the next batch, which waited on the
/// lock, and all eleven got 503 at the lock timeout.) Once the lock goes, each product-1 order
/// is placed, or refused with 503 if it waited past the lock timeout.
#[tokio::test]
async fn orders_for_a_free_product_are_placed_while_a_neighbours_product_is_locked() {
    let app = spawn_app_with(|config| {
        config.order_batch_max = 64;
        config.statement_timeout = Duration::from_secs(4);
    })
    .await;
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN; SELECT 1 FROM products WHERE id = 1 FOR UPDATE").await.unwrap();

    let send = || app.spawn_order(None, order_body(1, 1, 1));
    let mut locked = vec![send()];
    app.wait_for_lock_waiters(1).await;
    locked.push(send());
    app.wait_for_lock_waiters(2).await;
    locked.push(send());
    let body = order_body(1, 2, 1);
    let free = join_all((0..10).map(|_| app.post_order(&body))).await;
    // Still held: nothing above could have waited for it.
    for reply in &free {
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    assert_eq!(app.stock(2).await, 40);
    holder.batch_execute("ROLLBACK").await.unwrap();

    let mut placed_for_1 = 0;
    for request in locked {
        let reply = request.await.unwrap();
        match reply.status {
            201 => placed_for_1 += 1,
            _ => reply.assert_error(503, "SERVICE_UNAVAILABLE"),
        }
    }
    assert_eq!(app.stock(1).await, 10 - placed_for_1);
    app.assert_invariants().await;
}

/// Orders queue behind two batches (every slot of the order lane) stuck on keys another
/// transaction holds. Six orders whose keys are held arrive first, two plain orders later;
/// they go as one batch, whose claim times out, and are placed again one by one. The held-key
/// orders use up their time waiting; the plain orders, whose deadlines are later, are still
/// placed. (Before: the one-by-one placing ran on the batch's earliest deadline, spent by the
/// first orders, and the plain orders got 503.)
#[tokio::test]
async fn orders_placed_again_one_by_one_each_run_on_their_own_deadline() {
    let app = spawn_app_with(|config| {
        config.order_batch_max = 64;
        config.statement_timeout = Duration::from_secs(2);
        config.request_timeout = Duration::from_secs(6);
    })
    .await;
    assert_eq!(order_api::db::Lanes::for_pool(app_pool_size()).orders, 2, "two order batches at a time");
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held_keys = ["held-1", "held-2", "held-3", "held-4", "held-5", "held-6"];
    for key in ["blocker-1", "blocker-2"].iter().chain(&held_keys) {
        holder
            .execute("INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (1, $1, 'x')", &[&key])
            .await
            .unwrap();
    }
    let send = |key: Option<&str>| app.spawn_order(key, order_body(1, 2, 1));
    // Both slots: a batch of one each, waiting on its key until the lock timeout (2 s).
    let first = send(Some("blocker-1"));
    app.wait_for_lock_waiters(1).await;
    let blockers = [first, send(Some("blocker-2"))];
    app.wait_for_lock_waiters(2).await;
    let held: Vec<_> = held_keys.into_iter().map(|key| send(Some(key))).collect();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let plain = [send(None), send(None)];

    for request in blockers {
        request.await.unwrap().assert_error(409, "IDEMPOTENCY_IN_PROGRESS");
    }
    for request in held {
        let reply = request.await.unwrap();
        assert!(matches!(reply.status, 409 | 503), "{}", reply.text);
    }
    for request in plain {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(app.count("orders").await, 2);
    app.assert_invariants().await;
}

/// The default `DB_POOL_SIZE`.
fn app_pool_size() -> usize {
    order_api::config::Config::default().pool_size
}

/// The database up, but the path to it slow to connect: a connect cut short by the request's
/// own deadline says so (503, "ran out of time"), and does not make the service believe the
/// database is down. (Before: it answered "the database cannot be reached" and armed the
/// connect backoff, so the next requests failed fast although the database was fine.)
#[tokio::test]
async fn a_connect_cut_short_by_the_deadline_does_not_mark_the_database_down() {
    let proxy = HangingProxy::start(common::database_address()).await;
    let app = spawn_app_with(|config| {
        config.database_url = common::url_through(&config.database_url, proxy.port);
        config.request_timeout = Duration::from_millis(800);
        config.connect_timeout = Duration::from_secs(30);
    })
    .await;
    proxy.hang_new_connections(true);
    for _ in 0..3 {
        let reply = app.post_order(&order_body(1, 2, 1)).await;
        reply.assert_error(503, "SERVICE_UNAVAILABLE");
        let reason = reply.json["error"].as_str().unwrap();
        assert!(reason.contains("ran out of time"), "{reason}");
    }
    proxy.hang_new_connections(false);
    let reply = app.post_order(&order_body(1, 2, 1)).await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    app.assert_invariants().await;
}

/// A connection whose path hangs while statements are prepared on it (the first keyed order
/// on a connection prepares the key statements) is given up at the request's deadline: the
/// order gets 503 (nothing was executed), and the batch lane it held is free for the next
/// orders. (Before: preparing was outside the deadline, so the lane's only slot stayed held for
/// as long as the connection hung, and every later order got 503 after waiting for it.)
#[tokio::test]
async fn preparing_statements_on_a_hung_connection_ends_at_the_deadline() {
    let proxy = HangingProxy::start(common::database_address()).await;
    let app = spawn_app_with(|config| {
        config.database_url = common::url_through(&config.database_url, proxy.port);
        config.order_batch_max = 64;
        config.pool_size = 4;
        config.request_timeout = Duration::from_millis(1_500);
    })
    .await;
    // The pool's connections open, with the plain order's statements prepared.
    assert_eq!(app.post_order(&order_body(1, 2, 1)).await.status, 201);
    proxy.hang_existing();
    let keyed = app.post_order_with_key("first-key", &order_body(1, 2, 1)).await;
    keyed.assert_error(503, "SERVICE_UNAVAILABLE");

    // Each later order is answered by its deadline; once the hung connections left in the
    // pool (at most its size) are given up, a new one carries them.
    let body: Value = json!({"userId": 1, "items": [{"productId": 3, "quantity": 1}]});
    let mut placed = None;
    for attempt in 0..5 {
        let reply = app.post_order_with_key("second-key", &body).await;
        match reply.status {
            201 => {
                placed = Some(attempt);
                break;
            }
            _ => reply.assert_error(503, "SERVICE_UNAVAILABLE"),
        }
    }
    assert!(placed.is_some(), "no order was placed after the hung connection was given up");
    assert_eq!(app.count("orders").await, 2);
    app.assert_invariants().await;
}
