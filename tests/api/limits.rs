//! Connection-level limits: clients that send their headers too slowly (or nothing at all)
//! are cut off by the header-read timeout without disturbing others, and connections past
//! `MAX_CONNECTIONS` get a clear 503 instead of an endless wait.

use std::time::Duration;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::common::{TestApp, read_until_closed, spawn_app_with, wait};

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", app.port)).await.unwrap()
}

/// A client that sends half its headers and stalls, or connects and sends nothing, is
/// disconnected after the header-read timeout (300 ms here; the test allows 5 s, well short of
/// the 10 s default, so that a loaded machine cannot fail it); a normal client is served
/// meanwhile.
#[tokio::test]
async fn slow_and_silent_clients_are_cut_off_by_the_header_timeout() {
    let app = spawn_app_with(|config| config.header_read_timeout = Duration::from_millis(300)).await;
    let mut slow = connect(&app).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut silent = connect(&app).await;

    assert_eq!(app.get("/health").await.status, 200, "others are served meanwhile");
    for stream in [&mut slow, &mut silent] {
        let (_, closed_after) = read_until_closed(stream, Duration::from_secs(5)).await;
        closed_after.expect("the server closes the connection");
    }
}

/// Trickling one header byte at a time does not reset the timeout: the whole head must arrive
/// in time. (The head takes 5 s to trickle, the timeout is 400 ms.)
#[tokio::test]
async fn trickling_headers_byte_by_byte_does_not_extend_the_timeout() {
    let app = spawn_app_with(|config| config.header_read_timeout = Duration::from_millis(400)).await;
    let mut stream = connect(&app).await;
    let head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            break; // the server has closed the connection
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(!response.contains("200 OK"), "a trickled head must not be served: {response}");
}

/// Past `MAX_CONNECTIONS`, a new connection gets a 503 SERVICE_UNAVAILABLE with Retry-After
/// and is closed; once a slot frees, connections are served again.
#[tokio::test]
async fn connections_past_the_limit_get_503_and_are_closed() {
    let app = spawn_app_with(|config| config.max_connections = 2).await;
    let held = [app.held_connection().await, app.held_connection().await];

    let mut third = connect(&app).await;
    let (response, closed) = read_until_closed(&mut third, Duration::from_secs(3)).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after: 1"), "{response}");
    assert!(response.contains(r#""code":"SERVICE_UNAVAILABLE""#), "{response}");
    assert!(closed.is_some(), "the refused connection is closed");

    drop(held);
    // Served again once the server has seen a held connection close.
    wait::until("a connection served after the held ones closed", wait::PATIENCE, || async {
        matches!(app.http.get(app.url("/health")).send().await, Ok(reply) if reply.status() == 200)
    })
    .await;
}

/// A client that sends a whole request past the limit reads the 503 every time, not a
/// connection reset: the refusal reads the request before it answers and closes.
#[tokio::test]
async fn a_refused_request_always_gets_its_503_not_a_reset() {
    let app = spawn_app_with(|config| config.max_connections = 1).await;
    let _held = app.held_connection().await;

    let body = serde_json::json!({"userId": 1, "items": [{"productId": 1, "quantity": 1}], "note": "x".repeat(20_000)});
    for attempt in 0..50 {
        let reply = reqwest::Client::new()
            .post(app.url("/api/orders"))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e:?}"));
        assert_eq!(reply.status(), 503, "attempt {attempt}");
    }
    assert_eq!(app.count("orders").await, 0);
}
