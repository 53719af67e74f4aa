//! Where log lines go: stdout, written by a thread of its own through a bounded buffer, so
//! that a request never waits for stdout and a stalled reader costs memory up to a limit,
//! then lines (dropped and counted), never time.
//!
//! Kept from the hand-written logger rather than replaced by `tracing-appender`'s lossy
//! `NonBlocking` writer, which does the same job with three differences that matter here: it
//! bounds its queue in lines, not bytes (`LOG_BUFFER_BYTES` is a memory bound an operator can
//! size); its worker writes each line with a call of its own (one write per line cost the
//! catalogue 13 % of its throughput; this writer takes everything buffered with one call); and
//! it counts what it drops but says nothing in the log itself. `tracing` formats the line
//! (`telemetry::json`); this only carries it.

use std::{
    io::Write,
    sync::{
        Condvar, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// Appends one whole line (newline included). Appended whole, so lines from concurrent
/// requests never interleave.
pub fn append(line: &[u8]) {
    output().append(line);
}

/// Lines dropped since start because stdout did not keep up (`order_api_log_lines_dropped_total`).
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Waits until every line logged so far is written to stdout. Called before the process
/// exits: lines still in the buffer would be lost with it.
pub fn flush() {
    if let Some(output) = OUTPUT.get() {
        output.flush();
    }
}

/// Lines are written to stdout by a thread of their own, so that a request never waits for
/// the write system call: a request appends its line to a buffer and moves on, and the writer
/// takes everything buffered at once and writes it with one call. When the service is idle
/// each line is written at once; under load many lines share one write (one write per line
/// cost 13 % of the catalogue's throughput). After each write the writer naps for `NAP`
/// before it looks again, and it is woken only when it has gone to sleep on an empty buffer:
/// under load requests wake nobody, and there are at most ~1,000 writes a second (waking the
/// writer for each line that found the buffer empty cost GET /api/orders/:id 30% of its
/// throughput: a futex call per request and a thread switch per line). If stdout blocks (a reader that does not keep up),
/// the buffer stops at its limit (`LOG_BUFFER_BYTES`) and further lines are counted and dropped,
/// rather than growing memory or blocking requests; the count is logged when the writer
/// catches up.
struct Output {
    state: Mutex<Buffered>,
    /// Signalled when lines arrive (to the writer) and when a batch is written (to `flush`).
    changed: Condvar,
}

#[derive(Default)]
struct Buffered {
    lines: Vec<u8>,
    /// The writer waits on `changed` for lines (rather than napping or writing).
    writer_asleep: bool,
    /// Batches the writer has taken from `lines`, and of those, how many it has written.
    taken: u64,
    written: u64,
    dropped: u64,
}

/// The writer's pause after a write, during which lines gather for the next one.
const NAP: std::time::Duration = std::time::Duration::from_millis(1);

/// How long `flush` waits for stdout at most: a stalled reader must not keep the process
/// from exiting.
const FLUSH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// The default limit of the buffer of lines waiting for stdout, in bytes.
pub const DEFAULT_BUFFER_BYTES: usize = 8 << 20;

/// The buffer limit (`LOG_BUFFER_BYTES`); set once at start. Tests set it low to overflow the
/// buffer quickly.
static BUFFER_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_BUFFER_BYTES);

pub fn set_buffer_limit(bytes: usize) {
    BUFFER_LIMIT.store(bytes, Ordering::Relaxed);
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

fn output() -> &'static Output {
    OUTPUT.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(|| OUTPUT.wait().write_forever())
            .expect("start the log writer thread");
        Output { state: Mutex::new(Buffered::default()), changed: Condvar::new() }
    })
}

impl Output {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffered> {
        crate::sync::lock(&self.state)
    }

    fn append(&self, line: &[u8]) {
        let mut state = self.lock();
        if state.lines.len() + line.len() > BUFFER_LIMIT.load(Ordering::Relaxed) {
            state.dropped += 1;
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.lines.extend_from_slice(line);
        let wake_writer = std::mem::take(&mut state.writer_asleep);
        drop(state);
        if wake_writer {
            self.changed.notify_all();
        }
    }

    fn write_forever(&self) {
        let mut batch = Vec::new();
        loop {
            let mut state = self.lock();
            state.written = state.taken;
            self.changed.notify_all();
            if state.lines.is_empty() {
                drop(state);
                std::thread::sleep(NAP);
                state = self.lock();
            }
            while state.lines.is_empty() {
                state.writer_asleep = true;
                state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.writer_asleep = false;
            std::mem::swap(&mut batch, &mut state.lines);
            state.taken += 1;
            let dropped = std::mem::take(&mut state.dropped);
            drop(state);
            if dropped > 0 {
                let time = rfc3339_utc(SystemTime::now());
                let note = format!(
                    "{{\"time\":\"{time}\",\"level\":\"warn\",\"msg\":\"log lines dropped: stdout did not keep up\",\"dropped\":{dropped}}}\n"
                );
                batch.extend_from_slice(note.as_bytes());
            }
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&batch).and_then(|()| stdout.flush());
            batch.clear();
        }
    }

    /// Waits until the lines appended before this call are written (not those appended
    /// meanwhile), for `FLUSH_PATIENCE` at most.
    fn flush(&self) {
        let deadline = std::time::Instant::now() + FLUSH_PATIENCE;
        let mut state = self.lock();
        // Lines still buffered go out with the next batch; else the one being written is last.
        let target = if state.lines.is_empty() { state.taken } else { state.taken + 1 };
        while state.written < target {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else { return };
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }
}

/// `2026-11-25T16:31:35.123Z`: RFC 3339 in UTC with milliseconds.
pub fn rfc3339_utc(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339_utc(leap_day), "2024-02-29T12:34:56.789Z");
    }
}
