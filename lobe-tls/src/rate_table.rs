//! A bounded state store for governor's keyed rate limiters: sharded LRU maps with a
//! fixed number of entries. A full table forgets its least recently used key to make
//! room, so a new client is never refused because the table is full; forgetting a key
//! only hands it a fresh allowance. Every request costs O(1) (one shard lock, one hash
//! lookup); expired entries are dropped by [`governor::RateLimiter::retain_recent`],
//! which the owner calls on a timer, never inside a request.
//!
//! Memory: the maps are allocated up front for their capacity, and each entry is one
//! allocation of the key, its GCRA state (8 bytes) and two list links. With a
//! [`crate::client_key::ClientKey`] key that is 48 bytes, plus about 22 bytes of map
//! per entry; measured as resident memory (the test `memory_per_entry_is_measured`),
//! about 150 bytes per entry with the allocator's overheads: 15 MB for 100,000.

use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use governor::RateLimiter;
use governor::clock::DefaultClock;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use lru::LruCache;

/// Shards, so that threads rarely wait on one another's lock.
const SHARDS: usize = 16;

/// A keyed rate limiter over a [`BoundedStore`].
pub(crate) type BoundedLimiter<K> = RateLimiter<K, BoundedStore<K>, DefaultClock>;

/// A keyed limiter of `quota` that tracks at most `capacity` keys.
pub(crate) fn limiter<K: Hash + Eq + Clone>(
    quota: governor::Quota,
    capacity: usize,
) -> BoundedLimiter<K> {
    RateLimiter::new(quota, BoundedStore::new(capacity), DefaultClock::default())
}

/// Rate states of at most `capacity` keys (see the module's documentation).
pub(crate) struct BoundedStore<K> {
    // SipHash with a per-process key: clients choose the keys, so the hashing must not
    // let them pick colliding ones.
    hasher: RandomState,
    shards: Box<[Mutex<LruCache<K, u64, RandomState>>]>,
}

impl<K: Hash + Eq> BoundedStore<K> {
    /// A store of at most `capacity` keys (rounded down to a multiple of the shards,
    /// at least one per shard).
    pub(crate) fn new(capacity: usize) -> Self {
        let shards = if capacity >= SHARDS * 64 { SHARDS } else { 1 };
        let per_shard = NonZeroUsize::new(capacity / shards).unwrap_or(NonZeroUsize::MIN);
        BoundedStore {
            hasher: RandomState::new(),
            shards: (0..shards)
                .map(|_| Mutex::new(LruCache::with_hasher(per_shard, RandomState::new())))
                .collect(),
        }
    }

    /// The most keys it holds.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.shards.len() * self.shards.first().map_or(0, |s| lock(s).cap().get())
    }

    fn shard(&self, key: &K) -> &Mutex<LruCache<K, u64, RandomState>> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        &self.shards[index]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K> std::fmt::Debug for BoundedStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedStore")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = lock(self.shard(key));
        // `get` marks the key as just used, also when the request is refused: an
        // abusive client stays in the table rather than being evicted into a fresh
        // allowance.
        let known = shard.get(key).copied();
        let (outcome, next) = f(known.map(Nanos::from))?;
        match shard.get_mut(key) {
            Some(state) => *state = next.into(),
            None => {
                // When the shard is full, this forgets its least recently used key.
                shard.push(key.clone(), next.into());
            }
        }
        Ok(outcome)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        // One shard at a time: requests to the other shards go on meanwhile.
        for shard in &self.shards {
            lock(shard).retain(|_, state| *state > drop_below);
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| lock(s).is_empty())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::num::NonZeroU32;

    use governor::Quota;

    use super::*;
    use crate::client_key::{ClientKey, ClientPrefixes};

    fn key(i: u32) -> ClientKey {
        ClientPrefixes::default().key(std::net::IpAddr::from(i.to_be_bytes()))
    }

    fn per_second(n: u32) -> Quota {
        Quota::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
    }

    #[test]
    fn a_full_table_admits_a_new_key_and_stays_within_its_capacity() {
        let limiter = limiter::<ClientKey>(per_second(1), 2048);
        for i in 0..10_000 {
            assert!(limiter.check_key(&key(i)).is_ok(), "key {i} refused");
            assert!(limiter.len() <= 2048);
        }
        assert_eq!(limiter.len(), 2048);
    }

    #[test]
    fn the_capacity_is_what_was_asked_rounded_to_the_shards() {
        assert_eq!(BoundedStore::<u32>::new(100_000).capacity(), 100_000);
        assert_eq!(BoundedStore::<u32>::new(4).capacity(), 4);
        assert_eq!(BoundedStore::<u32>::new(0).capacity(), 1);
        assert!(BoundedStore::<u32>::new(5000).capacity() <= 5000);
    }

    #[test]
    fn the_least_recently_used_key_is_the_one_forgotten() {
        let limiter = limiter::<ClientKey>(per_second(1), 4);
        for i in 0..4 {
            assert!(limiter.check_key(&key(i)).is_ok());
        }
        // Key 0, refused but active, is kept; key 1, idle, goes.
        assert!(limiter.check_key(&key(0)).is_err());
        assert!(limiter.check_key(&key(9)).is_ok());
        assert!(
            limiter.check_key(&key(0)).is_err(),
            "an active key was evicted"
        );
        assert!(limiter.check_key(&key(1)).is_ok(), "an idle key was kept");
    }

    #[test]
    fn expired_states_are_dropped_by_retain_recent() {
        let limiter = limiter::<ClientKey>(per_second(1000), 4096);
        for i in 0..1000 {
            let _ = limiter.check_key(&key(i));
        }
        assert_eq!(limiter.len(), 1000);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        limiter.retain_recent();
        assert_eq!(limiter.len(), 0);
    }

    /// Resident bytes of this process.
    pub(crate) fn resident() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// Runs test `name` alone in a child process with `env` set, so that its resident
    /// memory is its own, and returns what it printed.
    pub(crate) fn alone(name: &str, env: &str) -> String {
        let exe = std::env::current_exe().unwrap_or_default();
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(env, "1")
            .output();
        let out = out.unwrap_or_else(|e| panic!("cannot run {name} alone: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    }

    /// The figure after `label` in `text`.
    pub(crate) fn figure(text: &str, label: &str) -> usize {
        text.split(label)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label} in {text}"))
    }

    #[test]
    fn memory_per_entry_is_measured() {
        const CAP: usize = 100_000;
        const ALONE: &str = "LOBE_TLS_TEST_RATE_TABLE_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let text = alone("rate_table::tests::memory_per_entry_is_measured", ALONE);
            let per_entry = figure(&text, "bytes per entry:");
            // Entries: 48 bytes and the allocator's header; maps, allocated up front:
            // about 22 bytes per entry; with the allocator's own overheads about 150
            // resident bytes per entry (15 MB at 100,000), as the README says.
            assert!((50..=200).contains(&per_entry), "{text}");
            return;
        }
        let before = resident();
        let limiter = limiter::<ClientKey>(per_second(1), CAP);
        // Twice the capacity: the table churns, and stays at its cap.
        for i in 0..(CAP as u32 * 2) {
            let _ = limiter.check_key(&key(i));
        }
        let full = resident().saturating_sub(before);
        assert_eq!(limiter.len(), CAP);
        println!(
            "rate table of {CAP} client keys: {full} bytes resident; bytes per entry: {}",
            full / CAP
        );
    }
}
