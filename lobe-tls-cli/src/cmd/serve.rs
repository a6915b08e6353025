//! `lobe-tls serve`: the TLS edge (HTTP proxy or TCP forwarder) in front of upstreams.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lobe_tls::cluster::Cluster;
use lobe_tls::edge::{
    Edge, EdgeConfig, EdgeHandle, IpNet, LbPolicy, Mode, SiteConfig, UpstreamSpec,
};
use lobe_tls::manager::MaintenanceHandle;
use lobe_tls::metrics::CertExpiry;
use lobe_tls::store::DynStore;
use lobe_tls::tickets::{SharedTickets, TicketConfig};
use lobe_tls::watch::{CertDirWatcher, WatchOptions};
use lobe_tls::{
    CertResolver, ChallengeKind, Error, Http01Listener, Http01Registry, ManagedCert, Manager,
    Metrics, MetricsListener, OnDemand, OnDemandConfig, Result, domain,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::challenge_args::ChallengeArgs;

mod caps;
mod edge_task;
use crate::global::Global;
use crate::profile_args::ProfileArgs;

/// Options of `lobe-tls serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to accept TLS connections on.
    #[arg(long, env = "LOBE_TLS_LISTEN", default_value = "0.0.0.0:443")]
    pub listen: String,

    /// `http` (default): an HTTP/1.1 and h2 proxy with pooled keep-alive connections to
    /// the upstreams. `tcp`: decrypted bytes forwarded as they arrive.
    #[arg(long, env = "LOBE_TLS_MODE", default_value = "http")]
    pub mode: Mode,

    /// Upstream address (host:port) of the site these flags describe, which answers every
    /// Host that no site of the --config file claims. Repeatable.
    #[arg(long, env = "LOBE_TLS_UPSTREAM", value_delimiter = ',')]
    pub upstream: Vec<String>,

    /// Balancing over the --upstream addresses: least-conn, round-robin, ip-hash or cookie.
    #[arg(long, env = "LOBE_TLS_LB", default_value = "least-conn")]
    pub lb: LbPolicy,

    /// Path of the active HTTP health check of the --upstream addresses (e.g. /healthz).
    #[arg(long, env = "LOBE_TLS_HEALTH_PATH")]
    pub health_path: Option<String>,

    /// Seconds between health checks.
    #[arg(long, env = "LOBE_TLS_HEALTH_INTERVAL", default_value_t = 5.0)]
    pub health_interval: f64,

    /// Send `Strict-Transport-Security: max-age=SECONDS` from the --upstream site.
    #[arg(long, env = "LOBE_TLS_HSTS", value_name = "SECONDS")]
    pub hsts: Option<u64>,

    /// Largest request body in bytes for the --upstream site (413 beyond).
    #[arg(long, env = "LOBE_TLS_MAX_BODY_SIZE")]
    pub max_body_size: Option<u64>,

    /// tcp mode: start each upstream connection with a PROXY v2 header.
    #[arg(long, env = "LOBE_TLS_SEND_PROXY_V2")]
    pub send_proxy_v2: bool,

    /// Require a PROXY v1/v2 header from an outer load balancer on --listen; connections
    /// without one, or from a peer outside --trusted-proxy, are refused before TLS.
    #[arg(long, env = "LOBE_TLS_ACCEPT_PROXY_PROTOCOL")]
    pub accept_proxy_protocol: bool,

    /// Network (CIDR) whose X-Forwarded-* and Forwarded headers are kept (from anyone
    /// else they are replaced), and, with --accept-proxy-protocol, the only peers that
    /// may connect and whose PROXY headers are believed. Repeatable.
    #[arg(
        long = "trusted-proxy",
        env = "LOBE_TLS_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<IpNet>,

    /// Connections open at once, in total; more are refused. Default: (open-file limit -
    /// 256) / 2, after serve raised its soft open-file limit to the hard one; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_CONNS")]
    pub max_conns: Option<usize>,

    /// Connections open at once from one client address (with --accept-proxy-protocol,
    /// the one the PROXY header names); more are refused. Peers in --trusted-proxy are
    /// not capped per address. Default: 4096; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<usize>,

    /// Requests in flight at once from one client address (grouped as for
    /// --max-conns-per-ip), over HTTP/1.1 and h2 together; an event stream or a
    /// WebSocket counts while it is open. More are answered 429 at once, without reaching
    /// an upstream. Peers in --trusted-proxy are not capped. Default: 1024; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_REQUESTS_PER_IP")]
    pub max_requests_per_ip: Option<usize>,

    /// Bytes of request bodies one client connection may hold at once so that a request
    /// can be sent again to another upstream when the first fails (each body at most
    /// 64 KiB); a body that does not fit streams through once, unretried. Default:
    /// 1048576 (1 MiB); 0: no body is retried.
    #[arg(long, env = "LOBE_TLS_RETRY_BUFFER_PER_CONN", value_name = "BYTES")]
    pub retry_buffer_per_conn: Option<usize>,

    /// As --retry-buffer-per-conn, for all connections together. Default: 67108864
    /// (64 MiB).
    #[arg(long, env = "LOBE_TLS_RETRY_BUFFER_TOTAL", value_name = "BYTES")]
    pub retry_buffer_total: Option<usize>,

    /// Requests per second per client address; more are answered 429 with Retry-After.
    #[arg(long, env = "LOBE_TLS_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// Leading bits of an IPv4 address that make one client for --max-conns-per-ip and
    /// --rate-limit (or `client_prefix_v4` in --config). Default: 32, each address.
    #[arg(long, env = "LOBE_TLS_CLIENT_PREFIX_V4", value_name = "BITS")]
    pub client_prefix_v4: Option<u32>,

    /// Leading bits of an IPv6 address that make one client for --max-conns-per-ip and
    /// --rate-limit (or `client_prefix_v6` in --config). Default: 64, so a /64 (one
    /// host's or one site's subnet) is one client.
    #[arg(long, env = "LOBE_TLS_CLIENT_PREFIX_V6", value_name = "BITS")]
    pub client_prefix_v6: Option<u32>,

    /// Threads that accept and serve client connections, each serving its own
    /// connections start to finish (default: one per CPU).
    #[arg(long, env = "LOBE_TLS_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "LOBE_TLS_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout: u64,

    /// Serve the certificates another process writes here (certbot's live/, a Kubernetes
    /// secret mount, fullchain.pem/privkey.pem or tls.crt/tls.key pairs); repeatable.
    #[arg(long = "cert-dir", env = "LOBE_TLS_CERT_DIR", value_delimiter = ',')]
    pub cert_dirs: Vec<PathBuf>,

    /// Certificate for clients that send no or an unknown server name: a certificate's
    /// name in the store, a pair's name under --cert-dir, or a DNS name one of them
    /// serves. Without it such handshakes are refused.
    #[arg(long, env = "LOBE_TLS_DEFAULT_NAME")]
    pub default_name: Option<String>,

    /// Name of the managed certificate in the store (default: its first domain, with `*`
    /// as `_`, as `issue` names it).
    #[arg(long)]
    pub name: Option<String>,

    /// Domain of a certificate to manage: issued at start if the store lacks it, then
    /// renewed in the background. Repeatable.
    #[arg(short = 'd', long = "domain")]
    pub domains: Vec<String>,

    #[command(flatten)]
    pub challenge: ChallengeArgs,

    #[command(flatten)]
    pub profile: ProfileArgs,

    /// Do not listen for plain HTTP (challenges and the redirect to https) on --http-listen.
    #[arg(long, env = "LOBE_TLS_NO_HTTP")]
    pub no_http: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "LOBE_TLS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Close connections, streams and WebSockets of the --upstream site that move no byte
    /// for this many seconds (sites of the --config file set their own idle_timeout).
    #[arg(long, env = "LOBE_TLS_IDLE_TIMEOUT", default_value_t = 3600)]
    pub idle_timeout: u64,

    /// On SIGTERM, seconds to let open connections finish before cutting them.
    #[arg(long, env = "LOBE_TLS_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,

    #[command(flatten)]
    pub on_demand: OnDemandArgs,
}

