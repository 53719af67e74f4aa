//! The service's view of WAL archiving (issue 21, docs/backups.md): while the backup
//! repository cannot take WAL, orders keep committing, and the metrics, the readiness body and
//! a log line say that the backups are falling behind; once it can, the WAL that waited is
//! archived and all of them say so. On a private PostgreSQL with `archive_mode=on`: the shared
//! test server is never reconfigured.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;

use crate::common::{TempDir, order_body, private_pg::PrivatePostgres, process::ServerProcess};

/// The repository stands in as a directory: `archive_command` copies each WAL file into it,
/// and fails while it is missing, as pgBackRest's `archive-push` fails while its repository is
/// unreachable or full (the drill of `make restore-drill` does that with pgBackRest itself).
fn archive_command(repository: &Path) -> String {
    let repository = repository.display();
    format!("archive_command=test -d {repository} && cp %p {repository}/%f")
}

/// Gives the directory to the `postgres` user when the tests run as root, as the server does.
fn owned_by_postgres(path: &Path) {
    let root = Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.starts_with(b"0\n"));
    if root {
        let status = Command::new("chown").args(["-R", "postgres:"]).arg(path).status().expect("chown");
        assert!(status.success());
    }
}

async fn get(server: &ServerProcess, path: &str) -> (u16, String) {
    let response = reqwest::get(server.url(path)).await.expect("GET");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A series' value in the `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/health/ready` and `/metrics` until `done` holds (at most 20 s); returns the last of
/// both.
async fn wait_until(server: &ServerProcess, done: impl Fn(&Value, &str) -> bool) -> (Value, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(server, "/health/ready").await;
        let ready: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let (_, metrics) = get(server, "/metrics").await;
        assert_eq!(status, 200, "a failing archive must not make the service unready: {body}");
        if done(&ready, &metrics) || tokio::time::Instant::now() > deadline {
            return (ready, metrics);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Orders some more and closes the current WAL segment, so the archiver has a file to try.
async fn order_and_switch_wal(server: &ServerProcess, pg: &PrivatePostgres, orders: usize) {
    let http = reqwest::Client::new();
    for _ in 0..orders {
        let reply = http.post(server.url("/api/orders")).json(&order_body(1, 2, 1)).send().await.unwrap();
        assert_eq!(reply.status(), 201, "orders keep committing whatever the archive does");
    }
    pg.execute("SELECT pg_switch_wal()").await;
}

/// The repository goes away under load and comes back: the service never stops taking orders,
/// `/health/ready` stays 200 but says `"archiving":"failing"`, the failure counter and gauge
/// move, a warning is logged; after the repository is back, everything says `ok` again and the
/// segment that failed is in the repository: nothing was lost, only delayed.
#[tokio::test]
async fn an_unreachable_backup_repository_is_reported_while_orders_go_on() {
    let dir = TempDir::new("archive");
    let repository = dir.path.join("repository");
    std::fs::create_dir_all(&repository).unwrap();
    owned_by_postgres(&dir.path);
    let pg = PrivatePostgres::start(&["archive_mode=on", &archive_command(&repository), "wal_level=replica"]).await;
    pg.execute("CREATE DATABASE shop").await;
    let mut server = ServerProcess::start_with_env(&pg.url("shop"), &[("WAL_ARCHIVE_CHECK_SECS", "1")]).await;

    order_and_switch_wal(&server, &pg, 3).await;
    let (ready, metrics) = wait_until(&server, |ready, metrics| {
        ready["archiving"] == "ok" && metric(metrics, "order_api_wal_archived_total").is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(ready["archiving"], "ok", "{ready}");
    assert_eq!(metric(&metrics, "order_api_wal_archive_enabled"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "order_api_wal_archive_failing"), Some(0.0), "{metrics}");

    let unplugged = dir.path.join("repository-unplugged");
    std::fs::rename(&repository, &unplugged).unwrap();
    order_and_switch_wal(&server, &pg, 20).await;
    let (ready, metrics) = wait_until(&server, |ready, metrics| {
        ready["archiving"] == "failing" && metric(metrics, "order_api_wal_archive_failing") == Some(1.0)
    })
    .await;
    assert_eq!(ready["archiving"], "failing", "{ready}");
    assert_eq!(ready["status"], "ok", "{ready}");
    assert!(metric(&metrics, "order_api_wal_archive_failures_total").is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(metric(&metrics, "order_api_wal_archive_pending_bytes").is_some_and(|n| n > 0.0), "{metrics}");
    let (logs, warned) =
        server.wait_for_logs(Duration::from_secs(5), |logs| logs.contains("WAL archiving is failing")).await;
    assert!(warned, "a warning names the failure:\n{logs}");
    let warning = logs.lines().find(|line| line.contains("WAL archiving is failing")).unwrap();
    let warning: Value = serde_json::from_str(warning).unwrap();
    assert_eq!(warning["level"], "warn");
    let failed_wal = warning["last_failed_wal"].as_str().expect("the failing file is named").to_owned();
    // Orders go on while the archive fails.
    order_and_switch_wal(&server, &pg, 5).await;

    std::fs::rename(&unplugged, &repository).unwrap();
    order_and_switch_wal(&server, &pg, 1).await;
    let (ready, metrics) = wait_until(&server, |ready, metrics| {
        ready["archiving"] == "ok" && metric(metrics, "order_api_wal_archive_failing") == Some(0.0)
    })
    .await;
    assert_eq!(ready["archiving"], "ok", "{ready}");
    assert_eq!(metric(&metrics, "order_api_wal_archive_failing"), Some(0.0), "{metrics}");
    let (logs, recovered) =
        server.wait_for_logs(Duration::from_secs(5), |logs| logs.contains("WAL archiving works again")).await;
    assert!(recovered, "{logs}");
    assert!(repository.join(&failed_wal).exists(), "{failed_wal} reached the repository once it was back");
}

/// Without `archive_mode` (PostgreSQL's default) readiness keeps its usual body and the only
/// archive series says archiving is off.
#[tokio::test]
async fn without_archiving_readiness_and_metrics_say_so() {
    let pg = PrivatePostgres::start(&[]).await;
    pg.execute("CREATE DATABASE shop").await;
    let server = ServerProcess::start_with_env(&pg.url("shop"), &[("WAL_ARCHIVE_CHECK_SECS", "1")]).await;
    let (_, metrics) = wait_until(&server, |_, metrics| metrics.contains("order_api_wal_archive_enabled")).await;
    assert_eq!(metric(&metrics, "order_api_wal_archive_enabled"), Some(0.0), "{metrics}");
    assert!(!metrics.contains("order_api_wal_archive_failing"), "{metrics}");
    let (status, body) = get(&server, "/health/ready").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok","db":"healthy","migrations":"applied"}"#));
}
