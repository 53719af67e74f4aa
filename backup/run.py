#!/usr/bin/env python3
"""Backups and point-in-time recovery of the shop's PostgreSQL with pgBackRest.

What `make backup-setup`, `make backup`, `make backups`, `make restore` and `make backup-check`
run (docs/backups.md has the why, the figures and the drill):

  setup                 once, opt-in: write the pgBackRest configuration and the repository key,
                        turn WAL archiving on (archive_mode=on needs a PostgreSQL restart, which
                        this does and says so), create the stanza, check that WAL arrives
  backup [full|diff|incr]
                        a backup (incr by default: only the files changed since the last one;
                        pgBackRest makes the first one full)
  list                  the backups with their sizes, and the time range a restore can reach
  restore TARGET_TIME   restore into a NEW data directory and start it on a NEW port, recovered
                        to TARGET_TIME ('2026-12-04 06:49:47+00', or 'latest'); the running
                        cluster is not touched (it only gets its latest WAL pushed first)
  check                 force a WAL switch and wait until that WAL is in the repository

Settings (environment; the defaults are the single local cluster of `make run`, Debian's
15/main on port 5432 with the repository on local disk):

  BACKUP_STANZA          order-api (order-api-ha with BACKUP_HA=1)
  BACKUP_HOME            unset: the system layout below; set: every path below under it
  BACKUP_CONFIG          /etc/pgbackrest/STANZA.conf           (HOME/pgbackrest.conf)
  BACKUP_CIPHER_PASS_FILE /etc/pgbackrest/STANZA.cipher-pass   (HOME/cipher-pass); made by setup
  BACKUP_REPO_PATH       /var/lib/pgbackrest                   (HOME/repo)
  BACKUP_SPOOL_PATH, BACKUP_LOG_PATH, BACKUP_LOCK_PATH
                         /var/spool/pgbackrest, /var/log/pgbackrest, /tmp/pgbackrest (HOME/...)
  BACKUP_PGDATA          /var/lib/postgresql/15/main  (several, space-separated: an HA pair)
  BACKUP_PGPORT          5432                          (as many as BACKUP_PGDATA)
  BACKUP_PGSOCKET        /var/run/postgresql
  BACKUP_DATABASE        ecommerce: only for the DATABASE_URL printed after a restore
  BACKUP_HA=1            the `make ha-up` pair: nodes HA_DIR/node1 and node2 on 6001 and 6002
  BACKUP_RETENTION_FULL  2   full backups kept (with every diff/incr and the WAL they need)
  BACKUP_RETENTION_DIFF  6   differential backups kept
  BACKUP_ARCHIVE_TIMEOUT 60  archive_timeout: a partly filled WAL segment is archived after
                             this many seconds, which bounds the data a lost disk loses
  BACKUP_PROCESS_MAX     2   parallel compress/transfer processes
  BACKUP_REPO_TYPE       posix (local disk) or s3: then BACKUP_S3_BUCKET, BACKUP_S3_ENDPOINT,
                         BACKUP_S3_REGION, BACKUP_S3_URI_STYLE (host|path), BACKUP_S3_KEY_FILE,
                         BACKUP_S3_KEY_SECRET_FILE, BACKUP_S3_VERIFY_TLS (y|n), BACKUP_REPO_PATH
                         (the prefix in the bucket, default /order-api)
  RESTORE_DIR, RESTORE_PORT   where `restore` puts the restored cluster (default: beside the
                         repository, named after the time; the first free port from 5433)

pgBackRest runs as the owner of the data directory (postgres); run this as root or as that
user. Python 3 standard library only.
"""

import datetime
import json
import os
import pwd
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_USER = "postgres"
# Where psql finds the server's Unix socket: BACKUP_PGSOCKET (set once Settings are read).
SOCKET_DIR = ["/var/run/postgresql"]
# A restore waits this long at most for PostgreSQL to replay WAL and promote.
RESTORE_TIMEOUT_S = int(os.environ.get("RESTORE_TIMEOUT_S", "900"))


