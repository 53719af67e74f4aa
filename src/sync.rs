//! Locks that survive a panic. A `std::sync::Mutex` is poisoned when a thread panics while
//! holding it; every state guarded here (counters, idle connections, rate buckets) stays
//! consistent between statements, so the next caller takes the lock as it is instead of
//! panicking in turn on the request path.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// `mutex.lock()`, recovering the guard of a poisoned mutex.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
