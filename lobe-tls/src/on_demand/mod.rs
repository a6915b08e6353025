//! On-demand TLS, guarded: a certificate is issued during the first handshake for a name
//! that nothing serves yet, if the name passes the guard.
//!
//! ```no_run
//! use lobe_tls::on_demand::{OnDemand, OnDemandConfig};
//! # async fn run(manager: lobe_tls::Manager) -> lobe_tls::Result<()> {
//! let mut config = OnDemandConfig::default();
//! config.ask = Some("http://127.0.0.1:8080/allowed".into()); // 2xx: issue
//! let on_demand = OnDemand::new(manager, config)?;
//! // In the accept loop, between the ClientHello and the handshake
//! // (tokio_rustls::LazyConfigAcceptor):
//! //     on_demand.before_handshake(&start.client_hello()).await?;
//! //     start.into_stream(server_config).await
//! # Ok(())
//! # }
//! ```
//!
//! What happens for a name the resolver does not cover:
//! 1. The SNI must be a valid DNS name (IP addresses, wildcards and junk are refused
//!    without asking anyone).
//! 2. With allow-list patterns, it must match one; a refusal of the last minute is
//!    repeated without asking again.
//! 3. One flight per name: concurrent handshakes for it wait on the same attempt, and
//!    across instances sharing a store, the store lock lets one order while the others
//!    load what it stored (see [`Manager::renew_now`]).
//! 4. The per-name and global rate limits are taken; then, with an ask URL,
//!    `URL?domain=NAME` must answer 2xx.
//! 5. The certificate is added to the manager's set (renewed like the others from then
//!    on) and ordered; the handshake waits up to [`OnDemandConfig::issue_timeout`], then
//!    proceeds with whatever the resolver has, and the order carries on in the background.
//!
//! Without an ask URL and without an allow-list, [`OnDemand::new`] refuses: anyone
//! pointing a name at the server could otherwise make it order certificates.
//!
//! Build the manager with [`ManagerBuilder::manage_stored`] so that certificates issued
//! on demand are renewed after a restart too, and with
//! [`ManagerBuilder::tls_alpn01_on_resolver`] for the default challenge. Where port 443
//! does not reach the server (a CDN or a TLS-terminating balancer in front), set
//! [`OnDemandConfig::challenge`] to HTTP-01 through the manager's
//! [`ManagerBuilder::http01`] registry, with TLS-ALPN-01 among its
//! [`fallbacks`](crate::challenge::ChallengeConfig::fallbacks) if port 443 may reach it too.
//!
//! [`ManagerBuilder::manage_stored`]: crate::manager::ManagerBuilder::manage_stored
//! [`ManagerBuilder::tls_alpn01_on_resolver`]: crate::manager::ManagerBuilder::tls_alpn01_on_resolver
//! [`ManagerBuilder::http01`]: crate::manager::ManagerBuilder::http01

mod ask;
mod guard;

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use rustls::server::ClientHello;

use crate::cert::KeyType;
use crate::challenge::ChallengeConfig;
use crate::domain::{DomainError, DomainName};
use crate::error::{Error, Result};
use crate::manager::{ManagedCert, Manager};
use crate::resolver::ACME_TLS_ALPN;

use ask::Ask;
use guard::{Limits, Pattern, Refusals};

/// How on-demand issuance is guarded and bounded.
#[derive(Clone)]
#[non_exhaustive]
pub struct OnDemandConfig {
    /// The ask endpoint: `GET URL?domain=NAME` must answer 2xx before a name is issued.
    pub ask: Option<String>,
    /// Allow-list patterns: `example.com`, or `*.example.com` for one label under it. A
    /// name outside every pattern is refused without asking. With an ask URL too, a name
    /// must pass both.
    pub allow: Vec<String>,
    /// How long the ask endpoint may take (default 5 s).
    pub ask_timeout: Duration,
    /// How long a handshake waits for its certificate to be issued (default 20 s).
    pub issue_timeout: Duration,
    /// How long a refused name stays refused without asking again (default 60 s).
    pub refusal_ttl: Duration,
    /// How many refused names are remembered at most (default 10,000).
    pub refusal_capacity: usize,
    /// New names (asks and orders) allowed per minute in all (default 20).
    pub global_per_minute: NonZeroU32,
    /// Attempts allowed per hour for one name (default 3).
    pub per_name_per_hour: NonZeroU32,
    /// How many names may be in flight at once (default 64); more are refused.
    pub max_pending: usize,
    /// How new certificates are validated. `None` (the default): TLS-ALPN-01 on the
    /// resolver, that is on the port the handshakes arrive at; `serve` chooses for
    /// itself (HTTP-01 on its HTTP listener first, TLS-ALPN-01 after it). A
    /// configuration with [`ChallengeConfig::fallbacks`] tries its kinds in order.
    pub challenge: Option<ChallengeConfig>,
    /// The key type of new certificates.
    pub key_type: KeyType,
}

