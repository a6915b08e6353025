//! Waits until a TXT record is visible where the CA will look for it.
//!
//! By default that means at every authoritative nameserver of the record's zone, asked
//! directly (no recursion, so no cache in between). The zone and its nameservers are
//! found through a recursive resolver. Alternatively, a fixed list of servers is asked.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::Name;
use tokio::time::Instant;

use super::lookup::{DiscoveryError, Nameserver, RecursiveResolvers};
use super::query::{QueryError, fqdn, has_txt_value, query};
use crate::error::{DnsErrorKind, Error, Result};

/// The first wait between two rounds of queries. It doubles each round up to the
/// configured interval, so a record that is already there costs one round trip and a
/// slow one is not hammered.
const FIRST_INTERVAL: Duration = Duration::from_millis(25);

/// The default longest wait between two rounds of queries: a record is seen at most
/// about a second after it appears.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Where the check looks.
#[derive(Debug, Clone)]
enum Target {
    /// The authoritative nameservers of the record's zone, found through these resolvers.
    Authoritative(RecursiveResolvers),
    /// Exactly these servers, asked with recursion desired.
    Servers(Vec<SocketAddr>),
}

/// Asks nameservers for a TXT record until each of them returns the expected value.
#[derive(Debug, Clone)]
pub struct PropagationCheck {
    target: Target,
    timeout: Duration,
    interval: Duration,
}

/// One server to ask, as named in messages.
#[derive(Clone)]
struct Server {
    label: String,
    addrs: Vec<SocketAddr>,
    recursion: bool,
}

impl PropagationCheck {
    /// A check at the authoritative nameservers of each record's zone, found through
    /// `resolvers`. Gives up after `timeout`.
    pub fn authoritative(resolvers: RecursiveResolvers, timeout: Duration) -> Self {
        PropagationCheck {
            target: Target::Authoritative(resolvers),
            timeout,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// A check at exactly `servers` (recursive resolvers or authoritative servers).
    pub fn at_servers(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        PropagationCheck {
            target: Target::Servers(servers),
            timeout,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Sets the longest wait between two rounds of queries (the first rounds come sooner).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(FIRST_INTERVAL);
        self
    }

    /// Waits until every server answers `fqdn` with a TXT record holding `value`.
    pub async fn wait_for(&self, fqdn_str: &str, value: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let name = fqdn(fqdn_str)?;
        let servers = self.servers_for(&name).await?;
        let mut interval = FIRST_INTERVAL;
        let mut pending = servers;
        loop {
            pending = missing_value(pending, &name, value).await;
            if pending.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let names: Vec<&str> = pending.iter().map(|s| s.label.as_str()).collect();
                return Err(Error::dns(
                    DnsErrorKind::NotPropagated,
                    format!(
                        "TXT record {name} with value {value:?} not visible at {} after {}s; check the DNS provider, or raise --propagation-timeout",
                        names.join(", "),
                        self.timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(self.interval);
        }
    }

    async fn servers_for(&self, name: &Name) -> Result<Vec<Server>> {
        let resolvers = match &self.target {
            Target::Servers(addrs) => return Ok(fixed_servers(addrs)),
            Target::Authoritative(resolvers) => resolvers,
        };
        match resolvers.authoritative_servers(name).await {
            Ok((zone, nameservers)) => {
                tracing::debug!(%zone, count = nameservers.len(), "checking authoritative nameservers");
                Ok(nameservers.into_iter().map(authoritative_server).collect())
            }
            Err(DiscoveryError::Unsupported(server, code)) => {
                // Test servers such as challtestsrv answer only A/AAAA/TXT/CNAME: the
                // resolver is then the only place the record can be seen.
                tracing::warn!(
                    "resolver {server} answered {code} to an SOA query, so the zone's nameservers cannot be found; checking at the resolver itself (pass --dns-resolver to choose the servers)"
                );
                Ok(fixed_servers(resolvers.addrs()))
            }
            Err(DiscoveryError::Other(e)) => Err(Error::dns(
                DnsErrorKind::Lookup,
                format!(
                    "cannot find the authoritative nameservers of {name}: {e}; pass --dns-resolver IP:PORT to check there instead"
                ),
            )),
        }
    }
}

fn fixed_servers(addrs: &[SocketAddr]) -> Vec<Server> {
    addrs
        .iter()
        .map(|addr| Server {
            label: addr.to_string(),
            addrs: vec![*addr],
            recursion: true,
        })
        .collect()
}

fn authoritative_server(ns: Nameserver) -> Server {
    let list: Vec<String> = ns.addrs.iter().map(|a| a.ip().to_string()).collect();
    Server {
        label: format!("{} ({})", ns.host, list.join(" ")),
        addrs: ns.addrs,
        recursion: false,
    }
}

/// Asks all `servers` at once and returns those that lack the value.
async fn missing_value(servers: Vec<Server>, name: &Name, value: &str) -> Vec<Server> {
    let mut asks = tokio::task::JoinSet::new();
    for server in servers {
        let (name, value) = (name.clone(), value.to_owned());
        asks.spawn(async move {
            let found = server_has_value(&server, &name, &value).await;
            (!found).then_some(server)
        });
    }
    let mut missing = Vec::new();
    while let Some(result) = asks.join_next().await {
        if let Ok(Some(server)) = result {
            missing.push(server);
        }
    }
    missing.sort_by(|a, b| a.label.cmp(&b.label));
    missing
}

/// Asks the server's addresses in turn; the first that answers decides.
async fn server_has_value(server: &Server, name: &Name, value: &str) -> bool {
    for addr in &server.addrs {
        match query(
            *addr,
            name,
            hickory_proto::rr::RecordType::TXT,
            server.recursion,
        )
        .await
        {
            Ok(response) => return has_txt_value(&response, name, value),
            Err(QueryError::Rcode(code)) => {
                tracing::debug!(%addr, %name, %code, "nameserver refused the TXT query");
                return false;
            }
            Err(e) => tracing::debug!(%addr, %name, error = %e, "nameserver did not answer"),
        }
    }
    false
}
