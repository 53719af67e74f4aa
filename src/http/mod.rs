//! The HTTP server, generic machinery that knows nothing of orders: the accept loop,
//! per-connection limits, graceful shutdown, and around each request its id, its deadline,
//! its log line and its metrics. What a request means is `api`'s: the route table
//! (`api::routes`) and the handlers.

mod linger;
pub mod request_id;

use std::{
    convert::Infallible,
    future::Future,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Method, Request,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    api::{
        AppState,
        reply::{self, Reply},
        routes,
    },
    deadline,
    error::{Error, RETRY_AFTER_SECS},
    memory, telemetry,
};
use tracing::{Instrument, Level};

/// Connections past `MAX_CONNECTIONS` answered with a 503 at the same time; more are closed.
const MAX_REFUSALS_AT_ONCE: usize = 64;

/// Most bytes of a request's head (request line and headers): past it hyper answers 431 and
/// the connection closes (lingering: see `linger`). Real requests use a few hundred bytes, a large JWT some kilobytes; hyper's own
/// bound (its ~400 KB read buffer) would let each connection make the server hold far more.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Pause after a failed accept (typically EMFILE, out of file descriptors) before the next
/// one, so the loop does not spin while descriptors are short.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long a refused connection is given to send its request, and then to close its side.
const REFUSAL_PATIENCE: Duration = Duration::from_millis(200);

/// Most bytes of a refused connection's request read before answering: the headers of any
/// sane request, never a body worth buffering.
const REFUSAL_READ_LIMIT: usize = 16 * 1024;

/// Bytes read from a refused connection at a time.
const REFUSAL_READ_CHUNK: usize = 4096;

/// How long past its deadline a handler may take to cancel its transaction and report the
/// real outcome before it is abandoned.
const DEADLINE_BACKSTOP: Duration = Duration::from_secs(2);

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, then stops accepting, lets
/// in-flight requests finish (up to the configured grace period) and returns.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let config = &state.config;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    // Limits the client connections served at once; past it, a short 503 and close, so that
    // an overload is visible to clients instead of a silently growing accept backlog.
    let connection_slots = Arc::new(Semaphore::new(config.max_connections));
    let refusal_slots = Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE));
    let graceful = GracefulShutdown::new();
    let closed_connections = Arc::new(AtomicUsize::new(0));
    let trimmer =
        tokio::spawn(trim_after_bursts(connection_slots.clone(), config.max_connections, closed_connections.clone()));
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Requests and responses are small: send each at once rather than waiting to batch.
        let _ = stream.set_nodelay(true);
        let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
            state.metrics.record_refused_connection();
            // A refusal holds its socket a moment (see `refuse_over_capacity`); past a few
            // dozen at once (a flood), connections are closed without an answer, so that
            // refusing never holds more sockets than MAX_CONNECTIONS is there to cap.
            if let Ok(refusing) = refusal_slots.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse_over_capacity(stream).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let state = state.clone();
        let closed = closed_connections.clone();
        let service = service_fn(move |request| handle(state.clone(), peer.ip(), request));
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(linger::Lingering::new(stream)), service));
        tokio::spawn(async move {
            // Errors here are the client's doing (reset, timeout reading headers): nothing to log.
            let _ = connection.await;
            drop(slot);
            closed.fetch_add(1, Ordering::Relaxed);
        });
    }

    drop(listener);
    trimmer.abort();
    tracing::info!(open_connections = graceful.count(), "shutting down: draining connections");
    if tokio::time::timeout(state.config.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}

/// How often the trimmer looks whether a burst of connections is over.
const TRIM_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A burst: at least this many connections closed since the last trim...
const BURST_CONNECTIONS: usize = 64;

/// ...and now no more than this many open: the server is (nearly) idle again.
const QUIET_CONNECTIONS: usize = 8;

/// Gives the memory of a burst of connections back to the system once it is over
/// (`memory::release_free_memory`), never while the server is busy.
async fn trim_after_bursts(slots: Arc<Semaphore>, max_connections: usize, closed: Arc<AtomicUsize>) {
    let mut ticker = tokio::time::interval(TRIM_CHECK_EVERY);
    loop {
        ticker.tick().await;
        let open = max_connections - slots.available_permits();
        if open <= QUIET_CONNECTIONS && closed.load(Ordering::Relaxed) >= BURST_CONNECTIONS {
            closed.store(0, Ordering::Relaxed);
            tokio::task::spawn_blocking(memory::release_free_memory);
        }
    }
}

