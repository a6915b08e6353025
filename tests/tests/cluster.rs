//! Cluster mode against real redis-server and Pebble: challenges answered by an
//! instance that did not place the order.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lobe_tls::challenge::ChallengeData;
use lobe_tls::cluster::{
    Cluster, SharedChallengeSolver, tls_alpn01_certified_key, tls_alpn01_share_value,
};
use lobe_tls::store::DynStore;
use lobe_tls::{
    AcmeClient, CertResolver, ChallengeKind, Http01Listener, Http01Registry, Http01Solver, KeyType,
    OrderRequest, RedisStore, Solver, domain,
};
use lobe_tls_tests::tls::TlsServer;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer, verify_chain};

async fn instance_store(redis: &RedisServer) -> DynStore {
    Arc::new(RedisStore::connect(&redis.url()).await.unwrap())
}

fn request(name: &str) -> OrderRequest {
    OrderRequest {
        domains: domain::parse_all(&[name]).unwrap(),
        key_type: KeyType::EcdsaP256,
        replaces: None,
    }
}

#[tokio::test]
async fn http01_validation_is_answered_by_an_instance_that_did_not_order() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let ordering = instance_store(&redis).await;
    let answering = instance_store(&redis).await;
    // Only the answering instance listens where Pebble validates.
    let ordering_registry = Http01Registry::with_shared_store(ordering.clone());
    let answering_registry = Http01Registry::with_shared_store(answering.clone());
    let _listener = Http01Listener::bind(&pebble.http_listen(), answering_registry.service())
        .await
        .unwrap();

    let client = AcmeClient::connect(&pebble.acme_config(), ordering.as_ref())
        .await
        .unwrap();
    let bundle = client
        .issue(
            &request("h1.example.com"),
            &Http01Solver::new(ordering_registry.clone()),
            None,
        )
        .await
        .unwrap();
    verify_chain(
        bundle.fullchain_pem(),
        &pebble.issuing_root_pem().await,
        "h1.example.com",
    )
    .unwrap();
    assert!(
        answering_registry.is_empty(),
        "the answering instance had no local token"
    );
    assert!(ordering_registry.is_empty());
    assert!(
        ordering
            .list_challenges("http-01/")
            .await
            .unwrap()
            .is_empty(),
        "shared tokens are removed when the order ends"
    );
}

/// A TLS-ALPN-01 solver local to one instance: serves the challenge certificate from
/// that instance's own resolver.
struct LocalTlsAlpn01 {
    resolver: CertResolver,
}

#[async_trait]
impl Solver for LocalTlsAlpn01 {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::TlsAlpn01
    }

    async fn present(&self, challenge: &ChallengeData) -> lobe_tls::Result<()> {
        let domain = challenge.domain.as_str();
        let key = tls_alpn01_certified_key(domain, &tls_alpn01_share_value(&challenge.digest))?;
        self.resolver.set_challenge(domain, key);
        Ok(())
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> lobe_tls::Result<()> {
        self.resolver.remove_challenge(challenge.domain.as_str());
        Ok(())
    }
}

#[tokio::test]
async fn tls_alpn01_validation_is_answered_by_an_instance_that_did_not_order() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let ordering = instance_store(&redis).await;
    let answering = instance_store(&redis).await;

    let answering_resolver = CertResolver::new();
    let _cluster = Cluster::builder(answering.clone())
        .resolver(answering_resolver.clone())
        .start()
        .unwrap();
    let _tls = TlsServer::bind(&pebble.tls_listen(), answering_resolver.clone()).await;
    // Let the follower subscribe before the order starts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ordering_resolver = CertResolver::new();
    let solver = SharedChallengeSolver::new(
        LocalTlsAlpn01 {
            resolver: ordering_resolver.clone(),
        },
        ordering.clone(),
    );
    let client = AcmeClient::connect(&pebble.acme_config(), ordering.as_ref())
        .await
        .unwrap();
    let bundle = client
        .issue(&request("t1.example.com"), &solver, None)
        .await
        .unwrap();
    verify_chain(
        bundle.fullchain_pem(),
        &pebble.issuing_root_pem().await,
        "t1.example.com",
    )
    .unwrap();
    assert!(
        ordering
            .list_challenges("tls-alpn-01/")
            .await
            .unwrap()
            .is_empty()
    );
}
