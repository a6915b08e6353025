//! Where certificates, accounts and renewal state live.
//!
//! The [`Store`] trait is the core every store has: certificates, accounts, renewal state
//! and listing. What a cluster needs besides is cut into capabilities a store has or
//! lacks, discovered through [`Store::as_challenge_store`] and its siblings:
//!
//! | capability        | trait              | file store        | Redis store |
//! |-------------------|--------------------|-------------------|-------------|
//! | challenge tokens  | [`ChallengeStore`] | no (one machine)  | yes         |
//! | locks             | [`LockStore`]      | yes (`flock`)     | yes (lease) |
//! | shared secrets    | [`SecretStore`]    | yes (mode 0600)   | yes         |
//! | change feed       | [`FeedStore`]      | with `watch`      | yes         |
//!
//! A configuration that needs a capability the store lacks is refused when it is set up.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::cert::{CertBundle, KeyType};
use crate::challenge::ChallengeConfig;
use crate::domain::DomainName;
use crate::error::Result;

mod copy;
#[cfg(test)]
pub(crate) mod core_only;
pub mod fs;
#[cfg(feature = "redis")]
pub mod redis;
mod secret;
mod spec;

pub use copy::{CopyReport, copy};
pub(crate) use secret::SharedSecret;
pub use spec::{REDIS_SCHEMES, StoreSpec, default_server_name, redact_url};

pub use fs::FileStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// What lobe-tls remembers about a certificate besides the PEM files, so that a later
/// `renew` can repeat the order exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CertMeta {
    /// The certificate's name in the store (`live/<name>/`).
    pub name: String,
    /// The names the certificate was ordered for.
    pub domains: Vec<DomainName>,
    /// The key type used for the order.
    pub key_type: KeyType,
    /// How the order was validated, without secrets.
    pub challenge: ChallengeConfig,
    /// The ACME directory URL the certificate came from.
    pub directory: String,
    /// When lobe-tls stored this certificate.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// The ACME profile asked for, used again on renewal; `None` for the CA's default
    /// (and in metadata written before profiles existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// A certificate with its metadata, as one unit of the store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoredCert {
    /// The PEM chain and key.
    pub bundle: CertBundle,
    /// What is needed to repeat the order.
    pub meta: CertMeta,
}

/// Renewal bookkeeping that outlives a process: failures, backoff, and ARI answers.
///
/// Start from [`RenewalState::default`] and set the fields that matter.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct RenewalState {
    /// Consecutive failed renewal attempts since the last success.
    pub failures: u32,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Do not try again before this time.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub next_attempt: Option<OffsetDateTime>,
    /// The renewal time picked inside the CA's ARI window, if the CA offers ARI.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ari_renew_at: Option<OffsetDateTime>,
    /// The CA's last suggested ARI window (start, end), as it answered it, for the
    /// certificate `ari_cert_id` names.
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ari_window_start: Option<OffsetDateTime>,
    /// See [`RenewalState::ari_window_start`].
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ari_window_end: Option<OffsetDateTime>,
    /// When to ask the CA's renewalInfo endpoint again.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub ari_next_poll: Option<OffsetDateTime>,
    /// The ARI identifier of the certificate the ARI fields above are about; they are
    /// stale once the certificate has been replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ari_cert_id: Option<String>,
    /// The serial of a certificate revoked through lobe-tls: it is due for renewal at once,
    /// and `list`/`check` report it as revoked until it is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_serial: Option<String>,
    /// The ARI identifier of a certificate the CA said was already replaced
    /// (`alreadyReplaced`, RFC 9773 §5): the next order for it goes without `replaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_refused: Option<String>,
}

impl CertMeta {
    /// The metadata of a certificate stored as `name` for `domains`, ordered from the CA
    /// at `directory` now, with an ECDSA P-256 key, validated by HTTP-01, under the CA's
    /// default profile; the `with_…` methods change the rest.
    pub fn new(
        name: impl Into<String>,
        domains: Vec<DomainName>,
        directory: impl Into<String>,
    ) -> Self {
        CertMeta {
            name: name.into(),
            domains,
            key_type: KeyType::EcdsaP256,
            challenge: ChallengeConfig::default(),
            directory: directory.into(),
            issued_at: OffsetDateTime::now_utc(),
            profile: None,
        }
    }

    /// The key type used for the order.
    #[must_use]
    pub fn with_key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// How the order was validated.
    #[must_use]
    pub fn with_challenge(mut self, challenge: ChallengeConfig) -> Self {
        self.challenge = challenge;
        self
    }

