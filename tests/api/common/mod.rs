//! The test harness: every test gets its own freshly created, migrated and seeded database
//! and its own server on a random port, in-process, spoken to over a real socket. Tests run
//! in parallel and never see each other; the database is dropped when the `TestApp` drops.
//!
//! PostgreSQL is found through `TEST_DATABASE_URL` (a server URL whose database part is
//! ignored), by default the local trust-auth server.
//!
//! Beside this file: `wait` (poll what a test waits for, with a bound: never a guessed sleep),
//! `raw` (requests written on sockets of their own, and knowing when the server has read
//! them), `process` (the real binary as a child process), `private_pg` (a PostgreSQL server
//! of the test's own), `otlp` (a collector that receives and decodes the service's spans).
//!
//! An in-process server logs nothing (no subscriber is installed; `main` installs it): the
//! tests of the log lines run the binary.

pub mod otlp;
pub mod private_pg;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod receiver;
pub mod wait;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use order_api::{auth::Secret, config::Config};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_postgres::NoTls;

pub const DEFAULT_TEST_DATABASE_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";

/// Seeded stock of products 1..=5 (the contract's seed).
pub const SEED_STOCK: [(i32, i32); 5] = [(1, 10), (2, 50), (3, 20), (4, 5), (5, 0)];

pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub address: String,
    pub port: u16,
    /// Sends `Authorization: Bearer OPERATOR_TOKEN` with every request, so the operator
    /// endpoints (restock, status changes, every user's orders) work as in the tests before
    /// they needed credentials; customer paths in open mode do not look at it. A request that
    /// sets its own `Authorization` replaces it.
    pub http: reqwest::Client,
    /// A connection to the test database, to look at (and tamper with) what the API wrote.
    pub db: tokio_postgres::Client,
    pub database_name: String,
    pub database_url: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    /// Dropped after the server is stopped (fields drop after `Drop::drop`); `None` for a
    /// database the test owns itself (on a private server).
    _database: Option<TestDatabase>,
}

/// The order lanes held by `TestApp::hold_order_lanes`.
pub struct HeldOrderLanes {
    holder: tokio_postgres::Client,
    blockers: Vec<JoinHandle<Reply>>,
}

impl HeldOrderLanes {
    /// Lets the two blocked orders go (each placing one unit of product 3, as a new order:
    /// the held keys were never committed); their answers.
    pub async fn release(self) -> Vec<Reply> {
        self.holder.batch_execute("ROLLBACK").await.unwrap();
        let mut answers = Vec::new();
        for blocker in self.blockers {
            let answer = blocker.await.unwrap();
            assert_eq!(answer.status, 201, "{}", answer.text);
            answers.push(answer);
        }
        answers
    }
}

/// The operator token of every test server (`OPERATOR_TOKEN`), sent by `TestApp::http`.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789-abcdef";

fn operator_token() -> Option<Secret> {
    Some(Secret::new(OPERATOR_TOKEN))
}

/// A fresh database, migrated and seeded, and a server on it with the default configuration
/// (and `OPERATOR_TOKEN`).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// The same, with configuration changes applied before the server starts.
pub async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    let database = TestDatabase::create().await;
    let mut config = Config {
        database_url: database.url.clone(),
        host: [127, 0, 0, 1].into(),
        port: 0,
        log_level: tracing::level_filters::LevelFilter::ERROR,
        operator_token: operator_token(),
        ..Config::default()
    };
    order_api::prepare_database(&config, true).await.expect("migrate and seed the test database");
    customize(&mut config);
    start_server(config, database).await
}

/// A server with `config` (already migrated, reaching `database` its own way, e.g. through a
/// pooler), which the test inspects directly; the database is dropped with the app.
pub async fn spawn_app_on(mut config: Config, database: TestDatabase) -> TestApp {
    config.log_level = tracing::level_filters::LevelFilter::ERROR;
    config.operator_token = operator_token();
    start_server(config, database).await
}

/// A server whose database cannot be reached at all (nothing listens on the port).
pub async fn spawn_app_without_database() -> TestApp {
    let database = TestDatabase::create().await;
    let config = Config {
        database_url: "postgresql://postgres@127.0.0.1:1/nowhere".into(),
        host: [127, 0, 0, 1].into(),
        port: 0,
        connect_timeout: Duration::from_millis(500),
        log_level: tracing::level_filters::LevelFilter::ERROR,
        operator_token: operator_token(),
        ..Config::default()
    };
    start_server(config, database).await
}

