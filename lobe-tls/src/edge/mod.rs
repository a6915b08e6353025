//! The TLS edge behind `lobe-tls serve`: TLS with certificates from a resolver, then
//! either L7 (`http` mode: HTTP/1.1 and h2 to clients, pooled HTTP/1.1 to upstreams) or
//! L4 (`tcp` mode: bytes forwarded as they arrive).
//!
//! This module is the face: [`Edge`] and its builder methods, [`EdgeHandle`], and the
//! configuration types re-exported. Inside, a connection runs down fixed phases, one
//! module each, and imports run the same way, down, never back:
//!
//! - `shard`: accepting threads, each serving what it accepted start to finish.
//! - `conn`: one connection: `limits` (connection caps, before TLS), then `accept`
//!   (PROXY header, ClientHello, handshake), then its mode.
//! - `http` / `tcp`: the connection's protocol; `tcp` forwards bytes to an upstream.
//! - `proxy`: one exchange: `limits` (request rate), `forwarded` (the client's
//!   identity), `headers` (Host, hop-by-hop fields), `request_body` (a slow body cut,
//!   a small one kept for a retry within the `budget`), `upgrade` (WebSocket and h2
//!   CONNECT), `relay` (the response body, streamed), with the `inflight` caps; each
//!   ends in `access_log` (a record to the log's writer thread).
//! - `site`: Host and path to a pool; it builds the pools and starts their checks, and
//!   holds each block's IP lists (`ip_lists`) and credentials (`auth`: API keys and
//!   basic auth).
//! - `upstream`: the balancing policies that pick an upstream in a pool.
//! - `pool`: keep-alive connections to one upstream.
//! - `health`: active checks beside the request path, writing `upstream_state`.
//! - `reload`: reads the sites of a configuration file, for a start or a reload.
//!
//! `crate::server` stands above the edge: it binds it with the manager, port 80 and the
//! metrics listener, as `lobe-tls serve` runs them.
//!
//! Below them all stand leaves that import nothing of the edge: `config` (settings,
//! sites, durations; `config_file` reads them from the TOML file), `upstream_state` (each upstream's open count and health),
//! `body`, `metrics`, `clock`, `thread_slot` and `access_log` (the record and its writer
//! thread); `hold` is what one connection holds
//! (its permits, its requests in flight), and `shared` what every connection task of one
//! edge shares.

mod accept;
mod access_log;
mod auth;
mod body;
mod budget;
mod clock;
mod config;
mod config_file;
mod conn;
mod copy;
mod forwarded;
mod headers;
mod health;
mod hold;
mod http;
mod inflight;
mod ip_lists;
mod limits;
mod metrics;
mod pool;
mod proxy;
mod relay;
mod reload;
mod request_body;
mod request_id;
mod shard;
mod shared;
mod site;
pub(crate) mod tcp;
mod thread_slot;
mod upgrade;
mod upstream;
mod upstream_state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::ResolvesServerCert;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use accept::BeforeHandshake;
pub use auth::problems as auth_problems;
pub use config::{
    AccessLogFormat, AccessLogTarget, DEFAULT_H2_MAX_STREAMS, DEFAULT_MAX_CONNS,
    DEFAULT_MAX_CONNS_PER_IP, DEFAULT_MAX_REQUESTS_PER_IP, DEFAULT_RETRY_BUFFER_PER_CONN,
    DEFAULT_RETRY_BUFFER_TOTAL, EdgeConfig, LbPolicy, Mode, RouteConfig, SiteConfig, UpstreamSpec,
    claim_problems,
};
pub use config_file::{CONFIG_KEYS, parse_sites};
pub use health::warn_unresolved_upstreams;
pub use ip_lists::{IpTable, parse_cidr};
pub use ipnet::IpNet;
pub use metrics::EdgeMetrics;
pub use reload::read_sites;
pub use site::SiteStatus;
pub use upstream_state::{CheckResult, UpstreamStatus};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use limits::Limits;
use shared::Shared;
use site::Router;

