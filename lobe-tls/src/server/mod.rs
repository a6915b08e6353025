//! The whole of `lobe-tls serve` as one library call: the edge on its TLS listener, the
//! port-80 listener (HTTP-01 and the redirect to https), the metrics listener, the
//! manager that issues and renews into the edge's resolver, certificate directories
//! another tool writes, on-demand issuance, session tickets and affinity keys shared
//! through the store.
//!
//! ```no_run
//! use lobe_tls::edge::{EdgeConfig, SiteConfig, UpstreamSpec};
//! use lobe_tls::server::{Server, ServerConfig};
//!
//! # async fn run(shutdown: impl std::future::Future<Output = ()>) -> lobe_tls::Result<()> {
//! let upstream = UpstreamSpec::Addr("127.0.0.1:3000".into());
//! let site = SiteConfig::new(vec!["app.example.com".into()], vec![upstream]);
//! let listen = std::net::SocketAddr::from(([0, 0, 0, 0], 443));
//! let mut config = ServerConfig::new(listen, EdgeConfig::new(vec![site]));
//! config.store = Some(lobe_tls::store::StoreSpec::parse("/var/lib/lobe-tls")?);
//! config.acme = Some(lobe_tls::AcmeConfig::new(lobe_tls::acme::LETSENCRYPT));
//! let server = Server::start(config).await?;
//! server.run(shutdown).await
//! # }
//! ```
//!
//! [`Server::start`] binds every listener and reads what is stored; [`Server::run`]
//! issues what is missing (the listeners are up first, so the CA reaches the
//! challenges), serves until its shutdown future completes, then drains.

mod admin;
mod assemble;
mod edge_task;
#[cfg(target_os = "linux")]
mod process;
mod reload;
mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::acme::AcmeConfig;
use crate::challenge::ChallengeConfig;
use crate::challenge::http01::Http01Listener;
use crate::cluster::Cluster;
use crate::edge::{EdgeConfig, EdgeHandle};
use crate::error::Result;
use crate::manager::{MaintenanceHandle, ManagedCert, Manager};
use crate::metrics::{Metrics, MetricsListener};
use crate::on_demand::OnDemandConfig;
use crate::resolver::CertResolver;
use crate::store::StoreSpec;
use crate::tickets::SharedTickets;
use crate::watch::CertDirWatcher;

pub use admin::{AdminToken, check_exposure as check_admin_exposure};
pub use reload::ServerHandle;
pub use status::{
    CertStatus, ClusterStatus, EventEntry, Readiness, ServerStatus,
    render_html as render_status_html,
};

/// Everything [`Server`] runs, in one value.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The TLS listener (port 0 picks a free port; see [`Server::addrs`]).
    pub listen: SocketAddr,
    /// The sites, limits and mode of the edge.
    pub edge: EdgeConfig,
    /// The plain HTTP listener: HTTP-01 challenges, and a redirect to https for the
    /// rest. `None`: no port 80.
    pub http_listen: Option<SocketAddr>,
    /// Where Prometheus scrapes `/metrics`. `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status`,
    /// `/status.json`. `None`: none.
    pub admin_listen: Option<SocketAddr>,
    /// The Bearer token `/status` requires when `admin_listen` is not a loopback
    /// address (without one, such an address is refused).
    pub admin_token: Option<AdminToken>,
    /// The store to serve, and to issue into. It is opened when names are managed, when
    /// a site has domains nothing else covers, or for on-demand issuance; otherwise it
    /// is served when no `cert_dirs` are given, and must then hold a certificate.
    pub store: Option<StoreSpec>,
    /// The CA, for the manager that issues and renews everything in the store.
    pub acme: Option<AcmeConfig>,
    /// Certificates to issue at start when the store lacks them, then renew.
    pub managed: Vec<ManagedCert>,
    /// How certificates for sites' domains (at start or added by a reload) are
    /// validated. TLS-ALPN-01 is answered on `listen` itself.
    pub challenge: ChallengeConfig,
    /// Directories of certificates another tool writes (certbot's `live/`, a
    /// Kubernetes secret mount), served and followed as they change.
    pub cert_dirs: Vec<PathBuf>,
    /// The certificate for clients that send no or an unknown server name: a stored
    /// certificate's name, a pair's name under a `cert_dirs` entry, or a DNS name one of
    /// them serves. `None`: such handshakes are refused.
    pub default_name: Option<String>,
    /// Issue certificates during the first handshake for names nothing serves.
    pub on_demand: Option<OnDemandConfig>,
}

