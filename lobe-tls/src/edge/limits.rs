//! Abuse limits: connections in total and per client, and requests per second per
//! client. A client is an IPv4 address or an IPv6 /64 by default
//! ([`ClientPrefixes`]). Every table here is bounded, costs O(1) per connection or
//! request, and when full forgets its idlest entry rather than refusing anyone.
//!
//! Memory: the connection counts hold one entry per client with a connection open (see
//! [`crate::conn_limits`]); the rate table holds at most [`MAX_RATE_KEYS`] clients,
//! about 150 resident bytes each (15 MB at the cap), measured by
//! `rate_table::tests::memory_per_entry_is_measured`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;
use governor::clock::Clock;

use crate::client_key::{ClientKey, ClientPrefixes};
use crate::conn_limits::{self, ConnLimits};
use crate::rate_table::{self, BoundedLimiter};
use ipnet::IpNet;

pub(crate) use crate::conn_limits::Refused;

/// Clients the rate limiter tracks at most. A client's state matters only until its
/// allowance is back to full (about a second at `--rate-limit N` per second), so this
/// is room for 100,000 clients active in the same second; past that the idlest is
/// forgotten, which can only hand it a fresh allowance, never refuse it.
pub(crate) const MAX_RATE_KEYS: usize = 100_000;

#[derive(Debug)]
pub(crate) struct Limits {
    conns: ConnLimits,
    rate: Option<BoundedLimiter<ClientKey>>,
}

/// Holds a connection's place in the limits until dropped.
#[derive(Debug)]
pub(crate) struct ConnPermit(conn_limits::ConnPermit);

impl ConnPermit {
    /// Takes the per-client place for `ip` too (once the client's address is known: it
    /// may come from a PROXY header after the connection was admitted).
    pub fn admit_ip(&mut self, limits: &Limits, ip: IpAddr) -> Result<(), Refused> {
        self.0.admit_client(&limits.conns, ip)
    }
}

impl Limits {
    pub fn new(
        max_conns: Option<usize>,
        max_conns_per_ip: Option<usize>,
        rate: Option<u32>,
        prefixes: ClientPrefixes,
        exempt: Vec<IpNet>,
    ) -> Self {
        Limits::with_rate_capacity(
            max_conns,
            max_conns_per_ip,
            rate,
            prefixes,
            exempt,
            MAX_RATE_KEYS,
        )
    }

    fn with_rate_capacity(
        max_conns: Option<usize>,
        max_conns_per_ip: Option<usize>,
        rate: Option<u32>,
        prefixes: ClientPrefixes,
        exempt: Vec<IpNet>,
        rate_keys: usize,
    ) -> Self {
        Limits {
            conns: ConnLimits::new(max_conns, max_conns_per_ip, prefixes, exempt),
            rate: rate
                .and_then(NonZeroU32::new)
                .map(|n| rate_table::limiter(Quota::per_second(n), rate_keys)),
        }
    }

    /// The connection caps (clones share the counts, e.g. with the port-80 listener).
    pub fn conns(&self) -> &ConnLimits {
        &self.conns
    }

