//! Ordering one certificate: the permit, the CA, the store lock, the re-check, the
//! order itself, and the failure bookkeeping.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::cert::rfc3339;
use crate::challenge::dns01::Dns01Solver;
use crate::challenge::http01::Http01Solver;
use crate::challenge::tls_alpn01::TlsAlpn01Solver;
use crate::challenge::webroot::WebrootSolver;
use crate::challenge::{ChallengeConfig, ChallengeKind, Solver};
use crate::error::{Error, Result};
use crate::issue::{Issuance, IssueRequest, LOCK_LEASE};
use crate::store::{RenewalState, StoreLock};

use super::*;

/// The async locks by name.
type LockMap = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// One async lock per name, so that one process never runs two orders for a name. A
/// name's entry lives while someone holds or waits for its lock, and goes with the
/// last of them: the map holds the names being ordered now, not every name ever seen.
#[derive(Debug, Default)]
pub(super) struct NameLocks {
    map: Arc<LockMap>,
}

impl NameLocks {
    /// The lock of `name` (not taken yet).
    pub(super) fn get(&self, name: &str) -> NameLock {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        NameLock {
            lock: map.entry(name.to_owned()).or_default().clone(),
            name: name.to_owned(),
            map: self.map.clone(),
        }
    }

    /// The names whose lock is held now: the orders this process runs.
    pub(super) fn held(&self) -> Vec<String> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<String> = map
            .iter()
            .filter(|(_, lock)| lock.try_lock().is_err())
            .map(|(name, _)| name.clone())
            .collect();
        held.sort();
        held
    }

    /// How many names have an entry.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(usize::MAX)
    }
}

/// A name's lock, to take; its entry in [`NameLocks`] goes when the last `NameLock` of
/// the name (or [`NameGuard`] made from one) is dropped.
pub(super) struct NameLock {
    lock: Arc<tokio::sync::Mutex<()>>,
    name: String,
    map: Arc<LockMap>,
}

impl NameLock {
    /// Waits for the lock.
    pub(super) async fn lock(self) -> NameGuard {
        NameGuard {
            _guard: self.lock.clone().lock_owned().await,
            _lock: self,
        }
    }

    /// Takes the lock if it is free.
    pub(super) fn try_lock_owned(
        self,
    ) -> std::result::Result<NameGuard, tokio::sync::TryLockError> {
        Ok(NameGuard {
            _guard: self.lock.clone().try_lock_owned()?,
            _lock: self,
        })
    }
}

impl Drop for NameLock {
    fn drop(&mut self) {
        // Under the map's lock nobody can take a new handle, so the count is exact: the
        // map's own and this one mean no one else holds or waits.
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&self.lock) == 2
            && map
                .get(&self.name)
                .is_some_and(|held| Arc::ptr_eq(held, &self.lock))
        {
            map.remove(&self.name);
        }
    }
}

/// A name's lock, held.
pub(super) struct NameGuard {
    // Fields drop in order: the lock is released before the entry is looked at.
    _guard: tokio::sync::OwnedMutexGuard<()>,
    _lock: NameLock,
}

impl Manager {
    pub(super) fn name_lock(&self, name: &str) -> NameLock {
        self.inner.name_locks.get(name)
    }

    /// Renews under the local and store locks; reports success or failure in events,
    /// the log and the persisted renewal state.
    pub(super) async fn renew_reported(&self, name: &str) -> Result<RenewOutcome> {
        let _local = self.name_lock(name).lock().await;
        self.renew_reported_locked(name).await
    }

    /// Issues `name`, which the caller saw without a certificate, unless one was
    /// installed while it waited for the name's lock (an order of another task that
    /// got there first, on-demand issuance racing the start): that one is kept rather
    /// than ordered again.
    pub(crate) async fn obtain_missing(&self, name: &str) -> Result<RenewOutcome> {
        let _local = self.name_lock(name).lock().await;
        let current = (self.inner.slots())
            .get(name)
            .and_then(|slot| slot.current.as_ref().map(|c| c.info.clone()));
        match current {
            Some(info) => Ok(RenewOutcome::RenewedElsewhere { info }),
            None => self.renew_reported_locked(name).await,
        }
    }

