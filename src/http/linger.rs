//! Lingering close, as nginx does it: a connection the server ends is not simply closed. Its
//! write side is shut (the answer and a FIN go out), and whatever the client still sends is
//! read and dropped until it closes too, or `LINGER_FOR` passes. Closing a socket with unread
//! bytes makes the kernel send a reset, and a reset can reach a client that is still writing
//! its request (a head past `MAX_HEADER_BYTES`, a body the server will not read) before it has
//! read the answer: it would see "broken pipe" instead of the 431 or 413.

use std::{
    io,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::Semaphore,
};

/// How long a closing connection's incoming bytes are drained at most.
const LINGER_FOR: Duration = Duration::from_secs(2);

/// Connections lingering at once; past it a connection is closed at once (a flood of closing
/// connections must not hold more sockets than that).
const MAX_LINGERING: usize = 256;

/// Bytes read at a time while draining.
const DRAIN_CHUNK: usize = 8 * 1024;

static LINGERING: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_LINGERING)));

/// A client connection that lingers when dropped; otherwise the `TcpStream` itself.
pub struct Lingering {
    stream: Option<TcpStream>,
}

impl Lingering {
    pub fn new(stream: TcpStream) -> Lingering {
        Lingering { stream: Some(stream) }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        let (Ok(runtime), Ok(permit)) = (tokio::runtime::Handle::try_current(), LINGERING.clone().try_acquire_owned())
        else {
            return;
        };
        runtime.spawn(async move {
            linger(stream, LINGER_FOR).await;
            drop(permit);
        });
    }
}

/// Shuts the write side of `stream`, then reads and drops what comes for at most `patience`,
/// and closes it.
pub(super) async fn linger(mut stream: TcpStream, patience: Duration) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; DRAIN_CHUNK];
    let _ =
        tokio::time::timeout(patience, async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|stream| stream.is_write_vectored())
    }
}
