//! lobe-tls: ACME certificates that issue and renew themselves, hot-swapped into rustls.
//!
//! Order a certificate through HTTP-01 and keep it in a certbot-compatible file store:
//!
//! ```no_run
//! use lobe_tls::challenge::ChallengeConfig;
//! use lobe_tls::{AcmeClient, AcmeConfig, FileStore, IssueRequest, KeyType, domain};
//!
//! # async fn run() -> lobe_tls::Result<()> {
//! let store = FileStore::open("/var/lib/lobe-tls")?;
//! let mut config = AcmeConfig::new(lobe_tls::acme::LETSENCRYPT_STAGING);
//! config.email = Some("ops@example.com".into());
//! let client = AcmeClient::connect(&config, &store).await?;
//!
//! // Port 80 must reach the standalone listener, which is bound before the order starts.
//! let challenge = ChallengeConfig::http01(Some("0.0.0.0:80".into()));
//! let request = IssueRequest::new(
//!     domain::parse_all(&["example.com", "www.example.com"])?,
//!     KeyType::EcdsaP256,
//!     challenge,
//! );
//! // Orders, checks the result and writes live/example.com/ atomically, with the
//! // metadata a later renewal repeats.
//! let stored = lobe_tls::issue_and_store(&client, &store, request, None, None).await?;
//! let info = stored.bundle.info()?;
//! println!("serial {} valid until {}", info.serial, info.not_after);
//! # Ok(())
//! # }
//! ```

pub mod acme;
pub mod cert;
pub mod challenge;
pub mod cluster;
pub mod domain;
#[cfg(feature = "edge")]
pub mod edge;
pub mod error;
pub mod import;
pub mod inventory;
pub mod issue;
mod listen;
pub mod manager;
pub mod metrics;
pub mod net;
pub mod on_demand;
pub mod renewal;
pub mod resolver;
pub mod store;
#[cfg(feature = "terminator")]
pub mod terminator;
pub mod tickets;
pub mod tls_config;
#[cfg(feature = "watch")]
pub mod watch;

pub use acme::{AcmeClient, AcmeConfig, Eab, OrderRequest};
pub use cert::{CertBundle, CertInfo, KeyType};
pub use challenge::http01::{Http01Listener, Http01Registry, Http01Service, Http01Solver};
pub use challenge::tls_alpn01::{TlsAlpn01Listener, TlsAlpn01Solver};
pub use challenge::{ChallengeConfig, ChallengeKind, Solver};
pub use domain::{DomainError, DomainName};
pub use error::{Error, Result};
pub use inventory::CertReport;
pub use issue::{Issuance, IssueRequest, issue_and_store};
pub use manager::{Event, ManagedCert, Manager};
pub use metrics::{Metrics, MetricsListener};
pub use on_demand::{OnDemand, OnDemandConfig};
pub use renewal::RenewalPolicy;
pub use resolver::CertResolver;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{CertMeta, FileStore, RenewalState, Store, StoredCert};
#[cfg(feature = "terminator")]
pub use terminator::{Terminator, TerminatorConfig};
#[cfg(feature = "watch")]
pub use watch::{CertDirWatcher, WatchEvent, WatchOptions};
