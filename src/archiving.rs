//! Watches the WAL archiving that the backups' point-in-time recovery depends on
//! (docs/backups.md): every `WAL_ARCHIVE_CHECK_SECS` it reads `pg_stat_archiver` through the
//! pool, exports what it saw at `GET /metrics`, adds `"archiving"` to `GET /health/ready`, and
//! logs a warning while archiving fails.
//!
//! A failing archive (the backup repository unreachable or full) does not stop the shop: the
//! orders keep committing on the primary, only their way into the backups waits (PostgreSQL
//! keeps the WAL until it is archived). So readiness stays 200 and says
//! `"archiving":"failing"`: answering 503 would take every replica out of the load balancer
//! at once and turn a backup problem into an outage. What the operator must watch is how much
//! WAL waits (`order_api_wal_archive_pending_bytes`: what a loss of the database's disk would
//! lose now) and for how long (`order_api_wal_archive_last_success_age_seconds`).
//!
//! With `archive_mode=off` (the default of a plain PostgreSQL) there is nothing to watch:
//! one info line at start says so, readiness has no `archiving` field, and the only series is
//! `order_api_wal_archive_enabled 0`.

use std::{
    fmt::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::db::{Db, archiver::ArchiverStats};

/// How long start-up waits for the first reading (the database answered the migrations a
/// moment ago, so it normally takes a millisecond).
const FIRST_READING_TIMEOUT: Duration = Duration::from_secs(1);

/// While archiving keeps failing, the warning is repeated this often (and at every change of
/// the failing file), so a log search finds it without flooding the log every check.
const WARN_REPEAT: Duration = Duration::from_secs(300);

/// What the last reading showed; shared by the watching task, readiness and metrics.
#[derive(Default)]
pub struct ArchiveWatch {
    state: Mutex<Watched>,
}

#[derive(Default)]
struct Watched {
    /// The last successful reading and when it was taken (ages grow from there).
    last: Option<(ArchiverStats, Instant)>,
    /// The furthest position known to be archived: the last archived file is not always a
    /// segment (a backup label, a history file), so the last segment seen is kept.
    archived_up_to: Option<u64>,
    /// When the failing warning was last logged, while failing.
    warned: Option<(Instant, Option<String>)>,
    /// Whether the "archiving is off" line was logged.
    told_off: bool,
}

impl ArchiveWatch {
    /// Reads the archiver once, for at most `FIRST_READING_TIMEOUT`, then starts reading it
    /// every `interval` until the task is aborted. The first reading is awaited before the
    /// service listens, so the set of `/metrics` series is the same from the first scrape on.
    /// A reading that fails (the database away) changes nothing: readiness reports the
    /// database itself.
    pub async fn start(self: Arc<Self>, db: Db, interval: Duration) -> tokio::task::JoinHandle<()> {
        let _ = tokio::time::timeout(FIRST_READING_TIMEOUT, self.read(&db)).await;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                self.read(&db).await;
            }
        })
    }

    async fn read(&self, db: &Db) {
        if let Ok(stats) = db.archiver_stats().await {
            self.record(stats, Instant::now());
        }
    }

    /// Takes a reading in and logs what changed: archiving starting to fail (a warning, repeated
    /// while it lasts), and working again.
    pub fn record(&self, stats: ArchiverStats, at: Instant) {
        let mut state = self.state.lock().unwrap();
        if stats.mode == "off" {
            if !state.told_off {
                state.told_off = true;
                tracing::info!(
                    see = "docs/backups.md",
                    "WAL archiving is off (archive_mode=off): backups cannot restore to a point in time"
                );
            }
            state.last = Some((stats, at));
            return;
        }
        if let Some(end) = stats.archived_up_to() {
            state.archived_up_to = Some(state.archived_up_to.map_or(end, |known| known.max(end)));
        }
        let pending = pending_bytes(&stats, state.archived_up_to);
        if stats.failing() {
            let due = match &state.warned {
                None => true,
                Some((when, file)) => at.duration_since(*when) >= WARN_REPEAT || *file != stats.last_failed_wal,
            };
            if due {
                tracing::warn!(
                    failed_count = stats.failed_count,
                    last_failed_wal = stats.last_failed_wal.as_deref(),
                    last_archived_wal = stats.last_archived_wal.as_deref(),
                    last_archived_age_s = stats.last_archived_age.map(|age| age.round()),
                    pending_bytes = pending,
                    hint = "is the backup repository reachable and not full? see docs/backups.md",
                    "WAL archiving is failing: new orders are safe on the database but not yet in the backups"
                );
                state.warned = Some((at, stats.last_failed_wal.clone()));
            }
        } else if state.warned.take().is_some() {
            tracing::info!(
                last_archived_wal = stats.last_archived_wal.as_deref(),
                pending_bytes = pending,
                "WAL archiving works again"
            );
        }
        state.last = Some((stats, at));
    }

    /// `"ok"` or `"failing"` for `GET /health/ready`; `None` while archiving is off or before
    /// the first reading.
    pub fn readiness(&self) -> Option<&'static str> {
        let state = self.state.lock().unwrap();
        let (stats, _) = state.last.as_ref()?;
        match (stats.mode.as_str(), stats.failing()) {
            ("off", _) => None,
            (_, true) => Some("failing"),
            (_, false) => Some("ok"),
        }
    }

    /// The `order_api_wal_archive_*` series (nothing before the first reading).
    pub fn render(&self, out: &mut String) {
        let state = self.state.lock().unwrap();
        let Some((stats, read_at)) = state.last.as_ref() else { return };
        let enabled = stats.mode != "off";
        series(
            out,
            "order_api_wal_archive_enabled",
            "gauge",
            "Whether PostgreSQL archives WAL (archive_mode on or always), which point-in-time recovery needs.",
            f64::from(u8::from(enabled)),
        );
        if !enabled {
            return;
        }
        let since_reading = read_at.elapsed().as_secs_f64();
        for (name, kind, help, value) in [
            (
                "order_api_wal_archived_total",
                "counter",
                "WAL files archived, as pg_stat_archiver counts them.",
                Some(stats.archived_count as f64),
            ),
            (
                "order_api_wal_archive_failures_total",
                "counter",
                "Failed attempts to archive a WAL file (the repository unreachable, full, ...), as pg_stat_archiver counts them.",
                Some(stats.failed_count as f64),
            ),
            (
                "order_api_wal_archive_failing",
                "gauge",
                "1 while the last attempt to archive WAL failed.",
                Some(f64::from(u8::from(stats.failing()))),
            ),
            (
                "order_api_wal_archive_last_success_age_seconds",
                "gauge",
                "Seconds since a WAL file was last archived.",
                stats.last_archived_age.map(|age| age + since_reading),
            ),
            (
                "order_api_wal_archive_pending_bytes",
                "gauge",
                "WAL written but not yet archived: what losing the database's disk now would lose from the backups.",
                pending_bytes(stats, state.archived_up_to).map(|bytes| bytes as f64),
            ),
        ] {
            if let Some(value) = value {
                series(out, name, kind, help, value);
            }
        }
    }
}

