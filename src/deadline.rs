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

/// Runs `work` with `deadline` as the request deadline. Not an `async fn`: one would keep room
/// for `work` beside the future that runs it, doubling a request's handler (23 KB for an
/// order) in every spawned request task.
pub fn scope<F: Future>(deadline: Instant, work: F) -> impl Future<Output = F::Output> {
    REQUEST_DEADLINE.scope(deadline, work)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each request's handler runs inside `scope`, in a task of its own: the wrapper must not
    /// keep room for the handler twice (as an `async fn` did: 49 KB per order in flight).
    #[test]
    fn scope_adds_almost_nothing_to_the_work() {
        let work = async {
            let state = [7u8; 8192];
            tokio::task::yield_now().await;
            state.iter().map(|&b| b as usize).sum::<usize>()
        };
        let work_size = std::mem::size_of_val(&work);
        let scoped = scope(Instant::now(), work);
        let scoped_size = std::mem::size_of_val(&scoped);
        assert!(work_size >= 8192);
        assert!(scoped_size < work_size + 512, "the work: {work_size} bytes; scoped: {scoped_size}");
    }
}
