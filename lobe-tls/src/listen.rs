//! Listening sockets: one bind with one error for a busy or bad address, and background
//! listener tasks that stop when their owner is dropped.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Binds `addr`, returning the listener and the address actually bound (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listen_error = |source| Error::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local_addr))
}

/// A listen address from configuration kept as text (a stored challenge configuration,
/// an imported certbot file): an IP address and a port, e.g. `0.0.0.0:80` or `[::]:80`.
pub(crate) fn parse_addr(addr: &str, what: &str) -> Result<SocketAddr> {
    addr.parse().map_err(|_| {
        Error::config(format!(
            "{what} {addr:?} is not an IP address and port (e.g. 0.0.0.0:80 or [::]:80)"
        ))
    })
}

/// A listener's accept loop running in the background; aborted when dropped.
#[derive(Debug)]
pub(crate) struct ListenerTask {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ListenerTask {
    /// Binds `addr` and runs `serve` on the listener in a task of its own.
    pub(crate) async fn spawn<F>(
        addr: SocketAddr,
        serve: impl FnOnce(TcpListener) -> F,
    ) -> Result<Self>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (listener, local_addr) = bind(addr).await?;
        let task = tokio::spawn(serve(listener));
        Ok(ListenerTask { local_addr, task })
    }

    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a client of a plain HTTP listener (port 80, metrics) has to send a request's
/// headers, and how long a kept-alive connection may sit idle before its next request:
/// these serve short requests, so a slow or idle client is cut instead of holding a task.
#[cfg(feature = "metrics")]
pub(crate) const HTTP_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long one connection of a plain HTTP listener may stay open, however busy.
#[cfg(feature = "metrics")]
pub(crate) const HTTP_CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most a plain HTTP listener buffers of one connection's input (hyper's minimum is
/// 8 KiB): its requests are a line and a few headers.
#[cfg(feature = "metrics")]
const HTTP_MAX_BUF: usize = 16 * 1024;

/// A hyper server builder for the plain HTTP listeners (the features that listen imply
/// `metrics`, whose /metrics listener is one of them): HTTP/1.1 only, with a timer so
/// that the header read timeout holds (slowloris) from the first byte and between
/// kept-alive requests.
///
/// HTTP/1.1 only because hyper-util's version sniffing (the `auto` builder) reads the
/// first bytes with no timeout at all: a client that connects and sends nothing would
/// hold its connection until [`HTTP_CONNECTION_LIMIT`]. ACME validation, redirects and
/// scrapes all speak HTTP/1.1.
#[cfg(feature = "metrics")]
pub(crate) fn http_builder() -> hyper::server::conn::http1::Builder {
    http1_builder(HTTP_HEADER_READ_TIMEOUT)
}

/// As [`http_builder`], with another header read (and keep-alive idle) timeout.
#[cfg(feature = "metrics")]
pub(crate) fn http1_builder(
    header_read_timeout: std::time::Duration,
) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(HTTP_MAX_BUF);
    builder
}
