//! Commit batching (`ORDER_BATCH_MAX` > 1; issue 14): orders that arrive while batches are
//! being placed wait for the next one, which takes them all (up to the maximum) and places
//! them in one transaction with one commit (`place.rs` says how, and what happens on a fault).
//!
//! - **No added wait.** A lone order goes at once, as a batch of one; orders are batched only
//!   when they arrive faster than batches commit. At most `BATCHES_IN_FLIGHT` batches run at a
//!   time, so an order waits for at most that many batches ahead of it.
//! - **Deadlines.** An order whose request is already past its deadline when its batch starts
//!   is not sent (503). The batch runs under the earliest deadline of its orders.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};

use super::place::{OrderRequest, Placed, place_all};
use crate::{db::Pool, deadline, error::Error};

/// The most orders in one batch.
pub const MAX_BATCH: usize = 256;

/// Batches placed at the same time (each on a connection of its own).
const BATCHES_IN_FLIGHT: usize = 2;

/// The queue of orders waiting for a batch; cheap to share.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Waiting>,
}

struct Waiting {
    request: OrderRequest,
    deadline: Option<Instant>,
    answer: oneshot::Sender<Result<Placed, Error>>,
}

impl Batcher {
    /// Starts placing batches of at most `max` orders (capped at `MAX_BATCH`) on `pool`;
    /// idempotency keys are kept for `key_retention`.
    pub fn start(pool: Pool, max: usize, key_retention: Duration) -> Batcher {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(pool, max.clamp(1, MAX_BATCH), key_retention, waiting));
        Batcher { queue }
    }

    /// Places `request` in the next batch; its own outcome.
    pub async fn place(&self, request: OrderRequest) -> Result<Placed, Error> {
        let (answer, answered) = oneshot::channel();
        let waiting = Waiting { request, deadline: deadline::current(), answer };
        self.queue.send(waiting).map_err(|_| Error::Unavailable("the service is shutting down"))?;
        answered.await.unwrap_or_else(|_| Err(Error::Internal("the order's batch ended without an answer".into())))
    }
}

async fn batch_loop(pool: Pool, max: usize, key_retention: Duration, mut waiting: mpsc::UnboundedReceiver<Waiting>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        // A slot first: while every slot is busy, arriving orders queue for this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < max {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            run_batch(&pool, batch, key_retention).await;
            drop(slot);
        });
    }
}

async fn run_batch(pool: &Pool, batch: Vec<Waiting>, key_retention: Duration) {
    let now = Instant::now();
    let (live, late): (Vec<Waiting>, Vec<Waiting>) =
        batch.into_iter().partition(|waiting| waiting.deadline.is_none_or(|deadline| deadline > now));
    for waiting in late {
        let _ =
            waiting.answer.send(Err(Error::Unavailable("the request ran out of time waiting for its batch; retry")));
    }
    if live.is_empty() {
        return;
    }
    let requests: Vec<&OrderRequest> = live.iter().map(|waiting| &waiting.request).collect();
    let placing = place_all(pool, &requests, key_retention);
    let outcomes = match live.iter().filter_map(|waiting| waiting.deadline).min() {
        Some(earliest) => deadline::scope(earliest, placing).await,
        None => placing.await,
    };
    for (waiting, outcome) in live.into_iter().zip(outcomes) {
        let _ = waiting.answer.send(outcome);
    }
}
