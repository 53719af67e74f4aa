//! The request being served: its id and trace, carried by the task that serves it, so that
//! every log line written meanwhile names them; and the W3C Trace Context
//! (`traceparent`/`tracestate`) read from a request and written into outbound ones.
//!
//! A task-local rather than fields of the request's `tracing` span: with tracing off there
//! is no span (nothing is created that nobody exports), yet a request's lines still carry its
//! id, and the caller's trace id when a `traceparent` came in.

use std::future::Future;

use hyper::{HeaderMap, Method};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{IdGenerator, RandomIdGenerator},
};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

tokio::task_local! {
    /// Set by the HTTP layer around each request (its handler task and its log line).
    static CURRENT: RequestContext;
}

/// What every log line written while serving a request carries.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// `X-Request-Id`, the client's or a new one.
    pub request_id: String,
    /// The request's trace: the service's own span's when tracing is on, else the caller's
    /// (`traceparent`), else none.
    pub trace_id: Option<TraceId>,
    /// The service's span of this request, when tracing is on.
    pub span_id: Option<SpanId>,
    /// The caller's span (from `traceparent`/`tracestate`), passed on as it came to outbound
    /// requests when the service has no span of its own (tracing off).
    remote: Option<SpanContext>,
}

impl RequestContext {
    /// Runs `f` with the context of the request being served, if there is one.
    pub fn with_current(f: impl FnOnce(&RequestContext)) {
        let _ = CURRENT.try_with(f);
    }

    /// `future` with this context current while it runs (a task-local: give a spawned task
    /// its own `scope`).
    pub fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, future)
    }

    /// `f` with this context current.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self.clone(), f)
    }

    #[cfg(test)]
    pub fn for_test(request_id: &str, trace_id: &str, span_id: &str) -> RequestContext {
        RequestContext {
            request_id: request_id.to_owned(),
            trace_id: TraceId::from_hex(trace_id).ok(),
            span_id: SpanId::from_hex(span_id).ok(),
            remote: None,
        }
    }
}

/// The caller's span context from `traceparent` (and `tracestate`), when a valid one came in.
pub fn incoming(headers: &HeaderMap) -> Option<SpanContext> {
    // Most requests have none: then not even an empty Context is made.
    if !headers.contains_key("traceparent") {
        return None;
    }
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Starts serving a request: its span (when tracing is on, the request is sampled and
/// `traced`: not for probes and scrapes, which would fill a trace store with nothing), child
/// of the caller's span when a valid `traceparent` came in, and the context its log lines
/// carry.
pub fn start_request(
    method: &Method,
    route: &'static str,
    request_id: String,
    headers: &HeaderMap,
    peer: std::net::IpAddr,
    traced: bool,
) -> (Span, RequestContext) {
    let remote = incoming(headers);
    // Sampled or not is decided here, once per request: an unsampled request makes no span
    // (nor do its round trips, nor a batch of unsampled requests), so at a 1 % ratio 99 % of
    // the requests cost only this decision.
    let Some(sampler) = super::sampler() else {
        // Tracing off: the caller's trace for the log lines, passed on as it came.
        let trace_id = remote.as_ref().map(SpanContext::trace_id);
        return (Span::none(), RequestContext { request_id, trace_id, span_id: None, remote });
    };
    if !traced || !sampler.decide(remote.as_ref()) {
        // Not recorded: the caller's trace, or a new one (not sampled) that the log lines and
        // outbound requests carry.
        let ids = RandomIdGenerator::default();
        let remote = remote.unwrap_or_else(|| {
            SpanContext::new(ids.new_trace_id(), ids.new_span_id(), TraceFlags::default(), false, TraceState::NONE)
        });
        let trace_id = Some(remote.trace_id());
        return (Span::none(), RequestContext { request_id, trace_id, span_id: None, remote: Some(remote) });
    }
    let span = {
        // Attributes are recorded below, once the span is known to be recorded (a span
        // with no subscriber interested, as in tests, is not).
        tracing::info_span!(
            target: "order_api::http",
            "request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = Empty,
            http.route = Empty,
            http.response.status_code = Empty,
            "error.type" = Empty,
            client.address = Empty,
            request_id = Empty,
        )
    };
    if let Some(remote) = remote.as_ref().filter(|_| !span.is_disabled()) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote.clone()));
    }
    // The service's own span when tracing is on (a valid OpenTelemetry context), else the
    // caller's trace.
    let (trace_id, span_id) = match span_context(&span) {
        Some(own) => {
            if own.is_sampled() {
                span.record("http.request.method", method.as_str());
                span.record("http.route", route);
                span.record("client.address", tracing::field::display(peer));
                span.record("request_id", request_id.as_str());
            }
            (Some(own.trace_id()), Some(own.span_id()))
        }
        None => (remote.as_ref().map(SpanContext::trace_id), None),
    };
    (span, RequestContext { request_id, trace_id, span_id, remote })
}

/// The span context of the current `tracing` span, when tracing is on and there is one:
/// what a batch links to, and what outbound requests name as their parent.
pub fn current_span_context() -> Option<SpanContext> {
    span_context(&Span::current())
}

/// `span`'s OpenTelemetry span context, when tracing is on.
fn span_context(span: &Span) -> Option<SpanContext> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then_some(own)
}

/// Whether `span` is recorded and exported (sampled): worth attributes that cost something
/// to make.
pub fn is_sampled(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// Writes `traceparent` (and `tracestate`) for an outbound request made now: the current
/// span as its parent when tracing is on (make the outbound call inside its own span, e.g. a
/// webhook attempt's), else the caller's context of the request being served, passed on as it
/// came; nothing when there is neither.
pub fn inject(headers: &mut HeaderMap) {
    let parent = current_span_context().or_else(|| CURRENT.try_with(|context| context.remote.clone()).ok().flatten());
    if let Some(parent) = parent {
        let context = opentelemetry::Context::new().with_remote_span_context(parent);
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (hyper::header::HeaderName::from_static(name), value.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_valid_traceparent_is_read_with_its_tracestate() {
        let incoming = incoming(&headers(&[
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("tracestate", "vendor=opaque"),
        ]))
        .unwrap();
        assert_eq!(incoming.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(incoming.span_id().to_string(), "00f067aa0ba902b7");
        assert!(incoming.is_sampled() && incoming.is_remote());
        assert_eq!(incoming.trace_state().header(), "vendor=opaque");
    }

    #[test]
    fn an_invalid_or_missing_traceparent_is_none() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "not a traceparent",
        ] {
            assert!(incoming(&headers(&[("traceparent", bad)])).is_none(), "{bad}");
        }
        assert!(incoming(&HeaderMap::new()).is_none());
    }

    /// With tracing off, an outbound request made while serving a request passes the caller's
    /// context on unchanged.
    #[test]
    fn with_tracing_off_the_callers_context_is_passed_on() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let request = headers(&[("traceparent", parent), ("tracestate", "vendor=opaque")]);
        let (span, context) = start_request(&Method::GET, "/x", "id".into(), &request, [127, 0, 0, 1].into(), true);
        assert!(span.is_disabled(), "no subscriber: no span");
        assert_eq!(context.trace_id.map(|id| id.to_string()).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let mut outbound = HeaderMap::new();
        context.in_scope(|| inject(&mut outbound));
        assert_eq!(outbound["traceparent"], parent);
        assert_eq!(outbound["tracestate"], "vendor=opaque");
        let mut elsewhere = HeaderMap::new();
        inject(&mut elsewhere);
        assert!(elsewhere.is_empty(), "outside a request, with tracing off: nothing to pass on");
    }
}
