//! DNS-01: the [`DnsProvider`] trait, its providers, the `_acme-challenge` CNAME chase
//! and the propagation check.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{ChallengeData, ChallengeKind, Solver};
use crate::error::{BoxError, DnsErrorKind, Error, Result};

#[cfg(feature = "dns-providers")]
mod api;
pub mod challtestsrv;
#[cfg(feature = "dns-providers")]
pub mod cloudflare;
pub mod exec;
#[cfg(feature = "dns-providers")]
pub mod httpreq;
pub mod lookup;
pub mod propagation;
mod query;
#[cfg(feature = "dns-providers")]
pub mod rfc2136;
pub mod settings;

pub use challtestsrv::ChalltestsrvProvider;
#[cfg(feature = "dns-providers")]
pub use cloudflare::CloudflareProvider;
pub use exec::ExecProvider;
#[cfg(feature = "dns-providers")]
pub use httpreq::HttpreqProvider;
pub use lookup::RecursiveResolvers;
pub use propagation::PropagationCheck;
#[cfg(feature = "dns-providers")]
pub use rfc2136::{Rfc2136Provider, TsigAlgorithm, TsigKey};
pub use settings::ProviderSettings;

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

/// Which DNS provider to use, without secrets: those, and the other settings of the
/// providers that take them, are read when the provider is built, from environment
/// variables or from the TOML file named here (see [`settings`]).
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
    /// Dynamic DNS UPDATE signed with TSIG (`LOBE_TLS_RFC2136_*` or `[rfc2136]`).
    Rfc2136 {
        /// The TOML file with a `[rfc2136]` table, if settings come from one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_file: Option<PathBuf>,
    },
    /// Cloudflare's v4 API (`CLOUDFLARE_API_TOKEN` or `[cloudflare]`).
    Cloudflare {
        /// The TOML file with a `[cloudflare]` table, if settings come from one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_file: Option<PathBuf>,
    },
    /// A webhook compatible with lego's `httpreq` (`LOBE_TLS_HTTPREQ_*` or `[httpreq]`).
    Httpreq {
        /// The TOML file with a `[httpreq]` table, if settings come from one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config_file: Option<PathBuf>,
    },
}

impl DnsProviderConfig {
    /// Builds the provider this configuration describes.
    pub fn build(&self) -> Result<Arc<dyn DnsProvider>> {
        Ok(match self {
            DnsProviderConfig::Exec { program } => Arc::new(ExecProvider::new(program)),
            DnsProviderConfig::Challtestsrv { url } => Arc::new(ChalltestsrvProvider::new(url)?),
            #[cfg(not(feature = "dns-providers"))]
            DnsProviderConfig::Rfc2136 { .. }
            | DnsProviderConfig::Cloudflare { .. }
            | DnsProviderConfig::Httpreq { .. } => {
                return Err(crate::error::Error::config(
                    "this build of lobe-tls has no rfc2136, cloudflare or httpreq provider (the `dns-providers` feature is off); use exec",
                ));
            }
            #[cfg(feature = "dns-providers")]
            DnsProviderConfig::Rfc2136 { config_file } => Arc::new(Rfc2136Provider::from_settings(
                &ProviderSettings::load("rfc2136", config_file.as_deref())?,
            )?),
            #[cfg(feature = "dns-providers")]
            DnsProviderConfig::Cloudflare { config_file } => {
                Arc::new(CloudflareProvider::from_settings(&ProviderSettings::load(
                    "cloudflare",
                    config_file.as_deref(),
                )?)?)
            }
            #[cfg(feature = "dns-providers")]
            DnsProviderConfig::Httpreq { config_file } => Arc::new(HttpreqProvider::from_settings(
                &ProviderSettings::load("httpreq", config_file.as_deref())?,
            )?),
        })
    }
}

/// DNS-01 settings: the provider and how to check that records are visible.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct DnsConfig {
    /// Which provider writes the records.
    #[serde(flatten)]
    pub provider: DnsProviderConfig,
    /// Servers to ask during the propagation check instead of the zone's authoritative
    /// nameservers (and to follow CNAMEs with). Empty: find the authoritative servers.
    #[serde(default)]
    pub resolvers: Vec<SocketAddr>,
    /// Recursive resolvers that follow CNAMEs and find the zone's nameservers. Empty:
    /// the system's (`/etc/resolv.conf`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recursive_resolvers: Vec<SocketAddr>,
    /// How long to wait for records to become visible, in seconds.
    #[serde(default = "default_propagation_timeout")]
    pub propagation_timeout_secs: u64,
    /// The longest wait between two rounds of the propagation check, in milliseconds;
    /// the first rounds come sooner (25 ms, doubling).
    #[serde(default = "default_propagation_interval")]
    pub propagation_interval_ms: u64,
    /// Whether to check propagation at all.
    #[serde(default = "default_true")]
    pub propagation_check: bool,
}

fn default_propagation_timeout() -> u64 {
    120
}

fn default_propagation_interval() -> u64 {
    propagation::DEFAULT_INTERVAL.as_millis() as u64
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
            recursive_resolvers: Vec::new(),
            propagation_timeout_secs: default_propagation_timeout(),
            propagation_interval_ms: default_propagation_interval(),
            propagation_check: true,
        }
    }
}

/// The DNS-01 solver: a provider, the CNAME chase, and an optional propagation check.
///
/// If `_acme-challenge.<domain>` is a CNAME (validation delegated to another zone), the
/// record is written at the end of the chain, where the CA's resolver will look.
#[derive(Debug, Clone)]
pub struct Dns01Solver {
    provider: Arc<dyn DnsProvider>,
    propagation: Option<PropagationCheck>,
    cname_resolvers: Option<RecursiveResolvers>,
    /// `_acme-challenge` name → where its record was written.
    targets: Arc<Mutex<HashMap<String, String>>>,
}

