//! The webhook receiver of the `events` and `failover` scenarios: an HTTP server on 127.0.0.1,
//! in the chaos process, that verifies every delivery's Standard Webhooks signature with the
//! official verifier (never our own HMAC), keeps every attempt it gets, and answers as a
//! flaky shop service would.
//!
//! - **Down**: nothing listens on its port (connection refused) until `come_up`.
//! - **Flaky**: per attempt, a deterministic pseudo-random choice from the event's id and how
//!   often this receiver has seen it: 500, slow (a 2xx after `SLOW_MIN`..`SLOW_MAX`, well
//!   under the service's attempt timeout) or a fast 2xx, each a third of the attempts, except
//!   that an attempt following this event's 500 is never a 500 again. Why: a receiver failing
//!   one event ten times in a row makes the service give it up after its tenth attempt, which
//!   the contract allows (a gap the receiver catches up on) and `tests/api/webhooks.rs`
//!   checks; here it would only hide what the scenario looks for (an event the service lost).
//!   A fresh attempt is a 500 with probability 1/2 and a repeat never, so 500s are still a
//!   third of all attempts.
//!
//! What it keeps lets the verdict (`events.rs`) check order: each attempt's arrival and each
//! 2xx answer get a tick of one counter, so "event n+1 of an order arrived before the answer
//! that delivered event n" is a comparison of ticks.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The shortest and longest slow answer: the attempt timeout the scenarios give the service
/// (`WEBHOOK_TIMEOUT_MS`, 5 s) is well above both, so a slow answer is a delivery. Short,
/// because one product's events go one at a time: every slow second is a second for all of
/// that product's later events.
pub const SLOW_MIN: Duration = Duration::from_millis(200);
pub const SLOW_MAX: Duration = Duration::from_millis(1000);

/// How this receiver answers an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    /// 500 Internal Server Error.
    Error,
    /// 204 after a delay.
    Slow(Duration),
    /// 204 at once.
    Fast,
    /// 401: the signature did not verify (never expected).
    BadSignature,
}

/// One attempt as received.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub webhook_id: String,
    /// The event's own `id`, `type`, stream and `sequence`, from the body.
    pub event_id: String,
    pub kind: String,
    pub order_id: Option<i64>,
    pub product_id: Option<i64>,
    pub sequence: i64,
    /// When it arrived, in ms of the receiver's clock, and its tick.
    pub at_ms: u64,
    pub arrived_tick: u64,
    pub reply: Reply,
    /// The tick of the 2xx answer, once given.
    pub delivered_tick: Option<u64>,
}

#[derive(Default)]
struct State {
    attempts: Vec<Attempt>,
    /// Attempts seen per webhook-id, and whether the last was answered 500.
    seen: HashMap<String, (u32, bool)>,
    /// Attempts being answered now, per webhook-id: two at once means one event was in
    /// flight twice (from two replicas).
    in_flight: HashMap<String, u32>,
    overlaps: u64,
    /// Attempts being answered now, per the sender's port.
    in_flight_ports: HashMap<u16, u32>,
    /// The body of each event as first received: a later attempt must carry the same.
    bodies: HashMap<String, Bytes>,
    changed_bodies: u64,
    verifier: Option<standardwebhooks::Webhook>,
}

