//! Connection caps shared by the listeners: connections open at once in total, and per
//! client (an IPv4 address or an IPv6 /64 by default, see [`ClientPrefixes`]).
//!
//! The per-client table is bounded by construction: an entry exists only while one of
//! that client's connections holds a [`ConnPermit`], so it never holds more entries than
//! connections are open, and never more than the total cap. An entry is a [`ClientKey`]
//! (18 bytes) and a count (4 bytes) in a hash table; measured as resident memory with
//! 200,000 clients (the test `the_open_table_costs_what_the_readme_says`), about 46
//! bytes per open client, so at most 46 bytes x the total cap. After a flood the table
//! gives its memory back as the connections close.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client_key::{ClientKey, ClientPrefixes};

/// Open connections per client.
type OpenMap = Mutex<HashMap<ClientKey, u32>>;

/// Connection caps: in total and per client. Cheap to clone; clones share their counts,
/// so listeners given clones of one `ConnLimits` share its caps.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    total: Option<Arc<Semaphore>>,
    per_client: Option<u32>,
    prefixes: ClientPrefixes,
    /// Networks the per-client cap does not apply to: trusted proxies, behind which many
    /// clients share one address (they still count toward the total).
    exempt: Vec<IpNet>,
    open: Arc<OpenMap>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The total cap is reached.
    Total,
    /// The client's cap is reached.
    PerClient,
}

impl Refused {
    /// The `reason` label of the rejected-connections metric.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Total => "max_conns",
            Refused::PerClient => "max_conns_per_ip",
        }
    }
}

/// Holds a connection's places in the caps until dropped.
#[derive(Debug)]
pub struct ConnPermit {
    _total: Option<OwnedSemaphorePermit>,
    client: Option<(ClientKey, Arc<OpenMap>)>,
}

