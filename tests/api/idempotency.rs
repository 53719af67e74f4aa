//! `Idempotency-Key` on order creation: retries replay the stored outcome byte for byte and
//! create nothing; a reused key with another request is 422; simultaneous duplicates never
//! make a second order; keys are per user and expire.

use std::time::Duration;

use futures::future::join_all;

use crate::common::{self, Reply, order_body, spawn_app, spawn_app_with, wait};

/// A retry with the same key and body gets the original 201 and body byte for byte, marked
/// as a replay, and no second order is made.
#[tokio::test]
async fn a_retry_replays_the_original_response_and_creates_nothing() {
    let app = spawn_app().await;
    let first = app.post_order_with_key("key-1", &order_body(1, 2, 3)).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    // The same request, written differently: other spacing, key order and an ignored field.
    let same = r#"{ "items": [ {"quantity": 3, "productId": 2} ], "userId": 1, "note": "retry" }"#;
    let retry = app
        .http
        .post(app.url("/api/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", "key-1")
        .body(same)
        .send()
        .await
        .unwrap();
    let retry = Reply::read(retry).await;
    assert_eq!((retry.status, retry.text.as_str()), (201, first.text.as_str()));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.stock(2).await, 47);
    app.assert_invariants().await;
}

/// The same key with a different request is 422 IDEMPOTENCY_KEY_REUSED and changes nothing.
#[tokio::test]
async fn a_reused_key_with_another_request_is_422() {
    let app = spawn_app().await;
    assert_eq!(app.post_order_with_key("k", &order_body(1, 2, 1)).await.status, 201);
    let before = app.snapshot().await;
    app.post_order_with_key("k", &order_body(1, 2, 2)).await.assert_error(422, "IDEMPOTENCY_KEY_REUSED");
    app.post_order_with_key("k", &order_body(1, 3, 1)).await.assert_error(422, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.snapshot().await, before);
}

/// Keys are scoped per user: two users may use the same key for their own orders.
#[tokio::test]
async fn keys_are_scoped_per_user() {
    let app = spawn_app().await;
    let one = app.post_order_with_key("shared", &order_body(1, 2, 1)).await;
    let two = app.post_order_with_key("shared", &order_body(2, 2, 1)).await;
    assert_eq!((one.status, two.status), (201, 201));
    assert_ne!(one.json["orderId"], two.json["orderId"]);
    assert_eq!(app.count("orders").await, 2);
}

/// A rejection is an outcome too: replayed unchanged even after the stock came back.
#[tokio::test]
async fn a_rejection_is_replayed_even_after_things_change() {
    let app = spawn_app().await;
    let first = app.post_order_with_key("too-many", &order_body(1, 4, 6)).await;
    first.assert_error(400, "INSUFFICIENT_STOCK");
    app.restock(4, 10).await;
    let retry = app.post_order_with_key("too-many", &order_body(1, 4, 6)).await;
    assert_eq!((retry.status, retry.text.as_str()), (400, first.text.as_str()));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.count("orders").await, 0);
    // A new key is a new attempt, and now succeeds.
    assert_eq!(app.post_order_with_key("too-many-2", &order_body(1, 4, 6)).await.status, 201);
    app.assert_invariants().await;
}

/// Ten simultaneous requests with one key make exactly one order; every one of them gets
/// the same 201 body (the duplicates wait for the first and replay it).
#[tokio::test]
async fn ten_simultaneous_retries_make_one_order() {
    let app = spawn_app().await;
    let body = order_body(1, 1, 2);
    let replies = join_all((0..10).map(|_| app.post_order_with_key("burst", &body))).await;
    let created: Vec<&Reply> = replies.iter().filter(|r| r.status == 201).collect();
    assert_eq!(created.len(), 10, "{:?}", replies.iter().map(|r| (r.status, &r.text)).collect::<Vec<_>>());
    assert!(created.iter().all(|r| r.text == created[0].text));
    assert_eq!(replies.iter().filter(|r| r.header("idempotent-replayed").is_some()).count(), 9);
    assert_eq!(app.count("orders").await, 1);
    assert_eq!(app.stock(1).await, 8);
    app.assert_invariants().await;
}

