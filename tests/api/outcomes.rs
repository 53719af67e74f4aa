//! Honest outcomes under faults (CONTRACT part 4, issue 13): 503 `SERVICE_UNAVAILABLE` only when
//! nothing was written; when the service cannot know whether a write committed, or knows it
//! committed without the promised replication, 504 `OUTCOME_UNKNOWN`; and a client that
//! retries with its `Idempotency-Key` until a definite answer ends with exactly one order.
//! Every answer is compared with what the database holds.

use std::time::{Duration, Instant};

use order_api::config::Config;
use serde_json::json;

use crate::common::{self, TestApp, private_pg::PrivatePostgres, spawn_app_at, spawn_app_with, wait};

/// A private server with a migrated, seeded `shop` database, and the service on it.
async fn app_on_private(pg: &PrivatePostgres, request_timeout: Duration) -> TestApp {
    app_on_private_with(pg, request_timeout, Config::default().pool_size).await
}

async fn app_on_private_with(pg: &PrivatePostgres, request_timeout: Duration, pool_size: usize) -> TestApp {
    pg.execute("CREATE DATABASE shop").await;
    let config = Config { database_url: pg.url("shop"), port: 0, request_timeout, pool_size, ..Config::default() };
    order_api::prepare_database(&config, true).await.expect("migrate and seed");
    spawn_app_at(config).await
}

fn order() -> serde_json::Value {
    json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]})
}

/// PostgreSQL's own reproduction of a lost standby: `synchronous_standby_names` names one that
/// never connects, so every commit waits; the request deadline cancels the wait and PostgreSQL
/// commits locally with a warning. That order is not durable as promised: 504, never 201.
/// Retried with its key while the standby is away, the replay cannot promise more (504 again);
/// once it is back, the stored order is replayed (one order for the key).
#[tokio::test]
async fn a_commit_whose_synchronous_replication_wait_is_cancelled_is_outcome_unknown() {
    let pg = PrivatePostgres::start(&[]).await;
    let app = app_on_private(&pg, Duration::from_millis(1500)).await;
    pg.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby_that_never_connects'").await;
    pg.execute("SELECT pg_reload_conf()").await;
    wait::for_setting(&pg.url("shop"), "synchronous_standby_names", "standby_that_never_connects").await;

    let started = Instant::now();
    let reply = app.post_order(&order()).await;
    reply.assert_error(504, "OUTCOME_UNKNOWN");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // The commit waited for the standby until shortly before the deadline (a fifth of the
    // 1.5 s is kept for the cancel): not refused at once. (A lower bound only: a loaded
    // machine makes every step slower, never faster. That the answer comes by the deadline
    // is for `make chaos` to time.)
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1000), "answered in {took:?}, before the commit could have waited");
    // It did commit here (and nowhere else): the answer did not claim otherwise.
    assert_eq!(app.count("orders").await, 1);

    let reply = app.post_order_with_key("sync-rep-1", &order()).await;
    reply.assert_error(504, "OUTCOME_UNKNOWN");
    // The retry finds the stored 201, but while the standby is still away it cannot promise
    // more than the first answer did: the replay's own commit waits for the standby too.
    let retried = app.post_order_with_key("sync-rep-1", &order()).await;
    retried.assert_error(504, "OUTCOME_UNKNOWN");
    assert_eq!(app.count("orders").await, 2, "the retry placed no second order");
    let keyed: i64 =
        app.db.query_one("SELECT count(*) FROM idempotency_keys WHERE key = 'sync-rep-1'", &[]).await.unwrap().get(0);
    assert_eq!((keyed, app.count("orders").await), (1, 2), "one order for the key");
    assert_eq!(app.stock(2).await, 48);

    // The standby requirement lifted (as if it were back): the retry is acknowledged with the
    // stored order, no new one, and commits are acknowledged again.
    pg.execute("ALTER SYSTEM RESET synchronous_standby_names").await;
    pg.execute("SELECT pg_reload_conf()").await;
    wait::for_setting(&pg.url("shop"), "synchronous_standby_names", "").await;
    let replayed = app.post_order_with_key("sync-rep-1", &order()).await;
    assert_eq!(replayed.status, 201, "{}", replayed.text);
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"), "the stored order, not a new one");
    assert_eq!(app.count("orders").await, 2);
    assert_eq!(app.post_order(&order()).await.status, 201);
    app.assert_invariants().await;
}