class Failure(Exception):
    """A failure with a message for the operator and an exit code: 1 failed, 2 refused
    (a setting or a target outside what the backups hold), 3 wrong repository key."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def env(name, default):
    value = os.environ.get(name, "").strip()
    return value if value else default


def pg_bin():
    versions = sorted((int(p.name) for p in Path("/usr/lib/postgresql").iterdir() if p.name.isdigit()), reverse=True)
    if not versions:
        raise Failure("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(env("BACKUP_PGBIN", f"/usr/lib/postgresql/{versions[0]}/bin"))


class Settings:
    def __init__(self):
        self.ha = env("BACKUP_HA", "0") in ("1", "true", "yes")
        ha_dir = env("HA_DIR", "/var/lib/postgresql/order-api-ha")
        self.stanza = env("BACKUP_STANZA", "order-api-ha" if self.ha else "order-api")
        home = os.environ.get("BACKUP_HOME", "").strip()
        self.home = Path(home).resolve() if home else None

        def place(name, system, in_home):
            return Path(env(name, str(self.home / in_home) if self.home else system))

        self.config = place("BACKUP_CONFIG", f"/etc/pgbackrest/{self.stanza}.conf", "pgbackrest.conf")
        # The wrapper every pgBackRest call goes through (PostgreSQL's archive_command too):
        # it reads the key file and hands the key over in the environment.
        self.wrapper = self.config.with_suffix(".sh")
        self.cipher_pass_file = place(
            "BACKUP_CIPHER_PASS_FILE", f"/etc/pgbackrest/{self.stanza}.cipher-pass", "cipher-pass"
        )
        self.repo_type = env("BACKUP_REPO_TYPE", "posix")
        if self.repo_type == "s3":  # a prefix in the bucket, never under BACKUP_HOME
            self.repo_path = Path(env("BACKUP_REPO_PATH", "/order-api"))
        else:
            self.repo_path = place("BACKUP_REPO_PATH", "/var/lib/pgbackrest", "repo")
        self.spool = place("BACKUP_SPOOL_PATH", "/var/spool/pgbackrest", "spool")
        self.log = place("BACKUP_LOG_PATH", "/var/log/pgbackrest", "log")
        self.lock = place("BACKUP_LOCK_PATH", "/tmp/pgbackrest", "lock")
        default_data = f"{ha_dir}/node1 {ha_dir}/node2" if self.ha else "/var/lib/postgresql/15/main"
        self.pgdata = [Path(p) for p in env("BACKUP_PGDATA", default_data).split()]
        self.ports = [int(p) for p in env("BACKUP_PGPORT", "6001 6002" if self.ha else "5432").split()]
        if len(self.pgdata) != len(self.ports):
            raise Failure("BACKUP_PGDATA and BACKUP_PGPORT must list as many entries", 2)
        self.socket = env("BACKUP_PGSOCKET", "/var/run/postgresql")
        SOCKET_DIR[0] = self.socket
        self.database = env("BACKUP_DATABASE", "shop" if self.ha else "ecommerce")
        self.retention_full = env("BACKUP_RETENTION_FULL", "2")
        self.retention_diff = env("BACKUP_RETENTION_DIFF", "6")
        self.archive_timeout = env("BACKUP_ARCHIVE_TIMEOUT", "60")
        self.process_max = env("BACKUP_PROCESS_MAX", "2")

    def secret_files(self):
        """Environment variable of pgBackRest -> file it is read from, at every call."""
        files = {"PGBACKREST_REPO1_CIPHER_PASS": self.cipher_pass_file}
        if self.repo_type == "s3":
            files["PGBACKREST_REPO1_S3_KEY"] = Path(env("BACKUP_S3_KEY_FILE", "/etc/pgbackrest/s3-key"))
            files["PGBACKREST_REPO1_S3_KEY_SECRET"] = Path(
                env("BACKUP_S3_KEY_SECRET_FILE", "/etc/pgbackrest/s3-key-secret")
            )
        return files


# --- running things as postgres --------------------------------------------------------------


def as_postgres(argv):
    """argv run as the postgres OS user (PostgreSQL and pgBackRest refuse root, and the files
    they write must be postgres's)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *argv]
    return list(argv)


def run(argv, check=True, timeout=None, input=None):
    result = subprocess.run(
        as_postgres(argv), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
        input=input, cwd="/"
    )
    if check and result.returncode != 0:
        raise Failure(f"{shlex.join(argv[:3])}... failed ({result.returncode}):\n{tail(result.stderr or result.stdout)}")
    return result


def pg_ctl(*args, log):
    """pg_ctl with the server's output going to `log`: a server started with our pipes as its
    stdout would hold them open, and waiting for their end would never return."""
    argv = as_postgres([str(pg_bin() / "pg_ctl"), *args, "-l", str(log)])
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, timeout=180, cwd="/")
    if result.returncode != 0:
        raise Failure(f"pg_ctl {' '.join(args[:3])} failed: {tail(result.stderr)} (server log: {log})")


def tail(text, lines=12):
    return "\n".join(text.strip().splitlines()[-lines:])


def pgbackrest(settings, *args, check=True, timeout=None):
    """pgBackRest through the wrapper written by setup (stanza, config and secrets)."""
    if not settings.wrapper.exists():
        raise Failure(f"{settings.wrapper} is missing: run `make backup-setup` first (docs/backups.md)", 2)
    return run([str(settings.wrapper), *args], check=check, timeout=timeout)


