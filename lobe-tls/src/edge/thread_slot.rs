//! Which accepting thread code runs on, for caches kept one per thread (idle upstream
//! connections, detached tasks). A leaf: `shard` sets it as each thread starts.

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The accepting thread this code runs on (0 outside of them).
pub(crate) fn current() -> usize {
    SHARD.with(Cell::get)
}

/// How many per-thread slots a per-thread cache keeps: the CPUs, as `--threads`
/// defaults to them.
pub(crate) fn slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 256)
    })
}

/// Marks the running thread as accepting thread `index`.
pub(crate) fn enter(index: usize) {
    SHARD.with(|shard| shard.set(index));
}
