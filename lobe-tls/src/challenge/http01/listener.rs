//! The standalone port-80 listener: connection caps (in total and per client network),
//! header and idle timeouts, and connection tasks it tracks and ends on shutdown.
//!
//! When the total is full, a new connection takes the place of the one that has waited
//! longest without a request in flight (see [`super::places`]): refusing it instead
//! would let a flood of idle connections refuse the CA's validation too. The per-client
//! cap still refuses: it is that client's own budget.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::Http01Service;
use super::places::{Admission, Place, Places};
use crate::client_key::ClientPrefixes;
use crate::conn_limits::{ConnLimits, ConnPermit, Refused};
use crate::error::Result;

/// How a standalone HTTP-01 listener guards itself.
///
/// Port 80 has caps of its own, apart from the TLS listener's, so that a flood of plain
/// connections cannot use up the connections HTTPS clients need (see
/// [`Http01ListenerConfig::beside_tls`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Http01ListenerConfig {
    /// Connections open at once, in total. When it is full, a new connection takes the
    /// place of the one that has waited longest without a request in flight (which is
    /// closed); it is closed as soon as accepted only if every place holds a request in
    /// flight. `None`: no cap.
    pub max_conns: Option<usize>,
    /// Connections open at once from one client (an IPv4 address or IPv6 network, as
    /// `client_prefixes` groups them); more are closed as soon as accepted. `None`: no cap.
    pub max_conns_per_client: Option<usize>,
    /// How client addresses are grouped into clients.
    pub client_prefixes: ClientPrefixes,
    /// Peers not capped per client (they still count in the total): trusted proxies or
    /// load balancers in front of port 80, behind which many clients share one address.
    pub exempt: Vec<ipnet::IpNet>,
    /// How long a client has to send a request's headers, counted from the connection's
    /// first byte or from the end of its previous response: this also bounds how long a
    /// kept-alive connection may sit idle.
    pub header_read_timeout: Duration,
    /// How long one connection may stay open at all.
    pub connection_limit: Duration,
    /// On shutdown, how long requests in progress have to finish before their
    /// connections are cut.
    pub drain: Duration,
}

impl Default for Http01ListenerConfig {
    /// 1,024 connections in total, 64 per client, 10 s to send headers (and of keep-alive
    /// idleness), 120 s per connection, 1 s of drain.
    fn default() -> Self {
        Http01ListenerConfig {
            max_conns: Some(DEFAULT_MAX_CONNS),
            max_conns_per_client: Some(DEFAULT_MAX_CONNS_PER_CLIENT),
            client_prefixes: ClientPrefixes::default(),
            exempt: Vec::new(),
            header_read_timeout: crate::listen::HTTP_HEADER_READ_TIMEOUT,
            connection_limit: crate::listen::HTTP_CONNECTION_LIMIT,
            drain: Duration::from_secs(1),
        }
    }
}

/// The default total cap of a standalone listener.
const DEFAULT_MAX_CONNS: usize = 1024;
/// The default per-client cap of a standalone listener.
const DEFAULT_MAX_CONNS_PER_CLIENT: usize = 64;
/// The least total cap [`Http01ListenerConfig::beside_tls`] derives.
const MIN_MAX_CONNS: usize = 64;
/// The most per-client cap [`Http01ListenerConfig::beside_tls`] derives.
const MAX_MAX_CONNS_PER_CLIENT: usize = 256;

