//! Structured logs: one JSON object per line on stdout, where container runtimes collect them.
//!
//! Hand-rolled rather than `tracing` because the service logs two kinds of thing (one line per
//! request, and start/stop/failure events) and a dozen lines of code do that with the
//! dependencies it already has.

use std::{
    io::Write,
    sync::atomic::{AtomicU8, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::Value;

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
    if !enabled(level) {
        return;
    }
    // time, level and msg first, for people reading the stream; then the event's own fields.
    #[derive(Serialize)]
    struct Head<'a> {
        time: String,
        level: &'static str,
        msg: &'a str,
    }
    #[derive(Serialize)]
    struct HeadWithRequest<'a> {
        time: String,
        level: &'static str,
        msg: &'a str,
        request_id: &'a str,
    }
    let time = rfc3339_utc(SystemTime::now());
    let head = REQUEST_ID
        .try_with(|request_id| {
            serde_json::to_string(&HeadWithRequest { time: time.clone(), level: level.name(), msg, request_id })
        })
        .unwrap_or_else(|_| serde_json::to_string(&Head { time, level: level.name(), msg }));
    let mut line = head.unwrap_or_default();
    line.pop(); // the closing brace
    match serde_json::to_string(&fields) {
        Ok(fields) if fields.starts_with('{') && fields.len() > 2 => {
            line.push(',');
            line.push_str(&fields[1..]);
        }
        Ok(fields) if fields == "{}" || fields == "null" => line.push('}'),
        Ok(other) => line.push_str(&format!(",\"fields\":{other}}}")),
        Err(e) => line.push_str(&format!(",\"fields_error\":{}}}", Value::String(e.to_string()))),
    }
    line.push('\n');
    // One write of the whole line, so lines from concurrent requests never interleave.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
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
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339_utc(leap_day), "2024-02-29T12:34:56.789Z");
    }
}
