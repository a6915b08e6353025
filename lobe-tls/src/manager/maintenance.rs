//! The maintenance loop: when to wake, what is due, and one certificate's turn.

use std::time::Duration;

use time::OffsetDateTime;
use tokio::task::{JoinHandle, JoinSet};

use crate::cert::rfc3339;

use super::*;

/// Stops the maintenance loop when dropped.
#[derive(Debug)]
pub struct MaintenanceHandle {
    task: JoinHandle<()>,
}

impl MaintenanceHandle {
    /// Stops the loop now.
    pub fn stop(self) {}
}

impl Drop for MaintenanceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Manager {
    /// Runs the maintenance loop forever: every check interval, asks renewalInfo where it
    /// is time to, renews what is due, retries failures on the backoff schedule, and warns
    /// about certificates close to expiry. Call [`Manager::start`] first.
    pub async fn run(&self) {
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let ticked = tokio::time::Instant::now();
            let next_due = self.tick(&mut tasks);
            // Sleep until the earliest due renewal, retry or ARI poll. Anything that moves
            // a due time (a renewal, a failure, a reload, another process's store write,
            // an ARI answer) wakes the loop to look again, so the check interval is only
            // a safety net.
            let until_due = next_due
                .map(|due| (due - OffsetDateTime::now_utc()).max(time::Duration::ZERO))
                .and_then(|left| Duration::try_from(left).ok())
                .unwrap_or(self.inner.check_interval);
            let pause = self.inner.check_interval.min(until_due).max(MIN_PAUSE);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.inner.wake.notified() => {
                    // Never more than one round per MIN_PAUSE, however busy the wakes.
                    tokio::time::sleep_until(ticked + MIN_PAUSE).await;
                }
            }
        }
    }

    /// Runs [`Manager::run`] on a task; the loop and its renewals stop when the handle drops.
    pub fn spawn(&self) -> MaintenanceHandle {
        let this = self.clone();
        MaintenanceHandle {
            task: tokio::spawn(async move { this.run().await }),
        }
    }

    /// Starts the work that is due now; returns the earliest time something is due later.
    fn tick(&self, tasks: &mut JoinSet<()>) -> Option<OffsetDateTime> {
        let now = OffsetDateTime::now_utc();
        let policy = &self.inner.policy;
        let mut work = Vec::new();
        let mut warnings = Vec::new();
        let mut next_due: Option<OffsetDateTime> = None;
        let mut note_later = |at: OffsetDateTime| {
            if at > now {
                next_due = Some(next_due.map_or(at, |next| next.min(at)));
            }
        };
        {
            let mut slots = self.inner.slots();
            for (name, slot) in slots.iter_mut() {
                let Some(current) = &slot.current else {
                    // Not issued yet: order it, or wait for the retry after a failure.
                    if slot.managed.is_some() {
                        match slot.state.next_attempt {
                            Some(retry) if retry > now => note_later(retry),
                            _ => work.push(name.clone()),
                        }
                    }
                    continue;
                };
                if policy.warn_expiring_once(&current.info, &mut slot.warned_serial, now) {
                    warnings.push(Event::ExpiringSoon {
                        name: name.clone(),
                        serial: current.info.serial.clone(),
                        not_after: current.info.not_after,
                    });
                }
                if slot.managed.is_none() {
                    continue;
                }
                let due_at = if slot.reissue {
                    slot.reissue_at()
                } else {
                    policy.due_at(&current.info, &slot.state)
                };
                note_later(due_at);
                if current.info.ari_id.is_some()
                    && let Some(poll) = slot.state.ari_next_poll
                {
                    note_later(poll);
                }
                if due_at <= now || ari_poll_due(&current.info, &slot.state, now) {
                    work.push(name.clone());
                }
            }
        }
        for event in warnings {
            if let Event::ExpiringSoon {
                name, not_after, ..
            } = &event
            {
                tracing::warn!(cert = %name, not_after = %rfc3339(*not_after), "certificate expires soon and has not been renewed");
            }
            self.emit(event);
        }
        for name in work {
            let this = self.clone();
            tasks.spawn(async move { this.maintain(&name).await });
        }
        next_due
    }

    /// One certificate's turn in the maintenance loop.
    async fn maintain(&self, name: &str) {
        // Skip when an order for it is already running.
        let lock = self.name_lock(name);
        let Ok(_local) = lock.try_lock_owned() else {
            return;
        };
        let Some(due) = self.due_at(name).await else {
            return;
        };
        if due <= OffsetDateTime::now_utc() {
            // Errors are reported (log, event, state) inside.
            let _ = self.renew_reported_locked(name).await;
        }
    }
}