/// On-demand TLS: certificates issued during the first handshake for a new name.
#[derive(clap::Args)]
pub struct OnDemandArgs {
    /// Issue a certificate during the first handshake for a name nothing serves, if
    /// GET URL?domain=NAME answers 2xx (validated through TLS-ALPN-01 on --listen).
    // The URL may carry a token: its value stays out of --help.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_ASK",
        value_name = "URL",
        hide_env_values = true
    )]
    pub on_demand_ask: Option<String>,

    /// Issue on demand only names matching PATTERN (example.com, or *.example.com for one
    /// label under it); repeatable. Alone it turns on-demand issuance on; with
    /// --on-demand-ask a name must pass both.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_ALLOW",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub on_demand_allow: Vec<String>,

    /// Seconds a handshake waits for its on-demand certificate.
    #[arg(long, env = "LOBE_TLS_ON_DEMAND_TIMEOUT", default_value_t = 20)]
    pub on_demand_timeout: u64,

    /// New names issued on demand per minute, in all.
    #[arg(long, env = "LOBE_TLS_ON_DEMAND_RATE", default_value_t = 20)]
    pub on_demand_rate: u32,
}

impl std::fmt::Debug for OnDemandArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ask URL may carry a token.
        f.debug_struct("OnDemandArgs")
            .field("on_demand_ask", &self.on_demand_ask.is_some())
            .field("on_demand_allow", &self.on_demand_allow)
            .finish_non_exhaustive()
    }
}