/// Answers a connection past `MAX_CONNECTIONS` with a 503 and closes it.
///
/// The request is read first (briefly) and the socket lingers before it closes (`linger`), so
/// that a reset cannot reach the client before the 503 does.
async fn refuse_over_capacity(mut stream: TcpStream) {
    let body = Error::Unavailable("the server is at its connection limit; retry").body();
    let body = serde_json::to_string(&body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {RETRY_AFTER_SECS}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut buffer = [0u8; REFUSAL_READ_CHUNK];
    let mut received = Vec::new();
    let _ = tokio::time::timeout(REFUSAL_PATIENCE, async {
        while !received.windows(4).any(|w| w == b"\r\n\r\n") && received.len() < REFUSAL_READ_LIMIT {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let _ = stream.write_all(format!("{head}{body}").as_bytes()).await;
    // Whatever else the client sends (a body) is read and dropped until it closes its side.
    linger::linger(stream, REFUSAL_PATIENCE).await;
}

/// One request: route it, run its handler in a task of its own under the request deadline
/// (and in the request's span, child of the caller's `traceparent`), render errors, add
/// `X-Request-Id`, record metrics and write the log line.
async fn handle(state: Arc<AppState>, peer: IpAddr, request: Request<Incoming>) -> Result<Reply, Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    // A request framed by Transfer-Encoding may also have carried a Content-Length, which hyper
    // drops (RFC 9112 6.1: the body is read by Transfer-Encoding alone). A proxy in front may
    // have framed it by the other, so the connection is closed after the answer, as 6.1
    // requires: nothing read after this body can be trusted to be the next request.
    let close_after = request.headers().contains_key(header::TRANSFER_ENCODING);
    let matched = routes::find(request.uri().path());
    let route = matched.as_ref().map_or("unmatched", |m| m.route.template());
    let request_id = request_id::request_id(&request);
    let (span, context) = telemetry::context::start_request(
        &method,
        route,
        request_id.clone(),
        request.headers(),
        peer,
        !is_probe_or_scrape(route),
    );

    let outcome = match matched {
        None => Err(Error::RouteNotFound),
        Some(matched) => {
            // A task of its own: a panic in a handler becomes a 500 for this request only, and
            // a client that disconnects does not cut a transaction off half way (it runs to
            // its end and its connection goes back to the pool clean).
            let allowance = routes::time_allowance(&matched, request.uri().query());
            let deadline = tokio::time::Instant::now() + state.config.request_timeout + allowance;
            let handler_state = state.clone();
            let handler =
                deadline::scope(
                    deadline,
                    async move { routes::dispatch(&handler_state, matched, request, peer).await },
                );
            let mut task = tokio::spawn(context.clone().scope(handler).instrument(span.clone()));
            // The handler honours the deadline itself: its pool wait ends there, and a
            // transaction still running is cancelled inside PostgreSQL, so the answer tells
            // the truth about what was written. This later timeout is the backstop for a
            // database that does not even answer the cancel.
            match tokio::time::timeout_at(deadline + DEADLINE_BACKSTOP, &mut task).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(join_error)) => Err(Error::Internal(format!("handler panicked: {join_error}"))),
                Err(_elapsed) => {
                    task.abort();
                    // Cut off half way: a read wrote nothing, but a write may have been sent
                    // (and committed) before the database went silent.
                    Err(Error::cut_off(method != Method::GET && method != Method::HEAD))
                }
            }
        }
    };

    let error_detail = outcome.as_ref().err().and_then(Error::log_detail);
    let error_code = outcome.as_ref().err().map(Error::code);
    let mut reply = outcome.unwrap_or_else(|error| reply::error(&error));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        reply.headers_mut().insert("x-request-id", value);
    }
    if close_after {
        reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let elapsed = started.elapsed();
    let status = reply.status().as_u16();
    state.metrics.record_request(route, &method, status, elapsed);
    span.record("http.response.status_code", status);
    if status >= 500 {
        // Server spans are errors on 5xx only (OpenTelemetry's HTTP conventions): a 4xx is the
        // client's, and answered correctly.
        span.record("otel.status_code", "ERROR");
        span.record("error.type", error_code.unwrap_or("INTERNAL"));
    }
    let level = match (status, route) {
        (500.., _) => Level::ERROR,
        // Healthchecks and metric scrapes come every few seconds and say nothing new.
        (200, _) if is_probe_or_scrape(route) => Level::DEBUG,
        _ => Level::INFO,
    };
    let duration_ms = elapsed.as_micros() as f64 / 1000.0;
    // The route template, not the raw path: bounded cardinality, no ids in the logs.
    let error = error_detail.as_deref();
    context.in_scope(|| match level {
        Level::ERROR => tracing::error!(method = method.as_str(), route, status, duration_ms, error, "request"),
        Level::DEBUG => tracing::debug!(method = method.as_str(), route, status, duration_ms, error, "request"),
        _ => tracing::info!(method = method.as_str(), route, status, duration_ms, error, "request"),
    });
    Ok(reply)
}

/// Health probes and metric scrapes: every few seconds, saying nothing new (logged at
/// debug when answered 200, no span).
fn is_probe_or_scrape(route: &str) -> bool {
    matches!(route, "/health" | "/health/live" | "/health/ready" | "/metrics")
}
