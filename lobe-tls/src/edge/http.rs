//! One HTTP connection: HTTP/1.1 or h2 (by ALPN) on hyper, with timers for
//! slow heads, and a watchdog that closes the connection when it waits too long for a
//! request (`header_read_timeout` for the first, `keepalive_timeout` after that) or, with
//! requests in flight, moves no byte for the longest idle timeout of the sites.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::hold::{ConnHold, RequestTracker};
use super::shared::Shared;
use super::{accept, access_log, clock, proxy, tcp};

pub(super) async fn serve(accepted: accept::Accepted, shared: Arc<Shared>, hold: ConnHold) {
    let client = accepted.client;
    // The protocol is the one ALPN agreed on (RFC 9113 §3.2: h2 over TLS is negotiated,
    // never guessed), so no connection pays for sniffing its first bytes.
    let h2 = accepted.tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    // What the access log says of the TLS session; read only when there is one.
    let tls = Arc::new(match shared.access_log {
        Some(_) => access_log::TlsFacts::of(accepted.tls.get_ref().1),
        None => access_log::TlsFacts::default(),
    });
    let clock = Arc::new(clock::ActivityClock::new());
    let tracker = Arc::new(RequestTracker::new(hold));
    let io = TokioIo::new(tcp::Tracked::new(accepted.tls, clock.clone()));
    let conn = proxy::ConnInfo {
        client,
        tracker: tracker.clone(),
        values: super::forwarded::ClientValues::new(client.ip()),
        budget: shared.replay.connection(),
        tls,
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
        let builder = h2_builder(&shared.config);
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

/// Largest response body data one h2 stream buffers ahead of the client's flow-control
/// window (hyper's default is 400 KiB): a client that opens every stream and never reads
/// (zero window) makes the edge hold at most streams × this per connection.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// The h2 receive windows (hyper's defaults, set here as their figures are the edge's
/// memory budget): a client may have this much request body sent and not yet read by the
/// edge, over all the streams of a connection.
const H2_WINDOW: u32 = 1024 * 1024;

/// Streams a client may reset before the edge reads their requests, at once, before
/// the connection is closed with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
const H2_PENDING_RESETS: usize = 20;

/// Streams the edge may reset for a client's protocol errors on one connection before
/// it closes it with GOAWAY (RUSTSEC-2024-0003).
const H2_LOCAL_RESETS: usize = 1024;

/// The h2 server's settings, each chosen for a client that means harm as much as for one
/// that does not. SETTINGS and PING floods need none: h2 answers one at a time and stops
/// reading while the answer waits to be written, so a client that floods without reading
/// gets backpressure, not memory. A CONTINUATION flood is cut at the header list size.
fn h2_builder(config: &super::config::EdgeConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // RFC 8441 WebSockets over h2.
        .enable_connect_protocol()
        // HPACK-decoded size of a header block: beyond it the stream is refused (431) and
        // CONTINUATION frames past it end the connection.
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX))
        // Bounds the requests (and their head, body window and send buffer) that one
        // connection holds at once.
        .max_concurrent_streams(config.h2_max_streams)
        .max_pending_accept_reset_streams(H2_PENDING_RESETS)
        .max_local_error_reset_streams(H2_LOCAL_RESETS)
        .max_send_buf_size(H2_SEND_BUFFER)
        // Fixed windows (not adaptive, which can grow them) keep the figure above.
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        // hyper's 16 KiB frames: the smallest RFC 9113 allows, the least held per frame.
        .max_frame_size(16 * 1024)
        // A ping after a minute of silence finds a dead peer (NAT timeouts) that would
        // otherwise keep a connection open; 20 s to answer it.
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
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
