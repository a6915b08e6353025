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
//!
//! # Features
//!
//! All on by default. With none (`default-features = false`), the crate is the resolver,
//! the manager, the file store and the ACME client, and runs no HTTP server of its own:
//! HTTP-01 is answered by [`Http01Service`] mounted in the application's server, or
//! through a webroot.
//!
//! - `redis`: the Redis store (`RedisStore`), for clusters.
//! - `dns-providers`: the `rfc2136`, `cloudflare` and `httpreq` DNS-01 providers.
//! - `watch`: the certificate directory watcher, and the file store's change feed.
//! - `metrics`: prometheus-client counters (`Metrics`) and their HTTP listener.
//! - `on-demand`: issuance during a handshake (`OnDemand`), with its rate limits.
//! - `http01-listener`: the standalone port-80 listener (`Http01Listener`) the manager
//!   opens while an HTTP-01 order runs; implies `metrics`.
//! - `edge`: the L7/L4 edge behind `lobe-tls serve`; implies `metrics` and `on-demand`.
//! - `server`: all of `lobe-tls serve` as one call ([`server::Server`]): the edge, port
//!   80, the manager, certificate directories; implies `edge`, `http01-listener` and
//!   `watch`.

pub mod acme;
pub mod cert;
pub mod challenge;
pub mod client_key;
pub mod cluster;
#[cfg(any(feature = "edge", feature = "http01-listener"))]
pub mod conn_limits;
pub mod domain;
#[cfg(feature = "edge")]
pub mod edge;
pub mod error;
pub mod import;
pub mod inventory;
pub mod issue;
mod listen;
pub mod manager;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod net;
#[cfg(feature = "on-demand")]
pub mod on_demand;
#[cfg(feature = "on-demand")]
mod rate_table;
pub mod renewal;
pub mod resolver;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
pub mod tickets;
pub mod tls_config;
#[cfg(feature = "watch")]
pub mod watch;

pub use acme::{AcmeClient, AcmeConfig, Eab, OrderRequest};
pub use cert::{CertBundle, CertInfo, KeyType};
#[cfg(feature = "http01-listener")]
pub use challenge::http01::Http01Listener;
pub use challenge::http01::{Http01Registry, Http01Service, Http01Solver};
pub use challenge::tls_alpn01::{TlsAlpn01Listener, TlsAlpn01Solver};
pub use challenge::{ChallengeConfig, ChallengeKind, Solver};
pub use domain::{DomainError, DomainName};
pub use error::{
    BoxError, CertificateErrorKind, ChallengeErrorKind, DnsErrorKind, Error, Result, StoreErrorKind,
};
pub use inventory::CertReport;
pub use issue::{Issuance, IssueRequest, issue_and_store};
pub use manager::{Event, ManagedCert, Manager};
#[cfg(feature = "metrics")]
pub use metrics::{Metrics, MetricsListener};
#[cfg(feature = "on-demand")]
pub use on_demand::{OnDemand, OnDemandConfig};
pub use renewal::RenewalPolicy;
pub use resolver::CertResolver;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{CertMeta, FileStore, RenewalState, Store, StoredCert};
#[cfg(feature = "watch")]
pub use watch::{CertDirWatcher, WatchEvent, WatchOptions};
