//! Accepting threads. With [`EdgeConfig::threads`](super::EdgeConfig::threads) above
//! one, each thread runs a single-threaded runtime of its own that accepts from the
//! shared listening socket and serves what it accepted, start to finish, on that thread
//! (nginx's workers do the same): no task of a connection moves between threads, and
//! the upstream keep-alive connections a thread opens are used by that thread. With one
//! thread, the same loop runs on the caller's runtime.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::{Shared, accept, connection};

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The accepting thread this code runs on (0 outside of them).
pub(crate) fn current() -> usize {
    SHARD.with(Cell::get)
}

/// How many per-thread slots a per-thread cache keeps: the CPUs, as `--threads`
/// defaults to them.
pub(crate) fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 256)
    })
}

/// Starts `threads` accepting threads, each on its own handle to `listener`'s socket.
/// Returns a receiver per thread that completes when the thread has drained and
/// stopped, or the listener back when no thread could start (the caller then serves on
/// its own runtime).
pub(super) fn spawn(
    threads: usize,
    listener: TcpListener,
    local_addr: SocketAddr,
    accept: &Arc<accept::TlsAccept>,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<oneshot::Receiver<()>>, TcpListener> {
    let mut done = Vec::new();
    for index in 0..threads {
        // A handle of its own for each thread's runtime to register (tokio sockets
        // belong to the runtime that registered them).
        let socket = match listener.as_fd().try_clone_to_owned() {
            Ok(fd) => std::net::TcpListener::from(fd),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start accepting thread {index}");
                break;
            }
        };
        let (finished, finished_rx) = oneshot::channel();
        let (accept, shared, stop) = (accept.clone(), shared.clone(), stop.clone());
        let started = std::thread::Builder::new()
            .name(format!("lobe-tls-edge-{index}"))
            .spawn(move || {
                SHARD.with(|shard| shard.set(index));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "accepting thread {index} has no runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = socket
                        .set_nonblocking(true)
                        .and_then(|()| TcpListener::from_std(socket));
                    match listener {
                        Ok(listener) => {
                            accept_loop(listener, local_addr, accept, shared, stop).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "accepting thread {index} cannot listen");
                        }
                    }
                });
                // Tasks still on this runtime (idle upstream connections) end with it.
                drop(runtime);
                let _ = finished.send(());
            });
        match started {
            Ok(_) => done.push(finished_rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start accepting thread {index}");
                break;
            }
        }
    }
    if done.is_empty() {
        return Err(listener);
    }
    // The threads hold their own handles; this one would only wake the caller's runtime.
    drop(listener);
    Ok(done)
}

/// Accepts and serves until `stop` turns true, then drains (see [`super::Edge::run`]).
pub(super) async fn accept_loop(
    listener: TcpListener,
    local_addr: SocketAddr,
    accept: Arc<accept::TlsAccept>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            // (The watch's guard must not live in select's output across the awaits below.)
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Behind a PROXY header the client's address is known later.
                    let admitted = match shared.config.accept_proxy_protocol {
                        Some(_) => shared.limits.admit_total(),
                        None => shared.limits.admit(peer.ip()),
                    };
                    let permit = match admitted {
                        Ok(permit) => permit,
                        Err(refused) => {
                            shared.metrics.reject(refused.reason());
                            tracing::debug!(%peer, reason = refused.reason(), "connection refused");
                            drop(stream);
                            continue;
                        }
                    };
                    let local = stream.local_addr().unwrap_or(local_addr);
                    let (accept, shared) = (accept.clone(), shared.clone());
                    connections.spawn(connection(stream, peer, local, accept, shared, permit));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept on {local_addr}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = prune.tick(), if current() == 0 => shared.limits.prune(),
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drain = shared.config.drain_timeout;
    let mut detached = std::mem::take(
        &mut *shared
            .detached_here()
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    let open = connections.len() + detached.len();
    if open > 0 {
        tracing::info!(
            open,
            "stopped accepting; waiting up to {drain:?} for connections to finish"
        );
    }
    // HTTP connections finish the request in flight and close.
    shared.draining.send_replace(true);
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
        while detached.join_next().await.is_some() {}
        // WebSockets upgraded during the drain.
        let mut late = std::mem::take(
            &mut *shared
                .detached_here()
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        while late.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len() + detached.len(),
            "drain timeout reached; closing the remaining connections"
        );
        connections.shutdown().await;
        detached.shutdown().await;
    }
}