    /// When the certificate was stored.
    #[must_use]
    pub fn with_issued_at(mut self, issued_at: OffsetDateTime) -> Self {
        self.issued_at = issued_at;
        self
    }

    /// The ACME profile the order asked for.
    #[must_use]
    pub fn with_profile(mut self, profile: Option<String>) -> Self {
        self.profile = profile;
        self
    }
}

impl StoredCert {
    /// A certificate and the metadata to store with it.
    pub fn new(bundle: CertBundle, meta: CertMeta) -> Self {
        StoredCert { bundle, meta }
    }
}

impl RenewalState {
    /// Whether `serial` is the certificate recorded as revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked_serial.as_deref() == Some(serial)
    }

    /// The ARI window the CA suggested for `info`, if the recorded answer is about it.
    pub fn ari_window_for(
        &self,
        info: &crate::cert::CertInfo,
    ) -> Option<(OffsetDateTime, OffsetDateTime)> {
        if info.ari_id.is_none() || self.ari_cert_id != info.ari_id {
            return None;
        }
        self.ari_window_start.zip(self.ari_window_end)
    }
}

/// One certificate of a [`Store::load_cert_batch`].
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchEntry {
    /// The certificate's name.
    pub name: String,
    /// The certificate, as [`Store::load_cert`] gives it.
    pub cert: Result<Option<StoredCert>>,
    /// Its renewal state, as [`Store::load_renewal_state`] gives it (the default state
    /// when there is no certificate).
    pub state: Result<RenewalState>,
}

impl BatchEntry {
    /// The entries of a batch that failed as a whole (the store could not be read, a
    /// blocking task died): every name gets `error(name)` and the default state.
    pub(crate) fn all_failed(
        names: &[String],
        error: impl Fn(&str) -> crate::error::Error,
    ) -> Vec<Self> {
        names
            .iter()
            .map(|name| BatchEntry {
                name: name.clone(),
                cert: Err(error(name)),
                state: Ok(RenewalState::default()),
            })
            .collect()
    }
}

/// What tells one stored certificate from another without parsing its key: the serial of
/// its leaf and its renewal state. A follower compares it with what it serves (see
/// [`Store::load_cert_versions`]) and reads in full only what differs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CertVersion {
    /// The leaf certificate's serial number, as [`CertInfo::serial`] gives it.
    ///
    /// [`CertInfo::serial`]: crate::cert::CertInfo::serial
    pub serial: String,
    /// The certificate's renewal state.
    pub state: RenewalState,
}

impl CertVersion {
    /// A version from its parts.
    pub fn new(serial: impl Into<String>, state: RenewalState) -> Self {
        CertVersion {
            serial: serial.into(),
            state,
        }
    }
}

/// The serial of the first certificate of a PEM chain, without touching any key: the
/// cheap half of what [`CertVersion`] compares.
pub(crate) fn leaf_serial(fullchain_pem: &str) -> Result<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
        .next()
        .ok_or_else(|| {
            crate::error::Error::certificate(
                crate::error::CertificateErrorKind::Malformed,
                "no certificate in the chain",
            )
        })?
        .map_err(|e| {
            crate::error::Error::certificate(
                crate::error::CertificateErrorKind::Malformed,
                format!("bad certificate PEM: {e}"),
            )
            .with_source(e)
        })?;
    Ok(crate::cert::CertInfo::from_der(&leaf)?.serial)
}

/// A held lock on one certificate name. Dropping it releases the lock, best effort;
/// call [`StoreLock::release`] to release it and learn whether that worked.
#[async_trait]
pub trait StoreLock: Send + Sync {
    /// Releases the lock.
    async fn release(self: Box<Self>) -> Result<()>;

    /// The token that fences writes made under this lock, for stores whose locks can be
    /// lost while their holder lives (a lease that ran out). `None` for locks that end
    /// only with their holder (a file lock).
    fn fencing_token(&self) -> Option<&str> {
        None
    }
}

