//! A webhook receiver for the tests: an HTTP server on a loopback address that keeps every
//! request it gets (headers, body, when) and answers as the test scripts it: a status, headers,
//! a delay, per request in order (the last answer repeats).

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    pub body: Bytes,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer { status, headers: Vec::new(), delay: Duration::ZERO, body: Bytes::new() }
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> Answer {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }

    pub fn with_body(mut self, body: Vec<u8>) -> Answer {
        self.body = Bytes::from(body);
        self
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    script: VecDeque<Answer>,
    /// Requests being answered now, by webhook-id: never two for one id at once.
    in_flight: Vec<String>,
    overlaps: usize,
}

pub struct Receiver {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// A receiver on 127.0.0.1 answering 204 to everything.
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1").await
    }

    pub async fn start_on(ip: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        state.lock().unwrap().script.push_back(Answer::status(204));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(state, request).await) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Receiver { address, state, task }
    }

    /// `http://ADDRESS/hook`
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// The answers to the next requests, in order; the last repeats.
    pub fn script(&self, answers: Vec<Answer>) {
        self.state.lock().unwrap().script = answers.into();
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// How often two requests with one webhook-id were answered at the same time.
    pub fn overlaps(&self) -> usize {
        self.state.lock().unwrap().overlaps
    }

    /// Polls until `done` holds of what was received (bounded: `limit`).
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(
                started.elapsed() < limit,
                "the receiver never got what was expected; it got {} requests",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(state: Arc<Mutex<State>>, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let headers = request.headers().clone();
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let answer = {
        let mut state = state.lock().unwrap();
        state.received.push(Received { headers, body, at: Instant::now() });
        if state.in_flight.contains(&id) {
            state.overlaps += 1;
        }
        state.in_flight.push(id.clone());
        match state.script.len() {
            0 | 1 => state.script.front().cloned().unwrap_or(Answer::status(204)),
            _ => state.script.pop_front().unwrap(),
        }
    };
    tokio::time::sleep(answer.delay).await;
    {
        let mut state = state.lock().unwrap();
        if let Some(at) = state.in_flight.iter().position(|known| *known == id) {
            state.in_flight.remove(at);
        }
    }
    let mut response = Response::new(Full::new(answer.body));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status).unwrap();
    for (name, value) in answer.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}
