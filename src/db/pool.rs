//! A small pool of tokio-postgres connections: checkout, and each connection's lifetime.
//!
//! What it guarantees, and how:
//! - **Bounded:** a semaphore holds one permit per connection that may exist; a request waits
//!   for a permit at most `acquire_timeout` (and never past its deadline), then gets
//!   `Error::Unavailable` (a 503), so a saturated database turns into fast, retryable failures
//!   instead of a growing queue.
//! - **Lazy and self-healing:** connections open on demand. A connection whose socket died
//!   (PostgreSQL restarted, backend terminated) is seen as closed and dropped, never handed
//!   out again; the next request opens a fresh one. While the database is down, opening fails
//!   at once (or within `connect_timeout`) and the request gets a 503; after a failure, new
//!   attempts back off (25 ms doubling to 500 ms), failing fast in between.
//! - **Clean:** a connection goes back to the pool only if nothing of a request is left on
//!   it. `pipeline.rs` marks a connection it could not finish with (its future was dropped
//!   mid-flight) and `tx.rs` one whose transaction was dropped without COMMIT or ROLLBACK; a
//!   marked connection is closed instead of reused, which ends whatever it had open on the
//!   server.
//!
//! Running statements is `pipeline.rs`; transactions that span round trips are `tx.rs`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{AsyncMessage, Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Target;
use crate::{deadline, error::Error, sync::lock};

/// The `application_name` of the service's connections, as `pg_stat_activity` shows them.
pub const APPLICATION_NAME: &str = "order-api";

/// How the pool is sized and how long it waits.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_size: usize,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    /// Set as PostgreSQL's `statement_timeout` and `lock_timeout` on every connection.
    pub statement_timeout: Duration,
    /// Behind a transaction-mode pooler (PgBouncer before 1.21): send statements unnamed, since
    /// a statement prepared on one server connection is gone when the next transaction runs on
    /// another, and send no session options (the pooler refuses them; set the timeouts on the
    /// database role instead).
    pub unnamed_statements: bool,
    /// A connection older than this is closed when it comes back instead of being reused:
    /// plans cached by its prepared statements are refreshed (a plan made while a table was
    /// empty can stay a sequential scan on a connection forever), and after a failover or a
    /// DNS change every connection moves to the new server in bounded time.
    pub max_lifetime: Duration,
}

/// Pool figures for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStatus {
    pub max_size: usize,
    /// Connections open, idle or in use.
    pub open: usize,
    /// Connections checked out by a request (or being opened for one).
    pub in_use: usize,
    /// Requests waiting for a connection.
    pub waiting: usize,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    /// The TLS connector `DATABASE_URL`'s sslmode asks for; also used to send cancel requests.
    tls: MakeRustlsConnect,
    settings: PoolSettings,
    /// One permit per connection that may be in use; held by `PooledConn` while checked out.
    permits: Arc<Semaphore>,
    /// Open connections not in use, most recently returned last and reused first.
    idle: Mutex<Vec<Conn>>,
    /// After a failed connect, new connects wait out a short, growing pause (the requests in
    /// between fail fast with 503), so a database that is down or restarting is not hammered by
    /// every request, and the service still notices its return within `MAX_CONNECT_BACKOFF`.
    backoff: Mutex<Backoff>,
    /// Connections currently open (idle, in use, or in the middle of a query).
    open: AtomicUsize,
    waiting: AtomicUsize,
    /// Set by `close`: connections are no longer kept or opened.
    closed: AtomicBool,
}

/// One PostgreSQL connection with its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    /// What the server said on the side (notices), as far as the service acts on it.
    pub(super) notices: Arc<Notices>,
    /// Statements prepared on this connection, keyed by their SQL text: a hot statement is
    /// parsed and planned by PostgreSQL once per connection.
    pub(super) statements: HashMap<&'static str, Statement>,
    /// When it was opened, for `PoolSettings::max_lifetime`.
    opened_at: Instant,
    /// Counts this connection in `Inner::open` until dropped.
    _open: OpenGuard,
}

/// The notices of one connection that change what an answer may promise.
#[derive(Default)]
pub(super) struct Notices {
    /// PostgreSQL's WARNING "canceling wait for synchronous replication ...": the transaction
    /// committed locally, but the synchronous standby has not confirmed it.
    unreplicated_commit: AtomicBool,
}

impl Notices {
    /// Whether such a warning came since the last call (and forgets it).
    pub(super) fn unreplicated_commit(&self) -> bool {
        self.unreplicated_commit.swap(false, Ordering::SeqCst)
    }

    fn observe(&self, notice: &tokio_postgres::error::DbError) {
        // The SQLSTATE is the generic 01000 (warning), so the text is what tells it apart
        // (PostgreSQL's English messages: lc_messages must not be translated).
        if notice.message().starts_with("canceling wait for synchronous replication") {
            self.unreplicated_commit.store(true, Ordering::SeqCst);
        }
        tracing::warn!(
            severity = notice.severity(),
            message = notice.message(),
            detail = notice.detail(),
            "database notice"
        );
    }
}

