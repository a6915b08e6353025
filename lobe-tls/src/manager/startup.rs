//! Serving during the initial load: while [`Manager::start`] reads the store in the
//! background, a handshake for a stored name not loaded yet loads that one certificate
//! on the spot.
//!
//! Bounded three ways, so a flood of handshakes for unknown names cannot turn into a
//! flood of store reads: only while the initial load runs (afterwards a handshake pays
//! one atomic load here); once the store's listing is known, only for names it lists
//! (a set dropped when the load ends); and at most [`MAX_LOADS`] at once, each within
//! [`LOAD_TIMEOUT`]. A handshake over those bounds gets what it would have got without
//! this (the default certificate, or a refusal) and is counted.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Semaphore;

use super::Manager;

/// The most certificates loaded on demand at once during the initial load.
pub const MAX_LOADS: usize = 32;
/// How long a handshake waits for its certificate to be loaded on demand.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of the initial load, shared by the manager and the accept path.
pub(super) struct InitialLoad {
    /// Set until [`Manager::start`] has read and installed every stored certificate
    /// (or failed to list them).
    running: AtomicBool,
    /// The store's certificate names, once listed, while the load runs.
    listed: ArcSwapOption<HashSet<String>>,
    permits: Semaphore,
    counts: LoadCounts,
}

impl Default for InitialLoad {
    fn default() -> Self {
        InitialLoad {
            running: AtomicBool::new(true),
            listed: ArcSwapOption::empty(),
            permits: Semaphore::new(MAX_LOADS),
            counts: LoadCounts::default(),
        }
    }
}

impl InitialLoad {
    pub(super) fn listed(&self, names: &[String]) {
        self.listed
            .store(Some(Arc::new(names.iter().cloned().collect())));
    }

    pub(super) fn finished(&self) {
        self.running.store(false, Ordering::Release);
        self.listed.store(None);
    }
}

/// What loading on demand did during the initial load (for `/status.json` and logs).
#[derive(Debug, Default)]
struct LoadCounts {
    loaded: AtomicU64,
    not_stored: AtomicU64,
    busy: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of [`Manager::initial_load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct InitialLoadStatus {
    /// The initial load of the store is still running.
    pub loading: bool,
    /// Certificates loaded on demand by a handshake during the load.
    pub loaded_on_demand: u64,
    /// Handshakes for names the store does not hold (no store read once it was listed).
    pub not_stored: u64,
    /// Handshakes not served on demand because [`MAX_LOADS`] loads were running.
    pub busy: u64,
    /// Loads on demand that took longer than [`LOAD_TIMEOUT`].
    pub timed_out: u64,
    /// Loads on demand that failed (an unreadable or unusable certificate).
    pub failed: u64,
}

impl Manager {
    /// Whether the initial load of the store is still to finish: true from when the
    /// manager is built until [`Manager::start`] has read and served every stored
    /// certificate (or failed to list them).
    pub fn is_loading(&self) -> bool {
        self.inner.initial_load.running.load(Ordering::Acquire)
    }

    /// The initial load's state and what loading on demand did during it.
    pub fn initial_load(&self) -> InitialLoadStatus {
        let load = &self.inner.initial_load;
        let c = &load.counts;
        InitialLoadStatus {
            loading: self.is_loading(),
            loaded_on_demand: c.loaded.load(Ordering::Relaxed),
            not_stored: c.not_stored.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Before a handshake for `server_name` while the initial load runs: loads that
    /// name's stored certificate now if nothing serves it yet. The stored certificate is
    /// looked up under the name itself (a certificate's name is its first domain unless
    /// it was issued under another); other names it covers are served once the
    /// background load reaches it. Returns at once after the initial load.
    pub async fn load_before_handshake(&self, server_name: &str) {
        if !self.is_loading() {
            return;
        }
        let load = &self.inner.initial_load;
        let resolver = self.resolver();
        if resolver.covers(server_name) {
            return;
        }
        let name = server_name.strip_suffix('.').unwrap_or(server_name);
        let name = name.to_ascii_lowercase();
        // Not a name a certificate can be stored under: nothing to read.
        if crate::domain::DomainName::parse(&name).is_err()
            || load
                .listed
                .load()
                .as_deref()
                .is_some_and(|listed| !listed.contains(&name))
        {
            load.counts.not_stored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(_permit) = load.permits.try_acquire() else {
            load.counts.busy.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Another handshake may have loaded it while this one waited.
        if resolver.covers(&name) {
            return;
        }
        match tokio::time::timeout(LOAD_TIMEOUT, self.reload(&name)).await {
            Ok(Ok(true)) => {
                load.counts.loaded.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cert = %name, "loaded on demand during the initial load");
            }
            // Nothing stored under that name (before the listing was known).
            Ok(Ok(false)) => {
                load.counts.not_stored.fetch_add(1, Ordering::Relaxed);
            }
            // `reload` logged it.
            Ok(Err(_)) => {
                load.counts.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                load.counts.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cert = %name, timeout = ?LOAD_TIMEOUT, "loading a certificate on demand took too long; the handshake goes on without it");
            }
        }
    }
}
