//! Cluster mode: keeps one instance in step with the others that share a store (Redis).
//! The same follower keeps a manager on a file store in step with the other processes on
//! the machine (`lobe-tls issue`, a cron `renew`, `revoke`), through the file store's
//! directory watch.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lobe_tls::cluster::Cluster;
//! use lobe_tls::manager::{ManagedCert, Manager};
//! use lobe_tls::store::DynStore;
//! use lobe_tls::{AcmeConfig, Http01Registry, RedisStore, domain};
//!
//! # async fn run() -> lobe_tls::Result<()> {
//! let store: DynStore = Arc::new(RedisStore::connect("redis://10.0.0.5:6379/").await?);
//! // Any instance answers HTTP-01: local tokens first, then the ones in Redis.
//! let http01 = Http01Registry::with_shared_store(store.clone())?; // mount on port 80
//! let manager = Manager::builder(AcmeConfig::new(lobe_tls::acme::LETSENCRYPT), store)
//!     .http01(http01)
//!     .cert(ManagedCert::new("chat", domain::parse_all(&["chat.example.com"])?))
//!     .build()?;
//! let _cluster = Cluster::builder(manager.clone()).start()?; // before start: miss nothing
//! manager.start().await?;
//! let _maintenance = manager.spawn();
//! // Hand `manager.resolver()` to rustls as usual.
//! # Ok(())
//! # }
//! ```
//!
//! - One order per renewal: the manager orders under the store's per-name lock (a Redis
//!   lease, renewed while the order runs) and re-reads the store after taking it, so an
//!   instance that waited picks up the certificate instead of ordering again.
//! - A certificate another instance saved is swapped in here within a second, through
//!   the store's change feed ([`Manager::reload`]); a periodic re-sync catches
//!   announcements lost while the store was unreachable. It compares each stored
//!   certificate's serial and renewal state with what the manager holds before it parses
//!   anything ([`resync_certs`]), so at 10,000 certificates it parses only what changed.
//! - TLS-ALPN-01 challenges another instance started are answered here too: their
//!   material is copied from the store into the local resolver as it is announced, so
//!   a handshake never waits on the store.
//! - HTTP-01 needs no glue beyond [`Http01Registry::with_shared_store`].
//! - While the store is unreachable, every instance keeps serving what it holds, logs the
//!   outage once, and catches up by itself when the store is back.
//!
//! [`Http01Registry::with_shared_store`]: crate::challenge::http01::Http01Registry::with_shared_store

use std::collections::HashSet;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::challenge::tls_alpn01::ChallengeCert;
use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::store::{StoreEvent, StoreSubscription};

/// What one [`resync_certs`] pass did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Resync {
    /// Stored certificates compared with what the manager holds.
    pub checked: usize,
    /// Those read in full (key parsed), because the stored serial or renewal state
    /// differed from the manager's, or the store could not tell them cheaply.
    pub reloaded: usize,
    /// Of those, the ones swapped in: another certificate than the one served.
    pub replaced: usize,
    /// Certificates that could not be read; the one served stays.
    pub failed: Vec<(String, Error)>,
}

/// Brings `manager` in step with its store once, as a [`Cluster`] does every re-sync
/// interval: lists the stored certificates, reads each one's serial and renewal state
/// without parsing any key ([`Store::load_cert_versions`]), and reloads
/// ([`Manager::reload`]) only those that differ from what the manager holds
/// ([`Manager::served_version`]).
///
/// Errors when the store cannot be listed or read; failures of single certificates are
/// in the report.
///
/// [`Store::load_cert_versions`]: crate::store::Store::load_cert_versions
pub async fn resync_certs(manager: &Manager) -> Result<Resync> {
    let store = manager.store().clone();
    let names = store.list_certs().await?;
    let versions = store.load_cert_versions(&names).await?;
    let mut report = Resync {
        checked: names.len(),
        ..Resync::default()
    };
    let versions = versions.into_iter().chain(std::iter::repeat(None));
    for (name, stored) in names.iter().zip(versions) {
        if stored.is_some() && stored == manager.served_version(name) {
            continue;
        }
        report.reloaded += 1;
        match manager.reload(name).await {
            Ok(true) => report.replaced += 1,
            Ok(false) => {}
            Err(e) => report.failed.push((name.clone(), e)),
        }
    }
    Ok(report)
}

