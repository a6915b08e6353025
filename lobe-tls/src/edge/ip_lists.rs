//! IP allow and deny lists: each list compiled once, when the sites are built, into
//! sorted disjoint address ranges (IPv4 and IPv6 apart), so that a lookup is one binary
//! search whatever the list's length (100,000 networks: about 17 comparisons).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::{Error, Result};

/// A network as written in a list: a CIDR, or a bare address (a /32 or a /128).
pub fn parse_cidr(text: &str) -> Result<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| Error::config(format!("{text:?} is not an IP address or a CIDR network")))
}

/// A set of networks, as sorted disjoint ranges.
#[derive(Debug, Clone, Default)]
pub struct IpTable {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
}

/// Sorted, disjoint, non-adjacent `[start, end]` ranges.
#[derive(Debug, Clone)]
struct Ranges<T> {
    starts: Vec<T>,
    ends: Vec<T>,
}

impl<T> Default for Ranges<T> {
    fn default() -> Self {
        Ranges {
            starts: Vec::new(),
            ends: Vec::new(),
        }
    }
}

impl<T: Ord + Copy> Ranges<T> {
    /// Merges `ranges` (any order, overlapping or not); `next` is `x + 1`, `None` at the
    /// top of the address space.
    fn build(mut ranges: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                // Overlapping or adjacent: one range.
                Some(last) if next(last.1).is_none_or(|after| start <= after) => {
                    last.1 = last.1.max(end);
                }
                _ => merged.push((start, end)),
            }
        }
        Ranges {
            starts: merged.iter().map(|r| r.0).collect(),
            ends: merged.iter().map(|r| r.1).collect(),
        }
    }

    fn contains(&self, x: T) -> bool {
        // The last range that starts at or before x.
        let at = self.starts.partition_point(|&start| start <= x);
        at > 0 && self.ends[at - 1] >= x
    }
}

impl IpTable {
    /// The table of `nets`. IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/96+n`) count as
    /// the IPv4 networks they map.
    pub fn new<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            match canonical_net(*net) {
                IpNet::V4(net) => v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
                IpNet::V6(net) => v6.push((u128::from(net.network()), u128::from(net.broadcast()))),
            }
        }
        IpTable {
            v4: Ranges::build(v4, |x| x.checked_add(1)),
            v6: Ranges::build(v6, |x| x.checked_add(1)),
        }
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address as IPv4) is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.contains(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.contains(u128::from(v6)),
        }
    }

    /// Whether no network is in the table.
    pub fn is_empty(&self) -> bool {
        self.v4.starts.is_empty() && self.v6.starts.is_empty()
    }

    /// The number of disjoint ranges the networks merged into.
    pub fn ranges(&self) -> usize {
        self.v4.starts.len() + self.v6.starts.len()
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(mapped) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(mapped);
    }
    net
}

/// One block's lists (a site's, or a route's): deny wins; with an allow list, only the
/// addresses in it are admitted; without one, everyone not denied.
#[derive(Debug, Clone)]
pub(crate) struct IpAccess {
    allow: Option<IpTable>,
    deny: IpTable,
}

impl IpAccess {
    /// The lists of one block, or `None` when it sets neither (it then inherits).
    pub(crate) fn new(allow: &[String], deny: &[String]) -> Result<Option<Self>> {
        if allow.is_empty() && deny.is_empty() {
            return Ok(None);
        }
        let parse = |list: &[String]| {
            list.iter()
                .map(|s| parse_cidr(s))
                .collect::<Result<Vec<_>>>()
        };
        let allow = parse(allow)?;
        let deny = parse(deny)?;
        Ok(Some(IpAccess {
            allow: (!allow.is_empty()).then(|| IpTable::new(&allow)),
            deny: IpTable::new(&deny),
        }))
    }

