//! `make restore-drill`: the backups proven by restoring them, Jepsen style: what clients were
//! told compared with what comes back (issue 21, docs/backups.md).
//!
//! `cargo run --profile tools --example restore_drill -- [full|short] [--ha] [--disaster delete|drop-datadir]`
//! with `target/release/order-api` built, as root or postgres. Everything happens on
//! PostgreSQL clusters of the drill's own (initdb in a temp directory, free ports; with `--ha`
//! the `make ha-up` pair, destroyed and made again as `make chaos CHAOS=failover` does): the
//! machine's shared cluster is never touched. The backups are made and restored with the same
//! commands a newcomer runs (`backup/run.py setup|backup|list|restore`, i.e. `make
//! backup-setup|backup|backups|restore`), pointed at the drill's cluster by `BACKUP_*`.
//!
//! 1. A cluster, `backup/run.py setup` (pgBackRest, async WAL archiving, an encrypted local
//!    repository), the release binary serving on it, and the exactly-once keyed clients of
//!    `reliability::keyed_load` ordering, cancelling and restocking all along.
//! 2. A full backup while they order (full mode: one of the empty cluster first, for the
//!    per-order figures, and an incremental one later).
//! 3. The failure cases, under the same load: the repository unplugged (its directory moved
//!    away), the repository full (a 64 KiB tmpfs mounted over its WAL directory; skipped where
//!    mounting is not allowed): orders go on, `/metrics` and `/health/ready` say the archive is
//!    failing, the server logs a warning, and once the repository is back everything catches up.
//!    A wrong repository key and restore targets outside the recoverable range are refused with
//!    a clear message (checked just before the restore).
//! 4. The mark: time T, the load going on past it. With `--ha` the primary's machine is lost
//!    (keeper and PostgreSQL SIGKILLed) before T, so the restore needs the backup taken before
//!    the failover and WAL archived by the new primary after it.
//! 5. The disaster: `--disaster delete` (default) an operator's `TRUNCATE orders CASCADE` (the
//!    orders and every table that references them); `drop-datadir` the primary SIGKILLed and
//!    its data directory deleted, mid-load (then the restore goes to the end of the archive, and what was not
//!    archived yet is the measured loss: the RPO of a lost disk).
//! 6. `backup/run.py restore` into a new directory and port, `order-api migrate` (the migration
//!    table must match this build), the service started on it with `MIGRATE_ON_START=false`, and
//!    one new order placed: the RTO runs from the restore command to that order's 201.
//! 7. The check: every order acknowledged before T is there with its lines, every cancel
//!    acknowledged before T applied; nothing first asked for after T, and no row stamped after
//!    T in any table of `STAMPED` (the `events` outbox among them); no order that no client was
//!    told about; the
//!    invariants of `order-api audit` (stock = ledger, ...), run as the binary; every sequence
//!    past its column's ids; idempotency keys and their orders consistent both ways, and a
//!    key acknowledged before T replays its order on the restored cluster.
//!
//! Prints one line per step, `restore-drill NAME: PASS|FAIL {figures}` at the end, and writes the
//! figures to `target/reliability/restore-drill-NAME.json`. Exit code 1 on failure; the
//! drill's directory is then kept for a look inside.

#[path = "reliability/mod.rs"]
mod reliability;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use reliability::{
    Answer, Expectations, Kind, Retries, Server, Settings, SharedRecord, Shopper, free_port, keyed_load, new_record,
    stop_load, verdict,
};
use serde_json::{Value, json};
use tokio_postgres::Client;

/// Tables whose rows carry the time they were written (the transaction's start, `now()`): none
/// may be stamped after T on the restored cluster, since a transaction that started after T
/// committed after it. One line per table and column; the outbox of issue 20 adds
/// `("events", "created_at")`.
const STAMPED: &[(&str, &str)] = &[
    ("orders", "created_at"),
    ("orders", "updated_at"),
    ("orders", "cancelled_at"),
    ("payments", "created_at"),
    ("inventory_movements", "created_at"),
    ("idempotency_keys", "created_at"),
    ("events", "occurred_at"),
];

/// What must hold between tables of the restored cluster beyond `order-api audit` (which also
/// checks each order's events): each query counts the rows that break it. A key whose request
/// created an order keeps the order (`order_id`, migration 0005); one whose request was
/// refused keeps the answer (`response_status`, `response_body`).
const CONSISTENT: &[(&str, &str)] = &[
    (
        "idempotency keys without their outcome",
        "SELECT count(*) FROM idempotency_keys WHERE response_status IS NULL AND order_id IS NULL",
    ),
    (
        "keys whose order is missing",
        "SELECT count(*) FROM idempotency_keys k WHERE k.order_id IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = k.order_id)",
    ),
    (
        "orders without the key that placed them (every order of the drill has one)",
        "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.order_id = o.id)",
    ),
    (
        "orders without their order.created event",
        "SELECT count(*) FROM orders o WHERE NOT EXISTS
         (SELECT 1 FROM events e WHERE e.order_id = o.id AND e.type = 'order.created')",
    ),
    (
        "order lines, payments or ledger movements of a missing order",
        "SELECT (SELECT count(*) FROM order_items i WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id))
              + (SELECT count(*) FROM payments p WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = p.order_id))
              + (SELECT count(*) FROM inventory_movements m WHERE m.order_id IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = m.order_id))",
    ),
];

/// Every sequence owned by a column, with its table and column: each must be past the
/// column's largest value, or the next insert collides with a restored row.
const OWNED_SEQUENCES: &str = "
    SELECT s.relname, t.relname, a.attname
    FROM pg_class s
    JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
    JOIN pg_class t ON t.oid = d.refobjid
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
    WHERE s.relkind = 'S'
    ORDER BY 1";

/// The stock every in-stock product gets before the load, so that orders are refused for
/// stock only rarely and most of them commit (the per-order figures count orders).
const STOCK: i32 = 100_000_000;
const WORKERS: usize = 8;
const STANZA: &str = "order-api-drill";
/// Where `.ci/ha` keeps the pair (its default): the restore from the pair reads nothing there,
/// but `--ha` destroys and recreates it.
const HA_DATABASE: &str = "order_api_drill";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    Short,
}

#[derive(Clone, Copy, PartialEq)]
enum Disaster {
    Delete,
    DropDatadir,
}

/// How long each phase runs under load.
struct Plan {
    warm: Duration,
    after_backup: Duration,
    outage: Duration,
    before_mark: Duration,
    after_mark: Duration,
}

