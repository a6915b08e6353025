//! A minimal TLS listener over a `CertResolver` (what an embedding proxy does), and a
//! verifying client that reports the serial it was served.

use std::net::SocketAddr;
use std::sync::Arc;

use lobe_tls::CertResolver;
use lobe_tls::resolver::ACME_TLS_ALPN;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Accepts TLS on an address with certificates from a resolver; each connection is
/// closed right after its handshake. Stops when dropped.
#[derive(Debug)]
pub struct TlsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// A rustls server configuration over `resolver`, offering `acme-tls/1` and HTTP/1.1.
pub fn server_config(resolver: CertResolver) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

impl TlsServer {
    /// Binds `addr` (e.g. Pebble's TLS-ALPN-01 port, or `127.0.0.1:0`).
    pub async fn bind(addr: &str, resolver: CertResolver) -> TlsServer {
        let listener = TcpListener::bind(addr).await.expect("bind TLS listener");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(resolver));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // Failed handshakes are the client's business to report.
                    let _ = acceptor.accept(stream).await;
                });
            }
        });
        TlsServer { addr, task }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS client that trusts only `root_pem`. It never resumes a session: a resumed
/// handshake shows the certificate of the session it resumes, and tests look at the one
/// served now (the session-ticket tests turn resumption back on).
pub fn client_config(root_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(root.expect("root PEM")).expect("add root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Writes a leaf for `names`, signed by a fresh CA, as `dir/site/fullchain.pem` and
/// `dir/site/privkey.pem` (a pair `serve --cert-dir dir` serves); returns the CA's
/// certificate in PEM, for clients to trust.
pub fn write_site_pair(dir: &std::path::Path, names: &[&str]) -> String {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let leaf = rcgen::CertificateParams::new(names)
        .expect("leaf names")
        .signed_by(&key, &issuer)
        .expect("leaf certificate");
    std::fs::create_dir_all(dir.join("site")).expect("site directory");
    std::fs::write(dir.join("site/fullchain.pem"), leaf.pem()).expect("fullchain.pem");
    std::fs::write(dir.join("site/privkey.pem"), key.serialize_pem()).expect("privkey.pem");
    ca.pem()
}

/// A connector over [`client_config`]: trusts only `root_pem`, never resumes.
pub fn connector(root_pem: &str) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(client_config(root_pem))
}

/// Connects to `addr` with SNI `server_name`, verifies the chain with `config` as a
/// browser would (chain, name, validity period), and returns the facts of the leaf served.
pub async fn handshake_leaf(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<lobe_tls::CertInfo, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate served")?;
    lobe_tls::CertInfo::from_der(leaf).map_err(|e| e.to_string())
}

/// [`handshake_leaf`], returning the serial (lower-case hex) of the certificate served.
pub async fn handshake_serial(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    handshake_leaf(addr, server_name, config)
        .await
        .map(|info| info.serial)
}