/// The service's session waiting inside PostgreSQL: on a row lock the test holds
/// (`wait_event_type` 'Lock') or in a `pg_sleep` of a test trigger ('Timeout').
async fn waiting_backend(app: &TestApp, wait_event_type: &str) -> i32 {
    let what = format!("the order waiting inside PostgreSQL ({wait_event_type})");
    wait::until_some(&what, wait::PATIENCE, || async {
        let row = app
            .db
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'order-api' AND wait_event_type = $2",
                &[&app.database_name, &wait_event_type],
            )
            .await
            .unwrap();
        row.map(|row| row.get(0))
    })
    .await
}

/// An order sent in a task of its own, with or without a key.
fn send_order(app: &TestApp, key: Option<&'static str>) -> tokio::task::JoinHandle<common::Reply> {
    let (http, url) = (app.http.clone(), app.url("/api/orders"));
    tokio::spawn(async move {
        let mut request = http.post(url).json(&order());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        common::Reply::read(request.send().await.unwrap()).await
    })
}

/// The connection dies while an order is inside PostgreSQL (one order per transaction,
/// `ORDER_BATCH_MAX=1`, so the service's session is the order's). The answer says exactly what
/// the service can know:
/// - waiting on a product's lock, or claiming its key (held there by a slow trigger), before
///   any COMMIT was sent: nothing can have been written, 503, keyed or not;
/// - in the round trip that carries the COMMIT (held there by a slow trigger on the payment):
///   504, keyed or not. A keyed order's key holds the order's id from its claim, and both
///   commit together.
///
/// Each answer is checked against the database, and the keyed retries place one order each.
#[tokio::test]
async fn a_connection_lost_mid_order_is_503_before_the_commit_and_504_after() {
    let app = spawn_app_with(|config| config.order_batch_max = 1).await;
    for key in [None, Some("lost-1")] {
        let blocker = common::connect(&app.database_url).await;
        blocker.batch_execute("BEGIN; SELECT * FROM products WHERE id = 2 FOR UPDATE").await.unwrap();
        let request = send_order(&app, key);
        let pid = waiting_backend(&app, "Lock").await;
        app.db.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        request.await.unwrap().assert_error(503, "SERVICE_UNAVAILABLE");
        blocker.batch_execute("ROLLBACK").await.unwrap();
    }

    app.db
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$;",
        )
        .await
        .unwrap();
    let slow_payments = "CREATE TRIGGER slow BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION slow()";
    let slow_keys = "CREATE TRIGGER slow BEFORE INSERT ON idempotency_keys FOR EACH ROW EXECUTE FUNCTION slow()";
    let cases = [
        (slow_payments, None, 504, "OUTCOME_UNKNOWN"),
        (slow_payments, Some("lost-2"), 504, "OUTCOME_UNKNOWN"),
        (slow_keys, Some("lost-3"), 503, "SERVICE_UNAVAILABLE"),
    ];
    for (trigger, key, status, code) in cases {
        app.db.batch_execute(trigger).await.unwrap();
        let request = send_order(&app, key);
        let pid = waiting_backend(&app, "Timeout").await;
        app.db.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        request.await.unwrap().assert_error(status, code);
        let table = if trigger == slow_payments { "payments" } else { "idempotency_keys" };
        app.db.batch_execute(&format!("DROP TRIGGER slow ON {table}")).await.unwrap();
    }
    // Terminated before committing: nothing was written, as a 503 promises (and a 504 allows).
    assert_eq!(app.count("orders").await, 0);
    assert_eq!(app.count("idempotency_keys").await, 0);
    assert_eq!(app.stock(2).await, 50);

    for key in ["lost-1", "lost-2", "lost-3"] {
        let retried = app.post_order_with_key(key, &order()).await;
        assert_eq!(retried.status, 201, "{}", retried.text);
        assert!(retried.header("idempotent-replayed").is_none(), "nothing was stored for {key}");
    }
    assert_eq!(app.count("orders").await, 3);
    app.assert_invariants().await;
}