/// A server with `config`, on a database the test made and migrated itself at `config`'s
/// `DATABASE_URL` (on a `PrivatePostgres`). The test's own connection (`TestApp::db`) takes
/// that URL without its parameters (`sslmode`, ...): it inspects, it is not under test.
pub async fn spawn_app_at(config: Config) -> TestApp {
    let inspect = config.database_url.split('?').next().unwrap().to_owned();
    spawn_app_inspected_at(config, &inspect).await
}

/// The same, with the test's own connection to `inspect_url` (for a `DATABASE_URL` the test
/// cannot connect with, such as a host name that only `hostaddr` makes reachable).
pub async fn spawn_app_inspected_at(mut config: Config, inspect_url: &str) -> TestApp {
    config.log_level = tracing::level_filters::LevelFilter::ERROR;
    config.operator_token = operator_token();
    config.host = [127, 0, 0, 1].into();
    let name = inspect_url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    start(config, inspect_url.to_owned(), name, None).await
}

async fn start_server(config: Config, database: TestDatabase) -> TestApp {
    let (url, name) = (database.url.clone(), database.name.clone());
    start(config, url, name, Some(database)).await
}

async fn start(config: Config, database_url: String, database_name: String, database: Option<TestDatabase>) -> TestApp {
    let db = connect(&database_url).await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        order_api::run(listener, config, async {
            let _ = shutdown_rx.await;
        })
        .await
        .expect("server runs");
    });
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        http: client(Some(OPERATOR_TOKEN)),
        db,
        database_name,
        database_url,
        shutdown: Some(shutdown),
        server: Some(server),
        _database: database,
    }
}

/// An HTTP client that sends `Authorization: Bearer <token>` with every request, or nothing.
pub fn client(bearer: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = bearer {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    }
    reqwest::Client::builder().timeout(Duration::from_secs(30)).default_headers(headers).build().unwrap()
}

/// `TEST_DATABASE_URL`, or the default local server.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned())
}

/// `server_url()` with its database replaced by `name`.
fn url_for_database(name: &str) -> String {
    let base = server_url();
    let without_query = base.split('?').next().unwrap();
    let (server, _) = without_query.rsplit_once('/').expect("TEST_DATABASE_URL ends in /database");
    format!("{server}/{name}")
}

/// A new, empty database with a name no other test uses, dropped when this is dropped.
pub struct TestDatabase {
    pub name: String,
    /// Its URL on the test PostgreSQL server.
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let name =
            format!("order_api_test_{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos);
        let admin = connect(&server_url()).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        let url = url_for_database(&name);
        TestDatabase { name, url }
    }
}

