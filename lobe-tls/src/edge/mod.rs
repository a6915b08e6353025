//! The TLS edge behind `lobe-tls serve`: TLS with certificates from a resolver, then
//! either L7 (`http` mode: HTTP/1.1 and h2 to clients, pooled HTTP/1.1 to upstreams) or
//! L4 (`tcp` mode: bytes forwarded as they arrive).
//!
//! A connection passes through fixed phases, one module each: [`limits`] (connection
//! caps, before TLS), [`accept`] (PROXY header, ClientHello, handshake), [`site`]
//! (Host and path → pool), [`limits`] again (request rate), [`upstream`] (balancing),
//! [`forwarded`] (the client's identity), [`proxy`] (the exchange, upgrades, streaming),
//! with [`health`] checking upstreams beside it and [`reload`] swapping the sites.

pub mod accept;
mod clock;
pub mod forwarded;
pub mod health;
mod http;
pub mod limits;
pub mod metrics;
mod pool;
pub mod proxy;
pub mod reload;
mod shard;
pub mod site;
pub mod tcp;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::ResolvesServerCert;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use accept::BeforeHandshake;
pub use ipnet::IpNet;
pub use metrics::EdgeMetrics;
pub use site::{RouteConfig, SiteConfig, UpstreamSpec, parse_sites};
pub use upstream::LbPolicy;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::resolver::ACME_TLS_ALPN;
use limits::Limits;
use site::Router;

/// How the edge treats decrypted connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// L7: HTTP/1.1 and h2 to clients, pooled keep-alive HTTP/1.1 to upstreams.
    #[default]
    Http,
    /// L4: decrypted bytes forwarded to an upstream as they arrive.
    Tcp,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "http" => Ok(Mode::Http),
            "tcp" => Ok(Mode::Tcp),
            other => Err(Error::Config(format!(
                "unknown mode {other:?}: use http or tcp"
            ))),
        }
    }
}

/// The edge's settings; the sites can be replaced later through [`EdgeHandle::reload`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EdgeConfig {
    /// `http` (default) or `tcp`.
    pub mode: Mode,
    /// The sites.
    pub sites: Vec<SiteConfig>,
    /// ALPN offered (besides `acme-tls/1`). Default: `h2`, `http/1.1` in http mode,
    /// `http/1.1` in tcp mode (see [`EdgeConfig::alpn`]).
    pub alpn: Option<Vec<Vec<u8>>>,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a client has to send a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, h2 header list), bytes.
    pub max_header_size: usize,
    /// On shutdown, how long open connections may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// How long an HTTP connection may wait, with no request in flight, for its next
    /// request (its first one: `header_read_timeout`).
    pub keepalive_timeout: Duration,
    /// Connections open at once, in total.
    pub max_conns: Option<usize>,
    /// Connections open at once from one client address: the address a PROXY header
    /// names when one is required, else the peer's. Peers in `trusted_proxies` are not
    /// capped per address (many clients share them); they count toward `max_conns`.
    pub max_conns_per_ip: Option<usize>,
    /// Requests per second per client address (429 beyond).
    pub rate_limit: Option<u32>,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are kept.
    pub trusted_proxies: Vec<IpNet>,
    /// Require a PROXY v1/v2 header before TLS, within this time.
    pub accept_proxy_protocol: Option<Duration>,
    /// tcp mode: send a PROXY v2 header to the upstream.
    pub send_proxy_v2: bool,
    /// Threads that accept and serve connections, each with its own single-threaded
    /// runtime (see [`Edge::run`]); 1 (the default) serves on the caller's runtime.
    pub threads: usize,
}

impl EdgeConfig {
    /// The defaults for `sites`: http mode, 10 s handshakes and header reads, 75 s
    /// keep-alive, 16 KiB heads, 30 s drain, no connection or rate limits.
    pub fn new(sites: Vec<SiteConfig>) -> Self {
        EdgeConfig {
            mode: Mode::Http,
            sites,
            alpn: None,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            drain_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            max_conns: None,
            max_conns_per_ip: None,
            rate_limit: None,
            trusted_proxies: Vec::new(),
            accept_proxy_protocol: None,
            send_proxy_v2: false,
            threads: 1,
        }
    }

    /// The ALPN list in effect.
    pub fn alpn(&self) -> Vec<Vec<u8>> {
        match (&self.alpn, self.mode) {
            (Some(alpn), _) => alpn.clone(),
            (None, Mode::Http) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (None, Mode::Tcp) => vec![b"http/1.1".to_vec()],
        }
    }
}

/// The store secret that holds the affinity cookie key.
const AFFINITY_SECRET: &str = "affinity-cookie-key";
/// The store lock under which the first instance creates it.
const AFFINITY_LOCK: &str = "_-affinity-cookie-key";

