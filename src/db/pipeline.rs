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

use futures_util::future::join_all;
use postgres_types::{ToSql, Type};
use tokio_postgres::{Client, Error as PgError, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PooledConn;
use crate::deadline;

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
    /// Nothing: a transaction begun stays open for the next pipeline.
    KeepOpen,
}

impl PooledConn {
    /// Runs one statement on its own (a transaction of one statement).
    pub async fn query(&mut self, sql: &'static Sql, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, PgError> {
        let [rows] = self.pipeline(Open::Nothing, [(sql, params)], Close::KeepOpen).await?;
        Ok(rows)
    }

    /// Runs `steps` as one transaction in one round trip: BEGIN, each statement, COMMIT, sent
    /// back to back without waiting for answers, then returns each statement's rows, or the
    /// first error in statement order. Either way no transaction is left open. For a
    /// transaction that needs the answer of one round trip to write the next, see `Tx`.
    pub async fn transaction<const N: usize>(&mut self, steps: [Step<'_>; N]) -> Result<[Vec<Row>; N], PgError> {
        self.pipeline(Open::Begin, steps, Close::Commit).await
    }

    /// Sends [BEGIN,] steps [, COMMIT | ROLLBACK] as one pipeline and collects the answers:
    /// each step's rows, or the first failure in pipeline order (the later ones only echo it).
    ///
    /// While the answers are outstanding the connection is marked for discarding, so that if
    /// this future is dropped half way (the HTTP layer's last-resort timeout) the connection is
    /// closed rather than reused with answers, or a transaction, still pending on it. It stays
    /// marked when the pipeline leaves a transaction open: `Tx` owns it until it ends.
    pub(super) async fn pipeline<const N: usize>(
        &mut self,
        open: Open,
        steps: [Step<'_>; N],
        close: Close,
    ) -> Result<[Vec<Row>; N], PgError> {
        let mut sent: Vec<Step> = Vec::with_capacity(N + 2);
        if open == Open::Begin {
            sent.push((&BEGIN, &[]));
        }
        sent.extend_from_slice(&steps);
        match close {
            Close::Commit => sent.push((&COMMIT, &[])),
            Close::Rollback => sent.push((&ROLLBACK, &[])),
            Close::KeepOpen => {}
        }
        for (sql, params) in &sent {
            // A statement given the wrong number of values is a bug in this crate, not input.
            assert_eq!(params.len(), sql.params.len(), "parameters of {}", sql.text.trim());
        }
        let prepared = if self.unnamed_statements() {
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

        self.discard();
        let tls = self.tls();
        let client = &self.conn().client;
        let requests = sent.iter().zip(&prepared).zip(&typed).map(|(((sql, params), statement), typed)| {
            let request: Request = match statement {
                Some(statement) => Box::pin(client.query(statement, params)),
                None => Box::pin(client.query_typed(sql.text, typed)),
            };
            request
        });
        let mut results = within_deadline(client, tls, join_all(requests)).await;
        let transaction_left_open = close == Close::KeepOpen && open != Open::Nothing;
        if !transaction_left_open {
            self.keep();
        }

        let closed = if close == Close::KeepOpen { None } else { results.pop() };
        if open == Open::Begin {
            results.remove(0)?;
        }
        let rows = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        if let Some(closed) = closed {
            closed?;
        }
        Ok(rows.try_into().unwrap_or_else(|_| unreachable!("one result per step")))
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

/// One request of a pipeline, prepared or unnamed. tokio-postgres sends a request when its
/// future is first polled, so `join_all` puts them all on the wire before the first answer.
type Request<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Vec<Row>, PgError>> + Send + 'a>>;

/// Awaits `work` (requests already sent or about to be sent on `client`) until the request's
/// deadline, if there is one. Past it, asks PostgreSQL to cancel the running statement, so a
/// transaction fails and its COMMIT turns into ROLLBACK, then waits for the real outcome.
/// Dropping `work` instead would not stop it: the statements are already in the server's
/// buffer and would still run, COMMIT included, with the client told the opposite.
async fn within_deadline<F: Future>(client: &Client, tls: MakeRustlsConnect, work: F) -> F::Output {
    let Some(deadline) = deadline::current() else {
        return work.await;
    };
    tokio::pin!(work);
    match tokio::time::timeout_at(deadline, &mut work).await {
        Ok(output) => output,
        Err(_elapsed) => {
            let _ = client.cancel_token().cancel_query(tls).await;
            work.await
        }
    }
}
