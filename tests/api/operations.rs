//! What operators and orchestrators rely on around the API: liveness and readiness probes,
//! `HEAD`, metrics whose series a client cannot multiply, and a start-up that neither hangs on
//! a silent database host nor runs on a schema it was told not to migrate.

use std::time::{Duration, Instant};

use crate::common::{self, TestDatabase, spawn_app, spawn_app_with, spawn_app_without_database, wait};
use order_api::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `/health/live` answers 200 without asking the database, while `/health` and
/// `/health/ready` report the outage with 503 and `Retry-After`.
#[tokio::test]
async fn liveness_does_not_depend_on_the_database_but_readiness_does() {
    let app = spawn_app_without_database().await;
    let live = app.get("/health/live").await;
    assert_eq!((live.status, live.text.as_str()), (200, r#"{"status":"ok"}"#));
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.text, r#"{"status":"error","db":"unhealthy","migrations":"unknown"}"#);
    assert_eq!(ready.header("retry-after"), Some("1"));
    assert_eq!(app.get("/health").await.status, 503);
}

/// Readiness also needs every migration of this build applied: a replica on a database an
/// older migration step left behind takes no traffic.
#[tokio::test]
async fn readiness_reports_pending_migrations() {
    let app = spawn_app().await;
    let ready = app.get("/health/ready").await;
    assert_eq!((ready.status, ready.text.as_str()), (200, r#"{"status":"ok","db":"healthy","migrations":"applied"}"#));

    let last = app.db.query_one("SELECT max(name) FROM schema_migrations", &[]).await.unwrap().get::<_, String>(0);
    app.db.execute("DELETE FROM schema_migrations WHERE name = $1", &[&last]).await.unwrap();
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["migrations"], "pending");
    assert_eq!(ready.json["db"], "healthy");
}

/// Every path that answers GET answers HEAD with the same status and headers and no body
/// (each GET first checked to answer what it should, so that a HEAD cannot match a broken GET).
#[tokio::test]
async fn head_is_answered_wherever_get_is() {
    let app = spawn_app().await;
    let order_id = app.order(2, 1).await;
    for (path, status) in [
        ("/health".to_owned(), 200),
        ("/health/live".to_owned(), 200),
        ("/health/ready".to_owned(), 200),
        ("/openapi.json".to_owned(), 200),
        ("/api/products".to_owned(), 200),
        ("/api/products/2".to_owned(), 200),
        ("/api/products/999".to_owned(), 404),
        (format!("/api/orders/{order_id}"), 200),
        ("/api/orders?userId=1".to_owned(), 200),
    ] {
        let get = app.get(&path).await;
        assert_eq!(get.status, status, "GET {path}: {}", get.text);
        assert!(!get.text.is_empty(), "GET {path} has a body");
        let head = app.request(reqwest::Method::HEAD, &path).await;
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert_eq!(head.text, "", "HEAD {path} has no body");
        assert_eq!(head.header("content-type"), get.header("content-type"), "HEAD {path}");
        let get_length = get.text.len().to_string();
        assert_eq!(head.header("content-length"), Some(get_length.as_str()), "HEAD {path}");
    }
    // A HEAD reads; it never writes.
    assert_eq!(app.stock(2).await, 49);
}

/// Made-up methods are counted under one `OTHER` label: sixty of them add no more series
/// than one does, so no client can grow the scrape.
#[tokio::test]
async fn made_up_methods_do_not_add_metric_series() {
    let app = spawn_app().await;
    let made_up = |i: usize| reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
    // The scrape's own series exist from the first scrape on.
    assert_eq!(app.get("/metrics").await.status, 200);
    app.request(made_up(0), "/api/orders").await.assert_error(405, "METHOD_NOT_ALLOWED");
    let series_after_one = app.get("/metrics").await.text.lines().filter(|l| !l.starts_with('#')).count();
    for i in 1..60 {
        app.request(made_up(i), "/api/orders").await.assert_error(405, "METHOD_NOT_ALLOWED");
    }
    let metrics = app.get("/metrics").await.text;
    let series_after_sixty = metrics.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(series_after_sixty, series_after_one, "{metrics}");
    assert!(!metrics.contains("MADEUP"), "{metrics}");
    let other = r#"order_api_http_requests_total{route="/api/orders",method="OTHER",status="405"} 60"#;
    assert!(metrics.lines().any(|line| line == other), "{metrics}");
}

/// Connections refused past `MAX_CONNECTIONS` are counted, and the process series are there.
#[tokio::test]
async fn refused_connections_and_process_figures_are_in_the_metrics() {
    let app = spawn_app_with(|config| config.max_connections = 1).await;
    // The holder's connection is accepted and served (so it takes the one slot) before the
    // second one.
    let holder = app.held_connection().await;
    let mut refused = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    refused.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), refused.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(holder);

    // The slot comes free once the server sees the holder's close.
    let metrics = wait::until_some("/metrics served after the holder left", wait::PATIENCE, || async {
        match app.http.get(app.url("/metrics")).send().await {
            Ok(reply) if reply.status() == 200 => Some(reply.text().await.unwrap()),
            _ => None,
        }
    })
    .await;
    assert!(metrics.lines().any(|l| l == "order_api_connections_refused_total 1"), "{metrics}");
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(metrics.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{metrics}");
    }
}

/// A database host that accepts the TCP connection but never answers must not hold start-up
/// past `DB_STARTUP_TIMEOUT_MS`.
#[tokio::test]
async fn start_up_gives_up_on_a_silent_database_at_its_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let config = Config {
        database_url: format!("postgresql://postgres@127.0.0.1:{port}/nowhere"),
        startup_timeout: Duration::from_millis(1_500),
        ..Config::default()
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), order_api::check_database(&config)).await;
    let error = outcome.expect("start-up hung past its timeout").expect_err("a silent database is not ready");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(error.to_string().contains("DB_STARTUP_TIMEOUT_MS"), "{error}");
    drop(silent);
}

/// With `MIGRATE_ON_START=false` the service applies nothing and refuses to start while
/// migrations are pending; once `order-api migrate` has run, it starts.
#[tokio::test]
async fn without_migrate_on_start_pending_migrations_stop_the_start() {
    let database = TestDatabase::create().await;
    let config = Config { database_url: database.url.clone(), migrate_on_start: false, ..Config::default() };

    let error = order_api::check_database(&config).await.expect_err("pending migrations must stop the start");
    assert!(error.to_string().contains("order-api migrate"), "{error}");
    let db = common::connect(&database.url).await;
    let tables: i64 =
        db.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[]).await.unwrap().get(0);
    assert_eq!(tables, 0, "nothing may be applied");

    order_api::prepare_database(&config, false).await.unwrap();
    order_api::check_database(&config).await.expect("starts once migrated");
}
