//! The manager: what a proxy embeds. It keeps a set of certificates issued, loaded into a
//! [`CertResolver`] and renewed, and tells subscribers what happened.
//!
//! ```no_run
//! use lobe_tls::manager::{Event, ManagedCert, Manager};
//! use lobe_tls::{AcmeConfig, FileStore, Http01Registry, domain};
//! use std::sync::Arc;
//!
//! # async fn run() -> lobe_tls::Result<()> {
//! let store = Arc::new(FileStore::open("/var/lib/lobe-tls")?);
//! let http01 = Http01Registry::new(); // mount http01.service() on port 80
//! let manager = Manager::builder(AcmeConfig::new(lobe_tls::acme::LETSENCRYPT), store)
//!     .http01(http01.clone())
//!     .cert(ManagedCert::new("chat", domain::parse_all(&["chat.example.com"])?))
//!     .build()?;
//! let mut events = manager.subscribe();
//! manager.start().await?;            // load what is stored, issue what is missing
//! let _maintenance = manager.spawn(); // renew in the background
//! // Hand `manager.resolver()` to rustls: ServerConfig::with_cert_resolver(Arc::new(..)).
//! while let Ok(event) = events.recv().await {
//!     if let Event::RenewalFailed { name, error, .. } = event {
//!         eprintln!("{name}: {error}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Every order runs under the store's lock for the certificate and re-reads the store
//! after taking it: when another process (a cron `renew`, a cluster peer) renewed the
//! certificate meanwhile, the manager loads that one instead of ordering again. (A store
//! without locks, no [`LockStore`], serves one process: the manager's own per-name lock
//! is all there is, and [`Cluster`] refuses to follow such a store.) A new
//! certificate is validated (key matches, covers its names, not expired) before it is
//! stored and swapped in; a failed renewal leaves the old certificate served.
//!
//! [`LockStore`]: crate::store::LockStore
//! [`Cluster`]: crate::cluster::Cluster

mod ari;
mod builder;
mod events;
mod maintenance;
mod order;
mod slots;
mod startup;
#[cfg(test)]
mod tests;

pub use builder::{ManagedCert, ManagerBuilder};
pub use events::{CertState, Event, RenewOutcome, StartReport};
pub use maintenance::MaintenanceHandle;
pub use startup::{
    InitialLoadStatus, LOAD_TIMEOUT as ON_DEMAND_LOAD_TIMEOUT, MAX_LOADS as MAX_ON_DEMAND_LOADS,
};

use ari::ari_poll_due;
use builder::same_names;
use order::request_bound;
use slots::Slot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio::task::JoinSet;

use crate::acme::AcmeConfig;
use crate::cert::CertInfo;
use crate::challenge::http01::Http01Registry;
use crate::challenge::standalone::Standalone;
use crate::error::{Error, Result};
use crate::renewal::RenewalPolicy;
use crate::resolver::CertResolver;
use crate::store::{BatchEntry, CertMeta, DynStore, RenewalState};

