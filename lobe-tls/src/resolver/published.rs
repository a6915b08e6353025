//! The snapshot a resolver publishes, and the per-thread copy that keeps handshakes cheap.
//!
//! Writers swap a new snapshot into an `ArcSwap` and then bump a generation counter.
//! An `ArcSwap` load costs two atomic read-modify-write operations (its debt slot is
//! taken and paid back), which is as much as the whole hash lookup after it. So each
//! thread keeps the snapshot it last read, with the generation it read it at: while the
//! generation has not moved, a handshake reads one atomic counter, plainly, and uses the
//! kept snapshot. Only the first handshake on a thread after a swap loads the new one.
//!
//! The cost: a thread keeps the last snapshot it read from each resolver (and the
//! certificates in it) until it reads from that resolver again, exits, or reads from a
//! new resolver, which prunes the copies of dropped ones. A reader may see a swap a few
//! nanoseconds late, as if its read had come just before it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use arc_swap::Guard;

use super::Snapshot;

/// How many resolvers one thread remembers a snapshot for. A process has one or a few
/// resolvers; past this, the oldest entry is dropped (and reloaded when next needed).
const REMEMBERED: usize = 8;

thread_local! {
    static RECENT: RefCell<Vec<Recent>> = const { RefCell::new(Vec::new()) };
}

/// One thread's copy of one resolver's snapshot.
struct Recent {
    /// Which resolver. Weak, so that a thread never keeps a dropped resolver's
    /// certificates alive, and so that its address is not reused while it is kept here.
    owner: Weak<Published>,
    generation: u64,
    snapshot: Arc<Snapshot>,
}

/// The snapshot readers see now.
#[derive(Default)]
pub(super) struct Published {
    current: ArcSwap<Snapshot>,
    /// Bumped after every swap.
    generation: AtomicU64,
}

impl Published {
    /// Replaces the snapshot with a changed copy of it.
    pub(super) fn update(&self, change: impl Fn(&mut Snapshot)) {
        self.current.rcu(|current| {
            let mut next = Snapshot::clone(current);
            change(&mut next);
            next
        });
        // Release: a reader that sees the new generation also sees the new snapshot.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The snapshot now, for the paths that are not a handshake.
    pub(super) fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Runs `read` on the snapshot now, through this thread's copy when it is current.
    pub(super) fn read<R>(self: &Arc<Self>, read: impl Fn(&Snapshot) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        let through_copy = RECENT.try_with(|recent| {
            let mut recent = recent.try_borrow_mut().ok()?;
            let entry = self.entry(&mut recent, generation);
            if entry.generation != generation {
                entry.snapshot = self.current.load_full();
                entry.generation = generation;
            }
            Some(read(&entry.snapshot))
        });
        match through_copy {
            Ok(Some(result)) => result,
            // The thread is exiting: read the shared snapshot directly.
            _ => read(&self.current.load()),
        }
    }

    /// This thread's entry for `self`, made if missing.
    fn entry<'a>(self: &Arc<Self>, recent: &'a mut Vec<Recent>, generation: u64) -> &'a mut Recent {
        let me = Arc::as_ptr(self);
        if let Some(index) = recent.iter().position(|r| Weak::as_ptr(&r.owner) == me) {
            return &mut recent[index];
        }
        recent.retain(|r| r.owner.strong_count() > 0);
        if recent.len() >= REMEMBERED {
            recent.remove(0);
        }
        recent.push(Recent {
            owner: Arc::downgrade(self),
            generation,
            snapshot: self.current.load_full(),
        });
        let last = recent.len() - 1;
        &mut recent[last]
    }
}
