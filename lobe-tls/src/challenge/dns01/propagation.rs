//! Waits until a TXT record is visible at every configured resolver.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// The first wait between queries; doubled up to [`MAX_INTERVAL`], so a record that is
/// already there costs one round trip and a slow one is not hammered.
const FIRST_INTERVAL: Duration = Duration::from_millis(25);
const MAX_INTERVAL: Duration = Duration::from_secs(2);

/// Asks resolvers for a TXT record until each of them returns the expected value.
#[derive(Clone)]
pub struct PropagationCheck {
    resolvers: Vec<(String, TokioResolver)>,
    timeout: Duration,
}

impl std::fmt::Debug for PropagationCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.resolvers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("PropagationCheck")
            .field("resolvers", &names)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PropagationCheck {
    /// A check against `resolvers` (the system's resolvers if empty), giving up after `timeout`.
    pub fn new(resolvers: Vec<SocketAddr>, timeout: Duration) -> Result<Self> {
        let mut opts = ResolverOpts::default();
        // Every poll must see the server's current answer, not a cached NXDOMAIN.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        let built = if resolvers.is_empty() {
            let builder = TokioResolver::builder_tokio().map_err(|e| {
                Error::Dns(format!(
                    "cannot read the system's resolver settings ({e}); pass --dns-resolver IP:PORT"
                ))
            })?;
            vec![(
                "system resolver".to_owned(),
                builder.with_options(opts).build(),
            )]
        } else {
            resolvers
                .iter()
                .map(|addr| {
                    let mut config = ResolverConfig::new();
                    config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                    config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
                    let resolver = TokioResolver::builder_with_config(
                        config,
                        TokioConnectionProvider::default(),
                    )
                    .with_options(opts.clone())
                    .build();
                    (addr.to_string(), resolver)
                })
                .collect()
        };
        Ok(PropagationCheck {
            resolvers: built,
            timeout,
        })
    }

    /// Waits until every resolver answers `fqdn` with a TXT record holding `value`.
    pub async fn wait_for(&self, fqdn: &str, value: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut interval = FIRST_INTERVAL;
        loop {
            let mut missing = Vec::new();
            for (name, resolver) in &self.resolvers {
                if !has_value(resolver, fqdn, value).await {
                    missing.push(name.as_str());
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Dns(format!(
                    "TXT record {fqdn} with value {value:?} not visible at {} after {}s; check the DNS provider, or raise --propagation-timeout",
                    missing.join(", "),
                    self.timeout.as_secs()
                )));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(MAX_INTERVAL);
        }
    }
}

async fn has_value(resolver: &TokioResolver, fqdn: &str, value: &str) -> bool {
    match resolver.txt_lookup(fqdn).await {
        Ok(lookup) => lookup.iter().any(|txt| {
            let joined: Vec<u8> = txt
                .txt_data()
                .iter()
                .flat_map(|d| d.iter().copied())
                .collect();
            joined == value.as_bytes()
        }),
        Err(_) => false,
    }
}