impl std::fmt::Debug for OnDemandConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ask URL may carry a token: only whether there is one.
        f.debug_struct("OnDemandConfig")
            .field("ask", &self.ask.as_ref().map(|_| "<set>"))
            .field("allow", &self.allow)
            .field("ask_timeout", &self.ask_timeout)
            .field("issue_timeout", &self.issue_timeout)
            .field("refusal_ttl", &self.refusal_ttl)
            .field("global_per_minute", &self.global_per_minute)
            .field("per_name_per_hour", &self.per_name_per_hour)
            .field("max_pending", &self.max_pending)
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl Default for OnDemandConfig {
    fn default() -> Self {
        OnDemandConfig {
            ask: None,
            allow: Vec::new(),
            ask_timeout: Duration::from_secs(5),
            issue_timeout: Duration::from_secs(20),
            refusal_ttl: Duration::from_secs(60),
            refusal_capacity: 10_000,
            global_per_minute: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            per_name_per_hour: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            max_pending: 64,
            challenge: None,
            key_type: KeyType::default(),
        }
    }
}

/// Why a handshake got no on-demand certificate. Each message is one line.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OnDemandError {
    /// The SNI is not a DNS name a certificate can be ordered for.
    #[error("on-demand: refused {name:?}: {source}")]
    InvalidName {
        /// The name as the client sent it (cut to 64 characters).
        name: String,
        /// What is wrong with it.
        source: DomainError,
    },
    /// The guard refused the name (allow-list, ask endpoint, or a recent refusal).
    #[error("on-demand: {name} is not allowed: {why}")]
    NotAllowed {
        /// The name.
        name: String,
        /// Why.
        why: String,
    },
    /// A rate limit or the bound on names in flight refused the name for now.
    #[error("on-demand: {name} refused for now: the {limit} limit is reached")]
    Limited {
        /// The name.
        name: String,
        /// Which limit.
        limit: &'static str,
    },
    /// Asking or ordering failed.
    #[error("on-demand: cannot issue {name}: {source}")]
    Failed {
        /// The name.
        name: String,
        /// What failed.
        source: Arc<Error>,
    },
    /// The certificate was not issued within the handshake's wait; the order goes on.
    #[error("on-demand: {name} was not issued within {waited:?}; the order continues")]
    Timeout {
        /// The name.
        name: String,
        /// How long the handshake waited.
        waited: Duration,
    },
}

/// How long a validation handshake may wait for the store to hand over a challenge.
const CHALLENGE_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

type Flight = Shared<BoxFuture<'static, Result<(), OnDemandError>>>;

/// On-demand issuance over a [`Manager`]; cheap to clone.
#[derive(Clone)]
pub struct OnDemand {
    inner: Arc<Inner>,
}

struct Inner {
    manager: Manager,
    config: OnDemandConfig,
    ask: Option<Ask>,
    allow: Vec<Pattern>,
    limits: Limits,
    refusals: Refusals,
    flights: Mutex<HashMap<String, Flight>>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("ask", &self.inner.ask)
            .field("allow", &self.inner.allow)
            .finish_non_exhaustive()
    }
}

impl OnDemand {
    /// Checks `config` and sets up on-demand issuance into `manager`'s set and resolver.
    /// Refuses a configuration with neither an ask URL nor an allow-list.
    pub fn new(manager: Manager, config: OnDemandConfig) -> Result<Self> {
        if config.ask.is_none() && config.allow.is_empty() {
            return Err(Error::config(
                "on-demand TLS needs a guard: give an ask URL (--on-demand-ask URL) or allow-list patterns (--on-demand-allow '*.example.com'), or anyone could make this server order certificates",
            ));
        }
        let ask = config
            .ask
            .as_deref()
            .map(|url| Ask::new(url, config.ask_timeout))
            .transpose()?;
        let allow = config
            .allow
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(OnDemand {
            inner: Arc::new(Inner {
                limits: Limits::new(config.global_per_minute, config.per_name_per_hour),
                refusals: Refusals::new(config.refusal_ttl, config.refusal_capacity),
                manager,
                ask,
                allow,
                flights: Mutex::default(),
                config,
            }),
        })
    }