    /// Whether `client` may pass.
    pub(crate) fn admits(&self, client: IpAddr) -> bool {
        !self.deny.contains(client) && self.allow.as_ref().is_none_or(|a| a.contains(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|s| parse_cidr(s).ok()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0; 4]))
    }

    #[test]
    fn bare_addresses_are_single_hosts_and_junk_is_refused() {
        assert_eq!(parse_cidr("192.0.2.1").ok(), "192.0.2.1/32".parse().ok());
        assert_eq!(
            parse_cidr(" 2001:db8::1 ").ok(),
            "2001:db8::1/128".parse().ok()
        );
        assert!(parse_cidr("192.0.2.0/33").is_err());
        let Err(e) = parse_cidr("office") else {
            panic!("accepted a name");
        };
        assert!(e.to_string().contains("\"office\""), "{e}");
    }

    #[test]
    fn ranges_merge_and_edges_count() {
        let table = IpTable::new(&nets(&[
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.128/25",
            "255.255.255.255",
            "0.0.0.0/32",
            "2001:db8::/64",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ]));
        assert_eq!(table.ranges(), 5);
        for yes in [
            "10.0.0.0",
            "10.0.1.255",
            "255.255.255.255",
            "0.0.0.0",
            "2001:db8::ffff",
            "::ffff:10.0.0.7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert!(table.contains(ip(yes)), "{yes}");
        }
        for no in [
            "10.0.2.0",
            "9.255.255.255",
            "0.0.0.1",
            "2001:db8:0:1::",
            "::",
        ] {
            assert!(!table.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn mapped_networks_are_ipv4() {
        let table = IpTable::new(&nets(&["::ffff:192.0.2.0/120"]));
        assert!(table.contains(ip("192.0.2.9")));
        assert!(!table.contains(ip("192.0.3.9")));
    }

    #[test]
    fn deny_wins_and_no_allow_list_admits_the_rest() {
        let strings = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let access = IpAccess::new(&strings(&["10.0.0.0/8"]), &strings(&["10.6.6.6"]))
            .ok()
            .flatten();
        let Some(access) = access else {
            panic!("no lists");
        };
        assert!(access.admits(ip("10.1.2.3")));
        assert!(!access.admits(ip("10.6.6.6")));
        assert!(!access.admits(ip("192.0.2.1")));
        let deny_only = IpAccess::new(&[], &strings(&["192.0.2.1"])).ok().flatten();
        let Some(deny_only) = deny_only else {
            panic!("no lists");
        };
        assert!(deny_only.admits(ip("192.0.2.2")));
        assert!(!deny_only.admits(ip("192.0.2.1")));
        assert!(matches!(IpAccess::new(&[], &[]), Ok(None)));
        assert!(IpAccess::new(&strings(&["nope"]), &[]).is_err());
    }

    fn any_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
                IpNet::V4(
                    ipnet::Ipv4Net::new(a.into(), len)
                        .unwrap_or_default()
                        .trunc(),
                )
            }),
            // Few distinct high bits, so that networks and probes meet.
            (any::<u8>(), any::<u128>(), 0u8..=128).prop_map(|(top, low, len)| {
                let addr = (u128::from(top % 4) << 120) | (low >> 8);
                IpNet::V6(
                    ipnet::Ipv6Net::new(addr.into(), len)
                        .unwrap_or_default()
                        .trunc(),
                )
            }),
        ]
    }

    fn near(nets: &[IpNet]) -> impl Strategy<Value = IpAddr> + use<> {
        // Probes at the networks' edges and next to them, and anywhere.
        let mut edges: Vec<IpAddr> = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => {
                    let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
                    for x in [lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)] {
                        edges.push(IpAddr::from(std::net::Ipv4Addr::from(x)));
                    }
                }
                IpNet::V6(n) => {
                    let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
                    for x in [lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)] {
                        edges.push(IpAddr::from(std::net::Ipv6Addr::from(x)));
                    }
                }
            }
        }
        edges.push(IpAddr::from([0; 4]));
        prop_oneof![
            proptest::sample::select(edges),
            any::<u32>().prop_map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))),
            (any::<u8>(), any::<u128>()).prop_map(|(top, low)| {
                IpAddr::from(std::net::Ipv6Addr::from(
                    (u128::from(top % 4) << 120) | (low >> 8),
                ))
            }),
        ]
    }

    proptest! {
        #[test]
        fn the_table_agrees_with_a_linear_scan(
            (nets, probes) in proptest::collection::vec(any_net(), 0..40)
                .prop_flat_map(|nets| {
                    let probes = proptest::collection::vec(near(&nets), 1..40);
                    (Just(nets), probes)
                })
        ) {
            let table = IpTable::new(&nets);
            for probe in probes {
                let naive = nets.iter().any(|n| n.contains(&probe));
                prop_assert_eq!(table.contains(probe), naive, "{} in {:?}", probe, nets);
            }
        }
    }
}