/// The store secret that holds the affinity cookie key.
const AFFINITY_SECRET: &str = "affinity-cookie-key";
/// The store lock under which the first instance creates it.
const AFFINITY_LOCK: &str = "_-affinity-cookie-key";

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
        check_auth_mode(&sites, self.shared.config.mode)?;
        let current = self.shared.router.load_full();
        let key = self.shared.affinity_key.load();
        let router = Router::build(&sites, Some(&current), &self.shared.metrics, &key)?;
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
        for labels in current
            .upstream_route_labels()
            .difference(&router.upstream_route_labels())
        {
            self.shared.metrics.remove_upstream(labels);
        }
        self.shared.router.store(Arc::new(router));
        Ok(())
    }

    /// Reopens the access log file by its path (after logrotate moved it away): lines
    /// go to the new file from the next batch on. Nothing happens without an access log
    /// file.
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// Re-reads the configuration file at `path` and swaps in its sites, plus `extra`
    /// (sites from command-line flags); returns the sites now in effect (e.g. to have
    /// certificates issued for new domains). On error nothing changes, and the one-line
    /// error says why.
    pub fn reload_from(
        &self,
        path: &std::path::Path,
        extra: &[SiteConfig],
    ) -> Result<Vec<SiteConfig>> {
        let mut sites = reload::read_sites(path)?;
        sites.extend(extra.iter().cloned());
        self.reload(sites.clone())?;
        Ok(sites)
    }

    /// Every site now in effect, with its upstreams' state (for a status page).
    pub fn status(&self) -> Vec<SiteStatus> {
        self.shared
            .router
            .load()
            .all()
            .map(|site| site.status())
            .collect()
    }

    /// The edge's metric families.
    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        self.shared.metrics.clone()
    }

    /// The edge's connection caps; a clone shares their counts, so another listener
    /// given it shares `max_conns` and `max_conns_per_ip` with the edge.
    pub fn conn_limits(&self) -> crate::conn_limits::ConnLimits {
        self.shared.limits.conns().clone()
    }
}

/// API keys and basic auth are HTTP headers: a tcp-mode edge, which never reads them,
/// refuses sites that ask for them rather than letting everyone through.
fn check_auth_mode(sites: &[SiteConfig], mode: Mode) -> Result<()> {
    match sites.iter().find(|site| site.has_auth()) {
        Some(site) if mode == Mode::Tcp => Err(Error::config(format!(
            "site {}: api_keys_file and basic_auth_file need --mode http (tcp mode reads no headers)",
            site.name()
        ))),
        _ => Ok(()),
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
        listen: SocketAddr,
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
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        config: EdgeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        if config.accept_proxy_protocol.is_some() && config.trusted_proxies.is_empty() {
            // Believed from everyone, a PROXY header lets any client pick its address.
            return Err(Error::config(
                "accept_proxy_protocol needs trusted_proxies: the peers whose PROXY headers are believed",
            ));
        }
        check_auth_mode(&config.sites, config.mode)?;
        let edge_metrics = Arc::new(EdgeMetrics::default());
        let affinity_key = upstream::AffinityKey::random();
        let router = Router::build(&config.sites, None, &edge_metrics, &affinity_key)?;
        let (listener, local_addr) = crate::listen::bind(listen).await?;
        let accept = accept::TlsAccept {
            config: tls,
            handshake_timeout: config.handshake_timeout,
            proxy_protocol: config.accept_proxy_protocol,
            proxy_trusted: config.trusted_proxies.clone(),
            hook: None,
            on_demand: None,
            stored: None,
            ip_configs: None,
        };
        let limits = Limits::new(
            config.max_conns,
            config.max_conns_per_ip,
            config.rate_limit,
            config.client_prefixes,
            config.trusted_proxies.clone(),
        );
        let in_flight = inflight::InFlight::new(
            config.max_requests_per_ip,
            config.client_prefixes,
            config.trusted_proxies.clone(),
        );
        let replay = budget::ReplayBudget::new(
            config.retry_buffer_per_conn,
            config.retry_buffer_total,
            &edge_metrics,
        );
        let access_log = match &config.access_log {
            Some(target) => Some(access_log::AccessLog::start(
                target,
                config.access_log_format,
                edge_metrics.access_log_dropped.clone(),
            )?),
            None => None,
        };
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
                in_flight,
                affinity_key: ArcSwap::from_pointee(affinity_key),
                replay,
                access_log,
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

    /// While `manager` runs its initial load of the store, a handshake for a stored name
    /// not read yet reads that certificate first (see
    /// [`crate::manager::Manager::load_before_handshake`]), so the edge serves before the
    /// load ends.
    pub fn with_stored_certs(mut self, manager: crate::manager::Manager) -> Self {
        if let Some(accept) = Arc::get_mut(&mut self.accept) {
            accept.stored = Some(manager);
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

    /// Makes this edge's affinity cookies valid on every instance sharing `store`, and
    /// across restarts: the HMAC key comes from the store (created under its lock by the
    /// first instance, 32 random bytes, a secret like the session ticket keys). Call it
    /// before [`Edge::run`]; without it the edge has a key of its own, and a client that
    /// reaches another instance is re-pinned. Other edges of the process keep theirs.
    pub async fn share_affinity_key(&self, store: &crate::store::DynStore) -> Result<()> {
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
        let key = upstream::AffinityKey::from_secret(&secret);
        // Under the reload lock, so that a reload builds its pools with the new key.
        let _one_at_a_time = self
            .shared
            .reload_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.affinity_key.store(Arc::new(key.clone()));
        for site in self.shared.router.load().all() {
            site.default.rekey(&key);
            for (_, pool) in &site.routes {
                pool.rekey(&key);
            }
        }
        Ok(())
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
