//! Keep-alive HTTP/1.1 connections to one upstream, on hyper's connection API.
//!
//! The edge knows more than a general client: every request of a pool goes to one
//! `host:port` it already chose, in origin form, with its Host header set. So a pool is a
//! stack of idle senders per upstream (the most recently used first, so few connections
//! stay warm), checked out per request and checked back in when the response body has
//! been read to its end; a body dropped early takes its connection down with it, as
//! HTTP/1.1 cannot resume mid-body.
//!
//! A pooled connection has no task of its own: whoever uses it drives it. The request's
//! task polls it while it waits for the response head, and the response body polls it
//! while it is read, so a proxied request costs no hand-over between tasks. Only an
//! upgrade request gives its connection a task, as the upgraded bytes outlive the
//! exchange.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::BoxBody;
use super::clock::coarse_now;

/// How long the connection for a response took to open, as a response extension; a
/// response on a kept-alive connection has none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectTime(pub Duration);

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

/// One keep-alive connection: the handle requests go in by, and the connection state
/// that must be polled for them to go anywhere.
struct Link {
    sender: SendRequest<BoxBody>,
    conn: Connection<TokioIo<TcpStream>, BoxBody>,
}

impl Link {
    /// Drives the connection once. `false` once it has ended (closed, or failed).
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(ended) => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                false
            }
        }
    }
}

struct Idle {
    link: Box<Link>,
    /// On the coarse clock: the pool reads it per request.
    since: Duration,
}

impl Idle {
    /// Whether it can take a request: idle for less than `timeout`, open and ready. One
    /// poll reads a close (or stray bytes) the upstream sent while it sat idle. Without a
    /// waker: whoever takes it next drives it with theirs, and a waker left here would
    /// have the request's hand-over wake that task once more for nothing.
    fn usable(&mut self, now: Duration, timeout: Duration) -> bool {
        let mut noop = Context::from_waker(Waker::noop());
        now.saturating_sub(self.since) < timeout
            && self.link.drive(&mut noop)
            && self.link.sender.is_ready()
    }
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
            idle: (0..super::thread_slot::slots())
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
        &self.idle[super::thread_slot::current() % self.idle.len()]
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
        if let Some(link) = self.checkout() {
            match self.exchange(link, request).await {
                Err((_, Some(unsent))) => request = unsent,
                done => return done,
            }
        }
        // The cold path (a new connection) is boxed, so the future of every request
        // stays small.
        let connecting = std::time::Instant::now();
        match Box::pin(self.connect()).await {
            Ok(link) => {
                let connected = ConnectTime(connecting.elapsed());
                let mut response = self.exchange(link, request).await?;
                response.extensions_mut().insert(connected);
                Ok(response)
            }
            Err(e) => Err((e, Some(request))),
        }
    }

    /// One request and its response head over `link`.
    async fn exchange(
        self: &Arc<Self>,
        mut link: Box<Link>,
        request: Request<BoxBody>,
    ) -> Result<Response<PooledBody>, (SendError, Option<Request<BoxBody>>)> {
        let failed = |mut failed: hyper::client::conn::TrySendError<Request<BoxBody>>| {
            let unsent = failed.take_message();
            (SendError::Exchange(failed.into_error()), unsent)
        };
        // Forward only strips Upgrade from requests that are not upgrades.
        if request.headers().contains_key(http::header::UPGRADE) {
            let Link { mut sender, conn } = *link;
            // The upgraded bytes outlive this exchange: the connection gets its own task,
            // and never comes back to the pool.
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            let response = sender.try_send_request(request).await.map_err(failed)?;
            return Ok(response.map(|inner| PooledBody {
                inner,
                link: None,
                pool: None,
            }));
        }
        // The request is queued here; the answer future holds no borrow of the sender.
        let mut response = pin!(link.sender.try_send_request(request));
        let mut link = Some(link);
        let response = poll_fn(|cx| {
            if let Some(live) = link.as_mut()
                && !live.drive(cx)
            {
                // Dropping the connection answers a pending request with its error.
                link = None;
            }
            // Only the connection polled just above can answer, so the answer needs no
            // wake-up of its own (which would poll this task once more for nothing).
            response
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
        })
        .await
        .map_err(failed)?;
        Ok(response.map(|inner| PooledBody {
            inner,
            link,
            pool: Some(self.clone()),
        }))
    }

    /// Lets go of the idle connections, on every thread's stack, that the upstream
    /// closed or that sat past the idle timeout. Pooled connections have no task of their
    /// own: without this, one the upstream closed would hold its descriptor (in
    /// CLOSE_WAIT) until the next request to that upstream, which may never come.
    pub fn sweep(&self) {
        let now = coarse_now();
        for idle in &self.idle {
            let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain_mut(|i| i.usable(now, self.idle_timeout));
        }
    }

    /// The most recently used idle connection that can take a request. Older ones past
    /// the idle timeout are left to [`ConnPool::sweep`].
    fn checkout(&self) -> Option<Box<Link>> {
        loop {
            let mut idle = self
                .idle_here()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if idle.usable(coarse_now(), self.idle_timeout) {
                return Some(idle.link);
            }
        }
    }

    async fn connect(&self) -> Result<Box<Link>, SendError> {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Exchange)?;
        // Boxed: a connection's state is large, and moves with every checkout.
        Ok(Box::new(Link { sender, conn }))
    }

    fn checkin(&self, link: Box<Link>) {
        if link.sender.is_closed() {
            return;
        }
        let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                link,
                since: coarse_now(),
            });
        }
    }
}

/// A response body from a pooled connection: it drives the connection while it is read,
/// and when it has been read to its end, the connection goes back to the pool.
pub(crate) struct PooledBody {
    inner: Incoming,
    /// `None` once the connection has ended, or when it belongs to an upgrade.
    link: Option<Box<Link>>,
    pool: Option<Arc<ConnPool>>,
}

impl PooledBody {
    fn finish(&mut self) {
        if let (Some(pool), Some(link)) = (self.pool.take(), self.link.take()) {
            pool.checkin(link);
        }
    }

    /// The next frame, if the connection has delivered it. Polled without a waker: only
    /// the connection fills the body, and its poll registers the wake-up.
    fn next_frame(&mut self) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut noop = Context::from_waker(Waker::noop());
        Pin::new(&mut self.inner).poll_frame(&mut noop)
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = if this.link.is_none() {
            // An upgrade's connection runs in its own task; an ended one has said all.
            Pin::new(&mut this.inner).poll_frame(cx)
        } else {
            match this.next_frame() {
                Poll::Ready(frame) => Poll::Ready(frame),
                Poll::Pending => {
                    if let Some(link) = this.link.as_mut()
                        && !link.drive(cx)
                    {
                        // Dropped, the connection ends the body (with an error if cut).
                        this.link = None;
                        Pin::new(&mut this.inner).poll_frame(cx)
                    } else {
                        this.next_frame()
                    }
                }
            }
        };
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.link = None,
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
