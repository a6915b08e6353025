//! Accepting threads. With [`EdgeConfig::threads`](super::EdgeConfig::threads) above
//! one, each thread runs a single-threaded runtime of its own that accepts from the
//! shared listening socket and serves what it accepted, start to finish, on that thread
//! (nginx's workers do the same): no task of a connection moves between threads, and
//! the upstream keep-alive connections a thread opens are used by that thread. With one
//! thread, the same loop runs on the caller's runtime.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinSet;

use super::accept;
use super::conn::connection;
use super::shared::Shared;
use super::thread_slot;

/// Open connections per accepting thread. All threads wait on one listening socket, and
/// a burst of connects lands on whichever wakes first: left alone, one thread can hold
/// twice the connections of another and be the bottleneck while the other idles. So a
/// thread with more than its share leaves new connections to the others, as long as
/// it is over it.
pub(super) struct Load {
    open: Box<[AtomicUsize]>,
    /// Told when any count changes, so a thread that stood back looks again.
    changed: Notify,
}

/// How long a thread over its share stands back at most before it looks again (in
/// case a count it waits on moves without it hearing).
const STAND_BACK: Duration = Duration::from_millis(20);

/// How long a thread stands back in a row at most: should the others stop accepting
/// (stuck, or gone), it takes connections again.
const STAND_BACK_AT_MOST: Duration = Duration::from_millis(250);

impl Load {
    fn new(threads: usize) -> Arc<Self> {
        Arc::new(Load {
            open: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            changed: Notify::new(),
        })
    }

    /// Whether thread `index` has more than one connection over the least loaded.
    fn over_share(&self, index: usize) -> bool {
        let mine = self.open[index].load(Ordering::Relaxed);
        let least = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        mine > least + 1
    }

    /// Counts one connection on thread `index` until the guard drops.
    fn hold(self: &Arc<Self>, index: usize) -> LoadGuard {
        self.open[index].fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        LoadGuard {
            load: self.clone(),
            index,
        }
    }
}

struct LoadGuard {
    load: Arc<Load>,
    index: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.open[self.index].fetch_sub(1, Ordering::Relaxed);
        self.load.changed.notify_waiters();
    }
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
    let load = Load::new(threads);
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
        let load = load.clone();
        let started = std::thread::Builder::new()
            .name(format!("lobe-tls-edge-{index}"))
            .spawn(move || {
                thread_slot::enter(index);
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
                            let load = Some((load, index));
                            accept_loop(listener, local_addr, accept, shared, stop, load).await;
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
/// `load`: the threads' counts and this thread's index, when there are several.
pub(super) async fn accept_loop(
    listener: TcpListener,
    local_addr: SocketAddr,
    accept: Arc<accept::TlsAccept>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    load: Option<(Arc<Load>, usize)>,
) {
    let mut connections = JoinSet::new();
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    let mut standing_since: Option<std::time::Instant> = None;
    loop {
        let over_share = load
            .as_ref()
            .is_some_and(|(load, index)| load.over_share(*index));
        let stand_back = over_share
            && standing_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                < STAND_BACK_AT_MOST;
        if !over_share {
            standing_since = None;
        }
        tokio::select! {
            // (The watch's guard must not live in select's output across the awaits below.)
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
            () = async {
                if let Some((load, _)) = &load {
                    let _ = tokio::time::timeout(STAND_BACK, load.changed.notified()).await;
                }
            }, if stand_back => {}
            accepted = listener.accept(), if !stand_back => match accepted {
                Ok((stream, peer)) => {
                    standing_since = None;
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
                    let held = load.as_ref().map(|(load, index)| load.hold(*index));
                    connections.spawn(async move {
                        connection(stream, peer, local, accept, shared, permit).await;
                        drop(held);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept on {local_addr}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = prune.tick(), if thread_slot::current() == 0 => shared.limits.prune(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_over_its_share_stands_back_until_the_others_catch_up() {
        let load = Load::new(2);
        let first: Vec<_> = (0..3).map(|_| load.hold(0)).collect();
        assert!(load.over_share(0), "3 against 0");
        assert!(!load.over_share(1));
        let second = load.hold(1);
        assert!(load.over_share(0), "3 against 1");
        let third = load.hold(1);
        assert!(
            !load.over_share(0),
            "3 against 2 is within one of the least"
        );
        drop((second, third));
        assert!(load.over_share(0));
        drop(first);
        assert!(!load.over_share(0));
        assert_eq!(load.open[0].load(Ordering::Relaxed), 0);
    }
}
