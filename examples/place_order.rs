//! A client that places orders the way the API asks to be called (README "Errors", CONTRACT.md
//! part 4), so that a fault anywhere between it and PostgreSQL never makes a second order nor
//! loses one:
//!
//! - **one `Idempotency-Key` per logical order**, made before the first attempt and sent with
//!   every retry of that order (never a new key for a retry: the key is what lets the server
//!   answer "already done" instead of ordering twice);
//! - **503 `SERVICE_UNAVAILABLE`** (nothing was written), **429** and **409
//!   `IDEMPOTENCY_IN_PROGRESS`**: retried, after the answer's `Retry-After`;
//! - **504 `OUTCOME_UNKNOWN`**, a lost connection or a timeout (the order may or may not have
//!   been placed): retried *with the same key* until the answer is definite; the retry answers
//!   the stored outcome (`Idempotent-Replayed: true`) or places the order once if it was lost;
//! - anything else (201, or a 4xx refusal) is definite: stop. A refusal is stored under the key
//!   too, so it is as final as a 201.
//!
//! Retries wait `Retry-After` when the answer has one, else a jittered exponential backoff
//! (100 ms doubling to 2 s), and stop after `MAX_ATTEMPTS` or `--deadline-secs`: an order still
//! unknown then is reported as unknown with its key, which the caller keeps and retries later
//! (the key is honoured for 24 h).
//!
//! ```sh
//! cargo run --example place_order -- --url http://localhost:3000 --orders 3
//! ```
//! Options: `--url` (default http://127.0.0.1:3000), `--orders N` (1), `--concurrency C` (1),
//! `--user ID` (1), `--product ID` (2), `--quantity Q` (1), `--pace-ms MS` (0: pause between a
//! worker's orders), `--deadline-secs S` (60, per order), `--bearer TOKEN` (AUTH_MODE=jwt).
//! Prints one JSON line per order and a summary line; exit code 0 when every order ended with a
//! definite answer, 1 otherwise. `examples/place-order-check` runs it in CI through a fault.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Attempts of one order before it is reported unknown (each bounded by `ATTEMPT_TIMEOUT`).
const MAX_ATTEMPTS: u32 = 50;
/// Longer than the server's own request deadline (`REQUEST_TIMEOUT_MS`, 10 s), so that the
/// server's answer (a 503 or 504 at its deadline) comes before the client gives up waiting.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// The backoff when an answer has no `Retry-After`: from this, doubling ...
const BACKOFF_START: Duration = Duration::from_millis(100);
/// ... up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The longest `Retry-After` honoured as given; a longer one is waited this long (a bound, so a
/// proxy's mistaken header cannot park the client for hours).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);

/// How one logical order ended.
#[derive(Debug)]
enum Outcome {
    /// 201: the order exists (`replayed`: the answer was the stored outcome of an earlier
    /// attempt with the same key, whose answer this client never saw).
    Created { order_id: i64, replayed: bool },
    /// A definite refusal (4xx): no order was placed, and retrying will not change that.
    Refused { status: u16, code: String },
    /// Still unknown when the attempts or the deadline ran out: keep the key and retry later.
    Unknown { last: String },
}

/// What happened on the way: every attempt's status, or `0` for a transport error.
#[derive(Debug, Default)]
struct Trace {
    statuses: Vec<u16>,
}

/// What an answer asks of the client.
enum Next {
    Done(Outcome),
    /// Try again with the same key, after this long.
    Retry(Duration, String),
}

struct Options {
    url: String,
    orders: usize,
    concurrency: usize,
    user: i64,
    product: i64,
    quantity: i64,
    pace: Duration,
    deadline: Duration,
    bearer: Option<String>,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            url: "http://127.0.0.1:3000".to_owned(),
            orders: 1,
            concurrency: 1,
            user: 1,
            product: 2,
            quantity: 1,
            pace: Duration::ZERO,
            deadline: Duration::from_secs(60),
            bearer: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || value.parse::<u64>().map_err(|_| format!("{flag}: {value:?} is not a number"));
            match flag.as_str() {
                "--url" => options.url = value.trim_end_matches('/').to_owned(),
                "--orders" => options.orders = number()? as usize,
                "--concurrency" => options.concurrency = (number()? as usize).max(1),
                "--user" => options.user = number()? as i64,
                "--product" => options.product = number()? as i64,
                "--quantity" => options.quantity = number()? as i64,
                "--pace-ms" => options.pace = Duration::from_millis(number()?),
                "--deadline-secs" => options.deadline = Duration::from_secs(number()?),
                "--bearer" => options.bearer = Some(value),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(options)
    }
}

/// A new key for one logical order: 128 random bits, hex (any 1 to 255 visible ASCII characters
/// would do; a UUID is as good).
fn new_idempotency_key() -> String {
    format!("order-{:032x}", fastrand::u128(..))
}