/// The store key prefix of shared TLS-ALPN-01 material: `tls-alpn-01/<domain>`.
pub const TLS_ALPN01_PREFIX: &str = "tls-alpn-01/";

/// How often every stored certificate is re-read, in case an announcement was lost.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Builds a [`Cluster`].
#[derive(Debug)]
pub struct ClusterBuilder {
    manager: Manager,
    resync_interval: Duration,
}

impl ClusterBuilder {
    /// How often to re-read everything as a fallback for lost announcements
    /// (default [`DEFAULT_RESYNC_INTERVAL`]). Each re-sync reads every stored
    /// certificate's serial and renewal state, and reads in full only those that differ
    /// from what the manager holds (see [`resync_certs`]).
    pub fn resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// Starts following the manager's store. Must be called inside a tokio runtime.
    ///
    /// Refused when the store has no change feed ([`FeedStore`]) to follow, or no locks
    /// ([`LockStore`]): without them, the instances would each order every renewal.
    ///
    /// [`FeedStore`]: crate::store::FeedStore
    /// [`LockStore`]: crate::store::LockStore
    pub fn start(self) -> Result<Cluster> {
        let store = self.manager.store();
        store.locks_for("following the store (one order per renewal across processes)")?;
        let subscription = store
            .feed_for("following the store")
            .and_then(|feed| feed.subscribe())?;
        let follower = Follower {
            manager: self.manager,
            installed_challenges: HashSet::new(),
            failing: false,
        };
        let task = tokio::spawn(follower.run(subscription, self.resync_interval));
        Ok(Cluster { task })
    }
}

/// A running cluster follower. Dropping it stops following the store.
#[derive(Debug)]
pub struct Cluster {
    task: JoinHandle<()>,
}

impl Cluster {
    /// Starts building a follower that keeps `manager` in step with its shared store.
    pub fn builder(manager: Manager) -> ClusterBuilder {
        ClusterBuilder {
            manager,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Follower {
    manager: Manager,
    /// TLS-ALPN-01 names whose challenge certificate came from the store.
    installed_challenges: HashSet<String>,
    /// Whether the last store access failed, so an outage is logged once.
    failing: bool,
}

impl Follower {
    async fn run(mut self, mut subscription: StoreSubscription, every: Duration) {
        let mut resync = tokio::time::interval(every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            tokio::select! {
                event = subscription.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return,
                },
                _ = resync.tick() => self.resync().await,
            }
        }
    }

    async fn handle(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::CertSaved(name) => self.reload(&name).await,
            StoreEvent::ChallengePut(key) => {
                if let Some(domain) = key.strip_prefix(TLS_ALPN01_PREFIX) {
                    self.install_challenge(domain).await;
                }
            }
            StoreEvent::ChallengeDeleted(key) => {
                if let Some(domain) = key.strip_prefix(TLS_ALPN01_PREFIX) {
                    self.remove_challenge(domain);
                }
            }
            StoreEvent::Resync => self.resync().await,
            // The re-sync that follows the reconnection catches up.
            StoreEvent::FeedLost => {}
        }
    }

    async fn reload(&mut self, name: &str) {
        // On failure the certificate served so far stays.
        let result = self.manager.reload(name).await;
        self.note(result, name);
    }

    /// Re-reads what changed among the stored certificates, and the set of shared
    /// TLS-ALPN-01 challenges.
    async fn resync(&mut self) {
        let store = self.manager.store().clone();
        let synced = resync_certs(&self.manager).await;
        let Some(report) = self.note(synced, "certificates") else {
            return;
        };
        tracing::debug!(
            checked = report.checked,
            reloaded = report.reloaded,
            replaced = report.replaced,
            "re-synced with the store"
        );
        for (name, error) in report.failed {
            self.note::<()>(Err(error), &name);
        }
        // A store without challenge tokens (one machine) has none to pick up.
        let Some(challenges) = store.as_challenge_store() else {
            return;
        };
        let listed = challenges.list_challenges(TLS_ALPN01_PREFIX).await;
        let Some(keys) = self.note(listed, "shared challenges") else {
            return;
        };
        let current: HashSet<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(TLS_ALPN01_PREFIX))
            .map(str::to_owned)
            .collect();
        let gone: Vec<String> = self
            .installed_challenges
            .difference(&current)
            .cloned()
            .collect();
        for domain in gone {
            self.remove_challenge(&domain);
        }
        for domain in current {
            self.install_challenge(&domain).await;
        }
    }

