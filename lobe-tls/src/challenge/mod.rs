//! Answering ACME challenges: the [`Solver`] trait and the HTTP-01, DNS-01 and
//! TLS-ALPN-01 solvers.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::DomainName;
use crate::error::Result;

pub mod dns01;
pub mod http01;
pub(crate) mod standalone;
pub mod tls_alpn01;
pub mod webroot;

pub use dns01::{Dns01Solver, DnsConfig, DnsProvider, DnsProviderConfig};
pub use http01::{Http01Registry, Http01Solver};
pub use tls_alpn01::{TlsAlpn01Listener, TlsAlpn01Solver};
pub use webroot::WebrootSolver;

/// The ACME challenge types lobe-tls can answer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[non_exhaustive]
pub enum ChallengeKind {
    /// A file served over plain HTTP on port 80 (RFC 8555 §8.3).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A TXT record at `_acme-challenge.<domain>` (RFC 8555 §8.4). Needed for wildcards.
    #[serde(rename = "dns-01")]
    Dns01,
    /// A special certificate served for ALPN `acme-tls/1` on port 443 (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl ChallengeKind {
    /// The name ACME and the CLI use.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::Dns01 => "dns-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }

    /// The matching instant-acme type.
    pub(crate) fn acme_type(self) -> instant_acme::ChallengeType {
        match self {
            ChallengeKind::Http01 => instant_acme::ChallengeType::Http01,
            ChallengeKind::Dns01 => instant_acme::ChallengeType::Dns01,
            ChallengeKind::TlsAlpn01 => instant_acme::ChallengeType::TlsAlpn01,
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ChallengeKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "http-01" | "http01" | "http" => Ok(ChallengeKind::Http01),
            "dns-01" | "dns01" | "dns" => Ok(ChallengeKind::Dns01),
            "tls-alpn-01" | "tls-alpn01" | "tls-alpn" => Ok(ChallengeKind::TlsAlpn01),
            _ => Err(crate::Error::config(format!(
                "unknown challenge {s:?}: use http-01, dns-01 or tls-alpn-01"
            ))),
        }
    }
}

/// How a certificate is validated, as remembered in the store's metadata so that a later
/// renewal repeats it. Holds no secrets: those come from the environment at run time.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ChallengeConfig {
    /// The challenge type.
    pub kind: ChallengeKind,
    /// For HTTP-01 with the standalone listener: the address it listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// For HTTP-01 through a web server that serves this directory: the token goes to
    /// `DIR/.well-known/acme-challenge/TOKEN`. Takes precedence over any listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_webroot: Option<std::path::PathBuf>,
    /// For TLS-ALPN-01 with the standalone listener: the address it listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    /// For DNS-01: the provider and propagation check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Kinds to try after `kind`, in order, each with the settings above: when the CA
    /// offers no `kind` challenge, or validation through it fails (the port it needs
    /// does not reach this server), the next order uses the next kind. Empty: `kind`
    /// alone, pinned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<ChallengeKind>,
}

impl ChallengeConfig {
    /// HTTP-01: through the application's registry, or with `listen` set, a standalone
    /// listener on that address while the order runs.
    pub fn http01(listen: Option<String>) -> Self {
        ChallengeConfig {
            kind: ChallengeKind::Http01,
            http_listen: listen,
            ..ChallengeConfig::default()
        }
    }

    /// HTTP-01 through a webroot: another web server serves `dir`, lobe-tls writes the
    /// token files into it (see [`WebrootSolver`]).
    pub fn http01_webroot(dir: impl Into<std::path::PathBuf>) -> Self {
        ChallengeConfig {
            kind: ChallengeKind::Http01,
            http_webroot: Some(dir.into()),
            ..ChallengeConfig::default()
        }
    }

    /// TLS-ALPN-01: through the manager's resolver on the proxy's own port, or with
    /// `listen` set, a standalone listener on that address while the order runs.
    pub fn tls_alpn01(listen: Option<String>) -> Self {
        ChallengeConfig {
            kind: ChallengeKind::TlsAlpn01,
            tls_listen: listen,
            ..ChallengeConfig::default()
        }
    }

