//! A small pool of tokio-postgres connections.
//!
//! What it guarantees, and how:
//! - **Bounded:** a semaphore holds one permit per connection that may exist; a request waits
//!   for a permit at most `acquire_timeout`, then gets `Error::Unavailable` (a 503), so a
//!   saturated database turns into fast, retryable failures instead of a growing queue.
//! - **Lazy and self-healing:** connections open on demand. A connection whose socket died
//!   (PostgreSQL restarted, backend terminated) is seen as closed and dropped, never handed
//!   out again; the next request opens a fresh one. While the database is down, opening fails
//!   at once (or within `connect_timeout`) and the request gets a 503; after a failure, new
//!   attempts back off (25 ms doubling to 500 ms), failing fast in between.
//! - **Clean:** a connection goes back to the pool only if no transaction was left open on it.
//!   `transaction` marks the connection while a transaction runs and clears the mark once
//!   COMMIT has answered. A transaction still running at the request's deadline is cancelled
//!   inside PostgreSQL (see `REQUEST_DEADLINE`), so it ends, rolled back, and the connection is
//!   reused. Only if the future is dropped in between (the HTTP layer's last-resort timeout,
//!   when PostgreSQL does not even answer the cancel) is the mark still set: the connection is
//!   then closed instead of reused, never handed to another request mid-transaction.
//! - **Prepared once:** each connection keeps the statements it has prepared, keyed by their
//!   SQL text, so a hot statement is parsed and planned by PostgreSQL once per connection.
//!   Behind a transaction-mode pooler (`unnamed_statements`), statements are sent unnamed
//!   instead: parsed with every execution, but valid on whichever server connection runs them.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use postgres_types::{ToSql, Type};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Error as PgError, NoTls, Row, Statement};

use crate::{error::Error, log};

tokio::task_local! {
    /// The deadline of the request being served, set by the HTTP layer around each handler
    /// (tokio's counterpart of a request context). The pool waits for a connection no longer
    /// than this, and a transaction still running at the deadline is cancelled inside
    /// PostgreSQL and rolled back. Code run outside a request (start-up, tests) has none.
    pub static REQUEST_DEADLINE: tokio::time::Instant;
}

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
pub struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Set while a transaction may be open on the connection; see the module doc.
    in_transaction: bool,
    /// When it was opened, for `PoolSettings::max_lifetime`.
    opened_at: Instant,
    /// Counts this connection in `Inner::open` until dropped.
    _open: OpenGuard,
}

struct OpenGuard(Arc<Inner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Builds a pool; no connection is opened until the first request needs one.
    pub fn new(database_url: &str, settings: PoolSettings) -> Result<Pool, tokio_postgres::Error> {
        let mut config: tokio_postgres::Config = database_url.parse()?;
        config.connect_timeout(settings.connect_timeout);
        config.application_name("order-api");
        if !settings.unnamed_statements {
            // Sent in the startup packet, so setting them costs no round trip.
            // Options given in DATABASE_URL (`?options=-c search_path=shop`) are kept, after
            // ours.
            let timeout_ms = settings.statement_timeout.as_millis();
            let ours = format!("-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}");
            let options = match config.get_options() {
                Some(theirs) => format!("{ours} {theirs}"),
                None => ours,
            };
            config.options(options);
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                config,
                permits: Arc::new(Semaphore::new(settings.max_size)),
                settings,
                idle: Mutex::new(Vec::new()),
                backoff: Mutex::new(Backoff::default()),
                open: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// A connection for one request: an idle one if there is one, else a new one.
    pub async fn get(&self) -> Result<PooledConn, Error> {
        let permit = self.acquire_permit().await?;
        loop {
            let reused = self.inner.idle.lock().unwrap().pop();
            match reused {
                // Died while idle, or too old: dropped, which closes it.
                Some(conn)
                    if conn.client.is_closed() || conn.opened_at.elapsed() >= self.inner.settings.max_lifetime =>
                {
                    continue;
                }
                Some(conn) => return Ok(PooledConn { pool: self.inner.clone(), conn: Some(conn), _permit: permit }),
                None => break,
            }
        }
        let conn = self.connect().await?;
        Ok(PooledConn { pool: self.inner.clone(), conn: Some(conn), _permit: permit })
    }

    async fn acquire_permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.inner.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        let mut wait_until = tokio::time::Instant::now() + self.inner.settings.acquire_timeout;
        if let Ok(deadline) = REQUEST_DEADLINE.try_with(|deadline| *deadline) {
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
        if self.inner.backoff.lock().unwrap().retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(unreachable);
        }
        let (client, connection) = match self.inner.config.connect(NoTls).await {
            Ok(connected) => {
                self.inner.backoff.lock().unwrap().succeeded();
                connected
            }
            Err(e) => {
                let pause = self.inner.backoff.lock().unwrap().failed();
                log::warn(
                    "database connection failed",
                    serde_json::json!({"error": e.to_string(), "next_attempt_in_ms": pause.as_millis()}),
                );
                return Err(unreachable);
            }
        };
        // The connection future does the socket I/O; it ends when the socket closes or the
        // client is dropped, after which `client.is_closed()` is true.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::warn("database connection closed", serde_json::json!({"error": e.to_string()}));
            }
        });
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Ok(Conn {
            client,
            statements: HashMap::new(),
            in_transaction: false,
            opened_at: Instant::now(),
            _open: OpenGuard(self.inner.clone()),
        })
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
        self.inner.idle.lock().unwrap().clear();
    }
}

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

