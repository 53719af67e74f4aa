//! A collector for the tests: an OTLP/HTTP receiver on 127.0.0.1 that decodes the protobuf
//! the service sends (`ExportTraceServiceRequest`, with the OpenTelemetry project's own
//! generated types) and keeps every span, flattened for assertions.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value::Value},
};
use prost::Message;

use super::wait;

/// A span as the collector received it; ids in lowercase hex, as in `traceparent`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a span that starts its trace.
    pub parent_span_id: String,
    pub trace_state: String,
    pub name: String,
    /// 1 internal, 2 server, 3 client (OTLP's `SpanKind`).
    pub kind: i32,
    /// The span's attributes, each value as text.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each span it links to.
    pub links: Vec<(String, String)>,
    /// 2 when the span is an error (OTLP's `STATUS_CODE_ERROR`).
    pub status_code: i32,
    /// The resource's attributes (`service.name`, ...).
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The receiver; it stops when dropped.
pub struct OtlpReceiver {
    pub address: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Export requests received (each a batch of spans), and with a body that did not decode.
    requests: Arc<Mutex<(usize, usize)>>,
    server: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let address = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new((0, 0)));
        let server = tokio::spawn({
            let (spans, requests) = (spans.clone(), requests.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let (spans, requests) = (spans.clone(), requests.clone());
                    let service = service_fn(move |request| receive(request, spans.clone(), requests.clone()));
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                    );
                }
            }
        });
        OtlpReceiver { address, spans, requests, server }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// (export requests received, of which did not decode).
    pub fn requests(&self) -> (usize, usize) {
        *self.requests.lock().unwrap()
    }

    /// Waits until the spans received satisfy `done` (bounded); returns them.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        wait::until(what, Duration::from_secs(20), || async { done(&self.spans()) }).await;
        self.spans()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    request: Request<hyper::body::Incoming>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<(usize, usize)>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path_ok = request.uri().path() == "/v1/traces";
    let protobuf = request.headers().get("content-type").is_some_and(|v| v == "application/x-protobuf");
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let decoded = ExportTraceServiceRequest::decode(body.as_ref());
    let mut counts = requests.lock().unwrap();
    counts.0 += 1;
    let Some(export) = decoded.ok().filter(|_| path_ok && protobuf) else {
        counts.1 += 1;
        return Ok(Response::builder().status(400).body(Full::new(Bytes::new())).unwrap());
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in export.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(r.attributes)).unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    trace_state: span.trace_state,
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(span.attributes),
                    links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
                    status_code: span.status.map_or(0, |status| status.code),
                    resource: resource.clone(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse: zero bytes of protobuf.
    Ok(Response::builder().header("content-type", "application/x-protobuf").body(Full::new(Bytes::new())).unwrap())
}

fn attributes(list: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>) -> BTreeMap<String, String> {
    list.into_iter().map(|kv| (kv.key, kv.value.map(text).unwrap_or_default())).collect()
}

fn text(value: AnyValue) -> String {
    match value.value {
        Some(Value::StringValue(s)) => s,
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
