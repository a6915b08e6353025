//! An axum app that answers HTTP-01 from its own router, with the lobe-tls manager running
//! beside it and the same router served over TLS with the manager's certificates.
//!
//! The app mounts `Http01Registry::service()` (a tower service) at
//! `/.well-known/acme-challenge/{token}` on its port-80 router; the manager puts tokens
//! into that registry while an order runs. Port 443 serves the same router through
//! tokio-rustls with the manager's `CertResolver`, so renewals need no restart.
//!
//! ```text
//! LOBE_TLS_STORE=./store LOBE_TLS_EMAIL=ops@example.com \
//!   cargo run -p lobe-tls-examples --example axum_http01 -- chat.example.com
//! ```
//!
//! `LOBE_TLS_DIRECTORY` picks the CA (default: Let's Encrypt staging); `HTTP_LISTEN` and
//! `HTTPS_LISTEN` the addresses (default `0.0.0.0:80` and `0.0.0.0:443`).

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use lobe_tls::{AcmeConfig, FileStore, Http01Registry, ManagedCert, Manager, domain};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let domains: Vec<String> = std::env::args().skip(1).collect();
    if domains.is_empty() {
        return Err("usage: axum_http01 DOMAIN [DOMAIN...]".into());
    }
    let store = Arc::new(FileStore::open(env_or(
        "LOBE_TLS_STORE",
        "./lobe-tls-store",
    ))?);
    let mut acme = AcmeConfig::new(lobe_tls::acme::resolve_directory(&env_or(
        "LOBE_TLS_DIRECTORY",
        "letsencrypt-staging",
    ))?);
    acme.email = std::env::var("LOBE_TLS_EMAIL").ok();
    // Extra trust root for the CA's own HTTPS (a local Pebble, say).
    acme.directory_ca = std::env::var_os("LOBE_TLS_DIRECTORY_CA").map(Into::into);

    // The registry is shared: the manager fills it, the app's router answers from it.
    let http01 = Http01Registry::new();
    let app = Router::new()
        .route("/", get(|| async { "hello from axum\n" }))
        .route_service("/.well-known/acme-challenge/{token}", http01.service());

    let http = TcpListener::bind(env_or("HTTP_LISTEN", "0.0.0.0:80")).await?;
    tokio::spawn(axum::serve(http, app.clone()).into_future());

    let manager = Manager::builder(acme, store)
        .http01(http01)
        .cert(ManagedCert::new(&domains[0], domain::parse_all(&domains)?))
        .build()?;
    let report = manager.start().await?;
    println!(
        "loaded {}, obtained {:?}, failed {:?}",
        report.loaded, report.obtained, report.failed
    );
    let _maintenance = manager.spawn();

    // The same router over TLS, with certificates from the manager's resolver.
    let tls = rustls::ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(manager.resolver().clone()));
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let https = TcpListener::bind(env_or("HTTPS_LISTEN", "0.0.0.0:443")).await?;
    loop {
        let (stream, _) = https.accept().await?;
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
}