/// A place to keep certificates, accounts and renewal state: the core every store has.
///
/// Implementations must write each certificate atomically: a reader sees the old
/// certificate and key, or the new ones, never a mix.
///
/// What a cluster needs besides (challenge tokens, locks, shared secrets, a change feed)
/// are separate traits: [`ChallengeStore`], [`LockStore`], [`SecretStore`] and
/// [`FeedStore`]. A store that has one implements it and hands it out through the
/// matching `as_…` method here; the defaults say it has none. Whatever needs a capability
/// the store lacks (HTTP-01 answered by any instance of a cluster, a cluster follower,
/// shared session ticket keys) is refused when it is set up, with an error that says
/// what is missing, never silently done half.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Loads a certificate by name. `Ok(None)` when there is none.
    async fn load_cert(&self, name: &str) -> Result<Option<StoredCert>>;

    /// Stores a certificate, replacing any previous one atomically.
    async fn save_cert(&self, cert: &StoredCert) -> Result<()>;

    /// The names of all stored certificates, sorted.
    async fn list_certs(&self) -> Result<Vec<String>>;

    /// Loads an account blob by its key (derived from the directory URL and email).
    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores an account blob. It holds a private key: keep it private.
    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()>;

    /// The keys of all stored accounts, sorted (for `lobe-tls store copy`).
    async fn list_accounts(&self) -> Result<Vec<String>>;

    /// Loads the renewal state of a certificate; the default state when there is none.
    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState>;

    /// Stores the renewal state of a certificate.
    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()>;

    /// Checks that this process can write the store, by writing something harmless and
    /// removing it, so that a store it cannot write is found at start rather than at the
    /// first renewal, weeks later.
    async fn check_writable(&self) -> Result<()>;

    /// Loads a batch of certificates with their renewal state, as start-up does for
    /// everything stored. Each result is what [`Store::load_cert`] and
    /// [`Store::load_renewal_state`] would give for that name.
    ///
    /// The default asks for one name after another; a store that can read a batch more
    /// cheaply (the file store, in one trip to a blocking thread) overrides it.
    async fn load_cert_batch(&self, names: &[String]) -> Vec<BatchEntry> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let cert = self.load_cert(name).await;
            let state = match cert {
                Ok(Some(_)) => self.load_renewal_state(name).await,
                _ => Ok(RenewalState::default()),
            };
            out.push(BatchEntry {
                name: name.clone(),
                cert,
                state,
            });
        }
        out
    }

    /// For each of `names`, the stored certificate's [`CertVersion`], read without parsing
    /// any private key, so that a follower re-syncing thousands of certificates reads in
    /// full only those that changed. `None` for a name the store cannot tell about
    /// cheaply (nothing stored, unreadable, or a store without the ability): read that one
    /// in full. An error only when the store cannot be read at all.
    ///
    /// The default knows nothing cheaply, so every name is read in full.
    async fn load_cert_versions(&self, names: &[String]) -> Result<Vec<Option<CertVersion>>> {
        Ok(vec![None; names.len()])
    }

    /// The store's challenge tokens, if it keeps them where other instances see them.
    fn as_challenge_store(&self) -> Option<&dyn ChallengeStore> {
        None
    }

    /// The store's per-name locks, if it has them.
    fn as_lock_store(&self) -> Option<&dyn LockStore> {
        None
    }

    /// The store's shared secrets, if it can keep them.
    fn as_secret_store(&self) -> Option<&dyn SecretStore> {
        None
    }

    /// The store's change feed, if it has one.
    fn as_feed_store(&self) -> Option<&dyn FeedStore> {
        None
    }
}

/// Challenge responses (HTTP-01 key authorizations, TLS-ALPN-01 material) kept where
/// every instance sharing the store can read them, so that any instance answers the CA,
/// wherever the load balancer sends it. Keys are `http-01/<token>` and
/// `tls-alpn-01/<domain>`.
#[async_trait]
pub trait ChallengeStore: Send + Sync {
    /// Publishes a challenge response for `ttl` (longer than any order runs).
    async fn put_challenge(&self, key: &str, value: &str, ttl: Duration) -> Result<()>;

    /// Looks up a challenge response published by any instance.
    async fn get_challenge(&self, key: &str) -> Result<Option<String>>;

    /// Removes a published challenge response.
    async fn delete_challenge(&self, key: &str) -> Result<()>;

    /// The keys of the published challenge responses that start with `prefix`, sorted, so
    /// a newly (re)connected instance can pick up challenges it missed.
    async fn list_challenges(&self, prefix: &str) -> Result<Vec<String>>;
}