struct OpenGuard(Arc<Inner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Builds a pool; no connection is opened until the first request needs one.
    pub fn new(target: Target, settings: PoolSettings) -> Pool {
        let Target { mut config, tls, .. } = target;
        config.connect_timeout(settings.connect_timeout);
        config.application_name(APPLICATION_NAME);
        // A connection whose peer vanished without closing (a dead machine, a dropped route)
        // is noticed in about 30 s even while idle, instead of the kernel's 2 hours; settings
        // given in DATABASE_URL win.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config
                .keepalives_idle(Duration::from_secs(15))
                .keepalives_interval(Duration::from_secs(5))
                .keepalives_retries(3);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        if !settings.unnamed_statements {
            // Sent in the startup packet, so setting them costs no round trip.
            // Options given in DATABASE_URL (`?options=-c search_path=shop`) are kept, after
            // ours. JIT off: every statement here is a short OLTP one, and the planner's cost
            // of the webhook claim (a per-endpoint scan it cannot size) crossed
            // `jit_above_cost`, so each claim spent 0.7 s compiling, held the feed's watermark
            // back meanwhile, and deliveries fell to a tenth of the order rate.
            let timeout_ms = settings.statement_timeout.as_millis();
            let ours = format!("-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms} -c jit=off");
            let options = match config.get_options() {
                Some(theirs) => format!("{ours} {theirs}"),
                None => ours,
            };
            config.options(options);
        }
        Pool {
            inner: Arc::new(Inner {
                config,
                tls,
                permits: Arc::new(Semaphore::new(settings.max_size)),
                settings,
                idle: Mutex::new(Vec::new()),
                backoff: Mutex::new(Backoff::default()),
                open: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// A connection for one request: an idle one if there is one, else a new one. None once
    /// the request's deadline has passed: whatever it would send could not be answered in time.
    pub async fn get(&self) -> Result<PooledConn, Error> {
        let permit = self.acquire_permit().await?;
        if deadline::passed() {
            return Err(OUT_OF_TIME);
        }
        let checked_out = |conn| PooledConn {
            pool: self.inner.clone(),
            conn: Some(conn),
            reusable: true,
            retired: false,
            _permit: permit,
        };
        loop {
            let reused = lock(&self.inner.idle).pop();
            match reused {
                // Died while idle, or too old: dropped, which closes it.
                Some(conn) if conn.client.is_closed() || self.too_old(&conn) => continue,
                Some(conn) => return Ok(checked_out(conn)),
                None => break,
            }
        }
        Ok(checked_out(self.connect().await?))
    }

    fn too_old(&self, conn: &Conn) -> bool {
        conn.opened_at.elapsed() >= self.inner.settings.max_lifetime
    }

    async fn acquire_permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.inner.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        let mut wait_until = tokio::time::Instant::now() + self.inner.settings.acquire_timeout;
        if let Some(deadline) = deadline::current() {
            wait_until = wait_until.min(deadline);
        }
        let acquired = tokio::time::timeout_at(wait_until, self.inner.permits.clone().acquire_owned()).await;
        self.inner.waiting.fetch_sub(1, Ordering::Relaxed);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Error::Unavailable("the service is shutting down")),
            Err(_elapsed) => Err(Error::Unavailable("all database connections are busy; retry")),
        }
    }

    async fn connect(&self) -> Result<Conn, Error> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::Unavailable("the service is shutting down"));
        }
        let unreachable = Error::Unavailable("the database cannot be reached; retry");
        if lock(&self.inner.backoff).retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(unreachable);
        }
        // Bounded as a whole, handshake included (tokio-postgres' connect_timeout covers only the
        // TCP connect): a server that accepts and never answers must not hold the request.
        let connect_timeout_at = tokio::time::Instant::now() + self.inner.settings.connect_timeout;
        let request_deadline = deadline::current().filter(|deadline| *deadline < connect_timeout_at);
        let connecting = self.inner.config.connect(self.inner.tls.clone());
        let connected = match tokio::time::timeout_at(request_deadline.unwrap_or(connect_timeout_at), connecting).await
        {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(e)) => Err(super::describe(&e)),
            // The request ran out of time, not the connect: that says nothing of the database,
            // so no backoff is armed (it would fail every request for a while).
            Err(_elapsed) if request_deadline.is_some() => return Err(OUT_OF_TIME),
            Err(_elapsed) => Err("no answer from the server in time".to_owned()),
        };
        let (client, connection) = match connected {
            Ok(connected) => {
                lock(&self.inner.backoff).succeeded();
                connected
            }
            Err(error) => {
                let pause = lock(&self.inner.backoff).failed();
                tracing::warn!(error = %error, next_attempt_in_ms = pause.as_millis(), "database connection failed");
                return Err(unreachable);
            }
        };
        // The connection task does the socket I/O; it ends when the socket closes or the
        // client is dropped, after which `client.is_closed()` is true. It reads each message
        // in order, so a notice sent before a statement's answer is recorded before the
        // statement's caller sees that answer.
        let notices = Arc::new(Notices::default());
        let seen = notices.clone();
        let mut connection = connection;
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notice(notice)) => seen.observe(&notice),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %super::describe(&e), "database connection closed");
                        break;
                    }
                }
            }
        });
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Ok(Conn {
            client,
            notices,
            statements: HashMap::new(),
            opened_at: Instant::now(),
            _open: OpenGuard(self.inner.clone()),
        })
    }

    /// A connection of its own, outside the pool and its count, with the pool's settings: for
    /// LISTEN, which needs a session that stays open. Its application name says its `purpose`. `on_notification` is called for every
    /// notification; the returned task ends when the connection closes.
    pub(super) async fn dedicated(
        &self,
        purpose: &str,
        on_notification: impl Fn(&tokio_postgres::Notification) + Send + 'static,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
        let mut config = self.inner.config.clone();
        // Told apart from the pool's connections in pg_stat_activity.
        config.application_name(format!("{APPLICATION_NAME} {purpose}"));
        let connecting = config.connect(self.inner.tls.clone());
        let (client, mut connection) = match tokio::time::timeout(self.inner.settings.connect_timeout, connecting).await
        {
            Ok(Ok(connected)) => connected,
            _ => return Err(Error::Unavailable("the database cannot be reached; retry")),
        };
        let task = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(notification)) => on_notification(&notification),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        Ok((client, task))
    }

    pub fn status(&self) -> PoolStatus {
        let max_size = self.inner.settings.max_size;
        PoolStatus {
            max_size,
            open: self.inner.open.load(Ordering::Relaxed),
            in_use: max_size - self.inner.permits.available_permits(),
            waiting: self.inner.waiting.load(Ordering::Relaxed),
        }
    }

    /// Closes idle connections and stops keeping returned ones; connections still in use
    /// close when their request finishes.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        lock(&self.inner.idle).clear();
    }
}

