//! `GET /health` and `GET /metrics`.

use std::time::Duration;

use hyper::{StatusCode, header::HeaderValue};
use serde::Serialize;

use crate::{
    AppState,
    http::response::{Reply, bytes_reply, json},
};

/// A health check must answer quickly even when the database hangs: past this, unhealthy.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The health body; a struct so the fields keep the contract's order.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    db: &'static str,
}

/// 200 `{"status":"ok","db":"healthy"}` when a pooled connection answers `SELECT 1`, else 503
/// `{"status":"error","db":"unhealthy"}`.
pub async fn check(state: &AppState) -> Reply {
    let probe = async {
        let conn = state.pool.get().await?;
        conn.client().simple_query("SELECT 1").await?;
        Ok::<(), crate::error::Error>(())
    };
    match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => json(StatusCode::OK, &Health { status: "ok", db: "healthy" }),
        _ => {
            let mut reply = json(StatusCode::SERVICE_UNAVAILABLE, &Health { status: "error", db: "unhealthy" });
            reply.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(crate::error::RETRY_AFTER_SECS));
            reply
        }
    }
}

/// Prometheus text exposition format.
pub fn metrics(state: &AppState) -> Reply {
    bytes_reply(
        StatusCode::OK,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        state.metrics.render(state.pool.status()),
    )
}
