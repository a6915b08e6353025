//! A store with the core and nothing else, kept in memory: what an embedder's own store
//! looks like before it implements any capability. The tests of the refusals use it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{RenewalState, Store, StoredCert};
use crate::error::Result;

/// Certificates, accounts and renewal states in maps; no challenges, locks, secrets or
/// feed.
#[derive(Debug, Default)]
pub(crate) struct CoreOnly {
    certs: Mutex<BTreeMap<String, StoredCert>>,
    accounts: Mutex<BTreeMap<String, Vec<u8>>>,
    states: Mutex<BTreeMap<String, RenewalState>>,
}

fn locked<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Store for CoreOnly {
    async fn load_cert(&self, name: &str) -> Result<Option<StoredCert>> {
        Ok(locked(&self.certs).get(name).cloned())
    }

    async fn save_cert(&self, cert: &StoredCert) -> Result<()> {
        locked(&self.certs).insert(cert.meta.name.clone(), cert.clone());
        Ok(())
    }

    async fn list_certs(&self) -> Result<Vec<String>> {
        Ok(locked(&self.certs).keys().cloned().collect())
    }

    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(locked(&self.accounts).get(key).cloned())
    }

    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()> {
        locked(&self.accounts).insert(key.to_owned(), data.to_vec());
        Ok(())
    }

    async fn list_accounts(&self) -> Result<Vec<String>> {
        Ok(locked(&self.accounts).keys().cloned().collect())
    }

    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState> {
        Ok(locked(&self.states).get(name).cloned().unwrap_or_default())
    }

    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()> {
        locked(&self.states).insert(name.to_owned(), state.clone());
        Ok(())
    }

    async fn check_writable(&self) -> Result<()> {
        // Memory is always writable.
        Ok(())
    }
}

/// What a store with the core alone can and cannot be used for.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::acme::AcmeConfig;
    use crate::challenge::http01::Http01Registry;
    use crate::challenge::tls_alpn01::TlsAlpn01Solver;
    use crate::cluster::Cluster;
    use crate::manager::Manager;
    use crate::resolver::CertResolver;
    use crate::store::{DynStore, FileStore};

    fn core_only() -> DynStore {
        Arc::new(CoreOnly::default())
    }

    fn manager(store: DynStore) -> Manager {
        Manager::builder(AcmeConfig::new("https://127.0.0.1:1/dir"), store)
            .build()
            .unwrap()
    }

    fn message<T>(result: crate::Result<T>) -> String {
        match result {
            Ok(_) => panic!("not refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_store_with_the_core_alone_declares_no_capability() {
        let store = core_only();
        assert!(store.as_challenge_store().is_none());
        assert!(store.as_lock_store().is_none());
        assert!(store.as_secret_store().is_none());
        assert!(store.as_feed_store().is_none());
    }

    #[test]
    fn http01_shared_between_instances_is_refused_without_challenge_tokens() {
        let err = message(Http01Registry::with_shared_store(core_only()));
        assert_eq!(
            err,
            "store: HTTP-01 answered by every instance sharing the store needs a store with challenge tokens other instances can read, and this store has none (a Redis store has them all)"
        );
        // The file store serves one machine: it keeps no tokens either.
        let dir = tempfile::tempdir().unwrap();
        let files: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
        assert!(Http01Registry::with_shared_store(files).is_err());
    }

    #[test]
    fn tls_alpn01_shared_between_instances_is_refused_without_challenge_tokens() {
        let err = message(TlsAlpn01Solver::with_shared_store(
            CertResolver::new(),
            core_only(),
        ));
        assert!(err.contains("needs a store with challenge tokens"), "{err}");
    }

    #[tokio::test]
    async fn following_a_store_without_locks_is_refused() {
        let err = message(Cluster::builder(manager(core_only())).start());
        assert!(
            err.contains("following the store (one order per renewal across processes) needs a store with locks"),
            "{err}"
        );
    }

    #[cfg(feature = "watch")]
    #[tokio::test]
    async fn following_a_file_store_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let files: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
        assert!(Cluster::builder(manager(files)).start().is_ok());
    }

    #[tokio::test]
    async fn shared_session_ticket_keys_are_refused_without_secrets() {
        let config = crate::tickets::TicketConfig::default();
        let err = message(crate::tickets::SharedTickets::start(core_only(), config).await);
        assert!(
            err.contains("sharing the session ticket key needs a store with secrets"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn locking_a_name_is_refused_without_locks() {
        let store = core_only();
        let err =
            message(crate::issue::lock_name(store.as_ref(), "a", std::time::Duration::ZERO).await);
        assert!(
            err.contains("locking a certificate name needs a store with locks"),
            "{err}"
        );
    }

    /// The manager needs nothing but the core to serve what is stored.
    #[tokio::test]
    async fn a_manager_serves_from_a_store_with_the_core_alone() {
        let store = core_only();
        let key = crate::cert::KeyType::EcdsaP256.generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".to_owned()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let cert = params.self_signed(&key).unwrap();
        let bundle = crate::cert::CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
        let domains = crate::domain::parse_all(&["a.example.com"]).unwrap();
        let meta = crate::store::CertMeta::new("a", domains, "https://ca.invalid/dir");
        store
            .save_cert(&StoredCert::new(bundle, meta))
            .await
            .unwrap();
        let manager = manager(store);
        let report = manager.start().await.unwrap();
        assert_eq!(report.loaded, 1, "{report:?}");
        assert!(manager.resolver().lookup(Some("a.example.com")).is_some());
    }
}
