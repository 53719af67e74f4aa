//! TLS to PostgreSQL (issue 12): `DATABASE_URL`'s `sslmode` and `sslrootcert`, read as libpq
//! reads them. What each connection of the service really is, encrypted or not, is read from
//! PostgreSQL's own `pg_stat_ssl`.
//!
//! disable, prefer and require run against the test server itself, which must have
//! `ssl = on` (Debian's default, with its snakeoil certificate). verify-full and verify-ca need
//! the server's certificate to come from a CA the test knows: they run against a private
//! server (`PrivatePostgres::start_with_tls`) whose certificate a CA made by the test issued,
//! so they always run, and the shared server's settings are never touched.

use std::process::Command;

use order_api::db::{self, Target};
use serde_json::json;

use order_api::config::Config;

use crate::common::{
    TempDir, TestApp, private_pg::PrivatePostgres, spawn_app_at, spawn_app_inspected_at, spawn_app_with,
};

fn with_params(url: &str, params: &str) -> String {
    if url.contains('?') { format!("{url}&{params}") } else { format!("{url}?{params}") }
}

/// The service's sessions on the test database: (encrypted, plain).
async fn sessions(app: &TestApp) -> (i64, i64) {
    let row = app
        .db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
             WHERE a.datname = $1 AND a.application_name = 'order-api'",
            &[&app.database_name],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A read, an order and its read-back: statements, a transaction and a commit over the link.
async fn exercise(app: &TestApp) {
    assert_eq!(app.get("/api/products").await.status, 200);
    let created = app.post_order(&json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order_id = created.json["orderId"].as_i64().unwrap();
    assert_eq!(app.get(&format!("/api/orders/{order_id}")).await.status, 200);
    assert_eq!(app.stock(2).await, 49);
}

async fn serve_with(params: &str) -> TestApp {
    let params = params.to_owned();
    spawn_app_with(move |config| config.database_url = with_params(&config.database_url, &params)).await
}

async fn assert_server_offers_tls(app: &TestApp) {
    let ssl: String = app.db.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(ssl, "on", "the test PostgreSQL must have ssl = on (Debian's default, with its snakeoil certificate)");
}

#[tokio::test]
async fn sslmode_require_encrypts_every_connection() {
    let app = serve_with("sslmode=require").await;
    assert_server_offers_tls(&app).await;
    exercise(&app).await;
    let (encrypted, plain) = sessions(&app).await;
    assert!(encrypted >= 1 && plain == 0, "encrypted {encrypted}, plain {plain}");
}

#[tokio::test]
async fn sslmode_prefer_is_the_default_and_encrypts_when_the_server_offers_it() {
    let app = spawn_app_with(|_| {}).await;
    assert!(!app.database_url.contains("sslmode"), "the default URL names no sslmode");
    assert_server_offers_tls(&app).await;
    exercise(&app).await;
    let (encrypted, plain) = sessions(&app).await;
    assert!(encrypted >= 1 && plain == 0, "encrypted {encrypted}, plain {plain}");
}

#[tokio::test]
async fn sslmode_disable_never_encrypts() {
    let app = serve_with("sslmode=disable").await;
    exercise(&app).await;
    let (encrypted, plain) = sessions(&app).await;
    assert!(encrypted == 0 && plain >= 1, "encrypted {encrypted}, plain {plain}");
}

/// A private PostgreSQL serving TLS with a certificate from a CA of the test's own (for
/// `localhost` and 127.0.0.1), a `shop` database on it migrated and seeded, and the CA.
async fn tls_server() -> (PrivatePostgres, String) {
    let (pg, ca) = PrivatePostgres::start_with_tls().await;
    pg.execute("CREATE DATABASE shop").await;
    let config = Config { database_url: pg.url("shop"), ..Config::default() };
    order_api::prepare_database(&config, true).await.expect("migrate and seed");
    (pg, ca.to_str().unwrap().to_owned())
}

async fn serve_at(url: String) -> TestApp {
    spawn_app_at(Config { database_url: url, port: 0, ..Config::default() }).await
}

#[tokio::test]
async fn verify_full_serves_over_a_certificate_checked_against_sslrootcert() {
    let (pg, ca) = tls_server().await;
    let app = serve_at(with_params(&pg.url("shop"), &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    exercise(&app).await;
    let (encrypted, plain) = sessions(&app).await;
    assert!(encrypted >= 1 && plain == 0, "encrypted {encrypted}, plain {plain}");
}

/// The same server reached under a name its certificate does not hold (`hostaddr` keeps the
/// address, `host` is the name checked): verify-full refuses, verify-ca (chain only) accepts.
/// A server started on that URL answers 503 and writes nothing.
#[tokio::test]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_hold() {
    let (pg, ca) = tls_server().await;
    let renamed = pg.url("shop").replacen("@127.0.0.1:", "@wrong-name.invalid:", 1);
    assert_ne!(renamed, pg.url("shop"), "the private server's URL names 127.0.0.1");
    let url = |mode: &str| with_params(&renamed, &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}"));

    let refused = db::connect(&url("verify-full").parse::<Target>().unwrap()).await.expect_err("refused");
    assert!(refused.to_string().contains("certificate"), "{refused}");
    db::connect(&url("verify-ca").parse::<Target>().unwrap()).await.expect("verify-ca checks no name");

    let config = Config { database_url: url("verify-full"), port: 0, ..Config::default() };
    let misnamed = spawn_app_inspected_at(config, &pg.url("shop")).await;
    let reply = misnamed.post_order(&json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]})).await;
    reply.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(misnamed.count("orders").await, 0);
    assert_eq!(misnamed.stock(2).await, 50);
}

/// A CA made here, which never issued the server's certificate (the private server has one
/// from another CA): verify-full and verify-ca both refuse.
#[tokio::test]
async fn verify_full_and_verify_ca_refuse_a_certificate_from_another_ca() {
    let (pg, _) = tls_server().await;
    let dir = TempDir::new("other-ca");
    let ca = dir.path.join("ca.pem");
    let made = Command::new("openssl")
        .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-days", "1", "-subj", "/CN=not the server's CA", "-keyout"])
        .arg(dir.path.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for mode in ["verify-full", "verify-ca"] {
        let url = with_params(&pg.url("shop"), &format!("sslmode={mode}&sslrootcert={}", ca.display()));
        let refused = db::connect(&url.parse::<Target>().unwrap()).await.expect_err(mode);
        assert!(refused.to_string().contains("certificate"), "{mode}: {refused}");
    }
}

/// Settings that cannot work stop the start with a message naming the problem.
#[test]
fn unusable_tls_settings_are_refused_at_start() {
    let missing = "postgresql://db/shop?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".parse::<Target>();
    assert!(missing.err().unwrap().contains("/nonexistent/ca.pem"));
    let unknown = "postgresql://db/shop?sslmode=sometimes".parse::<Target>();
    assert!(unknown.err().unwrap().contains("sslmode=sometimes is not supported"));
}