/// A request whose deadline passed while it waited for a connection (nothing was sent).
const OUT_OF_TIME: Error = Error::Unavailable("the request ran out of time waiting for a database connection; retry");

/// First pause after a failed connect; it doubles with each failure in a row, up to the max.
const MIN_CONNECT_BACKOFF: Duration = Duration::from_millis(25);
const MAX_CONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// The connect backoff state: consecutive failures and when the next attempt may start.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    fn failed(&mut self) -> Duration {
        let pause = MIN_CONNECT_BACKOFF.saturating_mul(1 << self.failures.min(16)).min(MAX_CONNECT_BACKOFF);
        self.failures += 1;
        self.retry_at = Some(Instant::now() + pause);
        pause
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// A checked-out connection; returns to the pool when dropped, unless it was discarded.
pub struct PooledConn {
    pool: Arc<Inner>,
    conn: Option<Conn>,
    /// Cleared by `discard`: the connection may still carry something of its request (an open
    /// transaction, answers not yet read), so it is closed instead of going back to the pool.
    reusable: bool,
    /// Set by `retire`: closed when dropped, whatever follows (a read-only server).
    retired: bool,
    /// Keeps the pool's count of connections in use; released after the connection is back.
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    pub(super) fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection present until drop")
    }

    pub fn client(&self) -> &Client {
        &self.conn.as_ref().expect("connection present until drop").client
    }

    /// The pool's TLS connector, for a cancel request (sent on a connection of its own).
    pub(super) fn tls(&self) -> MakeRustlsConnect {
        self.pool.tls.clone()
    }

    pub(super) fn unnamed_statements(&self) -> bool {
        self.pool.settings.unnamed_statements
    }

    /// Closes the connection when it is dropped instead of returning it to the pool.
    pub(super) fn discard(&mut self) {
        self.reusable = false;
    }

    /// Returns the connection to the pool again (after `discard`), once what it carried has
    /// been cleaned up.
    pub(super) fn keep(&mut self) {
        self.reusable = true;
    }

    /// Closes the connection when it is dropped, for good: it is on a server that cannot take
    /// the service's writes.
    pub(super) fn retire(&mut self) {
        self.retired = true;
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let reusable = self.reusable
            && !self.retired
            && !conn.client.is_closed()
            && conn.opened_at.elapsed() < self.pool.settings.max_lifetime
            && !self.pool.closed.load(Ordering::Relaxed);
        if reusable {
            lock(&self.pool.idle).push(conn);
        }
        // Otherwise the client is dropped here: its socket closes, which ends any open
        // transaction on the server.
    }
}
