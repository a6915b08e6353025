//! What the manager knows about each name, and installing a certificate into it.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use crate::cert::{CertInfo, KeyType};
use crate::domain::DomainName;
use crate::store::RenewalState;

use super::*;

/// What the manager knows about one name.
pub(super) struct Slot {
    /// How to order it; `None` for a stored certificate that is served but not renewed.
    pub(super) managed: Option<ManagedCert>,
    pub(super) current: Option<Current>,
    pub(super) state: RenewalState,
    /// The configuration asks for other names or another key type than the stored
    /// order, which was stored before this manager started: re-order (on the backoff).
    pub(super) reissue: bool,
    /// Another process stored a different order since this manager started: serve and
    /// renew that order as it is.
    pub(super) conflict: Option<Conflict>,
    /// The serial an ExpiringSoon event was last sent for.
    pub(super) warned_serial: Option<String>,
}

/// The order of a stored certificate that disagrees with the configuration.
pub(super) struct Conflict {
    pub(super) domains: Vec<DomainName>,
    pub(super) key_type: KeyType,
}

impl Slot {
    pub(super) fn managed(cert: ManagedCert) -> Self {
        Slot::new(Some(cert))
    }

    pub(super) fn new(managed: Option<ManagedCert>) -> Self {
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
    pub(super) fn order(&self) -> Option<ManagedCert> {
        let mut order = self.managed.clone()?;
        if let Some(conflict) = &self.conflict {
            order.domains = conflict.domains.clone();
            order.key_type = conflict.key_type;
        }
        Some(order)
    }

    /// When a re-issue for a changed configuration may run: now, or after the backoff
    /// when the last attempt failed.
    pub(super) fn reissue_at(&self) -> OffsetDateTime {
        match self.state.next_attempt {
            Some(retry) if self.state.failures > 0 => retry,
            _ => OffsetDateTime::UNIX_EPOCH,
        }
    }
}

pub(super) struct Current {
    pub(super) info: CertInfo,
    pub(super) key: Arc<CertifiedKey>,
    /// The directory of the CA that issued it: ARI polls ask that CA.
    pub(super) directory: String,
    /// The names it is served for.
    pub(super) names: Vec<String>,
}

/// What putting a certificate into its slot asks of the resolver: serve `key` for
/// `names`, stop serving `stale` (names the previous certificate covered and this one
/// does not), and announce `conflict` if there is one.
pub(super) struct Placed {
    pub(super) names: Vec<String>,
    pub(super) key: Arc<CertifiedKey>,
    pub(super) stale: Vec<String>,
    pub(super) conflict: Option<Event>,
}

impl Manager {
    /// Puts `loaded` into `name`'s slot (made if missing). The one install path: the
    /// start-up load and every later install go through it, and differ only in how they
    /// hand the result to the resolver (in one batch, or at once).
    pub(super) fn place(
        &self,
        slots: &mut HashMap<String, Slot>,
        name: &str,
        loaded: Loaded,
    ) -> Placed {
        let names: Vec<String> = loaded
            .meta
            .domains
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect();
        let manage_stored = self.inner.manage_stored;
        let slot = slots.entry(name.to_owned()).or_insert_with(|| {
            Slot::new(manage_stored.then(|| ManagedCert::from_meta(&loaded.meta)))
        });
        let stale = match &slot.current {
            Some(old) => old
                .names
                .iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let conflict = self.judge_order(name, slot, &loaded);
        slot.state = loaded.state;
        slot.current = Some(Current {
            info: loaded.info,
            key: loaded.key.clone(),
            directory: loaded.meta.directory,
            names: names.clone(),
        });
        Placed {
            names,
            key: loaded.key,
            stale,
            conflict,
        }
    }

    /// Serves `loaded` for `name`, replacing what was served, and forgets names the
    /// new certificate no longer covers.
    pub(super) fn install(&self, name: &str, loaded: Loaded) {
        let mut slots = self.inner.slots();
        let placed = self.place(&mut slots, name, loaded);
        // Swap first, then drop stale names: a handshake never finds a gap.
        self.inner.resolver.set(&placed.names, placed.key);
        if !placed.stale.is_empty() {
            self.inner.resolver.remove(&placed.stale);
        }
        drop(slots);
        if let Some(event) = placed.conflict {
            self.emit(event);
        }
        self.wake();
    }

    /// Compares a stored order with the configuration. One stored before this manager
    /// started is re-issued (the configuration changed); one another process stored
    /// since is a peer's newer decision: it is kept and renewed as it is, and announced
    /// once (event and log line) rather than re-ordered, so that instances running
    /// different configurations never re-order against each other.
    pub(super) fn judge_order(
        &self,
        name: &str,
        slot: &mut Slot,
        loaded: &Loaded,
    ) -> Option<Event> {
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
}
