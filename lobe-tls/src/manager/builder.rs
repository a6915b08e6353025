//! Configuring a manager: the certificates it keeps and its tunables.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, broadcast};

use crate::acme::AcmeConfig;
use crate::cert::KeyType;
use crate::challenge::http01::Http01Registry;
use crate::challenge::standalone::Standalone;
use crate::challenge::{ChallengeConfig, ChallengeKind};
use crate::domain::DomainName;
use crate::error::{Error, Result};
use crate::renewal::RenewalPolicy;
use crate::resolver::CertResolver;
use crate::store::{CertMeta, DynStore};

use super::*;

/// A certificate the manager keeps issued and renewed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ManagedCert {
    /// The name in the store (`live/<name>/`).
    pub name: String,
    /// The names the certificate covers; the first is its main name.
    pub domains: Vec<DomainName>,
    /// The key type of new certificates.
    pub key_type: KeyType,
    /// How to validate the names.
    pub challenge: ChallengeConfig,
    /// The ACME profile to order under (see [`crate::issue::IssueRequest::profile`]).
    pub profile: Option<String>,
}

impl ManagedCert {
    /// A certificate for `domains` stored as `name`, with an ECDSA P-256 key, validated
    /// through HTTP-01.
    pub fn new(name: impl Into<String>, domains: Vec<DomainName>) -> Self {
        ManagedCert {
            name: name.into(),
            domains,
            key_type: KeyType::default(),
            challenge: ChallengeConfig::default(),
            profile: None,
        }
    }

    /// Orders under the ACME profile `profile` (`None`: the CA's default).
    pub fn with_profile(mut self, profile: Option<String>) -> Self {
        self.profile = profile;
        self
    }

    /// Uses `key_type` for new keys.
    pub fn with_key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// Validates through `challenge`.
    pub fn with_challenge(mut self, challenge: ChallengeConfig) -> Self {
        self.challenge = challenge;
        self
    }

    /// Repeats the order a stored certificate came from.
    pub fn from_meta(meta: &CertMeta) -> Self {
        ManagedCert {
            name: meta.name.clone(),
            domains: meta.domains.clone(),
            key_type: meta.key_type,
            challenge: meta.challenge.clone(),
            profile: meta.profile.clone(),
        }
    }

    pub(super) fn same_order_as(&self, meta: &CertMeta) -> bool {
        same_names(&self.domains, &meta.domains)
            && self.key_type == meta.key_type
            && self.profile == meta.profile
    }
}

