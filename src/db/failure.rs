//! How a round trip to PostgreSQL fails, and what the client is told for each way.
//!
//! The difference matters to the client (CONTRACT part 4): a 503 promises that nothing was
//! written, so a failure after which a write may stand is never a 503; it is 504
//! OUTCOME_UNKNOWN, and a retry with the same Idempotency-Key finds out. Nothing is logged
//! here: the error carries its cause, and the request's log line says it.

use tokio_postgres::{Error as PgError, error::SqlState};

use crate::error::Error;

#[derive(Debug)]
pub enum Failure {
    /// PostgreSQL refused a statement, or the connection failed where nothing could commit.
    Db(PgError),
    /// The round trip was to commit, and the connection broke (or the server went down)
    /// before its answer came: it may or may not have committed.
    CommitLost(PgError),
    /// PostgreSQL committed locally but warned that it stopped waiting for the synchronous
    /// standby: the write is not as durable as the deployment promises (a failover now would
    /// lose it).
    CommitUnreplicated,
    /// No answer by the deadline, nor to the cancel request after it (the network to the
    /// database hangs): the connection is given up. `committing`: the round trip carried a
    /// commit that went out, so it may have happened.
    NoAnswer { committing: bool },
    /// The request's deadline had passed before anything of the round trip was sent.
    OutOfTime,
    /// A broken invariant of this crate.
    Internal(&'static str),
}

impl Failure {
    /// The SQLSTATE of a refused statement.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Failure::Db(error) | Failure::CommitLost(error) => error.code(),
            _ => None,
        }
    }
}

impl From<PgError> for Failure {
    fn from(error: PgError) -> Failure {
        Failure::Db(error)
    }
}

/// Whether `error` means the connection is gone (closed, an I/O error, the server shutting
/// down or crashed) rather than a statement refused: after a COMMIT was sent, that leaves the
/// outcome unknown.
pub(super) fn connection_lost(error: &PgError) -> bool {
    match error.code() {
        None => true,
        Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
    }
}

/// The server's message for a failed statement (tokio-postgres' Display says only "db error"),
/// or the whole chain of causes of any other failure ("error performing TLS handshake: invalid
/// peer certificate: ..."), since the first link alone rarely says what to fix.
pub fn describe(error: &PgError) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

/// A database error is the client's fault only in the cases a caller maps explicitly; here
/// the rest splits into "try again" (the database is away, busy or timed out) and bugs.
impl From<PgError> for Error {
    fn from(error: PgError) -> Error {
        if error.is_closed() {
            return Error::Unavailable("the database connection was lost; retry");
        }
        let Some(code) = error.code() else {
            // No SQLSTATE: an I/O or protocol failure on the connection.
            return Error::Unavailable("the database cannot be reached; retry");
        };
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            // A standby, or a demoted primary (the connection was retired, see pipeline.rs).
            Error::Unavailable("the database is read-only (a failover is under way?); retry")
        } else if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE {
            Error::Unavailable("the database did not answer in time; retry")
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
            Error::Unavailable("the database was busy; retry")
        } else if code.code().starts_with("08")
            || code.code().starts_with("57P")
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            // 08xxx connection exceptions, 57P0x shutdown / cannot connect now.
            Error::Unavailable("the database cannot be reached; retry")
        } else {
            Error::Internal(format!("database error: {}", describe(&error)))
        }
    }
}

/// A failure of a round trip as the client is told it: after `Db` and `OutOfTime` nothing was
/// written (a 503 or a refusal); after `CommitLost`, `CommitUnreplicated` and a committing
/// `NoAnswer` the write may stand, so the answer is `OutcomeUnknown`, never 503 and never 201.
impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Db(error) => Error::from(error),
            Failure::CommitLost(error) => Error::outcome_unknown(
                "the database connection broke after the write was sent, so it may or may not have \
                 been committed; retry with the same Idempotency-Key to find out",
                format!("the connection broke after a commit was sent: {}", describe(&error)),
            ),
            Failure::NoAnswer { committing: false } => {
                Error::Unavailable("the database did not answer in time (its connection was given up); retry")
            }
            Failure::NoAnswer { committing: true } => Error::outcome_unknown(
                "the database did not answer in time after the write was sent, so it may or may not \
                 have been committed; retry with the same Idempotency-Key to find out",
                "no answer to a commit, nor to its cancel request",
            ),
            Failure::CommitUnreplicated => Error::outcome_unknown(
                "the write was committed on the primary database but its replication was not \
                 confirmed, so it may not survive a failover; retry with the same Idempotency-Key",
                "committed on this server, but the synchronous standby never confirmed it (a standby in \
                 synchronous_standby_names is away; a failover now would lose this write)",
            ),
            Failure::OutOfTime => Error::Unavailable("the request ran out of time before reaching the database; retry"),
            Failure::Internal(what) => Error::Internal(what.to_owned()),
        }
    }
}