impl OnDemandArgs {
    /// The library configuration, when on-demand issuance is asked for.
    fn to_config(&self) -> Result<Option<OnDemandConfig>> {
        if self.on_demand_ask.is_none() && self.on_demand_allow.is_empty() {
            return Ok(None);
        }
        // Checked before the store is opened: a bad pattern is a typo, not a reason to
        // create anything.
        for pattern in &self.on_demand_allow {
            domain::DomainName::parse(pattern)?;
        }
        let mut config = OnDemandConfig::default();
        config.ask = self.on_demand_ask.clone();
        config.allow = self.on_demand_allow.clone();
        config.issue_timeout = Duration::from_secs(self.on_demand_timeout.max(1));
        config.global_per_minute = std::num::NonZeroU32::new(self.on_demand_rate)
            .ok_or_else(|| Error::config("--on-demand-rate must be at least 1"))?;
        Ok(Some(config))
    }
}

/// Runs the command until SIGTERM or SIGINT.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let nofile = caps::raise_nofile();
    if args.name.is_some() && args.domains.is_empty() {
        return Err(Error::config(
            "--name needs the certificate's domains: add -d DOMAIN (repeatable)",
        ));
    }
    if args.profile.profile.is_some() && args.domains.is_empty() {
        return Err(Error::config(
            "--profile applies to the certificate -d names: add -d DOMAIN (stored certificates keep their own profile)",
        ));
    }
    if args.accept_proxy_protocol && args.trusted_proxies.is_empty() {
        return Err(Error::config(
            "--accept-proxy-protocol believes PROXY headers only from --trusted-proxy peers: add your balancer's network (e.g. --trusted-proxy 10.0.0.0/8), or --trusted-proxy 0.0.0.0/0 --trusted-proxy ::/0 to believe every peer",
        ));
    }
    let sites = sites(args)?;
    let managed = managed_cert(args)?;
    let on_demand = args.on_demand.to_config()?;
    let client_prefixes = caps::client_prefixes(
        args.client_prefix_v4,
        args.client_prefix_v6,
        args.challenge.config_file.as_deref(),
    )?;
    let resolver = CertResolver::new();
    let metrics = Metrics::new();
    let mut watchers = Vec::new();
    for dir in &args.cert_dirs {
        watchers.push(watch_dir(dir, args, &resolver, &metrics).await?);
    }
    // A site's domains are managed unless a --cert-dir covers them (or, checked below, the
    // store already holds their certificate).
    let site_domains = uncovered_domains(&sites, &resolver);
    if managed.is_some() || !site_domains.is_empty() {
        check_http01_answerable(args)?;
    }
    // The store is served (and everything in it renewed) with managed names, and when
    // nothing else is given.
    let store = if managed.is_some() || !site_domains.is_empty() || on_demand.is_some() {
        Some(global.open_store().await?)
    } else if args.cert_dirs.is_empty() {
        Some(store_to_serve(global).await?)
    } else {
        None
    };
    // Registered before anything is bound, so a SIGTERM during start-up is not lost.
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Error::config(format!("cannot handle SIGTERM: {e}")))?;
    // So is a SIGHUP (whose default action ends the process): it is handled once serving.
    let hangup = signal(SignalKind::hangup())
        .map_err(|e| Error::config(format!("cannot handle SIGHUP: {e}")))?;

    if let (Some(default), Some(store)) = (&args.default_name, &store) {
        set_default_name(&resolver, default, managed.as_ref(), store, args).await?;
    }
    let mut managed_certs: Vec<ManagedCert> = managed.into_iter().collect();
    if let Some(store) = &store {
        for domains in &site_domains {
            if let Some(cert) = site_cert(args, domains, store, &managed_certs).await? {
                managed_certs.push(cert);
            }
        }
    }

    // With a Redis store, tokens are shared: any instance of a cluster answers HTTP-01.
    let registry = match &store {
        Some(store) if store.as_challenge_store().is_some() => {
            Http01Registry::with_shared_store(store.clone())?
        }
        _ => Http01Registry::new(),
    };
    let manager = match store {
        Some(store) => Some(build_manager(
            global,
            args,
            store,
            managed_certs,
            &resolver,
            &registry,
        )?),
        None => None,
    };
    // Sites a reload adds have their domains issued by the same manager.
    let reload_manager = manager.clone();
    let on_demand = match (on_demand, &manager) {
        (Some(config), Some(manager)) => Some(OnDemand::new(manager.clone(), config)?),
        _ => None,
    };
    // Sessions resume on any instance sharing the store: the ticket keys live there.
    let tickets = match &manager {
        Some(manager) => {
            match SharedTickets::start(manager.store().clone(), TicketConfig::default()).await {
                Ok(tickets) => Some(tickets),
                Err(e) => {
                    tracing::warn!(error = %e, "session ticket keys are not shared; sessions resume on this instance only");
                    None
                }
            }
        }
        None => None,
    };

    let mut config = edge_config(args, sites.clone(), nofile);
    config.client_prefixes = client_prefixes;
    // Port 80 has caps of its own, derived from the TLS listener's: a flood there does
    // not take connections from HTTPS clients.
    let http_config = lobe_tls::challenge::http01::Http01ListenerConfig::beside_tls(
        config.max_conns,
        config.max_conns_per_ip,
        config.client_prefixes,
        config.trusted_proxies.clone(),
    );
    let tls = lobe_tls::tls_config::server_config(
        Arc::new(resolver.clone()),
        &config.alpn(),
        tickets.as_ref().map(SharedTickets::ticketer),
    )?;
    let mut edge = Edge::bind_tls(&args.listen, Arc::new(tls), config, metrics.clone())
        .await?
        // Certificates for IP addresses go to clients that connect to that address
        // without SNI.
        .with_ip_certs(resolver.clone());
    if let Some(on_demand) = on_demand {
        edge = edge.with_on_demand(on_demand);
    }
    // Affinity cookies pin on any instance sharing the store: the key lives there too.
    if let Some(manager) = &manager
        && let Err(e) = edge.share_affinity_key(manager.store()).await
    {
        tracing::warn!(error = %e, "the affinity cookie key is not shared; cookies pin on this instance only");
    }
    let handle = edge.handle();
    let edge_metrics = handle.metrics();
    metrics.register(|registry| edge_metrics.register(registry));
    let listen = edge.local_addr();

    // The listeners are up before the manager orders, so the CA can reach the challenges:
    // HTTP-01 through the HTTP listener, TLS-ALPN-01 through the terminator itself.
    let _http = if args.no_http {
        None
    } else {
        let service = registry.service().redirect_others_to_https();
        let http =
            Http01Listener::bind_with(&args.challenge.http_listen, service, http_config).await?;
        let http_metrics = http.metrics();
        metrics.register(|registry| http_metrics.register(registry));
        Some(http)
    };
    let _metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr, metrics.clone()).await?),
        None => None,
    };
    let mut serving = edge_task::EdgeTask::spawn(|stopped| edge.run(stopped));
    let edge_ended = serving.ended();

    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            // The cause is the error serve exits with, below.
            () = edge_ended => tracing::error!("the edge stopped; shutting down"),
        }
    };
    tokio::pin!(shutdown);
    // A signal during the first order (which can take minutes) stops at once.
    let mut maintenance = None;
    let mut signalled = false;
    if let Some(manager) = manager {
        tokio::select! {
            started = start_manager(manager, &metrics) => {
                maintenance = Some(started?);
            }
            _ = &mut shutdown => signalled = true,
        }
    }
    if !signalled {
        if resolver.is_empty() {
            tracing::warn!("no valid certificate yet; handshakes are refused until one appears");
        }
        tracing::info!(%listen, sites = sites.len(), certificates = resolver.len(), "serving");
        let issuer = ReloadIssuer {
            args,
            resolver: &resolver,
            manager: reload_manager.as_ref(),
        };
        reload_until(&mut shutdown, hangup, &handle, &issuer).await;
    }
    let served = serving.stop().await;
    drop(maintenance);
    drop(watchers);
    drop(tickets);
    served.map(|()| ExitCode::SUCCESS)
}

