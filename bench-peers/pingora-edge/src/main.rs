//! `pingora-edge`: a TLS edge on Pingora (rustls), a peer in lobe-tls's edge bench.
//!
//! It terminates TLS 1.2/1.3 with h2 and http/1.1 offered by ALPN, and proxies every
//! request over HTTP/1.1 to one plain-HTTP upstream through Pingora's keep-alive pool,
//! with the forwarding headers the other peers set. It keeps no access log.

mod forwarded;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use async_trait::async_trait;
use clap::Parser;
use pingora::http::RequestHeader;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{HttpPeer, Server};
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::tls::{load_certs_and_key_files, ServerConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A Pingora TLS edge (rustls) for lobe-tls's edge bench"
)]
struct Args {
    /// Address to accept TLS on, e.g. 127.0.0.1:8443.
    #[arg(long)]
    listen: SocketAddr,
    /// The plain-HTTP upstream, e.g. 127.0.0.1:8080.
    #[arg(long)]
    upstream: SocketAddr,
    /// PEM certificate chain (leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// PEM private key.
    #[arg(long)]
    key: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
}

/// Why the edge could not start.
#[derive(Debug)]
enum StartError {
    /// A path that is not UTF-8 (Pingora takes `&str` paths).
    Path(PathBuf),
    /// The certificate or key did not load.
    Pem(String, Box<pingora::Error>),
    /// The files hold no certificate or no key.
    Empty(String),
    /// rustls refused the pair (e.g. the key does not match the certificate).
    Rustls(pingora::tls::RusTlsError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "path is not UTF-8: {}", p.display()),
            Self::Pem(what, _) => write!(f, "cannot load {what}"),
            Self::Empty(what) => write!(f, "no certificate or no private key in {what}"),
            Self::Rustls(_) => write!(f, "rustls refused the certificate and key"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Pem(_, e) => Some(e.as_ref()),
            Self::Rustls(e) => Some(e),
            Self::Path(_) | Self::Empty(_) => None,
        }
    }
}

/// The proxy logic: every request goes to the one upstream.
struct Edge {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Plain HTTP/1.1 (the default ALPN of a peer); Pingora pools the connection.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        forwarded::apply(upstream_request, client)
    }

    // `logging` keeps its empty default: no access log.
}

/// Installs rustls's process-wide crypto provider and names it. Pingora installs ring
/// only when none is installed yet, so one installed here wins.
fn install_provider() -> &'static str {
    #[cfg(feature = "aws-lc-rs")]
    {
        let _ = pingora::tls::CryptoProvider::install_default(
            rustls::crypto::aws_lc_rs::default_provider(),
        );
        "aws-lc-rs"
    }
    #[cfg(not(feature = "aws-lc-rs"))]
    {
        pingora::tls::install_default_crypto_provider();
        "ring"
    }
}

/// Loads the pair through rustls before Pingora does: its listener set-up panics on a
/// bad file, while this reports which one and why.
fn check_pem(cert: &str, key: &str) -> Result<(), StartError> {
    let what = || format!("{cert} / {key}");
    let (certs, key) = load_certs_and_key_files(cert, key)
        .map_err(|e| StartError::Pem(what(), e))?
        .ok_or_else(|| StartError::Empty(what()))?;
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(StartError::Rustls)?;
    Ok(())
}

fn utf8(path: &std::path::Path) -> Result<&str, StartError> {
    path.to_str()
        .ok_or_else(|| StartError::Path(path.to_path_buf()))
}

fn start(args: &Args) -> Result<Server, StartError> {
    let cert = utf8(&args.cert)?;
    let key = utf8(&args.key)?;
    let provider = install_provider();
    check_pem(cert, key)?;
    eprintln!(
        "pingora-edge: TLS on {} with rustls ({provider}), {} thread(s), upstream {}",
        args.listen, args.threads, args.upstream
    );

    let conf = ServerConf {
        threads: usize::from(args.threads),
        // SIGTERM stops it within a second: the bench sends SIGKILL after 5 s.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        // A file per listener, so that several instances do not share one.
        pid_file: format!("/tmp/pingora-edge-{}.pid", args.listen.port()),
        upgrade_sock: format!("/tmp/pingora-edge-{}.sock", args.listen.port()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut service = http_proxy_service(
        &server.configuration,
        Edge {
            upstream: args.upstream,
        },
    );
    let mut tls =
        TlsSettings::intermediate(cert, key).map_err(|e| StartError::Pem(cert.into(), e))?;
    tls.enable_h2();
    service.add_tls_with_settings(&args.listen.to_string(), None, tls);
    server.add_service(service);
    Ok(server)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match start(&args) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            let mut line = format!("pingora-edge: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}
