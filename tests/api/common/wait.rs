//! Waiting for what a test can observe, never for a guessed time. A fixed sleep stands for an
//! event ("both connections now wait on the lock", "the server has noticed the close"), and on
//! a loaded machine the event comes later than the guess and the test fails for no fault of
//! the product. Here each wait polls the event itself and fails, naming it, only after a bound
//! far beyond what it takes on a quiet machine.
//!
//! A sleep that lets time itself pass (a connection must grow older than its maximum lifetime,
//! a request is kept waiting to show that the drain waits for it) is not synchronisation and
//! stays a sleep.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// The bound of a wait for something that takes milliseconds on a quiet machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds; panics saying `what` did not happen once `limit` has
/// passed.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until_some(what, limit, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it gives a value; panics saying `what` did not happen once `limit` has
/// passed.
pub async fn until_some<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} in vain for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// How many of the service's sessions (`application_name` 'order-api') on `database` wait on
/// a lock inside PostgreSQL.
pub async fn lock_waiters(db: &tokio_postgres::Client, database: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'order-api' AND wait_event_type = 'Lock'",
        &[&database],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until at least `count` of the service's sessions on `database` wait on a lock: the
/// requests have reached PostgreSQL and are held there.
pub async fn for_lock_waiters(db: &tokio_postgres::Client, database: &str, count: i64) {
    let what = format!("{count} of the service's sessions waiting on a lock");
    until(&what, PATIENCE, || async { lock_waiters(db, database).await >= count }).await
}

/// The backends of the service's sessions on `database`, in pid order.
pub async fn backend_pids(db: &tokio_postgres::Client, database: &str) -> Vec<i32> {
    let rows = db
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'order-api' ORDER BY pid",
            &[&database],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

/// Waits until a new session on `url` sees `setting` = `value`: after `pg_reload_conf()` the
/// postmaster rereads the configuration and signals the running backends a moment later, so
/// a reload is in force only once a fresh session sees it.
pub async fn for_setting(url: &str, setting: &str, value: &str) {
    let what = format!("{setting} = '{value}' in force after the reload");
    until(&what, PATIENCE, || async {
        let db = super::connect(url).await;
        let now: String = db.query_one("SELECT current_setting($1)", &[&setting]).await.unwrap().get(0);
        now == value
    })
    .await
}
