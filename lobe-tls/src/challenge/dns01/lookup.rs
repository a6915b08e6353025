//! DNS look-ups that DNS-01 needs before and after writing a record: following the
//! `_acme-challenge` CNAME chain, finding a name's zone (an SOA walk), and finding the
//! zone's authoritative nameservers.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::query::{QueryError, answers, query};
use crate::error::{DnsErrorKind, Error, Result};

/// The longest CNAME chain followed from `_acme-challenge.<domain>`.
pub const MAX_CNAME_CHAIN: usize = 8;

/// The recursive resolvers used to follow CNAMEs and find nameservers, tried in order
/// until one answers.
#[derive(Clone, PartialEq, Eq)]
pub struct RecursiveResolvers(Vec<SocketAddr>);

impl fmt::Debug for RecursiveResolvers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl fmt::Display for RecursiveResolvers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.0.iter().map(|a| a.to_string()).collect();
        f.write_str(&names.join(", "))
    }
}

impl RecursiveResolvers {
    /// These resolvers; the system's (from `/etc/resolv.conf`) when `addrs` is empty.
    pub fn new(addrs: Vec<SocketAddr>) -> Result<Self> {
        if !addrs.is_empty() {
            return Ok(RecursiveResolvers(addrs));
        }
        let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
            Error::dns(
                DnsErrorKind::Lookup,
                format!(
                    "cannot read the system's resolver settings ({e}); pass --dns-recursive IP:PORT"
                ),
            )
            .with_source(e)
        })?;
        let mut system: Vec<SocketAddr> = Vec::new();
        for server in config.name_servers() {
            if !system.contains(&server.socket_addr) {
                system.push(server.socket_addr);
            }
        }
        if system.is_empty() {
            return Err(Error::dns(
                DnsErrorKind::Lookup,
                "the system has no resolver configured; pass --dns-recursive IP:PORT",
            ));
        }
        Ok(RecursiveResolvers(system))
    }

    /// The resolver addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.0
    }

    /// Asks the resolvers in turn (recursion desired) until one answers.
    pub(crate) async fn query(
        &self,
        name: &Name,
        record_type: RecordType,
    ) -> std::result::Result<Message, (SocketAddr, QueryError)> {
        let mut last = None;
        for server in &self.0 {
            match query(*server, name, record_type, true).await {
                Ok(message) => return Ok(message),
                // An error code is the resolver's answer; another one would say the same.
                Err(e @ QueryError::Rcode(_)) => return Err((*server, e)),
                Err(e) => last = Some((*server, e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                SocketAddr::from(([0, 0, 0, 0], 53)),
                QueryError::Unreachable(hickory_proto::ProtoError::from("no resolver configured")),
            )
        }))
    }

    /// Follows the CNAME chain starting at `name` and returns the name at its end, where
    /// the TXT record belongs. A name without a CNAME is its own end.
    pub async fn follow_cname(&self, name: &Name) -> Result<Name> {
        let mut current = name.clone();
        let mut seen = HashSet::from([current.to_lowercase()]);
        for _ in 0..=MAX_CNAME_CHAIN {
            let response = match self.query(&current, RecordType::CNAME).await {
                Ok(response) => response,
                Err((server, e)) => {
                    // Without an answer the record goes where it would without a CNAME;
                    // if that is wrong, the propagation check says so.
                    tracing::warn!(
                        "cannot look up the CNAME of {current}: resolver {server} {e}; writing the record at {current} (pass --dns-recursive IP:PORT)"
                    );
                    return Ok(current);
                }
            };
            let target =
                answers(&response, &current, RecordType::CNAME).find_map(|r| match r.data() {
                    RData::CNAME(cname) => Some(cname.0.clone()),
                    _ => None,
                });
            let Some(target) = target else {
                return Ok(current);
            };
            if !seen.insert(target.to_lowercase()) {
                return Err(Error::dns(
                    DnsErrorKind::Lookup,
                    format!("CNAME loop: {name} leads back to {target}; fix the CNAME records"),
                ));
            }
            tracing::debug!(from = %current, to = %target, "following CNAME");
            current = target;
        }
        Err(Error::dns(
            DnsErrorKind::Lookup,
            format!("CNAME chain from {name} is longer than {MAX_CNAME_CHAIN} links; shorten it"),
        ))
    }

    /// The zone apex of `name` and its authoritative nameservers.
    pub(crate) async fn authoritative_servers(
        &self,
        name: &Name,
    ) -> std::result::Result<(Name, Vec<Nameserver>), DiscoveryError> {
        let zone = find_zone(
            |candidate| async move {
                self.query(&candidate, RecordType::SOA)
                    .await
                    .map_err(|(server, e)| DiscoveryError::from_query(server, e))
            },
            name,
        )
        .await?;
        let response = self
            .query(&zone, RecordType::NS)
            .await
            .map_err(|(server, e)| DiscoveryError::from_query(server, e))?;
        let hosts: Vec<Name> = answers(&response, &zone, RecordType::NS)
            .filter_map(|r| match r.data() {
                RData::NS(ns) => Some(ns.0.clone()),
                _ => None,
            })
            .collect();
        let mut servers = Vec::new();
        for host in hosts {
            let mut addrs = Vec::new();
            for record_type in [RecordType::A, RecordType::AAAA] {
                let response = self
                    .query(&host, record_type)
                    .await
                    .map_err(|(server, e)| DiscoveryError::from_query(server, e))?;
                addrs.extend(answers(&response, &host, record_type).filter_map(
                    |r| match r.data() {
                        RData::A(a) => Some(SocketAddr::from((a.0, 53))),
                        RData::AAAA(aaaa) => Some(SocketAddr::from((aaaa.0, 53))),
                        _ => None,
                    },
                ));
            }
            if addrs.is_empty() {
                tracing::warn!(%host, %zone, "nameserver has no address; skipping it");
                continue;
            }
            servers.push(Nameserver { host, addrs });
        }
        if servers.is_empty() {
            return Err(DiscoveryError::Other(format!(
                "zone {zone} has no nameserver with an address"
            )));
        }
        Ok((zone, servers))
    }
}

