//! A TLS server over a `CertResolver` and a client that checks what it serves, for tests
//! that watch certificates being swapped.

use std::net::SocketAddr;
use std::sync::Arc;

use lobe_tls::CertResolver;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS server answering every connection with `hello` through `resolver`; stops when dropped.
pub struct TlsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    /// Serves `resolver` on `addr` (use `127.0.0.1:0` for any port). It also offers
    /// `acme-tls/1`, as a proxy that answers TLS-ALPN-01 itself must.
    pub async fn start(addr: &str, resolver: CertResolver) -> TlsServer {
        let mut config =
            rustls::ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"http/1.1".to_vec(), b"acme-tls/1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        TlsServer { addr, task }
    }
}

/// The leaf certificate a verifying client received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Serial (hex).
    pub serial: String,
    /// Expiry.
    pub not_after: time::OffsetDateTime,
}

/// Connects to `addr` with SNI `name`, verifying against `root_pem` as a browser would
/// (chain, name, validity period), reads the greeting, and returns the leaf's facts.
pub async fn handshake(addr: SocketAddr, name: &str, root_pem: &str) -> Result<Seen, String> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots
            .add(root.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut greeting = Vec::new();
    tls.read_to_end(&mut greeting)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if greeting != b"hello" {
        return Err(format!("unexpected greeting {greeting:?}"));
    }
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no peer certificate")?;
    let info = lobe_tls::CertInfo::from_der(leaf).map_err(|e| e.to_string())?;
    Ok(Seen {
        serial: info.serial,
        not_after: info.not_after,
    })
}
