//! Running statements: a statement of the service (`Sql`), and several sent back to back in
//! one round trip (pipelining), under the request's deadline.
//!
//! PostgreSQL runs a connection's statements strictly in order, each on a fresh snapshot, so a
//! statement can rely on the locks taken by the ones before it. Once one fails inside a
//! transaction, the rest fail with "transaction aborted" and COMMIT acts as ROLLBACK: nothing
//! of the transaction remains.
//!
//! Statements are prepared once per connection and reused; behind a transaction-mode pooler
//! (`PoolSettings::unnamed_statements`) they are sent unnamed instead: parsed with every
//! execution, but valid on whichever server connection runs them.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use futures_util::future::join_all;
use postgres_types::{ToSql, Type};
use tokio_postgres::{CancelToken, Error as PgError, Row, Statement, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use tracing::{Instrument, Span, field::Empty};

use super::{
    failure::{Failure, connection_lost},
    pool::{Conn, PooledConn},
};
use crate::{deadline, telemetry};

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

const BEGIN: Sql = Sql { params: &[], text: "BEGIN" };
const COMMIT: Sql = Sql { params: &[], text: "COMMIT" };
const ROLLBACK: Sql = Sql { params: &[], text: "ROLLBACK" };

/// What a pipeline sends before its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Open {
    /// Nothing: each statement is a transaction of its own.
    Nothing,
    /// BEGIN: the steps start a transaction.
    Begin,
    /// Nothing, inside a transaction that an earlier pipeline began.
    Continue,
}

/// What a pipeline sends after its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    Commit,
    Rollback,
    /// Nothing: a transaction begun stays open for the next pipeline (or, after
    /// `Open::Nothing`, a statement that only reads).
    KeepOpen,
    /// Nothing, after `Open::Nothing`: the one statement writes and commits on its own.
    AutoCommit,
}

impl PooledConn {
    /// Runs one statement that only reads, on its own.
    pub async fn query(&mut self, sql: &'static Sql, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Failure> {
        let [rows] = self.pipeline(Open::Nothing, [(sql, params)], Close::KeepOpen).await?;
        Ok(rows)
    }

    /// Runs one statement that writes, as a transaction of its own (it commits when it ends).
    pub async fn write(&mut self, sql: &'static Sql, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Failure> {
        let [rows] = self.pipeline(Open::Nothing, [(sql, params)], Close::AutoCommit).await?;
        Ok(rows)
    }