/// A checked-out connection; returns to the pool when dropped.
pub struct PooledConn {
    pool: Arc<Inner>,
    conn: Option<Conn>,
    /// Keeps the pool's count of connections in use; released after the connection is back.
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection present until drop")
    }

    pub fn client(&self) -> &Client {
        &self.conn.as_ref().expect("connection present until drop").client
    }

    /// Whether a transaction opened with `begin` is still open (not yet committed or rolled back).
    pub fn in_transaction(&self) -> bool {
        self.conn.as_ref().is_some_and(|conn| conn.in_transaction)
    }

    /// Runs one statement on its own (a transaction of one statement).
    pub async fn query(&mut self, sql: &'static Sql, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        let mut rows = self.pipeline(Open::AlreadyOpen, &[(sql, params)], Close::KeepOpen).await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Runs `steps` as one transaction in one round trip: BEGIN, each statement, COMMIT, sent
    /// back to back without waiting for answers (pipelining), then returns each statement's
    /// rows, or the first error in statement order.
    ///
    /// PostgreSQL runs them strictly in order, each on a fresh snapshot, so a statement can
    /// rely on the locks taken by the ones before it. Once one fails, the rest fail with
    /// "transaction aborted" and COMMIT acts as ROLLBACK: nothing of the transaction remains.
    /// Whatever happens, when this returns no transaction is open on the connection.
    pub async fn transaction<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], PgError> {
        let rows = self.pipeline(Open::Begin, &steps, Close::Commit).await?;
        Ok(rows.try_into().unwrap_or_else(|_| unreachable!("one result per step")))
    }

    /// Like `transaction`, for a transaction that needs more than one round trip: BEGIN and
    /// `steps`, leaving the transaction open for `then` and `commit` (or `rollback`). If a step
    /// fails, the transaction is rolled back before the error is returned.
    pub async fn begin<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], PgError> {
        let rows = self.pipeline(Open::Begin, &steps, Close::KeepOpen).await?;
        Ok(rows.try_into().unwrap_or_else(|_| unreachable!("one result per step")))
    }

    /// More `steps` in the transaction opened by `begin`, in one round trip.
    pub async fn then<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], PgError> {
        let rows = self.pipeline(Open::AlreadyOpen, &steps, Close::KeepOpen).await?;
        Ok(rows.try_into().unwrap_or_else(|_| unreachable!("one result per step")))
    }

    /// The last `steps` of the transaction opened by `begin`, and COMMIT, in one round trip.
    pub async fn commit<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], PgError> {
        let rows = self.pipeline(Open::AlreadyOpen, &steps, Close::Commit).await?;
        Ok(rows.try_into().unwrap_or_else(|_| unreachable!("one result per step")))
    }

    /// Ends the transaction opened by `begin` without keeping anything.
    pub async fn rollback(&mut self) -> Result<(), PgError> {
        self.pipeline(Open::AlreadyOpen, &[], Close::Rollback).await.map(drop)
    }

    /// Sends [BEGIN,] steps [, COMMIT | ROLLBACK] as one pipeline and collects the answers.
    async fn pipeline(&mut self, open: Open, steps: &[Step<'_>], close: Close) -> Result<Vec<Vec<Row>>, PgError> {
        let mut sent: Vec<Step> = Vec::with_capacity(steps.len() + 2);
        if open == Open::Begin {
            sent.push((&BEGIN, &[]));
        }
        sent.extend_from_slice(steps);
        match close {
            Close::Commit => sent.push((&COMMIT, &[])),
            Close::Rollback => sent.push((&ROLLBACK, &[])),
            Close::KeepOpen => {}
        }
        for (sql, params) in &sent {
            // A statement given the wrong number of values is a bug in this crate, not input.
            assert_eq!(params.len(), sql.params.len(), "parameters of {}", sql.text.trim());
        }
        let prepared = if self.pool.settings.unnamed_statements {
            vec![None; sent.len()]
        } else {
            let mut prepared = Vec::with_capacity(sent.len());
            for (sql, _) in &sent {
                prepared.push(Some(self.prepared(sql).await?));
            }
            prepared
        };
        let typed: Vec<Vec<(&(dyn ToSql + Sync), Type)>> =
            sent.iter().map(|(sql, params)| params.iter().copied().zip(sql.params.iter().cloned()).collect()).collect();

        let in_transaction_before = self.in_transaction();
        let conn = self.conn();
        conn.in_transaction = true;
        let client = &conn.client;
        let requests = sent.iter().zip(&prepared).zip(&typed).map(|(((sql, params), statement), typed)| -> Request {
            match statement {
                Some(statement) => Box::pin(client.query(statement, params)),
                None => Box::pin(client.query_typed(sql.text, typed)),
            }
        });
        let mut results = within_deadline(client, join_all(requests)).await;
        let failed = results.iter().any(Result::is_err);
        let still_open = match close {
            // COMMIT or ROLLBACK has answered: no transaction is open any more.
            Close::Commit | Close::Rollback => false,
            // An aborted transaction is ended here, so the connection is clean for the caller.
            Close::KeepOpen if failed && (open == Open::Begin || in_transaction_before) => {
                client.batch_execute("ROLLBACK").await?;
                false
            }
            Close::KeepOpen => open == Open::Begin || in_transaction_before,
        };
        conn.in_transaction = still_open;

        // The first failure in pipeline order is the cause; the later ones only echo it.
        let closed = if close == Close::KeepOpen { None } else { results.pop() };
        if open == Open::Begin {
            results.remove(0)?;
        }
        let rows = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        if let Some(closed) = closed {
            closed?;
        }
        Ok(rows)
    }

    /// The prepared form of `sql` on this connection, preparing it on first use.
    async fn prepared(&mut self, sql: &'static Sql) -> Result<Statement, PgError> {
        let conn = self.conn();
        if let Some(statement) = conn.statements.get(sql.text) {
            return Ok(statement.clone());
        }
        let statement = conn.client.prepare_typed(sql.text, sql.params).await?;
        conn.statements.insert(sql.text, statement.clone());
        Ok(statement)
    }
}

