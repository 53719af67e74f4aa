//! The real binary as a child process (`CARGO_BIN_EXE_order-api`) on its own port, for the
//! tests of what `main` does: signal handling, start-up, the log lines on stdout.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::free_port;

/// The binary, running on its own port against its own database; killed if a test fails
/// before it exits.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
    /// Reads stdout into `output` as it comes, from when its gate opens until the pipe closes.
    stdout: Option<JoinHandle<()>>,
    /// Everything read from stdout so far: the JSON log lines.
    output: Arc<Mutex<Vec<u8>>>,
}

impl ServerProcess {
    /// Starts `order-api serve` with `SEED_ON_START=true` (so it migrates and seeds the empty
    /// database) and waits until `GET /health` answers 200.
    pub async fn start(database_url: &str) -> ServerProcess {
        ServerProcess::start_with_env(database_url, &[]).await
    }

    /// The same, with more environment variables.
    pub async fn start_with_env(database_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        let (read_stdout, stdout_gate) = std::sync::mpsc::channel();
        read_stdout.send(()).unwrap();
        ServerProcess::start_with_stdout_gate(database_url, stdout_gate, env).await
    }

    /// The same, with more environment variables, and with nobody reading the process's
    /// stdout until something is sent on `gate` (or it is dropped): a log collector that has
    /// stalled.
    pub async fn start_with_stdout_gate(
        database_url: &str,
        gate: std::sync::mpsc::Receiver<()>,
        env: &[(&str, &str)],
    ) -> ServerProcess {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-api"))
            .arg("serve")
            // Not the repository root: a developer's .env there must not change the test.
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", database_url)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", port.to_string())
            .env("SEED_ON_START", "true")
            .env("OPERATOR_TOKEN", super::OPERATOR_TOKEN)
            .env("SHUTDOWN_GRACE_MS", "8000")
            .env("DB_STATEMENT_TIMEOUT_MS", "10000")
            .env("LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the order-api binary");
        let mut pipe = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout = std::thread::spawn({
            let output = output.clone();
            move || {
                let _ = gate.recv();
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    match pipe.read(&mut buffer) {
                        Ok(0) => return,
                        Ok(n) => output.lock().unwrap().extend_from_slice(&buffer[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            }
        });
        let mut server = ServerProcess { child, port, stdout: Some(stdout), output };

        // Each attempt bounded: a server that accepts but never answers must not hang this.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
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
        self.signal("TERM");
    }

    /// `kill -INT <pid>`, as Ctrl-C in a terminal does.
    pub fn interrupt(&self) {
        self.signal("INT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.expect("run kill").success(), "kill -{name} failed");
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

    /// What the process has written to stdout and the test has read so far; once the process
    /// has exited, everything (the rest of the pipe is read first, for 2 s at most: not at all
    /// while the stdout gate is closed).
    pub fn logs(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_some() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.stdout.as_ref().is_some_and(|reader| !reader.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.stdout.as_ref().is_some_and(JoinHandle::is_finished) {
                let _ = self.stdout.take().unwrap().join();
            }
        }
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until what has been read from stdout satisfies `done`, for `limit` at most;
    /// returns the logs read by then and whether `done` was met.
    pub async fn wait_for_logs(&mut self, limit: Duration, done: impl Fn(&str) -> bool) -> (String, bool) {
        let deadline = Instant::now() + limit;
        loop {
            let logs = self.logs();
            if done(&logs) {
                return (logs, true);
            }
            if Instant::now() >= deadline {
                return (logs, false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
