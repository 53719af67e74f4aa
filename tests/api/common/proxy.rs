//! A TCP proxy on 127.0.0.1 in front of the test PostgreSQL whose path can hang the way a
//! broken network does (bytes neither delivered nor refused, sockets left open), for the tests
//! of what the service does when the database stops answering without closing.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
};

pub struct HangingProxy {
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// New connections are accepted and then left without an answer, forever.
    hang_new: AtomicBool,
    /// The hang switch of every connection opened so far.
    open: Mutex<Vec<Arc<AtomicBool>>>,
}

impl HangingProxy {
    /// A proxy to `upstream` (host:port) that passes everything until told otherwise.
    pub async fn start(upstream: SocketAddr) -> HangingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if shared.hang_new.load(Ordering::SeqCst) {
                    // Accepted, never answered, never closed: the connect hangs.
                    held.push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let hung = Arc::new(AtomicBool::new(false));
                shared.open.lock().unwrap().push(hung.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, hung.clone()));
                tokio::spawn(pump(server_read, client_write, hung));
            }
        });
        HangingProxy { port, state, task }
    }

    /// Every connection open now stops carrying bytes, for good (its sockets stay open).
    pub fn hang_existing(&self) {
        for hung in self.state.open.lock().unwrap().iter() {
            hung.store(true, Ordering::SeqCst);
        }
    }

    /// Whether connections opened from now on hang from the start.
    pub fn hang_new_connections(&self, hang: bool) {
        self.state.hang_new.store(hang, Ordering::SeqCst);
    }
}

impl Drop for HangingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either side closes; once `hung`, holds what it read and waits
/// forever (until the test's runtime ends).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, hung: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
