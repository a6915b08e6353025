//! An embedder's own store with the core `Store` trait alone (no challenge tokens, locks,
//! secrets or feed), against real Pebble: the manager issues and renews into it, and what
//! needs more than the core is refused up front.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lobe_tls::cluster::Cluster;
use lobe_tls::manager::{ManagedCert, Manager, RenewOutcome};
use lobe_tls::store::DynStore;
use lobe_tls::{Http01Listener, Http01Registry, RenewalState, Store, StoredCert, domain};
use lobe_tls_tests::{Pebble, PebbleOptions};

/// Everything in maps, as an embedder might keep it in a database of its own.
#[derive(Debug, Default)]
struct MapStore {
    certs: Mutex<BTreeMap<String, StoredCert>>,
    accounts: Mutex<BTreeMap<String, Vec<u8>>>,
    states: Mutex<BTreeMap<String, RenewalState>>,
}

#[async_trait]
impl Store for MapStore {
    async fn load_cert(&self, name: &str) -> lobe_tls::Result<Option<StoredCert>> {
        Ok(self.certs.lock().unwrap().get(name).cloned())
    }

    async fn save_cert(&self, cert: &StoredCert) -> lobe_tls::Result<()> {
        let mut certs = self.certs.lock().unwrap();
        certs.insert(cert.meta.name.clone(), cert.clone());
        Ok(())
    }

    async fn list_certs(&self) -> lobe_tls::Result<Vec<String>> {
        Ok(self.certs.lock().unwrap().keys().cloned().collect())
    }

    async fn load_account(&self, key: &str) -> lobe_tls::Result<Option<Vec<u8>>> {
        Ok(self.accounts.lock().unwrap().get(key).cloned())
    }

    async fn save_account(&self, key: &str, data: &[u8]) -> lobe_tls::Result<()> {
        let mut accounts = self.accounts.lock().unwrap();
        accounts.insert(key.to_owned(), data.to_vec());
        Ok(())
    }

    async fn list_accounts(&self) -> lobe_tls::Result<Vec<String>> {
        Ok(self.accounts.lock().unwrap().keys().cloned().collect())
    }

    async fn load_renewal_state(&self, name: &str) -> lobe_tls::Result<RenewalState> {
        Ok(self
            .states
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default())
    }

    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> lobe_tls::Result<()> {
        let mut states = self.states.lock().unwrap();
        states.insert(name.to_owned(), state.clone());
        Ok(())
    }

    async fn check_writable(&self) -> lobe_tls::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_store_with_the_core_alone_issues_and_renews_in_one_process() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let store: DynStore = Arc::new(MapStore::default());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let names = domain::parse_all(&["core.example.com"]).unwrap();
    let manager = Manager::builder(pebble.acme_config(), store.clone())
        .http01(registry)
        .cert(ManagedCert::new("core", names))
        .build()
        .unwrap();

    let report = manager.start().await.unwrap();
    assert_eq!(report.obtained, ["core"], "{report:?}");
    let first = store.load_cert("core").await.unwrap().unwrap();
    assert!(!store.list_accounts().await.unwrap().is_empty());

    // Without store locks, the manager's own lock on the name is the one that holds.
    match manager.renew_now("core").await.unwrap() {
        RenewOutcome::Ordered { .. } => {}
        other => panic!("not ordered: {other:?}"),
    }
    let second = store.load_cert("core").await.unwrap().unwrap();
    assert_ne!(
        first.bundle.fullchain_pem(),
        second.bundle.fullchain_pem(),
        "the renewed certificate was not stored"
    );

    // What needs more than the core is refused, with the capability it lacks.
    let shared = Http01Registry::with_shared_store(store.clone()).unwrap_err();
    assert!(shared.to_string().contains("challenge tokens"), "{shared}");
    let cluster = Cluster::builder(manager.clone()).start().unwrap_err();
    assert!(
        cluster.to_string().contains("needs a store with locks"),
        "{cluster}"
    );
}
