//! # order-api
//!
//! The transactional core of a shop: products, orders, stock reservation and cancellation on
//! PostgreSQL, over HTTP/1.1 and JSON. It never oversells (rows locked in a fixed order, a
//! CHECK constraint behind them), never loses an acknowledged order (201 only after COMMIT)
//! and never leaves half an order behind (one transaction per order).
//!
//! ## Layout
//! - [`config`]: environment (and `.env`) to [`config::Config`], defaults in one place.
//! - [`http`]: generic server machinery: accept loop, connection limits, graceful shutdown,
//!   and around each request its id, deadline, log line and metrics.
//! - [`api`]: the route table, and one file per resource: parse the request, make one call
//!   into `db`, render the response.
//! - [`db`]: `Db`, the one door to PostgreSQL: the connection pool, statements and
//!   transactions, the embedded migration runner, and one file per resource holding its SQL
//!   (order events' outbox and webhook deliveries included).
//! - [`events`]: what leaves the service: webhook deliveries of the order events.
//! - [`domain`]: the typed values requests are parsed into; [`money`]: exact amounts.
//! - [`auth`]: who is calling (`AUTH_MODE`, the operator token, JWTs).
//! - [`error`]: the one error type and its table of status, code and body.
//! - [`deadline`]: the request deadline, set by `http` and honoured by `db`.
//! - [`telemetry`]: `tracing` for JSON log lines and OpenTelemetry traces (OTLP/HTTP);
//!   [`metrics`]: Prometheus text; [`tls`]: rustls client settings.
//! - [`archiving`]: watches PostgreSQL's WAL archiving, which the backups rely on.
//!
//! Data flows one way: `http` -> `api` -> `db` -> (`domain`, `error`, `money`), and
//! `events` -> `db` for what goes out.

pub mod api;
pub mod archiving;
pub mod auth;
pub mod config;
pub mod db;
pub mod deadline;
pub mod domain;
pub mod error;
pub mod events;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod money;
pub mod rate_limit;
pub mod sync;
pub mod telemetry;
pub mod tls;

/// The version of this build, from Cargo.toml (`order-api --version`, `order_api_build_info`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this build was made from, or `unknown` (see build.rs).
pub const GIT_COMMIT: &str = env!("ORDER_API_GIT_COMMIT");

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    api::AppState,
    auth::{Auth, AuthMode},
    config::Config,
    db::{Db, DbSettings, PlaceSettings, PoolSettings, Retention, StartupError},
    events::{DispatchSettings, Dispatcher, SendSettings},
    metrics::Metrics,
};

/// First wait between attempts to reach the database at start-up; doubles up to the max.
const STARTUP_RETRY_FIRST: Duration = Duration::from_millis(100);
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(2);

/// Applies pending migrations, and loads the seed data when `seed` is set. Waits for the
/// database with backoff (it may still be starting, as in docker-compose) up to
/// `config.startup_timeout`.
pub async fn prepare_database(config: &Config, seed: bool) -> Result<(), StartupError> {
    let mut client = connect_at_startup(config).await?;
    db::migrate::run(&mut client).await?;
    if seed {
        seed_database(&mut client).await?;
    }
    Ok(())
}

/// What `serve` does before it listens: `prepare_database` when `MIGRATE_ON_START` is on (the
/// default); else only checks that every migration is applied, and refuses to start if not,
/// for deployments whose runtime role may not change the schema (`order-api migrate` runs
/// first, as a separate step with a role that may).
pub async fn check_database(config: &Config) -> Result<(), StartupError> {
    if config.migrate_on_start {
        return prepare_database(config, config.seed_on_start).await;
    }
    let mut client = connect_at_startup(config).await?;
    let pending = db::migrate::pending(&client).await?;
    if !pending.is_empty() {
        return Err(format!(
            "MIGRATE_ON_START=false and migrations are pending ({}): run `order-api migrate` first",
            pending.join(", ")
        )
        .into());
    }
    if config.seed_on_start {
        seed_database(&mut client).await?;
    }
    Ok(())
}

async fn seed_database(client: &mut tokio_postgres::Client) -> Result<(), StartupError> {
    db::seed(client).await?;
    tracing::info!("seed data loaded");
    Ok(())
}