/// One authoritative nameserver: its NS name and its addresses.
#[derive(Debug, Clone)]
pub(crate) struct Nameserver {
    pub host: Name,
    pub addrs: Vec<SocketAddr>,
}

/// Why the authoritative nameservers could not be found.
#[derive(Debug)]
pub(crate) enum DiscoveryError {
    /// The resolver does not do SOA/NS queries (NOTIMP or REFUSED), as challtestsrv.
    Unsupported(SocketAddr, ResponseCode),
    /// Anything else.
    Other(String),
}

impl DiscoveryError {
    fn from_query(server: SocketAddr, e: QueryError) -> Self {
        match e {
            QueryError::Rcode(code @ (ResponseCode::NotImp | ResponseCode::Refused)) => {
                DiscoveryError::Unsupported(server, code)
            }
            e => DiscoveryError::Other(format!("resolver {server} {e}")),
        }
    }
}

/// Finds the zone that holds `name` by an SOA walk: asks for the SOA of `name`, then of
/// each parent, until an answer names the zone. `ask` sends one SOA question.
pub(crate) async fn find_zone<F, Fut, E>(ask: F, name: &Name) -> std::result::Result<Name, E>
where
    F: Fn(Name) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Message, E>>,
    E: From<String>,
{
    let mut candidate = name.clone();
    loop {
        let response = ask(candidate.clone()).await?;
        if answers(&response, &candidate, RecordType::SOA)
            .next()
            .is_some()
        {
            return Ok(candidate);
        }
        // A negative answer carries the zone's SOA in the authority section.
        if let Some(soa) = response
            .name_servers()
            .iter()
            .find(|r| r.record_type() == RecordType::SOA && r.name().zone_of(name))
        {
            return Ok(soa.name().clone());
        }
        if candidate.is_root() {
            return Err(E::from(format!("no zone found for {name}")));
        }
        candidate = candidate.base_name();
    }
}

impl From<String> for DiscoveryError {
    fn from(s: String) -> Self {
        DiscoveryError::Other(s)
    }
}
