//! Clocks for timeouts of seconds and more, read on every read and write and per
//! request: the coarse monotonic clock (a few milliseconds' resolution, no hardware
//! clock read) is enough there, and costs less.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When bytes last moved on a connection, shared by both directions.
#[derive(Debug)]
pub(crate) struct ActivityClock {
    start: Instant,
    start_coarse: Duration,
    last_ms: AtomicU64,
}

impl ActivityClock {
    pub(crate) fn new() -> Self {
        ActivityClock {
            start: Instant::now(),
            start_coarse: coarse_now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let elapsed = coarse_now().saturating_sub(self.start_coarse);
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The coarse monotonic clock, from an arbitrary start.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn coarse_now() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// Elsewhere, the precise one.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn coarse_now() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}
