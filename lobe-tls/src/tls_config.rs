//! The one place a rustls server configuration is built for serving: certificates from a
//! resolver, ALPN with `acme-tls/1` always accepted, and session resumption.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ProducesTickets, ResolvesServerCert};

use crate::error::{Error, Result};
use crate::resolver::ACME_TLS_ALPN;

/// A server configuration over `resolver` offering `alpn` (plus `acme-tls/1`, so that
/// TLS-ALPN-01 validations work; an empty list turns ALPN off altogether). Clients
/// resume through tickets sealed by `ticketer` (see [`crate::tickets`]) or, without one,
/// by rustls's own per-process rotating ticketer; TLS 1.2 clients without ticket support
/// through rustls's in-memory session cache.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[Vec<u8>],
    ticketer: Option<Arc<dyn ProducesTickets>>,
) -> Result<ServerConfig> {
    let mut tls = ServerConfig::builder_with_provider(crate::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("cannot build the TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    if !alpn.is_empty() {
        tls.alpn_protocols = alpn.to_vec();
        tls.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    tls.ticketer = match ticketer {
        Some(ticketer) => ticketer,
        None => crate::tickets::local_ticketer()?,
    };
    Ok(tls)
}
