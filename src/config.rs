//! Configuration from the environment, with every default in one place.
//!
//! A value that is set but cannot be parsed stops the process with a message naming the
//! variable: silently falling back to the default would hide a typo in production.

use std::{collections::HashMap, env, fmt, net::IpAddr, time::Duration};

use crate::{
    auth::{AuthMode, Secret, jwt::JwtSettings},
    db::Target,
    telemetry::otlp::{SamplerSetting, TraceSettings},
};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// Used when `DATABASE_URL` is unset: the local PostgreSQL that `make run` expects.
pub const DEFAULT_DATABASE_URL: &str = "postgresql://postgres:postgres@localhost:5432/ecommerce";

#[derive(Debug, Clone)]
pub struct Config {
    /// `API_HOST`: address to listen on; all interfaces by default, as a container needs.
    pub host: IpAddr,
    /// `API_PORT`: the contract's port, 3000.
    pub port: u16,
    /// `DATABASE_URL`: a libpq-style URL or key=value string.
    pub database_url: String,
    /// `DATABASE_READ_URL`: a standby for the catalogue reads (`GET /api/products...`), if
    /// any; everything else, order reads included, stays on `DATABASE_URL`.
    pub database_read_url: Option<String>,
    /// `ORDER_BATCH_MAX`: the most orders, keyed or not, placed in one transaction when they
    /// arrive faster than they commit (1 to 256; 1: one order per transaction).
    pub order_batch_max: usize,
    /// `DB_PASSWORD_FILE`: the database password read from a file (a Docker secret), used
    /// instead of one in `DATABASE_URL`.
    pub database_password: Option<Secret>,
    /// `DB_POOL_SIZE`: most PostgreSQL connections open at once. PostgreSQL on few cores is
    /// fastest with few active backends, so more connections only add queueing inside it:
    /// on 2 cores (`make bench`), 8 takes about 50% more orders per second than 16 and has
    /// less than half its p99; 4 does as well on one contended product, a little worse otherwise.
    pub pool_size: usize,
    /// `DB_POOL_TIMEOUT_MS`: how long a request waits for a free connection before a 503.
    pub pool_timeout: Duration,
    /// `DB_CONNECT_TIMEOUT_MS`: how long opening one connection may take.
    pub connect_timeout: Duration,
    /// `DB_STATEMENT_TIMEOUT_MS`: PostgreSQL `statement_timeout` (and `lock_timeout`) on every
    /// connection, so a stuck lock or query cannot hold a connection forever.
    pub statement_timeout: Duration,
    /// `REQUEST_TIMEOUT_MS`: deadline for one request from headers read to response ready.
    pub request_timeout: Duration,
    /// `HEADER_READ_TIMEOUT_MS`: a client must send its request headers within this time
    /// (also the idle time a keep-alive connection may wait for its next request).
    pub header_read_timeout: Duration,
    /// `MAX_CONNECTIONS`: most client connections served at once; more get a 503 and are closed.
    pub max_connections: usize,
    /// `SHUTDOWN_GRACE_MS`: how long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `DB_CONNECTION_MAX_LIFETIME_SECS`: a database connection this old is closed and replaced.
    pub connection_max_lifetime: Duration,
    /// `DB_TRANSACTION_POOLER`: true when `DATABASE_URL` points at a transaction-mode pooler
    /// such as PgBouncer (before 1.21): statements are then sent unnamed and no session
    /// options are sent (set `statement_timeout` and `lock_timeout` on the database role).
    pub transaction_pooler: bool,
    /// `DB_STARTUP_TIMEOUT_MS`: how long start-up waits for the database to become reachable.
    pub startup_timeout: Duration,
    /// `IDEMPOTENCY_RETENTION_HOURS`: how long an idempotency key and its response are kept.
    pub idempotency_retention: Duration,
    /// `EVENT_RETENTION_DAYS`: how long order events are kept for the feed; a feed position
    /// older than that is 410 CURSOR_EXPIRED.
    pub event_retention: Duration,
    /// `PURGE_INTERVAL_SECS`: how often idempotency keys and events past their retention are
    /// deleted in the background (a setting so that a test can watch a purge run).
    pub purge_interval: Duration,
    /// `WEBHOOK_ALLOW_HTTP`: allow plain `http://` endpoint URLs (https only by default).
    pub webhook_allow_http: bool,
    /// `WEBHOOK_ALLOWED_HOSTS`: comma-separated hosts webhooks may go to although they resolve
    /// to a loopback, private or link-local address (all such are refused otherwise).
    pub webhook_allowed_hosts: Vec<String>,
    /// `WEBHOOK_TIMEOUT_MS`: how long one delivery attempt may take, connection to answer.
    pub webhook_timeout: Duration,
    /// `WEBHOOK_RETRY_SCALE`: every delay of the retry schedule (and the 5 days after which a
    /// failing endpoint is disabled) times this; 1 in production, small in tests.
    pub webhook_retry_scale: f64,
    /// `WEBHOOK_CONCURRENCY`: delivery attempts in flight at once per endpoint, from one replica.
    pub webhook_concurrency: usize,
    /// `WEBHOOK_CA_FILE`: PEM CA certificates https endpoints are checked against, instead of
    /// the system's store.
    pub webhook_ca_file: Option<String>,
    /// `SEED_ON_START`: load the seed data at start (idempotent), as docker-compose does.
    pub seed_on_start: bool,
    /// `MIGRATE_ON_START`: apply pending migrations at start. Off for a runtime role without
    /// DDL rights: `order-api migrate` then runs as a step of its own, and `serve` refuses to
    /// start while migrations are pending.
    pub migrate_on_start: bool,
    /// `LOG_LEVEL`: error, warn, info, debug or trace, for every module.
    pub log_level: LevelFilter,
    /// `RUST_LOG`: per-module levels (`info,order_api::db=debug`), as `tracing` services read
    /// it; when set it wins over `LOG_LEVEL`.
    pub rust_log: Option<Targets>,
    /// `LOG_BUFFER_BYTES`: most bytes of log lines waiting for stdout; past it lines are
    /// dropped and counted (see `telemetry`).
    pub log_buffer_bytes: usize,
    /// The `OTEL_*` settings of traces; off unless an OTLP endpoint is set.
    pub traces: TraceSettings,
    /// `RATE_LIMIT_ORDERS_PER_MINUTE`: most orders one user, and one client address, may
    /// place per minute on one replica (bursts up to it, then at that rate); 0 (the default):
    /// no limit.
    pub rate_limit_orders_per_minute: u32,
    /// `AUTH_MODE`: `open` (the default: anyone may act as any user, as the replaced service
    /// allowed) or `jwt` (customers carry a JWT; see `auth`).
    pub auth_mode: AuthMode,
    /// `OPERATOR_TOKEN` or `OPERATOR_TOKEN_FILE`: the bearer token of the operator endpoints;
    /// without it (and without operator JWTs) they are disabled.
    pub operator_token: Option<Secret>,
    /// `WAL_ARCHIVE_CHECK_SECS`: how often `pg_stat_archiver` is read for the metrics, the
    /// readiness body and the log (see `archiving`); 0 turns the watch off.
    pub wal_archive_check: Duration,
    /// `AUTH_JWT_HS256_SECRET` (or `_FILE`), `AUTH_JWT_JWKS_FILE` (read at start),
    /// `AUTH_JWT_ISSUER`, `AUTH_JWT_AUDIENCE`, `AUTH_JWT_LEEWAY_SECS`.
    pub jwt: JwtSettings,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 3000,
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            database_read_url: None,
            order_batch_max: 64,
            database_password: None,
            pool_size: 8,
            pool_timeout: Duration::from_millis(2_000),
            connect_timeout: Duration::from_millis(3_000),
            statement_timeout: Duration::from_millis(5_000),
            request_timeout: Duration::from_millis(10_000),
            header_read_timeout: Duration::from_millis(10_000),
            max_connections: 1_024,
            shutdown_grace: Duration::from_millis(8_000),
            connection_max_lifetime: Duration::from_secs(1800),
            transaction_pooler: false,
            startup_timeout: Duration::from_millis(60_000),
            idempotency_retention: Duration::from_secs(24 * 3600),
            event_retention: Duration::from_secs(30 * 24 * 3600),
            purge_interval: Duration::from_secs(600),
            webhook_allow_http: false,
            webhook_allowed_hosts: Vec::new(),
            webhook_timeout: Duration::from_millis(15_000),
            webhook_retry_scale: 1.0,
            webhook_concurrency: 16,
            webhook_ca_file: None,
            seed_on_start: false,
            migrate_on_start: true,
            log_level: LevelFilter::INFO,
            rust_log: None,
            log_buffer_bytes: crate::telemetry::DEFAULT_BUFFER_BYTES,
            traces: TraceSettings::default(),
            rate_limit_orders_per_minute: 0,
            auth_mode: AuthMode::Open,
            operator_token: None,
            jwt: JwtSettings { leeway_secs: DEFAULT_JWT_LEEWAY_SECS, ..JwtSettings::default() },
            wal_archive_check: Duration::from_secs(30),
        }
    }
}

