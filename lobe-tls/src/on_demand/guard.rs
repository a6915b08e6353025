//! What stands between a stranger's SNI and an order: allow-list patterns, rate limits
//! (global and per name, through `governor`) and a short-lived, bounded cache of refusals.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::DomainName;

/// A name pattern: `example.com` itself, or `*.example.com` for exactly one label under
/// it (the rule of a wildcard certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern(DomainName);

impl Pattern {
    pub(super) fn parse(input: &str) -> crate::Result<Self> {
        let name = DomainName::parse(input)?;
        if name.ip().is_some() {
            return Err(crate::Error::Config(format!(
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
    per_name: DefaultKeyedRateLimiter<String>,
}

/// How many names the per-name limiter tracks before it forgets those back at full
/// allowance.
const TRACKED_NAMES: usize = 4096;

impl Limits {
    pub(super) fn new(global_per_minute: NonZeroU32, per_name_per_hour: NonZeroU32) -> Self {
        Limits {
            global: RateLimiter::direct(Quota::per_minute(global_per_minute)),
            per_name: RateLimiter::keyed(Quota::per_hour(per_name_per_hour)),
        }
    }

    /// Takes one attempt for `name`, or says which limit refused it.
    pub(super) fn check(&self, name: &str) -> Result<(), &'static str> {
        // The global limit first, so that a flood of distinct names never reaches the
        // per-name map; that map is capped as well.
        self.global.check().map_err(|_| "global")?;
        if self.per_name.len() >= TRACKED_NAMES {
            self.per_name.retain_recent();
            if self.per_name.len() >= TRACKED_NAMES {
                return Err("tracked names");
            }
        }
        self.per_name
            .check_key(&name.to_owned())
            .map_err(|_| "per-name")
    }
}

/// Names refused lately (by the ask endpoint, the allow-list or a failed order), so that
/// a client retrying in a loop costs neither the ask endpoint nor the CA anything.
pub(super) struct Refusals {
    ttl: Duration,
    capacity: usize,
    until: Mutex<HashMap<String, (Instant, String)>>,
}

impl Refusals {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        Refusals {
            ttl,
            capacity: capacity.max(1),
            until: Mutex::default(),
        }
    }

    /// Why `name` was refused, while that refusal holds.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(name) {
            Some((until, why)) if *until > Instant::now() => Some(why.clone()),
            Some(_) => {
                map.remove(name);
                None
            }
            None => None,
        }
    }

    /// Remembers a refusal. When the map is full, expired entries go first, then the
    /// entry closest to expiry, so the map never outgrows its capacity.
    pub(super) fn insert(&self, name: &str, why: String) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity && !map.contains_key(name) {
            map.retain(|_, (until, _)| *until > now);
            if map.len() >= self.capacity
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (until, _))| *until)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(name.to_owned(), (now + self.ttl, why));
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