    /// The hook of an accept loop, between reading the ClientHello and the handshake
    /// (tokio-rustls `LazyConfigAcceptor`): makes sure the name the client asks for has a
    /// certificate, issuing it when the guard allows. TLS-ALPN-01 validations (the CA
    /// offering only `acme-tls/1`), handshakes without SNI and names already served pass
    /// at once. An error means: refuse the handshake.
    ///
    /// A validation handshake for a challenge that a peer sharing the store published
    /// a moment ago (its announcement not yet followed here) picks the challenge up from
    /// the store first, so that whichever instance the CA reaches can answer it.
    ///
    /// The future owns what it needs, so the ClientHello can be dropped meanwhile.
    pub fn before_handshake(
        &self,
        hello: &ClientHello<'_>,
    ) -> impl Future<Output = Result<(), OnDemandError>> + Send + 'static {
        let mut alpn = hello.alpn().into_iter().flatten();
        let acme_only = matches!((alpn.next(), alpn.next()), (Some(ACME_TLS_ALPN), None));
        // A name served already (nearly every handshake) costs one lookup and nothing else:
        // no parsing, no allocation.
        let served = |name: &str| !acme_only && self.inner.manager.resolver().covers(name);
        let name = hello
            .server_name()
            .filter(|name| !served(name))
            .map(str::to_owned);
        let this = self.clone();
        async move {
            match name {
                Some(name) if acme_only => {
                    this.fetch_challenge(&name).await;
                    Ok(())
                }
                Some(name) => this.ensure(&name).await,
                None => Ok(()),
            }
        }
    }

    /// Installs the TLS-ALPN-01 challenge a peer published for `name`, when this
    /// instance has none yet and the store is shared. Bounded; failures only cost the
    /// validation handshake (the CA retries or the order fails and is retried).
    async fn fetch_challenge(&self, name: &str) {
        let manager = &self.inner.manager;
        let Some(challenges) = manager.store().as_challenge_store() else {
            return;
        };
        if manager.resolver().has_challenge(name) || DomainName::parse(name).is_err() {
            return;
        }
        let key = crate::challenge::tls_alpn01::store_key(name);
        let fetched =
            tokio::time::timeout(CHALLENGE_FETCH_TIMEOUT, challenges.get_challenge(&key)).await;
        let cert = match fetched {
            Ok(Ok(Some(value))) => {
                crate::challenge::tls_alpn01::ChallengeCert::from_store_value(&value)
                    .and_then(|cert| cert.certified_key())
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::timeout(format!(
                "reading the shared TLS-ALPN-01 challenge for {name}"
            ))),
        };
        match cert {
            Ok(key) => manager.resolver().set_challenge(name, key),
            Err(e) => {
                tracing::debug!(domain = name, error = %e, "cannot pick up a shared TLS-ALPN-01 challenge")
            }
        }
    }

    /// Makes sure `name` has a certificate: `Ok` when the resolver covers it already or
    /// once it is issued; otherwise why not. Waits at most the issue timeout.
    pub async fn ensure(&self, name: &str) -> Result<(), OnDemandError> {
        let inner = &self.inner;
        let domain = DomainName::parse(name).map_err(|source| OnDemandError::InvalidName {
            name: name.chars().take(64).collect(),
            source,
        })?;
        let name = domain.as_str().to_owned();
        if inner.manager.resolver().covers(&name) {
            return Ok(());
        }
        if domain.is_wildcard() {
            return Err(OnDemandError::NotAllowed {
                name,
                why: "a wildcard is never issued on demand".into(),
            });
        }
        if domain.ip().is_some() {
            return Err(OnDemandError::NotAllowed {
                name,
                why: "an IP address is never issued on demand".into(),
            });
        }
        if !inner.allow.is_empty() && !inner.allow.iter().any(|p| p.matches(&name)) {
            return Err(OnDemandError::NotAllowed {
                name,
                why: "it matches no allow-list pattern".into(),
            });
        }
        if let Some(why) = inner.refusals.get(&name) {
            return Err(OnDemandError::NotAllowed { name, why });
        }
        let flight = self.flight(&name, domain)?;
        let waited = inner.config.issue_timeout;
        match tokio::time::timeout(waited, flight).await {
            Ok(result) => result,
            Err(_) => Err(OnDemandError::Timeout { name, waited }),
        }
    }

    /// The flight for `name`: the one under way, or a new one.
    fn flight(&self, name: &str, domain: DomainName) -> Result<Flight, OnDemandError> {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(name) {
            return Ok(flight.clone());
        }
        if flights.len() >= self.inner.config.max_pending {
            return Err(OnDemandError::Limited {
                name: name.to_owned(),
                limit: "pending names",
            });
        }
        // A task of its own: the order goes on when every waiting handshake gave up.
        let this = self.clone();
        let owned = name.to_owned();
        let task = tokio::spawn(async move {
            let result = this.issue(domain).await;
            this.inner
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&owned);
            result
        });
        let failed = name.to_owned();
        let flight: Flight = async move {
            task.await.unwrap_or_else(|e| {
                Err(OnDemandError::Failed {
                    name: failed,
                    source: Arc::new(Error::config(format!("the order task failed: {e}"))),
                })
            })
        }
        .boxed()
        .shared();
        flights.insert(name.to_owned(), flight.clone());
        Ok(flight)
    }

    /// One attempt: limits, the ask endpoint, the order.
    async fn issue(&self, domain: DomainName) -> Result<(), OnDemandError> {
        let inner = &self.inner;
        let name = domain.as_str().to_owned();
        // Another flight may have finished between the caller's look and this one.
        if inner.manager.resolver().covers(&name) {
            return Ok(());
        }
        inner
            .limits
            .check(&name)
            .map_err(|limit| OnDemandError::Limited {
                name: name.clone(),
                limit,
            })?;
        if let Some(ask) = &inner.ask {
            match ask.allows(&name).await {
                Ok(ask::Verdict::Allowed) => {}
                Ok(ask::Verdict::Refused(why)) => {
                    tracing::info!(domain = %name, why, "on-demand: refused by the ask endpoint");
                    inner.refusals.insert(&name, why.clone());
                    return Err(OnDemandError::NotAllowed { name, why });
                }
                Err(e) => {
                    tracing::warn!(domain = %name, error = %e, "on-demand: cannot ask; refusing");
                    inner.refusals.insert(&name, e.to_string());
                    return Err(OnDemandError::Failed {
                        name,
                        source: Arc::new(e),
                    });
                }
            }
        }
        let store_name = crate::domain::store_name(std::slice::from_ref(&domain));
        let challenge =
            (inner.config.challenge.clone()).unwrap_or_else(|| ChallengeConfig::tls_alpn01(None));
        let cert = ManagedCert::new(store_name.clone(), vec![domain])
            .with_key_type(inner.config.key_type)
            .with_challenge(challenge);
        let fail = |e: Error| {
            inner.refusals.insert(&name, e.to_string());
            OnDemandError::Failed {
                name: name.clone(),
                source: Arc::new(e),
            }
        };
        inner.manager.add(cert).map_err(fail)?;
        tracing::info!(domain = %name, "on-demand: issuing");
        // Not a renewal: the manager's start may have ordered it meanwhile.
        inner
            .manager
            .obtain_missing(&store_name)
            .await
            .map_err(fail)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(dir: &tempfile::TempDir) -> Manager {
        let store = Arc::new(crate::FileStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
        Manager::builder(crate::AcmeConfig::new("http://127.0.0.1:9/dir"), store)
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn refuses_to_start_unguarded_and_refuses_junk_and_unlisted_names() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let err = OnDemand::new(manager(&dir), OnDemandConfig::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("needs a guard"), "{err}");
        let secret = OnDemandConfig {
            ask: Some("https://h.example/ask?token=hunter2".into()),
            ..OnDemandConfig::default()
        };
        assert!(!format!("{secret:?}").contains("hunter2"));

        let config = OnDemandConfig {
            allow: vec!["*.example.com".into()],
            ..OnDemandConfig::default()
        };
        let on_demand = OnDemand::new(manager(&dir), config).unwrap_or_else(|e| panic!("{e}"));
        for junk in [
            "127.0.0.1",
            "::1",
            "a..b",
            "-x.example.com",
            "",
            "*.example.com",
        ] {
            let refused = on_demand.ensure(junk).await;
            assert!(refused.is_err(), "{junk}: {refused:?}");
        }
        let refused = on_demand.ensure("shop.example.net").await;
        assert!(
            matches!(refused, Err(OnDemandError::NotAllowed { .. })),
            "{refused:?}"
        );
    }
}