/// Makes affinity cookies valid on every instance sharing `store`, and across restarts:
/// the HMAC key comes from the store (created under its lock by the first instance,
/// 32 random bytes, a secret like the session ticket keys). Call it before the first
/// request; without it each process has a key of its own, and a client that reaches
/// another instance is re-pinned.
pub async fn share_affinity_key(store: &crate::store::DynStore) -> Result<()> {
    let secret = crate::store::SharedSecret {
        name: AFFINITY_SECRET,
        lock: AFFINITY_LOCK,
        what: "affinity key",
    }
    .load_or_create(
        store,
        // A shorter one is no key: replaced.
        |stored| (stored.len() >= 32).then(|| stored.to_vec()),
        |_| true,
        |_| {
            let fresh: [u8; 32] = rand::random();
            Ok((fresh.to_vec(), zeroize::Zeroizing::new(fresh.to_vec())))
        },
    )
    .await?;
    if !upstream::set_cookie_key(&secret) {
        tracing::warn!(
            "the affinity key was in use before it was read from the store; cookies pin on this process only"
        );
    }
    Ok(())
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub config: EdgeConfig,
    pub router: ArcSwap<Router>,
    pub limits: Limits,
    pub metrics: Arc<EdgeMetrics>,
    pub cert_metrics: Arc<Metrics>,
    /// Upgraded connections (WebSockets) outlive the HTTP connection they came on; they
    /// are drained with the others on shutdown.
    /// One set per accepting thread: a task belongs to the runtime it was spawned on.
    detached: Box<[Mutex<JoinSet<()>>]>,
    reload_lock: Mutex<()>,
    /// Turns true when the edge stops accepting: HTTP connections finish their requests
    /// and close.
    draining: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn spawn_detached(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self
            .detached_here()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Reap finished ones so the set does not grow.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// The detached tasks of the accepting thread this runs on.
    fn detached_here(&self) -> &Mutex<JoinSet<()>> {
        &self.detached[shard::current() % self.detached.len()]
    }
}

/// A handle to a running edge: reloads its sites, reads its metrics.
#[derive(Clone)]
pub struct EdgeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EdgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHandle").finish_non_exhaustive()
    }
}

impl EdgeHandle {
    /// Replaces the sites. New requests use the new sites at once; requests, streams and
    /// WebSockets in flight finish on the old ones (an upstream that was removed drains).
    /// Upstreams that stay keep their health state. On error the old sites stay.
    pub fn reload(&self, sites: Vec<SiteConfig>) -> Result<()> {
        let _one_at_a_time = self
            .shared
            .reload_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = self.shared.router.load_full();
        let router = Router::build(&sites, Some(&current), &self.shared.metrics)?;
        // Upstreams that are gone leave the up/down gauge (their old pools still drain).
        let kept = router.upstream_labels();
        for (site, upstream) in current.upstream_labels().difference(&kept) {
            self.shared
                .metrics
                .upstream_up
                .remove(&metrics::UpstreamLabels {
                    site: site.clone(),
                    upstream: upstream.clone(),
                });
        }
        self.shared.router.store(Arc::new(router));
        Ok(())
    }

    /// The edge's metric families.
    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        self.shared.metrics.clone()
    }
}

/// A bound TLS listener, ready to [`run`](Edge::run).
pub struct Edge {
    listener: TcpListener,
    local_addr: SocketAddr,
    accept: Arc<accept::TlsAccept>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("local_addr", &self.local_addr)
            .field("mode", &self.shared.config.mode)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// Binds `listen`, builds the TLS configuration around `resolver` and the sites.
    /// Must be called inside a Tokio runtime (health checks start here).
    pub async fn bind(
        listen: &str,
        resolver: Arc<dyn ResolvesServerCert>,
        config: EdgeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let tls = crate::tls_config::server_config(resolver, &config.alpn(), None)?;
        Edge::bind_tls(listen, Arc::new(tls), config, metrics).await
    }