/// Whether two lists hold the same names, in any order.
pub(super) fn same_names(a: &[DomainName], b: &[DomainName]) -> bool {
    let mut a: Vec<&str> = a.iter().map(DomainName::as_str).collect();
    let mut b: Vec<&str> = b.iter().map(DomainName::as_str).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Builds a [`Manager`].
#[derive(Debug)]
pub struct ManagerBuilder {
    acme: AcmeConfig,
    store: DynStore,
    resolver: CertResolver,
    http01: Option<Http01Registry>,
    certs: Vec<ManagedCert>,
    profile: Option<String>,
    policy: RenewalPolicy,
    manage_stored: bool,
    tls_alpn01_on_resolver: bool,
    check_interval: Duration,
    max_orders: usize,
    event_capacity: usize,
}

impl ManagerBuilder {
    /// Serves certificates through `resolver` (by default a new one).
    pub fn resolver(mut self, resolver: CertResolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// Answers HTTP-01 through `registry`, which the application mounts on port 80.
    /// Without it, HTTP-01 orders bind a standalone listener on the certificate's
    /// `http_listen` address (default `0.0.0.0:80`) while they run; with a shared store
    /// (Redis) that listener's tokens are also published there, so any instance sharing
    /// the store answers the CA, wherever the load balancer sends it.
    pub fn http01(mut self, registry: Http01Registry) -> Self {
        self.http01 = Some(registry);
        self
    }

    /// Keeps `cert` issued and renewed. Repeatable.
    pub fn cert(mut self, cert: ManagedCert) -> Self {
        self.certs.push(cert);
        self
    }

    /// Orders every certificate given to [`ManagerBuilder::cert`] without a profile of its
    /// own under the ACME profile `profile`. Stored certificates keep the profile they
    /// were ordered under.
    pub fn profile(mut self, profile: Option<String>) -> Self {
        self.profile = profile;
        self
    }

    /// Also renews stored certificates that were not configured with
    /// [`ManagerBuilder::cert`], repeating the order each came from, including those
    /// that can no longer be served (expired while nothing ran): [`Manager::start`]
    /// orders them again. Off by default: such certificates are served but left alone.
    pub fn manage_stored(mut self, yes: bool) -> Self {
        self.manage_stored = yes;
        self
    }

    /// Answers TLS-ALPN-01 through this manager's resolver for every certificate, also a
    /// stored one whose settings name a standalone listener (`lobe-tls issue
    /// --tls-listen`). For a proxy that owns port 443 and hands the resolver to rustls:
    /// a standalone listener there could not bind.
    pub fn tls_alpn01_on_resolver(mut self, yes: bool) -> Self {
        self.tls_alpn01_on_resolver = yes;
        self
    }

    /// When to renew and how to retry.
    pub fn policy(mut self, policy: RenewalPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How often the maintenance loop looks at every certificate (default 60 s). It also
    /// wakes when a renewal falls due before the next look.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// How many orders may run at once (default 4).
    pub fn max_concurrent_orders(mut self, n: usize) -> Self {
        self.max_orders = n.max(1);
        self
    }

    /// The event channel's capacity (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n.max(1);
        self
    }

    /// Checks the configuration and builds the manager. Nothing is loaded or ordered
    /// until [`Manager::start`].
    pub fn build(self) -> Result<Manager> {
        let mut slots = HashMap::new();
        for mut cert in self.certs {
            if cert.profile.is_none() {
                cert.profile = self.profile.clone();
            }
            check_cert(&cert)?;
            let name = cert.name.clone();
            if slots.insert(name.clone(), Slot::managed(cert)).is_some() {
                return Err(Error::config(format!(
                    "certificate {name:?} is configured twice"
                )));
            }
        }
        let (events, _) = broadcast::channel(self.event_capacity);
        Ok(Manager {
            inner: Arc::new(Inner {
                chain: crate::acme::CaChain::new(&self.acme),
                acme: self.acme,
                store: self.store,
                resolver: self.resolver,
                http01: self.http01,
                policy: self.policy,
                manage_stored: self.manage_stored,
                tls_alpn01_on_resolver: self.tls_alpn01_on_resolver,
                check_interval: self.check_interval,
                events,
                wake: Notify::new(),
                started: OffsetDateTime::now_utc(),
                slots: Mutex::new(slots),
                name_locks: Default::default(),
                orders: Semaphore::new(self.max_orders),
                ari_polls: Semaphore::new(ARI_CONCURRENCY),
                standalone: Standalone::default(),
                initial_load: Default::default(),
            }),
        })
    }
}

impl Manager {
    /// Adds `cert` to the managed set while the manager runs (on-demand issuance does):
    /// it is renewed like a configured certificate from then on. Nothing is ordered
    /// here; call [`Manager::renew_now`] to issue it at once. Returns `false` when a
    /// certificate of that name is already managed (it is left as it is).
    pub fn add(&self, cert: ManagedCert) -> Result<bool> {
        check_cert(&cert)?;
        let added = {
            let mut slots = self.inner.slots();
            let slot = slots
                .entry(cert.name.clone())
                .or_insert_with(|| Slot::new(None));
            if slot.managed.is_some() {
                false
            } else {
                slot.managed = Some(cert);
                true
            }
        };
        if added {
            self.wake();
        }
        Ok(added)
    }
}

/// What a certificate needs before it can be managed.
fn check_cert(cert: &ManagedCert) -> Result<()> {
    if let Some(profile) = &cert.profile {
        crate::issue::check_profile_name(profile)?;
    }
    if cert.domains.is_empty() {
        return Err(Error::config(format!(
            "certificate {:?} has no domains",
            cert.name
        )));
    }
    if cert.challenge.kind == ChallengeKind::Dns01 && cert.challenge.dns.is_none() {
        return Err(Error::config(format!(
            "certificate {:?} uses dns-01 but names no DNS provider",
            cert.name
        )));
    }
    Ok(())
}

impl Manager {
    /// Starts configuring a manager that orders from `acme` and keeps certificates in `store`.
    pub fn builder(acme: AcmeConfig, store: DynStore) -> ManagerBuilder {
        ManagerBuilder {
            acme,
            store,
            resolver: CertResolver::new(),
            http01: None,
            certs: Vec::new(),
            profile: None,
            policy: RenewalPolicy::default(),
            manage_stored: false,
            tls_alpn01_on_resolver: false,
            check_interval: DEFAULT_CHECK_INTERVAL,
            max_orders: DEFAULT_MAX_ORDERS,
            event_capacity: DEFAULT_EVENT_CAPACITY,
        }
    }
}
