//! Keep-alive HTTP/1.1 connections to one upstream, on hyper's connection API.
//!
//! The edge knows more than a general client: every request of a pool goes to one
//! `host:port` it already chose, in origin form, with its Host header set. So a pool is a
//! stack of idle senders per upstream (the most recently used first, so few connections
//! stay warm), checked out per request and checked back in when the response body has
//! been read to its end; a body dropped early takes its connection down with it, as
//! HTTP/1.1 cannot resume mid-body.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::upstream::BoxBody;

/// How long a pooled connection may take to become ready for its next request (its
/// previous response is read; hyper's connection task only has to notice).
const READY_WAIT: Duration = Duration::from_secs(1);

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be opened: nothing reached the upstream.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The request was sent (perhaps in part) and the exchange failed.
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    /// Whether nothing of the request reached the upstream.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }

    /// Whether the connection failed for want of something on this side (file
    /// descriptors, memory, local ports): no fault of the upstream's.
    pub fn is_local(&self) -> bool {
        let SendError::Connect { source, .. } = self else {
            return false;
        };
        if source.kind() == std::io::ErrorKind::AddrNotAvailable {
            return true;
        }
        source.raw_os_error().is_some_and(|code| {
            let errno = rustix::io::Errno::from_raw_os_error(code);
            [
                rustix::io::Errno::MFILE,
                rustix::io::Errno::NFILE,
                rustix::io::Errno::NOBUFS,
                rustix::io::Errno::NOMEM,
            ]
            .contains(&errno)
        })
    }
}

struct Idle {
    sender: SendRequest<BoxBody>,
    since: Instant,
}

/// The idle keep-alive connections of one upstream.
pub(crate) struct ConnPool {
    addr: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Per accepting thread: a connection is driven by the runtime that opened it, so
    /// each thread reuses its own.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("addr", &self.addr)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl ConnPool {
    pub fn new(
        addr: String,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        Arc::new(ConnPool {
            addr,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: (0..super::shard::slots())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        })
    }

    /// Idle connections kept now.
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|idle| idle.lock().map(|idle| idle.len()).unwrap_or(0))
            .sum()
    }

    fn idle_here(&self) -> &Mutex<Vec<Idle>> {
        &self.idle[super::shard::current() % self.idle.len()]
    }

    /// Sends `request` (origin-form URI, Host set) over an idle connection, or a new one.
    /// A request that a reused connection could not take (it closed meanwhile) goes
    /// once more over a new connection, as nothing of it was sent. When no connection
    /// can be opened, the request comes back with the error, unsent.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, (SendError, Option<Request<BoxBody>>)> {
        let mut request = request;
        if let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(response, sender)),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err((SendError::Exchange(failed.into_error()), None)),
                },
            }
        }
        let mut sender = match self.connect().await {
            Ok(sender) => sender,
            Err(e) => return Err((e, Some(request))),
        };
        match sender.try_send_request(request).await {
            Ok(response) => Ok(self.wrap(response, sender)),
            Err(mut failed) => {
                let unsent = failed.take_message();
                Err((SendError::Exchange(failed.into_error()), unsent))
            }
        }
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<BoxBody>,
    ) -> Response<PooledBody> {
        // A switched connection belongs to the upgrade now, never to the pool.
        let checkin = (response.status() != http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (self.clone(), sender));
        response.map(|inner| PooledBody { inner, checkin })
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self) -> Option<SendRequest<BoxBody>> {
        loop {
            let idle = {
                let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
                // The oldest sit at the bottom: drop the ones past the idle timeout.
                let expired = idle
                    .iter()
                    .take_while(|i| i.since.elapsed() >= self.idle_timeout)
                    .count();
                idle.drain(..expired);
                idle.pop()
            }?;
            let mut sender = idle.sender;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<BoxBody>, SendError> {
        let connect_error = |source| SendError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.addr.as_str()),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_error(e)),
            Err(_) => {
                return Err(connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )));
            }
        };
        // Events and frames go out as they come, not after Nagle's wait.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    fn checkin(&self, sender: SendRequest<BoxBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A response body from a pooled connection: when it has been read to its end, the
/// connection goes back to the pool.
pub(crate) struct PooledBody {
    inner: Incoming,
    checkin: Option<(Arc<ConnPool>, SendRequest<BoxBody>)>,
}

impl PooledBody {
    fn finish(&mut self) {
        if let Some((pool, sender)) = self.checkin.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing left to read (HEAD, 204, 304, or read to its end) leaves
        // its connection reusable; one dropped part way does not.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(source: std::io::Error) -> SendError {
        SendError::Connect {
            addr: "127.0.0.1:1".into(),
            source,
        }
    }

    #[test]
    fn running_out_of_descriptors_is_not_the_upstreams_fault() {
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(connect_error(emfile).is_local());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!connect_error(refused).is_local());
        assert!(connect_error(std::io::ErrorKind::AddrNotAvailable.into()).is_local());
    }
}
