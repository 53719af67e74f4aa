//! Placing orders: each order is placed or refused on its own, in arrival order, with or
//! without an idempotency key, in transactions that place many orders at once (commit
//! batching, issue 14) or, with `ORDER_BATCH_MAX=1`, one each.
//!
//! One transaction (`round.rs`) is three steps, in two round trips:
//! 1. `keys.rs`: claim every key, with the id drawn for its order, and read what each holds.
//!    A key already used for the same request gets its stored outcome back (a replay) instead
//!    of a second order; one used for another request is refused.
//! 2. `stock.rs`: lock the products the orders name and read their stock, and which products
//!    and users exist; then decide each order here, in arrival order, against the stock the
//!    earlier orders of the batch left: placed whole, or refused whole with its reason.
//! 3. `write.rs`: one statement writes every placed order (lines, payment, inventory
//!    movements, stock, events; a keyed order with the id its key holds); sent with it, the
//!    refused orders' keys get their answer, and COMMIT.
//!
//! **Lanes.** Batched, every order first joins a batch that waits for its product locks only
//! for a short while (`Locking::Patient`, `PlaceSettings::lock_patience`): long enough for the
//! batches ahead of it on the same products, which hold them for milliseconds, too short to
//! make a batch's orders share the fate of one order naming a product that another
//! transaction holds for longer (an operator's transaction). When the patience runs out, the
//! batch runs again skipping the held rows; the orders naming them are deferred to the
//! contended lane, whose batches wait for their locks, and for a while (`HELD_FOR`) new orders
//! naming those products go straight there. So only the orders of a held product wait for it,
//! or fail at `lock_timeout`; the others lose at most the patience. Each lane has its own
//! slots (`db::Lanes`), so waiting batches do not hold up the others.
//!
//! **Rounds.** A batch may take more than one transaction: two orders with the same key go in
//! successive ones (the second sees the first's outcome, as it would have waited for it on its
//! own); and when one order's fault fails the transaction (a row the write refused, a key held
//! by a request still running), its orders are placed again one per transaction, each
//! answered for itself. Every transaction runs under the deadlines of the orders in it, and an
//! order whose deadline has passed is answered 503 before anything is sent for it.
//!
//! **A replay never promises more than the first answer.** The stored outcome may be one
//! whose commit was answered 504 because the synchronous standby never confirmed it: committed
//! here, maybe nowhere else. So a replay writes its key again (unchanged) and answers only once
//! that commit is confirmed; its wait for the standby covers every earlier commit of this
//! server (WAL is one sequence).
//!
//! **Honest outcomes.** If a transaction fails as a whole (connection lost after the COMMIT
//! was sent, the deadline), its orders all get the same answer: 503 when nothing was written,
//! 504 OUTCOME_UNKNOWN when the commit may have happened.
//!
//! Why batches: on a hot product every single-order transaction holds the product's row lock
//! through its commit's WAL flush, so they go one flush after another; a batch takes the lock
//! once, writes its orders with a few set-based statements and flushes once.

mod keys;
mod round;
mod stock;
mod write;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

use self::{
    round::{RoundEnd, place_round},
    stock::Locking,
};
use crate::{
    db::{
        Pool,
        batch::{Batches, Job},
        events::Announcer,
    },
    deadline,
    domain::{IdempotencyKey, NewOrder, OrderStatus},
    error::Error,
    money::Money,
    sync,
};

/// An order to place, as the client sent it.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub order: NewOrder,
    /// The `Idempotency-Key` header.
    pub key: Option<IdempotencyKey>,
}

/// A created order: the body of the 201.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrder {
    pub order_id: i64,
    pub status: OrderStatus,
    pub total_amount: Money,
}

impl CreatedOrder {
    fn new(order_id: i64, total_amount: Money) -> CreatedOrder {
        CreatedOrder { order_id, status: OrderStatus::Processing, total_amount }
    }
}

/// What placing an order did.
#[derive(Debug, Clone)]
pub enum Placed {
    /// The order was written now.
    Created(CreatedOrder),
    /// The key was used before for the same request: its outcome, to be answered again.
    Replayed(Replay),
}

/// The outcome an idempotency key holds, as a replay answers it again.
#[derive(Debug, Clone)]
pub enum Replay {
    /// The order the first request created: answered exactly as the first time (the 201 body
    /// is made from the order's id and total, which never change).
    Created(CreatedOrder),
    /// The refusal the first request got, as it was answered.
    Answered(StoredAnswer),
}

/// An answer as the API rendered it, status and JSON body, kept verbatim with a key: the
/// database layer stores and returns it without looking inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: String,
}

/// How orders are placed.
#[derive(Debug, Clone)]
pub struct PlaceSettings {
    /// `ORDER_BATCH_MAX`: most orders in one transaction; 1: each order alone.
    pub batch_max: usize,
    /// How long a key is kept, after which it may be claimed anew.
    pub key_retention: Duration,
    /// How the API answers a refused order: what a key stores, so that its replay is the
    /// first answer byte for byte.
    pub store_refusal: fn(&Error) -> StoredAnswer,
    /// How long a batch waits for a product lock before it runs again without the held
    /// products (see Lanes above).
    pub lock_patience: Duration,
}

