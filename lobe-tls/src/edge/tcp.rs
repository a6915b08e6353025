//! The tcp mode: decrypted bytes are forwarded to an upstream, both ways, as they arrive.
//!
//! Nothing waits for a whole message, so WebSocket and server-sent events stream through.
//! When one side finishes sending, the other side's write half is shut down and the
//! opposite direction keeps going (half-close). A connection that moves no byte either
//! way for the idle timeout is closed. The upstream is picked by the site's policy
//! (the site is chosen by SNI); one that cannot be reached is passed over for the next.
//! When none can be reached, clients that negotiated `http/1.1` get a 502 response;
//! nothing else here speaks HTTP.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::accept::{Accepted, proxy_v2_header};
use super::clock::ActivityClock;
use super::config::secs;
use super::hold::ConnHold;
use super::shared::Shared;
use super::upstream::PickContext;

/// Forwards one accepted connection to an upstream of the site its SNI names; `hold`
/// (its place in the limits) is kept until the connection closes.
pub(crate) async fn serve(accepted: Accepted, shared: Arc<Shared>, hold: ConnHold) {
    let Accepted {
        mut tls,
        client,
        local,
        server_name,
    } = accepted;
    let router = shared.router.load_full();
    // A client that sends no SNI connected to an address: the site of that address.
    let by_addr;
    let name = match server_name.as_deref() {
        Some(name) => name,
        None => {
            by_addr = local.ip().to_canonical().to_string();
            &by_addr
        }
    };
    let Some(site) = router.site(Some(name)).cloned() else {
        tracing::debug!(%client, ?server_name, "no site for this server name");
        let _ = tls.shutdown().await;
        return;
    };
    // The site's IP lists (routes are paths: http mode only), closing the connection.
    if let Some(access) = site.access.as_deref()
        && !access.admits(client.ip())
    {
        site.metrics.denied_ip.inc();
        tracing::debug!(%client, site = site.name, "connection refused by the IP lists");
        let _ = tls.shutdown().await;
        return;
    }
    let pool = site.default.clone();
    let cx = PickContext {
        client_ip: client.ip(),
    };
    let mut tried = Vec::new();
    let connect_timeout = secs(site.config.connect_timeout);
    let (upstream, member) = loop {
        let Some(choice) = pool.choose(&cx, None, &tried) else {
            tracing::warn!(%client, site = site.name, "no upstream could be reached");
            shared.cert_metrics.upstream_error();
            refuse_for_upstream(&mut tls).await;
            return;
        };
        tried.push(choice.index);
        let member = pool.members()[choice.index].clone();
        let connected =
            tokio::time::timeout(connect_timeout, TcpStream::connect(&member.upstream.addr)).await;
        match connected {
            Ok(Ok(stream)) => {
                member.upstream.succeeded();
                break (stream, member);
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {connect_timeout:?}"),
                };
                tracing::warn!(%client, upstream = member.upstream.addr, error, "cannot connect to the upstream");
                member.upstream.failed(pool.fall, pool.cooldown);
                if tried.len() > 1 {
                    site.metrics.retries.inc();
                }
            }
        }
    };
    let mut upstream = upstream;
    let _ = upstream.set_nodelay(true);
    if shared.config.send_proxy_v2 {
        let header = proxy_v2_header(client, local);
        if let Err(e) = upstream.write_all(&header).await {
            tracing::debug!(%client, error = %e, "cannot send the PROXY header");
            return;
        }
    }
    let held = (
        hold,
        member.upstream.open(),
        shared.cert_metrics.connection_opened(),
    );
    // The copy runs in a task of its own, as an upgraded connection's does: this task
    // is sized for the handshake and the upstream pick, and would keep that size for as
    // long as the connection stays open. The stream is boxed so that it is stored once.
    let copy = forward(Box::new(tls), upstream, site.config.idle());
    shared.spawn_detached(async move {
        match copy.await {
            Ok((up, down)) => tracing::debug!(%client, up, down, "connection closed"),
            Err(e) => tracing::debug!(%client, error = %e, "connection ended"),
        }
        drop(held);
    });
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
    // Each chunk is written as soon as it is read, and at EOF the other side's write half
    // is shut down (half-close); no buffer is held while nothing moves.
    let copy = super::copy::bidirectional(&mut client, &mut upstream);
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

/// A stream that notes on its clock every time bytes are read or written.
pub(crate) struct Tracked<S> {
    inner: S,
    clock: Arc<ActivityClock>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, clock: Arc<ActivityClock>) -> Self {
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
