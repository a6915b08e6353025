//! The TLS accept step, in one place: an optional PROXY protocol header from an outer
//! load balancer, the ClientHello, a stored certificate read ahead of the initial load,
//! on-demand issuance for a name nothing serves yet, an
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

use super::forwarded::is_trusted;
use crate::error::Result;
use crate::on_demand::OnDemand;
use crate::resolver::LocalAddrConfigs;
use ipnet::IpNet;

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
    /// The peers whose PROXY headers are believed; any other peer is refused before
    /// anything is read from it.
    pub proxy_trusted: Vec<IpNet>,
    pub hook: Option<Arc<dyn BeforeHandshake>>,
    /// Issues certificates for new names during their first handshake.
    pub on_demand: Option<OnDemand>,
    /// The manager whose initial load a handshake may overtake (see
    /// [`crate::manager::Manager::load_before_handshake`]).
    pub stored: Option<crate::manager::Manager>,
    /// Per-local-address configurations for IP address certificates (clients without SNI).
    pub ip_configs: Option<Arc<LocalAddrConfigs>>,
}

impl TlsAccept {
    /// The client and the address it connected to: from the PROXY header when one is
    /// required (read here, exactly, and only from a trusted peer), else the TCP peer
    /// and local address.
    pub async fn client_of(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(SocketAddr, SocketAddr), ProxyError> {
        let Some(limit) = self.proxy_protocol else {
            return Ok((peer, local));
        };
        // Anyone else could name any client: refused before a byte is read.
        if !is_trusted(&self.proxy_trusted, peer.ip()) {
            return Err(ProxyError::Untrusted);
        }
        match tokio::time::timeout(limit, read_proxy_header(stream)).await {
            Ok(Ok(Some((source, destination)))) => Ok((source, destination)),
            // LOCAL command (health checks of the balancer): the connection itself.
            Ok(Ok(None)) => Ok((peer, local)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProxyError::Timeout),
        }
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
        // During the initial load of the store, the name's certificate may not be read
        // yet: read it now (bounded; a no-op once the load is done).
        if let Some(manager) = &self.stored
            && manager.is_loading()
            && let Some(name) = start.client_hello().server_name().map(str::to_owned)
        {
            manager.load_before_handshake(&name).await;
        }
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

/// The longest v1 header, CRLF included (the PROXY protocol's own limit).
const MAX_V1_HEADER: usize = 107;
/// The longest v2 address block and TLVs this edge reads: the largest address block
/// (216 bytes, AF_UNIX) plus 4 KiB of TLVs. Balancers send a few dozen bytes; a header
/// that announces more is refused rather than buffered (the format allows 64 KiB).
const MAX_V2_BODY: usize = 216 + 4096;

/// Why a PROXY header was refused. The messages never quote the header: what it names
/// is not believed, so it is not logged either.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("the peer is not a trusted proxy (--trusted-proxy); nothing read")]
    Untrusted,
    #[error("no PROXY header within the time limit")]
    Timeout,
    #[error("connection closed before the PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[source] std::io::Error),
    #[error("the connection does not start with a PROXY header")]
    Missing,
    #[error("PROXY v2 header announces {0} bytes, more than the {MAX_V2_BODY} read")]
    TooLong(usize),
    #[error("PROXY v1 header without CRLF within {MAX_V1_HEADER} bytes")]
    V1TooLong,
    #[error("invalid PROXY v1 header: {0}")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("invalid PROXY v2 header: {0}")]
    V2(#[source] ppp::v2::ParseError),
}

impl From<std::io::Error> for ProxyError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProxyError::Closed,
            _ => ProxyError::Io(e),
        }
    }
}

/// Reads a PROXY v1 or v2 header, exactly, leaving the TLS bytes after it unread.
/// Returns the source and destination addresses (`None` for v2 LOCAL and v1 UNKNOWN).
/// Every wait is on the socket's readiness; nothing is read past the header.
async fn read_proxy_header(
    stream: &mut TcpStream,
) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(ProxyError::Closed);
    }
    match first[0] {
        b'\r' => read_v2(stream).await,
        b'P' => read_v1(stream).await,
        _ => Err(ProxyError::Missing),
    }
}