impl ServerConfig {
    /// `edge` on `listen`, with port 80 on `0.0.0.0:80`, no metrics or admin listener, no store,
    /// nothing managed, and HTTP-01 for sites' domains.
    pub fn new(listen: SocketAddr, edge: EdgeConfig) -> Self {
        ServerConfig {
            listen,
            edge,
            http_listen: Some(SocketAddr::from(([0, 0, 0, 0], 80))),
            metrics_listen: None,
            admin_listen: None,
            admin_token: None,
            store: None,
            acme: None,
            managed: Vec::new(),
            challenge: ChallengeConfig::default(),
            cert_dirs: Vec::new(),
            default_name: None,
            on_demand: None,
        }
    }
}

/// The addresses a started [`Server`] listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ServerAddrs {
    /// The TLS listener.
    pub listen: SocketAddr,
    /// The plain HTTP listener, if any.
    pub http_listen: Option<SocketAddr>,
    /// The metrics listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin listener, if any.
    pub admin_listen: Option<SocketAddr>,
}

/// A server whose listeners are bound; [`Server::run`] serves.
pub struct Server {
    addrs: ServerAddrs,
    edge: crate::edge::Edge,
    handle: ServerHandle,
    manager: Option<Manager>,
    resolver: CertResolver,
    metrics: Arc<Metrics>,
    sites: usize,
    // Held for the server's life; dropped (and stopped) when it ends.
    watchers: Vec<Arc<CertDirWatcher>>,
    tickets: Option<SharedTickets>,
    http: Option<Http01Listener>,
    metrics_listener: Option<MetricsListener>,
    admin: Option<admin::AdminListener>,
    /// What readiness and the status page read; the `lobe_tls_ready` gauge holds it weakly.
    status: Arc<status::Sources>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Checks `config`, opens the store if it is needed, reads what is stored and in the
    /// certificate directories, and binds every listener. Nothing is ordered yet. Must be
    /// called inside a Tokio runtime.
    pub async fn start(config: ServerConfig) -> Result<Server> {
        assemble::start(config).await
    }

    /// The addresses actually bound (useful with port 0).
    pub fn addrs(&self) -> ServerAddrs {
        self.addrs
    }

    /// The metrics every part reports to (certificates, edge, port 80).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A handle that reloads the sites while the server runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// The edge's handle (its metrics, a bare reload of its sites).
    pub fn edge_handle(&self) -> EdgeHandle {
        self.edge.handle()
    }

    /// Issues what is missing and renews in the background, serves until `shutdown`
    /// completes, then stops accepting and drains. A shutdown during the first orders
    /// (which can take minutes) stops at once. An edge that stops on its own, or
    /// panics, ends the server with an error that says so.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            addrs,
            edge,
            handle: _,
            manager,
            resolver,
            metrics,
            sites,
            watchers,
            tickets,
            http,
            metrics_listener,
            admin,
            status,
        } = self;
        let mut serving = edge_task::EdgeTask::spawn(|stopped| edge.run(stopped));
        status.phase.serving();
        let edge_ended = serving.ended();
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                // The cause is the error the server ends with, below.
                () = edge_ended => tracing::error!("the edge stopped; shutting down"),
            }
        };
        tokio::pin!(shutdown);
        let mut maintenance: Option<(MaintenanceHandle, Option<Cluster>)> = None;
        let mut stopped = false;
        if let Some(manager) = manager {
            tokio::select! {
                started = assemble::start_manager(manager, &metrics) => {
                    maintenance = Some(started?);
                }
                () = &mut shutdown => stopped = true,
            }
        }
        if !stopped {
            if resolver.is_empty() {
                tracing::warn!(
                    "no valid certificate yet; handshakes are refused until one appears"
                );
            }
            tracing::info!(listen = %addrs.listen, sites, certificates = resolver.len(), "serving");
            shutdown.await;
        }
        // From here /readyz answers 503, so balancers stop sending before the drain ends.
        status.phase.draining();
        let served = serving.stop().await;
        drop(maintenance);
        drop(watchers);
        drop(tickets);
        drop(http);
        drop(metrics_listener);
        drop(admin);
        served
    }
}
