//! A first end-to-end order against Pebble.

use lobe_tls::{
    AcmeClient, FileStore, Http01Listener, Http01Registry, Http01Solver, KeyType, OrderRequest,
    domain,
};
use lobe_tls_tests::{Pebble, PebbleOptions, verify_chain};

#[tokio::test]
async fn http01_single_name_verifies_against_pebble_root() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let client = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap();
    let registry = Http01Registry::new();
    let _listener = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let request = OrderRequest {
        domains: domain::parse_all(&["smoke.example.com"]).unwrap(),
        key_type: KeyType::EcdsaP256,
        replaces: None,
    };
    let bundle = client
        .issue(&request, &Http01Solver::new(registry.clone()), None)
        .await
        .unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(bundle.fullchain_pem(), &root, "smoke.example.com").unwrap();
    assert!(
        registry.is_empty(),
        "tokens must be removed when the order ends"
    );
}
