//! Cluster mode: keeps one instance in step with the others that share a store (Redis).
//!
//! - A certificate another instance saved is swapped in here within a second, through
//!   the store's change feed, and a periodic re-sync catches announcements lost while
//!   the store was unreachable.
//! - TLS-ALPN-01 challenges another instance started are answered here too: their
//!   material is copied from the store into the local [`CertResolver`] as it is
//!   announced, so a handshake never waits on the store.
//! - HTTP-01 needs no glue: give the proxy an [`Http01Registry::with_shared_store`]
//!   (local memory first, then the store).
//!
//! One order per renewal comes from the store's per-name lock, which the renewal
//! manager takes before ordering and re-checks the store after taking.
//!
//! [`Http01Registry::with_shared_store`]: crate::challenge::http01::Http01Registry::with_shared_store

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use tokio::task::JoinHandle;

use crate::cert::KeyType;
use crate::challenge::{ChallengeData, ChallengeKind, Solver};
use crate::error::{Error, Result};
use crate::resolver::CertResolver;
use crate::store::{DynStore, StoreEvent};

/// The store key prefix of shared TLS-ALPN-01 material: `tls-alpn-01/<domain>`.
pub const TLS_ALPN01_PREFIX: &str = "tls-alpn-01/";

/// How often every loaded certificate is re-read from the store, in case an
/// announcement was lost.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// How long shared TLS-ALPN-01 material lives if cleanup never runs.
const SHARED_CHALLENGE_TTL: Duration = Duration::from_secs(600);

/// What the cluster glue drives: whatever keeps this instance's certificates loaded
/// (the renewal manager).
#[async_trait]
pub trait ClusterMember: Send + Sync {
    /// The store names of the certificates this instance serves.
    fn cert_names(&self) -> Vec<String>;

    /// Re-reads certificate `name` from the store and serves it if it changed.
    async fn reload(&self, name: &str) -> Result<()>;
}

/// Builds a [`Cluster`].
pub struct ClusterBuilder {
    store: DynStore,
    member: Option<Arc<dyn ClusterMember>>,
    resolver: Option<CertResolver>,
    resync_interval: Duration,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("store", &self.store)
            .field("member", &self.member.is_some())
            .field("resolver", &self.resolver)
            .field("resync_interval", &self.resync_interval)
            .finish()
    }
}

impl ClusterBuilder {
    /// Keeps `member`'s certificates in step with the store.
    pub fn member(mut self, member: Arc<dyn ClusterMember>) -> Self {
        self.member = Some(member);
        self
    }

