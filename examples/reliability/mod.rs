//! What `make chaos` and `make soak` share: a fresh database, the real release binary as a
//! child process, a client that records every answer it gets, and the final check that
//! compares what clients were told with what the database holds.
//!
//! Each run prints a verdict line (`chaos pg-restart: PASS {...figures...}`) and writes the
//! figures as JSON to `target/reliability/`.

#![allow(dead_code)] // chaos and soak each use a different part

pub mod events;
pub mod private_pg;
pub mod receiver;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use order_api::db::audit::{Audit, audit};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

/// `OPERATOR_TOKEN` of the servers the tools start (restocks and status changes need it).
pub const OPERATOR_TOKEN: &str = "reliability-tools-operator-token-0123456789";

/// Where PostgreSQL and the binary are: `ADMIN_DATABASE_URL` (a server URL whose database is
/// only used to create and drop the run's own) and `ORDER_API_BIN`.
pub struct Settings {
    pub admin_url: String,
    pub binary: PathBuf,
    pub out_dir: PathBuf,
}

impl Settings {
    pub fn from_env() -> Settings {
        let settings = Settings {
            admin_url: std::env::var("ADMIN_DATABASE_URL")
                .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into()),
            binary: std::env::var_os("ORDER_API_BIN").map_or_else(|| "target/release/order-api".into(), PathBuf::from),
            out_dir: "target/reliability".into(),
        };
        let binary = settings.binary.canonicalize().unwrap_or_else(|_| {
            panic!("{} not found: build it first (make build) or set ORDER_API_BIN", settings.binary.display())
        });
        let settings = Settings { binary, ..settings };
        std::fs::create_dir_all(&settings.out_dir).expect("create target/reliability");
        settings
    }
}

