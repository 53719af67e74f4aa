//! The embedded migration runner.
//!
//! Each file of `sql/` (embedded at build time by `build.rs`) is applied once, in file-name
//! order, in its own transaction, and recorded with its checksum in `schema_migrations`. A
//! session advisory lock makes replicas that start together take turns: the first applies
//! the migrations, the others wait, then find nothing left to do. An applied file whose text
//! changed stops the start-up: the database no longer matches what the code was written for,
//! and guessing would be worse than a clear message.

use tokio_postgres::Client;

use super::{StartupError, describe};
use crate::log;

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
pub async fn run_migrations(client: &mut Client, migrations: &[Migration]) -> Result<Vec<&'static str>, StartupError> {
    // Held for the whole run; released explicitly, or by the server if this process dies.
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let result = apply_pending(client, migrations).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    result
}

async fn apply_pending(client: &mut Client, migrations: &[Migration]) -> Result<Vec<&'static str>, StartupError> {
    client.batch_execute(CREATE_HISTORY).await?;
    let applied = client.query("SELECT name, checksum FROM schema_migrations ORDER BY name", &[]).await?;

    let mut newly_applied = Vec::new();
    for migration in migrations {
        // md5 computed by PostgreSQL: stable across Rust versions, no hashing crate needed.
        let checksum: String = client.query_one("SELECT md5($1::text)", &[&migration.sql]).await?.get(0);
        let recorded = applied.iter().find(|row| row.get::<_, &str>(0) == migration.name);
        if let Some(row) = recorded {
            let recorded_checksum: &str = row.get(1);
            if recorded_checksum != checksum {
                return Err(format!(
                    "migration {} was edited after it was applied (checksum {} in the database, {} in this build); \
                     add a new migration instead of editing an applied one",
                    migration.name, recorded_checksum, checksum
                )
                .into());
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| format!("migration {} failed: {}", migration.name, describe(&e)))?;
        tx.execute("INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", &[&migration.name, &checksum])
            .await?;
        tx.commit().await?;
        log::info("migration applied", serde_json::json!({"migration": migration.name}));
        newly_applied.push(migration.name);
    }

    for row in &applied {
        let name: &str = row.get(0);
        if !migrations.iter().any(|m| m.name == name) {
            log::warn(
                "the database has a migration this build does not know; is an older build running?",
                serde_json::json!({"migration": name}),
            );
        }
    }
    Ok(newly_applied)
}
