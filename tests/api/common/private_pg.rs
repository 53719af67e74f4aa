//! A PostgreSQL server of the test's own (initdb in a temp dir, a free port), for what cannot be
//! done to the shared test server without disturbing the tests running beside it: server-wide
//! settings (`synchronous_standby_names`, `default_transaction_read_only`), SIGKILL.
//!
//! Run as root (as CI does), the server runs as the `postgres` user, since PostgreSQL refuses
//! to run as root; its directory (certificates included) is handed to that user first. The binaries are the newest under /usr/lib/postgresql (or `PG_BIN_DIR`).

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{TempDir, free_port};

pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
    owner: Option<(u32, u32)>,
    server: Option<Child>,
}

fn command_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return dir.into();
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries in /usr/lib/postgresql (or set PG_BIN_DIR)")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin", versions.last().expect("a PostgreSQL version")))
}

impl PrivatePostgres {
    /// initdb and start, with `settings` (`name=value`) on the server's command line.
    pub async fn start(settings: &[&str]) -> PrivatePostgres {
        PrivatePostgres::start_in(TempDir::new("private-pg"), settings).await
    }

    /// A server with `ssl = on` and a certificate (for `localhost` and 127.0.0.1) issued by a
    /// CA made here; returns it and the CA's certificate, for `sslrootcert`.
    pub async fn start_with_tls() -> (PrivatePostgres, PathBuf) {
        let dir = TempDir::new("private-pg");
        let file = |name: &str| dir.path.join(name).to_str().unwrap().to_owned();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca = ["-subj", "/CN=order-api test CA", "-days", "1", "-keyout", &file("ca.key"), "-out", &file("ca.pem")];
        openssl(&[&["req", "-x509", "-new"][..], &ec, &ca].concat());
        let request = ["-subj", "/CN=localhost", "-keyout", &file("server.key"), "-out", &file("server.csr")];
        openssl(&[&["req", "-new"][..], &ec, &request].concat());
        std::fs::write(
            dir.path.join("ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &file("server.csr"),
            "-CA",
            &file("ca.pem"),
            "-CAkey",
            &file("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &file("ext"),
            "-out",
            &file("server.pem"),
        ]);
        // PostgreSQL refuses a key that others may read.
        std::fs::set_permissions(dir.path.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let settings = [
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", file("server.pem")),
            format!("ssl_key_file={}", file("server.key")),
        ];
        let ca = dir.path.join("ca.pem");
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        (PrivatePostgres::start_in(dir, &settings).await, ca)
    }

    async fn start_in(dir: TempDir, settings: &[&str]) -> PrivatePostgres {
        let owner = (command_output("id", &["-u"]) == "0").then(|| {
            let uid = command_output("id", &["-u", "postgres"]).parse().unwrap();
            let gid = command_output("id", &["-g", "postgres"]).parse().unwrap();
            command_output("chown", &["-R", "postgres:", dir.path.to_str().unwrap()]);
            (uid, gid)
        });
        let mut pg = PrivatePostgres { port: free_port(), bin: bin_dir(), dir, owner, server: None };
        let data = pg.data_dir();
        let initdb = pg.command("initdb").args(["-U", "postgres", "--auth=trust", "-N", "-D"]).arg(&data).output();
        let initdb = initdb.expect("run initdb");
        assert!(initdb.status.success(), "initdb: {}", String::from_utf8_lossy(&initdb.stderr));
        assert!(pg.launch(settings).await, "private PostgreSQL did not start: {}", pg.log());
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts the postmaster and waits until it takes connections; false if it exited.
    async fn launch(&mut self, settings: &[&str]) -> bool {
        let mut command = self.command("postgres");
        command.arg("-D").arg(self.data_dir()).args(["-p", &self.port.to_string()]);
        command.arg("-k").arg(&self.dir.path);
        for setting in ["listen_addresses=127.0.0.1", "fsync=off", "logging_collector=off", "max_connections=40"]
            .iter()
            .chain(settings)
        {
            command.args(["-c", setting]);
        }
        let log = std::fs::File::create(self.dir.path.join("server.log")).unwrap();
        self.server = Some(command.stdout(Stdio::null()).stderr(log).spawn().expect("start postgres"));
        let started = Instant::now();
        while tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await.is_err() {
            if self.server.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "private PostgreSQL did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// A server that counts the statements it runs (`pg_stat_statements`; utility statements
    /// such as BEGIN, COMMIT and LOCK are left out): see `statements_run`.
    pub async fn start_counting_statements() -> PrivatePostgres {
        let pg = PrivatePostgres::start(&[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track_utility=off",
        ])
        .await;
        pg.execute("CREATE EXTENSION pg_stat_statements").await;
        pg
    }

    /// How many statements have run so far in `database` (of a server started by
    /// `start_counting_statements`). Asked from the `postgres` database, so that asking is
    /// not counted.
    pub async fn statements_run(&self, database: &str) -> i64 {
        super::connect(&self.url("postgres"))
            .await
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements s
                 JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
                &[&database],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("server.log")).unwrap_or_default()
    }

    /// A statement on the `postgres` database (ALTER SYSTEM, pg_reload_conf, ...).
    pub async fn execute(&self, sql: &str) {
        super::connect(&self.url("postgres")).await.batch_execute(sql).await.unwrap();
    }

    /// SIGKILL to the postmaster: a crash (its backends go with it at once and the next start
    /// runs crash recovery), not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts it again on the same data and port (crash recovery after `kill`).
    pub async fn restart(&mut self, settings: &[&str]) {
        self.kill();
        // A killed postmaster's children notice within moments and exit; a new postmaster
        // refuses to start while they still hold the shared memory.
        let started = Instant::now();
        while !self.launch(settings).await {
            assert!(started.elapsed() < Duration::from_secs(30), "restart failed: {}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.kill();
    }
}