    /// Runs `steps` as one transaction in one round trip: BEGIN, each statement, COMMIT, sent
    /// back to back without waiting for answers, then returns each statement's rows, or the
    /// first error in statement order. Either way no transaction is left open. For a
    /// transaction that needs the answer of one round trip to write the next, see `Tx`.
    pub async fn transaction<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], Failure> {
        self.pipeline(Open::Begin, steps, Close::Commit).await
    }

    /// Runs steps that only read as one transaction (one snapshot, and `SET LOCAL` settings),
    /// ended with ROLLBACK: there is nothing to keep, so nothing can be lost.
    pub async fn read_transaction<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], Failure> {
        self.pipeline(Open::Begin, steps, Close::Rollback).await
    }

    /// `pipeline_steps` for a fixed number of steps, each step's rows in an array.
    pub(super) async fn pipeline<const N: usize>(
        &mut self,
        open: Open,
        steps: [Step<'_>; N],
        close: Close,
    ) -> Result<[Vec<Row>; N], Failure> {
        let rows = self.pipeline_steps(open, &steps, close).await?;
        rows.try_into().map_err(|_| Failure::Internal("a pipeline answered the wrong number of steps"))
    }

    /// Sends [BEGIN,] steps [, COMMIT | ROLLBACK] as one pipeline and collects the answers:
    /// each step's rows, or the first failure in pipeline order (the later ones only echo it).
    ///
    /// Nothing is sent once the request's deadline has passed (`Failure::OutOfTime`), and the
    /// whole round trip, preparing statements on a new connection included, ends by the
    /// deadline (see `within_deadline`).
    ///
    /// While the answers are outstanding the connection is marked for discarding, so that if
    /// this future is dropped half way (the HTTP layer's last-resort timeout) the connection is
    /// closed rather than reused with answers, or a transaction, still pending on it. It stays
    /// marked when the pipeline leaves a transaction open: `Tx` owns it until it ends.
    pub(super) async fn pipeline_steps(
        &mut self,
        open: Open,
        steps: &[Step<'_>],
        close: Close,
    ) -> Result<Vec<Vec<Row>>, Failure> {
        if deadline::passed() {
            return Err(Failure::OutOfTime);
        }
        let commits = matches!(close, Close::Commit | Close::AutoCommit);
        if commits {
            self.conn().notices.unreplicated_commit();
        }
        let mut sent: Vec<Step> = Vec::with_capacity(steps.len() + 2);
        if open == Open::Begin {
            sent.push((&BEGIN, &[]));
        }
        sent.extend_from_slice(steps);
        match close {
            Close::Commit => sent.push((&COMMIT, &[])),
            Close::Rollback => sent.push((&ROLLBACK, &[])),
            Close::KeepOpen | Close::AutoCommit => {}
        }
        for (sql, params) in &sent {
            // A statement given the wrong number of values is a bug in this crate, not input.
            assert_eq!(params.len(), sql.params.len(), "parameters of {}", sql.text.trim());
        }
        let typed: Vec<Vec<(&(dyn ToSql + Sync), Type)>> =
            sent.iter().map(|(sql, params)| params.iter().copied().zip(sql.params.iter().cloned()).collect()).collect();

        self.discard();
        let tls = self.tls();
        let unnamed = self.unnamed_statements();
        let conn = self.conn();
        let cancel = conn.client.cancel_token();
        // Set once the statements are on their way: before that (while preparing), a round trip
        // given up cannot have committed.
        let sending = AtomicBool::new(false);
        let work = async {
            let mut prepared = Vec::with_capacity(sent.len());
            for (sql, _) in &sent {
                prepared.push(if unnamed { None } else { Some(conn.prepared(sql).await?) });
            }
            sending.store(true, Ordering::Relaxed);
            let client = &conn.client;
            let requests = sent.iter().zip(&prepared).zip(&typed).map(|(((sql, params), statement), typed)| {
                let request: Request = match statement {
                    Some(statement) => Box::pin(client.query(statement, params)),
                    None => Box::pin(client.query_typed(sql.text, typed)),
                };
                request
            });
            Ok::<_, PgError>(join_all(requests).await)
        };
        let span = round_trip_span(steps, sent.len());
        let outcome = within_deadline(cancel, tls, work).instrument(span.clone()).await;
        if let Some(code) = failure_code(&outcome) {
            span.record("otel.status_code", "ERROR");
            span.record("db.response.status_code", code);
        }
        drop(span);
        let mut results = match outcome {
            Some(Ok(results)) => results,
            // Preparing failed: nothing was executed. The connection is fine to reuse unless a
            // transaction was left open by an earlier round trip (then `Tx` ends it).
            Some(Err(error)) => {
                if open != Open::Continue {
                    self.keep();
                }
                return Err(Failure::Db(error));
            }
            // Stuck: the connection stays marked for discarding and is closed when dropped.
            None => return Err(Failure::NoAnswer { committing: commits && sending.load(Ordering::Relaxed) }),
        };
        let transaction_left_open = close == Close::KeepOpen && open != Open::Nothing;
        if !transaction_left_open {
            self.keep();
        }
        if let Some(failed) = results.iter().find_map(|result| result.as_ref().err()) {
            // A standby, or a primary demoted since the connection was opened: the connection
            // is closed rather than reused, and the next one finds the primary (with
            // `target_session_attrs=read-write` and several hosts in DATABASE_URL).
            if failed.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
                self.retire();
            }
            if commits && connection_lost(failed) {
                let failed = results.into_iter().find_map(Result::err).expect("found above");
                return Err(Failure::CommitLost(failed));
            }
        }

        let closed = if matches!(close, Close::Commit | Close::Rollback) { results.pop() } else { None };
        if open == Open::Begin {
            results.remove(0)?;
        }
        let rows = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        if let Some(closed) = closed {
            closed?;
        }
        if commits && self.conn().notices.unreplicated_commit() {
            return Err(Failure::CommitUnreplicated);
        }
        Ok(rows)
    }
}