/// A variable that is set to something that cannot be used.
#[derive(Debug)]
pub struct ConfigError {
    variable: &'static str,
    value: String,
    expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?} is not valid: expected {}", self.variable, self.value, self.expected)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The connection settings of the database: `DATABASE_URL` with `DB_PASSWORD_FILE`'s
    /// password.
    pub fn database(&self) -> Result<Target, String> {
        self.target(&self.database_url)
    }

    /// The same for `DATABASE_READ_URL`, when it is set.
    pub fn read_database(&self) -> Result<Option<Target>, String> {
        self.database_read_url.as_deref().map(|url| self.target(url)).transpose()
    }

    fn target(&self, url: &str) -> Result<Target, String> {
        let mut database = url.parse::<Target>()?;
        if let Some(password) = &self.database_password {
            database.config.password(password.expose());
        }
        Ok(database)
    }

    /// Reads the process environment, then `.env` in the working directory for what the
    /// environment does not set (the real environment wins, as with dotenv).
    pub fn load() -> Result<Config, ConfigError> {
        let dotenv = read_dotenv(".env");
        Config::from_lookup(|name| env::var(name).ok().or_else(|| dotenv.get(name).cloned()))
    }

    /// The configuration that `lookup` (variable name to value) describes, keeping the default
    /// for every variable that is unset or empty.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let set = Source(lookup);
        set.set(&mut config.host, "API_HOST", "an IP address", |v| v.parse().ok())?;
        set.set(&mut config.port, "API_PORT", "a port number", |v| v.parse().ok())?;
        set.set(&mut config.database_url, "DATABASE_URL", "a URL", |v| Some(v.to_owned()))?;
        set.set(&mut config.database_read_url, "DATABASE_READ_URL", "a URL", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.order_batch_max, "ORDER_BATCH_MAX", "an integer from 1 to 256", |v| {
            v.parse().ok().filter(|n| (1..=crate::db::MAX_BATCH).contains(n))
        })?;
        set.set(&mut config.pool_size, "DB_POOL_SIZE", "an integer from 1 to 1000", |v| {
            v.parse().ok().filter(|n| (1..=1000).contains(n))
        })?;
        set.set(&mut config.pool_timeout, "DB_POOL_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.connect_timeout, "DB_CONNECT_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.statement_timeout, "DB_STATEMENT_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.request_timeout, "REQUEST_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.header_read_timeout, "HEADER_READ_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.max_connections, "MAX_CONNECTIONS", "a positive integer", |v| {
            v.parse().ok().filter(|n| *n > 0)
        })?;
        set.set(&mut config.shutdown_grace, "SHUTDOWN_GRACE_MS", "milliseconds", millis)?;
        set.set(
            &mut config.connection_max_lifetime,
            "DB_CONNECTION_MAX_LIFETIME_SECS",
            "a positive number of seconds",
            |v| v.parse::<u64>().ok().filter(|n| *n > 0).map(Duration::from_secs),
        )?;
        set.set(&mut config.transaction_pooler, "DB_TRANSACTION_POOLER", "true or false", |v| v.parse().ok())?;
        set.set(&mut config.startup_timeout, "DB_STARTUP_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(&mut config.idempotency_retention, "IDEMPOTENCY_RETENTION_HOURS", "a positive number of hours", |v| {
            v.parse::<u64>().ok().filter(|h| *h > 0).map(|h| Duration::from_secs(h * 3600))
        })?;
        set.set(&mut config.event_retention, "EVENT_RETENTION_DAYS", "a positive number of days", |v| {
            v.parse::<u64>().ok().filter(|d| *d > 0).map(|d| Duration::from_secs(d * 24 * 3600))
        })?;
        set.set(&mut config.purge_interval, "PURGE_INTERVAL_SECS", "a positive number of seconds", |v| {
            v.parse::<u64>().ok().filter(|s| *s > 0).map(Duration::from_secs)
        })?;
        set.set(&mut config.webhook_allow_http, "WEBHOOK_ALLOW_HTTP", "true or false", |v| v.parse().ok())?;
        set.set(&mut config.webhook_allowed_hosts, "WEBHOOK_ALLOWED_HOSTS", "comma-separated hosts", |v| {
            Some(v.split(',').map(str::trim).filter(|host| !host.is_empty()).map(str::to_owned).collect())
        })?;
        set.set(&mut config.webhook_timeout, "WEBHOOK_TIMEOUT_MS", "milliseconds", millis)?;
        set.set(
            &mut config.webhook_retry_scale,
            "WEBHOOK_RETRY_SCALE",
            "a positive number (1: the real schedule)",
            |v| v.parse::<f64>().ok().filter(|n| n.is_finite() && *n > 0.0),
        )?;
        set.set(&mut config.webhook_concurrency, "WEBHOOK_CONCURRENCY", "an integer from 1 to 256", |v| {
            v.parse().ok().filter(|n| (1..=256).contains(n))
        })?;
        set.set(&mut config.webhook_ca_file, "WEBHOOK_CA_FILE", "a file", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.seed_on_start, "SEED_ON_START", "true or false", |v| v.parse().ok())?;
        set.set(&mut config.migrate_on_start, "MIGRATE_ON_START", "true or false", |v| v.parse().ok())?;
        set.set(&mut config.log_level, "LOG_LEVEL", "error, warn, info, debug or trace", parse_level)?;
        set.set(&mut config.rust_log, "RUST_LOG", "directives such as info,order_api::db=debug", |v| {
            v.parse::<Targets>().ok().map(Some)
        })?;
        set.set(&mut config.log_buffer_bytes, "LOG_BUFFER_BYTES", "a positive number of bytes", |v| {
            v.parse().ok().filter(|n| *n > 0)
        })?;
        set.set(
            &mut config.rate_limit_orders_per_minute,
            "RATE_LIMIT_ORDERS_PER_MINUTE",
            "a number of orders (0 for no limit)",
            |v| v.parse().ok(),
        )?;
        set.set(&mut config.auth_mode, "AUTH_MODE", "open or jwt", AuthMode::parse)?;
        set.set(&mut config.wal_archive_check, "WAL_ARCHIVE_CHECK_SECS", "seconds (0: off)", |v| {
            v.parse().ok().map(Duration::from_secs)
        })?;
        config.operator_token = set.secret("OPERATOR_TOKEN", "OPERATOR_TOKEN_FILE")?;
        // Only the file: a plain DB_PASSWORD is docker-compose's, for the database service.
        let mut password_file = None;
        set.set(&mut password_file, "DB_PASSWORD_FILE", "a file", |v| Some(Some(v.to_owned())))?;
        if let Some(path) = password_file {
            config.database_password = Some(Secret::new(read_file("DB_PASSWORD_FILE", &path)?.trim_end()));
        }
        config.jwt.hs256_secret = set.secret("AUTH_JWT_HS256_SECRET", "AUTH_JWT_HS256_SECRET_FILE")?;
        let mut jwks_file = None;
        set.set(&mut jwks_file, "AUTH_JWT_JWKS_FILE", "a file", |v| Some(Some(v.to_owned())))?;
        if let Some(path) = jwks_file {
            config.jwt.jwks = Some(read_file("AUTH_JWT_JWKS_FILE", &path)?);
        }
        set.set(&mut config.jwt.jwks_url, "AUTH_JWT_JWKS_URL", "an https URL", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.jwt.jwks_ca_file, "AUTH_JWT_JWKS_CA_FILE", "a file", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.jwt.issuer, "AUTH_JWT_ISSUER", "an issuer", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.jwt.audience, "AUTH_JWT_AUDIENCE", "an audience", |v| Some(Some(v.to_owned())))?;
        set.set(&mut config.jwt.leeway_secs, "AUTH_JWT_LEEWAY_SECS", "0 to 60 seconds", |v| {
            v.parse().ok().filter(|n| *n <= crate::auth::jwt::MAX_LEEWAY_SECS)
        })?;
        config.traces = set.traces()?;
        Ok(config)
    }

    /// The log filter: `RUST_LOG` when set, else `LOG_LEVEL` for every module.
    pub fn log_filter(&self) -> Targets {
        self.rust_log.clone().unwrap_or_else(|| Targets::new().with_default(self.log_level))
    }
}

