//! A TCP path that a test can break: a forwarder on a free loopback port in front of a
//! real server (Pebble, say) that can go dead, as a network path does when a firewall
//! starts dropping packets or a middlebox hangs.
//!
//! While the path is dead it still accepts connections (the kernel completes the
//! handshake) but never answers, and connections opened before stop carrying bytes too.
//! A connection that saw the path dead stays dead after the path is healed, so a client
//! that keeps reusing a pooled connection hangs forever: only fresh connections work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALIVE: u8 = 0;
const DEAD: u8 = 1;
const REFUSING: u8 = 2;

/// The forwarder; it stops, with every connection it carries, when dropped.
pub struct FaultyPath {
    /// The address clients connect to.
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped on each break, so connections know whether they saw one.
    breaks: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultyPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultyPath {
    /// Forwards a free port of 127.0.0.1 to `target`.
    pub async fn start(target: SocketAddr) -> FaultyPath {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind path");
        let addr = listener.local_addr().expect("path addr");
        let mode = Arc::new(AtomicU8::new(ALIVE));
        let breaks = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let (mode, breaks, accepted) = (mode.clone(), breaks.clone(), accepted.clone());
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    while connections.try_join_next().is_some() {}
                    match mode.load(Ordering::SeqCst) {
                        REFUSING => drop(client),
                        DEAD => {
                            // Accepted, never answered: hold it until the test ends.
                            connections.spawn(async move {
                                let _held = client;
                                std::future::pending::<()>().await;
                            });
                        }
                        _ => {
                            let (mode, breaks) = (mode.clone(), breaks.clone());
                            connections.spawn(carry(client, target, mode, breaks));
                        }
                    }
                }
            })
        };
        FaultyPath {
            addr,
            mode,
            breaks,
            accepted,
            task,
        }
    }

    /// From now on the path accepts and never answers; open connections go silent.
    pub fn go_dead(&self) {
        self.breaks.fetch_add(1, Ordering::SeqCst);
        self.mode.store(DEAD, Ordering::SeqCst);
    }

    /// From now on new connections are closed at once, like a CA whose port is shut.
    pub fn refuse(&self) {
        self.breaks.fetch_add(1, Ordering::SeqCst);
        self.mode.store(REFUSING, Ordering::SeqCst);
    }

    /// New connections work again; connections that saw the path break stay dead.
    pub fn heal(&self) {
        self.mode.store(ALIVE, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Carries one connection both ways until either side closes, or the path breaks: then
/// it swallows whatever arrives and answers nothing, for good.
async fn carry(client: TcpStream, target: SocketAddr, mode: Arc<AtomicU8>, breaks: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let born = breaks.load(Ordering::SeqCst);
    let alive =
        move || mode.load(Ordering::SeqCst) == ALIVE && breaks.load(Ordering::SeqCst) == born;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up_alive = alive.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if up_alive() && server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if alive() && client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending ends the connection (the CA closed, or the client gave up).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
