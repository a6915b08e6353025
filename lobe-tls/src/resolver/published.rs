//! The snapshot a resolver publishes.
//!
//! Writers swap a new snapshot into an `ArcSwap`; a handshake loads it (two atomic
//! operations, lock-free) and reads its maps. There is no per-thread copy: one kept a
//! rotated certificate and its private key alive on threads that no longer handshake,
//! and the load it saved is a few nanoseconds beside a handshake's tens of microseconds.

use arc_swap::ArcSwap;
use arc_swap::Guard;
use std::sync::Arc;

use super::Snapshot;

/// The snapshot readers see now.
#[derive(Default)]
pub(super) struct Published {
    current: ArcSwap<Snapshot>,
}

impl Published {
    /// Replaces the snapshot with a changed copy of it.
    pub(super) fn update(&self, change: impl Fn(&mut Snapshot)) {
        self.current.rcu(|current| {
            let mut next = Snapshot::clone(current);
            change(&mut next);
            next
        });
    }

    /// The snapshot now.
    pub(super) fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Runs `read` on the snapshot now.
    pub(super) fn read<R>(&self, read: impl Fn(&Snapshot) -> R) -> R {
        read(&self.current.load())
    }
}