    /// [`Manager::renew_reported`] for a caller that holds the name's local lock.
    pub(super) async fn renew_reported_locked(&self, name: &str) -> Result<RenewOutcome> {
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
        let (state, first) = {
            let mut slots = self.inner.slots();
            let Some(slot) = slots.get_mut(name) else {
                return;
            };
            if let Some(revoked) = stored.and_then(|s| s.revoked_serial) {
                slot.state.revoked_serial = Some(revoked);
            }
            let not_after = slot.current.as_ref().map(|c| c.info.not_after);
            // No certificate yet: this was the first issuance, not a renewal.
            let first = slot.current.is_none();
            slot.state.failures = slot.state.failures.saturating_add(1);
            slot.state.last_error = Some(error.to_string());
            if error.ca_problem() == Some("alreadyReplaced") {
                slot.state.replaces_refused =
                    slot.current.as_ref().and_then(|c| c.info.ari_id.clone());
            }
            let backoff = self
                .inner
                .policy
                .next_retry(slot.state.failures, now, not_after);
            // Never before the CA's own Retry-After.
            slot.state.next_attempt = Some(match error.retry_after() {
                Some(at) if at > backoff => at,
                _ => backoff,
            });
            (slot.state.clone(), first)
        };
        let next_attempt = state.next_attempt.unwrap_or(now);
        if first {
            tracing::error!(
                cert = %name,
                failures = state.failures,
                next_attempt = %rfc3339(next_attempt),
                error = %error,
                "certificate issuance failed; nothing to serve for this name until it succeeds"
            );
        } else {
            tracing::error!(
                cert = %name,
                failures = state.failures,
                next_attempt = %rfc3339(next_attempt),
                error = %error,
                "certificate renewal failed; still serving the previous certificate"
            );
        }
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
                .ok_or_else(|| Error::config(format!("no managed certificate named {name:?}")))?;
            let managed = slot
                .order()
                .ok_or_else(|| Error::config(format!("no managed certificate named {name:?}")))?;
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
            .map_err(|_| Error::config("the manager is shutting down"))?;
        let bound = request_bound(self.inner.acme.request_timeout, not_after);
        // The first CA of the chain that answers; the order falls back from there.
        let start = crate::acme::with_request_bound(
            bound,
            self.inner.chain.warm(self.inner.store.as_ref()),
        )
        .await?;
        let order_timeout = self.inner.acme.order_timeout;
        // A store without locks serves this process alone, whose name lock is held.
        let lock = match self.inner.store.as_lock_store() {
            Some(locks) => Some(
                locks
                    .lock(name, LOCK_LEASE, order_timeout + Duration::from_secs(30))
                    .await?
                    .ok_or_else(|| {
                        Error::timeout(format!(
                            "another process holds the lock on {name}; try again later"
                        ))
                    })?,
            ),
            None => None,
        };
        let result = crate::acme::with_request_bound(
            bound,
            self.order_under_lock(start, lock.as_deref(), &managed, seen, replaces),
        )
        .await;
        if let Some(lock) = lock
            && let Err(e) = lock.release().await
        {
            tracing::warn!(cert = %name, error = %e, "cannot release the store lock");
        }
        result
    }

