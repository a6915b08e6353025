//! What every connection task of one edge shares: its settings, its sites, its limits
//! and budgets, its metrics, and the tasks that outlive their connection.

use std::future::Future;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::task::JoinSet;

use super::config::EdgeConfig;
use super::limits::Limits;
use super::metrics::EdgeMetrics;
use super::site::Router;
use super::{access_log, budget, inflight, thread_slot, upstream};
use crate::metrics::Metrics;

/// What every connection task shares.
pub(crate) struct Shared {
    pub config: EdgeConfig,
    pub router: ArcSwap<Router>,
    pub limits: Limits,
    /// Requests in flight per client.
    pub in_flight: inflight::InFlight,
    /// Mints this edge's affinity tokens (its own, or the store's once shared).
    pub affinity_key: ArcSwap<upstream::AffinityKey>,
    /// Bytes of request bodies held for replay.
    pub replay: budget::ReplayBudget,
    /// Where finished requests are recorded, if anywhere.
    pub access_log: Option<Arc<access_log::AccessLog>>,
    pub metrics: Arc<EdgeMetrics>,
    pub cert_metrics: Arc<Metrics>,
    /// Upgraded connections (WebSockets) outlive the HTTP connection they came on; they
    /// are drained with the others on shutdown.
    /// One set per accepting thread: a task belongs to the runtime it was spawned on.
    pub detached: Box<[Mutex<JoinSet<()>>]>,
    pub reload_lock: Mutex<()>,
    /// Turns true when the edge stops accepting: HTTP connections finish their requests
    /// and close.
    pub draining: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn spawn_detached(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self
            .detached_here()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Reap finished ones so the set does not grow.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// The detached tasks of the accepting thread this runs on.
    pub(crate) fn detached_here(&self) -> &Mutex<JoinSet<()>> {
        &self.detached[thread_slot::current() % self.detached.len()]
    }
}