/// One request of a pipeline, prepared or unnamed.
type Request<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, PgError>> + Send + 'a>>;

const BEGIN: Sql = Sql { params: &[], text: "BEGIN" };
const COMMIT: Sql = Sql { params: &[], text: "COMMIT" };
const ROLLBACK: Sql = Sql { params: &[], text: "ROLLBACK" };

/// Awaits `work` (requests already sent or about to be sent on `client`) until the request's
/// deadline, if there is one. Past it, asks PostgreSQL to cancel the running statement, so a
/// transaction fails and its COMMIT turns into ROLLBACK, then waits for the real outcome.
/// Dropping `work` instead would not stop it: the statements are already in the server's
/// buffer and would still run, COMMIT included, with the client told the opposite.
async fn within_deadline<F: Future>(client: &Client, work: F) -> F::Output {
    let Ok(deadline) = REQUEST_DEADLINE.try_with(|deadline| *deadline) else {
        return work.await;
    };
    tokio::pin!(work);
    match tokio::time::timeout_at(deadline, &mut work).await {
        Ok(output) => output,
        Err(_elapsed) => {
            let _ = client.cancel_token().cancel_query(NoTls).await;
            work.await
        }
    }
}

/// A statement of the service: its text and the PostgreSQL types of its parameters, in order
/// (`$1`, `$2`, ...). The types let a statement be sent unnamed (parse, bind and execute in
/// one message) when the service runs behind a transaction-mode pooler, and they say at the
/// statement what each parameter is.
#[derive(Debug)]
pub struct Sql {
    pub params: &'static [Type],
    pub text: &'static str,
}

/// One statement of a pipeline and its parameters.
pub type Step<'a> = (&'static Sql, &'a [&'a (dyn ToSql + Sync)]);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Begin,
    AlreadyOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Commit,
    Rollback,
    KeepOpen,
}

/// Polls all futures together until each is done, returning their outputs in order. On one
/// connection this pipelines requests: tokio-postgres sends a request when its future is first
/// polled, so all are on the wire before the first answer is awaited.
async fn join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().map(|output| output.expect("every future completed")).collect()
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let reusable = !conn.in_transaction
            && !conn.client.is_closed()
            && conn.opened_at.elapsed() < self.pool.settings.max_lifetime
            && !self.pool.closed.load(Ordering::Relaxed);
        if reusable {
            self.pool.idle.lock().unwrap().push(conn);
        }
        // Otherwise the client is dropped here: its socket closes, which ends any open
        // transaction on the server.
    }
}
