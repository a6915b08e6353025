//! One client connection, from accept to its mode: the PROXY header, the per-address
//! cap, the TLS handshake, then `http` or `tcp`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::config::Mode;
use super::hold::ConnHold;
use super::shared::Shared;
use super::{accept, http, limits, metrics, tcp};
use crate::resolver::ACME_TLS_ALPN;

/// Serves one accepted TCP connection: the PROXY header, the limits, the handshake, then
/// the mode's phase (`http` or `tcp`).
pub(crate) async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accept: Arc<accept::TlsAccept>,
    shared: Arc<Shared>,
    mut permit: limits::ConnPermit,
) {
    // Interactive traffic (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (client, local) = match accept.client_of(&mut stream, peer, local).await {
        Ok(addresses) => addresses,
        Err(e) => {
            shared.metrics.reject("proxy_protocol");
            tracing::debug!(%peer, error = %e, "connection refused before TLS");
            return;
        }
    };
    // The per-address cap applies to the client a PROXY header names, not to the
    // balancer in front (admitted by its peer address otherwise, before anything is read).
    if shared.config.accept_proxy_protocol.is_some()
        && let Err(refused) = permit.admit_ip(&shared.limits, client.ip())
    {
        shared.metrics.reject(refused.reason());
        tracing::debug!(%peer, %client, reason = refused.reason(), "connection refused");
        return;
    }
    let accepted = match accept.handshake(stream, client, local).await {
        Ok(accepted) => accepted,
        Err(e) => {
            shared.cert_metrics.handshake_failed();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let resumed = accepted.tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    shared.cert_metrics.handshake_ok(resumed);
    let mut accepted = accepted;
    if accepted.tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the whole point (RFC 8737).
        use tokio::io::AsyncWriteExt;
        let _ = accepted.tls.shutdown().await;
        return;
    }
    let mut hold = ConnHold::new(
        permit,
        metrics::GaugeGuard::new(shared.metrics.connections.clone()),
    );
    match shared.config.mode {
        Mode::Tcp => tcp::serve(accepted, shared, hold).await,
        Mode::Http => {
            hold.count_active(shared.cert_metrics.connection_opened());
            http::serve(accepted, shared, hold).await
        }
    }
}
