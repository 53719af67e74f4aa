//! `make soak`: a mixed shop workload against the real release binary for a settable time
//! (default 10 minutes), then every invariant checked.
//!
//! `make soak SOAK_SECONDS=N`, or `cargo run --profile tools --example soak -- [SECONDS]` (or
//! `SOAK_SECONDS`; `SOAK_WORKERS`, default 16), with `target/release/order-api` built.
//!
//! Each worker loops over: orders of 1-3 lines in ascending, descending or shuffled product
//! order (product 4 has 5 in stock and runs out, so rejections happen all along, and
//! cancellations give it back now and then); cancellations of its own orders, repeated, and
//! three at once on the same order; orders shipped and then refused cancellation; reads of
//! the catalogue, of one order and of a user's order list.
//!
//! Afterwards: for every product stock >= 0, stock taken = quantity of the live lines
//! acknowledged to clients (counted on the client side) = what the database holds, the
//! inventory ledger balances (`order-api audit`'s checks), every acknowledged order and
//! cancellation is in the database, no 5xx and no unanswered request, and the API's RSS
//! after warm-up (the first fifth of the run) grew by no more than 10 %.

#[path = "reliability/mod.rs"]
mod reliability;

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use reliability::{
    Answer, Database, Expectations, Kind, Server, Settings, Shopper, free_port, new_record, stop_load, verdict, verify,
};
use serde_json::json;