/// Per-name locks that every process using the store honours: while one holds the lock
/// on a certificate name, no other orders that certificate.
#[async_trait]
pub trait LockStore: Send + Sync {
    /// Takes the lock on `name`, waiting up to `wait` for another holder. `lease` bounds
    /// how long a crashed holder can block others, where the store supports leases.
    ///
    /// Returns `Ok(None)` when the lock could not be had within `wait`.
    async fn lock(
        &self,
        name: &str,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<Box<dyn StoreLock>>>;

    /// Stores a certificate ordered under `lock`, only if `lock` is still held: a holder
    /// whose lease ran out (and whose name another process may have locked and renewed
    /// since) must not write over what is stored. A store whose locks end only with
    /// their holder saves as [`Store::save_cert`] does.
    async fn save_cert_fenced(&self, cert: &StoredCert, lock: &dyn StoreLock) -> Result<()>;
}

/// Small secret blobs every process sharing the store must agree on (session ticket
/// keys, the affinity cookie key). lobe-tls creates and rotates them under the store's
/// lock ([`LockStore`]), so sharing a secret needs both.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Loads a secret blob. `Ok(None)` when there is none.
    async fn load_secret(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Stores a secret blob, readable only by this user (file mode 0600 or the like).
    async fn save_secret(&self, name: &str, data: &[u8]) -> Result<()>;
}

/// A feed of the changes other processes make to the store: the instances of a cluster
/// sharing Redis, or the processes on one machine sharing a directory.
pub trait FeedStore: Send + Sync {
    /// Opens a feed. Errors when it cannot be opened now (a directory that cannot be
    /// watched).
    fn subscribe(&self) -> Result<StoreSubscription>;
}

/// What a store can do besides the core, and the names of the capabilities for messages.
impl dyn Store + '_ {
    /// The challenge tokens, or an error saying that `needed_for` needs them.
    pub fn challenges_for(&self, needed_for: &str) -> Result<&dyn ChallengeStore> {
        self.as_challenge_store()
            .ok_or_else(|| missing(needed_for, "challenge tokens other instances can read"))
    }

    /// The locks, or an error saying that `needed_for` needs them.
    pub fn locks_for(&self, needed_for: &str) -> Result<&dyn LockStore> {
        self.as_lock_store()
            .ok_or_else(|| missing(needed_for, "locks"))
    }

    /// The shared secrets, or an error saying that `needed_for` needs them.
    pub fn secrets_for(&self, needed_for: &str) -> Result<&dyn SecretStore> {
        self.as_secret_store()
            .ok_or_else(|| missing(needed_for, "secrets"))
    }

    /// The change feed, or an error saying that `needed_for` needs it.
    pub fn feed_for(&self, needed_for: &str) -> Result<&dyn FeedStore> {
        self.as_feed_store()
            .ok_or_else(|| missing(needed_for, "a change feed"))
    }
}

/// The refusal of a configuration that needs a capability the store lacks.
fn missing(needed_for: &str, capability: &str) -> crate::error::Error {
    crate::error::Error::store(
        None,
        crate::error::StoreErrorKind::Unsupported,
        format!(
            "{needed_for} needs a store with {capability}, and this store has none (a Redis store has them all)"
        ),
    )
}

/// A change to a shared store, as announced to every subscribed instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// A certificate was saved under this name.
    CertSaved(String),
    /// A challenge response was published under this key.
    ChallengePut(String),
    /// A challenge response was removed.
    ChallengeDeleted(String),
    /// The feed was (re)connected: events may have been missed, so re-read what matters.
    Resync,
    /// The feed lost its connection: until the next [`StoreEvent::Resync`], changes may
    /// go unannounced, so what was learnt from events alone may be stale.
    FeedLost,
}

/// A live feed of [`StoreEvent`]s. Dropping it stops the feed.
#[derive(Debug)]
pub struct StoreSubscription {
    events: tokio::sync::mpsc::Receiver<StoreEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl StoreSubscription {
    /// Wraps a receiver fed by `task`; the task is stopped when the subscription drops.
    pub fn new(
        events: tokio::sync::mpsc::Receiver<StoreEvent>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        StoreSubscription { events, task }
    }

    /// The next event; `None` once the feed has stopped for good.
    pub async fn recv(&mut self) -> Option<StoreEvent> {
        self.events.recv().await
    }
}

impl Drop for StoreSubscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A shared handle to any store.
pub type DynStore = Arc<dyn Store>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata written before profiles and ARI windows existed still loads, and writes
    /// the new fields only when they are set.
    #[test]
    fn metadata_and_state_from_before_profiles_still_load() {
        let old = r#"{"name":"a","domains":["a.example.com"],"key_type":"ecdsa-p256",
            "challenge":{"kind":"http-01"},"directory":"https://ca.test/dir",
            "issued_at":"2026-01-01T00:00:00Z"}"#;
        let meta: CertMeta = serde_json::from_str(old).unwrap();
        assert_eq!(meta.profile, None);
        assert!(!serde_json::to_string(&meta).unwrap().contains("profile"));
        let with = CertMeta {
            profile: Some("shortlived".into()),
            ..meta
        };
        let json = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<CertMeta>(&json).unwrap(), with);

        let state: RenewalState = serde_json::from_str(r#"{"failures":0}"#).unwrap();
        assert_eq!(state, RenewalState::default());
        assert!(
            !serde_json::to_string(&state)
                .unwrap()
                .contains("ari_window")
        );
    }
}
