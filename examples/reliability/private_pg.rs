//! A PostgreSQL server of the run's own (initdb in `target/reliability`, a free port), for the
//! scenarios that restart PostgreSQL while others use the machine's server: `pg-restart` and
//! `pg-crash` stop the machine's cluster and must run alone; a private server can be stopped
//! without touching anyone else's databases, so a scenario using it can sit in the default
//! list.
//!
//! The server is stopped the way `pg-restart` stops the machine's (`pg_ctl stop -m fast`:
//! every connection cut, a clean shutdown) and started again on the same data and port. Run as
//! root (as CI does), it runs as the `postgres` user, since PostgreSQL refuses root. The
//! binaries are the newest under /usr/lib/postgresql (or `PG_BIN_DIR`).

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// Most time a start or a stop may take before the scenario gives up on it.
const CTL_LIMIT: Duration = Duration::from_secs(30);

pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    /// The `postgres` user's uid and gid when run as root.
    owner: Option<(u32, u32)>,
}

fn id_of(args: &[&str]) -> Result<u32, String> {
    let output = Command::new("id").args(args).output().map_err(|e| format!("id: {e}"))?;
    String::from_utf8_lossy(&output.stdout).trim().parse().map_err(|e| format!("id {args:?}: {e}"))
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return Ok(dir.into());
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("/usr/lib/postgresql (or set PG_BIN_DIR): {e}"))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .ok_or("no PostgreSQL under /usr/lib/postgresql")?;
    Ok(PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin")))
}

fn checked(what: &str, output: std::io::Result<Output>) -> Result<(), String> {
    let output = output.map_err(|e| format!("{what}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{what}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

impl PrivatePostgres {
    /// initdb in `dir` (emptied first) and start on a free port.
    pub async fn start(dir: &Path) -> Result<PrivatePostgres, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| e.to_string())?;
        let owner = if id_of(&["-u"])? == 0 {
            checked("chown", Command::new("chown").args(["-R", "postgres:"]).arg(&dir).output())?;
            Some((id_of(&["-u", "postgres"])?, id_of(&["-g", "postgres"])?))
        } else {
            None
        };
        let pg = PrivatePostgres { port: super::free_port(), bin: bin_dir()?, dir, owner };
        let initdb = pg.command("initdb").args(["-U", "postgres", "--auth=trust", "-N", "-D"]).arg(pg.data()).output();
        checked("initdb", initdb)?;
        pg.start_again().await?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// The server's URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts it (again) on its data and port, and waits until it takes connections.
    pub async fn start_again(&self) -> Result<(), String> {
        // fsync off: the data is thrown away, and a 2-core machine shared with others should
        // not wait on the disk; the crash-safety this skips is not what the scenario tests
        // (its restarts are clean shutdowns).
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let started = self
            .command("pg_ctl")
            .args(["start", "-w", "-t", &CTL_LIMIT.as_secs().to_string(), "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-o", &options])
            .output();
        checked("pg_ctl start", started).map_err(|e| format!("{e}; see {}", log.display()))?;
        let since = Instant::now();
        while tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.is_err() {
            if since.elapsed() > CTL_LIMIT {
                return Err(format!("not accepting connections; see {}", log.display()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast`: every connection cut, a clean shutdown (as `pg-restart`).
    pub fn stop(&self) -> Result<(), String> {
        let stopped = self
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-t", &CTL_LIMIT.as_secs().to_string(), "-D"])
            .arg(self.data())
            .output();
        checked("pg_ctl stop", stopped)
    }

    /// Stops it and deletes its data; kept (and named) when `keep`, for a look inside.
    pub fn finish(self, keep: bool) {
        let _ = self.stop();
        if keep {
            println!("  kept the private PostgreSQL's data in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A scenario that panics must not leave a server running on the shared machine.
impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.command("pg_ctl").args(["stop", "-m", "immediate", "-D"]).arg(self.data()).output();
        }
    }
}
