//! The upstream's response body on its way back to the client.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::access_log::Pending;
use super::body::BoxError;
use super::hold::RequestGuard;
use super::inflight::InFlightPermit;
use super::metrics::GaugeGuard;
use super::pool::PooledBody;
use super::upstream_state::ActiveGuard;

/// An upstream response body passed on frame by frame as it arrives (nothing is
/// gathered), cut when no frame comes for the site's idle timeout. It holds the
/// upstream's open count, the stream gauge and the request's place in flight (on its
/// client connection and in its client's cap) until it ends.
///
/// The idle timer is armed only while the body waits, so a body that is all there
/// (most pages) never touches the timer wheel.
pub(super) struct Relay {
    inner: PooledBody,
    idle: Duration,
    /// Waiting since the last frame (the timer is armed for this wait).
    waiting: bool,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Body bytes passed on so far, for the access log.
    sent: u64,
    /// The access log record, written when the body ends (or is dropped).
    log: Option<Pending>,
    _guards: (
        ActiveGuard,
        Option<GaugeGuard>,
        RequestGuard,
        InFlightPermit,
    ),
}

impl Relay {
    /// Relays `inner`, cut after `idle` without a frame, holding `guards` until it ends;
    /// `log` is written then, with the bytes sent.
    pub(super) fn new(
        inner: PooledBody,
        idle: Duration,
        guards: (
            ActiveGuard,
            Option<GaugeGuard>,
            RequestGuard,
            InFlightPermit,
        ),
        log: Option<Pending>,
    ) -> Self {
        Relay {
            inner,
            idle,
            waiting: false,
            timer: None,
            sent: 0,
            log,
            _guards: guards,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut pending) = self.log.take() {
            pending.record.bytes_out = self.sent;
            pending.finish();
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.waiting = false;
            if let Some(Ok(data)) = &frame
                && let Some(data) = data.data_ref()
            {
                self.sent += data.len() as u64;
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + self.idle;
            match self.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            // An error, not an end: the client must not take a cut body for a whole one.
            Some(Poll::Ready(())) => Poll::Ready(Some(Err("idle timeout".into()))),
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
