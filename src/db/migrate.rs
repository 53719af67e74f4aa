//! The embedded migration runner.
//!
//! Each file of `sql/` (embedded at build time by `build.rs`) is applied once, in file-name
//! order, in its own transaction, and recorded with its checksum in `schema_migrations`. An
//! advisory lock makes replicas that start together take turns: the first applies each
//! migration, the others wait, then find nothing left to do. An applied file whose text
//! changed stops the start-up: the database no longer matches what the code was written for,
//! and guessing would be worse than a clear message.

use postgres_types::Type;
use tokio_postgres::{Client, error::SqlState};

use super::{Pool, Sql, StartupError, describe};
use crate::error::Error;

/// A migration file compiled into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Key of the advisory lock that serializes migration runs (any constant unique to this
/// application within the database).
const MIGRATION_LOCK_KEY: i64 = 0x6f72_6465_7261_7069; // "orderapi"

const CREATE_HISTORY: &str = "
    CREATE TABLE IF NOT EXISTS schema_migrations (
        name       text PRIMARY KEY,
        checksum   text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )";

/// Applies every embedded migration not yet applied; returns the names it applied.
pub async fn run(client: &mut Client) -> Result<Vec<&'static str>, StartupError> {
    run_migrations(client, MIGRATIONS).await
}

/// Applies `migrations` (in the given order) that are not yet applied; `run` with a list of
/// one's own, for tests.
///
/// Each file gets a transaction of its own that first takes a transaction-scoped advisory
/// lock, then checks the history and applies the file if it is new. So concurrent runners
/// take turns file by file, and the lock cannot outlive its transaction. A session-scoped lock
/// would be simpler, but behind a transaction-mode pooler the session is not ours: the unlock
/// could reach another server connection than the lock. For the same reason every statement
/// here goes unnamed (simple protocol or `query_typed`), never as a prepared statement.
pub async fn run_migrations(client: &mut Client, migrations: &[Migration]) -> Result<Vec<&'static str>, StartupError> {
    let mut newly_applied = Vec::new();
    for migration in migrations {
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY}); {CREATE_HISTORY}")).await?;
        // md5 computed by PostgreSQL: stable across Rust versions, no hashing crate needed.
        let checksum: String = tx.query_typed_one("SELECT md5($1)", &[(&migration.sql, Type::TEXT)]).await?.get(0);
        let recorded = tx
            .query_typed_opt("SELECT checksum FROM schema_migrations WHERE name = $1", &[(&migration.name, Type::TEXT)])
            .await?;
        if let Some(row) = recorded {
            let recorded_checksum: &str = row.get(0);
            if recorded_checksum != checksum {
                return Err(format!(
                    "migration {} was edited after it was applied (checksum {} in the database, {} in this build); \
                     add a new migration instead of editing an applied one",
                    migration.name, recorded_checksum, checksum
                )
                .into());
            }
            tx.commit().await?;
            continue;
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| format!("migration {} failed: {}", migration.name, describe(&e)))?;
        tx.query_typed(
            "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
            &[(&migration.name, Type::TEXT), (&checksum, Type::TEXT)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(migration = migration.name, "migration applied");
        newly_applied.push(migration.name);
    }

    let recorded = client.query_typed("SELECT name FROM schema_migrations ORDER BY name", &[]).await?;
    for row in &recorded {
        let name: &str = row.get(0);
        if !migrations.iter().any(|m| m.name == name) {
            tracing::warn!(
                migration = name,
                "the database has a migration this build does not know; is an older build running?"
            );
        }
    }
    Ok(newly_applied)
}

/// The names of the applied migrations.
const APPLIED: Sql = Sql { params: &[], text: "SELECT name FROM schema_migrations" };

/// Whether every migration of this build is applied to the database (for `/health/ready`, and
/// for a start without `MIGRATE_ON_START`).
pub async fn all_applied(pool: &Pool) -> Result<bool, Error> {
    match pool.get().await?.query(&APPLIED, &[]).await {
        Ok(rows) => {
            let applied: Vec<&str> = rows.iter().map(|row| row.get(0)).collect();
            Ok(MIGRATIONS.iter().all(|migration| applied.contains(&migration.name)))
        }
        // No history table: nothing was ever applied.
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The migrations of this build not yet applied, on a connection of one's own (start-up).
pub async fn pending(client: &Client) -> Result<Vec<&'static str>, StartupError> {
    let applied: Vec<String> = match client.query_typed("SELECT name FROM schema_migrations", &[]).await {
        Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(describe(&e).into()),
    };
    Ok(MIGRATIONS.iter().map(|m| m.name).filter(|name| !applied.iter().any(|a| a == name)).collect())
}
