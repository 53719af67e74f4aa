//! Requests sent at once on connections of their own, with a way to know that the server has
//! read every one of them: for the tests that hold requests behind a lock and must release it
//! only once all of them are inside the service (queued for a batch), not when a guessed time
//! has passed.
//!
//! What is observed is the kernel's: loopback hands written bytes straight to the receiving
//! socket, and `/proc/net/tcp` shows how many of them the receiver has not read yet. Once the
//! server has read a whole request, its connection task has parsed it and spawned its handler
//! on the test's single-threaded runtime; that handler runs before any later wake-up, such as
//! PostgreSQL's answer to the batch released after the test's COMMIT.

use std::time::Duration;

use serde_json::Value;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{Reply, TestApp, read_until_closed, wait};

/// One request: method, path, extra headers and an optional JSON body.
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Value>,
}

impl Request {
    /// `POST /api/orders` with `body`, and an `Idempotency-Key` if `key` is given.
    pub fn order(key: Option<&str>, body: &Value) -> Request {
        let headers = key.map(|key| ("Idempotency-Key".to_owned(), key.to_owned())).into_iter().collect();
        Request { method: "POST", path: "/api/orders".into(), headers, body: Some(body.clone()) }
    }

    /// `GET path` with `Authorization: Bearer token`.
    pub fn get_as(path: &str, token: &str) -> Request {
        let headers = vec![("Authorization".to_owned(), format!("Bearer {token}"))];
        Request { method: "GET", path: path.into(), headers, body: None }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", self.method, self.path);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = self.body.as_ref().map(Value::to_string).unwrap_or_default();
        if self.body.is_some() {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        head.into_bytes()
    }
}

/// Requests written to the server, whose answers have not been read yet.
pub struct InFlight {
    server_port: u16,
    streams: Vec<TcpStream>,
}

impl TestApp {
    /// Writes each request whole on a new connection; returns without reading any answer.
    pub async fn send_all(&self, requests: &[Request]) -> InFlight {
        let mut streams = Vec::new();
        for request in requests {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
            stream.write_all(&request.bytes()).await.unwrap();
            streams.push(stream);
        }
        InFlight { server_port: self.port, streams }
    }
}

impl TestApp {
    /// A keep-alive connection that the server has accepted and served one request on (so it
    /// holds one of the `MAX_CONNECTIONS` slots for sure), left open and idle.
    pub async fn held_connection(&self) -> TcpStream {
        use tokio::io::AsyncReadExt;
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut received = Vec::new();
        let mut buffer = [0u8; 1024];
        let answered = tokio::time::timeout(wait::PATIENCE, async {
            // The whole answer: its head, then as many bytes as its Content-Length says.
            loop {
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&received));
                received.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&received).to_ascii_lowercase();
                if let Some((head, body)) = text.split_once("\r\n\r\n")
                    && let Some(length) = head.lines().find_map(|line| line.strip_prefix("content-length:"))
                    && body.len() >= length.trim().parse::<usize>().unwrap()
                {
                    return text;
                }
            }
        })
        .await
        .expect("an answer on the held connection");
        assert!(answered.starts_with("http/1.1 200"), "{answered}");
        stream
    }
}

impl InFlight {
    /// Waits until the server has read every byte of every request: none is left in a client's
    /// send queue nor unread on the server's side of its connection. (A connection the server
    /// has already answered and closed, such as a replay that needed no lock, is no longer
    /// established on its side at all: it read the request first.)
    pub async fn read_by_the_server(&self) {
        let clients: Vec<u16> = self.streams.iter().map(|s| s.local_addr().unwrap().port()).collect();
        let what = format!("the server reading all {} requests", clients.len());
        let server = self.server_port;
        wait::until(&what, wait::PATIENCE, || async {
            tcp_sockets().iter().all(|socket| {
                let client_side = socket.remote_port == server && clients.contains(&socket.local_port);
                let server_side = socket.local_port == server && clients.contains(&socket.remote_port);
                !(client_side && socket.unsent > 0 || server_side && socket.state == ESTABLISHED && socket.unread > 0)
            })
        })
        .await
    }

    /// The answers, in the order of the requests (each connection is closed by the server
    /// after its answer: `Connection: close`).
    pub async fn replies(self) -> Vec<Reply> {
        let mut replies = Vec::new();
        for mut stream in self.streams {
            let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(60)).await;
            assert!(closed.is_some(), "no whole answer within 60 s: {text}");
            replies.push(parse(&text));
        }
        replies
    }
}

/// `/proc/net/tcp`'s state of an established connection (also while it is still in the
/// listener's accept queue).
pub const ESTABLISHED: u8 = 0x01;
/// The peer has closed its side; this side has not closed yet.
pub const CLOSE_WAIT: u8 = 0x08;

/// One TCP socket of the machine, as `/proc/net/tcp` (IPv4) or `tcp6` shows it.
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: u8,
    /// Bytes written by the socket's owner and not yet taken by the peer.
    pub unsent: u64,
    /// Bytes received and not yet read by the socket's owner.
    pub unread: u64,
}

/// Every TCP socket of the machine (Linux).
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next().unwrap(), 16).unwrap();
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(table) else { continue };
        sockets.extend(table.lines().skip(1).map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            TcpSocket {
                local_port: port(fields[1]),
                remote_port: port(fields[2]),
                state: u8::from_str_radix(fields[3], 16).unwrap(),
                unsent: u64::from_str_radix(fields[4].split(':').next().unwrap(), 16).unwrap(),
                unread: u64::from_str_radix(fields[4].split(':').nth(1).unwrap(), 16).unwrap(),
            }
        }));
    }
    assert!(!sockets.is_empty(), "no TCP socket in /proc/net/tcp{{,6}} (Linux only)");
    sockets
}

/// An HTTP/1.1 answer read whole (the server closed after it) as a `Reply`.
fn parse(text: &str) -> Reply {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    let chunked = headers.get("transfer-encoding").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let text = if chunked { dechunk(body) } else { body.to_owned() };
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply { status, headers, text, json }
}

/// A chunked body's content.
fn dechunk(mut body: &str) -> String {
    let mut text = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return text;
        }
        text.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}
