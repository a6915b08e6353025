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
//! certificate meanwhile, the manager loads that one instead of ordering again. A new
//! certificate is validated (key matches, covers its names, not expired) before it is
//! stored and swapped in; a failed renewal leaves the old certificate served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::{Notify, OnceCell, Semaphore, broadcast};
use tokio::task::{JoinHandle, JoinSet};

use crate::acme::{AcmeClient, AcmeConfig};
use crate::cert::{CertInfo, KeyType, rfc3339};
use crate::challenge::dns01::Dns01Solver;
use crate::challenge::http01::{Http01Registry, Http01Solver};
use crate::challenge::standalone::Standalone;
use crate::challenge::tls_alpn01::TlsAlpn01Solver;
use crate::challenge::{ChallengeConfig, ChallengeKind, Solver};
use crate::domain::DomainName;
use crate::error::{Error, Result};
use crate::issue::{Issuance, IssueRequest, LOCK_LEASE};
use crate::renewal::RenewalPolicy;
use crate::resolver::CertResolver;
use crate::store::{BatchEntry, CertMeta, DynStore, RenewalState};

/// Start-up reads stored certificates in batches of this many, `LOAD_CONCURRENCY`
/// batches at once: enough in flight for a slow disk or a remote store, and few enough
/// trips to the store that 10,000 certificates do not cost 20,000 thread hand-offs.
const LOAD_BATCH: usize = 64;
const LOAD_CONCURRENCY: usize = 32;
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

/// A certificate the manager keeps issued and renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedCert {
    /// The name in the store (`live/<name>/`).
    pub name: String,
    /// The names the certificate covers; the first is its main name.
    pub domains: Vec<DomainName>,
    /// The key type of new certificates.
    pub key_type: KeyType,
    /// How to validate the names.
    pub challenge: ChallengeConfig,
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
        }
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
        }
    }

    fn same_order_as(&self, meta: &CertMeta) -> bool {
        same_names(&self.domains, &meta.domains) && self.key_type == meta.key_type
    }
}

/// Whether two lists hold the same names, in any order.
fn same_names(a: &[DomainName], b: &[DomainName]) -> bool {
    let mut a: Vec<&str> = a.iter().map(DomainName::as_str).collect();
    let mut b: Vec<&str> = b.iter().map(DomainName::as_str).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// What happened to a certificate, for subscribers (see [`Manager::subscribe`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A certificate was read from the store and is now served.
    Loaded {
        /// The certificate's name.
        name: String,
        /// Its serial number (hex).
        serial: String,
        /// Its expiry.
        not_after: OffsetDateTime,
    },
    /// A certificate that was missing has been issued and is now served.
    Obtained {
        /// The certificate's name.
        name: String,
        /// Its serial number (hex).
        serial: String,
        /// Its expiry.
        not_after: OffsetDateTime,
    },
    /// A certificate has been replaced by a fresh one, now served.
    Renewed {
        /// The certificate's name.
        name: String,
        /// The new serial number (hex).
        serial: String,
        /// The new expiry.
        not_after: OffsetDateTime,
        /// The serial of the certificate it replaced.
        replaced_serial: String,
    },
    /// Issuing or renewing failed; whatever was served before still is.
    RenewalFailed {
        /// The certificate's name.
        name: String,
        /// What went wrong, one line.
        error: String,
        /// Consecutive failures so far.
        failures: u32,
        /// When the manager tries again.
        next_attempt: OffsetDateTime,
    },
    /// A served certificate is close to expiry and has not been renewed yet.
    ExpiringSoon {
        /// The certificate's name.
        name: String,
        /// Its serial number (hex).
        serial: String,
        /// Its expiry.
        not_after: OffsetDateTime,
    },
    /// What the store holds for this certificate cannot be served (unreadable, a key
    /// that does not match, expired): the certificate served before, if any, still is,
    /// and a managed certificate is ordered anew when it falls due.
    Unusable {
        /// The certificate's name.
        name: String,
        /// Why, one line.
        error: String,
    },
    /// Another process sharing the store (a cluster peer running another configuration,
    /// as in a rolling deploy) stored this certificate for other names or another key
    /// type than this manager is configured with. The manager serves it and renews it
    /// as stored instead of re-ordering its own version, so instances never fight.
    ConfigConflict {
        /// The certificate's name.
        name: String,
        /// The serial of the stored certificate.
        serial: String,
        /// The names the stored certificate covers.
        stored: Vec<String>,
        /// The names this manager is configured with.
        configured: Vec<String>,
    },
}

impl Event {
    /// The name of the certificate the event is about.
    pub fn name(&self) -> &str {
        match self {
            Event::Loaded { name, .. }
            | Event::Obtained { name, .. }
            | Event::Renewed { name, .. }
            | Event::RenewalFailed { name, .. }
            | Event::ExpiringSoon { name, .. }
            | Event::Unusable { name, .. }
            | Event::ConfigConflict { name, .. } => name,
        }
    }
}