/// A connection to the server's maintenance database, for what a test database cannot do to
/// itself (ALTER DATABASE, watching other databases' sessions).
pub async fn admin() -> tokio_postgres::Client {
    connect(&server_url()).await
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee, so the cleanup gets a thread and a runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&server_url(), NoTls).await {
                    tokio::spawn(connection);
                    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
        // `_database` is dropped next: the database goes with the app.
    }
}

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(purpose: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("order-api-{purpose}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port nothing listens on: bound and released at once. Another process could take it in
/// between; unlikely enough for a test.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An order body: one line of `quantity` units of `product_id` for `user_id`.
pub fn order_body(user_id: i32, product_id: i32, quantity: i32) -> Value {
    serde_json::json!({"userId": user_id, "items": [{"productId": product_id, "quantity": quantity}]})
}

/// Reads from `stream` until the server closes the connection (or `limit` passes); returns
/// what was read and, if it closed, after how long.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, Option<Duration>) {
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout_at(started + limit, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => break None,
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

/// A response, read whole: status, headers and the body as JSON (`Value::Null` if it is not).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, headers, text, json }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error response: the status, a JSON body with this `code`, a non-empty
    /// human `error` sentence, and the JSON content type.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status of {}", self.text);
        assert_eq!(self.json["code"], code, "code of {}", self.text);
        assert!(self.json["error"].as_str().is_some_and(|e| !e.is_empty()), "error sentence in {}", self.text);
        assert_eq!(self.header("content-type"), Some("application/json"));
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> Reply {
        Reply::read(self.http.get(self.url(path)).send().await.expect("GET")).await
    }

    pub async fn put(&self, path: &str) -> Reply {
        Reply::read(self.http.put(self.url(path)).send().await.expect("PUT")).await
    }

    pub async fn request(&self, method: reqwest::Method, path: &str) -> Reply {
        Reply::read(self.http.request(method, self.url(path)).send().await.expect("request")).await
    }

    /// POST with a JSON body and `Content-Type: application/json`.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, "application/json", body.to_string()).await
    }

    /// POST with any body and content type, for malformed input.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> Reply {
        let request = self.http.post(self.url(path)).header("content-type", content_type).body(body);
        Reply::read(request.send().await.expect("POST")).await
    }

    /// Writes `head` then `body` on a new connection (ignoring a write error: the server may
    /// answer and close early), then reads the response until the server closes or 5 s pass.
    pub async fn raw_exchange(&self, head: &[u8], body: &[u8]) -> String {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let _ = stream.write_all(head).await;
        let _ = stream.write_all(body).await;
        read_until_closed(&mut stream, Duration::from_secs(5)).await.0
    }

    pub async fn post_order(&self, body: &Value) -> Reply {
        self.post_json("/api/orders", body).await
    }

    /// `POST /api/orders` with an `Idempotency-Key`.
    pub async fn post_order_with_key(&self, key: &str, body: &Value) -> Reply {
        let request = self
            .http
            .post(self.url("/api/orders"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body.to_string());
        Reply::read(request.send().await.expect("POST")).await
    }

    /// Orders one line for user 1 and asserts it was created; returns the order id.
    pub async fn order(&self, product_id: i32, quantity: i32) -> i64 {
        let reply = self.post_order(&order_body(1, product_id, quantity)).await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        reply.json["orderId"].as_i64().unwrap()
    }

    /// From now on every payment insert fails (a trigger raises an error naming the table),
    /// so an order fails half way through its transaction; `allow_payments` undoes it.
    pub async fn fail_payments(&self) {
        self.db
            .batch_execute(
                "CREATE FUNCTION fail_payment() RETURNS trigger LANGUAGE plpgsql AS
                     $$ BEGIN RAISE EXCEPTION 'injected payment failure in table payments'; END $$;
                 CREATE TRIGGER fail_payment BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION fail_payment();",
            )
            .await
            .unwrap();
    }

    pub async fn allow_payments(&self) {
        self.db.batch_execute("DROP TRIGGER fail_payment ON payments").await.unwrap();
    }

    pub async fn cancel(&self, order_id: i64) -> Reply {
        self.put(&format!("/api/orders/{order_id}/cancel")).await
    }

    pub async fn stock(&self, product_id: i32) -> i32 {
        self.db.query_one("SELECT stock FROM products WHERE id = $1", &[&product_id]).await.unwrap().get(0)
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
    }

    /// Everything a request could change, to assert that a rejected one changed nothing.
    pub async fn snapshot(&self) -> Snapshot {
        let stock = self.db.query("SELECT id, stock FROM products ORDER BY id", &[]).await.unwrap();
        Snapshot {
            orders: self.count("orders").await,
            order_items: self.count("order_items").await,
            payments: self.count("payments").await,
            stock: stock.iter().map(|row| (row.get(0), row.get(1))).collect(),
            statuses: self
                .db
                .query("SELECT id, status FROM orders ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect(),
        }
    }

    /// Adds stock to a product through the API (recorded in the inventory ledger).
    pub async fn restock(&self, product_id: i32, quantity: i32) {
        let reply = self
            .post_json(&format!("/api/products/{product_id}/restock"), &serde_json::json!({"quantity": quantity}))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }

    /// Any method with a JSON body.
    pub async fn request_json(&self, method: reqwest::Method, path: &str, body: &Value) -> Reply {
        let request =
            self.http.request(method, self.url(path)).header("content-type", "application/json").body(body.to_string());
        Reply::read(request.send().await.expect("request")).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Reply {
        let request = self.http.put(self.url(path)).header("content-type", "application/json").body(body.to_string());
        Reply::read(request.send().await.expect("PUT")).await
    }

    /// Moves an order to `status` through the API and asserts it worked.
    pub async fn set_status(&self, order_id: i64, status: &str) {
        let reply =
            self.put_json(&format!("/api/orders/{order_id}/status"), &serde_json::json!({"status": status})).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }

    /// Sum of the inventory movements of one product, of one reason or all (`None`).
    pub async fn movements(&self, product_id: i32, reason: Option<&str>) -> i64 {
        self.db
            .query_one(
                "SELECT coalesce(sum(delta), 0)::int8 FROM inventory_movements
                 WHERE product_id = $1 AND ($2::text IS NULL OR reason = $2)",
                &[&product_id, &reason],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The invariants that must hold after any traffic (`order_api::db::audit`): stock never
    /// negative; stock + live ordered quantity = opening + restocked quantity; the inventory
    /// ledger balances; every order has its lines and payment with the right total; each
    /// cancelled order's lines were restored exactly once. The opening balances are the seed's.
    pub async fn assert_invariants(&self) {
        let mut client = connect(&self.database_url).await;
        let audit = order_api::db::audit::audit(&mut client).await.expect("audit the test database");
        assert_eq!(audit.violations(), Vec::<String>::new(), "{audit:#?}");
        for (product_id, seeded) in SEED_STOCK {
            assert_eq!(
                audit.product(product_id).unwrap().opening,
                i64::from(seeded),
                "opening of product {product_id}"
            );
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub orders: i64,
    pub order_items: i64,
    pub payments: i64,
    pub stock: Vec<(i32, i32)>,
    pub statuses: Vec<(i64, String)>,
}

/// The address of the test PostgreSQL (`TEST_DATABASE_URL`'s host and port), for a proxy in
/// front of it.
pub fn database_address() -> SocketAddr {
    let config: tokio_postgres::Config = server_url().parse().expect("TEST_DATABASE_URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let ip = if host == "localhost" { "127.0.0.1".to_owned() } else { host };
    format!("{ip}:{port}").parse().expect("TEST_DATABASE_URL names an IP address or localhost")
}

/// `url` (a database URL) pointing at `port` on 127.0.0.1 instead, for a proxy in front of it.
pub fn url_through(url: &str, port: u16) -> String {
    let address = database_address();
    url.replace(&format!("{}:{}", address.ip(), address.port()), &format!("127.0.0.1:{port}"))
        .replace(&format!("localhost:{}", address.port()), &format!("127.0.0.1:{port}"))
}

impl TestApp {
    /// Polls until `count` of the service's sessions wait on a lock (a row lock or a key's
    /// index entry another transaction holds); panics after `wait::PATIENCE`.
    pub async fn wait_for_lock_waiters(&self, count: i64) {
        wait::for_lock_waiters(&self.db, &self.database_name, count).await
    }

    /// Polls until one of the service's sessions has waited on a lock for longer than `age`:
    /// with an `age` past the first lane's lock patience (100 ms), an order that has given up
    /// waiting patiently and waits in a transaction of the contended lane (or, for a lock its
    /// write waits on, a second transaction of the same batch).
    pub async fn wait_for_a_lock_waiter_older_than(&self, age: std::time::Duration) {
        let what = format!("a session of the service waiting on a lock for over {age:?}");
        wait::until(&what, wait::PATIENCE, || async {
            self.db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name = 'order-api' AND wait_event_type = 'Lock'
                       AND now() - query_start > make_interval(secs => $2)",
                    &[&self.database_name, &age.as_secs_f64()],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0
        })
        .await
    }

    /// Both slots of the order lane taken (the default pool has two): a keyed order in each
    /// waits for its Idempotency-Key, which an open transaction of the test holds. Orders sent
    /// meanwhile queue in the lane, and go together in one batch once `release`d.
    pub async fn hold_order_lanes(&self) -> HeldOrderLanes {
        let lanes = order_api::db::Lanes::for_pool(Config::default().pool_size).orders;
        assert_eq!(lanes, 2, "two order batches at a time");
        let holder = connect(&self.database_url).await;
        holder.batch_execute("BEGIN").await.unwrap();
        let mut blockers = Vec::new();
        for (i, key) in ["lane-blocker-1", "lane-blocker-2"].into_iter().enumerate() {
            holder
                .execute("INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (1, $1, 'x')", &[&key])
                .await
                .unwrap();
            blockers.push(self.spawn_order(Some(key), order_body(1, 3, 1)));
            self.wait_for_lock_waiters(i as i64 + 1).await;
        }
        HeldOrderLanes { holder, blockers }
    }

    /// `POST /api/orders` of `body` (with `key` as its Idempotency-Key) in a task of its own,
    /// for a test that does something else while it waits.
    pub fn spawn_order(&self, key: Option<&str>, body: Value) -> JoinHandle<Reply> {
        let mut request = self.http.post(self.url("/api/orders")).json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        tokio::spawn(async move { Reply::read(request.send().await.expect("POST")).await })
    }
}
