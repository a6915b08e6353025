//! The TLS accept loop and byte forwarding behind `lobe-tls serve`.
//!
//! Each accepted connection is decrypted with certificates from a resolver and its bytes
//! are forwarded to a plain TCP upstream, both ways, as they arrive: nothing waits for a
//! whole message, so WebSocket and server-sent events stream through. When one side
//! finishes sending, the other side's write half is shut down and the opposite direction
//! keeps going (half-close). A connection that moves no byte either way for the idle
//! timeout is closed. When the upstream cannot be reached, clients that negotiated
//! `http/1.1` get a 502 response; nothing else here speaks HTTP.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use rustls::server::{Acceptor, ResolvesServerCert};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::on_demand::OnDemand;
use crate::resolver::{ACME_TLS_ALPN, CertResolver, LocalAddrConfigs};

/// How the terminator treats connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TerminatorConfig {
    /// The plain TCP address decrypted bytes go to, `host:port`.
    pub upstream: String,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long connecting to the upstream may take.
    pub connect_timeout: Duration,
    /// On shutdown, how long open connections may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// The application protocols offered through ALPN (besides `acme-tls/1`, which is
    /// always accepted so that TLS-ALPN-01 validations work). Empty: no ALPN.
    pub alpn: Vec<Vec<u8>>,
}

impl TerminatorConfig {
    /// Defaults for `upstream`: one hour idle timeout, 10 s handshakes and upstream
    /// connects, 30 s drain, ALPN `http/1.1`.
    pub fn new(upstream: impl Into<String>) -> Self {
        TerminatorConfig {
            upstream: upstream.into(),
            idle_timeout: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            alpn: vec![b"http/1.1".to_vec()],
        }
    }
}

/// A bound TLS listener, ready to [`run`](Terminator::run).
pub struct Terminator {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Arc<ServerConfig>,
    /// Per-local-address configurations for IP address certificates, if asked for.
    ip_configs: Option<Arc<LocalAddrConfigs>>,
    on_demand: Option<OnDemand>,
    config: Arc<TerminatorConfig>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("local_addr", &self.local_addr)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// Binds `listen` and builds the TLS configuration around `resolver` (see
    /// [`crate::tls_config::server_config`]; sessions resume on this process only).
    pub async fn bind(
        listen: &str,
        resolver: Arc<dyn ResolvesServerCert>,
        config: TerminatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let tls = crate::tls_config::server_config(resolver, &config.alpn, None)?;
        Self::bind_with(listen, Arc::new(tls), config, metrics).await
    }

    /// Binds `listen` and serves with `tls`, built by
    /// [`crate::tls_config::server_config`] (with shared session tickets, say). Its ALPN
    /// list is used as it is; `config.alpn` is not.
    pub async fn bind_with(
        listen: &str,
        tls: Arc<ServerConfig>,
        config: TerminatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (listener, local_addr) = crate::listen::bind(listen).await?;
        Ok(Terminator {
            listener,
            local_addr,
            tls,
            ip_configs: None,
            on_demand: None,
            config: Arc::new(config),
            metrics,
        })
    }

    /// Serves the IP address certificates `certs` holds (RFC 8738) to clients that send
    /// no server name, chosen by the local address each connection arrived on (see
    /// [`LocalAddrConfigs`]). Everything else is resolved as before.
    pub fn with_ip_certs(mut self, certs: CertResolver) -> Self {
        let base = self.tls.clone();
        self.ip_configs = Some(Arc::new(LocalAddrConfigs::new(base, certs)));
        self
    }

