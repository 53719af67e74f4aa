//! The deadline of the request being served: set by the HTTP layer around each handler
//! (tokio's counterpart of a request context) and honoured by the database layer, which waits
//! for a connection no longer than this and cancels a transaction still running at the
//! deadline inside PostgreSQL. It has a module of its own because both layers use it and
//! neither should reach into the other for it. Code run outside a request (start-up, tests,
//! background jobs) has no deadline.

use std::future::Future;

use tokio::time::Instant;

tokio::task_local! {
    static REQUEST_DEADLINE: Instant;
}

/// Runs `work` with `deadline` as the request deadline.
pub async fn scope<F: Future>(deadline: Instant, work: F) -> F::Output {
    REQUEST_DEADLINE.scope(deadline, work).await
}

/// The deadline of the request this task serves, if any.
pub fn current() -> Option<Instant> {
    REQUEST_DEADLINE.try_with(|deadline| *deadline).ok()
}

/// Whether the deadline of the request this task serves has passed (never, outside a request).
pub fn passed() -> bool {
    current().is_some_and(|deadline| deadline <= Instant::now())
}

/// Runs `work` under `deadline` if there is one, else under the current deadline (if any).
pub async fn within<F: Future>(deadline: Option<Instant>, work: F) -> F::Output {
    match deadline {
        Some(deadline) => scope(deadline, work).await,
        None => work.await,
    }
}
