//! Commit batching (`ORDER_BATCH_MAX`, issue 14): orders that arrive while a batch is being
//! placed go into the next one, one transaction for all, each order on its own in
//! arrival order. To make batches form for sure, each test first holds the product's row lock
//! from a connection of its own: the batches in flight wait on it, the other orders queue, and
//! when the lock is released the queue goes as one batch. Orders of one transaction share its
//! `now()`, so `created_at` shows which orders were placed together.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;

use crate::common::{self, Reply, TestApp, private_pg::PrivatePostgres, raw, spawn_app_at, spawn_app_with};

async fn batching_app() -> TestApp {
    spawn_app_with(|config| config.order_batch_max = 64).await
}

/// Holds `product_id`'s row lock until the returned client commits.
async fn hold_product(app: &TestApp, product_id: i32) -> tokio_postgres::Client {
    let client = common::connect(&app.database_url).await;
    client.batch_execute("BEGIN").await.unwrap();
    client.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", &[&product_id]).await.unwrap();
    client
}

/// `orders` (each with its Idempotency-Key or none) sent at once while `product_id` is
/// locked; released once a batch waits on it and the server has read every order. The
/// answers, in the order of `orders`.
async fn keyed_orders_behind_a_lock(
    app: &TestApp,
    product_id: i32,
    orders: Vec<(Option<&str>, serde_json::Value)>,
) -> Vec<Reply> {
    let holder = hold_product(app, product_id).await;
    let requests: Vec<_> = orders.iter().map(|(key, body)| raw::Request::order(*key, body)).collect();
    let in_flight = app.send_all(&requests).await;
    app.wait_for_lock_waiters(1).await;
    in_flight.read_by_the_server().await;
    holder.batch_execute("COMMIT").await.unwrap();
    in_flight.replies().await
}

/// `orders` sent at once while both order lanes are held (`TestApp::hold_order_lanes`): they
/// queue, and go together once the lanes are released. The answers, in the order of `orders`.
async fn keyed_orders_queued_together(app: &TestApp, orders: Vec<(Option<&str>, serde_json::Value)>) -> Vec<Reply> {
    let lanes = app.hold_order_lanes().await;
    let requests: Vec<_> = orders.iter().map(|(key, body)| raw::Request::order(*key, body)).collect();
    let in_flight = app.send_all(&requests).await;
    in_flight.read_by_the_server().await;
    lanes.release().await;
    in_flight.replies().await
}