impl ConnLimits {
    /// Caps of `max_conns` in total and `max_conns_per_client` per client (`None`: no
    /// cap), clients grouped by `prefixes`; addresses in `exempt` (trusted proxies) are
    /// not capped per client. From the CLI's values: `ConnLimits::new(config.max_conns,
    /// config.max_conns_per_ip, config.client_prefixes, config.trusted_proxies.clone())`.
    pub fn new(
        max_conns: Option<usize>,
        max_conns_per_client: Option<usize>,
        prefixes: ClientPrefixes,
        exempt: Vec<IpNet>,
    ) -> Self {
        ConnLimits {
            inner: Arc::new(Inner {
                total: max_conns.map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)))),
                per_client: max_conns_per_client.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                prefixes,
                exempt,
                open: Arc::default(),
            }),
        }
    }

    /// How clients are grouped.
    pub fn prefixes(&self) -> ClientPrefixes {
        self.inner.prefixes
    }

    /// Takes places for a new connection from `ip` (total and per client), or says which
    /// cap is full. O(1).
    pub fn admit(&self, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let mut permit = self.admit_total()?;
        permit.admit_client(self, ip)?;
        Ok(permit)
    }

    /// Takes a place in the total only; the per-client one follows with
    /// [`ConnPermit::admit_client`] once the client is known (e.g. from a PROXY header).
    pub fn admit_total(&self) -> Result<ConnPermit, Refused> {
        let total = match &self.inner.total {
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
            client: None,
        })
    }

    /// Clients with a connection open (and not exempt), i.e. entries in the table.
    pub fn open_clients(&self) -> usize {
        self.inner
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl ConnPermit {
    /// Takes the per-client place of `ip` too; a no-op if this permit holds one already,
    /// if there is no per-client cap, or if `ip` is exempt.
    pub fn admit_client(&mut self, limits: &ConnLimits, ip: IpAddr) -> Result<(), Refused> {
        let inner = &limits.inner;
        let Some(max) = inner.per_client else {
            return Ok(());
        };
        let ip = ip.to_canonical();
        if self.client.is_some() || inner.exempt.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        let key = inner.prefixes.key(ip);
        let mut open = inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= max {
            if *count == 0 {
                open.remove(&key);
            }
            return Err(Refused::PerClient);
        }
        *count += 1;
        self.client = Some((key, inner.open.clone()));
        Ok(())
    }

    /// The client whose place this permit holds, if it holds one.
    pub fn client(&self) -> Option<ClientKey> {
        self.client.as_ref().map(|(key, _)| *key)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let Some((key, open)) = &self.client else {
            return;
        };
        let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(key);
                // After a flood the table gives its memory back (amortised: only when
                // it is at most a quarter full).
                if open.capacity() > 1024 && open.len() < open.capacity() / 4 {
                    let keep = open.len() * 2;
                    open.shrink_to(keep);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    fn limits(total: usize, per_client: usize, exempt: &[&str]) -> ConnLimits {
        let exempt = exempt.iter().filter_map(|n| n.parse().ok()).collect();
        ConnLimits::new(
            Some(total),
            Some(per_client),
            ClientPrefixes::default(),
            exempt,
        )
    }

    #[test]
    fn per_client_and_total_caps_hold_and_release() {
        let limits = limits(3, 2, &[]);
        let first = limits.admit(ip("192.0.2.1"));
        let _second = limits.admit(ip("192.0.2.1"));
        assert_eq!(
            limits.admit(ip("192.0.2.1")).err(),
            Some(Refused::PerClient)
        );
        let _third = limits.admit(ip("192.0.2.2"));
        assert_eq!(limits.admit(ip("192.0.2.2")).err(), Some(Refused::Total));
        drop(first);
        assert!(limits.admit(ip("192.0.2.2")).is_ok());
    }

    #[test]
    fn addresses_of_one_ipv6_64_share_one_count() {
        let limits = limits(100, 2, &[]);
        let _a = limits.admit(ip("2001:db8:0:1::1"));
        let _b = limits.admit(ip("2001:db8:0:1::2"));
        assert_eq!(
            limits.admit(ip("2001:db8:0:1:dead:beef::9")).err(),
            Some(Refused::PerClient)
        );
        assert!(limits.admit(ip("2001:db8:0:2::1")).is_ok());
        assert_eq!(limits.open_clients(), 1);
    }

    #[test]
    fn trusted_proxies_are_not_capped_per_client_but_count_in_the_total() {
        let limits = limits(3, 1, &["10.0.0.0/8"]);
        let held: Vec<_> = (0..3)
            .filter_map(|_| limits.admit(ip("10.1.2.3")).ok())
            .collect();
        assert_eq!(held.len(), 3);
        assert_eq!(limits.admit(ip("10.1.2.3")).err(), Some(Refused::Total));
        assert_eq!(limits.open_clients(), 0);
    }

    #[test]
    fn clones_share_their_counts() {
        let tls = limits(2, 1, &[]);
        let plain = tls.clone();
        let _held = tls.admit(ip("192.0.2.1"));
        assert_eq!(plain.admit(ip("192.0.2.1")).err(), Some(Refused::PerClient));
        let _other = plain.admit(ip("192.0.2.2"));
        assert_eq!(tls.admit(ip("192.0.2.3")).err(), Some(Refused::Total));
    }

    #[test]
    fn the_table_holds_only_clients_with_open_connections() {
        let limits = limits(5000, 4, &[]);
        let held: Vec<_> = (0..5000u32)
            .filter_map(|i| {
                limits
                    .admit(IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
                    .ok()
            })
            .collect();
        assert_eq!(held.len(), 5000);
        assert_eq!(limits.open_clients(), 5000);
        // Past the total, nothing more enters the table.
        assert!(limits.admit(ip("192.0.2.1")).is_err());
        assert_eq!(limits.open_clients(), 5000);
        drop(held);
        assert_eq!(limits.open_clients(), 0);
        let open = limits.inner.open.lock().map(|m| m.capacity()).unwrap_or(0);
        assert!(open <= 1024, "the table kept {open} slots after the flood");
    }

    #[test]
    fn the_open_table_costs_what_the_readme_says() {
        use crate::rate_table::tests::{alone, figure, resident};
        const CLIENTS: usize = 200_000;
        const ALONE: &str = "LOBE_TLS_TEST_OPEN_TABLE_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let text = alone(
                "conn_limits::tests::the_open_table_costs_what_the_readme_says",
                ALONE,
            );
            let per_entry = figure(&text, "bytes per entry:");
            assert!((20..=80).contains(&per_entry), "{text}");
            return;
        }
        let limits = limits(CLIENTS, 4, &[]);
        let mut held = Vec::with_capacity(CLIENTS);
        // The permits (held by the connections, not the table) are written first, so
        // that only the table grows below.
        let permits = CLIENTS * std::mem::size_of::<Option<ConnPermit>>();
        held.resize_with(CLIENTS, || None);
        let before = resident();
        for (i, slot) in held.iter_mut().enumerate() {
            let ip = IpAddr::from(u32::try_from(i).unwrap_or(0).to_be_bytes());
            *slot = limits.admit(ip).ok();
        }
        let table = resident().saturating_sub(before);
        assert_eq!(limits.open_clients(), CLIENTS);
        println!(
            "open table of {CLIENTS} clients: {table} bytes resident (permits apart: {permits}); bytes per entry: {}",
            table / CLIENTS
        );
    }
}