/// A duplicate that waits past the lock timeout for a first request still running gets 409
/// IDEMPOTENCY_IN_PROGRESS with Retry-After, never a second order.
#[tokio::test]
async fn a_duplicate_waiting_too_long_gets_409_in_progress() {
    let app = spawn_app_with(|config| config.statement_timeout = Duration::from_millis(400)).await;
    // Hold the key as a running first request would: claimed in an open transaction.
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (1, 'slow', 'x')", &[])
        .await
        .unwrap();
    let reply = app.post_order_with_key("slow", &order_body(1, 2, 1)).await;
    reply.assert_error(409, "IDEMPOTENCY_IN_PROGRESS");
    assert_eq!(reply.header("retry-after"), Some("1"));
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(app.count("orders").await, 0);
    // With the first gone (rolled back), the key is free again.
    assert_eq!(app.post_order_with_key("slow", &order_body(1, 2, 1)).await.status, 201);
}

/// A 5xx is not stored: the key goes back with the rolled-back transaction, so a retry after
/// the fault is a fresh attempt.
#[tokio::test]
async fn a_server_error_is_not_stored_and_the_retry_runs_again() {
    let app = spawn_app().await;
    app.fail_payments().await;
    app.post_order_with_key("flaky", &order_body(1, 2, 1)).await.assert_error(500, "INTERNAL");
    assert_eq!(app.count("idempotency_keys").await, 0);
    app.allow_payments().await;
    let retry = app.post_order_with_key("flaky", &order_body(1, 2, 1)).await;
    assert_eq!(retry.status, 201);
    assert!(retry.header("idempotent-replayed").is_none());
}

/// Malformed keys are 400 and create nothing.
#[tokio::test]
async fn malformed_keys_are_invalid_requests() {
    let app = spawn_app().await;
    for key in ["", "has space", &"k".repeat(256)] {
        app.post_order_with_key(key, &order_body(1, 2, 1)).await.assert_error(400, "INVALID_REQUEST");
    }
    assert_eq!(app.count("orders").await, 0);
}