/// `LOG_LEVEL`'s values (`warning` too).
fn parse_level(value: &str) -> Option<LevelFilter> {
    match value.to_ascii_lowercase().as_str() {
        "error" => Some(LevelFilter::ERROR),
        "warn" | "warning" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

/// The path OTLP/HTTP collectors take traces at, after `OTEL_EXPORTER_OTLP_ENDPOINT`.
const OTLP_TRACES_PATH: &str = "/v1/traces";

/// Clock leeway for JWT `exp` and `nbf` unless `AUTH_JWT_LEEWAY_SECS` says otherwise.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;

/// Where variables are read from: name to value.
struct Source<F>(F);

impl<F: Fn(&str) -> Option<String>> Source<F> {
    /// Parses `variable` into `slot` if it is set and not blank; a value that does not parse
    /// is an error naming the variable and what it expects.
    fn set<T>(
        &self,
        slot: &mut T,
        variable: &'static str,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<(), ConfigError> {
        match (self.0)(variable) {
            Some(value) if !value.trim().is_empty() => {
                *slot = parse(value.trim()).ok_or(ConfigError { variable, value, expected })?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A secret given as `NAME` or, by the Docker secrets convention, as the path of a file in
    /// `NAME_FILE` (its content, without the trailing newline). Both at once is an error: which
    /// one wins would be a guess. An error never shows the secret.
    fn secret(&self, name: &'static str, file_variable: &'static str) -> Result<Option<Secret>, ConfigError> {
        let given = |variable| (self.0)(variable).filter(|value: &String| !value.trim().is_empty());
        match (given(name), given(file_variable)) {
            (Some(_), Some(_)) => Err(ConfigError {
                variable: file_variable,
                value: String::new(),
                expected: "to be unset when the plain variable is set (one or the other)",
            }),
            (Some(value), None) => Ok(Some(Secret::new(value.trim()))),
            (None, Some(path)) => Ok(Some(Secret::new(read_file(file_variable, path.trim())?.trim_end()))),
            (None, None) => Ok(None),
        }
    }
}

impl<F: Fn(&str) -> Option<String>> Source<F> {
    /// The OpenTelemetry variables of traces, by the specification's names and meanings; the
    /// exporter is OTLP over HTTP with protobuf, so `OTEL_EXPORTER_OTLP_PROTOCOL` may only say
    /// that (a collector's gRPC port would not understand it: better refused at start).
    fn traces(&self) -> Result<TraceSettings, ConfigError> {
        let mut traces = TraceSettings::default();
        let url = |v: &str| {
            let http = v.starts_with("http://") || v.starts_with("https://");
            (http && v.parse::<hyper::Uri>().is_ok_and(|uri| uri.host().is_some())).then(|| v.to_owned())
        };
        let mut base = None;
        self.set(&mut base, "OTEL_EXPORTER_OTLP_ENDPOINT", "an http:// or https:// URL", |v| url(v).map(Some))?;
        self.set(&mut traces.endpoint, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "an http:// or https:// URL", |v| {
            url(v).map(Some)
        })?;
        if traces.endpoint.is_none() {
            traces.endpoint = base.map(|base: String| format!("{}{OTLP_TRACES_PATH}", base.trim_end_matches('/')));
        }
        let mut protocol = String::from("http/protobuf");
        self.set(&mut protocol, "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf (the only one supported)", |v| {
            (v == "http/protobuf").then(|| v.to_owned())
        })?;
        let mut headers = None;
        self.set(&mut headers, "OTEL_EXPORTER_OTLP_HEADERS", "name=value pairs separated by commas", |v| {
            key_values(v).map(Some)
        })?;
        traces.headers =
            headers.unwrap_or_default().into_iter().map(|(name, value)| (name, Secret::new(value))).collect();
        self.set(&mut traces.certificate, "OTEL_EXPORTER_OTLP_CERTIFICATE", "a PEM file", |v| {
            Some(Some(v.to_owned()))
        })?;
        self.set(&mut traces.service_name, "OTEL_SERVICE_NAME", "a name", |v| Some(v.to_owned()))?;
        self.set(
            &mut traces.resource_attributes,
            "OTEL_RESOURCE_ATTRIBUTES",
            "key=value pairs separated by commas",
            key_values,
        )?;
        let mut sampler = None;
        self.set(&mut sampler, "OTEL_TRACES_SAMPLER", "a sampler name", |v| Some(Some(v.to_owned())))?;
        let mut arg = None;
        self.set(&mut arg, "OTEL_TRACES_SAMPLER_ARG", "a ratio from 0 to 1", |v| Some(Some(v.to_owned())))?;
        if sampler.is_some() || arg.is_some() {
            let name = sampler.clone().unwrap_or_else(|| "parentbased_always_on".to_owned());
            traces.sampler = SamplerSetting::parse(&name, arg.as_deref()).ok_or(ConfigError {
                variable: if sampler.is_some() && SamplerSetting::parse(&name, None).is_none() {
                    "OTEL_TRACES_SAMPLER"
                } else {
                    "OTEL_TRACES_SAMPLER_ARG"
                },
                value: if SamplerSetting::parse(&name, None).is_none() {
                    name.clone()
                } else {
                    arg.unwrap_or_default()
                },
                expected: "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or \
                           parentbased_traceidratio, with a ratio from 0 to 1 in OTEL_TRACES_SAMPLER_ARG",
            })?;
        }
        self.set(&mut traces.disabled, "OTEL_SDK_DISABLED", "true or false", |v| v.to_ascii_lowercase().parse().ok())?;
        Ok(traces)
    }
}

/// `key=value,key2=value2` as the OpenTelemetry variables write it (values percent-encoded).
fn key_values(text: &str) -> Option<Vec<(String, String)>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let value = percent_encoding::percent_decode_str(value.trim()).decode_utf8().ok()?;
            let key = key.trim();
            (!key.is_empty()).then(|| (key.to_owned(), value.into_owned()))
        })
        .collect()
}

fn read_file(variable: &'static str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|_| ConfigError {
        variable,
        value: path.to_owned(),
        expected: "a readable file",
    })
}

