//! The dispatcher: each replica runs one, as three tasks.
//! 1. The router, woken by events committing (the feed's signal) or every `TICK`, routes the
//!    events committed since its last pass to deliveries (`db::webhooks::route`).
//! 2. The claimer, woken by the router, by finished attempts or every `TICK`, claims the
//!    deliveries due (one per order or product at a time, in sequence order), leased to this
//!    replica: at most `CLAIM_FACTOR` times `WEBHOOK_CONCURRENCY` held per endpoint here.
//!    Each is attempted in a task of its own, at most `WEBHOOK_CONCURRENCY` at once per
//!    endpoint from this replica; one that waited so long that its lease could run out
//!    during the attempt is not made (its lease expires and it is claimed again), so a delivery
//!    is never in flight from two replicas at once.
//! 3. The recorder writes the outcomes in batches (one transaction for many attempts) and
//!    logs each failed attempt.
//!
//! Claiming more than may be in flight keeps the HTTP requests busy while the last batch's
//! outcomes are written: a fast endpoint gets thousands of events a second from one replica.
//! A replica that dies mid-attempt leaves its leases to expire (`WEBHOOK_TIMEOUT_MS` plus
//! `LEASE_MARGIN`); then any replica claims those deliveries again. Delivery is at least once:
//! an attempt whose outcome was not recorded is made again, with the same `webhook-id`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, Semaphore, mpsc};

use super::deliver::{SendSettings, Sender};
use crate::{
    db::{AttemptRecord, Claimed, Db, Outcome},
    metrics::Metrics,
    sync::lock,
};

/// How often the loops look for work when nothing wakes them (retries coming due).
const TICK: Duration = Duration::from_millis(250);

/// The least time between two claims (or two routings), so that a stream of commits does
/// not make one pass per commit.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(2);

/// How many deliveries may be leased per endpoint, as a multiple of `WEBHOOK_CONCURRENCY`.
const CLAIM_FACTOR: usize = 8;

/// Most attempts claimed by one replica and not yet recorded.
const MAX_CLAIMED: usize = 2_048;

/// A lease outlasts the attempt's timeout by this much, so that it never expires while the
/// attempt may still be recorded.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Most outcomes recorded in one transaction.
const RECORD_BATCH: usize = 512;

/// How often the backlog gauges are read from the database.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Pending deliveries that statistics may miss before new ones are taken (beyond doubling).
const STATISTICS_SLACK: i64 = 1_000;

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub send: SendSettings,
    /// `WEBHOOK_CONCURRENCY`: attempts in flight per endpoint from one replica.
    pub per_endpoint: usize,
    /// An endpoint failing for this long in a row is disabled (`schedule::DISABLE_AFTER`,
    /// times `WEBHOOK_RETRY_SCALE`).
    pub disable_after: Duration,
}

/// The running dispatcher; `stop` ends it (the leases it holds expire and others take over).
pub struct Dispatcher {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Dispatcher {
    pub fn start(db: Db, settings: DispatchSettings, metrics: Arc<Metrics>) -> Result<Dispatcher, String> {
        let sender = Arc::new(Sender::new(&settings.send)?);
        let (outcomes, recorded) = mpsc::unbounded_channel();
        let wake_claimer = Arc::new(Notify::new());
        let claimed = Arc::new(AtomicUsize::new(0));
        let claimer = Claimer {
            db: db.clone(),
            sender,
            per_endpoint: settings.per_endpoint,
            lease_for: settings.send.timeout + LEASE_MARGIN,
            attempt_for: settings.send.timeout,
            outcomes,
            endpoints: Mutex::new(HashMap::new()),
            claimed: claimed.clone(),
        };
        let tasks = vec![
            tokio::spawn(route_loop(db.clone(), wake_claimer.clone())),
            tokio::spawn(Arc::new(claimer).claim_loop(wake_claimer.clone())),
            tokio::spawn(record_loop(
                db.clone(),
                recorded,
                settings.disable_after,
                wake_claimer,
                claimed,
                metrics.clone(),
            )),
            tokio::spawn(backlog_loop(db, metrics)),
        ];
        Ok(Dispatcher { tasks })
    }

    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Routes new events to deliveries whenever events commit; wakes the claimer when it made some.
/// While no endpoint is there to route to, it looks again every `TICK` only: a commit's wake-up
/// would cost a transaction per batch of orders for nothing. A new endpoint's first events are
/// routed by the next tick; nothing is missed, as an endpoint's position says where its events
/// start.
async fn route_loop(db: Db, wake_claimer: Arc<Notify>) {
    let mut events = db.event_signal();
    loop {
        let pass_started = tokio::time::Instant::now();
        let mut idle = false;
        match db.route_events().await {
            Ok(routed) => {
                idle = routed.endpoints == 0;
                if routed.deliveries > 0 {
                    wake_claimer.notify_one();
                }
            }
            Err(error) => {
                tracing::warn!(error = %error.body().error, "routing events to webhooks failed")
            }
        }
        if idle {
            tokio::time::sleep_until(pass_started + TICK).await;
            continue;
        }
        events.wait(false, pass_started + TICK).await;
        tokio::time::sleep_until(pass_started + MIN_PASS_INTERVAL).await;
    }
}

/// Claims deliveries and makes their attempts.
struct Claimer {
    db: Db,
    sender: Arc<Sender>,
    /// `WEBHOOK_CONCURRENCY`: attempts at once per endpoint from this replica.
    per_endpoint: usize,
    lease_for: Duration,
    /// The longest an attempt takes (`WEBHOOK_TIMEOUT_MS`).
    attempt_for: Duration,
    outcomes: mpsc::UnboundedSender<AttemptRecord>,
    /// Per endpoint: its attempts in flight from this replica, and how many deliveries of it
    /// this replica holds (claimed, not yet recorded).
    endpoints: Mutex<HashMap<i64, Endpoint>>,
    /// Deliveries claimed and not yet recorded, here.
    claimed: Arc<AtomicUsize>,
}

impl Claimer {
    async fn claim_loop(self: Arc<Self>, wake: Arc<Notify>) {
        let most_leased = (self.per_endpoint * CLAIM_FACTOR) as i64;
        loop {
            let pass_started = tokio::time::Instant::now();
            if self.claimed.load(Ordering::Relaxed) < MAX_CLAIMED {
                let lease = super::random_u64() as i64;
                let held: Vec<(i64, i64)> = lock(&self.endpoints)
                    .iter()
                    .map(|(id, endpoint)| (*id, endpoint.held.load(Ordering::Relaxed) as i64))
                    .collect();
                match self.db.claim_deliveries(most_leased, &held, self.lease_for, lease).await {
                    Ok(deliveries) => {
                        let lease_ends = tokio::time::Instant::now() + self.lease_for;
                        for delivery in deliveries {
                            self.claimed.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(self.clone().attempt(delivery, lease_ends));
                        }
                    }
                    Err(error) => tracing::warn!(error = %error.body().error, "claiming webhook deliveries failed"),
                }
            }
            let _ = tokio::time::timeout_at(pass_started + TICK, wake.notified()).await;
            tokio::time::sleep_until(pass_started + MIN_PASS_INTERVAL).await;
        }
    }