/// The span of one round trip (OpenTelemetry's database client conventions): the operation
/// of its first statement and how many went (BEGIN and COMMIT included); when the span is
/// sampled, the statements' text too (parameters are never in it: they travel apart).
fn round_trip_span(steps: &[Step<'_>], statements: usize) -> Span {
    let operation = steps.first().map_or("", |(sql, _)| {
        sql.text.trim_start().split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or_default()
    });
    // Only inside a request's or a batch's span (so only when that is sampled): round trips
    // of background work (purges, the event listener) make no trace of their own.
    if Span::current().is_disabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "db round trip",
        otel.name = operation,
        otel.kind = "client",
        otel.status_code = Empty,
        db.system.name = Empty,
        db.operation.name = Empty,
        db.operation.batch.size = Empty,
        db.query.text = Empty,
        db.response.status_code = Empty,
    );
    if telemetry::context::is_sampled(&span) {
        span.record("db.system.name", "postgresql");
        span.record("db.operation.name", operation);
        span.record("db.operation.batch.size", statements);
        let text: Vec<&str> = steps.iter().map(|(sql, _)| sql.text.trim()).collect();
        span.record("db.query.text", text.join(";\n"));
    }
    span
}

/// What failed in a round trip, for its span: the first statement's SQLSTATE, or why there
/// is no answer.
fn failure_code(outcome: &Option<Result<Answers, PgError>>) -> Option<String> {
    let code = |error: &PgError| error.code().map_or_else(|| "connection".to_owned(), |c| c.code().to_owned());
    match outcome {
        None => Some("no answer".to_owned()),
        Some(Err(error)) => Some(code(error)),
        Some(Ok(results)) => results.iter().find_map(|result| result.as_ref().err()).map(code),
    }
}

impl Conn {
    /// The prepared form of `sql` on this connection, preparing it on first use.
    async fn prepared(&mut self, sql: &'static Sql) -> Result<Statement, PgError> {
        if let Some(statement) = self.statements.get(sql.text) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare_typed(sql.text, sql.params).await?;
        self.statements.insert(sql.text, statement.clone());
        Ok(statement)
    }
}

/// Each statement's answer in a round trip.
type Answers = Vec<Result<Vec<Row>, PgError>>;

/// One request of a pipeline, prepared or unnamed. tokio-postgres sends a request when its
/// future is first polled, so `join_all` puts them all on the wire before the first answer.
type Request<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Vec<Row>, PgError>> + Send + 'a>>;

/// The most time kept before the deadline for a cancel request and the cancelled statement's
/// real outcome (a fifth of the time left when less).
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// Awaits `work` (requests already sent or about to be sent on the connection of `cancel`)
/// until shortly before the request's deadline, if there is one. Then asks PostgreSQL to
/// cancel the running statement, so a transaction fails and its COMMIT turns into ROLLBACK,
/// and waits for the real outcome until the deadline. Dropping `work` instead would not stop
/// it: the statements are already in the server's buffer and would still run, COMMIT
/// included, with the client told the opposite. Only when not even that comes by the deadline
/// (the network hangs without closing) is it given up: `None`, and the caller must close the
/// connection and not claim to know the outcome. Either way the answer is ready at the deadline.
async fn within_deadline<F: Future>(cancel: CancelToken, tls: MakeRustlsConnect, work: F) -> Option<F::Output> {
    let Some(deadline) = deadline::current() else {
        return Some(work.await);
    };
    let grace = (deadline.saturating_duration_since(tokio::time::Instant::now()) / 5).min(CANCEL_GRACE);
    tokio::pin!(work);
    match tokio::time::timeout_at(deadline - grace, &mut work).await {
        Ok(output) => Some(output),
        Err(_elapsed) => {
            let _ = tokio::time::timeout_at(deadline, cancel.cancel_query(tls)).await;
            tokio::time::timeout_at(deadline, work).await.ok()
        }
    }
}
