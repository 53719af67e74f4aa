//! The log line: a `tracing` layer that writes each event as one JSON object,
//! `{"time","level","msg", request_id, trace_id, span_id, ...the event's fields}`, the shape the
//! hand-written logger had (and that log pipelines and the tests read), on the bounded writer.
//!
//! `tracing-subscriber`'s own JSON formatter was the alternative: it nests the event's fields
//! under `"fields"`, calls the message `"message"` and has no place for the request's ids
//! except as span fields, which would mean a span (and its registry slot) per request even
//! with tracing off. Here the ids come from the request's `RequestContext` (a task-local), so
//! logging costs what it did before: one buffer per line, one lock to append it.

use std::fmt::{self, Write as _};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{layer::Context, registry::LookupSpan};

use super::{context::RequestContext, writer};

/// Writes every event it is given (its filter decides which) as a JSON line.
pub struct JsonLines;

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for JsonLines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        writer::append(&format_line(event));
    }
}

/// One log line, newline included.
pub fn format_line(event: &Event<'_>) -> Vec<u8> {
    let mut fields = Fields { message: Vec::with_capacity(32), rest: Vec::with_capacity(160) };
    event.record(&mut fields);
    // time, level, msg and the request's ids first, for people reading the stream; then the
    // event's own fields.
    let mut line = Vec::with_capacity(96 + fields.message.len() + fields.rest.len());
    line.extend_from_slice(b"{\"time\":\"");
    line.extend_from_slice(writer::rfc3339_utc(std::time::SystemTime::now()).as_bytes());
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(level_name(*event.metadata().level()).as_bytes());
    line.extend_from_slice(b"\",\"msg\":\"");
    line.extend_from_slice(&fields.message);
    line.push(b'"');
    RequestContext::with_current(|context| {
        line.extend_from_slice(b",\"request_id\":");
        let _ = serde_json::to_writer(&mut line, &context.request_id);
        if let Some(trace_id) = context.trace_id {
            let _ = write!(Bytes(&mut line), ",\"trace_id\":\"{trace_id}\"");
        }
        if let Some(span_id) = context.span_id {
            let _ = write!(Bytes(&mut line), ",\"span_id\":\"{span_id}\"");
        }
    });
    line.extend_from_slice(&fields.rest);
    line.extend_from_slice(b"}\n");
    line
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The event's message (JSON-escaped, without quotes) and its other fields as `,"name":value`.
struct Fields {
    message: Vec<u8>,
    rest: Vec<u8>,
}

impl Fields {
    fn key(&mut self, field: &Field) -> &mut Vec<u8> {
        self.rest.extend_from_slice(b",\"");
        self.rest.extend_from_slice(field.name().as_bytes());
        self.rest.extend_from_slice(b"\":");
        &mut self.rest
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        let out = self.key(field);
        let _ = write!(Bytes(out), "{value}");
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = Escaped(&mut self.message).write_str(value);
            return;
        }
        let out = self.key(field);
        out.push(b'"');
        let _ = Escaped(out).write_str(value);
        out.push(b'"');
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(Escaped(&mut self.message), "{value:?}");
            return;
        }
        let out = self.key(field);
        out.push(b'"');
        let _ = write!(Escaped(out), "{value:?}");
        out.push(b'"');
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let out = self.key(field);
        out.push(b'"');
        let _ = write!(Escaped(out), "{value}");
        out.push(b'"');
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let out = self.key(field);
        // serde_json writes the shortest form that reads back exactly, and null for NaN and
        // the infinities, which JSON has no number for.
        let _ = serde_json::to_writer(out, &value);
    }
}

/// `fmt::Write` into bytes.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `fmt::Write` into bytes as the inside of a JSON string: quotes, backslashes and control
/// characters escaped, everything else as it is (UTF-8).
struct Escaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, byte) in s.bytes().enumerate() {
            let escape: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..0x20 | 0x7f => b"",
                _ => continue,
            };
            self.0.extend_from_slice(&s.as_bytes()[plain..i]);
            if escape.is_empty() {
                let _ = write!(Bytes(self.0), "\\u{byte:04x}");
            } else {
                self.0.extend_from_slice(escape);
            }
            plain = i + 1;
        }
        self.0.extend_from_slice(&s.as_bytes()[plain..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Captures formatted lines instead of writing them.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(String::from_utf8(format_line(event)).unwrap());
        }
    }

    fn captured(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
        tracing::subscriber::with_default(subscriber, log);
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .map(|line| {
                assert!(line.starts_with(r#"{"time":""#) && line.ends_with("}\n"), "{line}");
                serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("{e}: {line}"))
            })
            .collect()
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields_after_the_head() {
        let error = std::io::Error::other("disk \"full\"");
        let lines = captured(|| {
            tracing::warn!(a = 1, b = "x", c = 2.5, d = true, e = ?vec![1, 2], f = %"shown", "said \"hi\"\n");
            tracing::error!(error = &error as &dyn std::error::Error, "failed");
            tracing::info!("plain");
        });
        let first = &lines[0];
        assert_eq!((first["level"].as_str(), first["msg"].as_str()), (Some("warn"), Some("said \"hi\"\n")));
        assert_eq!((first["a"].as_i64(), first["b"].as_str(), first["c"].as_f64()), (Some(1), Some("x"), Some(2.5)));
        assert_eq!(
            (first["d"].as_bool(), first["e"].as_str(), first["f"].as_str()),
            (Some(true), Some("[1, 2]"), Some("shown"))
        );
        assert_eq!(lines[1]["error"], "disk \"full\"");
        assert_eq!(lines[2].as_object().unwrap().len(), 3, "time, level, msg: {}", lines[2]);
        assert!(lines[2]["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn control_characters_are_escaped() {
        let lines = captured(|| tracing::info!(text = "a\u{1}b\u{7f}c\td", "m"));
        assert_eq!(lines[0]["text"], "a\u{1}b\u{7f}c\td");
    }

    /// Inside a request, every line carries its ids.
    #[test]
    fn lines_inside_a_request_carry_its_request_and_trace_ids() {
        let context = RequestContext::for_test("req-1", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let lines = captured(|| context.in_scope(|| tracing::info!(n = 1, "inside")));
        let line = &lines[0];
        assert_eq!(line["request_id"], "req-1");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"], "00f067aa0ba902b7");
        assert_eq!(line["n"], 1);
    }
}
