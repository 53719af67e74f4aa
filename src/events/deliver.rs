//! One delivery attempt: `POST` of the event to the endpoint, signed (Standard Webhooks 1.0),
//! over a connection to an address the guard allowed, within `WEBHOOK_TIMEOUT_MS` from
//! connecting to the end of the answer. Any 2xx delivers; 410 disables the endpoint; anything
//! else (a redirect, which is not followed; another status; a timeout; a refused or failed
//! connection) is retried on the schedule. At most `MAX_ANSWER_BYTES` of an answer are read.
//!
//! Connections are kept open and reused for an endpoint's next deliveries (HTTP/1.1
//! keep-alive), one request at a time each, so a busy endpoint costs no handshake per event;
//! an answer not read to its end closes its connection.
//!
//! With traces on, each attempt is a client span (a trace of its own: the attempt is not made
//! while serving a request) and its `traceparent` goes out with the event, so a receiver that
//! traces joins the trace.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    client::conn::http1::{self, SendRequest},
    header,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, field::Empty};

use super::{guard::Guard, schedule, sign};
use crate::{
    db::{AttemptRecord, Claimed, Outcome},
    domain::{Scheme, WebhookUrl},
    sync::lock,
    telemetry,
};

/// Most bytes of an endpoint's answer read; a longer one closes the connection.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Most characters of an answer kept with a failed attempt, to say what the endpoint said.
const ANSWER_EXCERPT: usize = 200;

/// Where a connection goes: scheme, host, port.
type Destination = (Scheme, String, u16);

/// An open connection to an endpoint, for one request at a time.
type Connection = SendRequest<Full<Bytes>>;

/// How a delivery reaches its endpoint.
pub struct Sender {
    guard: Guard,
    tls: TlsConnector,
    allow_http: bool,
    timeout: Duration,
    retry_scale: f64,
    /// Idle kept-alive connections, per destination.
    idle: Mutex<HashMap<Destination, Vec<Connection>>>,
}

/// How a delivery reaches its endpoint: the settings.
#[derive(Debug, Clone)]
pub struct SendSettings {
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
    pub timeout: Duration,
    pub retry_scale: f64,
    /// `WEBHOOK_CA_FILE`: the CA certificates https endpoints are checked against, instead of
    /// the system's.
    pub ca_file: Option<String>,
}