/// Keys expire after the retention: an expired key is free for a new request, and the purge
/// deletes expired keys.
#[tokio::test]
async fn keys_expire_after_the_retention_and_are_purged() {
    let app = spawn_app_with(|config| config.idempotency_retention = Duration::from_secs(1)).await;
    assert_eq!(app.post_order_with_key("old", &order_body(1, 2, 1)).await.status, 201);
    assert_eq!(app.post_order_with_key("older", &order_body(1, 2, 1)).await.status, 201);
    app.db.execute("UPDATE idempotency_keys SET created_at = created_at - interval '2 seconds'", &[]).await.unwrap();

    let reused = app.post_order_with_key("old", &order_body(1, 3, 1)).await;
    assert_eq!(reused.status, 201, "an expired key is a new key: {}", reused.text);
    assert_eq!(app.count("orders").await, 3);

    let pool = order_api::db::Pool::new(app.database_url.parse().unwrap(), pool_settings());
    let purged = order_api::db::idempotency::purge_expired(&pool, Duration::from_secs(1)).await.unwrap();
    assert_eq!(purged, 1, "only the expired 'older' key remains to purge");
    let keys: Vec<String> =
        app.db.query("SELECT key FROM idempotency_keys", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(keys, vec!["old".to_owned()]);
}

/// Keys are kept 24 hours by default, and the background purge deletes the older ones on its
/// own: with the default retention and a purge every 100 ms, a key 23 h 59 min old is still
/// there and replayed after a purge round has deleted a key 24 h 1 min old; the expired key's
/// request, sent again, is a new order.
#[tokio::test]
async fn keys_are_kept_24_hours_by_default_and_the_background_purge_deletes_older_ones() {
    let app = spawn_app_with(|config| config.purge_interval = Duration::from_millis(100)).await;
    assert_eq!(order_api::config::Config::default().idempotency_retention, Duration::from_secs(24 * 3600));
    let kept = app.post_order_with_key("kept", &order_body(1, 2, 1)).await;
    assert_eq!(kept.status, 201, "{}", kept.text);
    assert_eq!(app.post_order_with_key("expired", &order_body(1, 2, 1)).await.status, 201);
    app.db
        .batch_execute(
            "UPDATE idempotency_keys SET created_at = created_at - interval '23 hours 59 minutes' WHERE key = 'kept';
             UPDATE idempotency_keys SET created_at = created_at - interval '24 hours 1 minute' WHERE key = 'expired';",
        )
        .await
        .unwrap();

    let keys = || async {
        let rows = app.db.query("SELECT key FROM idempotency_keys ORDER BY key", &[]).await.unwrap();
        rows.iter().map(|row| row.get(0)).collect::<Vec<String>>()
    };
    wait::until("the background purge deleting the key past 24 h", wait::PATIENCE, || async {
        !keys().await.contains(&"expired".to_owned())
    })
    .await;
    assert_eq!(keys().await, ["kept"], "a key younger than 24 h is kept");

    let replayed = app.post_order_with_key("kept", &order_body(1, 2, 1)).await;
    assert_eq!((replayed.status, replayed.text.as_str()), (201, kept.text.as_str()));
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    let again = app.post_order_with_key("expired", &order_body(1, 2, 1)).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert!(again.header("idempotent-replayed").is_none(), "the purged key is a new key");
    assert_eq!(app.count("orders").await, 3);
}

fn pool_settings() -> order_api::db::PoolSettings {
    order_api::db::PoolSettings {
        max_size: 1,
        acquire_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(1),
        unnamed_statements: false,
        max_lifetime: Duration::from_secs(60),
    }
}

/// A key holds the id of its order from the claim on (migration 0008): a placed order's key
/// names that order, a refused order's key holds its answer and no order, and a keyed order
/// deferred past a product an operator holds (its first claim given back, claimed again in the
/// contended lane) ends with one key naming the one order it made.
#[tokio::test]
async fn each_key_names_the_order_it_made_or_holds_its_refusal() {
    let app = spawn_app_with(|config| config.order_batch_max = 64).await;
    let key_row = |key: &'static str| {
        let db = &app.db;
        async move {
            let row = db
                .query_one(
                    "SELECT order_id, response_status FROM idempotency_keys WHERE user_id = 1 AND key = $1",
                    &[&key],
                )
                .await
                .unwrap();
            (row.get::<_, Option<i64>>(0), row.get::<_, Option<i16>>(1))
        }
    };

    let placed = app.post_order_with_key("placed", &order_body(1, 2, 1)).await;
    assert_eq!(placed.status, 201, "{}", placed.text);
    assert_eq!(key_row("placed").await, (Some(placed.json["orderId"].as_i64().unwrap()), None));

    let refused = app.post_order_with_key("refused", &order_body(1, 2, 1_000)).await;
    refused.assert_error(400, "INSUFFICIENT_STOCK");
    assert_eq!(key_row("refused").await, (None, Some(400)));

    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("BEGIN; SELECT 1 FROM products WHERE id = 1 FOR UPDATE").await.unwrap();
    let deferred = app.spawn_order(Some("deferred"), order_body(1, 1, 1));
    app.wait_for_a_lock_waiter_older_than(Duration::from_secs(1)).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    let deferred = deferred.await.unwrap();
    assert_eq!(deferred.status, 201, "{}", deferred.text);
    assert_eq!(key_row("deferred").await, (Some(deferred.json["orderId"].as_i64().unwrap()), None));

    assert_eq!(app.count("idempotency_keys").await, 3);
    assert_eq!(app.count("orders").await, 2);
    let replay = app.post_order_with_key("deferred", &order_body(1, 1, 1)).await;
    assert_eq!((replay.status, replay.text.as_str()), (201, deferred.text.as_str()));
    app.assert_invariants().await;
}

/// A key holds its order's id (no foreign key since sql/0011): `order-api audit` reports a key
/// naming an order that does not exist.
#[tokio::test]
async fn the_audit_finds_a_key_naming_no_order() {
    let app = spawn_app().await;
    let placed = app.post_order_with_key("kept", &order_body(1, 2, 1)).await;
    assert_eq!(placed.status, 201, "{}", placed.text);
    app.assert_invariants().await;
    let order: i64 =
        app.db.query_one("SELECT order_id FROM idempotency_keys WHERE key = 'kept'", &[]).await.unwrap().get(0);
    let nothing = order + 1_000;
    app.db.execute("UPDATE idempotency_keys SET order_id = $1 WHERE key = 'kept'", &[&nothing]).await.unwrap();
    let mut client = common::connect(&app.database_url).await;
    let audit = order_api::db::audit::audit(&mut client).await.unwrap();
    assert_eq!(audit.keys_of_nothing.first_order_ids, [nothing], "{audit:#?}");
    assert_eq!(audit.violations().len(), 1, "{:?}", audit.violations());
}