/// The store when `serve` is given neither managed names nor `--cert-dir`: it must exist
/// and hold a certificate, or there is nothing to serve.
async fn store_to_serve(global: &Global) -> Result<DynStore> {
    let nothing = |why: String| {
        Error::config(format!(
            "nothing to serve: {why}; give -d DOMAIN to have a certificate issued, --cert-dir DIR to serve files another tool writes, or run lobe-tls issue first"
        ))
    };
    // Messages name the store by its spec, which hides a Redis URL's password.
    let spec = global.store_spec()?;
    if let Some(dir) = spec.dir()
        && !dir.is_dir()
    {
        return Err(nothing(format!(
            "the store {spec} does not exist (check --store)"
        )));
    }
    let store = spec.open().await?;
    if store.list_certs().await?.is_empty() {
        return Err(nothing(format!("the store {spec} holds no certificate")));
    }
    Ok(store)
}

/// Serves `--default-name` from the store: the certificate stored (or managed) under that
/// name, or the one serving that DNS name. It is looked up at each handshake, so the
/// default follows renewals. A name that is none of these is an error, unless a
/// `--cert-dir` pair may carry it.
async fn set_default_name(
    resolver: &CertResolver,
    default: &str,
    managed: Option<&ManagedCert>,
    store: &DynStore,
    args: &Args,
) -> Result<()> {
    let managed_domain = managed
        .filter(|cert| cert.name == default)
        .and_then(|cert| cert.domains.first())
        .map(|domain| domain.as_str().to_owned());
    let server_name = match managed_domain {
        Some(domain) => Some(domain),
        None => lobe_tls::store::default_server_name(store.as_ref(), default).await,
    };
    match server_name {
        Some(name) => {
            tracing::info!(default, server_name = name, "default certificate");
            resolver.set_default_name(Some(&name));
            Ok(())
        }
        None if !args.cert_dirs.is_empty() => Ok(()),
        None => Err(Error::config(format!(
            "--default-name {default:?} is neither a certificate in the store nor a DNS name; see lobe-tls list"
        ))),
    }
}

