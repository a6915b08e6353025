//! Abuse limits: connections in total and per client address, and requests per second
//! per client address. Every map here is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::IpNet;
use super::forwarded::canonical;

/// Client addresses the rate limiter tracks at most; past this, old entries are pruned
/// and, if that is not enough, new addresses are limited until it is.
const MAX_RATE_KEYS: usize = 100_000;

/// Open connections per client address.
type OpenMap = Arc<Mutex<HashMap<IpAddr, usize>>>;

#[derive(Debug)]
pub(crate) struct Limits {
    total: Option<Arc<Semaphore>>,
    per_ip: Option<usize>,
    /// Addresses the per-address cap does not apply to: trusted proxies, behind which
    /// many clients share one address (they still count toward the total).
    exempt: Vec<IpNet>,
    open: OpenMap,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    Total,
    PerIp,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Total => "max_conns",
            Refused::PerIp => "max_conns_per_ip",
        }
    }
}

/// Holds a connection's place in the limits until dropped.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    _total: Option<OwnedSemaphorePermit>,
    ip: Option<(IpAddr, OpenMap)>,
}

impl ConnPermit {
    /// Takes the per-address place for `ip` too (once the client's address is known: it
    /// may come from a PROXY header after the connection was admitted).
    pub fn admit_ip(&mut self, limits: &Limits, ip: IpAddr) -> Result<(), Refused> {
        let ip = canonical(ip);
        let Some(max) = limits.per_ip else {
            return Ok(());
        };
        if self.ip.is_some() || limits.exempt.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        let mut open = limits.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&ip);
            }
            return Err(Refused::PerIp);
        }
        *count += 1;
        self.ip = Some((ip, limits.open.clone()));
        Ok(())
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some((ip, open)) = &self.ip {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = open.get_mut(ip) {
                *count -= 1;
                if *count == 0 {
                    open.remove(ip);
                }
            }
        }
    }
}

impl Limits {
    pub fn new(
        max_conns: Option<usize>,
        max_conns_per_ip: Option<usize>,
        rate: Option<u32>,
        exempt: Vec<IpNet>,
    ) -> Self {
        Limits {
            total: max_conns.map(|n| Arc::new(Semaphore::new(n))),
            per_ip: max_conns_per_ip,
            exempt,
            open: Arc::default(),
            rate: rate
                .and_then(NonZeroU32::new)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
        }
    }

    /// Takes a place for a new connection from `ip`, or says which limit is full.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let mut permit = self.admit_total()?;
        permit.admit_ip(self, ip)?;
        Ok(permit)
    }

    /// Takes a place in the total only; the per-address one follows with
    /// [`ConnPermit::admit_ip`].
    pub fn admit_total(&self) -> Result<ConnPermit, Refused> {
        let total = match &self.total {
            Some(semaphore) => Some(
                semaphore
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refused::Total)?,
            ),
            None => None,
        };
        Ok(ConnPermit {
            _total: total,
            ip: None,
        })
    }

    /// Whether a request from `ip` is within the rate; if not, how long until it would be.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.rate else {
            return Ok(());
        };
        if limiter.len() >= MAX_RATE_KEYS {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            if limiter.len() >= MAX_RATE_KEYS {
                return Err(Duration::from_secs(1));
            }
        }
        limiter
            .check_key(&canonical(ip))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets clients whose rate state is back to full (called now and then).
    pub fn prune(&self) {
        if let Some(limiter) = &self.rate {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits_hold_and_release() {
        let limits = Limits::new(Some(3), Some(2), None, Vec::new());
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let first = limits.admit(a);
        let _second = limits.admit(a);
        assert!(matches!(limits.admit(a), Err(Refused::PerIp)));
        let _third = limits.admit(b);
        assert!(matches!(limits.admit(b), Err(Refused::Total)));
        drop(first);
        assert!(limits.admit(b).is_ok());
    }

    #[test]
    fn trusted_proxies_are_not_capped_per_address_but_count_in_the_total() {
        let proxy: IpNet = "10.0.0.0/8"
            .parse()
            .unwrap_or(IpNet::V4(Default::default()));
        let limits = Limits::new(Some(3), Some(1), None, vec![proxy]);
        let behind = IpAddr::from([10, 1, 2, 3]);
        let held: Vec<_> = (0..3).filter_map(|_| limits.admit(behind).ok()).collect();
        assert_eq!(held.len(), 3);
        assert!(matches!(limits.admit(behind), Err(Refused::Total)));
    }

    #[test]
    fn the_address_can_be_admitted_after_the_total() {
        let limits = Limits::new(Some(2), Some(1), None, Vec::new());
        let a = IpAddr::from([192, 0, 2, 1]);
        let mut first = limits.admit_total().ok();
        assert!(
            first
                .as_mut()
                .is_some_and(|p| p.admit_ip(&limits, a).is_ok())
        );
        let mut second = limits.admit_total().ok();
        assert!(matches!(
            second.as_mut().map(|p| p.admit_ip(&limits, a)),
            Some(Err(Refused::PerIp))
        ));
        // The refused one gives its place in the total back when dropped.
        drop(second);
        assert!(limits.admit(IpAddr::from([192, 0, 2, 2])).is_ok());
        drop(first);
        assert!(limits.open.lock().map(|m| m.is_empty()).unwrap_or(false));
    }

    #[test]
    fn the_rate_limit_answers_with_a_wait() {
        let limits = Limits::new(None, None, Some(2), Vec::new());
        let ip = IpAddr::from([192, 0, 2, 1]);
        assert!(limits.check_rate(ip).is_ok());
        assert!(limits.check_rate(ip).is_ok());
        let wait = limits.check_rate(ip).err();
        assert!(
            wait.is_some_and(|w| w <= Duration::from_secs(1)),
            "{wait:?}"
        );
        assert!(limits.check_rate(IpAddr::from([192, 0, 2, 9])).is_ok());
    }
}
