//! The dispatcher: each replica runs one. In a loop, woken by events committing (the feed's
//! signal), by an attempt finishing, or every `TICK`:
//! 1. routes the events committed since the last pass to deliveries (`db::webhooks::route`);
//! 2. claims the deliveries due, leased to this replica, while it has room for more in flight
//!    (at most `WEBHOOK_CONCURRENCY` per endpoint across replicas, `MAX_IN_FLIGHT` here);
//! 3. attempts each in a task of its own; the outcomes are recorded in batches by a recorder
//!    task (one transaction for many attempts), which logs each failed attempt.
//!
//! A replica that dies mid-attempt leaves its leases to expire (`WEBHOOK_TIMEOUT_MS` plus
//! `LEASE_MARGIN`); then any replica claims those deliveries again. Delivery is at least once:
//! an attempt whose outcome was not recorded is made again, with the same `webhook-id`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc};

use super::deliver::{SendSettings, Sender};
use crate::{
    db::{AttemptRecord, Db, Outcome},
    log,
    metrics::Metrics,
};

/// How often the loop looks for work when nothing wakes it (retries coming due).
const TICK: Duration = Duration::from_millis(250);

/// The least time between two passes, so that a stream of commits does not make one pass per
/// commit.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(5);

/// Most attempts in flight from one replica.
const MAX_IN_FLIGHT: usize = 256;

/// A lease outlasts the attempt's timeout by this much, so that it never expires while the
/// attempt may still be recorded.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Most outcomes recorded in one transaction.
const RECORD_BATCH: usize = 512;

/// How often the backlog gauges are read from the database.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub send: SendSettings,
    /// `WEBHOOK_CONCURRENCY`: deliveries in flight per endpoint, across replicas.
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
        let finished = Arc::new(Notify::new());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let lease_for = settings.send.timeout + LEASE_MARGIN;
        let tasks = vec![
            tokio::spawn(dispatch_loop(
                db.clone(),
                sender,
                settings.per_endpoint as i64,
                lease_for,
                outcomes,
                finished.clone(),
                in_flight.clone(),
            )),
            tokio::spawn(record_loop(
                db.clone(),
                recorded,
                settings.disable_after,
                finished,
                in_flight,
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

async fn dispatch_loop(
    db: Db,
    sender: Arc<Sender>,
    per_endpoint: i64,
    lease_for: Duration,
    outcomes: mpsc::UnboundedSender<AttemptRecord>,
    finished: Arc<Notify>,
    in_flight: Arc<AtomicUsize>,
) {
    let mut events = db.event_signal();
    loop {
        let pass_started = tokio::time::Instant::now();
        if let Err(error) = db.route_events().await {
            log::warn("routing events to webhooks failed", serde_json::json!({"error": error.body().error}));
        }
        if in_flight.load(Ordering::Relaxed) < MAX_IN_FLIGHT {
            let lease = super::random_u64() as i64;
            match db.claim_deliveries(per_endpoint, lease_for, lease).await {
                Ok(claimed) => {
                    for delivery in claimed {
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let (sender, outcomes) = (sender.clone(), outcomes.clone());
                        tokio::spawn(async move {
                            let _ = outcomes.send(sender.attempt(&delivery).await);
                        });
                    }
                }
                Err(error) => {
                    log::warn("claiming webhook deliveries failed", serde_json::json!({"error": error.body().error}))
                }
            }
        }
        let until = pass_started + TICK;
        tokio::select! {
            () = events.wait(false, until) => {}
            () = finished.notified() => {}
        }
        tokio::time::sleep_until(pass_started + MIN_PASS_INTERVAL).await;
    }
}

async fn record_loop(
    db: Db,
    mut recorded: mpsc::UnboundedReceiver<AttemptRecord>,
    disable_after: Duration,
    finished: Arc<Notify>,
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while recorded.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        for attempt in &batch {
            metrics.record_webhook_attempt(attempt.outcome);
            if attempt.outcome != Outcome::Delivered {
                log::warn(
                    "webhook delivery attempt failed",
                    serde_json::json!({
                        "endpoint_id": attempt.endpoint_id, "delivery_id": attempt.delivery_id,
                        "status": attempt.status, "outcome": outcome_name(attempt.outcome),
                        "error": attempt.error, "latency_ms": attempt.latency_ms,
                    }),
                );
            }
        }
        // Recorded until it works: an outcome lost here would only mean one more attempt (the
        // lease expires), but a database that is away comes back.
        loop {
            match db.record_attempts(&batch, disable_after).await {
                Ok(disabled) => {
                    for (endpoint_id, reason) in disabled {
                        log::warn(
                            "webhook endpoint disabled",
                            serde_json::json!({"endpoint_id": endpoint_id, "reason": reason}),
                        );
                    }
                    break;
                }
                Err(error) => {
                    log::warn("recording webhook attempts failed", serde_json::json!({"error": error.body().error}));
                    tokio::time::sleep(TICK).await;
                }
            }
        }
        in_flight.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
        finished.notify_one();
    }
}

async fn backlog_loop(db: Db, metrics: Arc<Metrics>) {
    let mut ticker = tokio::time::interval(BACKLOG_EVERY);
    loop {
        ticker.tick().await;
        if let Ok(backlog) = db.webhook_backlog().await {
            metrics.set_webhook_backlog(backlog);
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
