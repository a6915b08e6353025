//! The byte-forwarding terminator, now the edge's tcp mode ([`crate::edge`]): kept under
//! its old name for embedders that use it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;

pub use crate::edge::tcp::forward;
use crate::edge::{Edge, EdgeConfig, Mode, SiteConfig, UpstreamSpec};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::on_demand::OnDemand;
use crate::resolver::CertResolver;

/// How the terminator treats connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TerminatorConfig {
    /// The plain TCP address decrypted bytes go to, `host:port`.
    pub upstream: String,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long connecting to the upstream may take.
    pub connect_timeout: Duration,
    /// On shutdown, how long open connections may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// The application protocols offered through ALPN (besides `acme-tls/1`, which is
    /// always accepted so that TLS-ALPN-01 validations work). Empty: no ALPN.
    pub alpn: Vec<Vec<u8>>,
}

impl TerminatorConfig {
    /// Defaults for `upstream`: one hour idle timeout, 10 s handshakes and upstream
    /// connects, 30 s drain, ALPN `http/1.1`.
    pub fn new(upstream: impl Into<String>) -> Self {
        TerminatorConfig {
            upstream: upstream.into(),
            idle_timeout: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            alpn: vec![b"http/1.1".to_vec()],
        }
    }

    /// The same as an edge configuration in tcp mode with one site for every name.
    pub fn to_edge_config(&self) -> EdgeConfig {
        let mut site = SiteConfig::new(Vec::new(), vec![UpstreamSpec::Addr(self.upstream.clone())]);
        site.idle_timeout = self.idle_timeout.as_secs_f64();
        site.connect_timeout = self.connect_timeout.as_secs_f64();
        let mut config = EdgeConfig::new(vec![site]);
        config.mode = Mode::Tcp;
        config.alpn = Some(self.alpn.clone());
        config.handshake_timeout = self.handshake_timeout;
        config.drain_timeout = self.drain_timeout;
        config
    }
}

/// A bound TLS listener, ready to [`run`](Terminator::run).
#[derive(Debug)]
pub struct Terminator(Edge);

impl Terminator {
    /// Binds `listen` and builds the TLS configuration around `resolver`.
    pub async fn bind(
        listen: &str,
        resolver: Arc<dyn ResolvesServerCert>,
        config: TerminatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Terminator(
            Edge::bind(listen, resolver, config.to_edge_config(), metrics).await?,
        ))
    }

    /// Binds `listen` with a TLS configuration built elsewhere (see
    /// [`crate::tls_config::server_config`], e.g. with shared session tickets).
    pub async fn bind_with(
        listen: &str,
        tls: Arc<ServerConfig>,
        config: TerminatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Terminator(
            Edge::bind_tls(listen, tls, config.to_edge_config(), metrics).await?,
        ))
    }

    /// Serves the IP address certificates `certs` holds (RFC 8738) to clients that send
    /// no server name, chosen by the local address each connection arrived on.
    pub fn with_ip_certs(self, certs: CertResolver) -> Self {
        Terminator(self.0.with_ip_certs(certs))
    }

    /// Issues certificates for names nothing serves yet, during their first handshake,
    /// as `on_demand`'s guard allows.
    pub fn with_on_demand(self, on_demand: OnDemand) -> Self {
        Terminator(self.0.with_on_demand(on_demand))
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Accepts and forwards connections until `shutdown` completes; then stops accepting
    /// and gives open connections up to the drain timeout to finish before cutting them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.0.run(shutdown).await
    }
}