    async fn install_challenge(&mut self, domain: &str) {
        let key = format!("{TLS_ALPN01_PREFIX}{domain}");
        let store = self.manager.store().clone();
        let Some(challenges) = store.as_challenge_store() else {
            return;
        };
        let fetched = challenges.get_challenge(&key).await;
        let Some(value) = self.note(fetched, &key) else {
            return;
        };
        // Gone already: the order finished before we looked.
        let Some(value) = value else { return };
        match ChallengeCert::from_store_value(&value).and_then(|c| c.certified_key()) {
            Ok(certified) => {
                self.manager.resolver().set_challenge(domain, certified);
                self.installed_challenges.insert(domain.to_owned());
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "ignoring bad shared TLS-ALPN-01 material")
            }
        }
    }

    fn remove_challenge(&mut self, domain: &str) {
        if self.installed_challenges.remove(domain) {
            self.manager.resolver().remove_challenge(domain);
        }
    }

    /// Logs the first failure of an outage and the recovery; hands back the value.
    fn note<T>(&mut self, result: Result<T>, what: &str) -> Option<T> {
        match result {
            Ok(value) => {
                if self.failing {
                    tracing::info!("cluster store reachable again; back in step");
                    self.failing = false;
                }
                Some(value)
            }
            Err(e) => {
                if self.failing {
                    tracing::debug!(what, error = %e, "cluster store still failing");
                } else {
                    tracing::warn!(what, error = %e, "cannot follow the cluster store; serving what is loaded and retrying");
                    self.failing = true;
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::acme::AcmeConfig;
    use crate::cert::{CertBundle, KeyType};
    use crate::domain::DomainName;
    use crate::store::{CertMeta, FileStore, RenewalState, Store, StoredCert};

    fn sample(name: &str) -> StoredCert {
        let domain = format!("{name}.example.com");
        let key = KeyType::EcdsaP256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![domain.clone()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        StoredCert {
            bundle: CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap(),
            meta: CertMeta {
                name: name.into(),
                domains: vec![DomainName::parse(&domain).unwrap()],
                key_type: KeyType::EcdsaP256,
                challenge: Default::default(),
                directory: "https://ca.test/dir".into(),
                issued_at: time::OffsetDateTime::now_utc(),
                profile: None,
            },
        }
    }

    #[tokio::test]
    async fn a_resync_of_a_file_store_reads_in_full_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        for name in ["a", "b", "c"] {
            store.save_cert(&sample(name)).await.unwrap();
        }
        let manager = Manager::builder(
            AcmeConfig::new("https://acme.invalid/directory"),
            store.clone(),
        )
        .build()
        .unwrap();
        manager.start().await.unwrap();
        let quiet = resync_certs(&manager).await.unwrap();
        assert_eq!((quiet.checked, quiet.reloaded), (3, 0));

        let renewed = sample("b");
        store.save_cert(&renewed).await.unwrap();
        let state = RenewalState {
            failures: 1,
            ..RenewalState::default()
        };
        store.save_renewal_state("c", &state).await.unwrap();
        let changed = resync_certs(&manager).await.unwrap();
        assert_eq!((changed.reloaded, changed.replaced), (2, 1));
        assert_eq!(
            manager.served_version("b").unwrap().serial,
            renewed.bundle.info().unwrap().serial
        );
        assert_eq!(manager.served_version("c").unwrap().state, state);
        assert_eq!(resync_certs(&manager).await.unwrap().reloaded, 0);
    }
}
