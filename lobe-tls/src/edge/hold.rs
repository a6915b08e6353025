//! What a client connection holds while it is open: its place in the limits and gauges,
//! and its requests in flight. A leaf below the phases that share it (`conn`, `http`,
//! `proxy`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::clock;
use super::limits::ConnPermit;
use super::metrics::GaugeGuard;

/// What an open client connection holds until its last user is gone: its place in the
/// connection limits and the active-connection gauges. An upgraded connection (a
/// WebSocket, served by a task of its own) holds it past the HTTP connection it came on,
/// until its stream closes.
pub(crate) struct ConnHold {
    _permit: ConnPermit,
    _gauge: GaugeGuard,
    _active: Option<crate::metrics::ActiveConnection>,
}

impl std::fmt::Debug for ConnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHold").finish_non_exhaustive()
    }
}

impl ConnHold {
    pub(crate) fn new(permit: ConnPermit, gauge: GaugeGuard) -> Self {
        ConnHold {
            _permit: permit,
            _gauge: gauge,
            _active: None,
        }
    }

    /// Counts the connection in the certificate metrics' active connections too.
    pub(crate) fn count_active(&mut self, active: crate::metrics::ActiveConnection) {
        self._active = Some(active);
    }
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub(crate) struct RequestTracker {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) served: AtomicBool,
    pub(crate) idle_since: clock::ActivityClock,
    /// The connection's limits and gauges, until the last request (or upgrade) is done.
    _hold: ConnHold,
}

impl RequestTracker {
    pub(crate) fn new(hold: ConnHold) -> Self {
        RequestTracker {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: clock::ActivityClock::new(),
            _hold: hold,
        }
    }

    /// Counts a request as in flight until the guard (held by its response body) drops.
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        RequestGuard(self.clone())
    }
}

/// One request in flight.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<RequestTracker>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.touch();
        }
    }
}