def psql(port, sql, database="postgres", check=True):
    """One statement as the postgres superuser over the Unix socket (peer authentication, so
    no password is needed whatever pg_hba.conf asks of TCP connections)."""
    argv = [str(pg_bin() / "psql"), "-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-h", SOCKET_DIR[0],
            "-p", str(port), "-U", PG_USER, "-d", database, "-c", sql]
    result = run(argv, check=False, timeout=60)
    if check and result.returncode != 0:
        raise Failure(f"psql on port {port}: {tail(result.stderr)}")
    return result.stdout.strip() if result.returncode == 0 else None


def reachable(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def chown_postgres(path, mode=None):
    entry = pwd.getpwnam(PG_USER)
    if os.geteuid() == 0:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    if mode is not None:
        os.chmod(path, mode)


def make_dir(path, mode=0o750):
    path.mkdir(parents=True, exist_ok=True)
    chown_postgres(path, mode)


# --- the repository's state -------------------------------------------------------------------


def info(settings):
    """`pgbackrest info` as JSON for the stanza; refuses a wrong key with a clear message."""
    result = pgbackrest(settings, "info", "--output=json", check=False, timeout=120)
    try:
        stanza = json.loads(result.stdout, strict=False)[0]
    except (ValueError, IndexError):
        raise Failure(f"pgbackrest info failed:\n{tail(result.stderr or result.stdout)}")
    for repo in stanza.get("repo", []):
        message = repo.get("status", {}).get("message", "")
        if "FormatError" in message or ("unable to load info file" in message and stanza.get("cipher") != "none"):
            raise Failure(
                f"the repository cannot be read with the key in {settings.cipher_pass_file}: pgBackRest could not "
                "decrypt its backup.info (a wrong or changed key?). Use the key the repository was created "
                "with; without it these backups cannot be restored.",
                3,
            )
    return stanza


def utc(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


def show(moment):
    """A time as TARGET_TIME takes it back (UTC; milliseconds when there are any)."""
    text = moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return (text[:-3].rstrip("0").rstrip(".") if moment.microsecond else text[:-7]) + "+00"


def size(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def archived_wal(settings):
    """(newest archived WAL file, when it was pushed) from the repository listing, or None."""
    result = pgbackrest(settings, "repo-ls", "--output=json", "--recurse", f"archive/{settings.stanza}",
                        check=False, timeout=300)
    if result.returncode != 0:
        return None
    files = [(name, entry["time"]) for name, entry in json.loads(result.stdout or "{}").items()
             if entry.get("type") == "file" and "/" in name and len(name.rsplit("/", 1)[1]) > 24
             and name.rsplit("/", 1)[1][24:25] == "-"]
    if not files:
        return None
    name, pushed = max(files, key=lambda f: (f[1], f[0]))
    # The listing's times are whole seconds: the push ended before the next one began.
    return name.rsplit("/", 1)[1][:24], utc(pushed + 1)


def recoverable_range(settings, stanza):
    """(earliest, latest) times a restore can reach: from the end of the oldest backup to the
    push of the newest archived WAL file; None where there is nothing."""
    backups = [b for b in stanza.get("backup", []) if not b.get("error")]
    earliest = utc(min(b["timestamp"]["stop"] for b in backups)) if backups else None
    newest = archived_wal(settings)
    return earliest, (newest[1] if newest else None), (newest[0] if newest else None)


def primary_port(settings):
    """The port of the node that is not in recovery, if one answers."""
    for port in settings.ports:
        if reachable(port) and psql(port, "SELECT pg_is_in_recovery()", check=False) == "f":
            return port
    return None


def flush_wal(settings, limit_s=120):
    """Commits an empty transaction on the primary, closes its WAL segment and waits until
    PostgreSQL's archiver reports it archived: a restore to any time up to now then finds a
    commit after its target, which PostgreSQL needs to stop there (a target after the
    archive's last commit is refused by PostgreSQL 14+: "recovery ended before configured
    recovery target was reached"). Asks PostgreSQL rather than `pgbackrest check`, which
    wants every node of a pair to answer, and a pair that just lost a node is when this runs."""
    port = primary_port(settings)
    if port is None:
        return None
    started = time.monotonic()
    psql(port, "SELECT txid_current()")
    segment = psql(port, "SELECT pg_walfile_name(pg_switch_wal())")
    while True:
        row = psql(port, "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''), "
                         "coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) "
                         "FROM pg_stat_archiver")
        archived, failed, failing = row.split("|")
        if archived[:24] >= segment:
            return port, time.monotonic() - started
        if time.monotonic() - started > limit_s:
            why = f" (archiving fails: last failed {failed})" if failing == "t" else ""
            raise Failure(f"the running cluster's WAL segment {segment} was not archived within {limit_s} s{why}: "
                          "is the repository reachable? (make backups shows the archiver's state)")
        time.sleep(0.1)


# --- setup ------------------------------------------------------------------------------------


def config_text(settings):
    lines = [
        f"# pgBackRest for stanza {settings.stanza}: written by `make backup-setup` (backup/run.py setup).",
        "# Change the BACKUP_* settings and run it again rather than editing this file (docs/backups.md).",
        "# The repository key is not here: the wrapper beside this file reads it from",
        f"# {settings.cipher_pass_file} at every call and hands it over as PGBACKREST_REPO1_CIPHER_PASS.",
        "[global]",
    ]
    if settings.repo_type == "s3":
        lines += [
            "repo1-type=s3",
            f"repo1-path={settings.repo_path}",
            f"repo1-s3-bucket={env('BACKUP_S3_BUCKET', 'order-api-backups')}",
            f"repo1-s3-endpoint={env('BACKUP_S3_ENDPOINT', 's3.amazonaws.com')}",
            f"repo1-s3-region={env('BACKUP_S3_REGION', 'us-east-1')}",
            f"repo1-s3-uri-style={env('BACKUP_S3_URI_STYLE', 'host')}",
            f"repo1-storage-verify-tls={env('BACKUP_S3_VERIFY_TLS', 'y')}",
            "# repo1-s3-key and repo1-s3-key-secret come from BACKUP_S3_KEY_FILE and BACKUP_S3_KEY_SECRET_FILE.",
        ]
    else:
        lines.append(f"repo1-path={settings.repo_path}")
    lines += [
        "repo1-cipher-type=aes-256-cbc",
        "# Two full backups, each with its differential and incremental backups and the WAL to",
        "# restore any moment since the older one ended.",
        f"repo1-retention-full={settings.retention_full}",
        f"repo1-retention-diff={settings.retention_diff}",
        "compress-type=zst",
        f"process-max={settings.process_max}",
        "start-fast=y",
        "# archive-push returns as soon as the WAL is in the spool's queue and a background",
        "# process pushes it (several at once); archive-get prefetches likewise during a restore.",
        "archive-async=y",
        "# archive-push-queue-max is left unset on purpose: while the repository is unreachable",
        "# PostgreSQL keeps the WAL in pg_wal rather than dropping it (which would silently break",
        "# point-in-time recovery until the next full backup). The price: pg_wal grows, so alert",
        "# on order_api_wal_archive_pending_bytes before the disk fills.",
        f"spool-path={settings.spool}",
        f"log-path={settings.log}",
        f"lock-path={settings.lock}",
        "log-level-console=warn",
        "log-level-file=info",
        "",
        f"[{settings.stanza}]",
    ]
    for n, (data, port) in enumerate(zip(settings.pgdata, settings.ports), start=1):
        lines += [f"pg{n}-path={data}", f"pg{n}-port={port}", f"pg{n}-socket-path={settings.socket}"]
    if len(settings.pgdata) > 1:
        lines += ["# Copy the files from the standby; only the start and stop of a backup touch the primary.",
                  "backup-standby=y"]
    return "\n".join(lines) + "\n"


def wrapper_text(settings):
    lines = [
        "#!/bin/sh",
        f"# pgBackRest for stanza {settings.stanza}, written by `make backup-setup` (backup/run.py setup).",
        "# Every call, PostgreSQL's archive_command and restore_command included, goes through this:",
        "# the secrets are read from their files now and handed over in the environment, so they are",
        "# on no command line and in no configuration file.",
        "set -e",
    ]
    for variable, path in settings.secret_files().items():
        lines += [f"{variable}=$(cat {shlex.quote(str(path))})", f"export {variable}"]
    lines.append(f"exec pgbackrest --config={shlex.quote(str(settings.config))} "
                 f"--stanza={shlex.quote(settings.stanza)} \"$@\"")
    return "\n".join(lines) + "\n"


def archive_command(settings):
    # PostgreSQL runs it with the data directory as working directory, so "$PWD" names the node
    # that archives: the same command serves both nodes of a pair (pg_rewind copies
    # postgresql.auto.conf between them), each with a spool and lock directory of its own.
    node = '"${PWD##*/}"'
    return (f"{shlex.quote(str(settings.wrapper))} --pg1-path=\"$PWD\" --spool-path={settings.spool}/{node} "
            f"--lock-path={settings.lock}/{node} archive-push %p")


def sql_literal(text):
    return "'" + text.replace("'", "''") + "'"


def write_file(path, text, mode):
    path.write_text(text)
    chown_postgres(path, mode)


def setup(settings):
    if subprocess.run(["sh", "-c", "command -v pgbackrest"], capture_output=True).returncode != 0:
        raise Failure("pgbackrest is not installed: apt-get install pgbackrest (Debian/Ubuntu), then run this again", 2)
    for data, port in zip(settings.pgdata, settings.ports):
        if not reachable(port):
            raise Failure(f"no PostgreSQL answers on port {port} (BACKUP_PGPORT) for {data}", 2)
    make_dir(settings.config.parent, 0o750)
    if settings.repo_type == "posix":
        make_dir(settings.repo_path, 0o750)
    for path in (settings.spool, settings.log, settings.lock):
        make_dir(path, 0o750)
    if not settings.cipher_pass_file.exists():
        settings.cipher_pass_file.parent.mkdir(parents=True, exist_ok=True)
        write_file(settings.cipher_pass_file, secrets.token_urlsafe(48), 0o600)
        print(f"setup: new repository key in {settings.cipher_pass_file}: keep a copy somewhere else, "
              "without it no backup can be read")
    write_file(settings.config, config_text(settings), 0o640)
    write_file(settings.wrapper, wrapper_text(settings), 0o750)
    print(f"setup: pgBackRest stanza {settings.stanza}: {settings.config}, repository "
          f"{settings.repo_type}:{settings.repo_path} (aes-256-cbc, zstd, {settings.retention_full} full backups kept)")

    command = archive_command(settings)
    restart = []
    for data, port in zip(settings.pgdata, settings.ports):
        mode = psql(port, "SHOW archive_mode")
        psql(port, f"ALTER SYSTEM SET archive_command = {sql_literal(command)}")
        psql(port, f"ALTER SYSTEM SET archive_timeout = {sql_literal(settings.archive_timeout)}")
        psql(port, "SELECT pg_reload_conf()")
        if mode == "off":
            psql(port, "ALTER SYSTEM SET archive_mode = 'on'")
            restart.append((data, port))
    if restart:
        restart_nodes(settings, restart)
    print(f"setup: archive_mode=on, archive_command={command}, archive_timeout={settings.archive_timeout}s")

    pgbackrest(settings, "stanza-create", timeout=300)
    started = time.monotonic()
    pgbackrest(settings, "check", timeout=300)
    print(f"setup: WAL archiving checked (a WAL segment reached the repository in {time.monotonic() - started:.1f} s); "
          "next: make backup")


def restart_nodes(settings, nodes):
    """Restarts what needs it for archive_mode. One cluster: pg_ctlcluster (Debian's own
    cluster) or pg_ctl. The HA pair: each standby's PostgreSQL is stopped and its keeper
    starts it again at once; the primary is restarted by a planned switchover (it comes back
    as the standby), never stopped under the failover manager's feet."""
    if settings.ha:
        for data, port in nodes:
            if psql(port, "SELECT pg_is_in_recovery()") == "t":
                run([str(pg_bin() / "pg_ctl"), "-D", str(data), "stop", "-m", "fast", "-w"])  # its keeper starts it
                wait_for(lambda: reachable(port) and psql(port, "SHOW archive_mode", check=False) == "on", 60,
                         f"the standby on {port} to come back")
        if any(psql(port, "SHOW archive_mode") == "off" for _, port in nodes):
            print("setup: planned switchover so that the primary restarts (as the standby) with archive_mode=on")
            # The monitor takes a switchover only from a primary and a secondary it calls healthy:
            # the standby just restarted has to catch up first.
            wait_for(ha_healthy, 180, "the pair's monitor to report a primary and a secondary")
            for attempt in range(1, 4):
                result = subprocess.run([str(ROOT / ".ci" / "ha"), "switchover"], capture_output=True, text=True,
                                        timeout=180)
                if result.returncode == 0:
                    break
                if attempt == 3:
                    raise Failure(f"the planned switchover failed: {tail(result.stderr or result.stdout, 4)}")
                time.sleep(5)
                wait_for(ha_healthy, 180, "the pair's monitor to report a primary and a secondary")
            for _, port in nodes:
                wait_for(lambda: psql(port, "SHOW archive_mode", check=False) == "on", 120, f"archive_mode on port {port}")
            wait_for(ha_healthy, 180, "the pair to be healthy again after the switchover")
        print("setup: restarted the pair's nodes for archive_mode (the service saw a switchover: 503s for a few s)")
        return
    for data, port in nodes:
        custom = os.environ.get("BACKUP_RESTART", "").strip()
        if custom:
            argv = ["sh", "-c", custom]
            subprocess.run(argv, check=True, timeout=120)
        elif str(data).startswith("/var/lib/postgresql/") and Path(f"/etc/postgresql/{data.parent.name}/{data.name}").is_dir():
            subprocess.run(["pg_ctlcluster", data.parent.name, data.name, "restart"], check=True, timeout=120)
        else:
            pg_ctl("-D", str(data), "restart", "-m", "fast", "-w", "-t", "120", log=Path(f"{data}.log"))
        print(f"setup: restarted PostgreSQL ({data}, port {port}) to turn archive_mode on: connections were "
              "refused for a moment (the service answers 503 meanwhile and reconnects)")


def ha_healthy():
    result = subprocess.run([str(ROOT / ".ci" / "ha"), "states"], capture_output=True, text=True, timeout=30)
    states = result.stdout.split()
    return result.returncode == 0 and "primary" in states and "secondary" in states


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Failure:
            pass
        time.sleep(0.25)
    raise Failure(f"timed out after {seconds} s waiting for {what}")


# --- backup, list, check ----------------------------------------------------------------------


def backup(settings, kind):
    if kind not in ("full", "diff", "incr"):
        raise Failure(f"backup type {kind!r}: expected full, diff or incr", 2)
    info(settings)  # a wrong key stops here, with its own message
    started = time.monotonic()
    result = pgbackrest(settings, "backup", f"--type={kind}", check=False, timeout=6 * 3600)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise Failure(f"backup failed after {took:.1f} s:\n{tail(result.stderr or result.stdout)}")
    stanza = info(settings)
    newest = stanza["backup"][-1]
    repo_total = sum(b["info"]["repository"]["delta"] for b in stanza["backup"])
    print(f"backup: {newest['type']} {newest['label']} in {took:.1f} s: database {size(newest['info']['size'])}, "
          f"{size(newest['info']['repository']['delta'])} written to the repository (compressed, encrypted)")
    print(f"backup: consistent from {show(utc(newest['timestamp']['stop']))}; the repository holds "
          f"{len(stanza['backup'])} backup(s), {size(repo_total)} (WAL not counted); older ones expire past "
          f"{settings.retention_full} full")
    print(json.dumps({"label": newest["label"], "type": newest["type"], "seconds": round(took, 2),
                      "database_bytes": newest["info"]["size"],
                      "repository_bytes": newest["info"]["repository"]["delta"]}))


def listing(settings):
    stanza = info(settings)
    backups = stanza.get("backup", [])
    if not backups:
        print(f"backups: none yet for stanza {settings.stanza} (make backup)")
        return
    print(f"{'backup':36} {'type':4} {'started (UTC)':19} {'took':>6} {'database':>9} {'written':>9}  WAL")
    for b in backups:
        start, stop = b["timestamp"]["start"], b["timestamp"]["stop"]
        print(f"{b['label']:36} {b['type']:4} {utc(start).strftime('%Y-%m-%d %H:%M:%S')} {stop - start:>5}s "
              f"{size(b['info']['size']):>9} {size(b['info']['repository']['delta']):>9}  "
              f"{b['archive']['start']}..{b['archive']['stop']}")
    earliest, latest, wal = recoverable_range(settings, stanza)
    archive = stanza.get("archive", [{}])[-1]
    print(f"recoverable: from {show(earliest)} to {show(latest) if latest else '?'} "
          f"(newest archived WAL {wal}; WAL {archive.get('min')}..{archive.get('max')})")
    port = primary_port(settings)
    if port is not None:
        row = psql(port, "SELECT archived_count, failed_count, coalesce(last_archived_wal, '-'), "
                         "coalesce(round(extract(epoch FROM now() - last_archived_time))::text, '-'), "
                         "coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) "
                         "FROM pg_stat_archiver", check=False)
        if row:
            archived, failed, last, age, failing = row.split("|")
            state = "FAILING" if failing == "t" else "ok"
            print(f"archiving ({state}): {archived} WAL files archived, {failed} failures since the statistics "
                  f"reset; last {last}, {age} s ago")


def check(settings):
    info(settings)
    flushed = flush_wal(settings)
    if flushed is None:
        raise Failure("no primary answers on " + ", ".join(map(str, settings.ports)))
    print(f"check: the WAL of the primary on port {flushed[0]} is in the repository ({flushed[1]:.1f} s)")


# --- restore ----------------------------------------------------------------------------------


def parse_target(text):
    """TARGET_TIME -> aware datetime (a time without a zone is the machine's local time), or
    None for 'latest'."""
    text = text.strip()
    if text.lower() in ("latest", "end"):
        return None
    cleaned = text.replace(" UTC", "+00:00")
    if len(cleaned) > 3 and cleaned[-3] in "+-" and cleaned[-3:].replace("+", "").replace("-", "").isdigit():
        cleaned += ":00"  # '+00' as PostgreSQL writes it
    try:
        moment = datetime.datetime.fromisoformat(cleaned)
    except ValueError:
        raise Failure(f"TARGET_TIME {text!r} is not a time: use e.g. '2026-12-04 06:49:47+00' "
                      "(as `make backups` prints them) or 'latest'", 2)
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(datetime.timezone.utc)


def free_port(start=5433):
    for port in range(start, start + 200):
        if not reachable(port):
            return port
    raise Failure("no free port from 5433", 2)


def restore(settings, target_text):
    target = parse_target(target_text)
    label = time.strftime("%Y%m%d-%H%M%S")
    default_dir = (settings.home / f"restored-{label}") if settings.home else \
        Path(f"/var/lib/postgresql/order-api-restored-{label}")
    directory = Path(env("RESTORE_DIR", str(default_dir))).resolve()
    port = int(env("RESTORE_PORT", "0")) or free_port()
    if directory in settings.pgdata:
        raise Failure(f"RESTORE_DIR {directory} is the running cluster's data directory", 2)
    if directory.exists() and any(directory.iterdir()):
        raise Failure(f"RESTORE_DIR {directory} exists and is not empty: a restore never overwrites a directory", 2)
    if reachable(port):
        raise Failure(f"RESTORE_PORT {port} is taken", 2)

    stanza = info(settings)
    flushed = flush_wal(settings)
    if flushed:
        print(f"restore: pushed the running cluster's latest WAL to the repository first ({flushed[1]:.1f} s)")
        stanza = info(settings)
    earliest, latest, _ = recoverable_range(settings, stanza)
    if earliest is None:
        raise Failure(f"no backup of stanza {settings.stanza} to restore from (make backup)", 2)
    span = f"recoverable range: {show(earliest)} to {show(latest) if latest else '?'}"
    if target is not None and target < earliest:
        raise Failure(f"TARGET_TIME {show(target)} is before the oldest backup was consistent ({show(earliest)}): "
                      f"nothing to restore from ({span})", 2)
    if target is not None and latest is not None and target > latest:
        raise Failure(f"TARGET_TIME {show(target)} is after the newest WAL in the repository (pushed "
                      f"{show(latest)}): what happened after that is not in the backups ({span}); "
                      "TARGET_TIME=latest restores everything there is", 2)

    make_dir(directory, 0o700)
    work = directory.parent / f".{directory.name}.pgbackrest"
    make_dir(work, 0o750)
    restore_command = (f"{shlex.quote(str(settings.wrapper))} --pg1-path=\"$PWD\" --spool-path={work} "
                       f"--lock-path={work} archive-get %f \"%p\"")
    args = ["restore", f"--pg1-path={directory}", "--archive-mode=off",
            f"--recovery-option=restore_command={restore_command}", f"--spool-path={work}", f"--lock-path={work}"]
    if target is None:
        args += ["--type=default"]
        what = "the end of the archived WAL"
    else:
        args += ["--type=time", f"--target={target.strftime('%Y-%m-%d %H:%M:%S.%f+00')}", "--target-action=promote"]
        what = show(target)
    started = time.monotonic()
    result = pgbackrest(settings, *args, check=False, timeout=6 * 3600)
    copied = time.monotonic() - started
    if result.returncode != 0:
        raise Failure(f"pgbackrest restore failed:\n{tail(result.stderr or result.stdout)}")
    manifest = json.loads(pgbackrest(settings, "info", "--output=json").stdout)[0]
    chosen = restored_backup(directory, manifest)
    configure_restored(settings, directory, port)

    log = directory.parent / f"{directory.name}.log"
    pg_ctl("-D", str(directory), "-W", "start", log=log)
    started_recovery = time.monotonic()
    deadline = started_recovery + RESTORE_TIMEOUT_S
    while True:
        if reachable(port) and psql(port, "SELECT pg_is_in_recovery()", check=False) == "f":
            break
        running = run([str(pg_bin() / "pg_ctl"), "-D", str(directory), "status"], check=False).returncode == 0
        text = log.read_text(errors="replace") if log.exists() else ""
        if not running and ("FATAL" in text or "database system is shut down" in text):
            raise Failure(explain_recovery_failure(text, what, span, log), 2)
        if time.monotonic() > deadline:
            raise Failure(f"PostgreSQL did not finish recovery within {RESTORE_TIMEOUT_S} s; see {log}")
        time.sleep(0.2)
    recovered = time.monotonic() - started_recovery
    text = log.read_text(errors="replace")
    stopped = next((line.split("LOG:", 1)[1].strip() for line in text.splitlines()
                    if "recovery stopping" in line), None)
    last = next((line.rsplit("log time", 1)[1].strip() for line in text.splitlines()
                 if "last completed transaction was at log time" in line), "?")
    print(f"restore: backup {chosen} + WAL to {what}: files restored in {copied:.1f} s, "
          f"WAL replayed and promoted in {recovered:.1f} s")
    print(f"restore: last transaction replayed: {last}" + (f"; {stopped}" if stopped else ""))
    print(f"restore: PostgreSQL on port {port}, data {directory} (archive_mode=off: it writes nothing to the "
          "repository); the running cluster was not touched")
    print(f"restore: DATABASE_URL=postgresql://{PG_USER}@127.0.0.1:{port}/{settings.database}   "
          f"(stop: runuser -u postgres -- {pg_bin()}/pg_ctl -D {directory} stop)")


def restored_backup(directory, stanza):
    """The label of the backup set pgBackRest chose (from the restored backup.manifest)."""
    manifest = directory / "backup.manifest"
    labels = [b["label"] for b in stanza.get("backup", [])]
    if manifest.exists():
        for line in manifest.read_text(errors="replace").splitlines():
            if line.startswith("backup-label="):
                return line.split("=", 1)[1].strip('"')
    return labels[-1] if labels else "?"


def configure_restored(settings, directory, port):
    """Makes the restored cluster one of its own: its port, local connections only, no
    synchronous standby to wait for (a node of the pair names one), no archiving. A cluster
    whose configuration lived outside its data directory (Debian's /etc/postgresql) gets a
    minimal postgresql.conf and a copy of the access rules."""
    if not (directory / "postgresql.conf").exists():
        data = settings.pgdata[0]
        source = Path(env("BACKUP_PGCONF_DIR", f"/etc/postgresql/{data.parent.name}/{data.name}"))
        for name in ("pg_hba.conf", "pg_ident.conf"):
            if (source / name).exists():
                write_file(directory / name, (source / name).read_text(), 0o600)
        write_file(directory / "postgresql.conf",
                   f"# Written by backup/run.py restore: the backed-up cluster's configuration lived in {source},\n"
                   "# outside its data directory, which pgBackRest does not back up. Defaults, plus\n"
                   "# postgresql.auto.conf (the backed-up ALTER SYSTEM settings and the restore's own).\n", 0o600)
    overrides = [
        "",
        "# Written by backup/run.py restore: a cluster of its own, beside the running one.",
        f"port = {port}",
        "listen_addresses = '127.0.0.1'",
        f"unix_socket_directories = '{settings.socket}'",
        "synchronous_standby_names = ''",
        "archive_mode = 'off'",
        "logging_collector = off",
        "cluster_name = 'restored'",
        "",
    ]
    auto = directory / "postgresql.auto.conf"
    with auto.open("a") as f:
        f.write("\n".join(overrides))
    chown_postgres(auto, 0o600)


def explain_recovery_failure(text, what, span, log):
    if "recovery ended before configured recovery target was reached" in text:
        last = next((line.rsplit("log time", 1)[1].strip() for line in text.splitlines()
                     if "last completed transaction was at log time" in line), "?")
        return (f"the archived WAL ends before TARGET_TIME {what}: its last transaction is from {last}, and "
                f"PostgreSQL needs a commit after the target to stop there ({span}); nothing after that is in "
                f"the backups. TARGET_TIME=latest restores everything there is. Server log: {log}")
    fatal = [line for line in text.splitlines() if "FATAL" in line or "PANIC" in line]
    return f"the restored PostgreSQL stopped during recovery: {tail(chr(10).join(fatal), 3)} (see {log})"


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    command, rest = argv[1], argv[2:]
    try:
        settings = Settings()
        if command == "setup":
            setup(settings)
        elif command == "backup":
            backup(settings, rest[0] if rest else env("TYPE", "incr"))
        elif command == "list":
            listing(settings)
        elif command == "restore":
            target = rest[0] if rest else os.environ.get("TARGET_TIME", "")
            if not target.strip():
                raise Failure("restore needs TARGET_TIME ('2026-12-04 06:49:47+00' or 'latest'); "
                              "`make backups` shows the recoverable range", 2)
            restore(settings, target)
        elif command == "check":
            check(settings)
        elif command == "config":
            print(config_text(settings), end="")
            print(f"# archive_command = {archive_command(settings)}")
        else:
            raise Failure(f"unknown command {command!r}; see backup/run.py --help", 2)
    except Failure as failure:
        print(f"{command}: {failure}", file=sys.stderr)
        return failure.code
    except subprocess.TimeoutExpired as e:
        print(f"{command}: timed out: {shlex.join(e.cmd[:4])}...", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
