//! Where certificates, accounts and renewal state live.
//!
//! The [`Store`] trait is small on purpose. Its locking and challenge-sharing powers have
//! working defaults for a single machine, so a store only overrides what it can do better
//! (the Redis store shares challenges across a cluster; the file store does not need to).

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
pub mod fs;
#[cfg(feature = "watch")]
mod fs_feed;
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
pub struct StoredCert {
    /// The PEM chain and key.
    pub bundle: CertBundle,
    /// What is needed to repeat the order.
    pub meta: CertMeta,
}

/// Renewal bookkeeping that outlives a process: failures, backoff, and ARI answers.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
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
        .ok_or_else(|| crate::error::Error::Certificate("no certificate in the chain".into()))?
        .map_err(|e| crate::error::Error::Certificate(format!("bad certificate PEM: {e}")))?;
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

/// A place to keep certificates, accounts and renewal state.
///
/// Implementations must write each certificate atomically: a reader sees the old
/// certificate and key, or the new ones, never a mix.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Loads a certificate by name. `Ok(None)` when there is none.
    async fn load_cert(&self, name: &str) -> Result<Option<StoredCert>>;

    /// Stores a certificate, replacing any previous one atomically.
    async fn save_cert(&self, cert: &StoredCert) -> Result<()>;

    /// Stores a certificate ordered under `lock`, only if `lock` is still held: a holder
    /// whose lease ran out (and whose name another process may have locked and renewed
    /// since) must not write over what is stored. Stores whose locks cannot be lost
    /// while their holder lives save as [`Store::save_cert`] does.
    async fn save_cert_fenced(&self, cert: &StoredCert, lock: &dyn StoreLock) -> Result<()> {
        let _ = lock;
        self.save_cert(cert).await
    }

    /// The names of all stored certificates, sorted.
    async fn list_certs(&self) -> Result<Vec<String>>;

    /// Loads an account blob by its key (derived from the directory URL and email).
    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Stores an account blob. It holds a private key: keep it private.
    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()>;

    /// Loads the renewal state of a certificate; the default state when there is none.
    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState>;

    /// Stores the renewal state of a certificate.
    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()>;

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
    /// The default knows nothing cheaply.
    async fn load_cert_versions(&self, names: &[String]) -> Result<Vec<Option<CertVersion>>> {
        Ok(vec![None; names.len()])
    }

    /// Takes the lock on `name`, waiting up to `wait` for another holder. While held,
    /// no other process using this store orders the same certificate. `lease` bounds
    /// how long a crashed holder can block others, where the store supports leases.
    ///
    /// Returns `Ok(None)` when the lock could not be had within `wait`.
    async fn lock(
        &self,
        name: &str,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<Box<dyn StoreLock>>>;

    /// Publishes a challenge response (an HTTP-01 key authorization, or TLS-ALPN-01
    /// material) so that other instances sharing this store can answer it.
    /// Single-machine stores need not do anything.
    async fn put_challenge(&self, _key: &str, _value: &str, _ttl: Duration) -> Result<()> {
        Ok(())
    }

    /// Looks up a challenge response published by any instance.
    async fn get_challenge(&self, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }

    /// Removes a published challenge response.
    async fn delete_challenge(&self, _key: &str) -> Result<()> {
        Ok(())
    }

    /// The keys of the published challenge responses that start with `prefix`, so a
    /// newly (re)connected instance can pick up challenges it missed.
    async fn list_challenges(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Loads a small secret blob shared by the processes using this store (the session
    /// ticket keys). `Ok(None)` when there is none, or the store cannot keep secrets.
    async fn load_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let _ = name;
        Ok(None)
    }

    /// Stores a small secret blob, readable only by this user (file mode 0600). The
    /// default refuses: such a store keeps its secrets per process.
    async fn save_secret(&self, name: &str, data: &[u8]) -> Result<()> {
        let _ = data;
        Err(crate::error::Error::Store(format!(
            "this store cannot keep the secret {name:?}; use a file or Redis store"
        )))
    }

    /// The keys of all stored accounts, sorted (for `lobe-tls store copy`).
    async fn list_accounts(&self) -> Result<Vec<String>>;

    /// Opens a feed of changes other processes make to this store: the instances of a
    /// cluster sharing Redis, or the processes on one machine sharing a directory.
    /// `None` when the store has no such feed.
    fn subscribe(&self) -> Option<StoreSubscription> {
        None
    }

    /// Whether other instances share this store, so that challenge responses published
    /// with [`Store::put_challenge`] reach them. False for a local directory.
    fn is_shared(&self) -> bool {
        false
    }
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
