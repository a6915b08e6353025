//! One HTTP connection: HTTP/1.1 or h2 (by ALPN) on hyper, with timers for
//! slow heads, and a watchdog that closes the connection when it waits too long for a
//! request (`header_read_timeout` for the first, `keepalive_timeout` after that) or, with
//! requests in flight, moves no byte for the longest idle timeout of the sites.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{Shared, accept, clock, proxy, tcp};

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub(crate) struct RequestTracker {
    in_flight: AtomicUsize,
    served: AtomicBool,
    idle_since: clock::ActivityClock,
    /// The connection's limits and gauges, until the last request (or upgrade) is done.
    _hold: super::ConnHold,
}

impl RequestTracker {
    fn new(hold: super::ConnHold) -> Self {
        RequestTracker {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: clock::ActivityClock::new(),
            _hold: hold,
        }
    }

    /// Counts a request as in flight until the guard (held by its response body) drops.
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        RequestGuard(self.clone())
    }
}

/// One request in flight.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<RequestTracker>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.touch();
        }
    }
}

pub(super) async fn serve(accepted: accept::Accepted, shared: Arc<Shared>, hold: super::ConnHold) {
    let client = accepted.client;
    // The protocol is the one ALPN agreed on (RFC 9113 §3.2: h2 over TLS is negotiated,
    // never guessed), so no connection pays for sniffing its first bytes.
    let h2 = accepted.tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let clock = Arc::new(clock::ActivityClock::new());
    let tracker = Arc::new(RequestTracker::new(hold));
    let io = TokioIo::new(tcp::Tracked::new(accepted.tls, clock.clone()));
    let conn = proxy::ConnInfo {
        client,
        tracker: tracker.clone(),
        values: super::forwarded::ClientValues::new(client.ip()),
    };
    let service_shared = shared.clone();
    let service = service_fn(move |req| {
        let (shared, conn) = (service_shared.clone(), conn.clone());
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(shared, conn, req).await) }
    });
    let watch = Watch {
        client,
        clock,
        tracker,
    };
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_header_list_size(u32::try_from(shared.config.max_header_size).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20));
        watch
            .drive(builder.serve_connection(io, service), &shared)
            .await;
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.header_read_timeout)
            // hyper's floor for its read buffer is 8 KiB.
            .max_buf_size(shared.config.max_header_size.max(8192));
        watch
            .drive(
                builder.serve_connection(io, service).with_upgrades(),
                &shared,
            )
            .await;
    }
}

/// A served connection that can be asked to finish its requests and close.
trait Graceful: std::future::Future<Output = hyper::Result<()>> {
    fn shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What the watchdog of one connection looks at.
struct Watch {
    client: std::net::SocketAddr,
    clock: Arc<clock::ActivityClock>,
    tracker: Arc<RequestTracker>,
}

impl Watch {
    async fn drive<C: Graceful>(self, served: C, shared: &Shared) {
        let Watch {
            client,
            clock,
            tracker,
        } = self;
        let mut served = std::pin::pin!(served);
        let idle = shared.router.load().longest_idle();
        let first_request = shared.config.header_read_timeout;
        let keepalive = shared.config.keepalive_timeout;
        // When the connection is due to close if nothing changes.
        let deadline = || {
            if tracker.in_flight.load(Ordering::Relaxed) == 0 {
                let wait = if tracker.served.load(Ordering::Relaxed) {
                    keepalive
                } else {
                    first_request
                };
                tracker.idle_since.last() + wait
            } else {
                clock.last() + idle
            }
        };
        // The timer looks again at least every keep-alive timeout, as a deadline can
        // move earlier (a long request ends, and the keep-alive wait starts).
        let next_look = || deadline().min(Instant::now() + keepalive);
        let mut timer = std::pin::pin!(tokio::time::sleep_until(next_look().into()));
        let draining = shared.draining.subscribe();
        let mut waiter = draining.clone();
        let mut drain = std::pin::pin!(async move {
            let _ = waiter.wait_for(|d| *d).await;
        });
        // The timer and the drain signal are polled when new and when they say they
        // fired, not on every wake-up of a busy connection (each poll re-registers).
        let (mut timer_armed, mut drain_armed, mut asked_to_close) = (false, false, false);
        std::future::poll_fn(|cx| {
            loop {
                if let std::task::Poll::Ready(done) = served.as_mut().poll(cx) {
                    if let Err(e) = done {
                        tracing::debug!(%client, error = %e, "connection ended");
                    }
                    return std::task::Poll::Ready(());
                }
                if !asked_to_close && (!drain_armed || draining.has_changed().unwrap_or(true)) {
                    drain_armed = true;
                    if drain.as_mut().poll(cx).is_ready() {
                        asked_to_close = true;
                        served.as_mut().shutdown();
                        continue;
                    }
                }
                if !timer_armed || timer.is_elapsed() {
                    timer_armed = true;
                    if timer.as_mut().poll(cx).is_ready() {
                        if deadline() <= Instant::now() {
                            tracing::debug!(%client, "idle connection closed");
                            return std::task::Poll::Ready(());
                        }
                        timer.as_mut().reset(next_look().into());
                        timer_armed = false;
                        continue;
                    }
                }
                return std::task::Poll::Pending;
            }
        })
        .await;
    }
}
