//! Prometheus metrics, kept in memory and rendered as text at `GET /metrics`.
//!
//! A mutex-guarded map per metric family: each request takes the lock twice for well under a
//! microsecond, which is far below what a request costs anyway, and keeps the code obvious.
//! No label takes a value the client chooses (a series per made-up method or path would let
//! any client grow the scrape without bound): routes are templates or `unmatched`, methods
//! outside the standard ones are `OTHER`, statuses and outcomes are the service's own.
//!
//! The service's own series are prefixed `order_api_`; the `process_*` series are the names
//! every Prometheus client library exports, read from `/proc` at scrape time.

use std::{collections::BTreeMap, fmt::Write, sync::Mutex, time::Duration};

use hyper::Method;

use crate::{
    db::{Backlog, Outcome, PoolStatus},
    sync::lock,
};

/// Upper bounds of the latency histogram buckets, in seconds. The last is the default request
/// deadline (`REQUEST_TIMEOUT_MS`, 10 s), so requests that ran into it stand apart.
const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

#[derive(Default)]
pub struct Metrics {
    /// (route, method, status) -> count
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    /// (route, method) -> latency histogram
    latency: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Orders: "created", "replayed" or a rejection code -> count
    orders: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections refused past `MAX_CONNECTIONS`.
    refused_connections: Mutex<u64>,
    /// Long-polls of the event feed waiting now.
    long_polls: std::sync::atomic::AtomicI64,
    /// Webhook delivery attempts by outcome.
    webhook_attempts: Mutex<BTreeMap<&'static str, u64>>,
    /// Per enabled endpoint, as last read: undelivered events, age of the oldest in seconds.
    webhook_backlog: Mutex<Vec<Backlog>>,
}

/// Counts a long-poll as open until dropped.
pub struct LongPoll<'a>(&'a Metrics);

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The label of a request method: one of the standard methods, or `OTHER`.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN.iter().find(|known| *known == method).map_or("OTHER", Method::as_str)
}

impl Metrics {
    pub fn record_request(&self, route: &'static str, method: &Method, status: u16, elapsed: Duration) {
        let method = method_label(method);
        *lock(&self.requests).entry((route, method, status)).or_default() += 1;
        let seconds = elapsed.as_secs_f64();
        let mut latency = lock(&self.latency);
        let histogram = latency.entry((route, method)).or_default();
        histogram.count += 1;
        histogram.sum += seconds;
        for (bucket, bound) in histogram.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// `outcome` is "created", "replayed" or the error code of a rejection.
    pub fn record_order(&self, outcome: &'static str) {
        *lock(&self.orders).entry(outcome).or_default() += 1;
    }

    /// A reader of the event feed is served (and may wait) until the guard drops.
    pub fn long_poll_opened(&self) -> LongPoll<'_> {
        self.long_polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LongPoll(self)
    }

    pub fn record_webhook_attempt(&self, outcome: Outcome) {
        let name = match outcome {
            Outcome::Delivered => "delivered",
            Outcome::Retry(_) => "retry",
            Outcome::Failed => "failed",
            Outcome::Disabled => "disabled",
        };
        *lock(&self.webhook_attempts).entry(name).or_default() += 1;
    }

    pub fn set_webhook_backlog(&self, backlog: Vec<Backlog>) {
        *lock(&self.webhook_backlog) = backlog;
    }

    pub fn record_refused_connection(&self) {
        *lock(&self.refused_connections) += 1;
    }