/// A database of its own for one run, created empty; the servers migrate and seed it.
pub struct Database {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl Database {
    pub async fn create(settings: &Settings, label: &str) -> Database {
        let name = format!("order_api_{label}_{}", std::process::id());
        let admin = connect(&settings.admin_url).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let (server, _) = settings.admin_url.rsplit_once('/').expect("ADMIN_DATABASE_URL ends in /database");
        Database { url: format!("{server}/{name}"), name, admin_url: settings.admin_url.clone() }
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database; kept instead (and named) when the run failed, for a look inside.
    pub async fn finish(self, passed: bool) {
        if passed {
            let admin = connect(&self.admin_url).await;
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
        } else {
            println!("  kept database {} for inspection", self.name);
        }
    }
}

/// Connects, retrying for up to 30 s (PostgreSQL may be restarting).
pub async fn connect(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The release binary serving on its own port; killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    pub base: String,
    pub log_path: PathBuf,
}

impl Server {
    /// Starts `order-api serve` on `port` with `SEED_ON_START=true` (it migrates and seeds
    /// the database if needed) and `extra_env`; its log goes to `target/reliability/NAME.log`
    /// (overwritten).
    pub fn spawn(settings: &Settings, name: &str, database_url: &str, port: u16, extra_env: &[(&str, &str)]) -> Server {
        let log_path = settings.out_dir.join(format!("{name}.log"));
        let log = File::create(&log_path).expect("create the server log");
        let child = Command::new(&settings.binary)
            .arg("serve")
            .current_dir(std::env::temp_dir()) // a developer's .env must not change the run
            .env("DATABASE_URL", database_url)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", port.to_string())
            .env("SEED_ON_START", "true")
            .env("OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("LOG_LEVEL", "warn")
            .envs(extra_env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start order-api");
        Server { child, port, base: format!("http://127.0.0.1:{port}"), log_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `GET /health` answers 200; returns how long that took.
    pub async fn wait_healthy(&mut self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}; see {}", self.log_path.display()));
            }
            if let Ok(reply) = http.get(format!("{}/health", self.base)).send().await
                && reply.status() == 200
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(format!("not healthy within {limit:?}; see {}", self.log_path.display()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL: no drain, no goodbye; in-flight transactions die with their connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// 2xx.
    Ok,
    /// 4xx: the shop said no (out of stock, not cancellable, ...).
    Rejected,
    /// 503 with Retry-After: try again later; nothing was written (CONTRACT part 4).
    Unavailable,
    /// 504 OUTCOME_UNKNOWN with Retry-After: the write may or may not stand.
    OutcomeUnknown,
    /// Any other 5xx, or a 503 without Retry-After: never acceptable.
    ServerError,
    /// No HTTP answer at all (connection refused or reset, timeout): the outcome is unknown.
    Unanswered,
}

/// One answer: when it came (ms since the record started), how long it took, what it was.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub at_ms: u32,
    pub latency_us: u32,
    pub answer: Answer,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Order,
    Cancel,
    Status,
    Restock,
    /// A user's order list.
    List,
    Read,
    Health,
}

/// Everything clients were told during a run: every answer with its time and latency, the
/// orders acknowledged with 201 (and what they held), the cancellations acknowledged with
/// 200, and the first few unacceptable answers verbatim.
#[derive(Default)]
pub struct Record {
    started: Option<Instant>,
    events: Vec<Event>,
    pub acknowledged: HashMap<i64, Vec<(i32, i32)>>,
    pub cancelled: HashSet<i64>,
    pub rejections: HashMap<String, u64>,
    pub bad_answers: Vec<String>,
    /// Well-formed answers that contradict the contract (a shipped order cancelled, ...).
    pub contract_breaches: Vec<String>,
    /// 2xx answers by server (base URL).
    pub ok_by_server: HashMap<String, u64>,
    /// When each acknowledged order was first asked for (its key's first attempt, or the
    /// request itself without a key) and when its 201 came, in ms of this record: the restore
    /// drill tells orders acknowledged before its mark from orders first sent after it.
    pub acknowledged_at: HashMap<i64, (u32, u32)>,
    /// The first attempt of each Idempotency-Key, in ms of this record.
    first_sent: HashMap<String, u32>,
    /// The key and the lines as sent (their order is part of the request's fingerprint) of each
    /// acknowledged keyed order, to replay it.
    pub keyed: HashMap<i64, (String, Vec<(i32, i32)>)>,
    /// When each acknowledged cancellation was acknowledged, in ms of this record.
    pub cancelled_at: HashMap<i64, u32>,
}

pub type SharedRecord = Arc<Mutex<Record>>;

pub fn new_record() -> SharedRecord {
    Arc::new(Mutex::new(Record { started: Some(Instant::now()), ..Record::default() }))
}

impl Record {
    pub fn elapsed_ms(&self) -> u32 {
        self.started.expect("started").elapsed().as_millis() as u32
    }

    pub fn push(&mut self, kind: Kind, answer: Answer, latency: Duration) {
        let at_ms = self.elapsed_ms();
        self.events.push(Event { at_ms, latency_us: latency.as_micros().min(u32::MAX as u128) as u32, answer, kind });
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    pub fn count(&self, filter: impl Fn(&Event) -> bool) -> u64 {
        self.events.iter().filter(|e| filter(e)).count() as u64
    }

    /// Answers by kind, as `{"order": {"ok": 10, "rejected": 2}, ...}`.
    pub fn tally(&self) -> Value {
        let mut tally: HashMap<Kind, HashMap<Answer, u64>> = HashMap::new();
        for event in &self.events {
            *tally.entry(event.kind).or_default().entry(event.answer).or_default() += 1;
        }
        serde_json::to_value(tally).unwrap()
    }

    /// Latency percentile in ms of the answers that pass `filter`.
    pub fn percentile_ms(&self, p: f64, filter: impl Fn(&Event) -> bool) -> f64 {
        let mut latencies: Vec<u32> = self.events.iter().filter(|e| filter(e)).map(|e| e.latency_us).collect();
        percentile_ms(&mut latencies, p)
    }
}

pub fn percentile_ms(latencies_us: &mut [u32], p: f64) -> f64 {
    if latencies_us.is_empty() {
        return 0.0;
    }
    latencies_us.sort_unstable();
    let index = ((latencies_us.len() - 1) as f64 * p).round() as usize;
    f64::from(latencies_us[index]) / 1000.0
}

/// An HTTP client of the shop that writes every answer into a record.
#[derive(Clone)]
pub struct Shopper {
    http: reqwest::Client,
    pub record: SharedRecord,
}

/// The answer to one request: its class, status, and body.
pub struct Reply {
    pub answer: Answer,
    pub status: u16,
    pub body: Value,
}

impl Shopper {
    pub fn new(record: SharedRecord) -> Shopper {
        // Requests end at the server's deadline (10 s) at the latest; 15 s here marks a hang.
        // The operator token goes with every request: restocks and status changes are operator
        // endpoints; the customer paths of open mode do not look at it.
        let mut headers = reqwest::header::HeaderMap::new();
        let bearer = format!("Bearer {OPERATOR_TOKEN}").parse().expect("a header value");
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(15)).default_headers(headers).build().unwrap();
        Shopper { http, record }
    }

    async fn send(&self, kind: Kind, base: &str, request: reqwest::RequestBuilder) -> Reply {
        let started = Instant::now();
        let (answer, status, body) = match request.send().await {
            Err(e) => (Answer::Unanswered, 0, json!({"transport": e.to_string()})),
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response.headers().contains_key("retry-after");
                let body = response.json::<Value>().await.unwrap_or(Value::Null);
                let answer = match status {
                    200..=299 => Answer::Ok,
                    503 if retry_after => Answer::Unavailable,
                    504 if retry_after && body["code"] == "OUTCOME_UNKNOWN" => Answer::OutcomeUnknown,
                    400..=499 => Answer::Rejected,
                    _ => Answer::ServerError,
                };
                (answer, status, body)
            }
        };
        let mut record = self.record.lock().unwrap();
        record.push(kind, answer, started.elapsed());
        match answer {
            Answer::Ok => *record.ok_by_server.entry(base.to_owned()).or_default() += 1,
            Answer::Rejected => {
                let code = body["code"].as_str().unwrap_or("?");
                *record.rejections.entry(format!("{status} {code}")).or_default() += 1;
            }
            Answer::ServerError if record.bad_answers.len() < 10 => {
                record.bad_answers.push(format!("{status} {body}"));
            }
            _ => {}
        }
        Reply { answer, status, body }
    }

    /// `POST /api/orders`; a 201 is recorded as acknowledged with its lines.
    pub async fn order(&self, base: &str, user_id: i32, items: &[(i32, i32)]) -> Reply {
        self.order_with_key(base, user_id, items, None).await
    }

    /// `POST /api/orders` with an `Idempotency-Key`, if given; a 201 is recorded as
    /// acknowledged with its lines (a replay names the same order, recorded once).
    pub async fn order_with_key(&self, base: &str, user_id: i32, items: &[(i32, i32)], key: Option<&str>) -> Reply {
        let body = json!({
            "userId": user_id,
            "items": items.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect::<Vec<_>>(),
        });
        let mut request = self.http.post(format!("{base}/api/orders")).json(&body);
        let sent_at = {
            let mut record = self.record.lock().unwrap();
            let now = record.elapsed_ms();
            match key {
                Some(key) => *record.first_sent.entry(key.to_owned()).or_insert(now),
                None => now,
            }
        };
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let reply = self.send(Kind::Order, base, request).await;
        if reply.status == 201 {
            let id = reply.body["orderId"].as_i64().expect("orderId in a 201");
            let mut lines = items.to_vec();
            lines.sort_unstable();
            let mut record = self.record.lock().unwrap();
            let acknowledged_at = record.elapsed_ms();
            record.acknowledged.insert(id, lines);
            record.acknowledged_at.entry(id).or_insert((sent_at, acknowledged_at));
            if let Some(key) = key {
                record.keyed.insert(id, (key.to_owned(), items.to_vec()));
            }
        }
        reply
    }

    /// `PUT /api/orders/{id}/cancel`; a 200 is recorded as an acknowledged cancellation.
    pub async fn cancel(&self, base: &str, order_id: i64) -> Reply {
        let reply = self.send(Kind::Cancel, base, self.http.put(format!("{base}/api/orders/{order_id}/cancel"))).await;
        if reply.status == 200 {
            let mut record = self.record.lock().unwrap();
            let at = record.elapsed_ms();
            record.cancelled.insert(order_id);
            record.cancelled_at.entry(order_id).or_insert(at);
        }
        reply
    }

    /// `PUT /api/orders/{id}/status`.
    pub async fn set_status(&self, base: &str, order_id: i64, status: &str) -> Reply {
        let request = self.http.put(format!("{base}/api/orders/{order_id}/status")).json(&json!({"status": status}));
        self.send(Kind::Status, base, request).await
    }

    pub async fn get(&self, base: &str, path: &str, kind: Kind) -> Reply {
        self.send(kind, base, self.http.get(format!("{base}{path}"))).await
    }

    /// `POST /api/products/{id}/restock`.
    pub async fn restock(&self, base: &str, product_id: i32, quantity: i32) -> Reply {
        let request =
            self.http.post(format!("{base}/api/products/{product_id}/restock")).json(&json!({"quantity": quantity}));
        self.send(Kind::Restock, base, request).await
    }
}

/// Orders of one line of quantity 1 on the in-stock products 1..=4, from `workers` tasks,
/// each sending to `bases[i % bases.len()]` (a worker whose server does not answer moves on
/// to the next), until `stop` is set.
pub fn order_load(
    shopper: &Shopper,
    bases: &[String],
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|worker| {
            let (shopper, bases, stop) = (shopper.clone(), bases.to_vec(), stop.clone());
            tokio::spawn(async move {
                let mut target = worker % bases.len();
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let product = (n % 4) as i32 + 1;
                    let reply = shopper.order(&bases[target], 1, &[(product, 1)]).await;
                    if reply.answer == Answer::Unanswered {
                        target = (target + 1) % bases.len();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect()
}

/// Ends a load: tells its clients to stop, and waits until each has had its last answer.
pub async fn stop_load(stop: &AtomicBool, clients: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("a load client panicked");
    }
}

/// What the keyed clients saw beyond the record.
#[derive(Default)]
pub struct Retries {
    /// Orders settled (201 or 4xx) after at least one unknown answer (503, 504, no answer).
    pub resolved_by_retry: AtomicU64,
    /// Orders without a definite answer after 60 s of retrying.
    pub never_definite: AtomicU64,
}

/// The exactly-once load of the chaos scenarios: `workers` clients placing orders of 1 to 3
/// lines on products 1..=4, each with its own `Idempotency-Key` (`label-worker-n`) and retried
/// with it every 100 ms until a definite answer (201, or a 4xx such as INSUFFICIENT_STOCK once
/// the stock runs out); every tenth request a restock of 8 (not idempotent, so never retried),
/// one in ten a cancel of an order the client placed (retried until definite), one in ten a
/// read. A client whose server does not answer moves on to the next of `bases`.
pub fn keyed_load(
    shopper: &Shopper,
    bases: &[String],
    workers: usize,
    label: &str,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<Retries>) {
    keyed_load_paced(shopper, bases, workers, label, stop, Duration::ZERO)
}

/// `keyed_load` with each client pausing `pause` after every request: a load that produces
/// events no faster than a receiver that is slow on purpose can take them.
pub fn keyed_load_paced(
    shopper: &Shopper,
    bases: &[String],
    workers: usize,
    label: &str,
    stop: &Arc<AtomicBool>,
    pause: Duration,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<Retries>) {
    let retries = Arc::new(Retries::default());
    let tasks = (0..workers)
        .map(|worker| {
            let client = KeyedClient {
                worker,
                label: label.to_owned(),
                bases: bases.to_vec(),
                target: worker % bases.len(),
                shopper: shopper.clone(),
                retries: retries.clone(),
                pause,
            };
            tokio::spawn(client.run(stop.clone()))
        })
        .collect();
    (tasks, retries)
}

struct KeyedClient {
    worker: usize,
    label: String,
    bases: Vec<String>,
    target: usize,
    shopper: Shopper,
    retries: Arc<Retries>,
    /// Between two requests.
    pause: Duration,
}

impl KeyedClient {
    async fn run(mut self, stop: Arc<AtomicBool>) {
        let mut placed: Vec<i64> = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let product = ((n * 7 + self.worker) % 4) as i32 + 1;
            match n % 10 {
                0 => {
                    let base = self.base();
                    self.settle(self.shopper.restock(&base, product, 8).await.answer);
                }
                1 if !placed.is_empty() => {
                    let order_id = placed.swap_remove((n * 31) % placed.len());
                    self.until_definite(|shopper, base| async move { shopper.cancel(&base, order_id).await }).await;
                }
                2 => {
                    let base = self.base();
                    let answer = self.shopper.get(&base, &format!("/api/products/{product}"), Kind::Read).await.answer;
                    self.settle(answer);
                }
                _ => {
                    let items: Vec<(i32, i32)> = (0..1 + n % 3)
                        .map(|line| (((product as usize + line) % 4) as i32 + 1, 1 + (n % 2) as i32))
                        .collect();
                    let key = format!("{}-{}-{n}", self.label, self.worker);
                    let reply = self
                        .until_definite(|shopper, base| {
                            let (items, key) = (items.clone(), key.clone());
                            async move { shopper.order_with_key(&base, 1, &items, Some(&key)).await }
                        })
                        .await;
                    if let Some(reply) = reply
                        && reply.answer == Answer::Ok
                    {
                        placed.push(reply.body["orderId"].as_i64().unwrap_or_default());
                    }
                }
            }
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
        }
    }

    fn base(&self) -> String {
        self.bases[self.target].clone()
    }

    /// After an answer: a client whose server did not answer moves on to the next one.
    fn settle(&mut self, answer: Answer) {
        if answer == Answer::Unanswered {
            self.target = (self.target + 1) % self.bases.len();
        }
    }

    /// Sends until a definite answer (2xx or 4xx), at most 60 s; `None` if none came.
    async fn until_definite<F, Fut>(&mut self, send: F) -> Option<Reply>
    where
        F: Fn(Shopper, String) -> Fut,
        Fut: std::future::Future<Output = Reply>,
    {
        let (started, mut unknown) = (Instant::now(), false);
        loop {
            let reply = send(self.shopper.clone(), self.base()).await;
            self.settle(reply.answer);
            if matches!(reply.answer, Answer::Ok | Answer::Rejected) {
                if unknown {
                    self.retries.resolved_by_retry.fetch_add(1, Ordering::Relaxed);
                }
                return Some(reply);
            }
            unknown = true;
            if started.elapsed() > Duration::from_secs(60) {
                self.retries.never_definite.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The exactly-once figures every scenario reports, and what must hold of them: no
/// acknowledged order lost or altered, no invariant broken (nothing oversold), no order in the
/// database that no client was told about (with every client retrying its key until a
/// definite answer, each key ends with exactly one order), and every order answered.
pub fn exactly_once(verification: &Verification, retries: &Retries, record: &Record) -> (Value, Vec<String>) {
    let never_definite = retries.never_definite.load(Ordering::Relaxed);
    let figures = json!({
        "acknowledged": verification.acknowledged_orders,
        "lost": verification.lost.len() + verification.altered.len(),
        "oversold": verification.violations.len(),
        "unknown": record.count(|e| e.kind == Kind::Order && matches!(e.answer, Answer::OutcomeUnknown | Answer::Unanswered)),
        "unavailable": record.count(|e| e.kind == Kind::Order && e.answer == Answer::Unavailable),
        "resolved_by_retry": retries.resolved_by_retry.load(Ordering::Relaxed),
        "duplicates": verification.unacknowledged_in_database,
        "never_definite": never_definite,
    });
    let mut expect = Expectations::default();
    expect.check(verification.ok(), || format!("data: {}", verification.figures()));
    expect.check(verification.unacknowledged_in_database == 0, || {
        format!("{} orders in the database that no client was told about", verification.unacknowledged_in_database)
    });
    expect.check(never_definite == 0, || format!("{never_definite} orders never got a definite answer"));
    (figures, expect.0)
}

/// What the database holds compared with what clients were told.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub acknowledged_orders: usize,
    /// Acknowledged (201) but not in the database.
    pub lost: Vec<i64>,
    /// In the database with other lines than the client sent.
    pub altered: Vec<i64>,
    /// Cancellation acknowledged (200) but the order is not cancelled.
    pub cancel_lost: Vec<i64>,
    /// Orders in the database that no client was told about: requests whose outcome the
    /// client cannot know. Never more than those: the unanswered orders (server killed,
    /// connection reset) and the orders answered 504 OUTCOME_UNKNOWN (the database died
    /// during the commit). A 503 promises nothing was written, so it does not count.
    pub unacknowledged_in_database: i64,
    pub unknown_outcome_orders: u64,
    pub violations: Vec<String>,
    #[serde(skip)]
    pub audit: Option<Audit>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.altered.is_empty()
            && self.cancel_lost.is_empty()
            && self.unacknowledged_in_database <= self.unknown_outcome_orders as i64
            && self.violations.is_empty()
    }

    pub fn figures(&self) -> Value {
        let audit = self.audit.as_ref();
        json!({
            "acknowledged_orders": self.acknowledged_orders,
            "orders_in_database": audit.map(|a| a.orders),
            "lines_in_database": audit.map(|a| a.order_lines),
            "cancelled_in_database": audit.map(|a| a.cancelled_orders),
            "lost": self.lost.len(),
            "altered": self.altered.len(),
            "cancel_lost": self.cancel_lost.len(),
            "unacknowledged_in_database": self.unacknowledged_in_database,
            "unknown_outcome_orders": self.unknown_outcome_orders,
            "invariant_violations": self.violations,
        })
    }
}

/// Checks every acknowledged order and cancellation against the database, then audits it.
pub async fn verify(db: &mut Client, record: &SharedRecord) -> Verification {
    let (acknowledged, cancelled, unknown_outcome_orders) = {
        let record = record.lock().unwrap();
        let unknown =
            record.count(|e| e.kind == Kind::Order && matches!(e.answer, Answer::Unanswered | Answer::OutcomeUnknown));
        (record.acknowledged.clone(), record.cancelled.clone(), unknown)
    };
    let ids: Vec<i64> = acknowledged.keys().copied().collect();
    let rows = db
        .query(
            "SELECT o.id, o.status, array_agg(i.product_id ORDER BY i.product_id), array_agg(i.quantity ORDER BY i.product_id)
             FROM orders o JOIN order_items i ON i.order_id = o.id
             WHERE o.id = ANY($1)
             GROUP BY o.id",
            &[&ids],
        )
        .await
        .expect("read the acknowledged orders");
    let mut found = HashMap::new();
    for row in rows {
        let products: Vec<i32> = row.get(2);
        let quantities: Vec<i32> = row.get(3);
        let status: String = row.get(1);
        found.insert(row.get::<_, i64>(0), (status, products.into_iter().zip(quantities).collect::<Vec<_>>()));
    }
    let mut verification = Verification {
        acknowledged_orders: acknowledged.len(),
        lost: Vec::new(),
        altered: Vec::new(),
        cancel_lost: Vec::new(),
        unacknowledged_in_database: 0,
        unknown_outcome_orders,
        violations: Vec::new(),
        audit: None,
    };
    for (id, lines) in &acknowledged {
        match found.get(id) {
            None => verification.lost.push(*id),
            Some((_, stored)) if stored != lines => verification.altered.push(*id),
            Some((status, _)) if cancelled.contains(id) && status != "cancelled" => verification.cancel_lost.push(*id),
            Some(_) => {}
        }
    }
    let audit = audit(db).await.expect("audit the database");
    verification.unacknowledged_in_database = audit.orders - acknowledged.len() as i64;
    verification.violations = audit.violations();
    verification.audit = Some(audit);
    verification
}

/// Prints `TOOL NAME: PASS|FAIL {figures}` and writes the figures to
/// `target/reliability/TOOL-NAME.json`; returns whether it passed.
pub fn verdict(settings: &Settings, tool: &str, name: &str, failures: &[String], figures: Value) -> bool {
    let passed = failures.is_empty();
    let report = json!({"tool": tool, "scenario": name, "passed": passed, "failures": failures, "figures": figures});
    let path = settings.out_dir.join(format!("{tool}-{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).expect("write the report");
    println!("{tool} {name}: {} {}", if passed { "PASS" } else { "FAIL" }, figures);
    for failure in failures {
        println!("  FAILED: {failure}");
    }
    passed
}

/// Collects failed expectations with their reasons.
#[derive(Default)]
pub struct Expectations(pub Vec<String>);

impl Expectations {
    pub fn check(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.0.push(what());
        }
    }
}

/// What a `FaultProxy` does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathMode {
    Pass,
    /// Nothing forwarded and nothing closed, as when packets are dropped: the bytes wait (as
    /// TCP would retransmit them) until the path comes back.
    Blackhole,
    /// Every chunk delivered this long after it was read, each way.
    Delay(Duration),
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` whose path can be made to hang or lag, for
/// the faults a real network has and a clean shutdown does not show.
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<Mutex<PathMode>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(PathMode::Pass));
        let shared = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    // Small writes go out at once, as they would without the proxy (Nagle's
                    // algorithm against delayed ACKs would add 40 ms stalls).
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, mode.clone()));
                    tokio::spawn(pump(server_read, client_write, mode));
                });
            }
        });
        FaultProxy { port, mode, task }
    }

    pub fn set(&self, mode: PathMode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One direction of a proxied connection: reads chunks, and writes each once it is due (its
/// delay past) and the path is not blackholed. Reading stops while blackholed, so the sender's
/// buffers fill as they would behind a dead route.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<Mutex<PathMode>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (queue, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer_mode = mode.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            while *writer_mode.lock().unwrap() == PathMode::Blackhole {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.lock().unwrap();
        if current == PathMode::Blackhole {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let delay = if let PathMode::Delay(delay) = current { delay } else { Duration::ZERO };
                if queue.send((tokio::time::Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.await;
}
