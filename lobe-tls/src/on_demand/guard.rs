//! What stands between a stranger's SNI and an order: allow-list patterns, rate limits
//! (global and per name, through `governor`) and a short-lived, bounded cache of refusals.
//! Both tables have a fixed cap and forget their oldest entry when full, so a spray of
//! random names can neither grow them nor lock a name out.

use std::hash::RandomState;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lru::LruCache;

use crate::domain::DomainName;
use crate::rate_table::{self, BoundedLimiter};

/// A name pattern: `example.com` itself, or `*.example.com` for exactly one label under
/// it (the rule of a wildcard certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern(DomainName);

impl Pattern {
    pub(super) fn parse(input: &str) -> crate::Result<Self> {
        let name = DomainName::parse(input)?;
        if name.ip().is_some() {
            return Err(crate::Error::config(format!(
                "on-demand pattern {input:?} is an IP address: patterns name DNS names (example.com or *.example.com)"
            )));
        }
        Ok(Pattern(name))
    }

    pub(super) fn matches(&self, name: &str) -> bool {
        let pattern = self.0.as_str();
        match pattern.strip_prefix("*.") {
            Some(base) => name
                .split_once('.')
                .is_some_and(|(label, parent)| !label.is_empty() && parent == base),
            None => pattern == name,
        }
    }
}

/// Per-name and global limits on new names (asks and orders).
pub(super) struct Limits {
    global: DefaultDirectRateLimiter,
    per_name: BoundedLimiter<String>,
}

/// Names the per-name limiter tracks at least; past its capacity it forgets the name
/// used least recently. It holds an hour of new names at the global rate, so that within
/// the hour of a name's per-name allowance nothing can push it out (every new name
/// passes the global limit first).
const TRACKED_NAMES: usize = 4096;
/// ... and at most (some 300 bytes per name at most).
const TRACKED_NAMES_MAX: usize = 65_536;

impl Limits {
    pub(super) fn new(global_per_minute: NonZeroU32, per_name_per_hour: NonZeroU32) -> Self {
        let hour_of_names = usize::try_from(global_per_minute.get())
            .unwrap_or(usize::MAX)
            .saturating_mul(60);
        Limits {
            global: RateLimiter::direct(Quota::per_minute(global_per_minute)),
            per_name: rate_table::limiter(
                Quota::per_hour(per_name_per_hour),
                hour_of_names.clamp(TRACKED_NAMES, TRACKED_NAMES_MAX),
            ),
        }
    }

    /// Takes one attempt for `name`, or says which limit refused it. O(1); a full
    /// per-name table forgets its idlest name and never refuses for being full.
    pub(super) fn check(&self, name: &str) -> Result<(), &'static str> {
        // The global limit first, so that a flood of distinct names never reaches the
        // per-name table.
        self.global.check().map_err(|_| "global")?;
        self.per_name
            .check_key(&name.to_owned())
            .map_err(|_| "per-name")
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.per_name.len()
    }
}

/// Names refused lately (by the ask endpoint, the allow-list or a failed order), so that
/// a client retrying in a loop costs neither the ask endpoint nor the CA anything.
pub(super) struct Refusals {
    ttl: Duration,
    capacity: usize,
    /// Least recently refused first: with one TTL for all, the closest to expiry.
    until: Mutex<LruCache<String, (Instant, String), RandomState>>,
}

impl Refusals {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Refusals {
            ttl,
            capacity: capacity.max(1),
            // Grows as refusals come, up to `capacity`.
            until: Mutex::new(LruCache::unbounded_with_hasher(RandomState::new())),
        }
    }

    /// Why `name` was refused, while that refusal holds.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        match map.peek(name) {
            Some((until, why)) if *until > Instant::now() => Some(why.clone()),
            Some(_) => {
                map.pop(name);
                None
            }
            None => None,
        }
    }

    /// Remembers a refusal. When the map is full, the oldest refusal (the closest to
    /// expiry) makes room: O(1), and the map never outgrows its capacity.
    pub(super) fn insert(&self, name: &str, why: String) {
        if self.ttl.is_zero() {
            return;
        }
        let until = Instant::now() + self.ttl;
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.put(name.to_owned(), (until, why));
        while map.len() > self.capacity {
            map.pop_lru();
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.until.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
    }

    #[test]
    fn patterns_match_the_name_or_one_label_under_it() {
        let wild = Pattern::parse("*.example.com").unwrap_or_else(|e| panic!("{e}"));
        assert!(wild.matches("a.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("a.b.example.com"));
        assert!(!wild.matches("aexample.com"));
        assert!(!wild.matches("a.example.com.evil.net"));
        let exact = Pattern::parse("Shop.Example.com").unwrap_or_else(|e| panic!("{e}"));
        assert!(exact.matches("shop.example.com"));
        assert!(!exact.matches("a.shop.example.com"));
        assert!(Pattern::parse("192.0.2.1").is_err());
    }

    #[test]
    fn limits_refuse_past_the_per_name_and_global_allowance() {
        let limits = Limits::new(nz(4), nz(2));
        assert_eq!(limits.check("a.example.com"), Ok(()));
        assert_eq!(limits.check("a.example.com"), Ok(()));
        assert_eq!(limits.check("a.example.com"), Err("per-name"));
        assert_eq!(limits.check("b.example.com"), Ok(()));
        assert_eq!(limits.check("c.example.com"), Err("global"));
    }

    #[test]
    fn a_spray_of_names_neither_grows_the_per_name_table_nor_is_refused_for_its_size() {
        // A global allowance wide enough to reach the per-name table with every name.
        let limits = Limits::new(nz(1_000_000), nz(1));
        for i in 0..100_000 {
            assert_eq!(limits.check(&format!("n{i}.example.com")), Ok(()), "{i}");
        }
        assert!(
            limits.tracked() <= TRACKED_NAMES_MAX,
            "{}",
            limits.tracked()
        );
        assert_eq!(limits.check("new.example.com"), Ok(()));
        // The last names are still remembered.
        assert_eq!(limits.check("n99999.example.com"), Err("per-name"));
    }

    #[test]
    fn the_per_name_table_holds_an_hour_of_names_at_the_global_rate() {
        let limits = Limits::new(nz(20), nz(3));
        let start = Instant::now();
        // 1,200 names (an hour at 20 a minute): all remembered, none forgotten.
        for i in 0..1200 {
            let _ = limits.per_name.check_key(&format!("n{i}.example.com"));
        }
        assert_eq!(limits.tracked(), 1200);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn refusals_expire_and_stay_within_capacity() {
        let refusals = Refusals::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            refusals.insert(&format!("n{i}.example.com"), "no".into());
        }
        assert_eq!(refusals.len(), 3);
        assert_eq!(refusals.get("n9.example.com").as_deref(), Some("no"));
        assert_eq!(refusals.get("n0.example.com"), None);
        let brief = Refusals::new(Duration::from_millis(1), 3);
        brief.insert("x.example.com", "no".into());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(brief.get("x.example.com"), None);
    }
}