    /// Copies TLS-ALPN-01 challenges other instances started into `resolver`.
    pub fn resolver(mut self, resolver: CertResolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// How often to re-read everything as a fallback for lost announcements
    /// (default [`DEFAULT_RESYNC_INTERVAL`]).
    pub fn resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// Starts following the store. Must be called inside a tokio runtime.
    pub fn start(self) -> Result<Cluster> {
        let subscription = self.store.subscribe().ok_or_else(|| {
            Error::Config(
                "cluster mode needs a shared store with a change feed: use --store redis://..."
                    .into(),
            )
        })?;
        let follower = Follower {
            store: self.store,
            member: self.member,
            resolver: self.resolver,
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
    /// Starts building a follower of `store`.
    pub fn builder(store: DynStore) -> ClusterBuilder {
        ClusterBuilder {
            store,
            member: None,
            resolver: None,
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
    store: DynStore,
    member: Option<Arc<dyn ClusterMember>>,
    resolver: Option<CertResolver>,
    /// TLS-ALPN-01 names whose challenge certificate came from the store.
    installed_challenges: HashSet<String>,
    /// Whether the last store access failed, so an outage is logged once.
    failing: bool,
}

impl Follower {
    async fn run(mut self, mut subscription: crate::store::StoreSubscription, every: Duration) {
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
        }
    }

    async fn reload(&mut self, name: &str) {
        let Some(member) = &self.member else { return };
        if !member.cert_names().iter().any(|n| n == name) {
            return;
        }
        let result = member.reload(name).await;
        self.note(result, name);
    }

    /// Re-reads every certificate and the set of shared TLS-ALPN-01 challenges.
    async fn resync(&mut self) {
        if let Some(member) = self.member.clone() {
            for name in member.cert_names() {
                let result = member.reload(&name).await;
                self.note(result, &name);
            }
        }
        if self.resolver.is_none() {
            return;
        }
        let listed = self.store.list_challenges(TLS_ALPN01_PREFIX).await;
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
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        let key = format!("{TLS_ALPN01_PREFIX}{domain}");
        let fetched = self.store.get_challenge(&key).await;
        let Some(value) = self.note(fetched, &key) else {
            return;
        };
        // Gone already: the order finished before we looked.
        let Some(value) = value else { return };
        match tls_alpn01_certified_key(domain, &value) {
            Ok(certified) => {
                resolver.set_challenge(domain, certified);
                self.installed_challenges.insert(domain.to_owned());
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "ignoring bad shared TLS-ALPN-01 material")
            }
        }
    }

    fn remove_challenge(&mut self, domain: &str) {
        if self.installed_challenges.remove(domain) {
            if let Some(resolver) = &self.resolver {
                resolver.remove_challenge(domain);
            }
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

/// The shared value for a TLS-ALPN-01 challenge: base64url of the key authorization's
/// SHA-256 digest. Each instance builds its own challenge certificate from it, so no
/// private key crosses the store.
pub fn tls_alpn01_share_value(digest: &[u8; 32]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// Builds the TLS-ALPN-01 challenge certificate (RFC 8737) for `domain` from a shared
/// value made by [`tls_alpn01_share_value`].
pub fn tls_alpn01_certified_key(
    domain: &str,
    shared: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>> {
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(shared.trim())
        .ok()
        .filter(|d| d.len() == 32)
        .ok_or_else(|| {
            Error::Challenge(format!(
                "shared TLS-ALPN-01 material for {domain} is not a base64url SHA-256 digest"
            ))
        })?;
    let key = KeyType::EcdsaP256.generate()?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()])
        .map_err(|e| Error::Challenge(format!("TLS-ALPN-01 certificate for {domain}: {e}")))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Challenge(format!("TLS-ALPN-01 certificate for {domain}: {e}")))?;
    // Built directly: webpki's key-match check refuses the critical acmeIdentifier
    // extension, which is the point of this certificate.
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing_key = crate::cert::crypto_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| Error::Challenge(format!("TLS-ALPN-01 key for {domain}: {e}")))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// Wraps a TLS-ALPN-01 solver so that the challenges it presents are published to the
/// shared store too, and any instance of the cluster can answer the CA's handshake.
/// Other challenge kinds pass through unchanged (HTTP-01 shares through its registry).
pub struct SharedChallengeSolver<S> {
    inner: S,
    store: DynStore,
}

impl<S> std::fmt::Debug for SharedChallengeSolver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedChallengeSolver")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<S: Solver> SharedChallengeSolver<S> {
    /// Publishes what `inner` presents to `store`.
    pub fn new(inner: S, store: DynStore) -> Self {
        SharedChallengeSolver { inner, store }
    }
}

#[async_trait]
impl<S: Solver> Solver for SharedChallengeSolver<S> {
    fn kind(&self) -> ChallengeKind {
        self.inner.kind()
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        self.inner.present(challenge).await?;
        if self.inner.kind() == ChallengeKind::TlsAlpn01 {
            self.store
                .put_challenge(
                    &format!("{TLS_ALPN01_PREFIX}{}", challenge.domain.as_str()),
                    &tls_alpn01_share_value(&challenge.digest),
                    SHARED_CHALLENGE_TTL,
                )
                .await?;
        }
        Ok(())
    }

    async fn wait_visible(&self, challenge: &ChallengeData) -> Result<()> {
        self.inner.wait_visible(challenge).await
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        let local = self.inner.cleanup(challenge).await;
        if self.inner.kind() == ChallengeKind::TlsAlpn01 {
            self.store
                .delete_challenge(&format!("{TLS_ALPN01_PREFIX}{}", challenge.domain.as_str()))
                .await?;
        }
        local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn01_material_round_trips_into_a_certificate_with_the_digest() {
        let digest = [7u8; 32];
        let shared = tls_alpn01_share_value(&digest);
        let key = tls_alpn01_certified_key("a.example.com", &shared).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        // id-pe-acmeIdentifier, critical, holding an OCTET STRING of the digest.
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
        assert!(tls_alpn01_certified_key("a.example.com", "short").is_err());
    }
}
