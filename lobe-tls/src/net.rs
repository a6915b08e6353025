//! Outbound HTTP clients: one construction, used for the ACME CA and for DNS provider APIs.

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::cert::crypto_provider;
use crate::error::{Error, Result};

/// The trust roots for outbound HTTPS: the public web PKI plus an optional extra CA file
/// (for a private CA or a test CA such as Pebble's).
pub fn root_store(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::config(format!(
                    "cannot read CA file {}: {e} (expected PEM certificates)",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(Error::config(format!(
                "CA file {} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                Error::config(format!(
                    "CA file {}: unusable certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(roots)
}

/// An HTTP(S) client with TCP_NODELAY on.
///
/// Without it every small POST on loopback stalls about 40 ms, Nagle's algorithm meeting
/// delayed ACKs; an ACME order makes a dozen such requests.
pub fn http_client<B>(
    roots: rustls::RootCertStore,
) -> Result<Client<HttpsConnector<HttpConnector>, B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(Arc::new(roots))
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}
