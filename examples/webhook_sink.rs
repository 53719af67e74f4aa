//! `make bench`'s webhook receiver: accepts every delivery at once (204), as a fast shop
//! service would, and keeps for each event the first time it arrived, to tell the time from
//! the event to its first delivery attempt and the rate of deliveries. No signature check:
//! the bench measures the service, and the tests check the signatures.
//!
//! `cargo run --profile tools --example webhook_sink -- PORT`; `GET /stats` answers
//! `{"received":N,"unique":N,"first_attempt_ms":[...]}` (the delay from each event's
//! `occurredAt` to its first arrival) and `POST /reset` forgets everything.

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Seen {
    received: u64,
    ids: HashSet<String>,
    first_attempt_ms: Vec<f64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: webhook_sink PORT");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let seen = Arc::new(Mutex::new(Seen::default()));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let seen = seen.clone();
        let service = service_fn(move |request: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move { Ok::<_, Infallible>(answer(&seen, request).await) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}

async fn answer(seen: &Mutex<Seen>, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let id = request.headers().get("webhook-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0;
    match (method, path.as_str()) {
        (Method::GET, "/stats") => {
            let seen = seen.lock().unwrap();
            let stats = serde_json::json!({
                "received": seen.received, "unique": seen.ids.len(), "first_attempt_ms": seen.first_attempt_ms,
            });
            Response::new(Full::new(Bytes::from(stats.to_string())))
        }
        (Method::POST, "/reset") => {
            *seen.lock().unwrap() = Seen::default();
            Response::new(Full::new(Bytes::new()))
        }
        _ => {
            let occurred = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|event| event["occurredAt"].as_str().and_then(epoch_ms));
            let mut seen = seen.lock().unwrap();
            seen.received += 1;
            if let Some(id) = id
                && seen.ids.insert(id)
                && let Some(occurred) = occurred
            {
                seen.first_attempt_ms.push(now - occurred);
            }
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = hyper::StatusCode::NO_CONTENT;
            response
        }
    }
}

/// `2026-12-04T09:12:03.417Z` in milliseconds since the epoch.
fn epoch_ms(text: &str) -> Option<f64> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute) = (number(11..13)?, number(14..16)?);
    let second: f64 = text.get(17..text.len() - 1)?.parse().ok()?;
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 86_400 + hour * 3600 + minute * 60) as f64 + second) * 1000.0)
}