/// The managed certificate `--name`/`-d` and the challenge options describe, if any.
fn managed_cert(args: &Args) -> Result<Option<ManagedCert>> {
    if args.domains.is_empty() {
        return Ok(None);
    }
    let domains = domain::parse_all(&args.domains)?;
    // The same rule as `issue`: a wildcard never takes its apex's name.
    let name = match &args.name {
        Some(name) => name.clone(),
        None => domain::store_name(&domains),
    };
    let mut challenge = args.challenge.to_config()?;
    // TLS-ALPN-01 is answered by the terminator's own listener, not a standalone one.
    challenge.tls_listen = None;
    let profile = args
        .profile
        .resolve(args.challenge.config_file.as_deref())?;
    Ok(Some(
        ManagedCert::new(name, domains)
            .with_challenge(challenge)
            .with_profile(profile),
    ))
}

/// Starts watching `dir` and reports its certificates to the metrics.
async fn watch_dir(
    dir: &std::path::Path,
    args: &Args,
    resolver: &CertResolver,
    metrics: &Arc<Metrics>,
) -> Result<Arc<CertDirWatcher>> {
    let options = WatchOptions::default().with_default_name(args.default_name.clone());
    let watcher = Arc::new(CertDirWatcher::start(dir, resolver.clone(), options).await?);
    let source = watcher.clone();
    metrics.add_cert_source(move || {
        source
            .certificates()
            .into_iter()
            .map(|cert| CertExpiry {
                name: cert.name,
                source: "dir",
                not_after: cert.info.not_after.unix_timestamp(),
                ari_window: None,
            })
            .collect()
    });
    Ok(watcher)
}