impl Http01ListenerConfig {
    /// The caps of a port-80 listener that runs beside a TLS listener capped at
    /// `max_conns` in total and `max_conns_per_client` per client (`None`: no cap).
    ///
    /// Port 80 gets caps of its own, so a flood there never takes connections from the
    /// TLS listener: an eighth of the TLS total (at least 64), and the TLS per-client cap
    /// but never more than a quarter of port 80's total (so no single client can fill
    /// it) nor more than 256. Port 80 carries only ACME validation and redirects to
    /// HTTPS, short requests that need few connections.
    pub fn beside_tls(
        max_conns: Option<usize>,
        max_conns_per_client: Option<usize>,
        client_prefixes: ClientPrefixes,
        exempt: Vec<ipnet::IpNet>,
    ) -> Self {
        let total = max_conns.map(|n| (n / 8).max(MIN_MAX_CONNS));
        let quarter = total.map(|total| (total / 4).max(1));
        let per_client = match (max_conns_per_client, quarter) {
            (Some(per), Some(quarter)) => Some(per.min(quarter)),
            (per, quarter) => per.or(quarter),
        }
        .map(|per| per.min(MAX_MAX_CONNS_PER_CLIENT));
        Http01ListenerConfig {
            max_conns: total,
            max_conns_per_client: per_client,
            client_prefixes,
            exempt,
            ..Http01ListenerConfig::default()
        }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `max_conns` or `max_conns_per_ip`.
    pub reason: String,
}

/// The counters of a standalone HTTP-01 listener.
#[derive(Debug, Default)]
pub struct Http01Metrics {
    /// Connections closed as soon as accepted, by reason.
    pub rejected: Family<RefusalLabels, Counter>,
    /// Waiting connections closed to make room for a new one while the total was full.
    pub evicted: Counter,
    /// Connections open now.
    pub connections: Gauge,
}

impl Http01Metrics {
    /// Adds the families to `registry` under the prefix `http01_`. The registry is
    /// expected to carry the crate's `lobe_tls` prefix already (as the one behind
    /// [`crate::metrics::Metrics::register`] does), so the names read
    /// `lobe_tls_http01_rejected_connections_total{reason}`,
    /// `lobe_tls_http01_evicted_connections_total` and `lobe_tls_http01_connections`.
    pub fn register(&self, registry: &mut Registry) {
        // Both reasons show from the start, at zero.
        for reason in ["max_conns", "max_conns_per_ip"] {
            let _ = self.rejected.get_or_create(&RefusalLabels {
                reason: reason.to_owned(),
            });
        }
        let r = registry.sub_registry_with_prefix("http01");
        r.register(
            "rejected_connections",
            "Port-80 connections closed as soon as accepted, by reason",
            self.rejected.clone(),
        );
        r.register(
            "evicted_connections",
            "Port-80 connections waiting without a request, closed to make room for a new one",
            self.evicted.clone(),
        );
        r.register(
            "connections",
            "Open port-80 connections",
            self.connections.clone(),
        );
    }

    /// How many connections were refused for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .get(&RefusalLabels {
                reason: reason.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&RefusalLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// A standalone HTTP listener that serves an [`Http01Service`].
///
/// Its connection tasks belong to it: dropping the listener (or
/// [`Http01Listener::shutdown`]) stops accepting, lets requests in progress finish for
/// the configured drain, and then ends every connection.
#[derive(Debug)]
pub struct Http01Listener {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    metrics: Arc<Http01Metrics>,
}

impl Http01Listener {
    /// Binds `addr` and starts answering challenges from `service`, with the default
    /// guards ([`Http01ListenerConfig::default`]).
    pub async fn bind(addr: SocketAddr, service: Http01Service) -> Result<Self> {
        Self::bind_with(addr, service, Http01ListenerConfig::default()).await
    }

