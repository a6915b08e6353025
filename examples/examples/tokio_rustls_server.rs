//! A TLS server on tokio-rustls whose certificate lobe-tls issues, serves and renews.
//!
//! The manager's `CertResolver` goes into the rustls `ServerConfig`; renewals swap the
//! certificate in without touching the listener. The order is validated with
//! TLS-ALPN-01 on this same port, so nothing else has to listen: the resolver answers
//! `acme-tls/1` handshakes with the challenge certificate while an order runs.
//!
//! ```text
//! LOBE_TLS_STORE=./store LOBE_TLS_EMAIL=ops@example.com \
//!   cargo run -p lobe-tls-examples --example tokio_rustls_server -- chat.example.com
//! ```
//!
//! `LOBE_TLS_DIRECTORY` picks the CA (default: Let's Encrypt staging), `LOBE_TLS_LISTEN`
//! the address (default `0.0.0.0:443`, which the CA must reach).

use std::sync::Arc;

use lobe_tls::challenge::ChallengeConfig;
use lobe_tls::manager::Event;
use lobe_tls::resolver::ACME_TLS_ALPN;
use lobe_tls::{AcmeConfig, FileStore, ManagedCert, Manager, domain};
use tokio::io::AsyncWriteExt;
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
        return Err("usage: tokio_rustls_server DOMAIN [DOMAIN...]".into());
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

    // No standalone listener: TLS-ALPN-01 challenges go into the manager's resolver,
    // which the server below uses.
    let challenge = ChallengeConfig::tls_alpn01(None);
    let cert =
        ManagedCert::new(&domains[0], domain::parse_all(&domains)?).with_challenge(challenge);
    let manager = Manager::builder(acme, store).cert(cert).build()?;

    let mut tls = rustls::ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(manager.resolver().clone()));
    // The CA's validation connection offers only `acme-tls/1`; it must be negotiated.
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    // Accept before ordering, so the CA can reach the challenge.
    let listener = TcpListener::bind(env_or("LOBE_TLS_LISTEN", "0.0.0.0:443")).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    // A validation handshake: nothing more to say.
                    let _ = tls.shutdown().await;
                    return;
                }
                let body = "hello over TLS\n";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });

    let mut events = manager.subscribe();
    let report = manager.start().await?;
    println!(
        "loaded {}, obtained {:?}, failed {:?}",
        report.loaded, report.obtained, report.failed
    );
    let _maintenance = manager.spawn();
    loop {
        match events.recv().await {
            Ok(Event::RenewalFailed { name, error, .. }) => {
                eprintln!("{name}: renewal failed: {error}")
            }
            Ok(event) => println!("{event:?}"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
