//! A budget of events per second shared by every client: the HTTP-01 view's store
//! lookups while it is not in step.
//!
//! A fixed one-second window rather than governor's GCRA: the core build leaves governor
//! out (it comes with the `on-demand` and `edge` features, for the per-client limits), and
//! one global budget of a few lookups a second needs no smoothing. Its only job is that a
//! flood never reaches the store at its own pace: at most `limit` events start in any
//! window, so at most `limit * (T + 1)` in T seconds, as with a GCRA of the same rate and
//! a burst of `limit`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long one window lasts.
const WINDOW: Duration = Duration::from_secs(1);

/// At most `limit` events per one-second window.
#[derive(Debug)]
pub(super) struct PerSecond {
    limit: u32,
    /// When the current window started, and the events taken in it.
    window: Mutex<(Instant, u32)>,
}

impl PerSecond {
    /// A budget of `limit` events per second.
    pub(super) fn new(limit: u32) -> Self {
        PerSecond {
            limit,
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Takes one event from the budget; false when this second's budget is spent.
    pub(super) fn take(&self) -> bool {
        let now = Instant::now();
        // A poisoned lock only means another taker panicked between two plain writes.
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(window.0) >= WINDOW {
            *window = (now, 0);
        }
        if window.1 < self.limit {
            window.1 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limit_per_window_then_refills() {
        let budget = PerSecond::new(3);
        assert_eq!((0..10).filter(|_| budget.take()).count(), 3);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!budget.take(), "still the first window");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!((0..10).filter(|_| budget.take()).count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_takes_nothing() {
        let budget = PerSecond::new(0);
        assert!(!budget.take());
        tokio::time::advance(WINDOW).await;
        assert!(!budget.take());
    }
}