/// The manager of the store's certificates and of `cert`, serving into `resolver`.
fn build_manager(
    global: &Global,
    args: &Args,
    store: DynStore,
    certs: Vec<ManagedCert>,
    resolver: &CertResolver,
    registry: &Http01Registry,
) -> Result<Manager> {
    // Everything in the store is renewed here too, so `serve` needs no cron job beside
    // it; TLS-ALPN-01 is answered on this process's own TLS port for all of them.
    let acme = global.acme_config_with_fallbacks(
        args.challenge.config_file.as_deref(),
        &args.challenge.dns_recursive,
    )?;
    let mut builder = Manager::builder(acme, store)
        .resolver(resolver.clone())
        .http01(registry.clone())
        .manage_stored(true)
        .tls_alpn01_on_resolver(true);
    for cert in certs {
        builder = builder.cert(cert);
    }
    builder.build()
}

/// Loads the store, issues what is missing, and renews in the background. Renewal
/// failures and expiries go to the metrics.
///
/// With a Redis store the instance joins the cluster: it follows the other instances'
/// renewals and challenges, and orders only when it wins the store's lock.
async fn start_manager(
    manager: Manager,
    metrics: &Arc<Metrics>,
) -> Result<(MaintenanceHandle, Option<Cluster>)> {
    manager.export_metrics(metrics);
    // Followed before start, so no renewal by another instance is missed. A Redis store
    // is followed through its announcements (and a re-sync every 30 s, for announcements
    // lost in an outage); a directory through its watch, which another process's
    // `issue`, `renew` or `revoke` trips, with a re-sync every 10 minutes as a safety net.
    let resync = if manager.store().as_challenge_store().is_some() {
        lobe_tls::cluster::DEFAULT_RESYNC_INTERVAL
    } else {
        Duration::from_secs(600)
    };
    let cluster = match Cluster::builder(manager.clone())
        .resync_interval(resync)
        .start()
    {
        Ok(cluster) => Some(cluster),
        Err(e) => {
            tracing::warn!(error = %e, "not following the store; certificates other processes store are served after a restart");
            None
        }
    };
    let report = manager.start().await?;
    for (failed, error) in &report.failed {
        tracing::error!(
            name = failed,
            error,
            "could not issue the certificate; retrying in the background"
        );
    }
    for (unusable, error) in &report.unusable {
        tracing::error!(name = unusable, error, "stored certificate is unusable");
    }
    Ok((manager.spawn(), cluster))
}

