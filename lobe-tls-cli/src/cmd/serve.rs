//! `lobe-tls serve`: the TLS edge (HTTP proxy or TCP forwarder) in front of upstreams.
//! The flags become one [`ServerConfig`]; [`Server`] runs it. Signals are this
//! command's: SIGTERM and SIGINT stop, SIGHUP re-reads the --config file's sites.

use std::process::ExitCode;
use std::time::Duration;

use lobe_tls::edge::{EdgeConfig, SiteConfig, UpstreamSpec};
use lobe_tls::server::{Server, ServerAddrs, ServerConfig, ServerHandle};
use lobe_tls::{Error, ManagedCert, Result, domain};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::global::Global;

mod args;
mod caps;
mod check;

pub use args::Args;

/// Runs the command until SIGTERM or SIGINT.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    if args.check_config {
        return Ok(check::check_config(global, args));
    }
    let nofile = caps::raise_nofile();
    let config = server_config(global, args, nofile)?;
    // Registered before anything is bound, so a SIGTERM during start-up is not lost.
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Error::config(format!("cannot handle SIGTERM: {e}")))?;
    // So is a SIGHUP (whose default action ends the process): it is handled once serving.
    let hangup = signal(SignalKind::hangup())
        .map_err(|e| Error::config(format!("cannot handle SIGHUP: {e}")))?;
    // And SIGUSR1 (which would end it too): logrotate's signal to reopen the access log.
    let user1 = signal(SignalKind::user_defined1())
        .map_err(|e| Error::config(format!("cannot handle SIGUSR1: {e}")))?;
    let server = Server::start(config).await?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, server.addrs())?;
    }
    let reloads = reload_on_hangup(hangup, server.handle(), args);
    let reopens = reopen_on_user1(user1, server.edge_handle());
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
    };
    tokio::select! {
        served = server.run(shutdown) => served.map(|()| ExitCode::SUCCESS),
        never = reloads => match never {},
        never = reopens => match never {},
    }
}

/// Reopens the access log file on each SIGUSR1 (logrotate's `postrotate`). Never
/// returns.
async fn reopen_on_user1(
    mut user1: Signal,
    edge: lobe_tls::edge::EdgeHandle,
) -> std::convert::Infallible {
    loop {
        user1.recv().await;
        tracing::info!("SIGUSR1: reopening the access log");
        edge.reopen_access_log();
    }
}

/// The server the flags and the --config file describe.
fn server_config(global: &Global, args: &Args, nofile: Option<u64>) -> Result<ServerConfig> {
    if let Some(problem) = flag_problems(args).into_iter().next() {
        return Err(Error::config(problem));
    }
    let sites = sites(args)?;
    let managed = managed_cert(args, args.challenge.config_file.as_deref())?;
    let mut on_demand = args.on_demand.to_config()?;
    if let Some(config) = &mut on_demand {
        config.challenge = args.challenge.pinned()?;
    }
    let mut edge = edge_config(args, sites, nofile);
    edge.access_log = lobe_tls::edge::AccessLogTarget::parse(&args.access_log)
        .map_err(|e| Error::config(format!("--access-log: {e}")))?;
    edge.client_prefixes = caps::client_prefixes(
        args.client_prefix_v4,
        args.client_prefix_v6,
        args.challenge.config_file.as_deref(),
    )?;
    let mut config = ServerConfig::new(args.listen, edge);
    config.http_listen = (!args.no_http).then_some(args.challenge.http_listen);
    config.metrics_listen = args.metrics_listen;
    config.admin_listen = args.admin_listen.0;
    config.admin_token = match &args.admin_token_file {
        Some(path) => Some(lobe_tls::server::AdminToken::read_file(path)?),
        None => None,
    };
    config.store = Some(global.store_spec()?);
    // The manager renews everything in the store against the CA of the flags.
    config.acme = Some(global.acme_config_with_fallbacks(
        args.challenge.config_file.as_deref(),
        &args.challenge.dns_recursive,
    )?);
    config.managed = managed.into_iter().collect();
    config.challenge = args.challenge.to_config()?;
    config.cert_dirs = args.cert_dirs.clone();
    config.default_name = args.default_name.clone();
    config.on_demand = on_demand;
    Ok(config)
}

