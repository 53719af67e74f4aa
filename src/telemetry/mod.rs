//! Logs and traces, both through `tracing`.
//!
//! - **Logs**: every `tracing` event the filter lets through is one JSON line on stdout
//!   (`json`), with the ids of the request being served (`context`), written by a thread of its
//!   own through a bounded buffer (`writer`). The filter is `RUST_LOG` when set (per-module
//!   directives such as `info,order_api::db=debug`), else `LOG_LEVEL` for everything.
//! - **Traces**: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, the
//!   service's spans (the request, the batch it joined, each database round trip) go to
//!   `tracing-opentelemetry` and out over OTLP/HTTP (`otlp`). When it is not, no layer wants a
//!   span, so `info_span!` makes none: nothing is recorded, nothing is slowed beyond the check.
//!
//! ## Spans, and how to add one
//! Spans are `tracing` spans at `info` under the crate's targets (`order_api::...`); the
//! `otel.*` fields are read by `tracing-opentelemetry` (`otel.name`, `otel.kind`,
//! `otel.status_code`), the others become attributes. A new kind of work (a webhook attempt)
//! gets its span like this, with `Instrument::instrument` on its future:
//!
//! ```ignore
//! let span = tracing::info_span!("webhook attempt", otel.kind = "client", otel.status_code = Empty,
//!     http.request.method = "POST", url.full = %url, http.response.status_code = Empty);
//! async { telemetry::context::inject(request.headers_mut()); send(request).await }.instrument(span).await
//! ```
//!
//! A span made in a task of its own starts a trace unless given a parent (`parent:` in the
//! macro, or `OpenTelemetrySpanExt::set_parent`); work done for several requests at once
//! starts its own trace and links to theirs (`db::batch`).

pub mod context;
mod json;
pub mod otlp;
mod writer;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Dispatch, Metadata, level_filters::LevelFilter, subscriber::Interest};
use tracing_subscriber::{
    Layer,
    filter::Targets,
    layer::{Context, Filter, SubscriberExt},
};

use crate::config::Config;

pub use writer::{DEFAULT_BUFFER_BYTES, flush as flush_logs, rfc3339_utc};

/// How long the spans still queued at exit are given to reach the collector.
const TRACE_FLUSH_PATIENCE: Duration = Duration::from_secs(3);

/// Log lines dropped since start because stdout did not keep up.
pub fn dropped_log_lines() -> u64 {
    writer::dropped_total()
}

/// Logs and traces as set up at start; `shutdown` sends what is still queued.
pub struct Telemetry {
    /// Present when traces are exported.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sets up logs and traces for the whole process (`main`). Trace exports run on `runtime`.
    pub fn install(config: &Config, runtime: &tokio::runtime::Handle) -> Result<Telemetry, String> {
        writer::set_buffer_limit(config.log_buffer_bytes);
        let (dispatch, telemetry) = Telemetry::build(config, runtime)?;
        tracing::dispatcher::set_global_default(dispatch).map_err(|e| format!("installing the logger: {e}"))?;
        Ok(telemetry)
    }

    /// The subscriber without installing it: tests make it the default of their own thread.
    pub fn build(config: &Config, runtime: &tokio::runtime::Handle) -> Result<(Dispatch, Telemetry), String> {
        let logs = json::JsonLines.with_filter(EventsOnly(config.log_filter()));
        let provider = otlp::provider(&config.traces, runtime)?;
        let traces = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("order-api"))
                // A span's OpenTelemetry context is looked up through the `tracing` span when
                // needed (a child, a link), instead of being attached to the thread at every
                // poll of the future it instruments.
                .with_context_activation(false)
                .with_tracked_inactivity(false)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_level(false)
                .with_filter(ServiceSpans { sampler: config.traces.sampler })
        });
        // Two types rather than an `Option` layer: a `None` layer counts as interested in every
        // callsite, which would make the registry create every span, for nobody.
        let dispatch = match traces {
            Some(traces) => Dispatch::new(tracing_subscriber::registry().with(logs).with(traces)),
            None => Dispatch::new(tracing_subscriber::registry().with(logs)),
        };
        Ok((dispatch, Telemetry { provider }))
    }

    /// Whether spans are exported.
    pub fn traces_exported(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every finished span now (waits for it); tests call it before they look.
    pub fn flush_traces(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }

    /// Before the process exits: the queued spans are sent (for `TRACE_FLUSH_PATIENCE` at
    /// most: a collector that does not answer must not hold the exit), then the log lines.
    /// The runtime must still be running: the export is one of its tasks.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = provider.shutdown_with_timeout(TRACE_FLUSH_PATIENCE);
        }
        writer::flush();
    }
}

/// The sampler of the current subscriber's traces; None when traces are not exported.
pub fn sampler() -> Option<otlp::SamplerSetting> {
    tracing::dispatcher::get_default(|dispatch| dispatch.downcast_ref::<ServiceSpans>().map(|spans| spans.sampler))
}

/// The log layer's filter: events only (spans are the traces' business), as `Targets` says.
struct EventsOnly(Targets);

impl<S> Filter<S> for EventsOnly {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        meta.is_event() && self.0.would_enable(meta.target(), meta.level())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.is_event() && self.0.would_enable(meta.target(), meta.level()) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        <Targets as Filter<S>>::max_level_hint(&self.0)
    }
}

/// The traces layer's filter: the service's own spans (at `info`), not events (a request's
/// outcome is on its span's attributes; its log line is in the log). It also carries the
/// sampler (`sampler()` finds it through the subscriber), so that each subscriber, a test's
/// own included, has its own.
struct ServiceSpans {
    sampler: otlp::SamplerSetting,
}

impl ServiceSpans {
    fn wants(meta: &Metadata<'_>) -> bool {
        meta.is_span() && meta.target().starts_with("order_api") && *meta.level() <= tracing::Level::INFO
    }
}

impl<S> Filter<S> for ServiceSpans {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        ServiceSpans::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if ServiceSpans::wants(meta) { Interest::always() } else { Interest::never() }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        Config::from_lookup(|name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())).unwrap()
    }

    /// Tracing off: the service's spans are not even created (no layer wants them), so
    /// instrumented code pays only the check.
    #[test]
    fn with_tracing_off_no_span_is_created() {
        // A runtime with threads of its own: the exporter's last send (at drop) runs there.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (dispatch, telemetry) = Telemetry::build(&config(&[]), runtime.handle()).unwrap();
        assert!(!telemetry.traces_exported());
        tracing::dispatcher::with_default(&dispatch, || {
            assert!(tracing::info_span!(target: "order_api::http", "request").is_disabled());
        });
        let endpoint = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")];
        let (dispatch, telemetry) = Telemetry::build(&config(&endpoint), runtime.handle()).unwrap();
        assert!(telemetry.traces_exported());
        tracing::dispatcher::with_default(&dispatch, || {
            assert!(!tracing::info_span!(target: "order_api::http", "request").is_disabled());
            assert!(tracing::info_span!(target: "hyper", "theirs").is_disabled(), "only the service's spans");
        });
        let disabled = [endpoint[0], ("OTEL_SDK_DISABLED", "true")];
        let (_, telemetry) = Telemetry::build(&config(&disabled), runtime.handle()).unwrap();
        assert!(!telemetry.traces_exported());
    }
}