/// The sites: the `[[site]]` tables of --config, then the one the command-line flags
/// describe (it takes every Host the tables do not claim).
fn sites(args: &Args) -> Result<Vec<SiteConfig>> {
    let mut sites = match &args.challenge.config_file {
        Some(path) => lobe_tls::edge::reload::read_sites(path)?,
        None => Vec::new(),
    };
    sites.extend(flag_site(args));
    if sites.is_empty() {
        return Err(Error::config(
            "no upstream: give --upstream HOST:PORT (repeatable) or [[site]] tables in --config",
        ));
    }
    Ok(sites)
}

/// The site of --upstream, --lb, --health-path and --health-interval, if any.
fn flag_site(args: &Args) -> Option<SiteConfig> {
    if args.upstream.is_empty() {
        return None;
    }
    let upstreams = args
        .upstream
        .iter()
        .map(|addr| UpstreamSpec::Addr(addr.clone()))
        .collect();
    let mut site = SiteConfig::new(Vec::new(), upstreams);
    site.lb = args.lb;
    site.health_path = args.health_path.clone();
    site.health_interval = args.health_interval;
    site.idle_timeout = args.idle_timeout as f64;
    site.hsts = args.hsts;
    site.max_body_size = args.max_body_size;
    Some(site)
}

fn edge_config(args: &Args, sites: Vec<SiteConfig>, nofile: Option<u64>) -> EdgeConfig {
    let mut config = EdgeConfig::new(sites);
    config.mode = args.mode;
    config.drain_timeout = Duration::from_secs(args.drain_timeout);
    config.header_read_timeout = Duration::from_secs(args.header_read_timeout);
    config.max_conns = caps::cap(args.max_conns, caps::default_max_conns(nofile));
    config.max_conns_per_ip =
        caps::cap(args.max_conns_per_ip, Some(caps::DEFAULT_MAX_CONNS_PER_IP));
    config.max_requests_per_ip = caps::cap(
        args.max_requests_per_ip,
        Some(lobe_tls::edge::DEFAULT_MAX_REQUESTS_PER_IP),
    );
    tracing::debug!(
        max_conns = ?config.max_conns,
        max_conns_per_ip = ?config.max_conns_per_ip,
        max_requests_per_ip = ?config.max_requests_per_ip,
        "connection caps"
    );
    if let Some(bytes) = args.retry_buffer_per_conn {
        config.retry_buffer_per_conn = bytes;
    }
    if let Some(bytes) = args.retry_buffer_total {
        config.retry_buffer_total = bytes;
    }
    config.rate_limit = args.rate_limit;
    config.threads = args.threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    config.trusted_proxies = args.trusted_proxies.clone();
    config.send_proxy_v2 = args.send_proxy_v2;
    config.accept_proxy_protocol = args.accept_proxy_protocol.then_some(Duration::from_secs(5));
    config
}

/// A managed certificate for a site's domains, unless the store or another managed
/// certificate already covers them.
async fn site_cert(
    args: &Args,
    domains: &[String],
    store: &DynStore,
    managed: &[ManagedCert],
) -> Result<Option<ManagedCert>> {
    let parsed = domain::parse_all(domains)?;
    let covered_by_managed = managed.iter().any(|cert| {
        parsed
            .iter()
            .all(|d| cert.domains.iter().any(|m| m.as_str() == d.as_str()))
    });
    let name = domain::store_name(&parsed);
    if covered_by_managed || store.load_cert(&name).await?.is_some() {
        return Ok(None);
    }
    let mut challenge = args.challenge.to_config()?;
    challenge.tls_listen = None;
    Ok(Some(
        ManagedCert::new(name, parsed).with_challenge(challenge),
    ))
}

