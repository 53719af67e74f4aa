//! Faults inside and around a transaction: a failing statement half way, killed connections,
//! an exhausted pool, lock waits past the timeouts, a request past its deadline, a client
//! that goes away. Each must roll back completely, answer with a clear status, and leave the
//! pool healthy.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{self, TestApp, raw, spawn_app, spawn_app_with, wait};

fn one_laptop() -> serde_json::Value {
    common::order_body(1, 1, 1)
}

/// Holds a row lock on a product from a separate connection until the returned transaction
/// is dropped or committed: orders for that product wait behind it.
async fn lock_product(app: &TestApp, product_id: i32) -> tokio_postgres::Client {
    let client = common::connect(&app.database_url).await;
    client.batch_execute("BEGIN").await.unwrap();
    client.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", &[&product_id]).await.unwrap();
    client
}

/// A statement failing in the middle of the order transaction (a trigger makes the payment
/// insert fail) rolls everything back: no order, no line, no stock change; the client gets a
/// 500 INTERNAL whose body leaks nothing of the SQL; the next order works.
#[tokio::test]
async fn a_failure_mid_transaction_rolls_back_everything_and_leaks_no_sql() {
    let app = spawn_app().await;
    app.fail_payments().await;
    let before = app.snapshot().await;

    let reply = app
        .post_order(&json!({"userId": 1, "items": [{"productId": 1, "quantity": 2}, {"productId": 2, "quantity": 1}]}))
        .await;
    reply.assert_error(500, "INTERNAL");
    assert_eq!(reply.json.as_object().unwrap().len(), 2, "only error and code: {}", reply.text);
    for leak in ["payment", "INSERT", "SQL", "trigger", "injected", "relation"] {
        assert!(!reply.text.to_lowercase().contains(&leak.to_lowercase()), "body leaks {leak}: {}", reply.text);
    }
    assert_eq!(app.snapshot().await, before);

    app.allow_payments().await;
    app.order(1, 2).await;
    assert_eq!(app.stock(1).await, 8);
    app.assert_invariants().await;
}