impl Plan {
    fn for_mode(mode: Mode) -> Plan {
        let load = |default: u64| {
            let scale: f64 = std::env::var("DRILL_LOAD_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
            Duration::from_secs_f64(default as f64 * scale)
        };
        match mode {
            Mode::Full => Plan {
                warm: load(20),
                after_backup: load(20),
                outage: Duration::from_secs(8),
                before_mark: load(20),
                after_mark: Duration::from_secs(8),
            },
            Mode::Short => Plan {
                warm: Duration::from_secs(3),
                after_backup: Duration::from_secs(2),
                outage: Duration::from_secs(3),
                before_mark: Duration::from_secs(2),
                after_mark: Duration::from_secs(3),
            },
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = if args.iter().any(|a| a == "short") { Mode::Short } else { Mode::Full };
    let ha = args.iter().any(|a| a == "--ha");
    let disaster = match args.iter().position(|a| a == "--disaster").and_then(|i| args.get(i + 1)).map(String::as_str) {
        None | Some("delete") => Disaster::Delete,
        Some("drop-datadir") => Disaster::DropDatadir,
        Some(other) => {
            eprintln!("restore-drill: --disaster {other:?}: expected delete or drop-datadir");
            return ExitCode::from(2);
        }
    };
    if ha && disaster == Disaster::DropDatadir {
        eprintln!("restore-drill: --ha takes --disaster delete (the pair's failover is its own lost machine)");
        return ExitCode::from(2);
    }
    if !Path::new("backup/run.py").exists() {
        eprintln!("restore-drill: run it from the repository root (make restore-drill)");
        return ExitCode::from(2);
    }
    let settings = Settings::from_env();
    let name = format!(
        "{}{}{}",
        if mode == Mode::Full { "full" } else { "short" },
        if ha { "-ha" } else { "" },
        if disaster == Disaster::DropDatadir { "-drop-datadir" } else { "" }
    );
    let work = WorkDir::create(&name);
    println!("restore-drill {name}: working in {}", work.path.display());
    let mut drill = Drill::new(&settings, &work, mode, ha, disaster);
    let (figures, failures) = drill.run().await;
    let passed = verdict(&settings, "restore-drill", &name, &failures, figures);
    drill.clean_up(passed);
    if passed {
        work.remove();
    } else {
        println!("  kept {} for inspection", work.path.display());
    }
    if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

// --- processes as postgres ----------------------------------------------------------------------

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program` run as the postgres OS user when we are root (PostgreSQL refuses root).
fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command
    } else {
        Command::new(program)
    }
}

fn pg_bin(program: &str) -> String {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("a PostgreSQL version");
    format!("/usr/lib/postgresql/{newest}/bin/{program}")
}

fn chown_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:"]).arg(path).status().expect("chown");
        assert!(status.success(), "chown {}", path.display());
    }
}

fn output_text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)).trim().to_owned()
}

/// The drill's own directory under the system temp dir, owned by postgres.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(name: &str) -> WorkDir {
        let path = std::env::temp_dir().join(format!("order-api-restore-drill-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the drill's directory");
        chown_postgres(&path);
        WorkDir { path }
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A PostgreSQL cluster of the drill's own: initdb into the work dir, started with pg_ctl.
struct Cluster {
    data: PathBuf,
    port: u16,
    socket: PathBuf,
    log: PathBuf,
}

impl Cluster {
    fn init(work: &Path, name: &str) -> Cluster {
        let cluster = Cluster {
            data: work.join(name),
            port: free_port(),
            socket: work.to_path_buf(),
            log: work.join(format!("{name}.log")),
        };
        let initdb = as_postgres(&pg_bin("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-N", "-D"])
            .arg(&cluster.data)
            .output()
            .expect("run initdb");
        assert!(initdb.status.success(), "initdb: {}", output_text(&initdb));
        cluster
    }

    /// Starts it and waits until it takes connections. Its options are kept in
    /// postmaster.opts, so `pg_ctl restart` (what backup setup does) keeps them.
    fn start(&self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.socket.display());
        let status = as_postgres(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "PostgreSQL did not start; see {}", self.log.display());
    }

    /// SIGKILL to the postmaster: the loss of the machine, no shutdown.
    fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.data.join("postmaster.pid"))
            && let Some(pid) = pid.lines().next()
        {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

/// Stops the cluster of `data` (fast), if it runs.
fn stop_cluster(data: &Path) {
    let _ = as_postgres(&pg_bin("pg_ctl"))
        .arg("-D")
        .arg(data)
        .args(["-m", "fast", "-w", "-t", "60", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// --- backup/run.py ------------------------------------------------------------------------------

/// One run of `backup/run.py`: its exit code, output, and how long it took.
struct ToolRun {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl ToolRun {
    /// The JSON line a backup prints last.
    fn json(&self) -> Value {
        self.stdout.lines().rev().find_map(|line| serde_json::from_str(line).ok()).unwrap_or(Value::Null)
    }
}

/// `backup/run.py` pointed at the drill's cluster(s) by its `BACKUP_*` settings.
struct BackupTool {
    env: Vec<(String, String)>,
}

impl BackupTool {
    fn run(&self, args: &[&str], extra: &[(&str, String)]) -> ToolRun {
        let started = Instant::now();
        let output = Command::new("python3")
            .arg("backup/run.py")
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run python3 backup/run.py");
        let run = ToolRun {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took: started.elapsed(),
        };
        for line in run.stdout.lines().filter(|line| !line.starts_with('{')).chain(run.stderr.lines()) {
            println!("    | {line}");
        }
        run
    }
}

// --- the drill ----------------------------------------------------------------------------------

struct Drill<'a> {
    settings: &'a Settings,
    work: &'a WorkDir,
    mode: Mode,
    ha: bool,
    disaster: Disaster,
    plan: Plan,
    tool: BackupTool,
    cluster: Option<Cluster>,
    /// The service's DATABASE_URL and an admin connection URL of the primary.
    database_url: String,
    restored: PathBuf,
    /// With `--ha`: the node killed, started again at the end.
    ha_killed: Option<u32>,
    /// Orders written straight into the tables before the load (ids 1..=this), with their
    /// lines, payments, ledger movements and idempotency keys: a shop with a past.
    history: i64,
    expect: Expectations,
    figures: serde_json::Map<String, Value>,
}

/// Where the restored data must end, in the record's clock: every order acknowledged before
/// `acknowledged_before` must be there; none first asked for after `sent_after` (when known)
/// may be; no row stamped after `wall`. For `--disaster delete` that is the mark T; for a lost
/// disk, the last transaction the archive held (`killed_at`: when the primary died).
#[derive(Clone, Copy)]
struct Cut {
    acknowledged_before: u32,
    sent_after: Option<u32>,
    wall: SystemTime,
    killed_at: Option<u32>,
}

/// Milliseconds of the record's clock at the mark, read just before and just after the wall
/// clock: acknowledged before `before` means committed before T; first sent after `after`
/// means committed after T.
#[derive(Clone, Copy)]
struct Mark {
    before: u32,
    wall: SystemTime,
    after: u32,
}

impl<'a> Drill<'a> {
    fn new(settings: &'a Settings, work: &'a WorkDir, mode: Mode, ha: bool, disaster: Disaster) -> Drill<'a> {
        let home = work.path.join("backup");
        let mut env = vec![
            ("BACKUP_HOME".to_owned(), home.display().to_string()),
            ("BACKUP_STANZA".to_owned(), STANZA.to_owned()),
            ("BACKUP_DATABASE".to_owned(), if ha { HA_DATABASE.to_owned() } else { "shop".to_owned() }),
        ];
        if ha {
            env.push(("BACKUP_HA".to_owned(), "1".to_owned()));
        }
        Drill {
            settings,
            work,
            mode,
            ha,
            disaster,
            plan: Plan::for_mode(mode),
            tool: BackupTool { env },
            cluster: None,
            database_url: String::new(),
            restored: work.path.join("restored"),
            ha_killed: None,
            history: 0,
            expect: Expectations::default(),
            figures: serde_json::Map::new(),
        }
    }

    fn figure(&mut self, name: &str, value: Value) {
        self.figures.insert(name.to_owned(), value);
    }

    fn check(&mut self, holds: bool, what: impl FnOnce() -> String) -> bool {
        self.expect.check(holds, what);
        holds
    }

    /// One step's line: `PASS`/`FAIL`/`SKIP` and what was seen.
    fn step(&mut self, passed: Option<bool>, what: &str, detail: String) {
        let verdict = match passed {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "SKIP",
        };
        println!("  {verdict} {what}: {detail}");
        if passed == Some(false) {
            self.expect.0.push(format!("{what}: {detail}"));
        }
    }

    async fn run(&mut self) -> (Value, Vec<String>) {
        match self.drill().await {
            Ok(()) => {}
            Err(e) => self.expect.0.push(e),
        }
        (Value::Object(std::mem::take(&mut self.figures)), std::mem::take(&mut self.expect.0))
    }

    async fn drill(&mut self) -> Result<(), String> {
        let started = Instant::now();
        // 1. The cluster, the backups' setup, the service.
        let (admin_url, ports) = if self.ha { self.ha_up()? } else { self.single_up() };
        let setup = self.tool.run(&["setup"], &[]);
        if setup.code != 0 {
            return Err(format!("backup/run.py setup failed ({})", setup.code));
        }
        self.figure("setup_seconds", json!(secs(setup.took)));
        let admin = reliability::connect(&admin_url).await;
        let database = if self.ha { HA_DATABASE } else { "shop" };
        for statement in
            [format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"), format!("CREATE DATABASE {database}")]
        {
            admin.batch_execute(&statement).await.map_err(|e| format!("{statement}: {e:?}"))?;
        }
        drop(admin);
        let mut server = Server::spawn(
            self.settings,
            &format!("restore_drill_{}", if self.ha { "ha" } else { "primary" }),
            &self.database_url,
            free_port(),
            &[("WAL_ARCHIVE_CHECK_SECS", "1"), ("REQUEST_TIMEOUT_MS", "5000")],
        );
        server.wait_healthy(Duration::from_secs(60)).await.map_err(|e| format!("the API did not start: {e}"))?;
        let record = new_record();
        let shopper = Shopper::new(record.clone());
        for product in 1..=4 {
            shopper.restock(&server.base, product, STOCK).await;
        }
        let mut db = reliability::connect(&self.primary_url(&ports, database).await).await;
        let wal_at_setup = wal_written(&db).await;

        // 2. Backups: of the empty shop (full mode), then, after a history of orders (full
        // mode: so that a backup's size and time per order are measured on a shop of some
        // size), during the load.
        if self.mode == Mode::Full {
            let baseline = self.backup("full", "of the empty shop", &db).await?;
            self.figure("backup_empty", baseline);
        }
        self.history = self.insert_history(&db).await?;
        let wal_at_start = wal_written(&db).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (clients, retries) = keyed_load(&shopper, std::slice::from_ref(&server.base), WORKERS, "drill", &stop);
        tokio::time::sleep(self.plan.warm).await;
        let full = self.backup("full", "under load", &db).await?;
        self.figure("backup_full", full);
        tokio::time::sleep(self.plan.after_backup).await;

        if self.mode == Mode::Full {
            let incr = self.backup("incr", "under load", &db).await?;
            self.figure("backup_incr", incr);
        }

        // 3. The repository unplugged, then full; the load goes on. The restore to T starts from
        // a backup taken before them, so it replays the WAL archived late: nothing was lost.
        self.repository_outage(&server, &record, &ports, Outage::Unplugged).await;
        if self.mode == Mode::Full {
            self.repository_outage(&server, &record, &ports, Outage::Full).await;
        }
        tokio::time::sleep(self.plan.before_mark).await;

        // 4. With --ha: the primary's machine lost; the load rides the failover.
        if self.ha {
            self.lose_the_primary(&record).await?;
            db = reliability::connect(&self.primary_url(&ports, database).await).await;
        }

        // The mark.
        let mark = {
            let record = record.lock().unwrap();
            let before = record.elapsed_ms();
            let wall = SystemTime::now();
            Mark { before, wall, after: record.elapsed_ms() }
        };
        let target = rfc3339(mark.wall);
        println!("  mark T = {target} ({} orders acknowledged so far)", record.lock().unwrap().acknowledged.len());

        // 5. The disaster.
        let wal_at_end = if self.disaster == Disaster::Delete {
            None // read after the load stops, below
        } else {
            wal_written(&db).await
        };
        let (restore_to, lost_at, wal_at_end) = match self.disaster {
            Disaster::Delete => {
                tokio::time::sleep(self.plan.after_mark).await;
                stop_load(&stop, clients).await;
                let lag = archive_lag(&db).await;
                let wal_at_end = wal_written(&db).await;
                let deleted = db
                    .batch_execute(
                        // Not DELETE: each deleted order's foreign-key check would scan
                        // idempotency_keys (no index on its order_id), over 7 minutes on the
                        // full drill's shop.
                        "TRUNCATE orders CASCADE",
                    )
                    .await;
                self.check(deleted.is_ok(), || format!("the TRUNCATE itself failed: {deleted:?}"));
                let left: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.map(|r| r.get(0)).unwrap_or(-1);
                println!(
                    "  disaster: TRUNCATE orders CASCADE (their lines, payments, ledger, keys, events): {left} orders left"
                );
                self.figure("archive_lag_at_disaster", lag);
                (target.clone(), None, wal_at_end)
            }
            Disaster::DropDatadir => {
                tokio::time::sleep(self.plan.after_mark).await;
                let lag = archive_lag(&db).await;
                let cluster = self.cluster.as_ref().expect("a single cluster");
                cluster.kill();
                let killed_at = record.lock().unwrap().elapsed_ms();
                std::fs::remove_dir_all(&cluster.data).map_err(|e| format!("delete the data directory: {e}"))?;
                println!("  disaster: PostgreSQL SIGKILLed and its data directory deleted under load");
                self.figure("archive_lag_at_disaster", lag);
                // Nothing answers any more: the clients would retry for a minute each.
                stop.store(true, Ordering::Relaxed);
                clients.iter().for_each(|client| client.abort());
                ("latest".to_owned(), Some(killed_at), wal_at_end)
            }
        };
        drop(db);

        // Refusals, checked now that the repository holds what the restore will use.
        self.wrong_key();
        self.target_outside_the_range(&target);

        // 6. Restore, migrate check, service, first order.
        drop(server);
        let restored_port = free_port();
        let rto_started = Instant::now();
        let restore = self.tool.run(
            &["restore"],
            &[
                ("TARGET_TIME", restore_to.clone()),
                ("RESTORE_DIR", self.restored.display().to_string()),
                ("RESTORE_PORT", restored_port.to_string()),
            ],
        );
        if restore.code != 0 {
            return Err(format!("backup/run.py restore {restore_to:?} failed ({})", restore.code));
        }
        let restore_took = rto_started.elapsed();
        let restored_url = format!("postgresql://postgres@127.0.0.1:{restored_port}/{database}");
        let migrate = Command::new(&self.settings.binary)
            .arg("migrate")
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &restored_url)
            .output()
            .expect("run order-api migrate");
        let migrate_text = output_text(&migrate);
        let migrated_nothing = migrate.status.success() && !migrate_text.contains("migration applied");
        let migration_detail = format!("order-api migrate: exit {:?}", migrate.status.code());
        self.step(Some(migrated_nothing), "migration table matches this build", migration_detail);
        let mut restored_server = Server::spawn(
            self.settings,
            "restore_drill_restored",
            &restored_url,
            free_port(),
            &[("MIGRATE_ON_START", "false"), ("WAL_ARCHIVE_CHECK_SECS", "1")],
        );
        restored_server
            .wait_healthy(Duration::from_secs(60))
            .await
            .map_err(|e| format!("no service on the restore: {e}"))?;
        let healthy_after = rto_started.elapsed();

        // 7. The check (between the service's start and its first order, and not counted in
        // the RTO), then the first order.
        let mut restored_db = reliability::connect(&restored_url).await;
        let cut = match lost_at {
            None => {
                Cut { acknowledged_before: mark.before, sent_after: Some(mark.after), wall: mark.wall, killed_at: None }
            }
            Some(killed_at) => {
                // The last transaction recovery replayed: everything acknowledged before it was
                // in archived WAL (commit timestamps follow WAL order to within microseconds;
                // 100 ms of margin).
                let last: Option<SystemTime> = restored_db
                    .query_one("SELECT pg_last_xact_replay_timestamp()", &[])
                    .await
                    .ok()
                    .and_then(|row| row.get(0));
                let last = last.unwrap_or(mark.wall);
                let offset = |t: SystemTime| match t.duration_since(mark.wall) {
                    Ok(later) => mark.before.saturating_add(later.as_millis() as u32),
                    Err(earlier) => mark.before.saturating_sub(earlier.duration().as_millis() as u32),
                };
                println!("  the archive held transactions up to {}", rfc3339(last));
                Cut {
                    acknowledged_before: offset(last).saturating_sub(100),
                    sent_after: None,
                    wall: last,
                    killed_at: Some(killed_at),
                }
            }
        };
        let (checked, max_order_id) = self.check_restored(&mut restored_db, &record, cut).await;
        self.figure("check", checked);
        let audit = Command::new(&self.settings.binary)
            .arg("audit")
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &restored_url)
            .output()
            .expect("run order-api audit");
        let audit_json: Value = serde_json::from_slice(&audit.stdout).unwrap_or(Value::Null);
        self.step(
            Some(audit.status.success() && audit_json["ok"] == true),
            "order-api audit on the restored cluster",
            format!("exit {:?}, violations {}", audit.status.code(), audit_json["violations"]),
        );

        let first = Shopper::new(new_record());
        let order_started = Instant::now();
        let reply = first.order_with_key(&restored_server.base, 1, &[(2, 1)], Some("after-the-restore")).await;
        let rto = healthy_after + order_started.elapsed();
        let new_id = reply.body["orderId"].as_i64().unwrap_or(0);
        self.step(
            Some(reply.status == 201 && new_id > max_order_id),
            "a new order on the restored cluster",
            format!("{} orderId {new_id} (largest restored id {max_order_id})", reply.status),
        );
        let read = first.get(&restored_server.base, &format!("/api/orders/{new_id}"), Kind::Read).await;
        self.check(read.status == 200, || format!("GET the new order: {}", read.status));
        self.replay_a_key(&first, &restored_server.base, &record, mark).await;
        let products = first.get(&restored_server.base, "/api/products", Kind::Read).await;
        self.check(products.status == 200, || format!("GET /api/products: {}", products.status));

        let (acknowledged, tally) = {
            let record = record.lock().unwrap();
            (record.acknowledged.len(), record.tally())
        };
        // Across a failover the counters are two servers': no figure.
        let wal_bytes = wal_at_start.zip(wal_at_end).filter(|_| !self.ha).map(|(start, end)| end.saturating_sub(start));
        let wal_all = wal_at_setup.zip(wal_at_end).filter(|_| !self.ha).map(|(start, end)| end.saturating_sub(start));
        self.figure(
            "rto_seconds",
            json!({
                "total": secs(rto),
                "restore_command": secs(restore_took),
                "migrate_check_and_service_start": secs(healthy_after - restore_took),
                "first_order": secs(order_started.elapsed()),
            }),
        );
        self.figure("restore_output", json!(restore.stdout.lines().collect::<Vec<_>>()));
        self.figure("orders_acknowledged", json!(acknowledged));
        self.figure("answers", tally);
        self.figure("retries", retries_figures(&retries));
        // WAL: what the load wrote (pg_stat_wal), and how much the repository's copy of all the
        // WAL since setup (history included) weighs next to what PostgreSQL wrote.
        let archived = dir_size(&self.work.path.join("backup/repo/archive"));
        self.figure("archived_wal_bytes", json!(archived));
        self.figure("wal_written_by_the_load_bytes", json!(wal_bytes));
        self.figure(
            "archive_to_wal_ratio",
            json!(wal_all.filter(|all| *all > 0).map(|all| (archived as f64 / all as f64 * 1000.0).round() / 1000.0)),
        );
        self.figure("drill_seconds", json!(secs(started.elapsed())));
        self.per_100k_orders(acknowledged);
        println!(
            "  RTO {:.1} s (restore {:.1} s, migrate check and service start {:.1} s, first order {:.3} s)",
            rto.as_secs_f64(),
            restore_took.as_secs_f64(),
            (healthy_after - restore_took).as_secs_f64(),
            order_started.elapsed().as_secs_f64()
        );
        drop(restored_server);
        Ok(())
    }

    /// A single cluster of the drill's own; returns its admin URL and ports.
    fn single_up(&mut self) -> (String, Vec<u16>) {
        let cluster = Cluster::init(&self.work.path, "primary");
        cluster.start();
        self.tool.env.extend([
            ("BACKUP_PGDATA".to_owned(), cluster.data.display().to_string()),
            ("BACKUP_PGPORT".to_owned(), cluster.port.to_string()),
            ("BACKUP_PGSOCKET".to_owned(), cluster.socket.display().to_string()),
        ]);
        self.database_url = cluster.url("shop");
        let admin = cluster.url("postgres");
        let ports = vec![cluster.port];
        println!("  cluster: PostgreSQL on port {} (data {})", cluster.port, cluster.data.display());
        self.cluster = Some(cluster);
        (admin, ports)
    }

    /// The `make ha-up` pair, made afresh; returns the admin URL (the primary) and ports.
    fn ha_up(&mut self) -> Result<(String, Vec<u16>), String> {
        ha(&["destroy"])?;
        ha(&["up"])?;
        self.database_url = ha(&["url"])?.replace("/shop?", &format!("/{HA_DATABASE}?"));
        println!("  cluster: the pg_auto_failover pair of .ci/ha (nodes :6001 :6002)");
        Ok((ha(&["url"])?.replace("/shop?", "/postgres?"), vec![6001, 6002]))
    }

    /// A URL of the node that is primary now (the admin checks need one node, not the list).
    async fn primary_url(&self, ports: &[u16], database: &str) -> String {
        for _ in 0..240 {
            for port in ports {
                let url = format!("postgresql://postgres@127.0.0.1:{port}/{database}");
                if let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(connection);
                    if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await
                        && !row.get::<_, bool>(0)
                    {
                        return url;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        format!("postgresql://postgres@127.0.0.1:{}/{database}", ports[0])
    }

    /// Full mode: `DRILL_HISTORY_ORDERS` (default 500,000) delivered orders of one line written
    /// by SQL, each with its payment, ledger movement, idempotency key and events, as the API
    /// writes them; returns the largest id. The orders table is empty here, the load not started yet.
    async fn insert_history(&mut self, db: &Client) -> Result<i64, String> {
        let orders: i64 = match self.mode {
            Mode::Full => std::env::var("DRILL_HISTORY_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000),
            Mode::Short => 0,
        };
        if orders == 0 {
            return Ok(0);
        }
        let started = Instant::now();
        let sql = format!(
            "BEGIN;
             INSERT INTO orders (user_id, status, total_amount)
                 SELECT 1, 'delivered', p.price
                 FROM generate_series(1, {orders}) g JOIN products p ON p.id = 1 + g % 4
                 ORDER BY g;
             INSERT INTO order_items (order_id, product_id, quantity, price)
                 SELECT o.id, p.id, 1, o.total_amount FROM orders o JOIN products p ON p.price = o.total_amount AND p.id <= 4;
             INSERT INTO payments (order_id, amount, status) SELECT id, total_amount, 'completed' FROM orders;
             INSERT INTO inventory_movements (product_id, delta, reason, order_id)
                 SELECT product_id, -quantity, 'order', order_id FROM order_items;
             UPDATE products p SET stock = p.stock - taken.quantity
                 FROM (SELECT product_id, sum(quantity) AS quantity FROM order_items GROUP BY product_id) taken
                 WHERE p.id = taken.product_id;
             INSERT INTO idempotency_keys (user_id, key, request_hash, order_id)
                 SELECT 1, 'history-' || id, md5('history-' || id), id FROM orders;
             INSERT INTO events (type, order_id, user_id, sequence, data)
                 SELECT t.type, o.id, o.user_id, t.sequence, order_json(o.id)
                 FROM orders o
                 CROSS JOIN (VALUES ('order.created', 1), ('order.shipped', 2), ('order.delivered', 3)) AS t (type, sequence)
                 ORDER BY o.id, t.sequence;
             COMMIT;"
        );
        db.batch_execute(&sql).await.map_err(|e| format!("write the history: {e:?}"))?;
        let max: i64 = db.query_one("SELECT max(id) FROM orders", &[]).await.map_err(|e| e.to_string())?.get(0);
        println!(
            "  history: {orders} orders written by SQL in {:.1} s (ids 1..={max})",
            started.elapsed().as_secs_f64()
        );
        self.figure("history", json!({"orders": orders, "seconds": secs(started.elapsed())}));
        Ok(max)
    }

    /// A backup with `backup/run.py backup KIND`; its figures with the orders in the shop
    /// when it ended.
    async fn backup(&mut self, kind: &str, when: &str, db: &Client) -> Result<Value, String> {
        println!("  backup {kind} {when}:");
        let run = self.tool.run(&["backup", kind], &[]);
        if run.code != 0 {
            return Err(format!("backup {kind} failed ({})", run.code));
        }
        let orders: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        let mut figures = run.json();
        figures["orders_in_database"] = json!(orders);
        figures["command_seconds"] = json!(secs(run.took));
        Ok(figures)
    }

    /// The repository made unreachable (its directory moved away) or full (a tiny tmpfs over
    /// the directory WAL goes to) for `plan.outage` while the load goes on; then back.
    async fn repository_outage(&mut self, server: &Server, record: &SharedRecord, ports: &[u16], outage: Outage) {
        let what = outage.describe();
        let repo = self.work.path.join("backup/repo");
        let metrics_before = scrape(server).await;
        let failures_before = metric(&metrics_before, "order_api_wal_archive_failures_total").unwrap_or(0.0);
        let primary = self.primary_url(ports, "postgres").await;
        let pg = reliability::connect(&primary).await;
        let undo = match outage {
            Outage::Unplugged => {
                let away = self.work.path.join("backup/repo.unplugged");
                match std::fs::rename(&repo, &away) {
                    Ok(()) => Undo::Rename(away, repo.clone()),
                    Err(e) => return self.step(Some(false), what, format!("could not move the repository: {e}")),
                }
            }
            Outage::Full => {
                let segment: String = pg
                    .query_one("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 16)", &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or_default();
                let Some(version_dir) = newest_subdir(&repo.join("archive").join(STANZA)) else {
                    return self.step(Some(false), what, "no WAL directory in the repository".into());
                };
                let wal_dir = version_dir.join(&segment);
                let _ = std::fs::create_dir_all(&wal_dir);
                let mounted = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs"])
                    .arg(&wal_dir)
                    .output();
                match mounted {
                    Ok(output) if output.status.success() => {
                        // Full means full: a ballast takes every byte, so that no WAL file, not
                        // even a nearly empty one after a switch, is written into the tmpfs and
                        // then lost with it.
                        fill(&wal_dir.join(".ballast"));
                        Undo::Unmount(wal_dir)
                    }
                    Ok(output) => {
                        let why = output_text(&output);
                        return self.step(
                            None,
                            what,
                            format!("cannot mount a tmpfs here ({why}): needs root with CAP_SYS_ADMIN"),
                        );
                    }
                    Err(e) => return self.step(None, what, format!("no mount command: {e}")),
                }
            }
        };
        let from = elapsed(record);
        // WAL keeps coming from the load; a switch each second makes sure there is a file to try.
        let mut failing_seen = None;
        let mut ready_seen = Value::Null;
        let deadline = Instant::now() + self.plan.outage.max(Duration::from_secs(3)) + Duration::from_secs(20);
        let outage_started = Instant::now();
        while Instant::now() < deadline {
            let _ = pg.batch_execute("SELECT pg_switch_wal()").await;
            let metrics = scrape(server).await;
            let ready = ready(server).await;
            if failing_seen.is_none()
                && metric(&metrics, "order_api_wal_archive_failing") == Some(1.0)
                && ready.1["archiving"] == "failing"
            {
                failing_seen = Some(outage_started.elapsed());
                ready_seen = json!({"status": ready.0, "body": ready.1});
            }
            if failing_seen.is_some() && outage_started.elapsed() >= self.plan.outage {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let metrics_during = scrape(server).await;
        let failures_during = metric(&metrics_during, "order_api_wal_archive_failures_total").unwrap_or(0.0);
        let pending = metric(&metrics_during, "order_api_wal_archive_pending_bytes").unwrap_or(0.0);
        let undone = undo.apply();
        let to = elapsed(record);
        let back_at = Instant::now();
        let mut caught_up = None;
        while back_at.elapsed() < Duration::from_secs(90) {
            let _ = pg.batch_execute("SELECT pg_switch_wal()").await;
            let metrics = scrape(server).await;
            if metric(&metrics, "order_api_wal_archive_failing") == Some(0.0)
                && ready(server).await.1["archiving"] == "ok"
            {
                caught_up = Some(back_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (orders_meanwhile, bad) = {
            let record = record.lock().unwrap();
            let meanwhile = record.acknowledged_at.values().filter(|(_, acked)| *acked >= from && *acked <= to).count();
            (meanwhile, record.count(|e| e.answer == Answer::ServerError))
        };
        let log = std::fs::read_to_string(&server.log_path).unwrap_or_default();
        let warned = log.contains("WAL archiving is failing");
        let passed = undone.is_ok()
            && failing_seen.is_some()
            && ready_seen["status"] == 200
            && failures_during > failures_before
            && warned
            && orders_meanwhile > 0
            && bad == 0
            && caught_up.is_some();
        let detail = format!(
            "{:.0} s out, {orders_meanwhile} orders acknowledged meanwhile ({bad} 5xx other than 503/504), failing seen \
             after {:.1} s, failures_total {failures_before}->{failures_during}, {} bytes of WAL waiting, readiness \
             {}, warning logged: {warned}; caught up {} after it came back{}",
            (to - from) as f64 / 1000.0,
            failing_seen.map_or(f64::NAN, |d| d.as_secs_f64()),
            pending,
            ready_seen,
            caught_up.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            undone.err().map(|e| format!("; undo failed: {e}")).unwrap_or_default(),
        );
        self.figure(
            &format!("repository_{}", outage.key()),
            json!({
                "seconds": (to - from) as f64 / 1000.0,
                "orders_acknowledged_meanwhile": orders_meanwhile,
                "failing_seen_after_s": failing_seen.map(secs),
                "failures_total": [failures_before, failures_during],
                "pending_bytes": pending,
                "readiness": ready_seen,
                "warning_logged": warned,
                "caught_up_after_s": caught_up.map(secs),
            }),
        );
        self.step(Some(passed), what, detail);
    }

    /// `--ha`: the primary's machine lost (keeper and PostgreSQL SIGKILLed); waits for the
    /// first order on the new primary.
    async fn lose_the_primary(&mut self, record: &SharedRecord) -> Result<(), String> {
        let states = ha(&["states"])?;
        let primary = primary_node().await.ok_or_else(|| format!("no primary to kill (states: {states})"))?;
        let killed_at = elapsed(record);
        ha(&["kill", &primary.to_string()])?;
        println!("  failover: node{primary} (the primary) killed whole, keeper and PostgreSQL");
        // The first order asked for after the kill and acknowledged: placed on the new primary
        // (an order merely acknowledged after the kill may have committed on the old one).
        let started = Instant::now();
        let first = loop {
            let placed = record.lock().unwrap().acknowledged_at.values().any(|(sent, _)| *sent > killed_at);
            if placed {
                break Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(90) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.figure("failover", json!({"killed_node": primary, "first_order_after_s": first.map(secs)}));
        self.step(
            Some(first.is_some()),
            "failover under load",
            format!(
                "first order on the new primary {} after the kill",
                first.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()))
            ),
        );
        // The load rides on for a while on the new primary, whose WAL is archived from now on.
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.ha_killed = Some(primary);
        Ok(())
    }

    /// The repository key replaced by a wrong one: `list` and `restore` refuse with a message
    /// that says so (exit code 3), and work again with the right key.
    fn wrong_key(&mut self) {
        let key = self.work.path.join("backup/cipher-pass");
        let Ok(real) = std::fs::read(&key) else {
            return self.step(Some(false), "wrong repository key", "no key file".into());
        };
        std::fs::write(&key, b"not-the-key-of-this-repository").expect("write the wrong key");
        println!("  wrong repository key:");
        let listed = self.tool.run(&["list"], &[]);
        let dir = self.work.path.join("restored-with-a-wrong-key");
        let restored = self.tool.run(
            &["restore"],
            &[
                ("TARGET_TIME", "latest".to_owned()),
                ("RESTORE_DIR", dir.display().to_string()),
                ("RESTORE_PORT", free_port().to_string()),
            ],
        );
        std::fs::write(&key, real).expect("put the key back");
        let again = self.tool.run(&["list"], &[]);
        let says = |run: &ToolRun| run.code == 3 && run.stderr.contains("cannot be read with the key");
        let passed = says(&listed) && says(&restored) && again.code == 0 && !dir.join("PG_VERSION").exists();
        self.step(
            Some(passed),
            "wrong repository key",
            format!(
                "list exit {}, restore exit {}, nothing restored; with the right key list exit {}",
                listed.code, restored.code, again.code
            ),
        );
    }

    /// Restore targets before the oldest backup and after the newest archived WAL: refused
    /// (exit code 2) before anything is restored, naming the recoverable range.
    fn target_outside_the_range(&mut self, target: &str) {
        let mut outcomes = Vec::new();
        for (label, time, says) in [
            ("before the oldest backup", "2000-01-01 00:00:00+00".to_owned(), "before the oldest backup"),
            ("an hour from now", rfc3339(SystemTime::now() + Duration::from_secs(3600)), "after the newest WAL"),
        ] {
            println!("  restore target {label}:");
            let dir = self.work.path.join("restored-out-of-range");
            let run = self.tool.run(
                &["restore"],
                &[
                    ("TARGET_TIME", time),
                    ("RESTORE_DIR", dir.display().to_string()),
                    ("RESTORE_PORT", free_port().to_string()),
                ],
            );
            outcomes.push((
                label,
                run.code == 2
                    && run.stderr.contains(says)
                    && run.stderr.contains("recoverable range")
                    && !dir.join("PG_VERSION").exists(),
                run.code,
            ));
        }
        let passed = outcomes.iter().all(|(_, ok, _)| *ok);
        let detail = outcomes
            .iter()
            .map(|(label, ok, code)| format!("{label}: exit {code} {}", if *ok { "refused" } else { "NOT refused" }))
            .collect::<Vec<_>>()
            .join("; ");
        self.step(
            Some(passed),
            "restore targets outside the recoverable range",
            format!("{detail} (T = {target} is inside)"),
        );
    }

    /// Everything clients were told, against the restored cluster, on either side of `cut`;
    /// returns the figures and the largest order id restored.
    async fn check_restored(&mut self, db: &mut Client, record: &SharedRecord, cut: Cut) -> (Value, i64) {
        let (acknowledged, acknowledged_at, cancelled_at, unknown) = {
            let record = record.lock().unwrap();
            let unknown = record
                .count(|e| e.kind == Kind::Order && matches!(e.answer, Answer::Unanswered | Answer::OutcomeUnknown));
            (record.acknowledged.clone(), record.acknowledged_at.clone(), record.cancelled_at.clone(), unknown)
        };
        let rows = db
            .query(
                "SELECT o.id, o.status, array_agg(i.product_id ORDER BY i.product_id), array_agg(i.quantity ORDER BY i.product_id)
                 FROM orders o JOIN order_items i ON i.order_id = o.id GROUP BY o.id",
                &[],
            )
            .await
            .expect("read the restored orders");
        let restored: HashMap<i64, (String, Vec<(i32, i32)>)> = rows
            .iter()
            .map(|row| {
                let products: Vec<i32> = row.get(2);
                let quantities: Vec<i32> = row.get(3);
                (row.get(0), (row.get(1), products.into_iter().zip(quantities).collect()))
            })
            .collect();
        let max_id = db.query_one("SELECT coalesce(max(id), 0) FROM orders", &[]).await.map(|r| r.get(0)).unwrap_or(0);
        let (what, when) = match cut.killed_at {
            None => ("T", "T"),
            Some(_) => ("the last restored transaction", "it"),
        };

        // Acknowledged before the cut: present, whole, and cancelled if the cancel was.
        let before = |id: &i64| acknowledged_at.get(id).is_some_and(|(_, acked)| *acked < cut.acknowledged_before);
        let mut lost = Vec::new();
        let mut altered = Vec::new();
        for (id, lines) in acknowledged.iter().filter(|(id, _)| before(id)) {
            match restored.get(id) {
                None => lost.push(*id),
                Some((_, stored)) if stored != lines => altered.push(*id),
                Some(_) => {}
            }
        }
        let cancels_lost: Vec<i64> = cancelled_at
            .iter()
            .filter(|(id, at)| **at < cut.acknowledged_before && before(id))
            .filter(|(id, _)| restored.get(id).is_none_or(|(status, _)| status != "cancelled"))
            .map(|(id, _)| *id)
            .collect();
        let before_count = acknowledged.keys().filter(|id| before(id)).count();
        self.step(
            Some(lost.is_empty() && altered.is_empty() && cancels_lost.is_empty()),
            &format!("every order acknowledged before {what} is restored whole"),
            format!(
                "{before_count} acknowledged before {when}: {} missing, {} with other lines, {} acknowledged cancels not applied",
                lost.len(),
                altered.len(),
                cancels_lost.len()
            ),
        );
        if self.history > 0 {
            let history_restored = restored.keys().filter(|id| **id <= self.history).count() as i64;
            self.step(
                Some(history_restored == self.history),
                "the history written before the backup is restored",
                format!("{history_restored} of {} orders", self.history),
            );
        }
        // First asked for after the cut: absent (a transaction that began after T committed
        // after it).
        let (after, in_flight) = match cut.sent_after {
            Some(sent_after) => {
                let after: Vec<i64> = acknowledged_at
                    .iter()
                    .filter(|(id, (sent, _))| *sent > sent_after && restored.contains_key(id))
                    .map(|(id, _)| *id)
                    .collect();
                let in_flight = acknowledged_at
                    .iter()
                    .filter(|(_, (sent, acked))| *sent <= sent_after && *acked >= cut.acknowledged_before)
                    .count();
                self.step(
                    Some(after.is_empty()),
                    "nothing first asked for after T is restored",
                    format!(
                        "{} such orders present; {in_flight} were in flight at T (either way is right)",
                        after.len()
                    ),
                );
                (after.len(), in_flight)
            }
            None => (0, 0),
        };
        let unknown_to_clients =
            restored.keys().filter(|id| **id > self.history && !acknowledged.contains_key(id)).count();
        self.step(
            Some(unknown_to_clients as u64 <= unknown),
            "no restored order that no client was told about",
            format!("{unknown_to_clients} (requests with an unknown outcome: {unknown})"),
        );

        // Rows stamped after the cut: none.
        let mut stamped = serde_json::Map::new();
        let mut late_rows = 0;
        for (table, column) in STAMPED {
            let sql = format!("SELECT count(*) FROM {table} WHERE {column} > $1");
            let count: i64 = db.query_one(&sql, &[&cut.wall]).await.map(|r| r.get(0)).unwrap_or(-1);
            late_rows += count.abs();
            stamped.insert(format!("{table}.{column}"), json!(count));
        }
        self.step(
            Some(late_rows == 0),
            &format!("no row stamped after {what}"),
            Value::Object(stamped.clone()).to_string(),
        );
        let mut consistency = serde_json::Map::new();
        let mut broken = 0;
        for (what, sql) in CONSISTENT {
            let count: i64 = db.query_one(*sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1);
            broken += count.abs();
            consistency.insert((*what).to_owned(), json!(count));
        }
        self.step(
            Some(broken == 0),
            "keys, orders, lines, payments, movements consistent",
            Value::Object(consistency.clone()).to_string(),
        );
        let sequences = sequences_behind(db).await;
        self.step(
            Some(sequences.is_empty()),
            "every sequence past its column's largest id",
            if sequences.is_empty() { "all of them".to_owned() } else { sequences.join("; ") },
        );

        let rpo = match cut.killed_at {
            None => json!({"orders_acknowledged_before_t": before_count, "lost": lost.len() + altered.len()}),
            // A lost disk: what was acknowledged and is not there is the loss, all of it
            // acknowledged after the last transaction the archive holds.
            Some(killed_at) => {
                let missing = acknowledged.keys().filter(|id| !restored.contains_key(id)).count();
                let window = killed_at.saturating_sub(cut.acknowledged_before) as f64 / 1000.0;
                println!(
                    "  RPO with the data directory lost: {missing} of {} acknowledged orders missing, all acknowledged \
                     in the last {window:.1} s before the kill (WAL written but not archived yet)",
                    acknowledged.len()
                );
                json!({
                    "acknowledged": acknowledged.len(),
                    "lost_orders": missing,
                    "lost_window_seconds": window,
                    "lost_before_the_last_restored_transaction": lost.len(),
                })
            }
        };
        let figures = json!({
            "rpo": rpo,
            "in_flight_at_t": in_flight,
            "after_t_present": after,
            "restored_orders": restored.len(),
            "unknown_to_clients": unknown_to_clients,
            "stamped_after_cut": stamped,
            "consistency": consistency,
            "sequences_behind": sequences,
        });
        (figures, max_id)
    }

    /// A key acknowledged before T, sent again with its lines as they were first sent: the
    /// restored cluster replays the same order (201 with `Idempotent-Replayed`), no new one.
    async fn replay_a_key(&mut self, shopper: &Shopper, base: &str, record: &SharedRecord, mark: Mark) {
        if self.disaster == Disaster::DropDatadir {
            return;
        }
        let chosen = {
            let record = record.lock().unwrap();
            record
                .keyed
                .iter()
                .filter(|(id, _)| record.acknowledged_at.get(id).is_some_and(|(_, at)| *at < mark.before))
                .max_by_key(|(id, _)| **id)
                .map(|(id, (key, items))| (*id, key.clone(), items.clone()))
        };
        let Some((id, key, items)) = chosen else {
            return self.step(Some(false), "a key acknowledged before T replays", "no keyed order before T".into());
        };
        let reply = shopper.order_with_key(base, 1, &items, Some(&key)).await;
        let same = reply.status == 201 && reply.body["orderId"].as_i64() == Some(id);
        self.step(
            Some(same),
            "a key acknowledged before T replays its order",
            format!("{key}: {} orderId {}", reply.status, reply.body["orderId"]),
        );
    }

    /// Backup and WAL figures per 100,000 orders (linear in the orders: the shop's rows are
    /// what grows).
    fn per_100k_orders(&mut self, acknowledged: usize) {
        let per = |bytes: f64, orders: f64| if orders > 0.0 { Some(bytes / orders * 100_000.0) } else { None };
        let full = self.figures.get("backup_full").cloned().unwrap_or(Value::Null);
        let empty = self.figures.get("backup_empty").cloned().unwrap_or(Value::Null);
        let orders = full["orders_in_database"].as_f64().unwrap_or(0.0);
        let (bytes, seconds, database) = (
            full["repository_bytes"].as_f64().unwrap_or(0.0) - empty["repository_bytes"].as_f64().unwrap_or(0.0),
            full["seconds"].as_f64().unwrap_or(0.0) - empty["seconds"].as_f64().unwrap_or(0.0),
            full["database_bytes"].as_f64().unwrap_or(0.0) - empty["database_bytes"].as_f64().unwrap_or(0.0),
        );
        let written = self.figures.get("wal_written_by_the_load_bytes").and_then(Value::as_f64);
        let ratio = self.figures.get("archive_to_wal_ratio").and_then(Value::as_f64);
        let value = json!({
            "basis": if empty.is_null() { "the full backup under load, fixed costs included" } else { "full backup under load minus the empty shop's" },
            "full_backup_repository_bytes": per(bytes, orders),
            "full_backup_database_bytes": per(database, orders),
            "full_backup_seconds": per(seconds, orders),
            "wal_written_bytes": written.and_then(|bytes| per(bytes, acknowledged as f64)),
            "wal_archived_bytes": written.zip(ratio).and_then(|(bytes, ratio)| per(bytes * ratio, acknowledged as f64)),
        });
        println!("  per 100,000 orders: {value}");
        self.figure("per_100k_orders", value);
    }

    /// Stops what the drill started.
    fn clean_up(&mut self, passed: bool) {
        stop_cluster(&self.restored);
        if let Some(cluster) = &self.cluster {
            stop_cluster(&cluster.data);
        }
        if self.ha {
            if let Some(node) = self.ha_killed.take() {
                let _ = ha(&["start", &node.to_string()]);
            }
            if passed {
                let _ = ha(&["destroy"]);
            } else {
                println!("  kept the pair's data (.ci/ha destroy removes it)");
                let _ = ha(&["down"]);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Outage {
    Unplugged,
    Full,
}

impl Outage {
    fn describe(self) -> &'static str {
        match self {
            Outage::Unplugged => "repository unreachable under load",
            Outage::Full => "repository full under load",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Outage::Unplugged => "unreachable",
            Outage::Full => "full",
        }
    }
}

/// How an outage is undone.
enum Undo {
    Rename(PathBuf, PathBuf),
    Unmount(PathBuf),
}

impl Undo {
    fn apply(self) -> Result<(), String> {
        match self {
            Undo::Rename(from, to) => std::fs::rename(&from, &to).map_err(|e| e.to_string()),
            // pgBackRest's background process may hold the directory for a moment: a few tries,
            // then a lazy unmount (safe: the full tmpfs never took a byte of WAL).
            Undo::Unmount(dir) => {
                let mut last = String::new();
                for _ in 0..20 {
                    let output = Command::new("umount").arg(&dir).output().map_err(|e| e.to_string())?;
                    if output.status.success() {
                        return Ok(());
                    }
                    last = output_text(&output);
                    std::thread::sleep(Duration::from_millis(250));
                }
                let lazy = Command::new("umount").arg("-l").arg(&dir).output().map_err(|e| e.to_string())?;
                if lazy.status.success() { Ok(()) } else { Err(format!("{last}; umount -l: {}", output_text(&lazy))) }
            }
        }
    }
}

// --- helpers ------------------------------------------------------------------------------------

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// A wall-clock time as PostgreSQL and `TARGET_TIME` read it, in UTC with microseconds.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970");
    let (days, rest) = (since.as_secs() / 86_400, since.as_secs() % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06}+00",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

fn elapsed(record: &SharedRecord) -> u32 {
    record.lock().unwrap().elapsed_ms()
}

fn retries_figures(retries: &Retries) -> Value {
    json!({
        "resolved_by_retry": retries.resolved_by_retry.load(Ordering::Relaxed),
        "never_definite": retries.never_definite.load(Ordering::Relaxed),
    })
}

async fn scrape(server: &Server) -> String {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    match http.get(format!("{}/metrics", server.base)).send().await {
        Ok(reply) => reply.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn ready(server: &Server) -> (u16, Value) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    match http.get(format!("{}/health/ready", server.base)).send().await {
        Ok(reply) => (reply.status().as_u16(), reply.json().await.unwrap_or(Value::Null)),
        Err(_) => (0, Value::Null),
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// WAL records written so far (`pg_stat_wal.wal_bytes`): unlike positions, it leaves out the
/// rest of each segment that a WAL switch skips, which the drill does often.
async fn wal_written(db: &Client) -> Option<u64> {
    let row = db.query_one("SELECT wal_bytes::int8 FROM pg_stat_wal", &[]).await.ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// How far archiving was behind just before the disaster: WAL written past the last archived
/// segment, and seconds since it was archived.
async fn archive_lag(db: &Client) -> Value {
    let row = db
        .query_one(
            "SELECT last_archived_wal, extract(epoch FROM now() - last_archived_time)::float8,
                    pg_current_wal_lsn()::text, failed_count
             FROM pg_stat_archiver",
            &[],
        )
        .await;
    match row {
        Ok(row) => json!({
            "last_archived_wal": row.get::<_, Option<String>>(0),
            "seconds_since_last_archived": row.get::<_, Option<f64>>(1),
            "current_lsn": row.get::<_, Option<String>>(2),
            "failed_count": row.get::<_, i64>(3),
        }),
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// Sequences not past their column's largest value, as sentences.
async fn sequences_behind(db: &Client) -> Vec<String> {
    let owned = db.query(OWNED_SEQUENCES, &[]).await.expect("list the sequences");
    let mut behind = Vec::new();
    for row in owned {
        let (sequence, table, column): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let sql = format!(
            "SELECT (SELECT coalesce(max({column}), 0)::int8 FROM {table}), last_value, is_called FROM {sequence}"
        );
        match db.query_one(&sql, &[]).await {
            Ok(row) => {
                let (largest, last, called): (i64, i64, bool) = (row.get(0), row.get(1), row.get(2));
                let next = if called { last + 1 } else { last };
                if next <= largest {
                    behind.push(format!("{sequence} would give {next}, {table}.{column} has {largest}"));
                }
            }
            Err(e) => behind.push(format!("{sequence}: {e}")),
        }
    }
    behind
}

/// Writes zeros into `path` until the file system says it is full (bounded: a tmpfs of 64 KiB).
fn fill(path: &Path) {
    use std::io::Write;
    let Ok(mut file) = std::fs::File::create(path) else { return };
    let block = [0u8; 4096];
    for _ in 0..1024 {
        if file.write_all(&block).and_then(|()| file.flush()).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
}

fn newest_subdir(dir: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs.pop()
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// `.ci/ha ARGS`: its stdout, or why it failed.
fn ha(args: &[&str]) -> Result<String, String> {
    let output = Command::new(".ci/ha").args(args).output().map_err(|e| format!(".ci/ha {args:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(".ci/ha {args:?}: {}", output_text(&output)))
    }
}

/// The node number (1 or 2) the pair's monitor reports as primary.
async fn primary_node() -> Option<u32> {
    let url = "postgresql://postgres@127.0.0.1:6000/pg_auto_failover";
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    let row = client
        .query_opt(
            "SELECT nodename FROM pgautofailover.node WHERE reportedstate IN ('primary', 'wait_primary', 'single')",
            &[],
        )
        .await
        .ok()??;
    row.get::<_, String>(0).strip_prefix("node")?.parse().ok()
}
