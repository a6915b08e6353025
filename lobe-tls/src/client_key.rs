//! Who counts as one client for the per-client limits: an IPv4 address (masked to
//! `v4` bits, 32 by default) or an IPv6 network (masked to `v6` bits, 64 by default).
//!
//! Keying by address alone lets a host with an IPv6 /64, the smallest network most
//! providers hand out, pose as 2^64 clients; keyed by its /64, it is one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};

/// How client addresses are grouped into clients: the prefix lengths of IPv4 and IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPrefixes {
    v4: u8,
    v6: u8,
}

impl Default for ClientPrefixes {
    /// IPv4 /32 (one address), IPv6 /64 (one subnet, as providers assign them).
    fn default() -> Self {
        ClientPrefixes { v4: 32, v6: 64 }
    }
}

impl ClientPrefixes {
    /// The default IPv4 prefix length.
    pub const DEFAULT_V4: u8 = 32;
    /// The default IPv6 prefix length.
    pub const DEFAULT_V6: u8 = 64;

    /// Prefixes of `v4` (1 to 32) and `v6` (1 to 128) bits; out of range is a one-line
    /// configuration error that names the setting.
    pub fn new(v4: u8, v6: u8) -> Result<Self> {
        if !(1..=32).contains(&v4) {
            return Err(Error::config(format!(
                "client prefix v4 /{v4} is out of range: give 1 to 32 bits (32: one client per address)"
            )));
        }
        if !(1..=128).contains(&v6) {
            return Err(Error::config(format!(
                "client prefix v6 /{v6} is out of range: give 1 to 128 bits (64: one client per /64)"
            )));
        }
        Ok(ClientPrefixes { v4, v6 })
    }

    /// The IPv4 prefix length.
    pub fn v4(&self) -> u8 {
        self.v4
    }

    /// The IPv6 prefix length.
    pub fn v6(&self) -> u8 {
        self.v6
    }

    /// The client `ip` belongs to. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a
    /// dual-stack socket reports IPv4 peers) is the IPv4 address it maps.
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                ClientKey {
                    net: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    len: self.v4,
                }
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                ClientKey {
                    net: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    len: self.v6,
                }
            }
        }
    }
}

/// One client for the limits: a network address and its prefix length (18 bytes, no
/// heap). Displayed as a CIDR, e.g. `2001:db8:1:2::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    net: IpAddr,
    len: u8,
}

impl ClientKey {
    /// The network's first address.
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_an_ipv4_address_another() {
        let prefixes = ClientPrefixes::default();
        let a = prefixes.key(ip("2001:db8:1:2::1"));
        let b = prefixes.key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        let other = prefixes.key(ip("2001:db8:1:3::1"));
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_ne!(prefixes.key(ip("192.0.2.1")), prefixes.key(ip("192.0.2.2")));
        assert_eq!(prefixes.key(ip("192.0.2.1")).to_string(), "192.0.2.1/32");
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_client() {
        let prefixes = ClientPrefixes::default();
        assert_eq!(
            prefixes.key(ip("::ffff:192.0.2.7")),
            prefixes.key(ip("192.0.2.7"))
        );
    }

    #[test]
    fn prefixes_mask_as_given_and_refuse_out_of_range_bits() {
        let wide = ClientPrefixes::new(24, 48).unwrap_or_default();
        assert_eq!(wide.key(ip("192.0.2.200")).to_string(), "192.0.2.0/24");
        assert_eq!(
            wide.key(ip("2001:db8:7:9::1")).to_string(),
            "2001:db8:7::/48"
        );
        let full = ClientPrefixes::new(1, 128).unwrap_or_default();
        assert_eq!(full.key(ip("2001:db8::1")).to_string(), "2001:db8::1/128");
        assert_eq!(full.key(ip("192.0.2.1")).to_string(), "128.0.0.0/1");
        for (v4, v6) in [(0, 64), (33, 64), (32, 0), (32, 129)] {
            let e = ClientPrefixes::new(v4, v6).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("out of range") && !e.contains('\n')),
                "{v4} {v6}: {e:?}"
            );
        }
    }

    #[test]
    fn a_key_takes_no_heap_and_18_bytes() {
        assert_eq!(std::mem::size_of::<ClientKey>(), 18);
    }
}