/// Products 1..=3 get a large stock; product 4 keeps its seeded 5 and runs out.
const PLENTIFUL: [i32; 3] = [1, 2, 3];
const SCARCE: i32 = 4;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::from_env();
    let seconds: u64 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SOAK_SECONDS").ok())
        .map(|s| s.parse().expect("seconds: a whole number"))
        .unwrap_or(600);
    let workers: usize = std::env::var("SOAK_WORKERS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    println!("soak: {seconds} s, {workers} workers");

    let database = Database::create(&settings, "soak").await;
    let mut server = Server::spawn(&settings, "soak", &database.url, free_port(), &[]);
    server.wait_healthy(Duration::from_secs(30)).await.expect("the server starts");
    let setup = Shopper::new(new_record());
    for product in PLENTIFUL {
        assert_eq!(setup.restock(&server.base, product, 10_000_000).await.status, 200);
    }

    let record = new_record();
    let shopper = Shopper::new(record.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let concurrent_cancels = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let worker = Worker {
                shopper: shopper.clone(),
                base: server.base.clone(),
                user_id: worker as i32 % 2 + 1,
                rng: fastrand::Rng::with_seed(worker as u64),
                mine: Vec::new(),
                concurrent_cancels: concurrent_cancels.clone(),
            };
            tokio::spawn(worker.run(stop.clone()))
        })
        .collect();

    // RSS once a second; the first fifth of the run is warm-up.
    let started = Instant::now();
    // The first fifth of the run, and at least half of a short one (a 30 s run in CI).
    let warm_up = Duration::from_secs((seconds / 5).max((seconds / 2).min(60)));
    let mut rss_samples: Vec<(Duration, u64)> = Vec::new();
    let mut next_report = Duration::from_secs(60);
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(rss) = server.rss_kib() {
            rss_samples.push((started.elapsed(), rss));
        }
        if started.elapsed() >= next_report {
            next_report += Duration::from_secs(60);
            let requests = record.lock().unwrap().count(|_| true);
            let rss = rss_samples.last().map_or(0, |s| s.1);
            println!("  {:>4} s: {requests} requests, RSS {rss} KiB", started.elapsed().as_secs());
        }
    }
    stop_load(&stop, tasks).await;
    let still_running = server.running();
    let mut db = database.connect().await;
    let verification = verify(&mut db, &record).await;

    // Client-side count of what the stock should show: the acknowledged lines of orders
    // not acknowledged as cancelled, by product.
    let (figures, failures) = {
        let record = record.lock().unwrap();
        let mut taken_per_client: HashMap<i32, i64> = HashMap::new();
        for (id, lines) in &record.acknowledged {
            if !record.cancelled.contains(id) {
                for (product, quantity) in lines {
                    *taken_per_client.entry(*product).or_default() += i64::from(*quantity);
                }
            }
        }
        let audit = verification.audit.as_ref().expect("audited");
        let stock_check: Vec<_> = audit
            .products
            .iter()
            .map(|p| {
                let taken_in_database = p.opening + p.restocked - p.stock;
                let taken_per_clients = taken_per_client.get(&p.product_id).copied().unwrap_or(0);
                (p.product_id, p.stock, taken_in_database, taken_per_clients)
            })
            .collect();

        let baseline = rss_samples.iter().find(|(at, _)| *at >= warm_up).map_or(0, |s| s.1);
        let peak_after_warm_up = rss_samples.iter().filter(|(at, _)| *at >= warm_up).map(|s| s.1).max().unwrap_or(0);
        let final_rss = rss_samples.last().map_or(0, |s| s.1);
        let growth_percent =
            if baseline == 0 { 0.0 } else { (peak_after_warm_up as f64 / baseline as f64 - 1.0) * 100.0 };

        // Rejections of the scarce product in every quarter of the run: they happen all along.
        let total_ms = started.elapsed().as_millis() as u32;
        let quarters: Vec<u64> = (0..4)
            .map(|q| {
                let (from, to) = (total_ms / 4 * q, total_ms / 4 * (q + 1));
                record
                    .count(|e| e.kind == Kind::Order && e.answer == Answer::Rejected && e.at_ms >= from && e.at_ms < to)
            })
            .collect();
        let concurrent_cancels = concurrent_cancels.lock().unwrap();
        let wrong_concurrent_cancels =
            concurrent_cancels.iter().filter(|statuses: &&Vec<u16>| statuses.iter().any(|s| *s != 200)).count();
        let requests = record.count(|_| true);
        let p = |kind: Kind, q: f64| record.percentile_ms(q, |e| e.kind == kind && e.answer != Answer::Unanswered);
        let listing_first_minute = record.percentile_ms(0.5, |e| e.kind == Kind::List && e.at_ms < 60_000);
        let figures = json!({
            "seconds": seconds,
            "workers": workers,
            "requests": requests,
            "requests_per_s": (requests as f64 / seconds as f64).round(),
            "answers": record.tally(),
            "rejections": record.rejections,
            "latency_ms": {
                "order": {"p50": p(Kind::Order, 0.5), "p99": p(Kind::Order, 0.99)},
                "cancel": {"p50": p(Kind::Cancel, 0.5), "p99": p(Kind::Cancel, 0.99)},
                "read": {"p50": p(Kind::Read, 0.5), "p99": p(Kind::Read, 0.99)},
                "list": {"p50": p(Kind::List, 0.5), "p99": p(Kind::List, 0.99),
                         "p50_first_minute": listing_first_minute,
                         "p50_last_minute": record.percentile_ms(0.5, |e| e.kind == Kind::List && e.at_ms + 60_000 >= total_ms)},
            },
            "orders_rejected_per_quarter": quarters,
            "concurrent_cancel_groups": concurrent_cancels.len(),
            "concurrent_cancel_groups_not_all_200": wrong_concurrent_cancels,
            "cancellations_acknowledged": record.cancelled.len(),
            "contract_breaches": record.contract_breaches.len(),
            "stock_per_product": stock_check.iter().map(|(id, stock, db, clients)| json!({"product": id, "stock": stock, "taken": db, "taken_per_clients": clients})).collect::<Vec<_>>(),
            "rss_kib": {"after_warm_up": baseline, "peak_after_warm_up": peak_after_warm_up, "final": final_rss, "growth_percent": (growth_percent * 10.0).round() / 10.0},
            "data": verification.figures(),
        });

        let mut expect = Expectations::default();
        expect.check(verification.ok(), || format!("data: {}", verification.figures()));
        expect.check(record.count(|e| matches!(e.answer, Answer::ServerError | Answer::Unanswered)) == 0, || {
            format!(
                "{} 5xx and {} unanswered requests; first: {:?}",
                record.count(|e| e.answer == Answer::ServerError),
                record.count(|e| e.answer == Answer::Unanswered),
                record.bad_answers
            )
        });
        for (product, stock, taken_in_database, taken_per_clients) in &stock_check {
            expect.check(*stock >= 0 && taken_in_database == taken_per_clients, || {
                format!("product {product}: stock {stock}, taken {taken_in_database} in the database, {taken_per_clients} per clients")
            });
        }
        expect.check(record.contract_breaches.is_empty(), || {
            format!("contract breaches: {:?}", record.contract_breaches)
        });
        expect.check(quarters.iter().all(|n| *n > 0), || format!("rejections per quarter: {quarters:?}"));
        expect.check(!concurrent_cancels.is_empty() && wrong_concurrent_cancels == 0, || {
            format!(
                "{wrong_concurrent_cancels} of {} concurrent cancel groups were not all 200",
                concurrent_cancels.len()
            )
        });
        expect.check(growth_percent <= 10.0, || {
            format!("RSS grew {growth_percent:.1} % after warm-up ({baseline} -> {peak_after_warm_up} KiB)")
        });
        expect.check(still_running, || "the API process exited".into());
        (figures, expect.0)
    };
    let passed = verdict(&settings, "soak", &format!("{seconds}s"), &failures, figures);
    drop(server);
    database.finish(passed).await;
    if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

