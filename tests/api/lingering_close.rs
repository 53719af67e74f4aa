//! Closing a connection the server will not read further (a request head past the limit)
//! the way nginx's lingering close does: answer, stop writing, then read and drop what the
//! client still sends, for a bounded time, before closing. Closing with unread bytes would
//! make the kernel reset the connection, and a client that writes its whole request before
//! reading (Python's http.client does) would see the reset instead of the answer.

use tokio::io::AsyncWriteExt;

use crate::common::{read_until_closed, spawn_app};

/// A 1 MiB request head, written whole in 16 KiB pieces (the server answers after the first
/// one) before the client reads: every write goes through, and the 431 reaches it.
#[tokio::test]
async fn a_client_that_writes_a_huge_head_before_reading_gets_the_431() {
    let app = spawn_app().await;
    for attempt in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
        let head = format!("GET /api/products HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n", "a".repeat(1 << 20));
        for piece in head.as_bytes().chunks(16 * 1024) {
            let written = stream.write_all(piece).await;
            assert!(
                written.is_ok(),
                "attempt {attempt}: the server reset the connection while the client wrote: {written:?}"
            );
            tokio::task::yield_now().await;
        }
        let (answer, closed) = read_until_closed(&mut stream, std::time::Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "attempt {attempt}: {answer:?}");
        assert!(closed.is_some(), "attempt {attempt}: the server never closed");
    }
}
