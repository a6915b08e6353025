//! Listening sockets: one bind with one error for a busy or bad address, and background
//! listener tasks that stop when their owner is dropped.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Binds `addr`, returning the listener and the address actually bound (port 0 picks one).
pub(crate) async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let listen_error = |source| Error::Listen {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local_addr))
}

/// A listener's accept loop running in the background; aborted when dropped.
#[derive(Debug)]
pub(crate) struct ListenerTask {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ListenerTask {
    /// Binds `addr` and runs `serve` on the listener in a task of its own.
    pub(crate) async fn spawn<F>(addr: &str, serve: impl FnOnce(TcpListener) -> F) -> Result<Self>
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
/// headers, and how long one of its connections may stay open: these serve short
/// requests, so a slow or idle client is cut instead of holding a task.
pub(crate) const HTTP_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub(crate) const HTTP_CONNECTION_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A hyper server builder for the plain HTTP listeners, with timers, so the header read
/// timeout holds (slowloris).
pub(crate) fn http_builder()
-> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HTTP_HEADER_READ_TIMEOUT);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    builder
}