/// v2: the fixed 16 bytes, then exactly the length they announce (at most
/// [`MAX_V2_BODY`]).
async fn read_v2(stream: &mut TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    let mut header = vec![0u8; 16];
    stream.read_exact(&mut header).await?;
    if !header.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(ProxyError::V2(ppp::v2::ParseError::Prefix));
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if length > MAX_V2_BODY {
        return Err(ProxyError::TooLong(length));
    }
    header.resize(16 + length, 0);
    stream.read_exact(&mut header[16..]).await?;
    let header = ppp::v2::Header::try_from(&header[..]).map_err(ProxyError::V2)?;
    Ok(match header.command {
        // LOCAL (the balancer's own health checks): the addresses are to be ignored.
        ppp::v2::Command::Local => None,
        ppp::v2::Command::Proxy => v2_addresses(&header.addresses),
    })
}

/// v1: a line of at most [`MAX_V1_HEADER`] bytes ending in CRLF. What is there is
/// peeked; bytes before the line's end are certainly header and are consumed, so the
/// next peek waits for more instead of seeing the same bytes again.
async fn read_v1(stream: &mut TcpStream) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    let mut line = Vec::with_capacity(MAX_V1_HEADER);
    let mut peeked = [0u8; MAX_V1_HEADER];
    loop {
        let room = MAX_V1_HEADER - line.len();
        if room == 0 {
            return Err(ProxyError::V1TooLong);
        }
        let n = stream.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        let end = peeked[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |at| at + 1);
        stream.read_exact(&mut peeked[..take]).await?;
        line.extend_from_slice(&peeked[..take]);
        if end.is_some() {
            break;
        }
    }
    let header = ppp::v1::Header::try_from(&line[..]).map_err(ProxyError::V1)?;
    if header.header.len() != line.len() {
        // A CR before the LF that ends the line: not the one CRLF the format allows.
        return Err(ProxyError::V1(ppp::v1::ParseError::InvalidSuffix.into()));
    }
    Ok(v1_addresses(&header.addresses))
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
    use std::io::Write;

    /// A loopback connection whose client side a plain thread writes in `parts`, with a
    /// real pause between them; the server side.
    async fn written_in_parts(
        parts: Vec<Vec<u8>>,
        pause: Duration,
    ) -> (TcpStream, std::thread::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client.set_nodelay(true).unwrap();
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    std::thread::sleep(pause);
                }
                client.write_all(part).unwrap();
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        (stream, writer)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// With tokio's clock paused, any timer the reader waited on would move the clock
    /// (the runtime jumps to the next timer when idle); waiting on the socket does not.
    #[tokio::test(start_paused = true)]
    async fn a_header_in_pieces_is_read_by_waiting_on_the_socket_not_a_timer() {
        let (client, local) = (addr("192.0.2.1:4000"), addr("198.51.100.2:443"));
        let header = proxy_v2_header(client, local);
        let tls = b"\x16\x03\x01 the ClientHello".to_vec();
        let parts = vec![
            header[..10].to_vec(),
            header[10..20].to_vec(),
            [&header[20..], &tls[..4]].concat(),
            tls[4..].to_vec(),
        ];
        let (mut stream, writer) = written_in_parts(parts, Duration::from_millis(100)).await;
        let start = tokio::time::Instant::now();
        let read = read_proxy_header(&mut stream).await.unwrap();
        assert_eq!(read, Some((client, local)));
        assert_eq!(start.elapsed(), Duration::ZERO, "the reader slept");
        // The TLS bytes after the header are all still there.
        let mut rest = vec![0u8; tls.len()];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, tls);
        writer.join().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_v1_line_in_pieces_is_consumed_up_to_its_end_only() {
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n".to_vec();
        let parts = vec![
            line[..5].to_vec(),
            line[5..line.len() - 1].to_vec(),
            [&line[line.len() - 1..], b"\x16\x03TLS"].concat(),
        ];
        let (mut stream, writer) = written_in_parts(parts, Duration::from_millis(50)).await;
        let start = tokio::time::Instant::now();
        let read = read_proxy_header(&mut stream).await.unwrap();
        assert_eq!(
            read,
            Some((addr("[2001:db8::7]:4000"), addr("[2001:db8::1]:443")))
        );
        assert_eq!(start.elapsed(), Duration::ZERO, "the reader slept");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"\x16\x03TLS");
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn headers_past_their_caps_and_other_bytes_are_refused() {
        // v2 announcing 60,000 bytes of TLVs: refused after 16 bytes, nothing buffered.
        let mut big = proxy_v2_header(addr("192.0.2.1:1"), addr("192.0.2.2:2"))[..16].to_vec();
        big[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        // v1 without its CRLF in 107 bytes.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        let cases: [(Vec<u8>, &str); 4] = [
            (big, "announces 60000 bytes"),
            (long, "without CRLF"),
            (
                b"\x16\x03\x01 a ClientHello".to_vec(),
                "does not start with a PROXY",
            ),
            (
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n".to_vec(),
                "invalid PROXY v1",
            ),
        ];
        for (bytes, says) in cases {
            let (mut stream, writer) = written_in_parts(vec![bytes], Duration::ZERO).await;
            let e = read_proxy_header(&mut stream)
                .await
                .err()
                .map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains(says)), "{e:?}");
            drop(stream);
            writer.join().unwrap();
        }
    }

    #[tokio::test]
    async fn an_edge_that_would_believe_every_peer_is_refused_at_bind() {
        let mut config = crate::edge::EdgeConfig::new(Vec::new());
        config.accept_proxy_protocol = Some(Duration::from_secs(5));
        let bound = crate::edge::Edge::bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(crate::resolver::CertResolver::new()),
            config.clone(),
            crate::metrics::Metrics::new(),
        )
        .await;
        let Err(crate::error::Error::Config { message: why, .. }) = bound else {
            panic!("bound: {bound:?}");
        };
        assert!(why.contains("trusted_proxies"), "{why}");
        config.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let bound = crate::edge::Edge::bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(crate::resolver::CertResolver::new()),
            config,
            crate::metrics::Metrics::new(),
        )
        .await;
        assert!(bound.is_ok(), "{bound:?}");
    }

    #[tokio::test]
    async fn a_peer_outside_the_trusted_networks_is_refused_before_a_byte_is_read() {
        let config = crate::tls_config::server_config(
            Arc::new(crate::resolver::CertResolver::new()),
            &[],
            None,
        )
        .unwrap();
        let accept = TlsAccept {
            config: Arc::new(config),
            handshake_timeout: Duration::from_secs(1),
            proxy_protocol: Some(Duration::from_secs(1)),
            proxy_trusted: vec!["10.0.0.0/8".parse().unwrap()],
            hook: None,
            on_demand: None,
            stored: None,
            ip_configs: None,
        };
        let header = proxy_v2_header(addr("203.0.113.77:1"), addr("127.0.0.1:443"));
        let (mut stream, writer) = written_in_parts(vec![header.clone()], Duration::ZERO).await;
        let local = stream.local_addr().unwrap();
        let untrusted = addr("192.0.2.1:5000");
        let refused = accept.client_of(&mut stream, untrusted, local).await;
        assert!(matches!(refused, Err(ProxyError::Untrusted)), "{refused:?}");
        // Nothing was read: the header is still there in full.
        let mut unread = vec![0u8; header.len()];
        stream.read_exact(&mut unread).await.unwrap();
        assert_eq!(unread, header);
        // A trusted peer's header is believed; IPv4-mapped peers count as IPv4.
        let (mut stream, _writer2) = written_in_parts(vec![header.clone()], Duration::ZERO).await;
        let trusted = addr("[::ffff:10.1.2.3]:5000");
        let believed = accept.client_of(&mut stream, trusted, local).await.unwrap();
        assert_eq!(believed.0, addr("203.0.113.77:1"));
        writer.join().unwrap();
    }

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