/// Start-up reads stored certificates in batches of this many, `LOAD_CONCURRENCY`
/// batches at once: enough in flight for a slow disk or a remote store, and few enough
/// trips to the store that 10,000 certificates do not cost 20,000 thread hand-offs.
const LOAD_BATCH: usize = 64;
const LOAD_CONCURRENCY: usize = 32;
/// During the initial load, what is read is served at least this often, and at the
/// latest once this many certificates wait.
const SERVE_EVERY: Duration = Duration::from_millis(50);
const SERVE_BATCH: usize = 8192;
/// The default bound on orders running at once.
const DEFAULT_MAX_ORDERS: usize = 4;
/// The default interval of the maintenance loop.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// The shortest pause between two maintenance rounds, whatever is due.
const MIN_PAUSE: Duration = Duration::from_millis(100);
/// The tightest bound on one CA request, however close to expiry: less would fail
/// requests a healthy CA answers.
const MIN_REQUEST_BOUND: Duration = Duration::from_secs(1);
/// How many renewalInfo queries run at once, so that thousands of certificates do not
/// all ask the CA in the same second.
const ARI_CONCURRENCY: usize = 8;
/// The default capacity of the event channel; slower subscribers see `Lagged`.
const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Keeps certificates issued, served and renewed. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("directory", &self.inner.acme.directory)
            .field("store", &self.inner.store)
            .field("certificates", &self.inner.slots().len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    acme: AcmeConfig,
    store: DynStore,
    resolver: CertResolver,
    http01: Option<Http01Registry>,
    policy: RenewalPolicy,
    manage_stored: bool,
    tls_alpn01_on_resolver: bool,
    check_interval: Duration,
    events: broadcast::Sender<Event>,
    /// Wakes the maintenance loop: something's next due time changed.
    wake: Notify,
    /// When this manager was built. A certificate another process stored since then
    /// for a different order is a peer's newer decision, not a stale configuration.
    started: OffsetDateTime,
    /// The primary CA and its fallbacks, each connected on first use.
    chain: crate::acme::CaChain,
    slots: Mutex<HashMap<String, Slot>>,
    /// One async lock per name, so that one process never runs two orders for a name.
    name_locks: order::NameLocks,
    orders: Semaphore,
    ari_polls: Semaphore,
    standalone: Standalone,
    /// The initial load, which handshakes may overtake (see `startup`).
    initial_load: startup::InitialLoad,
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // The map stays consistent even if a holder panicked: every update is one insert.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stored certificate read and checked at start-up or on reload.
struct Loaded {
    meta: CertMeta,
    info: CertInfo,
    key: Arc<CertifiedKey>,
    state: RenewalState,
}

impl Manager {
    /// The resolver the certificates are served from; hand it to rustls.
    pub fn resolver(&self) -> &CertResolver {
        &self.inner.resolver
    }

    /// The store the manager reads and writes.
    pub fn store(&self) -> &DynStore {
        &self.inner.store
    }

    /// Subscribes to events. Subscribe before [`Manager::start`] to see the Loaded events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The state of every certificate the manager knows, sorted by name.
    pub fn certificates(&self) -> Vec<CertState> {
        let slots = self.inner.slots();
        let mut out: Vec<CertState> = slots
            .iter()
            .map(|(name, slot)| CertState {
                name: name.clone(),
                info: slot.current.as_ref().map(|c| c.info.clone()),
                due_at: match (&slot.managed, &slot.current) {
                    (Some(_), Some(c)) => Some(self.inner.policy.due_at(&c.info, &slot.state)),
                    _ => None,
                },
                failures: slot.state.failures,
                last_error: slot.state.last_error.clone(),
                ari_window: slot
                    .current
                    .as_ref()
                    .and_then(|c| slot.state.ari_window_for(&c.info)),
                profile: slot.managed.as_ref().and_then(|m| m.profile.clone()),
                next_attempt: slot.state.next_attempt.filter(|_| slot.state.failures > 0),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The names the manager knows with no certificate served, sorted: what readiness
    /// asks, without copying every certificate's state as [`Manager::certificates`] does.
    pub fn without_certificate(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .slots()
            .iter()
            .filter(|(_, slot)| slot.current.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// The names this manager is ordering now (it holds their lock, in the store too
    /// where the store has locks).
    pub fn orders_in_flight(&self) -> Vec<String> {
        self.inner.name_locks.held()
    }

    /// Feeds `metrics` from this manager: every certificate's expiry at each scrape,
    /// renewal failures and configuration conflicts as they happen. Call it before
    /// [`Manager::start`]; certificates configured or found later are counted from their
    /// first event on. The counting task ends when the manager is dropped.
    #[cfg(feature = "metrics")]
    pub fn export_metrics(&self, metrics: &Arc<crate::metrics::Metrics>) {
        for name in self.inner.slots().keys() {
            metrics.track_renewals(name);
        }
        let mut events = self.subscribe();
        let counted = metrics.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::RenewalFailed { name, .. }) => counted.renewal_failed(&name),
                    Ok(Event::ConfigConflict { name, .. }) => counted.config_conflict(&name),
                    Ok(Event::Unusable { name, .. }) => {
                        // Still managed (re-ordered when due): its failures count too.
                        counted.track_renewals(&name);
                        counted.unusable(&name);
                    }
                    Ok(Event::Loaded { name, .. } | Event::Obtained { name, .. }) => {
                        counted.track_renewals(&name)
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        // A weak handle: the metrics registry must not keep a stopped manager alive.
        let source = Arc::downgrade(&self.inner);
        metrics.add_cert_source(move || {
            let Some(inner) = source.upgrade() else {
                return Vec::new();
            };
            Manager { inner }
                .certificates()
                .into_iter()
                .filter_map(|state| {
                    let info = state.info?;
                    Some(crate::metrics::CertExpiry {
                        not_before: info.not_before.unix_timestamp(),
                        not_after: info.not_after.unix_timestamp(),
                        name: state.name,
                        source: "managed",
                        ari_window: state
                            .ari_window
                            .map(|(start, end)| (start.unix_timestamp(), end.unix_timestamp())),
                    })
                })
                .collect()
        });
    }

    fn emit(&self, event: Event) {
        // No subscribers is fine.
        let _ = self.inner.events.send(event);
    }

    /// Loads every stored certificate into the resolver, then issues the configured
    /// certificates that are missing (or whose stored order no longer matches the
    /// configuration: those are served meanwhile and re-issued by the maintenance loop).
    ///
    /// Certificates are served batch by batch as they are read; until the last one is,
    /// [`Manager::is_loading`] is true and [`Manager::load_before_handshake`] loads a
    /// name a handshake asks for ahead of its batch.
    ///
    /// Errors only when the store cannot be listed; individual failures are in the report,
    /// in events and in the log.
    pub async fn start(&self) -> Result<StartReport> {
        let loaded = self.load_stored().await;
        self.inner.initial_load.finished();
        let mut report = loaded?;
        tracing::info!(count = report.loaded, "loaded certificates from the store");

        let missing: Vec<String> = self
            .inner
            .slots()
            .iter()
            .filter(|(_, s)| s.managed.is_some() && s.current.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        let mut orders = JoinSet::new();
        for name in missing {
            let this = self.clone();
            orders.spawn(async move {
                let result = this.obtain_missing(&name).await;
                (name, result)
            });
        }
        while let Some(joined) = orders.join_next().await {
            match joined {
                Ok((name, Ok(_))) => report.obtained.push(name),
                Ok((name, Err(e))) => report.failed.push((name, e.to_string())),
                Err(e) => tracing::error!(error = %e, "an order task failed"),
            }
        }
        report.obtained.sort();
        report.failed.sort();
        Ok(report)
    }

    /// The initial load: reads every stored certificate, batches at once, and serves
    /// each batch as soon as it is checked.
    async fn load_stored(&self) -> Result<StartReport> {
        let mut report = StartReport::default();
        let names = self.inner.store.list_certs().await?;
        self.inner.initial_load.listed(&names);
        let limit = Arc::new(Semaphore::new(LOAD_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for batch in names.chunks(LOAD_BATCH) {
            let store = self.inner.store.clone();
            let limit = limit.clone();
            let batch = batch.to_vec();
            tasks.spawn(async move {
                let _permit = limit.acquire().await;
                let entries = store.load_cert_batch(&batch).await;
                // Parsing and checking 64 certificates is CPU work: off the runtime's threads.
                tokio::task::spawn_blocking(move || {
                    entries
                        .into_iter()
                        .filter_map(|entry| {
                            let name = entry.name.clone();
                            // `None`: removed since it was listed.
                            check_loaded(entry).transpose().map(|result| (name, result))
                        })
                        .collect::<Vec<_>>()
                })
                .await
            });
        }
        drop(names);
        let mut stale: Vec<String> = Vec::new();
        // Batches are served together every SERVE_EVERY or SERVE_BATCH certificates:
        // each swap copies the resolver's shards, so a swap per batch of 64 would copy
        // the whole map 1,500 times over 100,000 certificates.
        let mut pending = Vec::new();
        let mut last_swap = tokio::time::Instant::now();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(batch)) => pending.extend(batch),
                Ok(Err(e)) | Err(e) => tracing::error!(error = %e, "a load task failed"),
            }
            if pending.len() >= SERVE_BATCH || last_swap.elapsed() >= SERVE_EVERY {
                self.serve_batch(std::mem::take(&mut pending), &mut report, &mut stale);
                last_swap = tokio::time::Instant::now();
            }
        }
        self.serve_batch(pending, &mut report, &mut stale);
        // Names an earlier certificate of the same slot covered and the loaded one does
        // not, unless another loaded certificate serves them now.
        if !stale.is_empty() {
            let slots = self.inner.slots();
            stale.retain(|n| {
                !slots
                    .values()
                    .any(|s| s.current.as_ref().is_some_and(|c| c.names.contains(n)))
            });
            drop(slots);
            self.inner.resolver.remove(&stale);
        }
        Ok(report)
    }

    /// Places one batch of the initial load into the slots and serves it in one swap.
    fn serve_batch(
        &self,
        batch: Vec<(String, std::result::Result<Loaded, Unusable>)>,
        report: &mut StartReport,
        stale: &mut Vec<String>,
    ) {
        let mut serve = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        {
            let mut slots = self.inner.slots();
            for (name, result) in batch {
                let loaded = match result {
                    Ok(loaded) => loaded,
                    Err(Unusable { error, meta }) => {
                        tracing::error!(cert = %name, %error, "stored certificate is unusable; not serving it");
                        report.unusable.push((name.clone(), error.to_string()));
                        events.push(Event::Unusable {
                            name: name.clone(),
                            error: error.to_string(),
                        });
                        // Managing what is stored includes what has expired (a server
                        // that was down for months): order it again, as it was ordered.
                        if let (true, Some(meta)) = (self.inner.manage_stored, meta) {
                            slots
                                .entry(name)
                                .or_insert_with(|| Slot::managed(ManagedCert::from_meta(&meta)));
                        }
                        continue;
                    }
                };
                // A handshake loaded it on demand meanwhile, from the same store: that
                // read is at least as recent as this one.
                if slots.get(&name).is_some_and(|s| s.current.is_some()) {
                    report.loaded += 1;
                    continue;
                }
                events.push(Event::Loaded {
                    name: name.clone(),
                    serial: loaded.info.serial.clone(),
                    not_after: loaded.info.not_after,
                });
                let placed = self.place(&mut slots, &name, loaded);
                serve.push((placed.names, placed.key));
                stale.extend(placed.stale);
                events.extend(placed.conflict);
            }
            // Served before the slots are let go: a handshake's `reload` that finds the
            // same certificate in its slot must find it served too.
            self.inner.resolver.set_many(&serve);
        }
        report.loaded += serve.len();
        for event in events {
            self.emit(event);
        }
    }

    /// Re-reads `name` from the store, checks it, and swaps it in. Call this when another
    /// process has written it (a cluster peer's notification, a cron `renew`).
    ///
    /// Returns `Ok(true)` when a certificate other than the one served was swapped in,
    /// `Ok(false)` when the store holds nothing for `name` or the same certificate (whose
    /// stored renewal state is then taken over). An unusable stored certificate is an
    /// error, and the served one stays.
    pub async fn reload(&self, name: &str) -> Result<bool> {
        let loaded = match load_checked(&self.inner.store, name).await {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return Ok(false),
            Err(error) => {
                if matches!(error, Error::Store { .. } | Error::Certificate { .. }) {
                    tracing::error!(cert = %name, %error, "the stored certificate is unusable; still serving the one before");
                    self.emit(Event::Unusable {
                        name: name.to_owned(),
                        error: error.to_string(),
                    });
                }
                return Err(error);
            }
        };
        {
            let mut slots = self.inner.slots();
            if let Some(slot) = slots.get_mut(name)
                && slot
                    .current
                    .as_ref()
                    .is_some_and(|c| c.info.serial == loaded.info.serial)
            {
                // The same certificate: only its renewal state may have changed (a
                // `lobe-tls revoke`, another instance's failure count).
                slot.state = loaded.state;
                drop(slots);
                self.wake();
                return Ok(false);
            }
        }
        let (serial, not_after) = (loaded.info.serial.clone(), loaded.info.not_after);
        self.install(name, loaded);
        tracing::info!(cert = %name, %serial, "reloaded certificate from the store");
        self.emit(Event::Loaded {
            name: name.to_owned(),
            serial,
            not_after,
        });
        Ok(true)
    }

    /// Wakes the maintenance loop to recompute when it is next needed.
    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Renews `name` now, whatever the policy says, under the store lock. Emits the same
    /// events as the maintenance loop, and counts a failure toward the backoff.
    pub async fn renew_now(&self, name: &str) -> Result<RenewOutcome> {
        if self
            .inner
            .slots()
            .get(name)
            .is_none_or(|s| s.managed.is_none())
        {
            return Err(Error::config(format!(
                "no managed certificate named {name:?}"
            )));
        }
        self.renew_reported(name).await
    }

    /// When `name` is due for renewal under the policy, asking the CA's renewalInfo
    /// first when it is time to. `None` when the manager does not renew `name`;
    /// a time in the past (or now) when it is due, or when it is missing.
    pub async fn due_at(&self, name: &str) -> Option<OffsetDateTime> {
        self.poll_ari_if_due(name).await;
        let slots = self.inner.slots();
        let slot = slots.get(name)?;
        slot.managed.as_ref()?;
        match &slot.current {
            None => Some(
                slot.state
                    .next_attempt
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            ),
            Some(_) if slot.reissue => Some(slot.reissue_at()),
            Some(c) => Some(self.inner.policy.due_at(&c.info, &slot.state)),
        }
    }

    /// The serial of the certificate served for `name` and the renewal state held for
    /// it, or `None` when nothing is served: what a re-sync compares with the store's
    /// [`crate::store::CertVersion`] before it reads anything in full.
    pub fn served_version(&self, name: &str) -> Option<crate::store::CertVersion> {
        let slots = self.inner.slots();
        let slot = slots.get(name)?;
        let current = slot.current.as_ref()?;
        Some(crate::store::CertVersion::new(
            current.info.serial.clone(),
            slot.state.clone(),
        ))
    }
}

/// Reads `name` from the store and checks it can be served: key matches, covers the
/// names it was ordered for, not expired.
async fn load_checked(store: &DynStore, name: &str) -> Result<Option<Loaded>> {
    let entry = store.load_cert_batch(&[name.to_owned()]).await.pop();
    let Some(entry) = entry else {
        return Ok(None);
    };
    check_loaded(entry).map_err(|unusable| unusable.error)
}

/// A stored certificate that cannot be served, with its order when that was readable,
/// so that a manager of stored certificates can order it again.
struct Unusable {
    error: Error,
    meta: Option<Box<CertMeta>>,
}

/// Checks a certificate read from the store can be served. An unreadable renewal state
/// only costs the state: the certificate is still served.
fn check_loaded(entry: BatchEntry) -> std::result::Result<Option<Loaded>, Unusable> {
    let name = entry.name;
    let stored = match entry.cert {
        Ok(Some(stored)) => stored,
        Ok(None) => return Ok(None),
        Err(error) => return Err(Unusable { error, meta: None }),
    };
    let (key, info) = match stored.bundle.validated_key_for(&stored.meta.domains) {
        Ok(checked) => checked,
        Err(e) => {
            return Err(Unusable {
                error: Error::store(
                    None,
                    crate::error::StoreErrorKind::Corrupt,
                    format!("{name}: {e}"),
                )
                .with_source(e),
                meta: Some(Box::new(stored.meta)),
            });
        }
    };
    let state = entry.state.unwrap_or_else(|e| {
        tracing::warn!(cert = %name, error = %e, "unreadable renewal state; starting afresh");
        RenewalState::default()
    });
    Ok(Some(Loaded {
        meta: stored.meta,
        info,
        key,
        state,
    }))
}
