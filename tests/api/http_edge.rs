//! The HTTP edge over a raw socket: the request-smuggling shapes (RFC 9112 6.1 and 5.2) and
//! the bound on request headers. Each refused request must also have changed nothing.

use crate::common::{TestApp, spawn_app};

const ORDER: &str = r#"{"userId":1,"items":[{"productId":2,"quantity":1}]}"#;

/// The status code of a raw answer (`HTTP/1.1 400 ...`).
fn status(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"))
}

async fn post_order_raw(app: &TestApp, extra_headers: &str, body: &str) -> String {
    let head = format!("POST /api/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}\r\n");
    app.raw_exchange(head.as_bytes(), body.as_bytes()).await
}

/// Two different `Content-Length`s, an obs-fold (a header continued on the next line) and a
/// `Transfer-Encoding` that is not chunked are refused with 400 before a handler runs.
#[tokio::test]
async fn ambiguous_framing_is_400_and_writes_nothing() {
    let app = spawn_app().await;
    let length = ORDER.len();
    for (case, headers) in [
        ("two content lengths", format!("Content-Length: {length}\r\nContent-Length: {}\r\n", length + 1)),
        ("obs-fold", format!("Content-Length: {length}\r\nX-Folded: a\r\n  b\r\n")),
        ("unknown transfer-encoding", "Transfer-Encoding: gzip\r\n".to_owned()),
    ] {
        let answer = post_order_raw(&app, &headers, ORDER).await;
        assert_eq!(status(&answer), 400, "{case}: {answer}");
    }
    assert_eq!(app.count("orders").await, 0);
}

/// A request with both `Content-Length` and `Transfer-Encoding: chunked` is read by the
/// chunked framing alone, and the connection is closed after the answer, so bytes a proxy
/// might have framed differently are never read as a second request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_chunked_and_the_connection_closed() {
    let app = spawn_app().await;
    let chunked = format!("{:x}\r\n{ORDER}\r\n0\r\n\r\n", ORDER.len());
    // A smuggled second request after the chunked body.
    let smuggled = "GET /api/orders/1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let headers = "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n";
    let answer = post_order_raw(&app, headers, &format!("{chunked}{smuggled}")).await;
    assert_eq!(status(&answer), 201, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "the smuggled request was answered: {answer}");
    assert_eq!(app.count("orders").await, 1);
}

/// Request headers are bounded: 10 KB of them are served, 20 KB get 431 and change nothing.
#[tokio::test]
async fn request_headers_past_the_limit_get_431() {
    let app = spawn_app().await;
    let length = ORDER.len();
    let fits = format!("Content-Length: {length}\r\nConnection: close\r\nX-Padding: {}\r\n", "a".repeat(10_000));
    assert_eq!(status(&post_order_raw(&app, &fits, ORDER).await), 201);
    let too_large = format!("Content-Length: {length}\r\nX-Padding: {}\r\n", "a".repeat(20_000));
    let answer = post_order_raw(&app, &too_large, ORDER).await;
    assert_eq!(status(&answer), 431, "{answer}");
    let many = format!(
        "Content-Length: {length}\r\n{}",
        (0..400).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(60))).collect::<String>()
    );
    assert_eq!(status(&post_order_raw(&app, &many, ORDER).await), 431);
    assert_eq!(app.count("orders").await, 1);
}