impl Dns01Solver {
    /// A solver writing through `provider` and checking with `propagation`, if given.
    /// It follows no CNAMEs until [`with_cname_resolvers`](Self::with_cname_resolvers).
    pub fn new(provider: Arc<dyn DnsProvider>, propagation: Option<PropagationCheck>) -> Self {
        Dns01Solver {
            provider,
            propagation,
            cname_resolvers: None,
            targets: Arc::default(),
        }
    }

    /// Follows `_acme-challenge` CNAME chains through `resolvers` before writing.
    pub fn with_cname_resolvers(mut self, resolvers: RecursiveResolvers) -> Self {
        self.cname_resolvers = Some(resolvers);
        self
    }

    /// Builds a solver from settings.
    pub fn from_config(config: &DnsConfig) -> Result<Self> {
        // The explicit servers answer for everything when given; otherwise the recursive
        // resolvers (or the system's) follow CNAMEs and find the nameservers.
        let given = if config.resolvers.is_empty() {
            &config.recursive_resolvers
        } else {
            &config.resolvers
        };
        let resolvers = match RecursiveResolvers::new(given.clone()) {
            Ok(resolvers) => resolvers,
            // Without a check, a missing system resolver only means no CNAME chase.
            Err(e) if !config.propagation_check => {
                tracing::warn!("{e}; _acme-challenge CNAMEs will not be followed");
                let provider = config.provider.build()?;
                return Ok(Dns01Solver::new(provider, None));
            }
            Err(e) => return Err(e),
        };
        let propagation = config.propagation_check.then(|| {
            let timeout = Duration::from_secs(config.propagation_timeout_secs);
            let check = if config.resolvers.is_empty() {
                PropagationCheck::authoritative(resolvers.clone(), timeout)
            } else {
                PropagationCheck::at_servers(config.resolvers.clone(), timeout)
            };
            check.with_interval(Duration::from_millis(config.propagation_interval_ms))
        });
        Ok(Dns01Solver::new(config.provider.build()?, propagation).with_cname_resolvers(resolvers))
    }

    /// Where the record for `fqdn` goes: the end of its CNAME chain.
    async fn target_of(&self, fqdn: &str) -> Result<String> {
        let Some(resolvers) = &self.cname_resolvers else {
            return Ok(fqdn.to_owned());
        };
        let name = query::fqdn(fqdn)?;
        let target = resolvers.follow_cname(&name).await?.to_ascii();
        if target != fqdn {
            tracing::info!(from = %fqdn, to = %target, "_acme-challenge is a CNAME; writing the record at its target");
        }
        Ok(target)
    }

    async fn remembered_target(&self, fqdn: &str) -> String {
        self.targets
            .lock()
            .await
            .get(fqdn)
            .cloned()
            .unwrap_or_else(|| fqdn.to_owned())
    }
}

#[async_trait]
impl Solver for Dns01Solver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Dns01
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        let fqdn = challenge.domain.acme_challenge_fqdn();
        let target = self.target_of(&fqdn).await?;
        self.targets.lock().await.insert(fqdn, target.clone());
        self.provider.present(&target, &challenge.dns_value).await
    }

    async fn wait_visible(&self, challenge: &ChallengeData) -> Result<()> {
        match &self.propagation {
            Some(check) => {
                let target = self
                    .remembered_target(&challenge.domain.acme_challenge_fqdn())
                    .await;
                check.wait_for(&target, &challenge.dns_value).await
            }
            None => Ok(()),
        }
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        let target = self
            .remembered_target(&challenge.domain.acme_challenge_fqdn())
            .await;
        self.provider.cleanup(&target, &challenge.dns_value).await
    }
}

/// A provider's answer that refused a request, kept as the source of an
/// [`Error::Dns`] of kind [`DnsErrorKind::ProviderRefused`].
#[derive(Debug, thiserror::Error)]
#[error("{answer}")]
#[non_exhaustive]
pub struct ProviderRefusal {
    /// The HTTP status, for a provider with an HTTP API.
    pub status: Option<u16>,
    /// The provider's own error codes (Cloudflare's, for one), if it sent any.
    pub codes: Vec<u64>,
    /// What the provider answered, one line.
    pub answer: String,
}

/// A provider's failure before it is tied to a record: its kind, the words for it and
/// its cause.
#[derive(Debug)]
pub(crate) struct ProviderFailure {
    pub kind: DnsErrorKind,
    pub detail: String,
    pub source: Option<BoxError>,
}

impl ProviderFailure {
    pub fn new(kind: DnsErrorKind, detail: impl Into<String>) -> Self {
        ProviderFailure {
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// The provider answered and said no: `answer` is what it said.
    pub fn refused(
        detail: impl Into<String>,
        status: Option<u16>,
        codes: Vec<u64>,
        answer: impl Into<String>,
    ) -> Self {
        ProviderFailure::new(DnsErrorKind::ProviderRefused, detail).with_source(ProviderRefusal {
            status,
            codes,
            answer: answer.into(),
        })
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// A zone search that found nothing, in words (what [`lookup::find_zone`] reports).
impl From<String> for ProviderFailure {
    fn from(detail: String) -> Self {
        ProviderFailure::new(DnsErrorKind::Lookup, detail)
    }
}

/// Turns a provider's failure into a one-line error naming the record.
pub(crate) fn provider_error(
    provider: &str,
    action: &str,
    fqdn: &str,
    failure: ProviderFailure,
) -> Error {
    Error::Dns {
        provider: Some(provider.to_owned()),
        kind: failure.kind,
        message: format!("{provider}: cannot {action} TXT {fqdn}: {}", failure.detail),
        source: failure.source,
    }
}