impl Sender {
    pub fn new(settings: &SendSettings) -> Result<Sender, String> {
        let roots = crate::tls::roots(settings.ca_file.as_deref())?;
        let tls = crate::tls::client_config(crate::tls::Verify::Full(roots))?;
        Ok(Sender {
            guard: Guard::new(&settings.allowed_hosts),
            tls: TlsConnector::from(Arc::new(tls)),
            allow_http: settings.allow_http,
            timeout: settings.timeout,
            retry_scale: settings.retry_scale,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// Makes one attempt of `claimed` and says what became of it.
    pub async fn attempt(&self, claimed: &Claimed) -> AttemptRecord {
        let span = tracing::info_span!(
            target: "order_api::events",
            "webhook attempt",
            otel.name = "POST webhook",
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = "POST",
            http.response.status_code = Empty,
            "error.type" = Empty,
            webhook.endpoint_id = claimed.endpoint_id,
            webhook.event_id = claimed.event.id.as_str(),
            webhook.attempt = claimed.attempts + 1,
        );
        let started = Instant::now();
        let answered = tokio::time::timeout(self.timeout, self.send(claimed)).instrument(span.clone()).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let failed_attempts = claimed.attempts as u32 + 1;
        let (status, outcome, error) = match answered {
            Ok(Ok(answer)) if answer.status.is_success() => (Some(answer.status), Outcome::Delivered, None),
            Ok(Ok(answer)) if answer.status == StatusCode::GONE => {
                (Some(answer.status), Outcome::Disabled, Some(answer.describe()))
            }
            Ok(Ok(answer)) => {
                let asked = matches!(answer.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
                    .then_some(answer.retry_after)
                    .flatten();
                (Some(answer.status), self.retry(failed_attempts, asked), Some(answer.describe()))
            }
            Ok(Err(error)) => (None, self.retry(failed_attempts, None), Some(error)),
            Err(_elapsed) => {
                let error = format!("no answer within {} ms", self.timeout.as_millis());
                (None, self.retry(failed_attempts, None), Some(error))
            }
        };
        if let Some(status) = status {
            span.record("http.response.status_code", status.as_u16());
        }
        if outcome != Outcome::Delivered {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", status.as_ref().map_or("no answer", StatusCode::as_str));
        }
        AttemptRecord {
            delivery_id: claimed.delivery_id,
            endpoint_id: claimed.endpoint_id,
            lease: claimed.lease,
            status: status.map(|status| i32::from(status.as_u16())),
            latency_ms,
            outcome,
            error,
        }
    }

    fn retry(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Outcome {
        match schedule::next_delay(failed_attempts, retry_after, self.retry_scale) {
            Some(delay) => Outcome::Retry(delay),
            None => Outcome::Failed,
        }
    }

    async fn send(&self, claimed: &Claimed) -> Result<Answer, String> {
        let url = WebhookUrl::parse(&claimed.url, self.allow_http).map_err(|e| e.body().error)?;
        let body = serde_json::to_vec(&claimed.event).map_err(|e| format!("the event cannot be written: {e}"))?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs() as i64);
        let signature = sign::signature(&claimed.secrets, &claimed.event.id, timestamp, &body);
        let mut request = Request::post(url.path.as_str())
            .header(header::HOST, url.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("order-api/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", claimed.event.id.as_str())
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("the request cannot be made: {e}"))?;
        telemetry::context::inject(request.headers_mut());
        let destination = (url.scheme, url.host.clone(), url.port);
        let mut connection = match self.idle_connection(&destination) {
            Some(connection) => connection,
            None => self.connect(&url).await?,
        };
        let response = connection.send_request(request).await.map_err(|e| format!("sending failed: {e}"))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| schedule::parse_retry_after(value, SystemTime::now()));
        let (read_whole, excerpt) = match Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect().await {
            Ok(body) => (true, excerpt(&body.to_bytes())),
            Err(_) => (false, format!("(an answer over {MAX_ANSWER_BYTES} bytes, or cut off)")),
        };
        if read_whole {
            self.keep(destination, connection);
        }
        Ok(Answer { status, retry_after, excerpt })
    }

    fn idle_connection(&self, destination: &Destination) -> Option<Connection> {
        let mut idle = lock(&self.idle);
        let connections = idle.get_mut(destination)?;
        while let Some(connection) = connections.pop() {
            if !connection.is_closed() && connection.is_ready() {
                return Some(connection);
            }
        }
        None
    }

    fn keep(&self, destination: Destination, connection: Connection) {
        if !connection.is_closed() {
            lock(&self.idle).entry(destination).or_default().push(connection);
        }
    }

    /// A new connection to the first address of the endpoint's host that the guard allows:
    /// resolved now, so that what is connected to is what was checked.
    async fn connect(&self, url: &WebhookUrl) -> Result<Connection, String> {
        let addresses =
            self.guard.addresses(&url.host, url.port).await.map_err(|e| format!("destination refused: {e}"))?;
        let mut last_error = String::new();
        for address in addresses {
            let tcp = match TcpStream::connect(address).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    last_error = format!("cannot connect to {address}: {e}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            return match url.scheme {
                Scheme::Http => handshake(tcp).await,
                Scheme::Https => {
                    let name = ServerName::try_from(url.host.clone()).map_err(|e| format!("host {}: {e}", url.host))?;
                    let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS with {address}: {e}"))?;
                    handshake(tls).await
                }
            };
        }
        Err(last_error)
    }
}

async fn handshake<S>(stream: S) -> Result<Connection, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// What an endpoint answered.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    excerpt: String,
}

impl Answer {
    fn describe(&self) -> String {
        match self.excerpt.is_empty() {
            true => format!("answered {}", self.status),
            false => format!("answered {}: {}", self.status, self.excerpt),
        }
    }
}

/// The start of an answer's body, as text.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(ANSWER_EXCERPT).filter(|c| !c.is_control()).collect()
}