/// What [`Manager::renew_now`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RenewOutcome {
    /// A new certificate was ordered, stored and swapped in.
    Ordered {
        /// The new certificate.
        info: CertInfo,
        /// The serial of the certificate it replaced, if there was one.
        replaced_serial: Option<String>,
    },
    /// Another process renewed it while this one waited for the lock; that certificate
    /// was loaded instead of ordering again.
    RenewedElsewhere {
        /// The certificate found in the store.
        info: CertInfo,
    },
}

/// What [`Manager::start`] did.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// How many certificates were loaded from the store.
    pub loaded: usize,
    /// Stored certificates that could not be served, with the reason.
    pub unusable: Vec<(String, String)>,
    /// Certificates that were missing and have been issued.
    pub obtained: Vec<String>,
    /// Certificates that were missing and could not be issued, with the error. The
    /// maintenance loop keeps trying.
    pub failed: Vec<(String, String)>,
}

/// One certificate's state, as [`Manager::certificates`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CertState {
    /// The certificate's name.
    pub name: String,
    /// The served certificate, if any.
    pub info: Option<CertInfo>,
    /// When it is due for renewal, if the manager renews it.
    pub due_at: Option<OffsetDateTime>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
}

/// Builds a [`Manager`].
#[derive(Debug)]
pub struct ManagerBuilder {
    acme: AcmeConfig,
    store: DynStore,
    resolver: CertResolver,
    http01: Option<Http01Registry>,
    certs: Vec<ManagedCert>,
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
        for cert in self.certs {
            if cert.domains.is_empty() {
                return Err(Error::Config(format!(
                    "certificate {:?} has no domains",
                    cert.name
                )));
            }
            if cert.challenge.kind == ChallengeKind::Dns01 && cert.challenge.dns.is_none() {
                return Err(Error::Config(format!(
                    "certificate {:?} uses dns-01 but names no DNS provider",
                    cert.name
                )));
            }
            let name = cert.name.clone();
            if slots.insert(name.clone(), Slot::managed(cert)).is_some() {
                return Err(Error::Config(format!(
                    "certificate {name:?} is configured twice"
                )));
            }
        }
        let (events, _) = broadcast::channel(self.event_capacity);
        Ok(Manager {
            inner: Arc::new(Inner {
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
                client: OnceCell::new(),
                slots: Mutex::new(slots),
                name_locks: Mutex::default(),
                orders: Semaphore::new(self.max_orders),
                ari_polls: Semaphore::new(ARI_CONCURRENCY),
                standalone: Standalone::default(),
            }),
        })
    }
}

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
    client: OnceCell<AcmeClient>,
    slots: Mutex<HashMap<String, Slot>>,
    /// One async lock per name, so that one process never runs two orders for a name.
    name_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    orders: Semaphore,
    ari_polls: Semaphore,
    standalone: Standalone,
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // The map stays consistent even if a holder panicked: every update is one insert.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the manager knows about one name.
struct Slot {
    /// How to order it; `None` for a stored certificate that is served but not renewed.
    managed: Option<ManagedCert>,
    current: Option<Current>,
    state: RenewalState,
    /// The configuration asks for other names or another key type than the stored
    /// order, which was stored before this manager started: re-order (on the backoff).
    reissue: bool,
    /// Another process stored a different order since this manager started: serve and
    /// renew that order as it is.
    conflict: Option<Conflict>,
    /// The serial an ExpiringSoon event was last sent for.
    warned_serial: Option<String>,
}

/// The order of a stored certificate that disagrees with the configuration.
struct Conflict {
    domains: Vec<DomainName>,
    key_type: KeyType,
}

impl Slot {
    fn managed(cert: ManagedCert) -> Self {
        Slot::new(Some(cert))
    }

    fn new(managed: Option<ManagedCert>) -> Self {
        Slot {
            managed,
            current: None,
            state: RenewalState::default(),
            reissue: false,
            conflict: None,
            warned_serial: None,
        }
    }

    /// What to order for this slot: the configuration, or in a conflict the order the
    /// cluster stored last.
    fn order(&self) -> Option<ManagedCert> {
        let mut order = self.managed.clone()?;
        if let Some(conflict) = &self.conflict {
            order.domains = conflict.domains.clone();
            order.key_type = conflict.key_type;
        }
        Some(order)
    }

    /// When a re-issue for a changed configuration may run: now, or after the backoff
    /// when the last attempt failed.
    fn reissue_at(&self) -> OffsetDateTime {
        match self.state.next_attempt {
            Some(retry) if self.state.failures > 0 => retry,
            _ => OffsetDateTime::UNIX_EPOCH,
        }
    }
}

struct Current {
    info: CertInfo,
    key: Arc<CertifiedKey>,
    /// The names it is served for.
    names: Vec<String>,
}

/// A stored certificate read and checked at start-up or on reload.
struct Loaded {
    meta: CertMeta,
    info: CertInfo,
    key: Arc<CertifiedKey>,
    state: RenewalState,
}

/// Stops the maintenance loop when dropped.
#[derive(Debug)]
pub struct MaintenanceHandle {
    task: JoinHandle<()>,
}