    /// One attempt, once the endpoint has room; skipped if the lease could run out during it.
    async fn attempt(self: Arc<Self>, delivery: Claimed, lease_ends: tokio::time::Instant) {
        let (room, held) = {
            let mut endpoints = lock(&self.endpoints);
            let endpoint = endpoints.entry(delivery.endpoint_id).or_insert_with(|| Endpoint {
                room: Arc::new(Semaphore::new(self.per_endpoint)),
                held: Arc::new(AtomicUsize::new(0)),
            });
            (endpoint.room.clone(), endpoint.held.clone())
        };
        held.fetch_add(1, Ordering::Relaxed);
        let slot = room.acquire_owned().await;
        let outcome = match slot {
            Ok(_slot) if tokio::time::Instant::now() + self.attempt_for < lease_ends => {
                Some(self.sender.attempt(&delivery).await)
            }
            // Left to expire: another pass (here or elsewhere) claims it again.
            _ => None,
        };
        held.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Some(outcome) => {
                let _ = self.outcomes.send(outcome);
            }
            None => {
                self.claimed.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// One endpoint, as this replica's attempts see it.
struct Endpoint {
    /// `WEBHOOK_CONCURRENCY` permits: the attempts in flight.
    room: Arc<Semaphore>,
    /// Deliveries of it held here, waiting or in flight.
    held: Arc<AtomicUsize>,
}

async fn record_loop(
    db: Db,
    mut recorded: mpsc::UnboundedReceiver<AttemptRecord>,
    disable_after: Duration,
    wake_claimer: Arc<Notify>,
    claimed: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while recorded.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        for attempt in &batch {
            metrics.record_webhook_attempt(attempt.outcome);
            if attempt.outcome != Outcome::Delivered {
                tracing::warn!(
                    endpoint_id = attempt.endpoint_id,
                    delivery_id = attempt.delivery_id,
                    status = attempt.status,
                    outcome = outcome_name(attempt.outcome),
                    error = attempt.error.as_deref(),
                    latency_ms = attempt.latency_ms,
                    "webhook delivery attempt failed"
                );
            }
        }
        // Recorded until it works: an outcome lost here would only mean one more attempt (the
        // lease expires), but a database that is away comes back.
        loop {
            match db.record_attempts(&batch, disable_after).await {
                Ok(disabled) => {
                    for (endpoint_id, reason) in disabled {
                        tracing::warn!(endpoint_id, reason = %reason, "webhook endpoint disabled");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error.body().error, "recording webhook attempts failed");
                    tokio::time::sleep(TICK).await;
                }
            }
        }
        claimed.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
        wake_claimer.notify_one();
    }
}

/// Reads the backlog for the metrics; and when the deliveries pending grew past twice the
/// fewest seen since the last statistics (plus `STATISTICS_SLACK`), takes new ones, so that the
/// claims are planned for the table as it is (see `db::webhooks::analyze_deliveries`).
async fn backlog_loop(db: Db, metrics: Arc<Metrics>) {
    let mut ticker = tokio::time::interval(BACKLOG_EVERY);
    let mut fewest_since_analyzed = 0;
    loop {
        ticker.tick().await;
        let Ok(backlog) = db.webhook_backlog().await else { continue };
        let pending: i64 = backlog.iter().map(|endpoint| endpoint.undelivered).sum();
        metrics.set_webhook_backlog(backlog);
        fewest_since_analyzed = fewest_since_analyzed.min(pending);
        if pending > 2 * fewest_since_analyzed + STATISTICS_SLACK {
            match db.analyze_webhook_deliveries().await {
                Ok(()) => fewest_since_analyzed = pending,
                Err(error) => tracing::warn!(error = %error.body().error, "analyzing webhook deliveries failed"),
            }
        }
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry(_) => "retry",
        Outcome::Failed => "failed",
        Outcome::Disabled => "disabled",
    }
}