    pub fn render(&self, pool: PoolStatus) -> String {
        let mut out = String::with_capacity(8192);
        family(&mut out, "order_api_build_info", "gauge", "The version and git commit of the running build.");
        let _ = writeln!(
            out,
            "order_api_build_info{{version=\"{}\",revision=\"{}\"}} 1",
            crate::VERSION,
            crate::GIT_COMMIT
        );

        family(
            &mut out,
            "order_api_http_requests_total",
            "counter",
            "HTTP requests answered, by route template, method and status.",
        );
        for ((route, method, status), count) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "order_api_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
            );
        }

        let name = "order_api_http_request_duration_seconds";
        family(&mut out, name, "histogram", "Time from request headers read to response ready.");
        for ((route, method), histogram) in lock(&self.latency).iter() {
            let labels = format!("route=\"{route}\",method=\"{method}\"");
            for (bound, count) in LATENCY_BUCKETS.iter().zip(histogram.buckets) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", histogram.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count);
        }

        counters(
            &mut out,
            "order_api_orders_total",
            "Order creation attempts by outcome: created, replayed, or the rejection code.",
            "outcome",
            lock(&self.orders).iter().map(|(outcome, count)| (*outcome, *count)),
        );

        counters(
            &mut out,
            "order_api_events_written_total",
            "Order events committed by this process, by type (written in the change's own transaction).",
            "type",
            crate::db::events::written(),
        );
        counters(
            &mut out,
            "order_api_webhook_attempts_total",
            "Webhook delivery attempts by outcome: delivered, retry, failed (given up), disabled (410).",
            "outcome",
            lock(&self.webhook_attempts).iter().map(|(outcome, count)| (*outcome, *count)),
        );
        let backlog = lock(&self.webhook_backlog).clone();
        family(
            &mut out,
            "order_api_webhook_undelivered_events",
            "gauge",
            "Events not yet delivered, per enabled endpoint.",
        );
        for endpoint in &backlog {
            let _ = writeln!(
                out,
                "order_api_webhook_undelivered_events{{endpoint=\"{}\"}} {}",
                endpoint.endpoint_id, endpoint.undelivered
            );
        }
        family(
            &mut out,
            "order_api_webhook_oldest_undelivered_seconds",
            "gauge",
            "Age of the oldest event not yet delivered, per enabled endpoint (0: none).",
        );
        for endpoint in &backlog {
            let _ = writeln!(
                out,
                "order_api_webhook_oldest_undelivered_seconds{{endpoint=\"{}\"}} {}",
                endpoint.endpoint_id, endpoint.oldest_age_secs
            );
        }

        let refused = *lock(&self.refused_connections);
        for (name, kind, help, value) in [
            (
                "order_api_connections_refused_total",
                "counter",
                "Client connections refused past MAX_CONNECTIONS.",
                refused as f64,
            ),
            (
                "order_api_log_lines_dropped_total",
                "counter",
                "Log lines dropped because stdout did not keep up (LOG_BUFFER_BYTES full).",
                crate::telemetry::dropped_log_lines() as f64,
            ),
            (
                "order_api_db_pool_max_connections",
                "gauge",
                "Most database connections the pool opens.",
                pool.max_size as f64,
            ),
            ("order_api_db_pool_open_connections", "gauge", "Database connections open now.", pool.open as f64),
            (
                "order_api_event_feed_reads_open",
                "gauge",
                "Reads of the event feed being served now (long-polls waiting included).",
                self.long_polls.load(std::sync::atomic::Ordering::Relaxed) as f64,
            ),
            (
                "order_api_db_pool_in_use_connections",
                "gauge",
                "Database connections checked out by requests now.",
                pool.in_use as f64,
            ),
            (
                "order_api_db_pool_waiting_requests",
                "gauge",
                "Requests waiting for a database connection now.",
                pool.waiting as f64,
            ),
        ] {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        process::render(&mut out);
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter family with one label: a series per value.
fn counters<V: std::fmt::Display, C: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (V, C)>,
) {
    family(out, name, "counter", help);
    for (value, count) in series {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

/// The standard process series, from `/proc/self` (Linux). A series whose file cannot be read
/// (another OS, a restricted `/proc`) is left out rather than reported as zero.
mod process {
    use std::{fmt::Write, fs};

    /// Clock ticks per second of the times in `/proc/*/stat`: `USER_HZ`, fixed at 100 by the
    /// Linux ABI on every architecture the service is built for.
    const TICKS_PER_SECOND: f64 = 100.0;

    pub fn render(out: &mut String) {
        let stat = fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .map(|(_, rest)| rest.split(' ').collect())
            .unwrap_or_default();
        // Numbered as in proc(5): utime is field 14, i.e. index 11 after "pid (comm)".
        let field = |number: usize| fields.get(number - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            let value = (user + system) / TICKS_PER_SECOND;
            series(
                out,
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                value,
            );
        }
        if let Some(rss_kib) = status_kib("VmRSS:") {
            series(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss_kib * 1024.0);
        }
        if let Ok(entries) = fs::read_dir("/proc/self/fd") {
            series(out, "process_open_fds", "gauge", "Number of open file descriptors.", entries.count() as f64);
        }
        if let (Some(started_ticks), Some(boot_time)) = (field(22), boot_time()) {
            let value = boot_time + started_ticks / TICKS_PER_SECOND;
            series(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                value,
            );
        }
    }

    fn series(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
        super::family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    /// A `kB` line of `/proc/self/status`.
    fn status_kib(key: &str) -> Option<f64> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|line| line.starts_with(key))?;
        line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// When the machine booted, in seconds since the epoch (`btime` of `/proc/stat`).
    fn boot_time() -> Option<f64> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        stat.lines().find_map(|line| line.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> PoolStatus {
        PoolStatus { max_size: 8, open: 1, in_use: 0, waiting: 0 }
    }

    /// Made-up methods share one series, so a client cannot grow the scrape.
    #[test]
    fn unknown_methods_are_labelled_other() {
        let metrics = Metrics::default();
        for made_up in ["FOO", "BAR", "BAZ"] {
            let method = Method::from_bytes(made_up.as_bytes()).unwrap();
            metrics.record_request("unmatched", &method, 405, Duration::from_millis(1));
        }
        let text = metrics.render(status());
        assert!(text.contains(r#"order_api_http_requests_total{route="unmatched",method="OTHER",status="405"} 3"#));
        assert!(!text.contains("FOO") && !text.contains("BAR") && !text.contains("BAZ"), "{text}");
    }

    /// Latency is per route and method, with a bucket at the 10 s request deadline.
    #[test]
    fn latency_is_labelled_by_route_and_method() {
        let metrics = Metrics::default();
        metrics.record_request("/api/orders", &Method::POST, 503, Duration::from_millis(9_500));
        let text = metrics.render(status());
        let labels = r#"route="/api/orders",method="POST""#;
        assert!(text.contains(&format!(r#"order_api_http_request_duration_seconds_bucket{{{labels},le="5"}} 0"#)));
        assert!(text.contains(&format!(r#"order_api_http_request_duration_seconds_bucket{{{labels},le="10"}} 1"#)));
    }

    /// The value of the series `name` in a scrape.
    fn value(text: &str, name: &str) -> f64 {
        let line = text.lines().find(|line| line.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// The process series are there on Linux, with plausible values.
    #[test]
    fn process_series_come_from_proc() {
        let text = Metrics::default().render(status());
        let value = |name: &str| value(&text, name);
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 24.0 * 3600.0, "{started} vs {now}");
    }

    /// `process_cpu_seconds_total` counts this process's CPU time: it grows while the process
    /// computes (the kernel counts in ticks of 10 ms, so the test computes until it has moved,
    /// for 20 s at most).
    #[test]
    fn process_cpu_seconds_grow_with_the_cpu_time_used() {
        let cpu = || value(&Metrics::default().render(status()), "process_cpu_seconds_total");
        let before = cpu();
        let started = std::time::Instant::now();
        let mut work = 0u64;
        while cpu() <= before {
            assert!(started.elapsed() < Duration::from_secs(20), "no CPU time counted: {before} after 20 s of work");
            for i in 0..1_000_000u64 {
                work = std::hint::black_box(work.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(cpu() > before);
    }
}