    /// DNS-01 through `dns`'s provider.
    pub fn dns01(dns: DnsConfig) -> Self {
        ChallengeConfig {
            kind: ChallengeKind::Dns01,
            dns: Some(dns),
            ..ChallengeConfig::default()
        }
    }

    /// This configuration, with `kinds` tried after its own kind (see
    /// [`ChallengeConfig::fallbacks`]).
    pub fn with_fallbacks(mut self, kinds: impl IntoIterator<Item = ChallengeKind>) -> Self {
        self.fallbacks = kinds.into_iter().collect();
        self
    }

    /// Every kind to try, in order: `kind`, then the fallbacks (repeats left out).
    pub fn kinds(&self) -> Vec<ChallengeKind> {
        let mut kinds = vec![self.kind];
        for kind in &self.fallbacks {
            if !kinds.contains(kind) {
                kinds.push(*kind);
            }
        }
        kinds
    }

    /// This configuration with `kind` first and the other kinds after it in their
    /// order: what one attempt orders with, and what it records, so that a renewal
    /// starts with the kind that worked last.
    pub fn first(&self, kind: ChallengeKind) -> Self {
        let mut config = self.clone();
        config.fallbacks = self.kinds().into_iter().filter(|k| *k != kind).collect();
        config.kind = kind;
        config
    }
}

/// One challenge to answer, as the CA gave it.
#[derive(Clone)]
pub struct ChallengeData {
    /// The name being validated (a wildcard keeps its `*.`).
    pub domain: DomainName,
    /// The challenge token.
    pub token: String,
    /// `token.thumbprint`: the HTTP-01 response body.
    pub key_authorization: String,
    /// base64url(SHA-256(key authorization)): the DNS-01 TXT value.
    pub dns_value: String,
    /// SHA-256(key authorization): the TLS-ALPN-01 extension value.
    pub digest: [u8; 32],
}

impl fmt::Debug for ChallengeData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChallengeData")
            .field("domain", &self.domain)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Something that can make a challenge response visible to the CA and take it away again.
#[async_trait]
pub trait Solver: Send + Sync {
    /// The challenge type this solver answers.
    fn kind(&self) -> ChallengeKind;

    /// Makes the response available.
    async fn present(&self, challenge: &ChallengeData) -> Result<()>;

    /// Waits until the CA can see the response (DNS propagation). Called after every
    /// challenge of an order has been presented, before any is answered.
    async fn wait_visible(&self, _challenge: &ChallengeData) -> Result<()> {
        Ok(())
    }

    /// Removes the response. Called once per presented challenge, whatever the outcome.
    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()>;
}

/// A shared solver.
pub type DynSolver = Arc<dyn Solver>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_puts_its_kind_first_and_keeps_the_others_in_order() {
        let config = ChallengeConfig::http01(None)
            .with_fallbacks([ChallengeKind::TlsAlpn01, ChallengeKind::Http01]);
        assert_eq!(
            config.kinds(),
            [ChallengeKind::Http01, ChallengeKind::TlsAlpn01]
        );
        let second = config.first(ChallengeKind::TlsAlpn01);
        assert_eq!(second.kind, ChallengeKind::TlsAlpn01);
        assert_eq!(second.fallbacks, [ChallengeKind::Http01]);
        assert!(
            ChallengeConfig::tls_alpn01(None)
                .first(ChallengeKind::TlsAlpn01)
                .fallbacks
                .is_empty()
        );
    }

    #[test]
    fn metadata_without_fallbacks_reads_and_writes_as_before() {
        let old = r#"{"kind":"http-01","http_listen":"0.0.0.0:80"}"#;
        let config: ChallengeConfig = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.fallbacks.is_empty());
        assert_eq!(serde_json::to_string(&config).ok().as_deref(), Some(old));
        let both = ChallengeConfig::http01(None).with_fallbacks([ChallengeKind::TlsAlpn01]);
        let text = serde_json::to_string(&both).unwrap_or_default();
        assert!(text.contains(r#""fallbacks":["tls-alpn-01"]"#), "{text}");
    }
}