struct Worker {
    shopper: Shopper,
    base: String,
    user_id: i32,
    rng: fastrand::Rng,
    /// This worker's own live orders, candidates for cancellation and reads.
    mine: Vec<i64>,
    /// The statuses answered to each group of three simultaneous cancels of one order.
    concurrent_cancels: Arc<Mutex<Vec<Vec<u16>>>>,
}

impl Worker {
    async fn run(mut self, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            match self.rng.u32(0..100) {
                0..=54 => self.order().await,
                55..=66 => self.cancel(false).await,
                67..=69 => self.cancel(true).await,
                70..=72 => self.ship_then_try_to_cancel().await,
                73..=84 => {
                    self.shopper.get(&self.base, "/api/products", Kind::Read).await;
                }
                85..=92 => {
                    if let Some(id) = self.any_mine() {
                        self.shopper.get(&self.base, &format!("/api/orders/{id}"), Kind::Read).await;
                    }
                }
                _ => {
                    let path = format!("/api/orders?userId={}&limit=20", self.user_id);
                    self.shopper.get(&self.base, &path, Kind::List).await;
                }
            }
        }
    }

    fn any_mine(&mut self) -> Option<i64> {
        (!self.mine.is_empty()).then(|| self.mine[self.rng.usize(..self.mine.len())])
    }

    /// 1-3 lines of distinct products, quantities 1-3, in ascending, descending or shuffled
    /// order; the scarce product is in about one order in three.
    async fn order(&mut self) {
        let mut products = PLENTIFUL.to_vec();
        if self.rng.u8(0..3) == 0 {
            products.push(SCARCE);
        }
        self.rng.shuffle(&mut products);
        products.truncate(self.rng.usize(1..=3));
        match self.rng.u8(0..3) {
            0 => products.sort_unstable(),
            1 => products.sort_unstable_by(|a, b| b.cmp(a)),
            _ => {}
        }
        let items: Vec<(i32, i32)> = products.iter().map(|p| (*p, self.rng.i32(1..=3))).collect();
        let reply = self.shopper.order(&self.base, self.user_id, &items).await;
        if reply.status == 201 {
            self.mine.push(reply.body["orderId"].as_i64().unwrap());
            // Bounded: old orders stay in the database, only the list of candidates is capped.
            if self.mine.len() > 200 {
                self.mine.remove(0);
            }
        }
    }

    /// Cancels one of this worker's orders, then again (a repeat must answer 200 and restore
    /// nothing); or (`concurrently`) three cancels of it at once.
    async fn cancel(&mut self, concurrently: bool) {
        let Some(index) = (!self.mine.is_empty()).then(|| self.rng.usize(..self.mine.len())) else { return };
        let id = self.mine.swap_remove(index);
        if concurrently {
            let replies = futures::future::join_all((0..3).map(|_| self.shopper.cancel(&self.base, id))).await;
            self.concurrent_cancels.lock().unwrap().push(replies.iter().map(|r| r.status).collect());
        } else {
            self.shopper.cancel(&self.base, id).await;
            self.shopper.cancel(&self.base, id).await;
        }
    }

    /// Ships one of this worker's orders; cancelling it must then be refused (409).
    async fn ship_then_try_to_cancel(&mut self) {
        let Some(index) = (!self.mine.is_empty()).then(|| self.rng.usize(..self.mine.len())) else { return };
        let id = self.mine.swap_remove(index);
        let shipped = self.shopper.set_status(&self.base, id, "shipped").await;
        if shipped.status == 200 {
            let refused = self.shopper.cancel(&self.base, id).await;
            if refused.status != 409 {
                let breach = format!("cancel of shipped order {id} answered {}", refused.status);
                self.shopper.record.lock().unwrap().contract_breaches.push(breach);
            }
        }
    }
}
