//! Behind a transaction-mode pooler (PgBouncer before 1.21) a server-side prepared statement
//! made in one transaction is gone in the next, and session options are refused. With
//! `DB_TRANSACTION_POOLER=true` the service sends every statement unnamed and no options.
//! These tests run the order flow that way, straight against PostgreSQL and, when the
//! `pgbouncer` binary is installed, through a private PgBouncer in transaction mode with so
//! few server connections that consecutive transactions keep changing connection. Without
//! `pgbouncer` that half fails when `CI=true` (CI installs it, see .ci/run) and is skipped
//! elsewhere, saying so on stderr (shown by `make test`: see .config/nextest.toml).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::future::join_all;
use order_api::config::Config;
use serde_json::json;

use crate::common::{self, TestApp, spawn_app_with};

/// The whole API surface once, then 40 concurrent orders for 10 units.
async fn exercise(app: &TestApp) {
    let created = app
        .post_order(&json!({"userId": 1, "items": [{"productId": 2, "quantity": 2}, {"productId": 3, "quantity": 1}]}))
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order_id = created.json["orderId"].as_i64().unwrap();
    assert_eq!(app.get(&format!("/api/orders/{order_id}")).await.status, 200);
    assert_eq!(app.get("/api/orders?userId=1&limit=5").await.status, 200);
    assert_eq!(app.get("/api/products/2").await.json["stock"], 48);
    app.set_status(order_id, "shipped").await;
    let second = app.order(3, 2).await;
    assert_eq!(app.cancel(second).await.status, 200);
    app.restock(4, 5).await;
    for _ in 0..2 {
        let keyed = app.post_order_with_key("pooled", &common::order_body(2, 4, 1)).await;
        assert_eq!(keyed.status, 201, "{}", keyed.text);
    }

    let bodies: Vec<_> = (0..40).map(|_| json!({"userId": 1, "items": [{"productId": 1, "quantity": 1}]})).collect();
    let replies = join_all(bodies.iter().map(|body| app.post_order(body))).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 10, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 400), "{statuses:?}");
    assert_eq!(app.stock(1).await, 0);
    app.assert_invariants().await;
}

/// Unnamed statements and no session options, straight against PostgreSQL.
#[tokio::test]
async fn the_order_flow_works_with_unnamed_statements() {
    let app = spawn_app_with(|config| config.transaction_pooler = true).await;
    exercise(&app).await;
}

/// A PgBouncer in transaction mode, stopped when dropped.
struct PgBouncer {
    process: Child,
    port: u16,
    _dir: common::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Starts PgBouncer (transaction mode, 2 server connections per database) in front of the
/// test PostgreSQL, or `None` if it is not installed (a failure instead when `CI=true`).
fn start_pgbouncer() -> Option<PgBouncer> {
    if let Err(e) = Command::new("pgbouncer").arg("--version").stdout(Stdio::null()).status() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and pgbouncer cannot be run ({e}): CI must install it (.ci/run does)"
        );
        eprintln!(
            "SKIPPED: pgbouncer cannot be run ({e}); the order flow through PgBouncer was not tested \
             (apt-get install pgbouncer)"
        );
        return None;
    }
    let dir = common::TempDir::new("pgbouncer");
    let port = common::free_port();
    std::fs::write(dir.path.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        dir.path.join("pgbouncer.ini"),
        format!(
            "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
             default_pool_size = 2\nmax_client_conn = 200\nlogfile = {dir}/pgbouncer.log\n",
            dir = dir.path.display()
        ),
    )
    .unwrap();
    // PgBouncer will not run as root; `-u` makes it drop to the postgres user.
    let mut command = Command::new("pgbouncer");
    if is_root() {
        Command::new("chown").args(["-R", "postgres"]).arg(&dir.path).status().unwrap();
        command.args(["-u", "postgres"]);
    }
    // -q: its log goes to pgbouncer.log only, not to the test output.
    let process = command.arg("-q").arg(dir.path.join("pgbouncer.ini")).stdout(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "pgbouncer did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(PgBouncer { process, port, _dir: dir })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| out.stdout.starts_with(b"0")).unwrap_or(false)
}

/// Through a real PgBouncer in transaction mode: migrations, seed and the whole order flow,
/// concurrency included, with transactions hopping between two server connections.
#[tokio::test]
async fn the_order_flow_works_through_pgbouncer_in_transaction_mode() {
    let Some(bouncer) = start_pgbouncer() else { return };
    let port = bouncer.port;
    let database = common::TestDatabase::create().await;
    let pooled_url = format!("postgresql://postgres@127.0.0.1:{port}/{}", database.name);
    let config = Config { database_url: pooled_url, transaction_pooler: true, ..Config::default() };
    order_api::prepare_database(&config, true).await.expect("migrate and seed through pgbouncer");
    let app = common::spawn_app_on(config, database).await;
    exercise(&app).await;
    drop(app);
    drop(bouncer);
}
