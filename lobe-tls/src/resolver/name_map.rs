//! The name-to-certificate map inside a resolver snapshot.
//!
//! Every swap copies the snapshot, so the copy must be cheap however many names are
//! served. The map is split into shards behind `Arc`s: a copy bumps one reference count
//! per shard, a change then copies the one shard it touches, and every other shard stays
//! shared with the previous snapshot.
//! A lookup still hashes the name once: the hash picks the shard and then the slot.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use rustls::sign::CertifiedKey;

/// 64 shards: replacing one certificate among 1,000 names copies about 16 entries, and
/// the shard list itself stays one cache-friendly array of pointers.
const SHARDS: usize = 64;

type Shard = HashTable<(Arc<str>, Arc<CertifiedKey>)>;

/// Names (already normalised) to the certificate served for them.
#[derive(Clone)]
pub(super) struct NameMap {
    /// foldhash, seeded at random per map: a few nanoseconds per name where std's SipHash
    /// takes tens, and a seed a client cannot predict.
    hasher: foldhash::fast::RandomState,
    shards: [Arc<Shard>; SHARDS],
}

impl Default for NameMap {
    fn default() -> Self {
        NameMap {
            hasher: foldhash::fast::RandomState::default(),
            shards: std::array::from_fn(|_| Arc::new(Shard::new())),
        }
    }
}

impl NameMap {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The shard for a hash. hashbrown picks slots from the low bits and tags from the
    /// top seven, so the shard comes from bits in between, independent of both.
    fn shard_index(hash: u64) -> usize {
        (hash >> 32) as usize % SHARDS
    }

    /// The certificate for `name`.
    pub(super) fn get(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        let hash = self.hash(name);
        self.shards[Self::shard_index(hash)]
            .find(hash, |(key, _)| **key == *name)
            .map(|(_, cert)| cert)
    }

    /// Serves `cert` for `name`, replacing what it had.
    pub(super) fn insert(&mut self, name: &str, cert: Arc<CertifiedKey>) {
        let hash = self.hash(name);
        let hasher = self.hasher.clone();
        let shard = self.shard_mut(hash);
        match shard.entry(
            hash,
            |(key, _)| **key == *name,
            |(key, _)| hasher.hash_one(&**key),
        ) {
            Entry::Occupied(mut slot) => slot.get_mut().1 = cert,
            Entry::Vacant(slot) => {
                slot.insert((name.into(), cert));
            }
        }
    }

    /// Stops serving `name`.
    pub(super) fn remove(&mut self, name: &str) {
        let hash = self.hash(name);
        let index = Self::shard_index(hash);
        // Copy the shard only when it holds the name.
        if self.shards[index]
            .find(hash, |(key, _)| **key == *name)
            .is_none()
        {
            return;
        }
        if let Ok(slot) = self
            .shard_mut(hash)
            .find_entry(hash, |(key, _)| **key == *name)
        {
            slot.remove();
        }
    }

    /// The number of names.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.len()).sum()
    }

    /// The shard for `hash`, copied first if an older snapshot still shares it.
    fn shard_mut(&mut self, hash: u64) -> &mut Shard {
        Arc::make_mut(&mut self.shards[Self::shard_index(hash)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::tests::key_for as cert;

    #[test]
    fn finds_replaces_and_removes_across_every_shard() {
        let (a, b) = (cert("a.example"), cert("b.example"));
        let names: Vec<String> = (0..1_000).map(|i| format!("host-{i}.example")).collect();
        let mut map = NameMap::default();
        for name in &names {
            map.insert(name, a.clone());
        }
        assert_eq!(map.len(), 1_000);
        assert!(map.shards.iter().all(|shard| !shard.is_empty()));
        for name in names.iter().step_by(2) {
            map.insert(name, b.clone());
        }
        assert_eq!(map.len(), 1_000);
        for (i, name) in names.iter().enumerate() {
            let want = if i % 2 == 0 { &b } else { &a };
            assert!(Arc::ptr_eq(map.get(name).unwrap(), want), "{name}");
        }
        for name in names.iter().skip(1).step_by(2) {
            map.remove(name);
        }
        map.remove("never-there.example");
        assert_eq!(map.len(), 500);
        assert!(map.get("host-1.example").is_none());
        assert!(map.get("host-0.example").is_some());
    }

    #[test]
    fn a_copy_changed_later_leaves_the_original_alone() {
        let (old, new) = (cert("a.example"), cert("a.example"));
        let mut served = NameMap::default();
        for i in 0..100 {
            served.insert(&format!("host-{i}.example"), old.clone());
        }
        let mut next = served.clone();
        next.insert("host-7.example", new.clone());
        next.remove("host-8.example");
        next.insert("added.example", new.clone());

        assert!(Arc::ptr_eq(served.get("host-7.example").unwrap(), &old));
        assert!(served.get("host-8.example").is_some());
        assert!(served.get("added.example").is_none());
        assert_eq!(served.len(), 100);
        assert!(Arc::ptr_eq(next.get("host-7.example").unwrap(), &new));
        assert!(next.get("host-8.example").is_none());
        assert_eq!(next.len(), 100);
        // Only the shards that changed were copied.
        let shared = served
            .shards
            .iter()
            .zip(next.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= SHARDS - 3, "{shared} of {SHARDS} shards shared");
    }
}