/// Places one order, retrying as the API asks, until a definite answer or the limits.
async fn place_order(http: &reqwest::Client, options: &Options, body: &Value, key: &str) -> (Outcome, Trace) {
    let started = Instant::now();
    let mut trace = Trace::default();
    let mut last = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        let mut request = http
            .post(format!("{}/api/orders", options.url))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .timeout(ATTEMPT_TIMEOUT)
            .body(body.to_string());
        if let Some(token) = &options.bearer {
            request = request.bearer_auth(token);
        }
        let next = match request.send().await {
            Ok(response) => {
                trace.statuses.push(response.status().as_u16());
                judge(response, attempt).await
            }
            // Refused before anything was sent, reset, or no answer in time: the order may or
            // may not have been placed. The key makes the retry safe either way.
            Err(error) => {
                trace.statuses.push(0);
                Next::Retry(backoff(attempt), format!("transport: {error}"))
            }
        };
        match next {
            Next::Done(outcome) => return (outcome, trace),
            Next::Retry(wait, why) => {
                last = why;
                if started.elapsed() + wait > options.deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
    (Outcome::Unknown { last }, trace)
}

/// What the answer to one attempt means (README "Errors").
async fn judge(response: reqwest::Response, attempt: u32) -> Next {
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|seconds| Duration::from_secs(seconds).min(RETRY_AFTER_MAX));
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["code"].as_str().unwrap_or("").to_owned();
    let wait = retry_after.unwrap_or_else(|| backoff(attempt));
    match (status, code.as_str()) {
        (201, _) => match body["orderId"].as_i64() {
            Some(order_id) => Next::Done(Outcome::Created { order_id, replayed }),
            None => Next::Retry(wait, format!("201 without an orderId: {body}")),
        },
        // Nothing was written: retry freely.
        (503, _) | (429, _) => Next::Retry(wait, format!("{status} {code}")),
        // The first attempt with this key is still running: wait for it.
        (409, "IDEMPOTENCY_IN_PROGRESS") => Next::Retry(wait, format!("{status} {code}")),
        // The order may stand or not: only a retry with the same key can tell.
        (504, _) => Next::Retry(wait, format!("{status} {code}")),
        // A 500 is a bug; its outcome is unknown, so the same key again, a bounded number of times.
        (500..=599, _) => Next::Retry(wait, format!("{status} {code}")),
        (_, _) => Next::Done(Outcome::Refused { status, code }),
    }
}

/// Full jitter: a random wait up to `BACKOFF_START * 2^attempt`, at most `BACKOFF_MAX`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    ceiling.mul_f64(fastrand::f64()).max(Duration::from_millis(10))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = match Options::parse() {
        Ok(options) => Arc::new(options),
        Err(e) => {
            eprintln!("place_order: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..options.concurrency {
        let (http, options, next) = (http.clone(), options.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= options.orders {
                    return results;
                }
                let body = json!({"userId": options.user, "items": [{"productId": options.product, "quantity": options.quantity}]});
                let key = new_idempotency_key();
                let (outcome, trace) = place_order(&http, &options, &body, &key).await;
                println!("{}", report(index, &key, &outcome, &trace));
                results.push((outcome, trace));
                tokio::time::sleep(options.pace).await;
            }
        }));
    }
    let mut results = Vec::new();
    for worker in workers {
        results.extend(worker.await.expect("worker"));
    }
    let count = |f: &dyn Fn(&Outcome) -> bool| results.iter().filter(|(outcome, _)| f(outcome)).count();
    let statuses =
        |wanted: u16| results.iter().flat_map(|(_, trace)| &trace.statuses).filter(|s| **s == wanted).count();
    let unknown = count(&|o| matches!(o, Outcome::Unknown { .. }));
    let summary = json!({"summary": {
        "orders": results.len(),
        "created": count(&|o| matches!(o, Outcome::Created { .. })),
        "replayed": count(&|o| matches!(o, Outcome::Created { replayed: true, .. })),
        "refused": count(&|o| matches!(o, Outcome::Refused { .. })),
        "unknown": unknown,
        "attempts": results.iter().map(|(_, trace)| trace.statuses.len()).sum::<usize>(),
        "answered_503": statuses(503),
        "answered_504": statuses(504),
        "transport_errors": statuses(0),
    }});
    println!("{summary}");
    if unknown == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}

/// One JSON line per order: its key, how it ended and every attempt's status.
fn report(index: usize, key: &str, outcome: &Outcome, trace: &Trace) -> Value {
    let mut line = json!({"order": index, "key": key, "statuses": trace.statuses});
    match outcome {
        Outcome::Created { order_id, replayed } => {
            line["outcome"] = json!("created");
            line["orderId"] = json!(order_id);
            line["replayed"] = json!(replayed);
        }
        Outcome::Refused { status, code } => {
            line["outcome"] = json!("refused");
            line["status"] = json!(status);
            line["code"] = json!(code);
        }
        Outcome::Unknown { last } => {
            line["outcome"] = json!("unknown");
            line["last"] = json!(last);
        }
    }
    line
}