/// Flags that do not go together, one line each.
fn flag_problems(args: &Args) -> Vec<&'static str> {
    let mut problems = Vec::new();
    if args.name.is_some() && args.domains.is_empty() {
        problems.push("--name needs the certificate's domains: add -d DOMAIN (repeatable)");
    }
    if args.profile.profile.is_some() && args.domains.is_empty() {
        problems.push(
            "--profile applies to the certificate -d names: add -d DOMAIN (stored certificates keep their own profile)",
        );
    }
    if args.accept_proxy_protocol && args.trusted_proxies.is_empty() {
        problems.push(
            "--accept-proxy-protocol believes PROXY headers only from --trusted-proxy peers: add your balancer's network (e.g. --trusted-proxy 10.0.0.0/8), or --trusted-proxy 0.0.0.0/0 --trusted-proxy ::/0 to believe every peer",
        );
    }
    problems
}

/// The managed certificate `--name`/`-d` and the challenge options describe, if any;
/// its profile may come from `config_file`.
fn managed_cert(args: &Args, config_file: Option<&std::path::Path>) -> Result<Option<ManagedCert>> {
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
    // TLS-ALPN-01 is answered by the edge's own listener, not a standalone one.
    challenge.tls_listen = None;
    let profile = args.profile.resolve(config_file)?;
    Ok(Some(
        ManagedCert::new(name, domains)
            .with_challenge(challenge)
            .with_profile(profile),
    ))
}

/// The sites: the `[[site]]` tables of --config, then the one the command-line flags
/// describe (it takes every Host the tables do not claim).
fn sites(args: &Args) -> Result<Vec<SiteConfig>> {
    let mut sites = match &args.challenge.config_file {
        Some(path) => lobe_tls::edge::read_sites(path)?,
        None => Vec::new(),
    };
    if let Some(site) = flag_site(args) {
        if let Some(problem) = flag_site_problems(&site).into_iter().next() {
            return Err(Error::config(problem));
        }
        sites.push(site);
    }
    if sites.is_empty() {
        return Err(Error::config(
            "no upstream: give --upstream HOST:PORT (repeatable) or [[site]] tables in --config",
        ));
    }
    Ok(sites)
}

/// What the --upstream site cannot be served with, named as the README names it.
fn flag_site_problems(site: &SiteConfig) -> Vec<String> {
    site.problems()
        .into_iter()
        .map(|problem| match problem.strip_prefix("upstream ") {
            Some(addr) => format!("--upstream {addr}"),
            None => format!("the --upstream site: {problem}"),
        })
        .collect()
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
    site.allow = args.allow.clone();
    site.deny = args.deny.clone();
    site.api_keys_file = args.api_keys_file.clone();
    site.basic_auth_file = args.basic_auth_file.clone();
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
    config.access_log_format = args.access_log_format;
    config
}

/// Writes `addrs` to `path` as JSON, atomically (a reader never sees half a file).
fn write_ready_file(path: &std::path::Path, addrs: ServerAddrs) -> Result<()> {
    let json = serde_json::to_string(&addrs)
        .map_err(|e| Error::config(format!("--ready-file: cannot encode the addresses: {e}")))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{json}\n")).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Re-reads the --config file's sites on each SIGHUP (on a blocking thread: the file
/// may be on a slow disk, and the runtime serves meanwhile). A file that does not read
/// or check is refused with one line, and the running sites stay. Never returns.
async fn reload_on_hangup(
    mut hangup: Signal,
    handle: ServerHandle,
    args: &Args,
) -> std::convert::Infallible {
    loop {
        hangup.recv().await;
        // Without --config the flags' site is rebuilt alone: its credential files are
        // re-read.
        let path = args.challenge.config_file.clone();
        let read = tokio::task::spawn_blocking(move || match path {
            Some(path) => lobe_tls::edge::read_sites(&path),
            None => Ok(Vec::new()),
        })
        .await;
        let sites = match read {
            Ok(Ok(mut sites)) => {
                sites.extend(flag_site(args));
                sites
            }
            Ok(Err(e)) => {
                tracing::error!("SIGHUP: configuration refused, the running one stays: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("SIGHUP: reading the configuration failed: {e}");
                continue;
            }
        };
        match handle.reload(sites).await {
            Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
            Err(e) => {
                tracing::error!("SIGHUP: configuration refused, the running one stays: {e}")
            }
        }
    }
}