    /// Takes a place for a new connection from `ip`, or says which limit is full.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnPermit, Refused> {
        self.conns.admit(ip).map(ConnPermit)
    }

    /// Takes a place in the total only; the per-client one follows with
    /// [`ConnPermit::admit_ip`].
    pub fn admit_total(&self) -> Result<ConnPermit, Refused> {
        self.conns.admit_total().map(ConnPermit)
    }

    /// Whether a request from `ip` is within its client's rate; if not, how long until
    /// it would be. O(1): never scans, never refuses because the table is full.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.rate else {
            return Ok(());
        };
        limiter
            .check_key(&self.conns.prefixes().key(ip))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets clients whose allowance is back to full. Called on a timer by the edge,
    /// never inside a request.
    pub fn prune(&self) {
        if let Some(limiter) = &self.rate {
            limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn limits(max_conns: usize, per_ip: usize, rate: Option<u32>) -> Limits {
        Limits::new(
            Some(max_conns),
            Some(per_ip),
            rate,
            ClientPrefixes::default(),
            Vec::new(),
        )
    }

    fn rate_len(limits: &Limits) -> usize {
        limits.rate.as_ref().map_or(0, |l| l.len())
    }

    #[test]
    fn per_ip_and_total_limits_hold_and_release() {
        let limits = limits(3, 2, None);
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        let first = limits.admit(a);
        let _second = limits.admit(a);
        assert!(matches!(limits.admit(a), Err(Refused::PerClient)));
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
        let limits = Limits::new(
            Some(3),
            Some(1),
            None,
            ClientPrefixes::default(),
            vec![proxy],
        );
        let behind = ip("10.1.2.3");
        let held: Vec<_> = (0..3).filter_map(|_| limits.admit(behind).ok()).collect();
        assert_eq!(held.len(), 3);
        assert!(matches!(limits.admit(behind), Err(Refused::Total)));
    }

    #[test]
    fn the_address_can_be_admitted_after_the_total() {
        let limits = limits(2, 1, None);
        let a = ip("192.0.2.1");
        let mut first = limits.admit_total().ok();
        assert!(
            first
                .as_mut()
                .is_some_and(|p| p.admit_ip(&limits, a).is_ok())
        );
        let mut second = limits.admit_total().ok();
        assert!(matches!(
            second.as_mut().map(|p| p.admit_ip(&limits, a)),
            Some(Err(Refused::PerClient))
        ));
        // The refused one gives its place in the total back when dropped.
        drop(second);
        assert!(limits.admit(ip("192.0.2.2")).is_ok());
        drop(first);
        assert_eq!(limits.conns().open_clients(), 0);
    }

    #[test]
    fn the_rate_limit_answers_with_a_wait() {
        let limits = limits(10, 10, Some(2));
        let a = ip("192.0.2.1");
        assert!(limits.check_rate(a).is_ok());
        assert!(limits.check_rate(a).is_ok());
        let wait = limits.check_rate(a).err();
        assert!(
            wait.is_some_and(|w| w <= Duration::from_secs(1)),
            "{wait:?}"
        );
        assert!(limits.check_rate(ip("192.0.2.9")).is_ok());
    }

    #[test]
    fn addresses_of_one_ipv6_64_share_a_rate_and_a_connection_count() {
        let limits = limits(100, 2, Some(2));
        let (a, b) = (
            ip("2001:db8:5:6::1"),
            ip("2001:db8:5:6:aaaa:bbbb:cccc:dddd"),
        );
        assert!(limits.check_rate(a).is_ok());
        assert!(limits.check_rate(b).is_ok());
        assert!(limits.check_rate(ip("2001:db8:5:6::99")).is_err());
        // Another /64 has an allowance of its own.
        assert!(limits.check_rate(ip("2001:db8:5:7::1")).is_ok());
        // So for the connection count.
        let _one = limits.admit(a);
        let _two = limits.admit(b);
        assert!(matches!(
            limits.admit(ip("2001:db8:5:6::3")),
            Err(Refused::PerClient)
        ));
        assert!(limits.admit(ip("2001:db8:5:7::3")).is_ok());
        // An IPv4 client behind a dual-stack socket is its IPv4 address.
        assert!(limits.check_rate(ip("192.0.2.40")).is_ok());
        assert!(limits.check_rate(ip("::ffff:192.0.2.40")).is_ok());
        assert!(limits.check_rate(ip("192.0.2.40")).is_err());
    }

    #[test]
    fn a_wider_ipv6_prefix_groups_more_addresses() {
        let prefixes = ClientPrefixes::new(32, 48).unwrap_or_default();
        let limits = Limits::new(None, Some(1), Some(1), prefixes, Vec::new());
        assert!(limits.check_rate(ip("2001:db8:1:1::1")).is_ok());
        assert!(limits.check_rate(ip("2001:db8:1:2::1")).is_err());
        assert!(limits.check_rate(ip("2001:db8:2:1::1")).is_ok());
    }

    #[test]
    fn a_full_rate_table_admits_new_clients_and_never_outgrows_its_cap() {
        let limits = Limits::with_rate_capacity(
            None,
            None,
            Some(1),
            ClientPrefixes::default(),
            Vec::new(),
            4096,
        );
        // A spray of distinct /64s, each spending its allowance: all recent, none
        // prunable. Every one is admitted, and the table stays at its cap.
        for i in 0..20_000u32 {
            let sprayed = IpAddr::from(std::net::Ipv6Addr::from(
                (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
            ));
            assert!(
                limits.check_rate(sprayed).is_ok(),
                "sprayed client {i} refused"
            );
            assert!(rate_len(&limits) <= 4096);
        }
        assert_eq!(rate_len(&limits), 4096);
        // A legitimate newcomer is admitted, not told to wait.
        assert!(limits.check_rate(ip("198.51.100.7")).is_ok());
        // And the one sprayer keeps its limit: the whole /64 is one client.
        assert!(limits.check_rate(ip("2001:db8:0:4e1f::1")).is_err());
    }

    /// Nanoseconds per call of `check` over `keys` fresh keys (the median of a few runs).
    fn ns_per_check(limits: &Limits, first: u32, keys: u32) -> u128 {
        let mut runs: Vec<u128> = (0..5u32)
            .map(|run| {
                let start = Instant::now();
                for i in 0..keys {
                    let key = first + run * keys + i;
                    let _ = limits.check_rate(IpAddr::from(key.to_be_bytes()));
                }
                start.elapsed().as_nanos() / u128::from(keys)
            })
            .collect();
        runs.sort_unstable();
        runs[2]
    }

    #[test]
    fn a_request_costs_the_same_with_a_full_table() {
        let limits = limits(10, 10, Some(1));
        let empty = ns_per_check(&limits, 0x0a00_0000, 2000);
        for i in 0..MAX_RATE_KEYS as u32 {
            let _ = limits.check_rate(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
        }
        assert_eq!(rate_len(&limits), MAX_RATE_KEYS);
        let full = ns_per_check(&limits, 0x0c00_0000, 2000);
        // Scanning the table on each request (as a prune inside the request would)
        // costs thousands of times more; cache misses in a full table, a few times.
        assert!(
            full < empty * 10 + 2_000,
            "{full} ns per request with a full table, {empty} ns with an empty one"
        );
    }
}
