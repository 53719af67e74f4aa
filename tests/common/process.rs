//! The real binary as a child process (`CARGO_BIN_EXE_order-api`) on its own port, for the
//! tests of what `main` does: signal handling, start-up, the log lines on stdout.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The binary, running on its own port against its own database; killed if a test fails
/// before it exits.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
    /// Collects the JSON log lines from stdout, to show when an assertion fails.
    stdout: Option<JoinHandle<String>>,
}

impl ServerProcess {
    /// Starts `order-api serve` with `SEED_ON_START=true` (so it migrates and seeds the empty
    /// database) and waits until `GET /health` answers 200.
    pub async fn start(database_url: &str) -> ServerProcess {
        let (read_stdout, stdout_gate) = std::sync::mpsc::channel();
        read_stdout.send(()).unwrap();
        ServerProcess::start_with_stdout_gate(database_url, stdout_gate).await
    }

    /// The same, with nobody reading the process's stdout until something is sent on `gate`
    /// (or it is dropped): a log collector that has stalled.
    pub async fn start_with_stdout_gate(database_url: &str, gate: std::sync::mpsc::Receiver<()>) -> ServerProcess {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-api"))
            .arg("serve")
            // Not the repository root: a developer's .env there must not change the test.
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", database_url)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", port.to_string())
            .env("SEED_ON_START", "true")
            .env("SHUTDOWN_GRACE_MS", "8000")
            .env("DB_STATEMENT_TIMEOUT_MS", "10000")
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the order-api binary");
        let mut pipe = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let _ = gate.recv();
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        let mut server = ServerProcess { child, port, stdout: Some(stdout) };

        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("order-api exited during start-up with {status}:\n{}", server.logs());
            }
            if let Ok(reply) = http.get(server.url("/health")).send().await
                && reply.status() == 200
            {
                return server;
            }
            assert!(Instant::now() < deadline, "order-api not healthy within 30 s:\n{}", server.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `kill -TERM <pid>`, as `docker stop` does to PID 1.
    pub fn terminate(&self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Whether a new TCP connection is refused: the listener is closed.
    pub fn refuses_connections(&self) -> bool {
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], self.port)), Duration::from_millis(200)).is_err()
    }

    /// Everything the process wrote to stdout; only complete once it has exited.
    pub fn logs(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_none() {
            return "(still running; logs not collected)".into();
        }
        self.stdout.take().map(|reader| reader.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port nothing listens on: bound and released at once. Another process could take it in
/// between; unlikely enough for a test.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