    /// Issues certificates for names nothing serves yet, during their first handshake,
    /// as `on_demand`'s guard allows.
    pub fn with_on_demand(mut self, on_demand: OnDemand) -> Self {
        self.on_demand = Some(on_demand);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts and forwards connections until `shutdown` completes; then stops accepting
    /// and gives open connections up to the drain timeout to finish before cutting them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Terminator {
            listener,
            local_addr,
            tls,
            ip_configs,
            on_demand,
            config,
            metrics,
        } = self;
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let tls = match (&ip_configs, stream.local_addr()) {
                            (Some(configs), Ok(local)) => configs.config_for(local.ip()),
                            _ => tls.clone(),
                        };
                        connections.spawn(handle(stream, peer, tls, on_demand.clone(), config.clone(), metrics.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept on {local_addr}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        let open = connections.len();
        if open > 0 {
            tracing::info!(
                open,
                "stopped accepting; waiting up to {:?} for connections to finish",
                config.drain_timeout
            );
        }
        let drained = tokio::time::timeout(config.drain_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len(),
                "drain timeout reached; closing the remaining connections"
            );
            connections.shutdown().await;
        }
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerConfig>,
    on_demand: Option<OnDemand>,
    config: Arc<TerminatorConfig>,
    metrics: Arc<Metrics>,
) {
    // Interactive traffic (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let Some(mut tls) = accept(stream, peer, tls, on_demand.as_ref(), &config).await else {
        metrics.handshake_failed();
        return;
    };
    metrics.handshake_ok();
    if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A TLS-ALPN-01 validation: the handshake was the whole point (RFC 8737).
        let _ = tls.shutdown().await;
        return;
    }
    let connected =
        tokio::time::timeout(config.connect_timeout, TcpStream::connect(&config.upstream)).await;
    let upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        failed => {
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {:?}", config.connect_timeout),
            };
            tracing::warn!(%peer, upstream = config.upstream, error, "cannot connect to the upstream");
            metrics.upstream_error();
            refuse_for_upstream(&mut tls).await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _active = metrics.connection_opened();
    match forward(tls, upstream, config.idle_timeout).await {
        Ok((up, down)) => tracing::debug!(%peer, up, down, "connection closed"),
        Err(e) => tracing::debug!(%peer, error = %e, "connection ended"),
    }
}

/// The TLS handshake: the ClientHello first, then on-demand issuance when it is on (its
/// own bound), then the rest of the handshake. The handshake timeout applies to the
/// ClientHello and to the rest separately, so that an issuance does not eat into it.
async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerConfig>,
    on_demand: Option<&OnDemand>,
    config: &TerminatorConfig,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let bound = config.handshake_timeout;
    let hello = LazyConfigAcceptor::new(Acceptor::default(), stream);
    let start = match tokio::time::timeout(bound, hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "cannot read the ClientHello");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "no ClientHello in time");
            return None;
        }
    };
    if let Some(on_demand) = on_demand
        && let Err(e) = on_demand.before_handshake(&start.client_hello()).await
    {
        tracing::debug!(%peer, error = %e, "handshake refused");
        return None;
    }
    match tokio::time::timeout(bound, start.into_stream(tls)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Tells a client that the upstream is down, where it is known to speak HTTP/1.1 (it
/// negotiated `http/1.1` through ALPN), so that it sees a 502 instead of a reset
/// connection. Others are closed with a TLS close_notify: their protocol is unknown.
async fn refuse_for_upstream<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut tokio_rustls::server::TlsStream<S>,
) {
    if tls.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
        let _ = tls.write_all(BAD_GATEWAY).await;
    }
    let _ = tls.shutdown().await;
}

/// The whole response for an unreachable upstream, sent before the request is read, as
/// an HTTP/1.1 server may (`Connection: close` tells the client not to reuse it).
const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 43\r\n\
connection: close\r\n\
\r\n\
lobe-tls: cannot reach the upstream server\n";

/// Copies bytes both ways until both directions are finished or nothing moves for
/// `idle_timeout`. Returns the bytes sent client→upstream and upstream→client.
pub async fn forward<A, B>(client: A, upstream: B, idle_timeout: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Arc::new(ActivityClock::new());
    let mut client = Tracked::new(client, clock.clone());
    let mut upstream = Tracked::new(upstream, clock.clone());
    // tokio's copy writes each chunk as soon as it is read and shuts the other side's
    // write half down at EOF, which is the half-close we want.
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let deadline = clock.last() + idle_timeout;
        tokio::select! {
            done = &mut copy => return done,
            _ = tokio::time::sleep_until(deadline.into()) => {
                if clock.last() + idle_timeout <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}

/// When bytes last moved on a connection, shared by both directions.
#[derive(Debug)]
struct ActivityClock {
    start: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    fn new() -> Self {
        ActivityClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that notes on its clock every time bytes are read or written.
struct Tracked<S> {
    inner: S,
    clock: Arc<ActivityClock>,
}

impl<S> Tracked<S> {
    fn new(inner: S, clock: Arc<ActivityClock>) -> Self {
        Tracked { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_gateway_declares_the_length_of_its_body() {
        let text = std::str::from_utf8(BAD_GATEWAY).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        let declared = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(declared, Some(body.len()), "{text}");
    }
}