/// The orders of `product_id`, and the transactions that wrote them (`created_at` is the
/// transaction's start).
async fn transactions_of_orders(app: &TestApp, product_id: i32) -> (i64, i64) {
    let row = app
        .db
        .query_one(
            "SELECT count(*), count(DISTINCT created_at) FROM orders o
              WHERE EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id AND i.product_id = $1)",
            &[&product_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn accepted_and_refused_orders_for_one_product_share_a_batch_in_arrival_order() {
    let app = batching_app().await;
    // Product 4 has 5 in stock: 12 orders of one, so 5 placed and 7 refused.
    let orders = (0..12).map(|_| (None, json!({"userId": 1, "items": [{"productId": 4, "quantity": 1}]}))).collect();
    let replies = keyed_orders_queued_together(&app, orders).await;
    let placed = replies.iter().filter(|reply| reply.status == 201).count();
    for reply in replies.iter().filter(|reply| reply.status != 201) {
        reply.assert_error(400, "INSUFFICIENT_STOCK");
        assert_eq!(reply.json["available"], 0, "refused only once the stock was gone: {}", reply.text);
    }
    assert_eq!(placed, 5);
    assert_eq!(app.stock(4).await, 0);
    let (orders, transactions) = transactions_of_orders(&app, 4).await;
    assert_eq!(orders, 5);
    assert!(transactions < orders, "no two orders shared a transaction ({transactions} for {orders})");
    app.assert_invariants().await;
}

/// One order of the batch fails for a reason of its own (a trigger refuses its payment, for
/// its amount only): the batch's writing statement fails, the batch is placed again order by
/// order, and that order alone is answered 500 and leaves nothing (its key neither); the others
/// are placed, keyed or not.
#[tokio::test]
async fn a_fault_in_one_order_of_a_batch_fails_that_order_alone() {
    let app = batching_app().await;
    app.db
        .batch_execute(
            "CREATE FUNCTION fail_one_payment() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN IF NEW.amount = 3 * 500.00 THEN RAISE EXCEPTION 'injected payment failure'; END IF;
                    RETURN NEW; END $$;
             CREATE TRIGGER fail_one_payment BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION fail_one_payment();",
        )
        .await
        .unwrap();
    let price: String = app.db.query_one("SELECT price::text FROM products WHERE id = 2", &[]).await.unwrap().get(0);
    assert_eq!(price, "500.00", "the seed's price of product 2");
    // Every other order has a key, the failing one too.
    let keys = ["k0", "", "k2", "", "k4", "k5", "", "k7", "", "k9"];
    let mut orders: Vec<_> = keys
        .iter()
        .map(|key| {
            ((!key.is_empty()).then_some(*key), json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]}))
        })
        .collect();
    orders[5].1 = json!({"userId": 1, "items": [{"productId": 2, "quantity": 3}]});
    let replies = keyed_orders_behind_a_lock(&app, 2, orders).await;
    replies[5].assert_error(500, "INTERNAL");
    for (i, reply) in replies.iter().enumerate().filter(|(i, _)| *i != 5) {
        assert_eq!(reply.status, 201, "order {i}: {}", reply.text);
    }
    assert_eq!(app.stock(2).await, 50 - 9);
    assert_eq!(app.count("orders").await, 9);
    // The placed orders' keys hold their orders; the failed order's key went with its rollback.
    let stored: Vec<String> = app
        .db
        .query("SELECT key FROM idempotency_keys WHERE order_id IS NOT NULL ORDER BY key", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(stored, ["k0", "k2", "k4", "k7", "k9"]);
    assert_eq!(app.count("idempotency_keys").await, 5);
    app.db.batch_execute("DROP TRIGGER fail_one_payment ON payments").await.unwrap();
    app.assert_invariants().await;
}

