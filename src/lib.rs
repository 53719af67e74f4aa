//! # order-api
//!
//! The transactional core of a shop: products, orders, stock reservation and cancellation on
//! PostgreSQL, over HTTP/1.1 and JSON. It never oversells (rows locked in a fixed order, a
//! CHECK constraint behind them), never loses an acknowledged order (201 only after COMMIT)
//! and never leaves half an order behind (one transaction per order).
//!
//! ## Layout
//! - [`config`]: environment to [`config::Config`], defaults in one place.
//! - [`http`]: accept loop, limits and timeouts, graceful shutdown, the route table, request
//!   ids and JSON responses.
//! - [`api`]: one file per resource: parse the request, call `db`, render the response.
//! - [`db`]: the connection pool, the embedded migration runner, and one file per resource
//!   holding its SQL.
//! - [`domain`]: the typed values requests are parsed into; [`money`]: exact amounts.
//! - [`error`]: the one error type and its mapping to status, code and body.
//! - [`log`], [`metrics`]: JSON log lines and Prometheus text.
//!
//! Data flows one way: `http` -> `api` -> `db`.

pub mod api;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;
pub mod log;
pub mod metrics;
pub mod money;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::Config,
    db::{Pool, PoolSettings, StartupError},
    metrics::Metrics,
};

/// What every request handler shares.
pub struct AppState {
    pub config: Config,
    pub pool: Pool,
    pub metrics: Metrics,
    /// Concurrent reads of the whole catalogue share one query.
    pub catalogue: db::products::CatalogueReads,
}

/// How often expired idempotency keys are deleted.
const IDEMPOTENCY_PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// First wait between attempts to reach the database at start-up; doubles up to the max.
const STARTUP_RETRY_FIRST: Duration = Duration::from_millis(100);
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(2);

/// Applies pending migrations, and loads the seed data when `seed` is set. Waits for the
/// database with backoff (it may still be starting, as in docker-compose) up to
/// `config.startup_timeout`.
pub async fn prepare_database(config: &Config, seed: bool) -> Result<(), StartupError> {
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let mut wait = STARTUP_RETRY_FIRST;
    let mut client = loop {
        match db::connect(&config.database_url).await {
            Ok(client) => break client,
            Err(e) if tokio::time::Instant::now() + wait < deadline => {
                log::warn(
                    "database not reachable yet; retrying",
                    serde_json::json!({"error": e.to_string(), "retry_in_ms": wait.as_millis()}),
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(STARTUP_RETRY_MAX);
            }
            Err(e) => return Err(format!("database not reachable: {e}").into()),
        }
    };
    db::migrate::run(&mut client).await?;
    if seed {
        db::seed(&mut client).await?;
        log::info("seed data loaded", serde_json::json!({}));
    }
    Ok(())
}

/// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests
/// and closes the database pool. The database must already be migrated.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let pool = Pool::new(
        &config.database_url,
        PoolSettings {
            max_size: config.pool_size,
            acquire_timeout: config.pool_timeout,
            connect_timeout: config.connect_timeout,
            statement_timeout: config.statement_timeout,
            unnamed_statements: config.transaction_pooler,
            max_lifetime: config.connection_max_lifetime,
        },
    )?;
    let purge = tokio::spawn(db::idempotency::purge_periodically(
        pool.clone(),
        config.idempotency_retention,
        IDEMPOTENCY_PURGE_INTERVAL,
    ));
    let state = Arc::new(AppState {
        config,
        pool: pool.clone(),
        metrics: Metrics::default(),
        catalogue: db::products::CatalogueReads::default(),
    });
    http::serve(listener, state, shutdown).await;
    purge.abort();
    pool.close();
    Ok(())
}
