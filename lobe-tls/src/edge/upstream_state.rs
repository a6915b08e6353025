//! The health state of the upstreams: what is known of each upstream address (its open
//! requests, its active checks' verdict, its passive ejection). Health checks (`health`)
//! and the request phase write it; the balancing policies (`upstream`) read it. A leaf:
//! it imports nothing of the edge.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// The process's start, the zero of the upstreams' clocks.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One upstream address and what is known about it, shared by every pool that lists it
/// and kept across reloads.
pub struct Upstream {
    /// `host:port`.
    pub addr: String,
    active: AtomicUsize,
    /// Set by active checks.
    healthy: AtomicBool,
    /// Passive ejection: out until this time (ms since the epoch).
    ejected_until: AtomicU64,
    failures: AtomicU32,
    /// Requests and connections sent to it since start (for the status page).
    requests: AtomicU64,
    /// The last active check, written by `health` once per interval.
    last_check: Mutex<Option<CheckResult>>,
}

/// What the last active health check of an upstream found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// Whether it passed (a 2xx or 3xx answer within the timeout).
    pub ok: bool,
    /// `status 200` when it answered; otherwise why not: `dns`, `refused`, `timeout`,
    /// `reset` or `error`.
    pub result: String,
    /// How long the check took.
    #[serde(rename = "latency_ms", serialize_with = "millis")]
    pub latency: Duration,
    /// When it ran.
    #[serde(skip)]
    pub at: SystemTime,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One upstream as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct UpstreamStatus {
    /// `host:port`.
    pub addr: String,
    /// In rotation: passing its checks and not ejected.
    pub up: bool,
    /// Open requests, streams and connections now.
    pub in_flight: usize,
    /// Requests and connections sent to it since start.
    pub requests: u64,
    /// The last active health check, if one ran.
    pub last_check: Option<CheckResult>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("active", &self.active())
            .field("up", &self.is_up())
            .finish()
    }
}

impl Upstream {
    pub(crate) fn new(addr: &str) -> Self {
        Upstream {
            addr: addr.to_owned(),
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            last_check: Mutex::new(None),
        }
    }

    /// Records an active check's result.
    pub(crate) fn record_check(&self, check: CheckResult) {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    /// What the status page shows of it.
    pub fn status(&self) -> UpstreamStatus {
        UpstreamStatus {
            addr: self.addr.clone(),
            up: self.is_up(),
            in_flight: self.active(),
            requests: self.requests.load(Ordering::Relaxed),
            last_check: self
                .last_check
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Open requests, streams and connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Passing active checks and not ejected.
    pub fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// Counts one request or connection as open until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A connect failure or a 5xx answer; `fall` of them in a row take the upstream out
    /// for `cooldown`.
    pub(crate) fn failed(&self, fall: u32, cooldown: std::time::Duration) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= fall {
            self.failures.store(0, Ordering::Relaxed);
            let until =
                now_ms().saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX));
            self.ejected_until.store(until, Ordering::Relaxed);
            tracing::warn!(
                upstream = self.addr,
                ?cooldown,
                "upstream failing; taken out for a cool-down"
            );
        }
    }

    /// A good answer: the failure streak ends.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Keeps an upstream's open count up while alive.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Upstream>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