/// Keyed and unkeyed orders in one batch, each answered on its own: a key's first request is
/// placed (or refused) and its outcome stored in the batch's transaction; the same key twice
/// in the batch places one order, the second replaying the first's 201; a key stored earlier
/// is replayed; a key reused for another request is 422; a refusal is stored and replayed
/// even after a restock.
#[tokio::test]
async fn keyed_orders_join_batches_and_each_key_keeps_its_own_outcome() {
    let app = batching_app().await;
    let one = |product_id: i32, quantity: i32| json!({"userId": 1, "items": [{"productId": product_id, "quantity": quantity}]});
    let earlier = app.post_order_with_key("earlier", &one(3, 1)).await;
    assert_eq!(earlier.status, 201);

    // Product 4 has 5 in stock.
    let orders = vec![
        (Some("k1"), one(4, 1)),
        (None, one(4, 1)),
        (Some("k2"), one(4, 1)),
        (Some("k1"), one(4, 1)),
        (Some("earlier"), one(3, 1)),
        (Some("too-many"), one(4, 10)),
        (Some("k2"), one(4, 2)),
        (None, one(4, 1)),
        (None, one(4, 1)),
    ];
    let replies = keyed_orders_queued_together(&app, orders).await;
    let replayed = |reply: &Reply| reply.header("idempotent-replayed").is_some();

    // k1 twice: one order, the same 201 twice, one of them a replay.
    assert_eq!((replies[0].status, replies[3].status), (201, 201), "{} / {}", replies[0].text, replies[3].text);
    assert_eq!(replies[0].text, replies[3].text);
    assert_eq!(replayed(&replies[0]) as u8 + replayed(&replies[3]) as u8, 1);
    // The key stored earlier: its 201 again, no new order.
    assert_eq!((replies[4].status, replies[4].text.as_str()), (201, earlier.text.as_str()));
    assert!(replayed(&replies[4]));
    // k2 for two different requests: whichever came second is refused.
    let k2 = [&replies[2], &replies[6]];
    assert_eq!(k2.iter().filter(|r| r.status == 422).count(), 1, "{} / {}", k2[0].text, k2[1].text);
    k2.iter().find(|r| r.status == 422).unwrap().assert_error(422, "IDEMPOTENCY_KEY_REUSED");
    replies[5].assert_error(400, "INSUFFICIENT_STOCK");

    // Every order that was placed now: 5 units of product 4 at most, never beyond the stock.
    let (placed_now, transactions) = transactions_of_orders(&app, 4).await;
    let new_201s = replies.iter().filter(|r| r.status == 201 && !replayed(r)).count() as i64;
    assert_eq!(placed_now, new_201s);
    let orders = placed_now;
    assert!(transactions < orders, "no two orders shared a transaction ({transactions} for {orders})");

    // Each key holds its first outcome (the order it created, or the refusal's status), and
    // answers it again.
    let stored: Vec<(String, Option<i64>, Option<i16>)> = app
        .db
        .query(
            "SELECT key, order_id, response_status FROM idempotency_keys
              WHERE key NOT LIKE 'lane-blocker-%' ORDER BY key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let outcomes: Vec<(&str, Option<i64>, Option<i16>)> =
        stored.iter().map(|(key, order, status)| (key.as_str(), *order, *status)).collect();
    assert_eq!(outcomes[0], ("earlier", earlier.json["orderId"].as_i64(), None));
    assert_eq!(outcomes[1], ("k1", replies[0].json["orderId"].as_i64(), None));
    assert_eq!(outcomes[2].0, "k2");
    assert_eq!(outcomes[3], ("too-many", None, Some(400)));
    app.restock(4, 100).await;
    let again = app.post_order_with_key("too-many", &one(4, 10)).await;
    again.assert_error(400, "INSUFFICIENT_STOCK");
    assert_eq!((again.text.as_str(), replayed(&again)), (replies[5].text.as_str(), true));
    let k1_again = app.post_order_with_key("k1", &one(4, 1)).await;
    assert_eq!((k1_again.text.as_str(), replayed(&k1_again)), (replies[0].text.as_str(), true));
    app.assert_invariants().await;
}

/// A key held by a request elsewhere (here: claimed in a transaction the test keeps open)
/// makes the batch's claim wait; past the lock timeout the batch is placed order by order, so
/// the other orders of the batch are placed and only the held key's order gets 409
/// IDEMPOTENCY_IN_PROGRESS.
#[tokio::test]
async fn a_key_held_elsewhere_holds_back_only_its_own_order() {
    let app = spawn_app_with(|config| {
        config.order_batch_max = 64;
        config.statement_timeout = Duration::from_millis(400);
    })
    .await;
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (1, 'held', 'x')", &[])
        .await
        .unwrap();
    let one = |key: Option<&'static str>| (key, json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]}));
    // Behind the product lock, so that the held key's order and the others form one batch.
    let orders = vec![one(Some("a")), one(None), one(Some("held")), one(Some("b")), one(None), one(None)];
    let started = Instant::now();
    let replies = keyed_orders_behind_a_lock(&app, 2, orders).await;
    replies[2].assert_error(409, "IDEMPOTENCY_IN_PROGRESS");
    for (i, reply) in replies.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(reply.status, 201, "order {i}: {}", reply.text);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(app.count("orders").await, 5);
    assert_eq!(app.count("idempotency_keys").await, 2);
    // The holder gone, the key is free.
    assert_eq!(app.post_order_with_key("held", &one(None).1).await.status, 201);
    app.assert_invariants().await;
}

/// Batches racing cancellations and restocks of the same products: every answer holds, and
/// stock + live ordered quantity = opening stock + restocks (the audit's ledger check).
#[tokio::test]
async fn cancels_and_restocks_racing_batches_keep_every_invariant() {
    let app = batching_app().await;
    let orders = (0..60).map(|i| {
        let body = json!({"userId": 1, "items": [{"productId": 1 + i % 4, "quantity": 1 + i % 2}]});
        let app = &app;
        async move {
            let reply = app.post_order(&body).await;
            if reply.status == 201 && i % 3 == 0 {
                let id = reply.json["orderId"].as_i64().unwrap();
                assert_eq!(app.cancel(id).await.status, 200);
            }
            assert!(matches!(reply.status, 201 | 400), "{}", reply.text);
        }
    });
    let restocks = (0..8).map(|i| {
        let app = &app;
        async move { app.restock(1 + i % 4, 2).await }
    });
    tokio::join!(join_all(orders), join_all(restocks));
    app.assert_invariants().await;
}

/// A batch cut by a PostgreSQL crash: the batch's orders wait on a product lock inside
/// PostgreSQL (so none of them can have committed) when the server is SIGKILLed. Every order
/// gets an answer; the cut ones are 503 or 504 OUTCOME_UNKNOWN, never 201; each 201 is in the
/// database, and no more orders are there than were acknowledged plus those answered 504 (a
/// 503 promises nothing was written).
#[tokio::test]
async fn a_batch_cut_by_a_postgresql_crash_answers_every_order_honestly() {
    let mut pg = PrivatePostgres::start(&[]).await;
    pg.execute("CREATE DATABASE shop").await;
    let config = order_api::config::Config {
        database_url: pg.url("shop"),
        port: 0,
        order_batch_max: 64,
        request_timeout: Duration::from_secs(5),
        ..order_api::config::Config::default()
    };
    order_api::prepare_database(&config, true).await.expect("migrate and seed");
    let mut app = spawn_app_at(config).await;

    let holder = hold_product(&app, 2).await;
    let body = json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]});
    let requests: Vec<_> = (0..10).map(|_| raw::Request::order(None, &body)).collect();
    let in_flight = app.send_all(&requests).await;
    app.wait_for_lock_waiters(1).await;
    in_flight.read_by_the_server().await;
    // The batch in flight waits on the lock: the crash cuts it before its commit.
    pg.kill();
    drop(holder);
    pg.restart(&[]).await;
    let replies = in_flight.replies().await;
    let cut = replies.iter().filter(|r| r.status != 201).count();
    assert!(cut >= 1, "the crash cut no order: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    let acknowledged: Vec<i64> =
        replies.iter().filter(|r| r.status == 201).map(|r| r.json["orderId"].as_i64().unwrap()).collect();
    let unknown = replies.iter().filter(|r| r.status == 504).count();
    for reply in replies.iter().filter(|r| r.status != 201) {
        assert!(
            matches!(
                (reply.status, reply.json["code"].as_str()),
                (503, Some("SERVICE_UNAVAILABLE")) | (504, Some("OUTCOME_UNKNOWN"))
            ),
            "{} {}",
            reply.status,
            reply.text
        );
    }
    app.db = common::connect(&pg.url("shop")).await;
    for id in &acknowledged {
        assert_eq!(
            app.db.query_one("SELECT count(*) FROM orders WHERE id = $1", &[id]).await.unwrap().get::<_, i64>(0),
            1
        );
    }
    let in_database = app.count("orders").await as usize;
    assert!(
        in_database >= acknowledged.len() && in_database <= acknowledged.len() + unknown,
        "{in_database} orders for {} acknowledged and {unknown} unknown",
        acknowledged.len()
    );
    app.assert_invariants().await;
}