/// Connections killed by `pg_terminate_backend` are noticed and replaced: after the kill the
/// next requests succeed, without a restart.
#[tokio::test]
async fn killed_connections_are_replaced() {
    let app = spawn_app().await;
    // Open several pooled connections, then kill every one of them.
    futures::future::join_all((0..6).map(|_| app.get("/api/products"))).await;
    // Both ends of each connection: the service's port, and PostgreSQL's.
    let ends: Vec<(u16, u16)> = app
        .db
        .query(
            "SELECT client_port, inet_server_port() FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'order-api'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get::<_, i32>(0) as u16, row.get::<_, i32>(1) as u16))
        .collect();
    let killed: i64 = app
        .db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'order-api'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "no API connection found to kill");
    // pg_terminate_backend only signals the backends; each exits and closes its socket a
    // moment later, and the service's end of each connection notices when its task reads the
    // close and drops the socket: then the socket is gone from the machine's table, or past
    // ESTABLISHED and CLOSE_WAIT (the peer closed, this side not yet).
    wait::until("the service's ends of the killed connections closed", wait::PATIENCE, || async {
        raw::tcp_sockets().iter().all(|socket| {
            !ends.contains(&(socket.local_port, socket.remote_port))
                || ![raw::ESTABLISHED, raw::CLOSE_WAIT].contains(&socket.state)
        })
    })
    .await;

    for _ in 0..10 {
        let reply = app.get("/api/products").await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    app.order(2, 1).await;
    assert_eq!(app.get("/health").await.status, 200);
    app.assert_invariants().await;
}

/// With every pooled connection busy past the pool wait, a request gets 503
/// SERVICE_UNAVAILABLE with Retry-After instead of queueing forever; the busy ones finish.
#[tokio::test]
async fn an_exhausted_pool_answers_503_with_retry_after() {
    let app = spawn_app_with(|config| {
        config.pool_size = 2;
        config.pool_timeout = Duration::from_millis(300);
        // One order per transaction: two orders take two connections, not one batch's.
        config.order_batch_max = 1;
    })
    .await;
    let blocker = lock_product(&app, 1).await;
    // Two orders that take both connections and wait on the lock, in a task of their own.
    let waiting = tokio::spawn({
        let (http, url) = (app.http.clone(), app.url("/api/orders"));
        async move {
            let send = |key: &str| {
                http.post(&url)
                    .header("content-type", "application/json")
                    .header("Idempotency-Key", key)
                    .body(one_laptop().to_string())
                    .send()
            };
            futures::future::join_all([send("pool-1"), send("pool-2")]).await
        }
    });
    wait::for_lock_waiters(&app.db, &app.database_name, 2).await; // both connections wait on the lock

    // Answered while the lock is still held: it did not queue behind the busy connections.
    let reply = app.get("/api/products").await;
    reply.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(reply.header("retry-after"), Some("1"));

    blocker.batch_execute("COMMIT").await.unwrap();
    for response in waiting.await.unwrap() {
        assert_eq!(response.unwrap().status().as_u16(), 201);
    }
    assert_eq!(app.get("/api/products").await.status, 200);
    app.assert_invariants().await;
}

/// A lock held past PostgreSQL's lock/statement timeout: the order gets 503 (retryable),
/// nothing is written, and the connection is fine for the next request.
#[tokio::test]
async fn a_lock_wait_past_the_statement_timeout_is_a_clean_503() {
    let app = spawn_app_with(|config| {
        config.statement_timeout = Duration::from_millis(300);
        config.pool_size = 1;
    })
    .await;
    let before = app.snapshot().await;
    let blocker = lock_product(&app, 1).await;
    let reply = app.post_order(&one_laptop()).await;
    reply.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(app.snapshot().await, before);
    blocker.batch_execute("COMMIT").await.unwrap();

    app.order(1, 1).await;
    app.assert_invariants().await;
}

/// A request past its deadline is answered 503 and nothing of it remains: at the deadline
/// the pool cancels its statement inside PostgreSQL, so the transaction rolls back and frees
/// its locks, and the connection goes back to the pool clean and is reused (it is closed
/// instead only if PostgreSQL does not even answer the cancel).
#[tokio::test]
async fn a_request_past_its_deadline_leaves_nothing_behind() {
    let app = spawn_app_with(|config| {
        // Long enough for the requests that must succeed (the first one opens the connection,
        // TLS handshake included) on a loaded machine; the order past it waits on a lock the
        // test holds, for as long as the test likes.
        config.request_timeout = Duration::from_millis(1_500);
        config.pool_size = 1;
    })
    .await;
    assert_eq!(app.get("/api/products/1").await.status, 200);
    let connection_before = api_backend_pids(&app).await;
    assert_eq!(connection_before.len(), 1, "the pool's one connection");
    let before = app.snapshot().await;
    let blocker = lock_product(&app, 1).await;
    let reply = app.post_order(&one_laptop()).await;
    reply.assert_error(503, "SERVICE_UNAVAILABLE");
    blocker.batch_execute("COMMIT").await.unwrap();

    // Whatever was left of the order would run now that the lock is free; once the service's
    // session is idle (no statement running, no transaction open) there is nothing left.
    wait::until("the service's session idle", wait::PATIENCE, || async {
        let busy: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND application_name = 'order-api' AND state <> 'idle'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        busy == 0
    })
    .await;
    assert_eq!(app.snapshot().await, before, "the abandoned order must not be written");
    app.order(1, 1).await;
    assert_eq!(api_backend_pids(&app).await, connection_before, "the same connection, reused");
    app.assert_invariants().await;
}

/// The backends of the API's connections to the test database.
async fn api_backend_pids(app: &TestApp) -> Vec<i32> {
    wait::backend_pids(&app.db, &app.database_name).await
}

/// A client that disconnects while its order waits on a lock does not cut the transaction
/// half way: it runs to its end (the whole order is committed), and the pool stays healthy.
#[tokio::test]
async fn a_client_that_disconnects_mid_order_does_not_cut_its_transaction() {
    let app = spawn_app_with(|config| config.pool_size = 1).await;
    let blocker = lock_product(&app, 1).await;
    let request = app.send_all(&[raw::Request::order(None, &one_laptop())]).await;
    wait::for_lock_waiters(&app.db, &app.database_name, 1).await;
    drop(request); // the client goes away while its order waits inside PostgreSQL
    blocker.batch_execute("COMMIT").await.unwrap();

    wait::until("the abandoned order committed", wait::PATIENCE, || async { app.count("orders").await == 1 }).await;
    assert_eq!(app.count("payments").await, 1);
    assert_eq!(app.stock(1).await, 9);
    app.order(1, 1).await;
    app.assert_invariants().await;
}

/// The database goes away (connections refused and every API connection killed): requests
/// fail fast with 503 and Retry-After (none waits out the pool's 2 s), /health says
/// unhealthy; when it is back, the service heals by itself, without a restart. (How fast it
/// heals, within its connect backoff of at most 0.5 s, is for `make chaos` to measure: a
/// loaded test machine cannot tell.)
#[tokio::test]
async fn the_service_fails_fast_while_the_database_is_away_and_heals_when_it_returns() {
    let app = spawn_app().await;
    app.order(1, 1).await;
    let admin = common::admin().await;
    let database = app.database_name.clone();
    admin.batch_execute(&format!("ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")).await.unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'order-api'",
            &[&database],
        )
        .await
        .unwrap();
    wait::until("the service's backends gone", wait::PATIENCE, || async { api_backend_pids(&app).await.is_empty() })
        .await;

    let before = app.snapshot().await;
    let started = Instant::now();
    for _ in 0..20 {
        let reply = app.post_order(&one_laptop()).await;
        reply.assert_error(503, "SERVICE_UNAVAILABLE");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // Waiting out the pool (DB_POOL_TIMEOUT_MS, 2 s) each would take 40 s.
    let pool_wait = order_api::config::Config::default().pool_timeout;
    assert!(started.elapsed() < 5 * pool_wait, "20 refusals took {:?}: they queued", started.elapsed());
    assert_eq!(app.get("/health").await.status, 503);
    assert_eq!(app.snapshot().await, before);

    admin.batch_execute(&format!("ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")).await.unwrap();
    wait::until("the first order after the database is back", wait::PATIENCE, || async {
        let reply = app.post_order(&one_laptop()).await;
        assert!(matches!(reply.status, 201 | 503), "{}", reply.text);
        reply.status == 201
    })
    .await;
    assert_eq!(app.get("/health").await.status, 200);
    app.assert_invariants().await;
}

/// A connection older than its maximum lifetime is replaced by a new one (a new backend),
/// without any request failing; younger, it is reused. The lifetime is long enough (3 s) that
/// two requests in a row fall within it even on a loaded machine.
#[tokio::test]
async fn connections_are_replaced_after_their_maximum_lifetime() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let app = spawn_app_with(|config| {
        config.pool_size = 1;
        config.connection_max_lifetime = LIFETIME;
    })
    .await;
    let backend = || api_backend_pids(&app);
    assert_eq!(app.get("/api/products/1").await.status, 200);
    let first = backend().await;
    assert_eq!(app.get("/api/products/1").await.status, 200);
    assert_eq!(backend().await, first, "reused while young");
    // Time itself must pass here: the connection grows older than its lifetime.
    tokio::time::sleep(LIFETIME + Duration::from_millis(100)).await;
    assert_eq!(app.get("/api/products/1").await.status, 200);
    let second = backend().await;
    assert!(second.iter().any(|pid| !first.contains(pid)), "a new backend once too old: {first:?} -> {second:?}");
    // The old one is closed, not kept beside it (its backend exits a moment after the socket closes).
    wait::until("the old connection closed", wait::PATIENCE, || async {
        !backend().await.iter().any(|pid| first.contains(pid))
    })
    .await;
}
