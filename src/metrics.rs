//! Prometheus metrics, kept in memory and rendered as text at `GET /metrics`.
//!
//! A mutex-guarded map per metric family: each request takes the lock twice for well under a
//! microsecond, which is far below what a request costs anyway, and keeps the code obvious.

use std::{collections::BTreeMap, fmt::Write, sync::Mutex, time::Duration};

use crate::db::PoolStatus;

/// Upper bounds of the latency histogram buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    /// (route, method, status) -> count
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    /// route -> latency histogram
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Orders: "created" or a rejection code -> count
    orders: Mutex<BTreeMap<&'static str, u64>>,
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn record_request(&self, route: &'static str, method: &str, status: u16, elapsed: Duration) {
        *self.requests.lock().unwrap().entry((route, method.to_owned(), status)).or_default() += 1;
        let seconds = elapsed.as_secs_f64();
        let mut latency = self.latency.lock().unwrap();
        let histogram = latency.entry(route).or_default();
        histogram.count += 1;
        histogram.sum += seconds;
        for (bucket, bound) in histogram.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// `outcome` is "created" or the error code of a rejection.
    pub fn record_order(&self, outcome: &'static str) {
        *self.orders.lock().unwrap().entry(outcome).or_default() += 1;
    }

    pub fn render(&self, pool: PoolStatus) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP http_requests_total HTTP requests answered, by route template, method and status.\n");
        out.push_str("# TYPE http_requests_total counter\n");
        for ((route, method, status), count) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
            );
        }
        out.push_str("# HELP http_request_duration_seconds Time from request headers read to response ready.\n");
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        for (route, histogram) in self.latency.lock().unwrap().iter() {
            for (bound, count) in LATENCY_BUCKETS.iter().zip(histogram.buckets) {
                let _ =
                    writeln!(out, "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(out, "http_request_duration_seconds_sum{{route=\"{route}\"}} {}", histogram.sum);
            let _ = writeln!(out, "http_request_duration_seconds_count{{route=\"{route}\"}} {}", histogram.count);
        }
        out.push_str("# HELP orders_total Order creation attempts by outcome: created, or the rejection code.\n");
        out.push_str("# TYPE orders_total counter\n");
        for (outcome, count) in self.orders.lock().unwrap().iter() {
            let _ = writeln!(out, "orders_total{{outcome=\"{outcome}\"}} {count}");
        }
        for (name, help, value) in [
            ("db_pool_max_connections", "Most database connections the pool opens.", pool.max_size),
            ("db_pool_open_connections", "Database connections open now.", pool.open),
            ("db_pool_in_use_connections", "Database connections checked out by requests now.", pool.in_use),
            ("db_pool_waiting_requests", "Requests waiting for a database connection now.", pool.waiting),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