impl PlaceSettings {
    /// The lock patience for a `lock_timeout` of `lock_timeout`: `LOCK_PATIENCE`, or a quarter
    /// of a shorter lock timeout.
    pub fn patience_for(lock_timeout: Duration) -> Duration {
        (lock_timeout / 4).clamp(Duration::from_millis(1), LOCK_PATIENCE)
    }
}

/// The lock patience of the batches every order joins first: about ten times what a batch of
/// the most orders holds its locks for on this 2-core machine (256 orders, ~10 ms), so that
/// the batches of the service itself are always waited for.
pub const LOCK_PATIENCE: Duration = Duration::from_millis(100);

/// How long new orders naming a product found held past the patience go straight to the
/// contended lane (instead of each batch of them waiting out the patience again).
const HELD_FOR: Duration = Duration::from_secs(1);

/// What placing needs besides the orders.
struct Settings {
    place: PlaceSettings,
    /// `lock_patience` as a `lock_timeout` value.
    patience: String,
    /// Told after each commit that wrote events.
    announcer: Announcer,
    held: HeldProducts,
}

/// The products lately found held past the patience, and when.
#[derive(Clone, Default)]
struct HeldProducts(Arc<Mutex<HashMap<i32, Instant>>>);

impl HeldProducts {
    fn saw(&self, products: impl Iterator<Item = i32>) {
        let now = Instant::now();
        let mut held = sync::lock(&self.0);
        held.retain(|_, seen| now.duration_since(*seen) < HELD_FOR);
        held.extend(products.map(|product| (product, now)));
    }

    /// Whether `order` names a product held lately.
    fn named_by(&self, order: &NewOrder) -> bool {
        let held = sync::lock(&self.0);
        !held.is_empty()
            && order.lines.iter().any(|line| held.get(&line.product_id).is_some_and(|seen| seen.elapsed() < HELD_FOR))
    }
}

/// The most orders in one batch.
pub const MAX_BATCH: usize = 256;

/// What becomes of one order in a transaction.
enum Fate {
    /// To be decided against the stock (no key, or a key claimed now).
    Open,
    Placed,
    Refused(Error),
    /// Its key holds the outcome of the same request: answered again.
    Replayed(Replay),
    /// It names a product another transaction holds: placed in the contended lane.
    Deferred,
}

/// An order as a transaction left it.
#[derive(Debug, Clone)]
enum Settled {
    Placed(Placed),
    /// To be placed again, waiting for its product locks.
    Deferred(OrderRequest),
}

/// Places orders; cheap to share.
#[derive(Clone)]
pub struct Placing {
    lanes: Lanes,
}

#[derive(Clone)]
enum Lanes {
    /// `ORDER_BATCH_MAX=1`: each order its own transaction, in its request's task.
    Alone { pool: Pool, settings: Arc<Settings> },
    /// Batches that wait for product locks only briefly, and batches of the orders they
    /// deferred.
    Batched { free: Batches<OrderRequest, Settled>, contended: Batches<OrderRequest, Settled>, held: HeldProducts },
}

impl Placing {
    /// Starts placing orders on `pool`: `slots` batches at a time that wait for product locks
    /// only briefly, and `contended_slots` of the orders they deferred; `announcer` hears of
    /// every commit that wrote events.
    pub fn start(
        pool: Pool,
        place: PlaceSettings,
        announcer: Announcer,
        slots: usize,
        contended_slots: usize,
    ) -> Placing {
        let patience = format!("{}ms", place.lock_patience.as_millis().max(1));
        let held = HeldProducts::default();
        let settings = Arc::new(Settings { place, patience, announcer, held: held.clone() });
        if settings.place.batch_max <= 1 {
            return Placing { lanes: Lanes::Alone { pool, settings } };
        }
        let max = settings.place.batch_max.min(MAX_BATCH);
        let lane = |locking, slots| {
            let (pool, settings) = (pool.clone(), settings.clone());
            Batches::start(max, slots, move |jobs: Vec<Job<OrderRequest>>| {
                let (pool, settings) = (pool.clone(), settings.clone());
                async move { place_all(&pool, &settings, &jobs, locking).await }
            })
        };
        let (free, contended) = (lane(Locking::Patient, slots), lane(Locking::Wait, contended_slots));
        Placing { lanes: Lanes::Batched { free, contended, held } }
    }