/// WAL written past the end of the last archived segment, when both are known.
fn pending_bytes(stats: &ArchiverStats, archived_up_to: Option<u64>) -> Option<u64> {
    Some(stats.current_lsn?.saturating_sub(archived_up_to?))
}

fn series(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_16: u64 = 16 * 1024 * 1024;

    fn reading(failed: Option<f64>, archived: Option<f64>, wal: &str, lsn: u64) -> ArchiverStats {
        ArchiverStats {
            mode: "on".into(),
            archived_count: 7,
            failed_count: u8::from(failed.is_some()).into(),
            last_archived_wal: Some(wal.into()),
            last_archived_age: archived,
            last_failed_wal: failed.map(|_| "000000010000000000000009".into()),
            last_failed_age: failed,
            current_lsn: Some(lsn),
            segment_size: MIB_16,
        }
    }

    /// Before any reading, and with archiving off, readiness says nothing about archiving.
    #[test]
    fn readiness_has_no_archiving_field_until_archiving_is_on() {
        let watch = ArchiveWatch::default();
        assert_eq!(watch.readiness(), None);
        let off = ArchiverStats { mode: "off".into(), ..reading(None, None, "", 0) };
        watch.record(off, Instant::now());
        assert_eq!(watch.readiness(), None);
        let mut text = String::new();
        watch.render(&mut text);
        assert!(text.contains("order_api_wal_archive_enabled 0"), "{text}");
        assert!(!text.contains("order_api_wal_archive_failing"), "{text}");
    }

    /// A failure newer than the last success: readiness and the gauge say failing, and the
    /// pending WAL is measured from the last archived segment even when a backup label was
    /// archived after it.
    #[test]
    fn a_failing_archive_shows_in_readiness_and_metrics() {
        let watch = ArchiveWatch::default();
        watch.record(reading(None, Some(1.0), "000000010000000000000005", 6 * MIB_16 + 100), Instant::now());
        assert_eq!(watch.readiness(), Some("ok"));
        let label = "000000010000000000000005.00000028.backup";
        watch.record(reading(Some(0.5), Some(20.0), label, 9 * MIB_16), Instant::now());
        assert_eq!(watch.readiness(), Some("failing"));
        let mut text = String::new();
        watch.render(&mut text);
        assert!(text.contains("order_api_wal_archive_failing 1"), "{text}");
        assert!(text.contains("order_api_wal_archive_failures_total 1"), "{text}");
        assert!(text.contains(&format!("order_api_wal_archive_pending_bytes {}", 3 * MIB_16)), "{text}");
    }
}