/// A primary demoted under the service (here: the server turned read-only, which existing
/// sessions see at once): the write is refused with SQLSTATE 25006, answered 503 (nothing was
/// written), and the connection is closed rather than reused. Writable again, the next order
/// goes through on a fresh connection.
#[tokio::test]
async fn a_connection_to_a_read_only_server_is_dropped_and_replaced() {
    let pg = PrivatePostgres::start(&[]).await;
    // One pooled connection, so the one that meets the read-only server is the one watched.
    let app = app_on_private_with(&pg, Duration::from_secs(5), 1).await;
    assert_eq!(app.post_order(&order()).await.status, 201);
    let sessions = || async {
        let rows = app
            .db
            .query("SELECT pid FROM pg_stat_activity WHERE datname = 'shop' AND application_name = 'order-api'", &[])
            .await
            .unwrap();
        rows.iter().map(|row| row.get::<_, i32>(0)).collect::<Vec<_>>()
    };
    let before = sessions().await;
    assert!(!before.is_empty());

    pg.execute("ALTER SYSTEM SET default_transaction_read_only = on").await;
    pg.execute("SELECT pg_reload_conf()").await;
    wait::for_setting(&pg.url("shop"), "default_transaction_read_only", "on").await;
    let refused = app.post_order(&order()).await;
    refused.assert_error(503, "SERVICE_UNAVAILABLE");
    assert!(refused.json["error"].as_str().unwrap().contains("read-only"), "{}", refused.text);
    // The connection that met the read-only server is closed: one of the sessions is gone.
    wait::until("the read-only connection closed", wait::PATIENCE, || async {
        let now = sessions().await;
        before.iter().any(|pid| !now.contains(pid))
    })
    .await;

    pg.execute("ALTER SYSTEM RESET default_transaction_read_only").await;
    pg.execute("SELECT pg_reload_conf()").await;
    wait::for_setting(&pg.url("shop"), "default_transaction_read_only", "off").await;
    assert_eq!(app.post_order(&order()).await.status, 201);
    assert_eq!(app.count("orders").await, 2);
    app.assert_invariants().await;
}

/// `pg-crash`: PostgreSQL SIGKILLed (crash recovery, not a clean stop) while 8 clients place
/// orders, each with its own key, retried with that key until a definite answer (201 or 400).
/// Afterwards: every acknowledged order is there, each key has exactly one order, nothing is
/// oversold, and the unknown outcomes were all resolved by retrying.
#[tokio::test]
async fn orders_across_a_postgresql_crash_lose_nothing_and_duplicate_nothing() {
    let mut pg = PrivatePostgres::start(&[]).await;
    let mut app = app_on_private(&pg, Duration::from_secs(3)).await;
    app.restock(2, 200).await;
    app.restock(3, 200).await;
    let placed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let unanswered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let (http, url) = (app.http.clone(), app.url("/api/orders"));
            let (placed, unanswered) = (placed.clone(), unanswered.clone());
            tokio::spawn(async move {
                let (mut acknowledged, mut retried) = (Vec::new(), 0);
                for n in 0..60 {
                    let key = format!("crash-{worker}-{n}");
                    let body = json!({"userId": 1, "items": [{"productId": 2 + n % 2, "quantity": 1}]});
                    let started = Instant::now();
                    loop {
                        let sent = http.post(&url).header("Idempotency-Key", &key).json(&body).send().await;
                        let reply = match sent {
                            Ok(response) => common::Reply::read(response).await,
                            Err(e) => panic!("the service itself failed: {e}"),
                        };
                        match reply.status {
                            201 => {
                                placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break acknowledged.push((key, reply.json["orderId"].as_i64().unwrap()));
                            }
                            400 => break reply.assert_error(400, "INSUFFICIENT_STOCK"),
                            503 | 504 | 409 => {
                                retried += 1;
                                unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            other => panic!("{key}: unexpected {other}: {}", reply.text),
                        }
                        assert!(started.elapsed() < Duration::from_secs(60), "{key}: no definite answer in 60 s");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                (acknowledged, retried)
            })
        })
        .collect();
    // The crash comes mid-load: after the first 50 orders. PostgreSQL stays down until the
    // clients have felt it (an answer that was not definite).
    wait::until("the first 50 orders placed", Duration::from_secs(30), || async {
        placed.load(std::sync::atomic::Ordering::Relaxed) >= 50
    })
    .await;
    pg.kill();
    wait::until("a client answered 503, 504 or 409 by the crash", wait::PATIENCE, || async {
        unanswered.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    pg.restart(&[]).await;

    let (mut acknowledged, mut retried) = (Vec::new(), 0);
    for worker in workers {
        let (acks, retries) = worker.await.unwrap();
        acknowledged.extend(acks);
        retried += retries;
    }
    // The test's own connection died with the server.
    app.db = common::connect(&pg.url("shop")).await;
    let db = &app.db;
    for (key, order_id) in &acknowledged {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM orders WHERE id = $1),
                        (SELECT count(*) FROM idempotency_keys WHERE key = $2)",
                &[order_id, key],
            )
            .await
            .unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 1), "{key}: order {order_id}");
    }
    let orders: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(orders as usize, acknowledged.len(), "an order nobody was told about, or a duplicate");
    assert!(retried > 0, "the crash was not felt: no request had to be retried");
    eprintln!("pg-crash: {} acknowledged, {retried} answers resolved by retrying", acknowledged.len());
    app.assert_invariants().await;
}