    /// Places one order.
    pub async fn place(&self, request: OrderRequest) -> Result<Placed, Error> {
        let settled = match &self.lanes {
            Lanes::Alone { pool, settings } => {
                let job = Job { request, deadline: deadline::current() };
                // Boxed: inline, the whole transaction's state (about 15 KB) would be part of
                // every order request's future, also of the batched ones, which only wait.
                let placing = Box::pin(place_all(pool, settings, std::slice::from_ref(&job), Locking::Wait));
                let outcome = placing.await.pop();
                outcome.unwrap_or_else(|| Err(Error::Internal("an order placed without an outcome".into())))?
            }
            Lanes::Batched { contended, held, .. } if held.named_by(&request.order) => {
                contended.submit(request).await?
            }
            Lanes::Batched { free, contended, .. } => match free.submit(request).await? {
                Settled::Deferred(request) => contended.submit(request).await?,
                settled => settled,
            },
        };
        match settled {
            Settled::Placed(placed) => Ok(placed),
            Settled::Deferred(_) => Err(Error::Internal("an order deferred by a lane that waits".into())),
        }
    }
}

/// Places `jobs`, each on its own: their outcomes, in the same order.
async fn place_all(
    pool: &Pool,
    settings: &Settings,
    jobs: &[Job<OrderRequest>],
    locking: Locking,
) -> Vec<Result<Settled, Error>> {
    let mut outcomes: Vec<Option<Result<Settled, Error>>> = jobs.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..jobs.len()).collect();
    while !pending.is_empty() {
        // A key is claimed once per transaction: a second request with it waits for the next
        // one, as it would wait for the first's transaction if it came on its own.
        let mut keys = HashSet::new();
        let (now, later): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| {
            let request = &jobs[i].request;
            request.key.as_ref().is_none_or(|key| keys.insert((request.order.user_id, key.as_str())))
        });
        for (i, outcome) in place_together(pool, settings, jobs, now, locking).await {
            outcomes[i] = Some(outcome);
        }
        pending = later;
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or_else(|| Err(Error::Internal("an order left unplaced".into()))))
        .collect()
}

/// The orders `indices` of `jobs` in one transaction, or one transaction each if one order's
/// fault failed it; each order's outcome with its index.
async fn place_together(
    pool: &Pool,
    settings: &Settings,
    jobs: &[Job<OrderRequest>],
    indices: Vec<usize>,
    locking: Locking,
) -> Vec<(usize, Result<Settled, Error>)> {
    let (live, late) = in_time(jobs, indices);
    let mut outcomes: Vec<(usize, Result<Settled, Error>)> = late.into_iter().map(|i| (i, Err(OUT_OF_TIME))).collect();
    if live.is_empty() {
        return outcomes;
    }
    let batch: Vec<&OrderRequest> = live.iter().map(|&i| &jobs[i].request).collect();
    let earliest = live.iter().filter_map(|&i| jobs[i].deadline).min();
    match deadline::within(earliest, place_round(pool, settings, &batch, locking)).await {
        RoundEnd::Answered(answered) => outcomes.extend(live.into_iter().zip(answered)),
        RoundEnd::Failed(error) => outcomes.extend(live.into_iter().map(|i| (i, Err(error.clone())))),
        RoundEnd::OneByOne => {
            for i in live {
                let job = &jobs[i];
                let outcome = match job.deadline.is_some_and(|deadline| deadline <= tokio::time::Instant::now()) {
                    true => Err(OUT_OF_TIME),
                    false => {
                        match deadline::within(job.deadline, place_round(pool, settings, &[&job.request], locking))
                            .await
                        {
                            RoundEnd::Answered(mut answered) if answered.len() == 1 => answered.swap_remove(0),
                            RoundEnd::Failed(error) => Err(error),
                            _ => Err(Error::Internal("a transaction of one order answered as several".into())),
                        }
                    }
                };
                outcomes.push((i, outcome));
            }
        }
    }
    outcomes
}

/// An order whose deadline passed before its transaction began: nothing was sent for it.
const OUT_OF_TIME: Error = Error::Unavailable("the request ran out of time waiting for its transaction; retry");

/// `indices` split into the orders with time left and those past their deadline.
fn in_time(jobs: &[Job<OrderRequest>], indices: Vec<usize>) -> (Vec<usize>, Vec<usize>) {
    let now = tokio::time::Instant::now();
    indices.into_iter().partition(|&i| jobs[i].deadline.is_none_or(|deadline| deadline > now))
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    fn size_of_future<F: Future>(_: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every order request's future is as large as whatever it may run inline: 1,000 buyers
    /// at once hold 1,000 of them. Placing an order alone (`ORDER_BATCH_MAX=1`) is boxed, so
    /// the batched requests, which only wait for their batch, stay small.
    #[test]
    #[allow(unreachable_code)]
    fn an_order_request_does_not_carry_a_whole_transaction() {
        let request = size_of_future(|| Placing::place(unreachable!(), unreachable!()));
        let transaction = size_of_future(|| place_all(unreachable!(), unreachable!(), unreachable!(), Locking::Wait));
        assert!(request * 2 < transaction, "placing an order: {request} bytes; a transaction: {transaction}");
    }
}
