//! `lobe-tls serve`: a TLS terminator in front of a plain-TCP upstream.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lobe_tls::metrics::CertExpiry;
use lobe_tls::watch::{CertDirWatcher, WatchOptions};
use lobe_tls::{
    CertResolver, Error, Http01Listener, Http01Registry, Metrics, MetricsListener, Result,
    Terminator, TerminatorConfig,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::challenge_args::ChallengeArgs;
use crate::global::Global;

/// Options of `lobe-tls serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to accept TLS connections on.
    #[arg(long, env = "LOBE_TLS_LISTEN", default_value = "0.0.0.0:443")]
    pub listen: String,

    /// Plain TCP address (host:port) that decrypted bytes are forwarded to.
    #[arg(long, env = "LOBE_TLS_UPSTREAM")]
    pub upstream: String,

    /// Serve the certificates another process writes here (certbot's live/, a Kubernetes
    /// secret mount, fullchain.pem/privkey.pem or tls.crt/tls.key pairs); repeatable.
    #[arg(long = "cert-dir", env = "LOBE_TLS_CERT_DIR", value_delimiter = ',')]
    pub cert_dirs: Vec<PathBuf>,

    /// Certificate (pair name or DNS name) for clients that send no or an unknown server
    /// name. Without it such handshakes are refused.
    #[arg(long, env = "LOBE_TLS_DEFAULT_NAME")]
    pub default_name: Option<String>,

    /// Name of a managed certificate (issued at start and renewed in the background).
    #[arg(long)]
    pub name: Option<String>,

    /// Domain of the managed certificate; repeatable.
    #[arg(short = 'd', long = "domain")]
    pub domains: Vec<String>,

    #[command(flatten)]
    pub challenge: ChallengeArgs,

    /// Do not listen for plain HTTP (challenges and the redirect to https) on --http-listen.
    #[arg(long, env = "LOBE_TLS_NO_HTTP")]
    pub no_http: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "LOBE_TLS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Close connections that move no byte either way for this many seconds.
    #[arg(long, env = "LOBE_TLS_IDLE_TIMEOUT", default_value_t = 3600)]
    pub idle_timeout: u64,

    /// On SIGTERM, seconds to let open connections finish before cutting them.
    #[arg(long, env = "LOBE_TLS_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout: u64,
}

/// Runs the command until SIGTERM or SIGINT.
pub async fn run(_global: &Global, args: &Args) -> Result<ExitCode> {
    if args.cert_dirs.is_empty() && args.domains.is_empty() {
        return Err(Error::Config(
            "nothing to serve: give --cert-dir DIR and/or managed names with -d DOMAIN".into(),
        ));
    }
    if !args.domains.is_empty() || args.name.is_some() {
        return Err(Error::Config(
            "managed names (--name, -d) need the renewal manager, which this build lacks; serve certificates from --cert-dir instead".into(),
        ));
    }
    // Registered before anything is bound, so a SIGTERM during start-up is not lost.
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| Error::Config(format!("cannot handle SIGTERM: {e}")))?;

    let resolver = CertResolver::new();
    let metrics = Metrics::new();
    let mut watchers = Vec::new();
    for dir in &args.cert_dirs {
        let options = WatchOptions {
            default_name: args.default_name.clone(),
            ..WatchOptions::default()
        };
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
                })
                .collect()
        });
        watchers.push(watcher);
    }
    if resolver.is_empty() {
        tracing::warn!("no valid certificate found yet; handshakes are refused until one appears");
    }

    let mut config = TerminatorConfig::new(&args.upstream);
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.drain_timeout = Duration::from_secs(args.drain_timeout);
    let terminator = Terminator::bind(
        &args.listen,
        Arc::new(resolver.clone()),
        config,
        metrics.clone(),
    )
    .await?;

    let registry = Http01Registry::new();
    let _http = if args.no_http {
        None
    } else {
        let service = registry.service().redirect_others_to_https();
        Some(Http01Listener::bind(&args.challenge.http_listen, service).await?)
    };
    let _metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr, metrics.clone()).await?),
        None => None,
    };
    tracing::info!(
        listen = %terminator.local_addr(),
        upstream = args.upstream,
        certificates = resolver.len(),
        "serving"
    );

    terminator
        .run(async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            }
        })
        .await;
    drop(watchers);
    Ok(ExitCode::SUCCESS)
}