    async fn order_under_lock(
        &self,
        start: usize,
        lock: Option<&dyn StoreLock>,
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

        // One order per challenge kind, in the configured order, until one validates.
        let kinds = managed.challenge.kinds();
        let mut stored = None;
        for (index, kind) in kinds.iter().enumerate() {
            let challenge = managed.challenge.first(*kind);
            let result = self
                .order_with(start, lock, managed, challenge, replaces.clone())
                .await;
            match result {
                Ok(done) => {
                    stored = Some(done);
                    break;
                }
                Err(e) if index + 1 < kinds.len() && tries_next_challenge(&e) => {
                    tracing::warn!(cert = %name, challenge = %kind, next = %kinds[index + 1], error = %e, "the challenge failed; ordering with the next one");
                }
                Err(e) => return Err(e),
            }
        }
        let stored = stored.ok_or_else(|| Error::config("no challenge kind configured"))?;
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

    /// One order validated through `challenge`'s own kind, stored when it succeeds.
    async fn order_with(
        &self,
        start: usize,
        lock: Option<&dyn StoreLock>,
        managed: &ManagedCert,
        challenge: ChallengeConfig,
        replaces: Option<String>,
    ) -> Result<crate::store::StoredCert> {
        let SolverHandle { solver, keep } = self.solver_for(&challenge).await?;
        let request = IssueRequest {
            name: managed.name.clone(),
            domains: managed.domains.clone(),
            key_type: managed.key_type,
            challenge,
            replaces,
            profile: managed.profile.clone(),
        };
        // Orders, validates (key matches, covers the names, not expired) and stores
        // atomically; nothing is written or served unless every step succeeded.
        let issuance = Issuance::with_solver(request, solver)?;
        let stored = self
            .inner
            .chain
            .issue_from(start, &issuance, self.inner.store.as_ref(), lock, None)
            .await;
        drop(keep);
        stored
    }

    async fn solver_for(&self, challenge: &ChallengeConfig) -> Result<SolverHandle> {
        let handle = match challenge.kind {
            // A webroot wins over the manager's registry: the certificate was set up (or
            // imported) to be validated by the web server that serves that directory.
            ChallengeKind::Http01 if challenge.http_webroot.is_some() => {
                let dir = challenge.http_webroot.clone().unwrap_or_default();
                SolverHandle::new(WebrootSolver::new(dir)?)
            }
            ChallengeKind::Http01 => match &self.inner.http01 {
                Some(registry) => SolverHandle::new(Http01Solver::new(registry.clone())),
                None => {
                    let addr = challenge.http_listen.as_deref().unwrap_or("0.0.0.0:80");
                    let addr = crate::listen::parse_addr(addr, "http_listen")?;
                    // With challenge tokens in the store, any instance answers the CA.
                    let store = &self.inner.store;
                    let shared = store.as_challenge_store().map(|_| store.clone());
                    let (listener, registry) = self.inner.standalone.http(addr, shared).await?;
                    let mut handle = SolverHandle::new(Http01Solver::new(registry));
                    handle.keep.push(listener);
                    handle
                }
            },
            ChallengeKind::TlsAlpn01 => match &challenge.tls_listen {
                Some(addr) if !self.inner.tls_alpn01_on_resolver => {
                    let addr = crate::listen::parse_addr(addr, "tls_listen")?;
                    let (listener, resolver) = self.inner.standalone.tls(addr).await?;
                    let mut handle = SolverHandle::new(TlsAlpn01Solver::new(resolver));
                    handle.keep.push(listener);
                    handle
                }
                _ => {
                    let resolver = self.inner.resolver.clone();
                    let store = &self.inner.store;
                    SolverHandle::new(match store.as_challenge_store() {
                        Some(_) => TlsAlpn01Solver::with_shared_store(resolver, store.clone())?,
                        None => TlsAlpn01Solver::new(resolver),
                    })
                }
            },
            ChallengeKind::Dns01 => {
                let dns = challenge.dns.as_ref().ok_or_else(|| {
                    Error::config("dns-01 needs a DNS provider in the certificate's settings")
                })?;
                SolverHandle::new(Dns01Solver::from_config(dns)?)
            }
        };
        Ok(handle)
    }
}

/// The bound on each CA request of an order for a certificate expiring at `not_after`:
/// the configured timeout, but never more than an eighth of the time left, so that a
/// renewal stuck on a dead path gives up in time to try again before expiry (the retry
/// backoff shrinks the same way, see [`RenewalPolicy::next_retry`]).
pub(super) fn request_bound(configured: Duration, not_after: Option<OffsetDateTime>) -> Duration {
    let Some(not_after) = not_after else {
        return configured;
    };
    let left = Duration::try_from(not_after - OffsetDateTime::now_utc()).unwrap_or_default();
    (left / 8).clamp(MIN_REQUEST_BOUND, configured.max(MIN_REQUEST_BOUND))
}

/// Whether an order that failed with `error` is worth repeating with the next challenge
/// kind: the CA did not offer this one, could not validate it (its port does not reach
/// this server), or it could not be set up here. CA and store failures are not.
fn tries_next_challenge(error: &Error) -> bool {
    matches!(error, Error::Challenge { .. } | Error::Dns { .. })
}

/// A solver plus whatever must live while it is used (standalone listeners).
pub(super) struct SolverHandle {
    pub(super) solver: Box<dyn Solver>,
    pub(super) keep: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl SolverHandle {
    pub(super) fn new(solver: impl Solver + 'static) -> Self {
        SolverHandle {
            solver: Box::new(solver),
            keep: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_lock_entry_lives_while_someone_holds_or_waits_for_it() {
        let locks = NameLocks::default();
        let held = locks.get("a.example.com").lock().await;
        assert!(locks.get("a.example.com").try_lock_owned().is_err());
        assert_eq!(locks.len(), 1, "a refused try keeps the holder's entry");
        let waiter = tokio::spawn({
            let lock = locks.get("a.example.com");
            async move {
                let _guard = lock.lock().await;
            }
        });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(locks.len(), 1, "the waiter still needs the entry");
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
        // A name taken again after its entry went gets a fresh lock.
        let again = locks.get("a.example.com").try_lock_owned();
        assert!(again.is_ok());
        drop(again);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn orders_leave_no_name_lock_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::FileStore::open(dir.path()).unwrap());
        let manager = Manager::builder(AcmeConfig::new("https://127.0.0.1:1/dir"), store)
            .build()
            .unwrap();
        for i in 0..100 {
            // Names the manager does not hold: each renewal fails at once.
            assert!(
                manager
                    .renew_reported(&format!("n{i}.example.com"))
                    .await
                    .is_err()
            );
        }
        assert_eq!(manager.inner.name_locks.len(), 0);
    }
}