/// A connection for the start-up steps. Retries with backoff until `config.startup_timeout`
/// has passed since the first attempt; each attempt also ends at that deadline, so a database
/// host that never answers (packets dropped, not refused) cannot hold start-up longer.
async fn connect_at_startup(config: &Config) -> Result<tokio_postgres::Client, StartupError> {
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let mut wait = STARTUP_RETRY_FIRST;
    loop {
        let error = match tokio::time::timeout_at(deadline, db::connect(&config.database()?)).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => e.to_string(),
            Err(_elapsed) => "no answer".to_owned(),
        };
        if tokio::time::Instant::now() + wait >= deadline {
            let waited = config.startup_timeout.as_millis();
            return Err(format!("database not reachable within {waited} ms (DB_STARTUP_TIMEOUT_MS): {error}").into());
        }
        tracing::warn!(error = %error, retry_in_ms = wait.as_millis(), "database not reachable yet; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(STARTUP_RETRY_MAX);
    }
}

/// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests
/// and closes the database pool. The database must already be migrated.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let db = Db::start(db_settings(&config)?);
    let auth = auth_from(&config)?;
    // The JWKS URL's keys: fetched once before serving (a failure is logged, and tokens with
    // its kids are refused until a later fetch works), then every few minutes.
    let jwks_refresh = match auth.remote_jwks() {
        Some(remote) => {
            let _ = remote.refresh().await;
            Some(tokio::spawn(remote.refresh_periodically()))
        }
        None => None,
    };
    let order_limit = rate_limit::RateLimiter::new(config.rate_limit_orders_per_minute);
    let retention = Retention { idempotency_keys: config.idempotency_retention, events: config.event_retention };
    let purge = tokio::spawn(db.clone().purge_periodically(retention, config.purge_interval));
    let metrics = Arc::new(Metrics::default());
    let dispatcher = Dispatcher::start(db.clone(), dispatch_settings(&config), metrics.clone())?;
    let archiving = Arc::new(archiving::ArchiveWatch::default());
    let archive_watch = match config.wal_archive_check {
        Duration::ZERO => None,
        interval => Some(archiving.clone().start(db.clone(), interval).await),
    };
    let state = Arc::new(AppState { config, db: db.clone(), metrics, auth, order_limit, archiving });
    http::serve(listener, state, shutdown).await;
    dispatcher.stop();
    purge.abort();
    if let Some(watch) = archive_watch {
        watch.abort();
    }
    if let Some(refresh) = jwks_refresh {
        refresh.abort();
    }
    db.close();
    Ok(())
}

/// The database's settings, from the configuration. The pool settings are the same for the
/// primary and the standby of `DATABASE_READ_URL`.
fn db_settings(config: &Config) -> Result<DbSettings, StartupError> {
    Ok(DbSettings {
        primary: config.database()?,
        standby: config.read_database()?,
        pool: PoolSettings {
            max_size: config.pool_size,
            acquire_timeout: config.pool_timeout,
            connect_timeout: config.connect_timeout,
            statement_timeout: config.statement_timeout,
            unnamed_statements: config.transaction_pooler,
            max_lifetime: config.connection_max_lifetime,
        },
        place: PlaceSettings {
            batch_max: config.order_batch_max,
            key_retention: config.idempotency_retention,
            store_refusal: api::reply::stored_refusal,
            lock_patience: PlaceSettings::patience_for(config.statement_timeout),
        },
    })
}

/// How webhooks are delivered, from the configuration.
fn dispatch_settings(config: &Config) -> DispatchSettings {
    DispatchSettings {
        send: SendSettings {
            allowed_hosts: config.webhook_allowed_hosts.clone(),
            allow_http: config.webhook_allow_http,
            timeout: config.webhook_timeout,
            retry_scale: config.webhook_retry_scale,
            ca_file: config.webhook_ca_file.clone(),
        },
        per_endpoint: config.webhook_concurrency,
        disable_after: events::schedule::DISABLE_AFTER.mul_f64(config.webhook_retry_scale),
    }
}

/// The credentials the service accepts, from the configuration; says at start what is open.
fn auth_from(config: &Config) -> Result<Auth, StartupError> {
    let verifier = auth::jwt::Verifier::new(&config.jwt)?;
    let auth = Auth::new(config.auth_mode, config.operator_token.clone(), verifier)?;
    if auth.mode() == AuthMode::Open {
        tracing::warn!(
            "AUTH_MODE=open: any caller can order, read and cancel as any user; set AUTH_MODE=jwt in production"
        );
    }
    if config.operator_token.is_none() && auth.mode() == AuthMode::Open {
        tracing::info!("operator endpoints are disabled: set OPERATOR_TOKEN to enable them");
    }
    Ok(auth)
}
