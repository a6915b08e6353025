//! The TLS accept step, in one place: an optional PROXY protocol header from an outer
//! load balancer, the ClientHello, on-demand issuance for a name nothing serves yet, an
//! optional asynchronous hook before the handshake (it sees the SNI and the local address
//! and may supply another configuration), the IP address certificate for a client without
//! SNI, then the handshake with the configuration [`crate::tls_config::server_config`]
//! builds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::Result;
use crate::on_demand::OnDemand;
use crate::resolver::LocalAddrConfigs;

/// Called with the ClientHello's server name and the local address before the
/// handshake completes (e.g. to issue a certificate on demand). It may return a
/// configuration to use for this handshake instead of the default one.
#[async_trait::async_trait]
pub trait BeforeHandshake: Send + Sync {
    /// Runs before the handshake; `None` keeps the default configuration.
    async fn before_handshake(
        &self,
        server_name: Option<&str>,
        local: SocketAddr,
    ) -> Option<Arc<ServerConfig>>;
}

/// A finished accept.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub tls: TlsStream<TcpStream>,
    /// The client: from the PROXY header when one is required, else the TCP peer.
    pub client: SocketAddr,
    /// The address the client connected to (from the PROXY header when there is one).
    pub local: SocketAddr,
    pub server_name: Option<String>,
}

/// Why an accept failed (for logs and metrics).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error("no valid PROXY protocol header: {0}")]
    Proxy(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("refused: {0}")]
    OnDemand(String),
}

/// What the accept step needs.
pub(crate) struct TlsAccept {
    pub config: Arc<ServerConfig>,
    pub handshake_timeout: Duration,
    /// Some(limit): a PROXY v1/v2 header is required, within this time.
    pub proxy_protocol: Option<Duration>,
    pub hook: Option<Arc<dyn BeforeHandshake>>,
    /// Issues certificates for new names during their first handshake.
    pub on_demand: Option<OnDemand>,
    /// Per-local-address configurations for IP address certificates (clients without SNI).
    pub ip_configs: Option<Arc<LocalAddrConfigs>>,
}

impl TlsAccept {
    /// The client and the address it connected to: from the PROXY header when one is
    /// required (read here, exactly), else the TCP peer and local address.
    pub async fn client_of(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(SocketAddr, SocketAddr), AcceptError> {
        Ok(match self.proxy_protocol {
            Some(limit) => {
                match tokio::time::timeout(limit, read_proxy_header(stream)).await {
                    Ok(Ok(Some((source, destination)))) => (source, destination),
                    // LOCAL command (health checks of the balancer): the connection itself.
                    Ok(Ok(None)) => (peer, local),
                    Ok(Err(e)) => return Err(AcceptError::Proxy(e)),
                    Err(_) => return Err(AcceptError::Proxy("none within the time limit".into())),
                }
            }
            None => (peer, local),
        })
    }

    /// The ClientHello, on-demand issuance, the hook, then the handshake.
    pub async fn handshake(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Accepted, AcceptError> {
        let timeout = self.handshake_timeout;
        let start = tokio::time::timeout(
            timeout,
            LazyConfigAcceptor::new(Acceptor::default(), stream),
        )
        .await
        .map_err(|_| AcceptError::Timeout)?
        .map_err(AcceptError::Handshake)?;
        let (server_name, on_demand) = {
            let hello = start.client_hello();
            let on_demand = self
                .on_demand
                .as_ref()
                .map(|od| od.before_handshake(&hello));
            (hello.server_name().map(str::to_owned), on_demand)
        };
        // An order on demand is bounded by its own timeout, not the handshake's.
        if let Some(waiting) = on_demand {
            waiting
                .await
                .map_err(|e| AcceptError::OnDemand(e.to_string()))?;
        }
        let hooked = match &self.hook {
            Some(hook) => hook.before_handshake(server_name.as_deref(), local).await,
            None => None,
        };
        let config = match (hooked, &server_name, &self.ip_configs) {
            (Some(config), _, _) => config,
            (None, None, Some(configs)) => configs.config_for(local.ip()),
            _ => self.config.clone(),
        };
        let tls = tokio::time::timeout(timeout, start.into_stream(config))
            .await
            .map_err(|_| AcceptError::Timeout)?
            .map_err(AcceptError::Handshake)?;
        Ok(Accepted {
            tls,
            client,
            local,
            server_name,
        })
    }
}

/// The longest PROXY header: v1 is at most 107 bytes, v2 16 plus its addresses and TLVs.
const MAX_PROXY_HEADER: usize = 16 + 65535;

/// Reads a PROXY v1 or v2 header, exactly, leaving the TLS bytes after it unread.
/// Returns the source and destination addresses (`None` for v2 LOCAL and v1 UNKNOWN).
async fn read_proxy_header(
    stream: &mut TcpStream,
) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
    let mut peeked = vec![0u8; 232];
    loop {
        let n = stream.peek(&mut peeked).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        let (length, addresses) = {
            let header = ppp::HeaderResult::parse(&peeked[..n]);
            if ppp::PartialResult::is_incomplete(&header) {
                if n == peeked.len() {
                    if peeked.len() >= MAX_PROXY_HEADER {
                        return Err("header too long".into());
                    }
                    peeked.resize((peeked.len() * 2).min(MAX_PROXY_HEADER), 0);
                } else {
                    // Part of the header is here; wait a little for the rest.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                continue;
            }
            match header {
                ppp::HeaderResult::V2(Ok(header)) => {
                    (header.len(), v2_addresses(&header.addresses))
                }
                ppp::HeaderResult::V1(Ok(header)) => {
                    (header.header.len(), v1_addresses(&header.addresses))
                }
                ppp::HeaderResult::V2(Err(e)) => return Err(format!("{e:?}")),
                ppp::HeaderResult::V1(Err(e)) => return Err(format!("{e:?}")),
            }
        };
        let mut consumed = vec![0u8; length];
        stream
            .read_exact(&mut consumed)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(addresses);
    }
}

fn v2_addresses(addresses: &ppp::v2::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match addresses {
        ppp::v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v2::Addresses::IPv6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        _ => None,
    }
}

fn v1_addresses(addresses: &ppp::v1::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        ppp::v1::Addresses::Unknown => None,
    }
}

/// A PROXY v2 header announcing `client` connected to `local`, for upstreams.
pub(crate) fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => (
            SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())),
            SocketAddr::V6(l),
        ),
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::from((l.ip().to_ipv6_mapped(), l.port())),
        ),
        pair => pair,
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, local),
    )
    .build()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_header_parses_back() {
        let client: SocketAddr = "192.0.2.1:4000"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        let local: SocketAddr = "198.51.100.2:443"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        let bytes = proxy_v2_header(client, local);
        let ppp::HeaderResult::V2(Ok(header)) = ppp::HeaderResult::parse(&bytes) else {
            panic!("does not parse");
        };
        assert_eq!(header.len(), bytes.len());
        assert_eq!(v2_addresses(&header.addresses), Some((client, local)));
    }
}