    /// Binds `addr` and starts answering challenges from `service`, guarded as `config`
    /// says.
    pub async fn bind_with(
        addr: SocketAddr,
        service: Http01Service,
        config: Http01ListenerConfig,
    ) -> Result<Self> {
        let (listener, local_addr) = crate::listen::bind(addr).await?;
        let metrics = Arc::new(Http01Metrics::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            service,
            config,
            metrics.clone(),
            stopped,
        ));
        Ok(Http01Listener {
            local_addr,
            stop,
            task: Some(task),
            metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listener's counters, to register with [`Http01Metrics::register`].
    pub fn metrics(&self) -> Arc<Http01Metrics> {
        self.metrics.clone()
    }

    /// Stops accepting, lets requests in progress finish (up to the drain time), ends
    /// every connection, and returns once all of them are gone.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Http01Listener {
    fn drop(&mut self) {
        // The accept loop drains and ends the connections by itself, within the drain.
        let _ = self.stop.send(true);
    }
}

/// Serves `service` on every connection `listener` accepts, with the default guards,
/// until the returned future is dropped (which ends every connection with it).
pub async fn serve(listener: TcpListener, service: Http01Service) {
    let (_stop, stopped) = watch::channel(false);
    let metrics = Arc::new(Http01Metrics::default());
    accept_loop(
        listener,
        service,
        Http01ListenerConfig::default(),
        metrics,
        stopped,
    )
    .await;
}

async fn accept_loop(
    listener: TcpListener,
    service: Http01Service,
    config: Http01ListenerConfig,
    metrics: Arc<Http01Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // The total is kept by `places`, which can evict; `caps` keeps the per-client cap.
    let caps = ConnLimits::new(
        None,
        config.max_conns_per_client,
        config.client_prefixes,
        config.exempt.clone(),
    );
    let places = Places::new(config.max_conns);
    let config = Arc::new(config);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // A send of `true`, or the listener dropped.
            _ = stop.changed() => break,
            // Reaped as they end, so the set holds only live connections.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "HTTP-01 listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Closed at once when refused: the stream drops here.
                let permit = match caps.admit(peer.ip()) {
                    Ok(permit) => permit,
                    Err(refused) => {
                        let reason = refused.reason();
                        metrics.reject(reason);
                        tracing::debug!(reason, "port-80 connection refused");
                        continue;
                    }
                };
                let Some(admission) = places.admit() else {
                    metrics.reject(Refused::Total.reason());
                    tracing::debug!("port-80 connection refused: every place has a request in flight");
                    continue;
                };
                if admission.evicted_another {
                    metrics.evicted.inc();
                    tracing::debug!("port-80 connection evicted to make room for a new one");
                }
                let _ = stream.set_nodelay(true);
                tasks.spawn(connection(
                    stream,
                    service.clone(),
                    config.clone(),
                    metrics.clone(),
                    stop.clone(),
                    permit,
                    admission,
                ));
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(config.drain, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            left = tasks.len(),
            "port-80 connections cut at the end of the drain"
        );
    }
    tasks.shutdown().await;
}

async fn connection(
    stream: TcpStream,
    service: Http01Service,
    config: Arc<Http01ListenerConfig>,
    metrics: Arc<Http01Metrics>,
    mut stop: watch::Receiver<bool>,
    _permit: ConnPermit,
    admission: Admission,
) {
    metrics.connections.inc();
    let _open = scopeguard(|| {
        metrics.connections.dec();
    });
    let Admission {
        place, mut evicted, ..
    } = admission;
    let place: Arc<Place> = Arc::new(place);
    let hyper_service = hyper::service::service_fn(move |req| {
        let service = service.clone();
        let place = place.clone();
        async move {
            // From a full head to the answer: this connection keeps its place.
            let _in_flight = place.in_flight();
            Ok::<_, Infallible>(service.call_inner(req).await)
        }
    });
    let builder = crate::listen::http1_builder(config.header_read_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), hyper_service);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        // Another connection took its place: closed as it stands.
        _ = &mut evicted => return,
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(config.connection_limit) => return,
        // Shutting down: finish the request in progress, if any, then close.
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(config.drain, conn).await;
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    use super::*;
    use crate::Http01Registry;

    /// A connection to `addr` from the loopback address `from` (127.0.0.x).
    async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind client");
        socket.connect(addr).await.expect("connect")
    }

