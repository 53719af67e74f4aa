//! Traces out: OTLP over HTTP (protobuf) to the collector of `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! sampled as `OTEL_TRACES_SAMPLER` says (decided where a request comes in: an unsampled
//! request makes no span at all), through the OpenTelemetry SDK's batch span processor
//! (a thread of its own: a request only queues its finished span, and a full queue drops
//! spans rather than waiting).
//!
//! The HTTP client is hyper's, already in the build (and tokio-rustls for an `https`
//! collector), not the `reqwest` client `opentelemetry-otlp` brings by default: that would be
//! a second HTTP stack and, with its default TLS, OpenSSL, which the static image cannot have.
//! One connection per export: the processor sends at most one batch every few seconds
//! (`OTEL_BSP_SCHEDULE_DELAY`, 5 s) or per 512 spans.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Bytes,
    header::{self, HeaderValue},
    http::{Request, Response},
};
use hyper_util::rt::TokioIo;
use opentelemetry::{KeyValue, trace::SpanContext};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    runtime::Handle,
};
use tokio_rustls::TlsConnector;

use crate::{
    auth::Secret,
    tls::{self, Verify},
};

/// The traces' settings (`OTEL_*`), read by `config`.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Where spans are sent: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`. None: tracing is off.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: sent with every export (a collector's API key: secret).
    pub headers: Vec<(String, Secret)>,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: the CA certificates (PEM) of an `https` collector;
    /// the system's when unset.
    pub certificate: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`: more attributes of the service (environment, pod, ...).
    pub resource_attributes: Vec<(String, String)>,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: SamplerSetting,
    /// `OTEL_SDK_DISABLED`: nothing exported, whatever the endpoint.
    pub disabled: bool,
}

impl Default for TraceSettings {
    fn default() -> TraceSettings {
        TraceSettings {
            endpoint: None,
            headers: Vec::new(),
            certificate: None,
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
            resource_attributes: Vec::new(),
            sampler: SamplerSetting::default(),
            disabled: false,
        }
    }
}

impl TraceSettings {
    /// Whether spans are made and exported.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some() && !self.disabled
    }
}

pub const DEFAULT_SERVICE_NAME: &str = "order-api";

/// The sampler of `OTEL_TRACES_SAMPLER` (the specification's names; the default,
/// `parentbased_always_on`, records every trace).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSetting {
    /// `parentbased_*`: a span with a parent (a caller's `traceparent`, or a span of this
    /// service) is sampled as its parent was; only new traces are decided by `root`.
    pub parent_based: bool,
    pub root: RootSampler,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    /// This fraction of traces, decided by the trace id (the same decision in every service
    /// that uses the trace id ratio).
    Ratio(f64),
}

impl Default for SamplerSetting {
    fn default() -> SamplerSetting {
        SamplerSetting { parent_based: true, root: RootSampler::AlwaysOn }
    }
}

impl SamplerSetting {
    /// `OTEL_TRACES_SAMPLER` and its `OTEL_TRACES_SAMPLER_ARG` (a ratio from 0 to 1, for the
    /// ratio samplers; 1 when unset).
    pub fn parse(name: &str, arg: Option<&str>) -> Option<SamplerSetting> {
        let ratio = match arg {
            None => 1.0,
            Some(arg) => arg.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r))?,
        };
        let (parent_based, root) = match name {
            "always_on" => (false, RootSampler::AlwaysOn),
            "always_off" => (false, RootSampler::AlwaysOff),
            "traceidratio" => (false, RootSampler::Ratio(ratio)),
            "parentbased_always_on" => (true, RootSampler::AlwaysOn),
            "parentbased_always_off" => (true, RootSampler::AlwaysOff),
            "parentbased_traceidratio" => (true, RootSampler::Ratio(ratio)),
            _ => return None,
        };
        Some(SamplerSetting { parent_based, root })
    }

    /// Whether a request is recorded, decided where it comes in (see `telemetry::context`):
    /// `caller` is the span context of its `traceparent`, if a valid one came.
    pub fn decide(self, caller: Option<&SpanContext>) -> bool {
        if let Some(caller) = caller.filter(|_| self.parent_based) {
            return caller.is_sampled();
        }
        match self.root {
            RootSampler::AlwaysOn => true,
            RootSampler::AlwaysOff => false,
            RootSampler::Ratio(ratio) => {
                // As the specification's TraceIdRatioBased: the low 63 bits of the trace id
                // under the ratio, so that every service agrees on the caller's trace; a new
                // trace's id is not made yet, so a random number stands in for it.
                let random = match caller {
                    Some(caller) => {
                        u64::from_be_bytes(caller.trace_id().to_bytes()[8..].try_into().unwrap_or_default())
                    }
                    None => u64::from_be_bytes(RandomIdGenerator::default().new_span_id().to_bytes()),
                };
                (random >> 1) < (ratio.max(0.0) * (1u64 << 63) as f64) as u64
            }
        }
    }
}

/// How long one export (connection, request, answer) may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes of a collector's answer read (an OTLP answer is a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A failed export is logged at most this often (with the count since the last line).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The tracer provider exporting to the configured collector, or None when tracing is off.
/// Its HTTP requests run on `runtime`.
pub fn provider(settings: &TraceSettings, runtime: &Handle) -> Result<Option<SdkTracerProvider>, String> {
    let Some(endpoint) = settings.endpoint.as_deref().filter(|_| settings.enabled()) else { return Ok(None) };
    let transport = Transport::new(runtime.clone(), settings.certificate.as_deref())?;
    let headers: HashMap<String, String> =
        settings.headers.iter().map(|(name, value)| (name.clone(), value.expose().to_owned())).collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(transport)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_headers(headers)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let mut resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", crate::VERSION));
    for (key, value) in &settings.resource_attributes {
        if key != "service.name" {
            resource = resource.with_attribute(KeyValue::new(key.clone(), value.clone()));
        }
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            // Sampling is decided where a request comes in (`SamplerSetting::decide`): a span
            // made at all is a span wanted, and so is every span under it.
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Sends the exporter's requests with hyper on the service's runtime. The exporter runs on
/// the batch processor's thread and waits there; the request itself is a task on `runtime`,
/// like every other socket of the service.
#[derive(Clone)]
struct Transport {
    runtime: Handle,
    tls: TlsConnector,
    failures: Arc<Failures>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Transport(hyper)")
    }
}

impl Transport {
    fn new(runtime: Handle, ca_file: Option<&str>) -> Result<Transport, String> {
        let config = tls::client_config(Verify::Full(tls::roots(ca_file)?))?;
        Ok(Transport { runtime, tls: TlsConnector::from(Arc::new(config)), failures: Arc::default() })
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, String> {
        let uri = request.uri().clone();
        let host = uri.host().ok_or("the endpoint has no host")?.trim_start_matches('[').trim_end_matches(']');
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the endpoint is not an http or https URL".into()),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let (mut parts, body) = request.into_parts();
        parts.uri = uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|e| format!("{e}"))?;
        parts.headers.insert(header::HOST, HeaderValue::from_str(&authority).map_err(|e| e.to_string())?);
        let request = Request::from_parts(parts, Full::new(body));
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if https {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("host {host}: {e}"))?;
            let stream = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
            exchange(stream, request).await
        } else {
            exchange(tcp, request).await
        }
    }
}

/// One request and its whole answer on a new HTTP/1.1 connection.
async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|e| format!("the answer: {e}"))?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let transport = self.clone();
        self.runtime.spawn(async move {
            let outcome = tokio::time::timeout(EXPORT_TIMEOUT, transport.send(request))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} s", EXPORT_TIMEOUT.as_secs())));
            transport.failures.note(&outcome);
            let _ = answer.send(outcome);
        });
        match answered.await {
            Ok(outcome) => outcome.map_err(HttpError::from),
            Err(_) => Err("the export task ended without an answer (shutting down?)".into()),
        }
    }
}

/// Failed exports, logged at most once per `FAILURE_LOG_EVERY` so that a collector that is
/// down does not flood the log.
#[derive(Default)]
struct Failures {
    since_last_line: AtomicU64,
    /// Seconds since the epoch of the last line (0: none yet).
    last_line: AtomicU64,
}

impl Failures {
    fn note(&self, outcome: &Result<Response<Bytes>, String>) {
        let reason = match outcome {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => format!("the collector answered {}", response.status()),
            Err(reason) => reason.clone(),
        };
        let failed = self.since_last_line.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let last = self.last_line.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= FAILURE_LOG_EVERY.as_secs()
            && self.last_line.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.since_last_line.store(0, Ordering::Relaxed);
            tracing::warn!(error = %reason, failed_exports = failed, "trace export failed; its spans are lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_are_read_by_their_specification_names() {
        let parse = SamplerSetting::parse;
        assert_eq!(parse("parentbased_always_on", None), Some(SamplerSetting::default()));
        assert_eq!(
            parse("parentbased_traceidratio", Some("0.01")),
            Some(SamplerSetting { parent_based: true, root: RootSampler::Ratio(0.01) })
        );
        assert_eq!(
            parse("traceidratio", None),
            Some(SamplerSetting { parent_based: false, root: RootSampler::Ratio(1.0) })
        );
        assert_eq!(parse("always_off", None).unwrap().root, RootSampler::AlwaysOff);
        assert_eq!(parse("parentbased_traceidratio", Some("1.5")), None);
        assert_eq!(parse("jaeger_remote", None), None);
    }

    #[test]
    fn the_decision_follows_the_caller_when_parent_based_and_the_ratio_otherwise() {
        use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
        let caller = |sampled: bool, trace: u128| {
            let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            SpanContext::new(TraceId::from(trace), SpanId::from(1), flags, true, TraceState::NONE)
        };
        let ratio = |parent_based, r| SamplerSetting { parent_based, root: RootSampler::Ratio(r) };
        assert!(ratio(true, 0.0).decide(Some(&caller(true, 7))));
        assert!(!ratio(true, 1.0).decide(Some(&caller(false, 7))));
        assert!(!ratio(true, 0.0).decide(None) && ratio(true, 1.0).decide(None));
        // Not parent-based: the caller's trace id decides, as in every other service.
        assert!(ratio(false, 0.5).decide(Some(&caller(false, 1))), "low 63 bits 0 < half");
        assert!(!ratio(false, 0.5).decide(Some(&caller(true, u64::MAX as u128))));
        let sampled = (0..10_000).filter(|_| ratio(false, 0.25).decide(None)).count();
        assert!((2_000..3_000).contains(&sampled), "{sampled} of 10,000 at 25 %");
    }
}
