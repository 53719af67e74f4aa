//! `order-api [serve|migrate|seed|create-db|audit|healthcheck|version]`; see `usage()`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

use order_api::{config::Config, db, telemetry::Telemetry};
use tokio::signal::unix::{SignalKind, signal};

fn usage() -> &'static str {
    "usage: order-api [COMMAND]

commands:
  serve        apply pending migrations, then serve HTTP (the default)
               (SEED_ON_START=true also loads the seed data first; with
               MIGRATE_ON_START=false it applies nothing and refuses to start while
               migrations are pending)
  migrate      apply pending migrations and exit
  seed         apply pending migrations, load the seed data (idempotent) and exit
  create-db    create the database named in DATABASE_URL if it does not exist, and exit
  audit        check the invariants of the data (stock, orders, payments, inventory
               ledger) in one consistent read; print the report as JSON and exit 0 if
               they hold, 1 if not
  healthcheck  exit 0 if GET /health on the local API_PORT answers 200, else 1
               (the container HEALTHCHECK: needs no curl in the image)
  version      print the version and the git commit of this build and exit
               (also --version, -V)

Configuration comes from the environment and from .env; see .env.example."
}

fn main() -> ExitCode {
    let started = Instant::now();
    let command = std::env::args().nth(1);
    // Before the configuration is read: the version is wanted also where it would not load.
    if matches!(command.as_deref(), Some("version" | "--version" | "-V")) {
        println!("order-api {} (commit {})", order_api::VERSION, order_api::GIT_COMMIT);
        return ExitCode::SUCCESS;
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("order-api: {e}");
            return ExitCode::from(2);
        }
    };
    if command.as_deref() == Some("healthcheck") {
        return healthcheck(config.port);
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let telemetry = match Telemetry::install(&config, runtime.handle()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("order-api: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let done = match command.as_deref() {
            None | Some("serve") => serve(config, started).await,
            Some("migrate") => order_api::prepare_database(&config, false).await,
            Some("seed") => order_api::prepare_database(&config, true).await,
            Some("create-db") => match config.database() {
                Ok(database) => db::create_database_if_missing(&database).await,
                Err(e) => Err(e.into()),
            },
            // Broken invariants are the report's answer, not a failure of the command.
            Some("audit") => return audit(&config).await,
            Some("help" | "-h" | "--help") => {
                println!("{}", usage());
                Ok(())
            }
            Some(other) => Err(format!("unknown command {other:?}\n\n{}", usage()).into()),
        };
        done.map(|()| ExitCode::SUCCESS)
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "order-api failed");
            ExitCode::FAILURE
        }
    };
    // While the runtime still runs: the last spans are sent by one of its tasks.
    telemetry.shutdown();
    code
}

async fn serve(config: Config, started: Instant) -> Result<(), db::StartupError> {
    let shutdown = shutdown_signal();
    order_api::check_database(&config).await?;
    let address = SocketAddr::new(config.host, config.port);
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|e| format!("cannot listen on {address}: {e}"))?;
    tracing::info!(
        address = %address,
        startup_ms = started.elapsed().as_millis(),
        traces = if config.traces.enabled() { "exported" } else { "off" },
        "listening"
    );
    order_api::run(listener, config, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Prints the audit of the database as JSON; exit code 1 if an invariant is broken.
async fn audit(config: &Config) -> Result<ExitCode, db::StartupError> {
    let mut client = db::connect(&config.database()?).await?;
    let audit = db::audit::audit(&mut client).await.map_err(|e| db::describe(&e))?;
    let violations = audit.violations();
    #[derive(serde::Serialize)]
    struct Report<'a> {
        ok: bool,
        violations: &'a [String],
        audit: &'a db::audit::Audit,
    }
    let report = Report { ok: violations.is_empty(), violations: &violations, audit: &audit };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Completes on the first SIGTERM or SIGINT. A second one exits at once, for an operator
/// who does not want to wait for the drain. The handlers are installed when this is called,
/// not when the future is first polled: `serve` calls it before the server answers anything,
/// so a SIGTERM sent as soon as `/health` answers is never met by the default action (killed,
/// exit status not 0; seen once in CI, a test stopping a server right after its start).
fn shutdown_signal() -> impl Future<Output = ()> {
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::warn!("second shutdown signal: exiting now");
            order_api::telemetry::flush_logs();
            std::process::exit(130);
        });
    }
}

/// `GET /health` on the local port over a plain socket; 0 if it answers 200.
fn healthcheck(port: u16) -> ExitCode {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let check = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(&head == b"HTTP/1.1 200")
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("healthcheck: /health did not answer 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
