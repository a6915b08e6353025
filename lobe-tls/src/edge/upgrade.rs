//! Upgrades: a WebSocket (or other protocol) switch asked for with HTTP/1.1 `Upgrade`,
//! or with RFC 8441 extended CONNECT over h2, passed on to the upstream as an HTTP/1.1
//! upgrade; once both sides have switched, their bytes are copied both ways.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::access_log::Pending;
use super::headers::strip_hop_by_hop;

/// What kind of upgrade a request asks for.
pub(super) enum Upgrade {
    None,
    /// HTTP/1.1 `Upgrade: <protocol>`.
    Http1(HeaderValue),
    /// h2 extended CONNECT with `:protocol websocket`.
    H2WebSocket,
}

/// The upgrade `req` asks for, if any.
pub(super) fn upgrade_of(req: &Request<Incoming>) -> Upgrade {
    if req.method() == Method::CONNECT {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return if websocket {
            Upgrade::H2WebSocket
        } else {
            Upgrade::None
        };
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    match req.headers().get(header::UPGRADE) {
        Some(protocol) if asks && req.version() == http::Version::HTTP_11 => {
            Upgrade::Http1(protocol.clone())
        }
        _ => Upgrade::None,
    }
}

/// Writes the upgrade into the head of the request to the upstream, whose hop-by-hop
/// fields are already gone.
pub(super) fn ask_upstream(upgrade: &Upgrade, parts: &mut http::request::Parts) {
    match upgrade {
        Upgrade::Http1(protocol) => {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        Upgrade::H2WebSocket => {
            // RFC 8441 → RFC 6455 towards the upstream: a GET with a fresh key.
            parts.method = Method::GET;
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let key: [u8; 16] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            if let Ok(key) = HeaderValue::from_str(&key) {
                parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
            }
            parts
                .headers
                .entry(header::SEC_WEBSOCKET_VERSION)
                .or_insert(HeaderValue::from_static("13"));
        }
        Upgrade::None => {}
    }
}

/// The head of the switch answered to the client: an h2 client gets a 200 for its
/// CONNECT, as the key exchange was ours.
pub(super) fn answer_client(upgrade: &Upgrade, parts: &mut http::response::Parts) {
    if matches!(upgrade, Upgrade::H2WebSocket) {
        parts.status = http::StatusCode::OK;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    }
}

/// Copies the bytes of an upgraded connection both ways once both sides have switched,
/// until it closes or stays idle for `idle`; `held` is dropped then, and the access log
/// record (if any) written with the bytes each way.
pub(super) async fn splice<H>(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: Duration,
    held: H,
    log: Option<Pending>,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            if let Some(pending) = log {
                pending.finish();
            }
            return;
        }
    };
    // Counted on the client's side, so that a connection that ends in an error (a
    // reset, the idle timeout) still says what it carried.
    let client = Counted {
        inner: TokioIo::new(client),
        read: 0,
        written: 0,
    };
    let mut client = std::pin::pin!(client);
    let moved = super::tcp::forward(client.as_mut(), TokioIo::new(upstream), idle).await;
    tracing::debug!(?moved, "upgraded connection closed");
    drop(held);
    if let Some(mut pending) = log {
        pending.record.bytes_in = client.read;
        pending.record.bytes_out = client.written;
        pending.finish();
    }
}

/// The client's side of an upgraded connection, counting the bytes each way.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The access log's `upgrade` value of a request: `websocket`, `h2-websocket`, or
/// `None` (another protocol; an event stream is known from its response).
pub(super) fn log_name(upgrade: &Upgrade) -> Option<&'static str> {
    match upgrade {
        Upgrade::Http1(protocol) if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") => {
            Some("websocket")
        }
        Upgrade::H2WebSocket => Some("h2-websocket"),
        Upgrade::Http1(_) | Upgrade::None => None,
    }
}
