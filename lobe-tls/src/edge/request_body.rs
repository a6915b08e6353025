//! The client's request body on its way to an upstream: paced, so a client that
//! trickles it is cut ([`Paced`]), and, when small, read whole so it can be sent again
//! to another upstream ([`Replay`]).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::body::{BoxBody, BoxError, boxed};
use super::budget::Reservation;

/// Bodies up to this size are read before sending, so the request can be sent again to
/// another upstream if the first cannot take it, when the connection's and the edge's
/// replay budgets (see [`super::budget`]) have room for them; others stream through, once.
pub(super) const REPLAYABLE_BODY: u64 = 64 * 1024;

/// The slowest pace, in bytes a second, at which a request body may arrive once its
/// grace period (the header read timeout) is spent, as Apache's `mod_reqtimeout`
/// (`MinRate=500`): a client that trickles a body (slowloris) is answered 408 and its
/// connection closed, instead of holding it and an upstream connection for as long as
/// it likes.
const MIN_BODY_RATE: u64 = 500;

/// A client's request body came slower than [`MIN_BODY_RATE`].
#[derive(Debug, thiserror::Error)]
#[error("the request body came slower than {MIN_BODY_RATE} bytes a second")]
pub(super) struct BodyTooSlow;

/// A client's request body that must keep up [`MIN_BODY_RATE`] after a grace period.
/// Only the time spent waiting for the client counts (not the time the upstream takes to
/// read what came), so a slow upstream never gets a client cut.
pub(super) struct Paced<B> {
    inner: B,
    grace: Duration,
    received: u64,
    /// Time spent waiting for the client in the waits that ended.
    waited: Duration,
    /// When the wait in progress began.
    waiting_since: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Paced<B> {
    pub(super) fn new(inner: B, grace: Duration) -> Self {
        Paced {
            inner,
            grace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(since) = this.waiting_since.take() {
                this.waited += since.elapsed();
            }
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                this.received += data.map_or(0, |d| d.len() as u64);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.waiting_since.is_none() {
            // A new wait: its deadline is what the bytes so far have earned, less the
            // waits before it.
            let now = tokio::time::Instant::now();
            this.waiting_since = Some(now);
            let earned = this.grace
                + Duration::from_millis(this.received.saturating_mul(1000) / MIN_BODY_RATE);
            let deadline = now + earned.saturating_sub(this.waited);
            match this.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(BodyTooSlow.into()))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read whole, to send again if an attempt fails, with its place in the
/// replay budgets.
#[derive(Debug, Clone, Default)]
pub(super) struct Replay {
    bytes: Bytes,
    held: Option<Arc<Reservation>>,
}

impl Replay {
    /// A body read whole, holding `reservation` in the replay budgets.
    pub(super) fn new(bytes: Bytes, reservation: Reservation) -> Self {
        Replay {
            bytes,
            held: Some(Arc::new(reservation)),
        }
    }

    /// The body for one attempt; it keeps the reservation until it is dropped too, as
    /// the upstream connection may hold it past the attempt.
    pub(super) fn body(&self) -> BoxBody {
        boxed(Replayed {
            bytes: (!self.bytes.is_empty()).then(|| self.bytes.clone()),
            _held: self.held.clone(),
        })
    }
}

/// One attempt's copy of a [`Replay`]: its bytes in one frame.
struct Replayed {
    bytes: Option<Bytes>,
    _held: Option<Arc<Reservation>>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.bytes.take().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}
