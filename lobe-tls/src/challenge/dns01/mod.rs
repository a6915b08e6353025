//! DNS-01: the [`DnsProvider`] trait, its providers, and the propagation check.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{ChallengeData, ChallengeKind, Solver};
use crate::error::{Error, Result};

pub mod challtestsrv;
pub mod exec;
pub mod propagation;

pub use challtestsrv::ChalltestsrvProvider;
pub use exec::ExecProvider;
pub use propagation::PropagationCheck;

/// Something that can create and delete TXT records.
///
/// `fqdn` carries a trailing dot, as in `_acme-challenge.example.com.`. Several values
/// may live at one name at once (a wildcard and its apex): `cleanup` removes only
/// the value it is given.
#[async_trait]
pub trait DnsProvider: Send + Sync + fmt::Debug {
    /// Creates the TXT record `fqdn` with `value`.
    async fn present(&self, fqdn: &str, value: &str) -> Result<()>;
    /// Deletes the TXT record `fqdn` with `value`, and nothing else.
    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()>;
}

/// Which DNS provider to use, without secrets (they come from the environment).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
#[non_exhaustive]
pub enum DnsProviderConfig {
    /// Runs `program present|cleanup <fqdn> <value>`, as lego's `exec` provider does.
    Exec {
        /// The program to run.
        program: String,
    },
    /// Pebble's test DNS server, through its management API.
    Challtestsrv {
        /// The management API's base URL, e.g. `http://127.0.0.1:8055`.
        url: String,
    },
}

impl DnsProviderConfig {
    /// Builds the provider this configuration describes.
    pub fn build(&self) -> Result<Arc<dyn DnsProvider>> {
        Ok(match self {
            DnsProviderConfig::Exec { program } => Arc::new(ExecProvider::new(program)),
            DnsProviderConfig::Challtestsrv { url } => Arc::new(ChalltestsrvProvider::new(url)?),
        })
    }
}

/// DNS-01 settings: the provider and how to check that records are visible.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DnsConfig {
    /// Which provider writes the records.
    #[serde(flatten)]
    pub provider: DnsProviderConfig,
    /// Resolvers to ask during the propagation check. Empty: the system's resolvers.
    #[serde(default)]
    pub resolvers: Vec<SocketAddr>,
    /// How long to wait for records to become visible, in seconds.
    #[serde(default = "default_propagation_timeout")]
    pub propagation_timeout_secs: u64,
    /// Whether to check propagation at all.
    #[serde(default = "default_true")]
    pub propagation_check: bool,
}

fn default_propagation_timeout() -> u64 {
    120
}

fn default_true() -> bool {
    true
}

impl DnsConfig {
    /// Settings for `provider` with the default propagation check.
    pub fn new(provider: DnsProviderConfig) -> Self {
        DnsConfig {
            provider,
            resolvers: Vec::new(),
            propagation_timeout_secs: default_propagation_timeout(),
            propagation_check: true,
        }
    }
}

/// The DNS-01 solver: a provider plus an optional propagation check.
#[derive(Debug, Clone)]
pub struct Dns01Solver {
    provider: Arc<dyn DnsProvider>,
    propagation: Option<PropagationCheck>,
}

impl Dns01Solver {
    /// A solver writing through `provider` and checking with `propagation`, if given.
    pub fn new(provider: Arc<dyn DnsProvider>, propagation: Option<PropagationCheck>) -> Self {
        Dns01Solver {
            provider,
            propagation,
        }
    }

    /// Builds a solver from settings.
    pub fn from_config(config: &DnsConfig) -> Result<Self> {
        let propagation = if config.propagation_check {
            Some(PropagationCheck::new(
                config.resolvers.clone(),
                Duration::from_secs(config.propagation_timeout_secs),
            )?)
        } else {
            None
        };
        Ok(Dns01Solver::new(config.provider.build()?, propagation))
    }
}

#[async_trait]
impl Solver for Dns01Solver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Dns01
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        self.provider
            .present(
                &challenge.domain.acme_challenge_fqdn(),
                &challenge.dns_value,
            )
            .await
    }

    async fn wait_visible(&self, challenge: &ChallengeData) -> Result<()> {
        match &self.propagation {
            Some(check) => {
                check
                    .wait_for(
                        &challenge.domain.acme_challenge_fqdn(),
                        &challenge.dns_value,
                    )
                    .await
            }
            None => Ok(()),
        }
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        self.provider
            .cleanup(
                &challenge.domain.acme_challenge_fqdn(),
                &challenge.dns_value,
            )
            .await
    }
}

/// Turns a provider's failure into a one-line error naming the record.
pub(crate) fn provider_error(
    provider: &str,
    action: &str,
    fqdn: &str,
    detail: impl fmt::Display,
) -> Error {
    Error::Dns(format!("{provider}: cannot {action} TXT {fqdn}: {detail}"))
}