/// The domains of `sites` that nothing `resolver` serves covers (a --cert-dir at start,
/// anything served on a reload), one list per site.
fn uncovered_domains(sites: &[SiteConfig], resolver: &CertResolver) -> Vec<Vec<String>> {
    sites
        .iter()
        .map(|site| site.domains.clone())
        .filter(|domains| !domains.is_empty())
        .filter(|domains| !domains.iter().all(|d| resolver.lookup(Some(d)).is_some()))
        .collect()
}

/// HTTP-01 needs the HTTP listener (or a webroot) to answer.
fn check_http01_answerable(args: &Args) -> Result<()> {
    if args.challenge.challenge == ChallengeKind::Http01
        && args.challenge.http_webroot.is_none()
        && args.no_http
    {
        return Err(Error::config(
            "--challenge http-01 answers on --http-listen: drop --no-http or use another challenge",
        ));
    }
    Ok(())
}

/// Hands the domains of sites a reload added to the manager, by the rules of the start:
/// managed unless the store or a --cert-dir covers them. Certificates of removed sites
/// are left as they are (renewed with the rest of the store, never revoked).
struct ReloadIssuer<'a> {
    args: &'a Args,
    resolver: &'a CertResolver,
    manager: Option<&'a Manager>,
}

impl ReloadIssuer<'_> {
    async fn issue_new(&self, sites: &[SiteConfig]) {
        let new = uncovered_domains(sites, self.resolver);
        if new.is_empty() {
            return;
        }
        let Some(manager) = self.manager else {
            tracing::warn!(
                domains = ?new,
                "SIGHUP: no certificate covers these site domains and serve runs without a store to issue into; restart with the store (--store) to have them issued"
            );
            return;
        };
        if let Err(e) = check_http01_answerable(self.args) {
            tracing::error!("SIGHUP: cannot issue certificates for {new:?}: {e}");
            return;
        }
        for domains in new {
            let cert = match site_cert(self.args, &domains, manager.store(), &[]).await {
                Ok(Some(cert)) => cert,
                // The store holds it: the manager serves and renews it already.
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("SIGHUP: cannot manage a certificate for {domains:?}: {e}");
                    continue;
                }
            };
            let name = cert.name.clone();
            // The maintenance loop orders a managed certificate that has none at once.
            match manager.add(cert) {
                Ok(true) => tracing::info!(
                    cert = name,
                    ?domains,
                    "SIGHUP: issuing a certificate for a new site"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("SIGHUP: cannot manage a certificate for {domains:?}: {e}")
                }
            }
        }
    }
}

/// Re-reads the --config file's sites (on a blocking thread: the file may be on a slow
/// disk, and the runtime serves meanwhile), adds `extra` and swaps them in.
async fn reload_sites(
    handle: &EdgeHandle,
    path: &std::path::Path,
    extra: Vec<SiteConfig>,
) -> Result<Vec<SiteConfig>> {
    let path = path.to_owned();
    let mut sites = tokio::task::spawn_blocking(move || lobe_tls::edge::reload::read_sites(&path))
        .await
        .map_err(|e| Error::config(format!("reading the configuration: {e}")))??;
    sites.extend(extra);
    handle.reload(sites.clone())?;
    Ok(sites)
}

/// Waits for SIGTERM/SIGINT, re-reading the --config file's sites on each SIGHUP. A file
/// that does not read or check is refused with one line, and the running sites stay.
async fn reload_until(
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    mut hangup: tokio::signal::unix::Signal,
    handle: &EdgeHandle,
    issuer: &ReloadIssuer<'_>,
) {
    let args = issuer.args;
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return,
            _ = hangup.recv() => {
                let Some(path) = &args.challenge.config_file else {
                    tracing::info!("SIGHUP: no --config file to re-read");
                    continue;
                };
                let extra: Vec<SiteConfig> = flag_site(args).into_iter().collect();
                match reload_sites(handle, path, extra).await {
                    Ok(sites) => {
                        tracing::info!(sites = sites.len(), "SIGHUP: configuration reloaded");
                        issuer.issue_new(&sites).await;
                    }
                    Err(e) => tracing::error!("SIGHUP: configuration refused, the running one stays: {e}"),
                }
            }
        }
    }
}