impl MaintenanceHandle {
    /// Stops the loop now.
    pub fn stop(self) {}
}

impl Drop for MaintenanceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
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
            policy: RenewalPolicy::default(),
            manage_stored: false,
            tls_alpn01_on_resolver: false,
            check_interval: DEFAULT_CHECK_INTERVAL,
            max_orders: DEFAULT_MAX_ORDERS,
            event_capacity: DEFAULT_EVENT_CAPACITY,
        }
    }

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
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Feeds `metrics` from this manager: every certificate's expiry at each scrape,
    /// renewal failures and configuration conflicts as they happen. Call it before
    /// [`Manager::start`]; certificates configured or found later are counted from their
    /// first event on. The counting task ends when the manager is dropped.
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
                    Ok(Event::Unusable { name, .. }) => counted.unusable(&name),
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
                    Some(crate::metrics::CertExpiry {
                        not_after: state.info?.not_after.unix_timestamp(),
                        name: state.name,
                        source: "managed",
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
    /// Errors only when the store cannot be listed; individual failures are in the report,
    /// in events and in the log.
    pub async fn start(&self) -> Result<StartReport> {
        let mut report = StartReport::default();
        let names = self.inner.store.list_certs().await?;
        let loads = self.load_many(names).await;
        let mut serve = Vec::with_capacity(loads.len());
        let mut events = Vec::with_capacity(loads.len());
        {
            let mut slots = self.inner.slots();
            for (name, result) in loads {
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
                let names: Vec<String> = loaded
                    .meta
                    .domains
                    .iter()
                    .map(|d| d.as_str().to_owned())
                    .collect();
                serve.push((names.clone(), loaded.key.clone()));
                events.push(Event::Loaded {
                    name: name.clone(),
                    serial: loaded.info.serial.clone(),
                    not_after: loaded.info.not_after,
                });
                let manage_stored = self.inner.manage_stored;
                let slot = slots.entry(name.clone()).or_insert_with(|| {
                    Slot::new(manage_stored.then(|| ManagedCert::from_meta(&loaded.meta)))
                });
                if let Some(event) = self.judge_order(&name, slot, &loaded) {
                    events.push(event);
                }
                slot.state = loaded.state;
                slot.current = Some(Current {
                    info: loaded.info,
                    key: loaded.key,
                    names,
                });
            }
        }
        self.inner.resolver.set_many(&serve);
        report.loaded = serve.len();
        tracing::info!(count = report.loaded, "loaded certificates from the store");
        for event in events {
            self.emit(event);
        }

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
                let result = this.renew_reported(&name).await;
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

    /// Reads and checks many stored certificates at once.
    async fn load_many(
        &self,
        names: Vec<String>,
    ) -> Vec<(String, std::result::Result<Loaded, Unusable>)> {
        let limit = Arc::new(Semaphore::new(LOAD_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for batch in names.chunks(LOAD_BATCH) {
            let store = self.inner.store.clone();
            let limit = limit.clone();
            let batch = batch.to_vec();
            tasks.spawn(async move {
                let _permit = limit.acquire().await;
                store
                    .load_cert_batch(&batch)
                    .await
                    .into_iter()
                    .filter_map(|entry| {
                        let name = entry.name.clone();
                        // `None`: removed since it was listed.
                        check_loaded(entry).transpose().map(|result| (name, result))
                    })
                    .collect::<Vec<_>>()
            });
        }
        let mut out = Vec::with_capacity(names.len());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(batch) => out.extend(batch),
                Err(e) => tracing::error!(error = %e, "a load task failed"),
            }
        }
        out
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
                if matches!(error, Error::Store(_) | Error::Certificate(_)) {
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

    /// Serves `loaded` for `name`, replacing what was served, and forgets names the
    /// new certificate no longer covers.
    fn install(&self, name: &str, loaded: Loaded) {
        let names: Vec<String> = loaded
            .meta
            .domains
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect();
        let mut slots = self.inner.slots();
        let manage_stored = self.inner.manage_stored;
        let slot = slots.entry(name.to_owned()).or_insert_with(|| {
            Slot::new(manage_stored.then(|| ManagedCert::from_meta(&loaded.meta)))
        });
        // Swap first, then drop stale names: a handshake never finds a gap.
        self.inner.resolver.set(&names, loaded.key.clone());
        if let Some(old) = &slot.current {
            let stale: Vec<&String> = old.names.iter().filter(|n| !names.contains(n)).collect();
            if !stale.is_empty() {
                self.inner.resolver.remove(&stale);
            }
        }
        let conflict = self.judge_order(name, slot, &loaded);
        slot.state = loaded.state;
        slot.current = Some(Current {
            info: loaded.info,
            key: loaded.key,
            names,
        });
        drop(slots);
        if let Some(event) = conflict {
            self.emit(event);
        }
        self.wake();
    }

    /// Compares a stored order with the configuration. One stored before this manager
    /// started is re-issued (the configuration changed); one another process stored
    /// since is a peer's newer decision: it is kept and renewed as it is, and announced
    /// once (event and log line) rather than re-ordered, so that instances running
    /// different configurations never re-order against each other.
    fn judge_order(&self, name: &str, slot: &mut Slot, loaded: &Loaded) -> Option<Event> {
        let Some(managed) = &slot.managed else {
            return None;
        };
        let agrees = managed.same_order_as(&loaded.meta);
        let peer_decision = loaded.meta.issued_at >= self.inner.started;
        slot.reissue = !agrees && !peer_decision;
        if agrees || !peer_decision {
            slot.conflict = None;
            return None;
        }
        // Announced once per disagreeing order, not again when it is renewed as stored.
        let announced = slot.conflict.as_ref().is_some_and(|c| {
            c.key_type == loaded.meta.key_type && same_names(&c.domains, &loaded.meta.domains)
        });
        slot.conflict = Some(Conflict {
            domains: loaded.meta.domains.clone(),
            key_type: loaded.meta.key_type,
        });
        if announced {
            return None;
        }
        let list = |d: &[DomainName]| d.iter().map(|d| d.as_str().to_owned()).collect();
        let stored: Vec<String> = list(&loaded.meta.domains);
        let configured: Vec<String> = list(&managed.domains);
        tracing::error!(
            cert = %name,
            stored = %stored.join(","),
            configured = %configured.join(","),
            "another instance stored this certificate with a different configuration; serving and renewing it as stored, not re-ordering (align the instances' configurations)"
        );
        Some(Event::ConfigConflict {
            name: name.to_owned(),
            serial: loaded.info.serial.clone(),
            stored,
            configured,
        })
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
            return Err(Error::Config(format!(
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

    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .name_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// Renews under the local and store locks; reports success or failure in events,
    /// the log and the persisted renewal state.
    async fn renew_reported(&self, name: &str) -> Result<RenewOutcome> {
        let lock = self.name_lock(name);
        let _local = lock.lock().await;
        self.renew_reported_locked(name).await
    }

    /// [`Manager::renew_reported`] for a caller that holds the name's local lock.
    async fn renew_reported_locked(&self, name: &str) -> Result<RenewOutcome> {
        let result = self.renew_locked(name).await;
        match &result {
            Ok(RenewOutcome::Ordered {
                info,
                replaced_serial,
            }) => {
                let event = match replaced_serial {
                    Some(old) => Event::Renewed {
                        name: name.to_owned(),
                        serial: info.serial.clone(),
                        not_after: info.not_after,
                        replaced_serial: old.clone(),
                    },
                    None => Event::Obtained {
                        name: name.to_owned(),
                        serial: info.serial.clone(),
                        not_after: info.not_after,
                    },
                };
                tracing::info!(cert = %name, serial = %info.serial, not_after = %rfc3339(info.not_after), "certificate issued");
                self.emit(event);
            }
            Ok(RenewOutcome::RenewedElsewhere { info }) => {
                tracing::info!(cert = %name, serial = %info.serial, "another process renewed the certificate; loaded it");
                self.emit(Event::Loaded {
                    name: name.to_owned(),
                    serial: info.serial.clone(),
                    not_after: info.not_after,
                });
            }
            Err(e) => self.record_failure(name, e).await,
        }
        result
    }

    async fn record_failure(&self, name: &str, error: &Error) {
        // What the store holds may carry news from other processes (a `lobe-tls revoke`):
        // the failure goes into it rather than over it.
        let stored = self.inner.store.load_renewal_state(name).await.ok();
        let now = OffsetDateTime::now_utc();
        let state = {
            let mut slots = self.inner.slots();
            let Some(slot) = slots.get_mut(name) else {
                return;
            };
            if let Some(revoked) = stored.and_then(|s| s.revoked_serial) {
                slot.state.revoked_serial = Some(revoked);
            }
            let not_after = slot.current.as_ref().map(|c| c.info.not_after);
            slot.state.failures = slot.state.failures.saturating_add(1);
            slot.state.last_error = Some(error.to_string());
            if error.ca_problem() == Some("alreadyReplaced") {
                slot.state.replaces_refused =
                    slot.current.as_ref().and_then(|c| c.info.ari_id.clone());
            }
            slot.state.next_attempt = Some(self.inner.policy.next_retry(
                slot.state.failures,
                now,
                not_after,
            ));
            slot.state.clone()
        };
        let next_attempt = state.next_attempt.unwrap_or(now);
        tracing::error!(
            cert = %name,
            failures = state.failures,
            next_attempt = %rfc3339(next_attempt),
            error = %error,
            "certificate renewal failed; still serving the previous certificate, if any"
        );
        if let Err(e) = self.inner.store.save_renewal_state(name, &state).await {
            tracing::warn!(cert = %name, error = %e, "cannot save renewal state");
        }
        self.emit(Event::RenewalFailed {
            name: name.to_owned(),
            error: error.to_string(),
            failures: state.failures,
            next_attempt,
        });
        self.wake();
    }

    async fn renew_locked(&self, name: &str) -> Result<RenewOutcome> {
        let (managed, seen, replaces, not_after) = {
            let slots = self.inner.slots();
            let slot = slots
                .get(name)
                .ok_or_else(|| Error::Config(format!("no managed certificate named {name:?}")))?;
            let managed = slot
                .order()
                .ok_or_else(|| Error::Config(format!("no managed certificate named {name:?}")))?;
            let seen = slot.current.as_ref().map(|c| c.info.serial.clone());
            let not_after = slot.current.as_ref().map(|c| c.info.not_after);
            // `replaces` only when the CA answered renewalInfo for this very certificate,
            // and not again after the CA said it was already replaced (RFC 9773 §5).
            let replaces = slot.current.as_ref().and_then(|c| {
                let refused =
                    c.info.ari_id.is_some() && slot.state.replaces_refused == c.info.ari_id;
                let answered = slot.state.ari_renew_at.is_some()
                    && c.info.ari_id.is_some()
                    && slot.state.ari_cert_id == c.info.ari_id
                    && !refused;
                answered.then(|| c.info.ari_id.clone()).flatten()
            });
            (managed, seen, replaces, not_after)
        };

        // The permit and the CA's directory first, the cluster lock last: a renewal that
        // queues for a permit, or waits on an unreachable CA, holds no lock meanwhile.
        let _permit = self
            .inner
            .orders
            .acquire()
            .await
            .map_err(|_| Error::Config("the manager is shutting down".into()))?;
        let bound = request_bound(self.inner.acme.request_timeout, not_after);
        let client = crate::acme::with_request_bound(bound, self.client()).await?;
        let order_timeout = self.inner.acme.order_timeout;
        let lock = self
            .inner
            .store
            .lock(name, LOCK_LEASE, order_timeout + Duration::from_secs(30))
            .await?
            .ok_or_else(|| {
                Error::Timeout(format!(
                    "another process holds the lock on {name}; try again later"
                ))
            })?;
        let result = crate::acme::with_request_bound(
            bound,
            self.order_under_lock(client, &managed, seen, replaces),
        )
        .await;
        if let Err(e) = lock.release().await {
            tracing::warn!(cert = %name, error = %e, "cannot release the store lock");
        }
        result
    }

    async fn order_under_lock(
        &self,
        client: &AcmeClient,
        managed: &ManagedCert,
        seen: Option<String>,
        replaces: Option<String>,
    ) -> Result<RenewOutcome> {
        let name = managed.name.as_str();
        // Re-check after taking the lock: another process may have renewed already.
        match load_checked(&self.inner.store, name).await {
            Ok(Some(loaded))
                if seen.as_deref() != Some(loaded.info.serial.as_str())
                    && managed.same_order_as(&loaded.meta) =>
            {
                let info = loaded.info.clone();
                self.install(name, loaded);
                return Ok(RenewOutcome::RenewedElsewhere { info });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(cert = %name, error = %e, "stored certificate is unusable; ordering a new one")
            }
        }

        let SolverHandle { solver, keep } = self.solver_for(&managed.challenge).await?;
        let request = IssueRequest {
            name: name.to_owned(),
            domains: managed.domains.clone(),
            key_type: managed.key_type,
            challenge: managed.challenge.clone(),
            replaces,
        };
        // Orders, validates (key matches, covers the names, not expired) and stores
        // atomically; nothing is written or served unless every step succeeded.
        let stored = Issuance::with_solver(request, solver)?
            .run(client, self.inner.store.as_ref(), None)
            .await?;
        drop(keep);
        let (key, info) = stored.bundle.validated_key_for(&managed.domains)?;
        let meta = stored.meta;
        let state = RenewalState::default();
        if let Err(e) = self.inner.store.save_renewal_state(name, &state).await {
            tracing::warn!(cert = %name, error = %e, "cannot reset renewal state");
        }
        self.install(
            name,
            Loaded {
                meta,
                info: info.clone(),
                key,
                state,
            },
        );
        Ok(RenewOutcome::Ordered {
            info,
            replaced_serial: seen,
        })
    }

    /// The ACME client, connected on first use.
    async fn client(&self) -> Result<&AcmeClient> {
        self.inner
            .client
            .get_or_try_init(|| AcmeClient::connect(&self.inner.acme, self.inner.store.as_ref()))
            .await
    }

    async fn solver_for(&self, challenge: &ChallengeConfig) -> Result<SolverHandle> {
        let handle = match challenge.kind {
            ChallengeKind::Http01 => match &self.inner.http01 {
                Some(registry) => SolverHandle::new(Http01Solver::new(registry.clone())),
                None => {
                    let addr = challenge.http_listen.as_deref().unwrap_or("0.0.0.0:80");
                    let store = &self.inner.store;
                    let shared = store.is_shared().then(|| store.clone());
                    let (listener, registry) = self.inner.standalone.http(addr, shared).await?;
                    let mut handle = SolverHandle::new(Http01Solver::new(registry));
                    handle.keep.push(listener);
                    handle
                }
            },
            ChallengeKind::TlsAlpn01 => match &challenge.tls_listen {
                Some(addr) if !self.inner.tls_alpn01_on_resolver => {
                    let (listener, resolver) = self.inner.standalone.tls(addr).await?;
                    let mut handle = SolverHandle::new(TlsAlpn01Solver::new(resolver));
                    handle.keep.push(listener);
                    handle
                }
                _ => SolverHandle::new(TlsAlpn01Solver::with_shared_store(
                    self.inner.resolver.clone(),
                    self.inner.store.clone(),
                )),
            },
            ChallengeKind::Dns01 => {
                let dns = challenge.dns.as_ref().ok_or_else(|| {
                    Error::Config(
                        "dns-01 needs a DNS provider in the certificate's settings".into(),
                    )
                })?;
                SolverHandle::new(Dns01Solver::from_config(dns)?)
            }
        };
        Ok(handle)
    }

    /// Runs the maintenance loop forever: every check interval, asks renewalInfo where it
    /// is time to, renews what is due, retries failures on the backoff schedule, and warns
    /// about certificates close to expiry. Call [`Manager::start`] first.
    pub async fn run(&self) {
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let ticked = tokio::time::Instant::now();
            let next_due = self.tick(&mut tasks);
            // Sleep until the earliest due renewal, retry or ARI poll. Anything that moves
            // a due time (a renewal, a failure, a reload, another process's store write,
            // an ARI answer) wakes the loop to look again, so the check interval is only
            // a safety net.
            let until_due = next_due
                .map(|due| (due - OffsetDateTime::now_utc()).max(time::Duration::ZERO))
                .and_then(|left| Duration::try_from(left).ok())
                .unwrap_or(self.inner.check_interval);
            let pause = self.inner.check_interval.min(until_due).max(MIN_PAUSE);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.inner.wake.notified() => {
                    // Never more than one round per MIN_PAUSE, however busy the wakes.
                    tokio::time::sleep_until(ticked + MIN_PAUSE).await;
                }
            }
        }
    }

    /// Runs [`Manager::run`] on a task; the loop and its renewals stop when the handle drops.
    pub fn spawn(&self) -> MaintenanceHandle {
        let this = self.clone();
        MaintenanceHandle {
            task: tokio::spawn(async move { this.run().await }),
        }
    }

    /// Starts the work that is due now; returns the earliest time something is due later.
    fn tick(&self, tasks: &mut JoinSet<()>) -> Option<OffsetDateTime> {
        let now = OffsetDateTime::now_utc();
        let policy = &self.inner.policy;
        let mut work = Vec::new();
        let mut warnings = Vec::new();
        let mut next_due: Option<OffsetDateTime> = None;
        let mut note_later = |at: OffsetDateTime| {
            if at > now {
                next_due = Some(next_due.map_or(at, |next| next.min(at)));
            }
        };
        {
            let mut slots = self.inner.slots();
            for (name, slot) in slots.iter_mut() {
                let Some(current) = &slot.current else {
                    // Not issued yet: order it, or wait for the retry after a failure.
                    if slot.managed.is_some() {
                        match slot.state.next_attempt {
                            Some(retry) if retry > now => note_later(retry),
                            _ => work.push(name.clone()),
                        }
                    }
                    continue;
                };
                if policy.warn_expiring_once(&current.info, &mut slot.warned_serial, now) {
                    warnings.push(Event::ExpiringSoon {
                        name: name.clone(),
                        serial: current.info.serial.clone(),
                        not_after: current.info.not_after,
                    });
                }
                if slot.managed.is_none() {
                    continue;
                }
                let due_at = if slot.reissue {
                    slot.reissue_at()
                } else {
                    policy.due_at(&current.info, &slot.state)
                };
                note_later(due_at);
                if current.info.ari_id.is_some()
                    && let Some(poll) = slot.state.ari_next_poll
                {
                    note_later(poll);
                }
                if due_at <= now || ari_poll_due(&current.info, &slot.state, now) {
                    work.push(name.clone());
                }
            }
        }
        for event in warnings {
            if let Event::ExpiringSoon {
                name, not_after, ..
            } = &event
            {
                tracing::warn!(cert = %name, not_after = %rfc3339(*not_after), "certificate expires soon and has not been renewed");
            }
            self.emit(event);
        }
        for name in work {
            let this = self.clone();
            tasks.spawn(async move { this.maintain(&name).await });
        }
        next_due
    }

    /// One certificate's turn in the maintenance loop.
    async fn maintain(&self, name: &str) {
        // Skip when an order for it is already running.
        let lock = self.name_lock(name);
        let Ok(_local) = lock.try_lock_owned() else {
            return;
        };
        let Some(due) = self.due_at(name).await else {
            return;
        };
        if due <= OffsetDateTime::now_utc() {
            // Errors are reported (log, event, state) inside.
            let _ = self.renew_reported_locked(name).await;
        }
    }

    /// Asks renewalInfo for `name` if the CA offers ARI and it is time to ask.
    async fn poll_ari_if_due(&self, name: &str) {
        let now = OffsetDateTime::now_utc();
        let (info, der, mut state) = {
            let slots = self.inner.slots();
            let Some(slot) = slots.get(name) else { return };
            let Some(current) = &slot.current else { return };
            if slot.managed.is_none() || !ari_poll_due(&current.info, &slot.state, now) {
                return;
            }
            (
                current.info.clone(),
                current.key.cert[0].clone(),
                slot.state.clone(),
            )
        };
        let policy = &self.inner.policy;
        let Ok(_permit) = self.inner.ari_polls.acquire().await else {
            return;
        };
        let bound = request_bound(self.inner.acme.request_timeout, Some(info.not_after));
        let asked = crate::acme::with_request_bound(bound, async {
            let client = self.client().await?;
            Ok::<_, Error>(match instant_acme::CertificateIdentifier::try_from(&der) {
                Ok(id) => Some(client.account().renewal_info(&id).await),
                Err(_) => None,
            })
        })
        .await;
        match asked {
            Ok(answer) => match answer {
                Some(answer) => match answer {
                    Ok((answer, retry_after)) => {
                        let window = (answer.suggested_window.start, answer.suggested_window.end);
                        policy.apply_ari_window(&info, &mut state, window, retry_after, now);
                        tracing::debug!(cert = %name, renew_at = ?state.ari_renew_at.map(rfc3339), "ARI window");
                    }
                    Err(instant_acme::Error::Unsupported(_)) => {
                        state.ari_cert_id = None;
                        state.ari_renew_at = None;
                        state.ari_next_poll = Some(now + policy.ari_poll);
                    }
                    Err(e) => {
                        tracing::warn!(cert = %name, error = %crate::acme::error_chain(&e), "renewalInfo query failed");
                        state.ari_next_poll =
                            Some(now + (policy.ari_poll / 12_i32).max(policy.ari_min_poll));
                    }
                },
                None => {
                    // No authority key identifier: ARI cannot name this certificate.
                    state.ari_next_poll = Some(now + policy.ari_poll);
                }
            },
            Err(e) => {
                tracing::warn!(cert = %name, error = %e, "cannot reach the CA for renewalInfo");
                state.ari_next_poll =
                    Some(now + (policy.ari_poll / 12_i32).max(policy.ari_min_poll));
            }
        }
        // Only the ARI fields are this poll's news. The rest may have changed while the CA
        // was asked, here or in another process sharing the store (a failure recorded, a
        // `lobe-tls revoke`), so the answer goes into what the store holds now.
        let stored = self.inner.store.load_renewal_state(name).await;
        let state = {
            let mut slots = self.inner.slots();
            match slots.get_mut(name) {
                // Only if the certificate was not replaced meanwhile.
                Some(slot)
                    if slot
                        .current
                        .as_ref()
                        .is_some_and(|c| c.info.serial == info.serial) =>
                {
                    let mut merged = stored.unwrap_or_else(|_| slot.state.clone());
                    merged.ari_renew_at = state.ari_renew_at;
                    merged.ari_next_poll = state.ari_next_poll;
                    merged.ari_cert_id = state.ari_cert_id;
                    slot.state = merged.clone();
                    merged
                }
                _ => return,
            }
        };
        if let Err(e) = self.inner.store.save_renewal_state(name, &state).await {
            tracing::warn!(cert = %name, error = %e, "cannot save renewal state");
        }
        self.wake();
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

/// The bound on each CA request of an order for a certificate expiring at `not_after`:
/// the configured timeout, but never more than an eighth of the time left, so that a
/// renewal stuck on a dead path gives up in time to try again before expiry (the retry
/// backoff shrinks the same way, see [`RenewalPolicy::next_retry`]).
fn request_bound(configured: Duration, not_after: Option<OffsetDateTime>) -> Duration {
    let Some(not_after) = not_after else {
        return configured;
    };
    let left = Duration::try_from(not_after - OffsetDateTime::now_utc()).unwrap_or_default();
    (left / 8).clamp(MIN_REQUEST_BOUND, configured.max(MIN_REQUEST_BOUND))
}

/// Whether it is time to ask renewalInfo about `info`.
fn ari_poll_due(info: &CertInfo, state: &RenewalState, now: OffsetDateTime) -> bool {
    if info.ari_id.is_none() {
        return false;
    }
    let answer_is_stale = state.ari_cert_id.is_some() && state.ari_cert_id != info.ari_id;
    answer_is_stale || state.ari_next_poll.is_none_or(|t| t <= now)
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
                error: Error::Store(format!("{name}: {e}")),
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

/// A solver plus whatever must live while it is used (standalone listeners).
struct SolverHandle {
    solver: Box<dyn Solver>,
    keep: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl SolverHandle {
    fn new(solver: impl Solver + 'static) -> Self {
        SolverHandle {
            solver: Box::new(solver),
            keep: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileStore, Store, StoredCert};

    fn self_signed(domains: &[&str], not_after: OffsetDateTime) -> crate::cert::CertBundle {
        let key = KeyType::EcdsaP256.generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            domains.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap();
        crate::cert::CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap()
    }

    fn stored(name: &str, domains: &[&str], not_after: OffsetDateTime) -> StoredCert {
        StoredCert {
            bundle: self_signed(domains, not_after),
            meta: CertMeta {
                name: name.into(),
                domains: crate::domain::parse_all(domains).unwrap(),
                key_type: KeyType::EcdsaP256,
                challenge: ChallengeConfig::default(),
                directory: "https://ca.invalid/dir".into(),
                issued_at: OffsetDateTime::now_utc(),
            },
        }
    }

    fn unreachable_ca() -> AcmeConfig {
        AcmeConfig::new("https://127.0.0.1:1/dir")
    }

    #[tokio::test]
    async fn start_serves_stored_certificates_and_skips_unusable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let later = OffsetDateTime::now_utc() + time::Duration::days(30);
        store
            .save_cert(&stored("a", &["a.example.com"], later))
            .await
            .unwrap();
        let expired = OffsetDateTime::now_utc() - time::Duration::hours(1);
        store
            .save_cert(&stored("old", &["old.example.com"], expired))
            .await
            .unwrap();
        let manager = Manager::builder(unreachable_ca(), store).build().unwrap();
        let mut events = manager.subscribe();
        let report = manager.start().await.unwrap();
        assert_eq!(report.loaded, 1);
        assert_eq!(report.unusable.len(), 1);
        assert!(report.unusable[0].1.contains("expired"), "{report:?}");
        assert!(manager.resolver().lookup(Some("a.example.com")).is_some());
        assert!(manager.resolver().lookup(Some("old.example.com")).is_none());
        match events.recv().await.unwrap() {
            Event::Loaded { name, .. } => assert_eq!(name, "a"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn failed_issue_keeps_serving_and_reports_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let soon = OffsetDateTime::now_utc() + time::Duration::hours(1);
        store
            .save_cert(&stored("a", &["a.example.com"], soon))
            .await
            .unwrap();
        let manager = Manager::builder(unreachable_ca(), store.clone())
            .manage_stored(true)
            .build()
            .unwrap();
        manager.start().await.unwrap();
        let served = manager.resolver().lookup(Some("a.example.com")).unwrap();
        let mut events = manager.subscribe();
        assert!(manager.renew_now("a").await.is_err());
        assert!(Arc::ptr_eq(
            &served,
            &manager.resolver().lookup(Some("a.example.com")).unwrap()
        ));
        match events.recv().await.unwrap() {
            Event::RenewalFailed {
                name,
                failures,
                next_attempt,
                ..
            } => {
                assert_eq!(name, "a");
                assert_eq!(failures, 1);
                assert!(next_attempt > OffsetDateTime::now_utc());
            }
            other => panic!("unexpected {other:?}"),
        }
        let state = store.load_renewal_state("a").await.unwrap();
        assert_eq!(state.failures, 1);
        assert!(state.last_error.is_some());
    }

    #[tokio::test]
    async fn reload_swaps_in_a_new_stored_certificate_and_refuses_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let later = OffsetDateTime::now_utc() + time::Duration::days(30);
        store
            .save_cert(&stored("a", &["a.example.com"], later))
            .await
            .unwrap();
        let manager = Manager::builder(unreachable_ca(), store.clone())
            .build()
            .unwrap();
        manager.start().await.unwrap();
        assert!(!manager.reload("a").await.unwrap(), "nothing changed");
        let first = manager.resolver().lookup(Some("a.example.com")).unwrap();
        store
            .save_cert(&stored("a", &["a.example.com", "b.example.com"], later))
            .await
            .unwrap();
        assert!(manager.reload("a").await.unwrap());
        let second = manager.resolver().lookup(Some("a.example.com")).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(manager.resolver().lookup(Some("b.example.com")).is_some());
        assert!(!manager.reload("missing").await.unwrap());
    }

    #[tokio::test]
    async fn expiring_soon_is_announced_once_per_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        // Lifetime about a day, one hour left: inside the warning window (a sixth).
        let soon = OffsetDateTime::now_utc() + time::Duration::hours(1);
        store
            .save_cert(&stored("soon", &["soon.example.com"], soon))
            .await
            .unwrap();
        let later = OffsetDateTime::now_utc() + time::Duration::days(30);
        store
            .save_cert(&stored("later", &["later.example.com"], later))
            .await
            .unwrap();
        let manager = Manager::builder(unreachable_ca(), store)
            .check_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        manager.start().await.unwrap();
        let mut events = manager.subscribe();
        let maintenance = manager.spawn();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(maintenance);
        let mut warned = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::ExpiringSoon {
                name, not_after, ..
            } = event
            {
                assert_eq!(not_after.unix_timestamp(), soon.unix_timestamp());
                warned.push(name);
            }
        }
        assert_eq!(
            warned,
            ["soon"],
            "one warning, for the expiring certificate only"
        );
    }

    #[test]
    fn building_refuses_duplicate_and_empty_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
        let cert = ManagedCert::new("a", crate::domain::parse_all(&["a.example.com"]).unwrap());
        let err = Manager::builder(unreachable_ca(), store.clone())
            .cert(cert.clone())
            .cert(cert)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = Manager::builder(unreachable_ca(), store)
            .cert(ManagedCert::new("e", Vec::new()))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("no domains"), "{err}");
    }
}
