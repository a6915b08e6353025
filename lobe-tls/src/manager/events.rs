//! What the manager reports: events for subscribers, and the outcomes of its calls.

use time::OffsetDateTime;

use crate::cert::CertInfo;

/// What happened to a certificate, for subscribers (see [`Manager::subscribe`](super::Manager::subscribe)).
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

/// What [`Manager::renew_now`](super::Manager::renew_now) did.
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
    /// Another process (or another task of this one) renewed or issued it while this one
    /// waited for the lock; that certificate was loaded instead of ordering again.
    RenewedElsewhere {
        /// The certificate found in the store.
        info: CertInfo,
    },
}

/// What [`Manager::start`](super::Manager::start) did.
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

/// One certificate's state, as [`Manager::certificates`](super::Manager::certificates) reports it.
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
    /// The renewal window the CA suggested for the served certificate through ARI.
    pub ari_window: Option<(OffsetDateTime, OffsetDateTime)>,
    /// The ACME profile it is ordered under, if any.
    pub profile: Option<String>,
    /// After a failure, when the manager tries again.
    pub next_attempt: Option<OffsetDateTime>,
}