    /// How long until the server closes `stream` (EOF or reset), reading and dropping
    /// whatever comes before; `None` if it is still open after `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => continue,
                }
            }
        })
        .await
        .ok()
    }

    /// One request on `stream`, keeping it alive; the response head and body.
    async fn request(stream: &mut TcpStream, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // Small, complete responses: read until the body's length is in.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|l| l.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no response to {path}");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn listener_with_token(config: Http01ListenerConfig) -> Http01Listener {
        let registry = Http01Registry::new();
        registry.insert("tok", "tok.thumb").await.expect("insert");
        Http01Listener::bind_with(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            registry.service(),
            config,
        )
        .await
        .expect("bind")
    }

    #[tokio::test]
    async fn connections_past_a_clients_cap_are_closed_while_others_get_through() {
        let listener = listener_with_token(Http01ListenerConfig::default()).await;
        let addr = listener.local_addr();
        let attacker = Ipv4Addr::new(127, 0, 0, 1);
        let mut held = Vec::new();
        for _ in 0..DEFAULT_MAX_CONNS_PER_CLIENT {
            held.push(connect_from(attacker, addr).await);
        }
        // Those within the cap stay open.
        assert!(
            closed_within(&mut held[0], Duration::from_millis(300))
                .await
                .is_none()
        );
        for _ in 0..10 {
            let mut extra = connect_from(attacker, addr).await;
            assert!(
                closed_within(&mut extra, Duration::from_secs(2))
                    .await
                    .is_some(),
                "a connection past the per-client cap stayed open"
            );
        }
        let mut legit = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr).await;
        let rsp = request(&mut legit, "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with("tok.thumb"), "{rsp}");
        assert_eq!(listener.metrics().rejected("max_conns_per_ip"), 10);
        assert_eq!(listener.metrics().rejected("max_conns"), 0);
    }

    /// Waits until `metrics` shows `open` connections (accepted and counted).
    async fn until_open(metrics: &Http01Metrics, open: i64) {
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.connections.get() != open {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{} connections open, not {open}",
            metrics.connections.get()
        );
    }

    /// With the defaults: a flood of idle connections from several clients, each within
    /// its own cap, fills the total. A newcomer from another address is still answered,
    /// and the connection closed for it is the one that has waited longest without a
    /// request in flight: one that sent part of a head counts as waiting, one that was
    /// answered since waits from its answer.
    #[tokio::test]
    async fn a_full_total_evicts_the_idlest_connection_for_each_newcomer() {
        let listener = listener_with_token(Http01ListenerConfig::default()).await;
        let addr = listener.local_addr();
        let metrics = listener.metrics();
        let clients = DEFAULT_MAX_CONNS / DEFAULT_MAX_CONNS_PER_CLIENT;
        let flood_client = |i: usize| {
            let last = u8::try_from(i % clients + 1).unwrap_or(u8::MAX);
            Ipv4Addr::new(127, 0, 3, last)
        };
        let mut flood = Vec::with_capacity(DEFAULT_MAX_CONNS);
        for i in 0..DEFAULT_MAX_CONNS {
            flood.push(connect_from(flood_client(i), addr).await);
        }
        until_open(&metrics, 1024).await;
        // The oldest sends a head a few bytes at a time and never ends it.
        for part in [
            "GET /.well-known/",
            "acme-challenge/tok HTTP/1.1\r\n",
            "Host: ex",
        ] {
            flood[0].write_all(part.as_bytes()).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next is answered: it now waits from its answer, the latest to wait.
        let rsp = request(&mut flood[1], "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");

        let legit = Ipv4Addr::new(127, 0, 0, 2);
        let mut first = connect_from(legit, addr).await;
        let rsp = request(&mut first, "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with("tok.thumb"), "{rsp}");
        let within = Duration::from_secs(2);
        assert!(
            closed_within(&mut flood[0], within).await.is_some(),
            "the connection waiting longest (its head unfinished) stayed open"
        );
        let mut second = connect_from(legit, addr).await;
        let rsp = request(&mut second, "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(
            closed_within(&mut flood[2], within).await.is_some(),
            "the next waiting longest stayed open"
        );
        let still = Duration::from_millis(200);
        for i in [1, 3, 4, 1023] {
            assert!(
                closed_within(&mut flood[i], still).await.is_none(),
                "flood connection {i} was closed out of turn"
            );
        }
        // A client at its own cap is still refused, and evicts nobody.
        let mut over = connect_from(flood_client(4), addr).await;
        assert!(closed_within(&mut over, within).await.is_some());
        assert_eq!(metrics.rejected("max_conns_per_ip"), 1);
        assert_eq!(metrics.evicted.get(), 2);
        // Each newcomer in turn is answered, at the cost of the flood's oldest.
        let mut newcomers = Vec::new();
        for _ in 0..20 {
            let mut next = connect_from(legit, addr).await;
            let rsp = request(&mut next, "/.well-known/acme-challenge/tok").await;
            assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
            newcomers.push(next);
        }
        assert_eq!(metrics.evicted.get(), 22);
        assert_eq!(metrics.rejected("max_conns"), 0);
        until_open(&metrics, 1024).await;

        assert!(closed_within(&mut flood[1], still).await.is_none());
    }

    /// With the defaults: a client that sends nothing, one that sends its headers a
    /// byte at a time, and one idle after a first request are all cut at the header
    /// read timeout (10 s), not at the connection limit (120 s).
    #[tokio::test]
    async fn slow_and_idle_clients_are_cut_at_the_header_timeout() {
        let listener = listener_with_token(Http01ListenerConfig::default()).await;
        let addr = listener.local_addr();
        let from = Ipv4Addr::LOCALHOST;
        let timeout = crate::listen::HTTP_HEADER_READ_TIMEOUT;
        let within = timeout + Duration::from_secs(3);

        let mut silent = connect_from(from, addr).await;
        let mut dribbling = connect_from(from, addr).await;
        let mut idle = connect_from(from, addr).await;
        let rsp = request(&mut idle, "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        let dribble = tokio::spawn(async move {
            let started = Instant::now();
            // The head never ends: after the request line, one header after another, a
            // byte at a time.
            let head = b"GET / HTTP/1.1\r\n"
                .iter()
                .chain(b"X-Slow: 1\r\n".iter().cycle());
            for b in head {
                // A write fails once the server has closed (the first one draws a reset).
                if dribbling.write_all(&[*b]).await.is_err() || started.elapsed() > within {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            started.elapsed()
        });
        let (silent, idle) = tokio::join!(
            closed_within(&mut silent, within),
            closed_within(&mut idle, within)
        );
        for (what, closed) in [("silent", silent), ("idle", idle)] {
            let closed = closed.unwrap_or_else(|| panic!("{what} client still open"));
            assert!(
                closed + Duration::from_secs(1) >= timeout,
                "{what}: {closed:?}"
            );
        }
        let dribbled = dribble.await.expect("dribbling client");
        assert!(
            dribbled < within,
            "dribbling client still open after {dribbled:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_listener_ends_its_connections_after_the_drain() {
        let listener = listener_with_token(Http01ListenerConfig::default()).await;
        let addr = listener.local_addr();
        let metrics = listener.metrics();
        let mut idle = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        let rsp = request(&mut idle, "/.well-known/acme-challenge/tok").await;
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        let mut silent = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.connections.get(), 2);

        drop(listener);
        // Well before the header timeout would have cut them.
        let within = Duration::from_secs(3);
        assert!(closed_within(&mut idle, within).await.is_some());
        assert!(closed_within(&mut silent, within).await.is_some());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(metrics.connections.get(), 0);
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn shutdown_returns_once_every_connection_is_gone() {
        let listener = listener_with_token(Http01ListenerConfig::default()).await;
        let addr = listener.local_addr();
        let metrics = listener.metrics();
        let mut silent = connect_from(Ipv4Addr::LOCALHOST, addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        listener.shutdown().await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(metrics.connections.get(), 0);
        assert!(
            closed_within(&mut silent, Duration::from_millis(500))
                .await
                .is_some()
        );
    }

    #[test]
    fn port_80_caps_beside_tls_are_their_own_and_no_client_fills_them() {
        let prefixes = ClientPrefixes::default();
        let c = Http01ListenerConfig::beside_tls(Some(100_000), Some(4096), prefixes, vec![]);
        assert_eq!(
            (c.max_conns, c.max_conns_per_client),
            (Some(12_500), Some(256))
        );
        let c = Http01ListenerConfig::beside_tls(Some(384), Some(4096), prefixes, vec![]);
        assert_eq!((c.max_conns, c.max_conns_per_client), (Some(64), Some(16)));
        let c = Http01ListenerConfig::beside_tls(None, Some(10), prefixes, vec![]);
        assert_eq!((c.max_conns, c.max_conns_per_client), (None, Some(10)));
    }
}
