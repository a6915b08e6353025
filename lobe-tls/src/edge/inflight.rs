//! Requests in flight per client: a request holds its place from the moment it is
//! routed until its response body ends (or, for a WebSocket, until the upgraded
//! connection closes), so long-lived event streams and WebSockets count while they are
//! open. Over the cap a request is answered 429 at once, before any upstream is
//! contacted, and the upstream's standing is untouched.
//!
//! Without it, one address could fill every h2 stream of every connection it may open
//! (`max_conns_per_ip` × `h2_max_streams`, half a million by default) with a slow
//! upload, each holding a task and an upstream connection (about 37 KiB), and the
//! upstream itself.
//!
//! The counts reuse [`ConnLimits`]' per-client table (no total cap): an entry exists
//! only while one of its client's requests is in flight, and every such client has a
//! connection open, so the table never holds more entries than connections are open
//! (`max_conns`), about 46 bytes each. Peers in `trusted_proxies` are not capped (many
//! clients share their address).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::client_key::ClientPrefixes;
use crate::conn_limits::{self, ConnLimits};

/// The `reason` label of a request refused by the cap.
pub(crate) const REASON: &str = "max_requests_per_ip";

/// The per-client cap on requests in flight (`None`: no cap).
#[derive(Debug)]
pub(crate) struct InFlight {
    limits: Option<ConnLimits>,
}

/// A request's place in its client's count, given back when dropped.
#[derive(Debug)]
pub(crate) struct InFlightPermit {
    _held: Option<conn_limits::ConnPermit>,
}

/// The client has `max` requests in flight already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl InFlight {
    /// At most `max` requests in flight per client (grouped by `prefixes`); addresses in
    /// `exempt` are not capped.
    pub fn new(max: Option<usize>, prefixes: ClientPrefixes, exempt: Vec<IpNet>) -> Self {
        InFlight {
            limits: max.map(|max| ConnLimits::new(None, Some(max), prefixes, exempt)),
        }
    }

    /// Takes a place for a request from `ip`, or says its client is at the cap. O(1).
    pub fn admit(&self, ip: IpAddr) -> Result<InFlightPermit, Full> {
        let Some(limits) = &self.limits else {
            return Ok(InFlightPermit { _held: None });
        };
        limits
            .admit(ip)
            .map(|permit| InFlightPermit {
                _held: Some(permit),
            })
            .map_err(|_| Full)
    }

    /// Clients with a request in flight (entries in the table).
    #[cfg(test)]
    pub fn clients(&self) -> usize {
        self.limits.as_ref().map_or(0, ConnLimits::open_clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn in_flight(max: Option<usize>, exempt: &[&str]) -> InFlight {
        let exempt = exempt.iter().filter_map(|n| n.parse().ok()).collect();
        InFlight::new(max, ClientPrefixes::default(), exempt)
    }

    #[test]
    fn a_client_at_its_cap_is_refused_until_a_request_ends() {
        let cap = in_flight(Some(2), &[]);
        let first = cap.admit(ip("192.0.2.1"));
        let _second = cap.admit(ip("192.0.2.1"));
        assert_eq!(cap.admit(ip("192.0.2.1")).err(), Some(Full));
        assert!(cap.admit(ip("192.0.2.2")).is_ok(), "another client");
        drop(first);
        assert!(cap.admit(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn trusted_proxies_are_not_capped_and_take_no_entry() {
        let cap = in_flight(Some(1), &["10.0.0.0/8"]);
        let held: Vec<_> = (0..10)
            .filter_map(|_| cap.admit(ip("10.1.2.3")).ok())
            .collect();
        assert_eq!(held.len(), 10);
        assert_eq!(cap.clients(), 0);
    }

    #[test]
    fn no_cap_admits_all_and_keeps_no_table() {
        let cap = in_flight(None, &[]);
        let held: Vec<_> = (0..5000)
            .filter_map(|_| cap.admit(ip("192.0.2.1")).ok())
            .collect();
        assert_eq!(held.len(), 5000);
        assert_eq!(cap.clients(), 0);
    }

    #[test]
    fn entries_exist_only_while_requests_are_in_flight() {
        let cap = in_flight(Some(4), &[]);
        let held: Vec<_> = (0..1000u32)
            .filter_map(|i| {
                cap.admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
                    .ok()
            })
            .collect();
        assert_eq!(cap.clients(), 1000);
        drop(held);
        assert_eq!(cap.clients(), 0);
    }

    #[test]
    fn an_ipv6_64_is_one_client() {
        let cap = in_flight(Some(1), &[]);
        let _held = cap.admit(ip("2001:db8:0:1::1"));
        assert_eq!(cap.admit(ip("2001:db8:0:1::ffff")).err(), Some(Full));
        assert!(cap.admit(ip("2001:db8:0:2::1")).is_ok());
    }
}