pub struct Receiver {
    pub port: u16,
    flaky: bool,
    started: Instant,
    ticks: Arc<AtomicU64>,
    state: Arc<Mutex<State>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Receiver {
    /// A receiver for `port` that is down (nothing listens) until `come_up`; `flaky`: 500s and
    /// slow answers as the module says, else a fast 204 to every verified attempt.
    pub fn down(port: u16, flaky: bool) -> Arc<Receiver> {
        Arc::new(Receiver {
            port,
            flaky,
            started: Instant::now(),
            ticks: Arc::new(AtomicU64::new(0)),
            state: Arc::new(Mutex::new(State::default())),
            task: Mutex::new(None),
        })
    }

    /// `http://127.0.0.1:PORT/hook`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// The endpoint's signing secret (`whsec_...`), once it is registered.
    pub fn set_secret(&self, secret: &str) {
        self.state.lock().unwrap().verifier = Some(standardwebhooks::Webhook::new(secret).expect("a whsec_ secret"));
    }

    /// Starts listening on its port.
    pub async fn come_up(self: &Arc<Self>) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .map_err(|e| format!("the receiver cannot listen on {}: {e}", self.port))?;
        let receiver = self.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let receiver = receiver.clone();
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let receiver = receiver.clone();
                    async move { Ok::<_, Infallible>(receiver.answer(request, peer.port()).await) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        *self.task.lock().unwrap() = Some(task);
        Ok(())
    }

    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Answers one attempt that came over a connection from `peer_port`.
    async fn answer(&self, request: Request<hyper::body::Incoming>, peer_port: u16) -> Response<Full<Bytes>> {
        let headers = request.headers().clone();
        let webhook_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (index, reply) = {
            let mut state = self.state.lock().unwrap();
            let verified = state.verifier.as_ref().is_some_and(|v| v.verify(&body, &headers).is_ok());
            let reply = if !verified {
                Reply::BadSignature
            } else if self.flaky {
                let (seen, last_was_error) = state.seen.get(&webhook_id).copied().unwrap_or((0, false));
                flaky_reply(&webhook_id, seen, last_was_error)
            } else {
                Reply::Fast
            };
            let entry = state.seen.entry(webhook_id.clone()).or_default();
            *entry = (entry.0 + 1, reply == Reply::Error);
            let in_flight = state.in_flight.entry(webhook_id.clone()).or_default();
            *in_flight += 1;
            if *in_flight > 1 {
                state.overlaps += 1;
            }
            *state.in_flight_ports.entry(peer_port).or_default() += 1;
            match state.bodies.get(&webhook_id) {
                Some(first) if *first != body => state.changed_bodies += 1,
                Some(_) => {}
                None => {
                    state.bodies.insert(webhook_id.clone(), body.clone());
                }
            }
            state.attempts.push(Attempt {
                webhook_id: webhook_id.clone(),
                event_id: event["id"].as_str().unwrap_or("").to_owned(),
                kind: event["type"].as_str().unwrap_or("").to_owned(),
                order_id: event["orderId"].as_i64(),
                product_id: event["productId"].as_i64(),
                sequence: event["sequence"].as_i64().unwrap_or(0),
                at_ms: self.started.elapsed().as_millis() as u64,
                arrived_tick: self.tick(),
                reply,
                delivered_tick: None,
            });
            (state.attempts.len() - 1, reply)
        };
        // Counted out of flight however the attempt ends: hyper drops this future, sleep and
        // all, when the sender's connection closes (a SIGKILLed replica's).
        let _in_flight = InFlight { state: self.state.clone(), webhook_id: webhook_id.clone(), peer_port };
        if let Reply::Slow(delay) = reply {
            tokio::time::sleep(delay).await;
        }
        let status = match reply {
            Reply::Error => StatusCode::INTERNAL_SERVER_ERROR,
            Reply::BadSignature => StatusCode::UNAUTHORIZED,
            Reply::Slow(_) | Reply::Fast => StatusCode::NO_CONTENT,
        };
        {
            let mut state = self.state.lock().unwrap();
            if status.is_success() {
                state.attempts[index].delivered_tick = Some(self.tick());
            }
        }
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    }

    /// Every attempt so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state.lock().unwrap().attempts.clone()
    }

    /// How many webhook-ids were answered 2xx at least once.
    pub fn delivered_ids(&self) -> usize {
        let state = self.state.lock().unwrap();
        let mut ids: Vec<&str> =
            state.attempts.iter().filter(|a| a.delivered_tick.is_some()).map(|a| a.webhook_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Times one event was in flight twice at once; attempts whose body differed from the
    /// event's first.
    pub fn overlaps_and_changed_bodies(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap();
        (state.overlaps, state.changed_bodies)
    }

    /// Whether an attempt is being answered now over a connection from one of `ports`.
    pub fn in_flight_from(&self, ports: &HashSet<u16>) -> bool {
        self.state.lock().unwrap().in_flight_ports.iter().any(|(port, n)| *n > 0 && ports.contains(port))
    }

    /// Milliseconds since the receiver was made.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// An attempt being answered, until dropped.
struct InFlight {
    state: Arc<Mutex<State>>,
    webhook_id: String,
    peer_port: u16,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap();
        if let Some(in_flight) = state.in_flight.get_mut(&self.webhook_id) {
            *in_flight -= 1;
        }
        if let Some(in_flight) = state.in_flight_ports.get_mut(&self.peer_port) {
            *in_flight -= 1;
        }
    }
}

/// The local TCP ports of process `pid`'s sockets (IPv4, from /proc): with the receiver's
/// `in_flight_from`, whether a replica is making an attempt now.
pub fn local_ports_of(pid: u32) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| {
                let target = std::fs::read_link(fd.ok()?.path()).ok()?;
                let target = target.to_str()?;
                Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, inode) = (fields.get(1)?, fields.get(9)?);
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            inodes.contains(*inode).then_some(port)
        })
        .collect()
}

/// The flaky answer to attempt number `seen` (from 0) of `webhook_id`: deterministic, so a
/// failed run can be replayed in thought; 500 for half of fresh attempts and never right after
/// a 500 (a third of all attempts), otherwise slow or fast alike.
fn flaky_reply(webhook_id: &str, seen: u32, last_was_error: bool) -> Reply {
    let draw = splitmix64(fnv1a(webhook_id.as_bytes()) ^ u64::from(seen).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if !last_was_error && draw & 1 == 0 {
        return Reply::Error;
    }
    if draw & 2 == 0 {
        return Reply::Fast;
    }
    let span = (SLOW_MAX - SLOW_MIN).as_millis() as u64;
    Reply::Slow(SLOW_MIN + Duration::from_millis((draw >> 2) % (span + 1)))
}

/// FNV-1a: a stable hash of the id (std's hasher is seeded per process).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64's finaliser: spreads the bits so that the low ones are fair coins.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