/// A positive number of milliseconds.
fn millis(value: &str) -> Option<Duration> {
    value.parse().ok().filter(|n| *n > 0).map(Duration::from_millis)
}

/// The `KEY=VALUE` lines of a dotenv file, if there is one. Blank lines and `#` comments are
/// skipped; `export ` before a key is allowed; values may be wrapped in single or double
/// quotes. Read into a map rather than into the process environment: changing the
/// environment of a running process is unsafe once threads exist, and needless here.
fn read_dotenv(path: &str) -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else { return HashMap::new() };
    let mut values = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        values.insert(key.trim().to_owned(), value.to_owned());
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn unset_and_blank_variables_keep_their_defaults() {
        let config = from(&[("API_PORT", "  ")]).unwrap();
        assert_eq!(config.port, Config::default().port);
        assert!(config.migrate_on_start);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let error = from(&[("DB_POOL_SIZE", "0")]).unwrap_err().to_string();
        assert!(error.contains("DB_POOL_SIZE") && error.contains("1 to 1000"), "{error}");
        let config = from(&[("MIGRATE_ON_START", "false"), ("REQUEST_TIMEOUT_MS", "2500")]).unwrap();
        assert!(!config.migrate_on_start);
        assert_eq!(config.request_timeout, Duration::from_millis(2500));
    }

    /// Secrets from files (the Docker secrets convention), without the trailing newline; the
    /// plain variable and its file at once is an error that does not show the secret.
    #[test]
    fn secrets_come_from_files_too() {
        let dir = std::env::temp_dir();
        let token_file = dir.join(format!("order-api-token-{}", std::process::id()));
        let password_file = dir.join(format!("order-api-password-{}", std::process::id()));
        std::fs::write(&token_file, "operator-token-from-a-file-0123456789\n").unwrap();
        std::fs::write(&password_file, "s3cret from a file\n").unwrap();
        let config = from(&[
            ("OPERATOR_TOKEN_FILE", token_file.to_str().unwrap()),
            ("DB_PASSWORD_FILE", password_file.to_str().unwrap()),
            ("DATABASE_URL", "postgresql://shop:in-the-url@db:5432/ecommerce"),
        ])
        .unwrap();
        assert_eq!(config.operator_token.as_ref().map(Secret::expose), Some("operator-token-from-a-file-0123456789"));
        let database = config.database().unwrap();
        assert_eq!(database.config.get_password(), Some(&b"s3cret from a file"[..]));
        assert_eq!(database.config.get_user(), Some("shop"));

        let both = from(&[
            ("OPERATOR_TOKEN", "plain-token-plain-token-plain-token"),
            ("OPERATOR_TOKEN_FILE", token_file.to_str().unwrap()),
        ]);
        let error = both.unwrap_err().to_string();
        assert!(error.contains("OPERATOR_TOKEN_FILE") && !error.contains("plain-token"), "{error}");
        assert!(from(&[("DB_PASSWORD_FILE", "/nonexistent/password")]).is_err());
        std::fs::remove_file(token_file).unwrap();
        std::fs::remove_file(password_file).unwrap();
    }

    /// The OpenTelemetry variables as the specification reads them.
    #[test]
    fn trace_settings_follow_the_opentelemetry_variables() {
        let traces = |pairs: &[(&str, &str)]| from(pairs).map(|config| config.traces);
        assert!(!traces(&[]).unwrap().enabled(), "off without an endpoint");
        let base = traces(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(base.endpoint.as_deref(), Some("http://collector:4318/v1/traces"));
        assert!(base.enabled());
        let both = traces(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example.com/custom"),
        ])
        .unwrap();
        assert_eq!(both.endpoint.as_deref(), Some("https://traces.example.com/custom"), "taken as it is");
        let full = traces(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=se%20cret, x-tenant=shop"),
            ("OTEL_SERVICE_NAME", "orders-eu"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])
        .unwrap();
        let headers: Vec<(&str, &str)> = full.headers.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
        assert_eq!(headers, [("api-key", "se cret"), ("x-tenant", "shop")]);
        assert!(!format!("{full:?}").contains("se cret"), "headers are secrets");
        assert_eq!(full.service_name, "orders-eu");
        assert_eq!(full.resource_attributes, [("deployment.environment".to_owned(), "prod".to_owned())]);
        assert_eq!(
            full.sampler,
            SamplerSetting { parent_based: true, root: crate::telemetry::otlp::RootSampler::Ratio(0.01) }
        );
        assert!(!full.enabled(), "OTEL_SDK_DISABLED wins");

        for (variable, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
        ] {
            let error = from(&[(variable, value)]).unwrap_err().to_string();
            assert!(error.contains(variable), "{variable}={value}: {error}");
        }
        assert!(from(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).is_ok());
    }

    #[test]
    fn rust_log_wins_over_log_level() {
        let config = from(&[("LOG_LEVEL", "warn"), ("RUST_LOG", "info,order_api::db=debug")]).unwrap();
        let filter = config.log_filter();
        assert!(filter.would_enable("order_api::db::pool", &tracing::Level::DEBUG));
        assert!(filter.would_enable("order_api::http", &tracing::Level::INFO));
        assert!(!filter.would_enable("order_api::http", &tracing::Level::DEBUG));
        let level_only = from(&[("LOG_LEVEL", "warn")]).unwrap().log_filter();
        assert!(!level_only.would_enable("order_api::http", &tracing::Level::INFO));
        assert!(from(&[("LOG_LEVEL", "loud")]).is_err());
    }

    #[test]
    fn dotenv_lines_are_read_with_quotes_comments_and_export() {
        let path = std::env::temp_dir().join(format!("order-api-dotenv-{}", std::process::id()));
        std::fs::write(
            &path,
            "# comment\n\nexport API_PORT=4000\nLOG_LEVEL='debug'\nDATABASE_URL=\"postgresql://x/y\"\nnot a pair\n",
        )
        .unwrap();
        let values = read_dotenv(path.to_str().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(values.get("API_PORT").map(String::as_str), Some("4000"));
        assert_eq!(values.get("LOG_LEVEL").map(String::as_str), Some("debug"));
        assert_eq!(values.get("DATABASE_URL").map(String::as_str), Some("postgresql://x/y"));
        assert_eq!(values.len(), 3);
    }
}
