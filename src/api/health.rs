//! `GET /health` (the contract's check), `GET /health/live` and `GET /health/ready` (what
//! orchestrators probe), and `GET /metrics`.

use std::time::Duration;

use hyper::{StatusCode, header::HeaderValue};
use serde::Serialize;

use super::{
    AppState,
    reply::{Reply, json, retry_after, with_content_type},
};

/// A health check must answer quickly even when the database hangs: past this, unhealthy.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The health body; a struct so the fields keep the contract's order.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    db: &'static str,
    /// Only on `/health/ready`: whether every migration of this build is applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    migrations: Option<&'static str>,
    /// Only on `/health/ready`, and only while PostgreSQL archives WAL: `ok` or `failing`
    /// (see `crate::archiving`: a failing archive is reported, not a reason to take no traffic).
    #[serde(skip_serializing_if = "Option::is_none")]
    archiving: Option<&'static str>,
}

/// 200 `{"status":"ok","db":"healthy"}` when a pooled connection answers, else 503
/// `{"status":"error","db":"unhealthy"}`.
pub async fn check(state: &AppState) -> Reply {
    match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, state.db.ping()).await {
        Ok(Ok(())) => json(StatusCode::OK, &Health { status: "ok", db: "healthy", migrations: None, archiving: None }),
        _ => unhealthy(Health { status: "error", db: "unhealthy", migrations: None, archiving: None }),
    }
}

/// 200 `{"status":"ok"}` while the process serves requests; the database is not asked, so a
/// database outage does not make an orchestrator restart every replica.
pub fn live() -> Reply {
    #[derive(Serialize)]
    struct Live {
        status: &'static str,
    }
    json(StatusCode::OK, &Live { status: "ok" })
}

/// 200 `{"status":"ok","db":"healthy","migrations":"applied"}` when the database answers and
/// has every migration of this build; else 503 saying which is missing, so that a load
/// balancer sends no traffic to a replica that cannot serve it. While PostgreSQL archives WAL
/// the body also says whether that works (`"archiving":"ok"` or `"failing"`), without changing
/// the status: orders still commit while the backups fall behind.
pub async fn ready(state: &AppState) -> Reply {
    let applied = tokio::time::timeout(HEALTH_CHECK_TIMEOUT, state.db.migrations_applied()).await;
    let archiving = state.archiving.readiness();
    let health = |status, db, migrations| Health { status, db, migrations: Some(migrations), archiving };
    match applied {
        Ok(Ok(true)) => json(StatusCode::OK, &health("ok", "healthy", "applied")),
        Ok(Ok(false)) => unhealthy(health("error", "healthy", "pending")),
        _ => unhealthy(health("error", "unhealthy", "unknown")),
    }
}

fn unhealthy(health: Health) -> Reply {
    retry_after(json(StatusCode::SERVICE_UNAVAILABLE, &health))
}

/// Prometheus text exposition format.
pub fn metrics(state: &AppState) -> Reply {
    let mut text = state.metrics.render(state.db.pool_status());
    state.archiving.render(&mut text);
    with_content_type(StatusCode::OK, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"), text)
}
