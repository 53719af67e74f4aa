//! Everything that talks to PostgreSQL: the pool (`pool.rs` checks connections out,
//! `pipeline.rs` runs statements on them, `tx.rs` holds a transaction open across round
//! trips), the migration runner, and one file per resource holding its SQL. A whole operation
//! (an order with its idempotency key) is one call. Nothing here knows about HTTP.

pub mod archiver;
pub mod audit;
pub mod batch;
pub mod idempotency;
pub mod migrate;
pub mod orders;
pub mod pipeline;
pub mod pool;
pub mod products;
pub mod target;
pub mod tx;

use tokio_postgres::{Client, error::SqlState};

pub use pipeline::{Failure, Sql};
pub use pool::{Pool, PoolSettings, PoolStatus, PooledConn};
pub use target::Target;
pub use tx::Tx;

use crate::{error::Error, log};

/// Failures of the one-off start-up steps (create database, migrate, seed): shown to the
/// operator and ending the process, so a message is all they need to carry.
pub type StartupError = Box<dyn std::error::Error + Send + Sync>;

/// The contract's seed data, kept apart from the migrations: it is data, not schema, and a
/// production database is migrated but not seeded.
const SEED_SQL: &str = include_str!("../../sql/seed.sql");

/// Opens a single connection outside the pool, for the start-up steps.
pub async fn connect(target: &Target) -> Result<Client, StartupError> {
    let (client, connection) = target.config.connect(target.tls.clone()).await.map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::warn("database connection closed", serde_json::json!({"error": describe(&e)}));
        }
    });
    Ok(client)
}

/// Creates the database named in `config` if it does not exist, connecting to the server's
/// `postgres` database to do so. For `make run` and the tests; a production database is
/// created by its operator (or by the postgres image in docker-compose).
pub async fn create_database_if_missing(target: &Target) -> Result<(), StartupError> {
    let name = target.config.get_dbname().ok_or("DATABASE_URL names no database")?.to_owned();
    let mut admin = target.clone();
    admin.config.dbname("postgres");
    let admin = connect(&admin).await?;
    let exists = admin
        .query_typed_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[(&name, postgres_types::Type::TEXT)])
        .await?
        .is_some();
    if !exists {
        match admin.batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&name))).await {
            Ok(()) => log::info("database created", serde_json::json!({"database": name})),
            // Another process created it between our check and our CREATE: just as good.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(describe(&e).into()),
        }
    }
    Ok(())
}

/// `SELECT 1` on a pooled connection: whether the database answers.
pub async fn ping(pool: &Pool) -> Result<(), Error> {
    pool.get().await?.client().simple_query("SELECT 1").await?;
    Ok(())
}

/// Loads the seed data; idempotent (see `sql/seed.sql`).
pub async fn seed(client: &mut Client) -> Result<(), StartupError> {
    let tx = client.transaction().await?;
    tx.batch_execute(SEED_SQL).await.map_err(|e| format!("seeding failed: {}", describe(&e)))?;
    tx.commit().await?;
    Ok(())
}

/// `"name"` with inner quotes doubled: a safe SQL identifier for any database name.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server's message for a failed statement (tokio-postgres' Display says only "db error"),
/// or the whole chain of causes of any other failure ("error performing TLS handshake: invalid
/// peer certificate: ..."), since the first link alone rarely says what to fix.
pub fn describe(error: &tokio_postgres::Error) -> String {
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
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Error {
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

/// A failure of a round trip as the client is told it: after `Failure::Db` nothing was
/// written (a 503 or a refusal); after the other two the write may stand, so the answer is
/// `OutcomeUnknown`, never 503 (which promises nothing was written) and never 201. Both are
/// logged at error level: they are the moments a client's view and the database's may part.
impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Db(error) => Error::from(error),
            Failure::CommitLost(error) => {
                log::error(
                    "outcome unknown: the connection broke after a commit was sent",
                    serde_json::json!({"error": describe(&error)}),
                );
                Error::OutcomeUnknown(
                    "the database connection broke after the write was sent, so it may or may not have \
                     been committed; retry with the same Idempotency-Key to find out",
                )
            }
            Failure::NoAnswer { committing: false } => {
                Error::Unavailable("the database did not answer in time (its connection was given up); retry")
            }
            Failure::NoAnswer { committing: true } => {
                log::error("outcome unknown: no answer to a commit, nor to its cancel request", serde_json::json!({}));
                Error::OutcomeUnknown(
                    "the database did not answer in time after the write was sent, so it may or may not \
                     have been committed; retry with the same Idempotency-Key to find out",
                )
            }
            Failure::CommitUnreplicated => {
                log::error(
                    "outcome unknown: committed on this server, but the synchronous standby never confirmed it",
                    serde_json::json!({"hint": "a standby in synchronous_standby_names is away; a failover now would lose this write"}),
                );
                Error::OutcomeUnknown(
                    "the write was committed on the primary database but its replication was not \
                     confirmed, so it may not survive a failover; retry with the same Idempotency-Key",
                )
            }
        }
    }
}
