//! Structured logs: one JSON object per line on stdout, where container runtimes collect them.
//!
//! Hand-rolled rather than `tracing`: the service logs two kinds of thing (one line per
//! request, and start/stop/failure events), which took a dozen lines with the dependencies it
//! already had. It has since grown to about 300 lines: a line formatter, a writer thread with
//! a bounded buffer that drops and counts lines while stdout is stalled, and a flush with a
//! time limit at exit. `tracing-subscriber`'s JSON output with `tracing-appender`'s
//! non-blocking (lossy, bounded) writer would now do most of this; it stays hand-rolled
//! because it works and is tested, not because it is the smaller choice any more.

use std::{
    io::Write,
    sync::{
        Condvar, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(value: &str) -> Option<Level> {
        match value.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

tokio::task_local! {
    /// The id of the request being served, set by the HTTP layer around each handler, so that
    /// every line logged while serving it carries its `request_id`.
    pub static REQUEST_ID: String;
}

/// The most verbose level written; set once at start.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Writes `{"time","level","msg", ...fields}` as one line. `fields` must serialize to a JSON
/// object (a `json!({...})` or a struct); anything else is logged under `"fields"`.
pub fn event(level: Level, msg: &str, fields: impl Serialize) {
    if enabled(level) {
        // Appended whole, so lines from concurrent requests never interleave.
        output().append(&format_line(level, msg, &fields));
    }
}

/// One log line, newline included.
fn format_line(level: Level, msg: &str, fields: &impl Serialize) -> Vec<u8> {
    // time, level, msg (and request_id) first, for people reading the stream; then the
    // event's own fields. Written into one buffer: this runs for every request.
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"time\":\"");
    line.extend_from_slice(rfc3339_utc(SystemTime::now()).as_bytes());
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(level.name().as_bytes());
    line.extend_from_slice(b"\",\"msg\":");
    let _ = serde_json::to_writer(&mut line, msg);
    let _ = REQUEST_ID.try_with(|request_id| {
        line.extend_from_slice(b",\"request_id\":");
        serde_json::to_writer(&mut line, request_id)
    });
    let fields_start = line.len();
    match serde_json::to_writer(&mut line, fields) {
        // An object: its members join the line's ({"a":1} -> ,"a":1}).
        Ok(()) if line[fields_start] == b'{' && line.len() - fields_start > 2 => line[fields_start] = b',',
        Ok(()) if line[fields_start..] == *b"{}" || line[fields_start..] == *b"null" => {
            line.truncate(fields_start);
            line.push(b'}');
        }
        Ok(()) => {
            let other = line.split_off(fields_start);
            line.extend_from_slice(b",\"fields\":");
            line.extend_from_slice(&other);
            line.push(b'}');
        }
        Err(e) => {
            line.truncate(fields_start);
            line.extend_from_slice(b",\"fields_error\":");
            let _ = serde_json::to_writer(&mut line, &e.to_string());
            line.push(b'}');
        }
    }
    line.push(b'\n');
    line
}

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

pub fn error(msg: &str, fields: impl Serialize) {
    event(Level::Error, msg, fields)
}

pub fn warn(msg: &str, fields: impl Serialize) {
    event(Level::Warn, msg, fields)
}

pub fn info(msg: &str, fields: impl Serialize) {
    event(Level::Info, msg, fields)
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
    fn an_event_is_one_json_object_with_its_fields_after_the_head() {
        let mut captured = Vec::new();
        let line = |fields: serde_json::Value| {
            let before = String::from_utf8(format_line(Level::Warn, "said \"hi\"", &fields)).unwrap();
            serde_json::from_str::<serde_json::Value>(before.trim_end()).map(|v| (before, v))
        };
        for fields in [
            serde_json::json!({"a": 1, "b": "x"}),
            serde_json::json!({}),
            serde_json::json!(null),
            serde_json::json!([1, 2]),
        ] {
            let (text, value) = line(fields.clone()).unwrap();
            assert!(text.starts_with(r#"{"time":""#) && text.ends_with("}\n"), "{text}");
            assert_eq!(value["level"], "warn");
            assert_eq!(value["msg"], "said \"hi\"");
            captured.push(value);
        }
        assert_eq!(
            (captured[0]["a"].clone(), captured[0]["b"].clone()),
            (serde_json::json!(1), serde_json::json!("x"))
        );
        assert_eq!(captured[1].as_object().unwrap().len(), 3);
        assert_eq!(captured[3]["fields"], serde_json::json!([1, 2]));
    }

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339_utc(leap_day), "2024-02-29T12:34:56.789Z");
    }
}