    /// Binds `listen` with a TLS configuration built elsewhere, e.g. by
    /// [`crate::tls_config::server_config`] with session tickets shared through a store.
    /// Its ALPN list should be [`EdgeConfig::alpn`]'s.
    pub async fn bind_tls(
        listen: &str,
        tls: Arc<rustls::ServerConfig>,
        config: EdgeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let edge_metrics = Arc::new(EdgeMetrics::default());
        let router = Router::build(&config.sites, None, &edge_metrics)?;
        let (listener, local_addr) = crate::listen::bind(listen).await?;
        let accept = accept::TlsAccept {
            config: tls,
            handshake_timeout: config.handshake_timeout,
            proxy_protocol: config.accept_proxy_protocol,
            hook: None,
            on_demand: None,
            ip_configs: None,
        };
        let limits = Limits::new(
            config.max_conns,
            config.max_conns_per_ip,
            config.rate_limit,
            config.trusted_proxies.clone(),
        );
        let detached = (0..config.threads.max(1))
            .map(|_| Mutex::new(JoinSet::new()))
            .collect();
        Ok(Edge {
            listener,
            local_addr,
            accept: Arc::new(accept),
            shared: Arc::new(Shared {
                config,
                router: ArcSwap::from_pointee(router),
                limits,
                metrics: edge_metrics,
                cert_metrics: metrics,
                detached,
                reload_lock: Mutex::new(()),
                draining: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    /// Runs `hook` before each handshake (see [`BeforeHandshake`]).
    pub fn before_handshake(mut self, hook: Arc<dyn BeforeHandshake>) -> Self {
        if let Some(accept) = Arc::get_mut(&mut self.accept) {
            accept.hook = Some(hook);
        }
        self
    }

    /// Issues certificates for names nothing serves yet, during their first handshake,
    /// as `on_demand`'s guard allows (see [`crate::on_demand`]).
    pub fn with_on_demand(mut self, on_demand: crate::on_demand::OnDemand) -> Self {
        if let Some(accept) = Arc::get_mut(&mut self.accept) {
            accept.on_demand = Some(on_demand);
        }
        self
    }

    /// Serves the IP address certificates `certs` holds (RFC 8738) to clients that send
    /// no server name, chosen by the local address each connection arrived on.
    pub fn with_ip_certs(mut self, certs: crate::resolver::CertResolver) -> Self {
        if let Some(accept) = Arc::get_mut(&mut self.accept) {
            let base = accept.config.clone();
            accept.ip_configs = Some(Arc::new(crate::resolver::LocalAddrConfigs::new(
                base, certs,
            )));
        }
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle for reloads and metrics.
    pub fn handle(&self) -> EdgeHandle {
        EdgeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts and serves connections until `shutdown` completes; then stops accepting,
    /// asks HTTP connections to finish (keep-alive ones close after their request) and
    /// gives open connections and WebSockets up to the drain timeout before cutting them.
    ///
    /// With [`EdgeConfig::threads`] above one, that many threads accept from the socket,
    /// each on a single-threaded runtime of its own, and serve what they accepted start
    /// to finish, as nginx's workers do: a connection's tasks and its upstream
    /// keep-alive connections stay on one thread and its caches.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Edge {
            listener,
            local_addr,
            accept,
            shared,
        } = self;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let threads = shared.config.threads.max(1);
        let started = if threads > 1 {
            shard::spawn(threads, listener, local_addr, &accept, &shared, &stopped)
        } else {
            Err(listener)
        };
        match started {
            Ok(done) => {
                shutdown.await;
                stop.send_replace(true);
                for thread in done {
                    let _ = thread.await;
                }
            }
            Err(listener) => {
                let serving =
                    shard::accept_loop(listener, local_addr, accept, shared, stopped, None);
                tokio::pin!(serving);
                tokio::select! {
                    _ = shutdown => {}
                    _ = &mut serving => return,
                }
                stop.send_replace(true);
                serving.await;
            }
        }
    }
}

/// What an open client connection holds until its last user is gone: its place in the
/// connection limits and the active-connection gauges. An upgraded connection (a
/// WebSocket, served by a task of its own) holds it past the HTTP connection it came on,
/// until its stream closes.
pub(crate) struct ConnHold {
    _permit: limits::ConnPermit,
    _gauge: metrics::GaugeGuard,
    _active: Option<crate::metrics::ActiveConnection>,
}

impl std::fmt::Debug for ConnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHold").finish_non_exhaustive()
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accept: Arc<accept::TlsAccept>,
    shared: Arc<Shared>,
    mut permit: limits::ConnPermit,
) {
    // Interactive traffic (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (client, local) = match accept.client_of(&mut stream, peer, local).await {
        Ok(addresses) => addresses,
        Err(e) => {
            shared.metrics.reject("proxy_protocol");
            tracing::debug!(%peer, error = %e, "connection without a valid PROXY header refused");
            return;
        }
    };
    // The per-address cap applies to the client a PROXY header names, not to the
    // balancer in front (admitted by its peer address otherwise, before anything is read).
    if shared.config.accept_proxy_protocol.is_some()
        && let Err(refused) = permit.admit_ip(&shared.limits, client.ip())
    {
        shared.metrics.reject(refused.reason());
        tracing::debug!(%peer, %client, reason = refused.reason(), "connection refused");
        return;
    }
    let accepted = match accept.handshake(stream, client, local).await {
        Ok(accepted) => accepted,
        Err(e) => {
            shared.cert_metrics.handshake_failed();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    shared.cert_metrics.handshake_ok();
    let mut accepted = accepted;
    if accepted.tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the whole point (RFC 8737).
        use tokio::io::AsyncWriteExt;
        let _ = accepted.tls.shutdown().await;
        return;
    }
    let mut hold = ConnHold {
        _permit: permit,
        _gauge: metrics::GaugeGuard::new(shared.metrics.connections.clone()),
        _active: None,
    };
    match shared.config.mode {
        Mode::Tcp => tcp::serve(accepted, shared).await,
        Mode::Http => {
            hold._active = Some(shared.cert_metrics.connection_opened());
            http::serve(accepted, shared, hold).await
        }
    }
}
