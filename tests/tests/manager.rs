//! The manager against real Pebble: issuing, TLS-ALPN-01, ARI through a shim, renewals of
//! short-lived certificates under continuous handshakes, and failed renewals.

use std::sync::Arc;
use std::time::Duration;

use lobe_tls::challenge::ChallengeConfig;
use lobe_tls::manager::{Event, ManagedCert, Manager, RenewOutcome};
use lobe_tls::store::DynStore;
use lobe_tls::{FileStore, Http01Listener, Http01Registry, RenewalPolicy, domain};
use lobe_tls_tests::ari_shim::AriShim;
use lobe_tls_tests::tls::{TlsServer, client_config, handshake_leaf};
use lobe_tls_tests::{Pebble, PebbleOptions};
use time::OffsetDateTime;
use tokio::sync::broadcast;

fn cert(name: &str, domains: &[&str]) -> ManagedCert {
    ManagedCert::new(name, domain::parse_all(domains).unwrap())
}

fn tls_alpn(listen: Option<String>) -> ChallengeConfig {
    ChallengeConfig::tls_alpn01(listen)
}

/// A handshake as a browser trusting only `root_pem` makes it; the leaf it was served.
async fn handshake(
    addr: std::net::SocketAddr,
    name: &str,
    root_pem: &str,
) -> Result<lobe_tls::CertInfo, String> {
    handshake_leaf(addr, name, client_config(root_pem)).await
}

/// Waits for the first event that `pick` accepts, failing after `limit`.
async fn wait_for<T>(
    events: &mut broadcast::Receiver<Event>,
    limit: Duration,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    tokio::time::timeout(limit, async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event channel closed: {e}"),
            }
        }
    })
    .await
    .expect("the expected event did not arrive in time")
}

#[tokio::test]
async fn manager_issues_missing_certificates_serves_them_and_reloads_without_reordering() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();

    let manager = Manager::builder(pebble.acme_config(), store.clone())
        .http01(registry.clone())
        .cert(cert("chat", &["chat.example.com", "ws.example.com"]))
        .cert(cert("api", &["api.example.com"]))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    let report = manager.start().await.unwrap();
    assert_eq!(report.obtained, ["api", "chat"], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");

    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    for name in ["chat.example.com", "ws.example.com", "api.example.com"] {
        handshake(server.addr(), name, &root).await.unwrap();
    }
    let mut obtained = Vec::new();
    while obtained.len() < 2 {
        if let Event::Obtained { name, .. } = events.recv().await.unwrap() {
            obtained.push(name);
        }
    }
    obtained.sort();
    assert_eq!(obtained, ["api", "chat"]);

    // A second process over the same store loads what is there and orders nothing.
    let orders_before = pebble.orders_created();
    let again = Manager::builder(pebble.acme_config(), store.clone())
        .http01(registry)
        .cert(cert("chat", &["chat.example.com", "ws.example.com"]))
        .cert(cert("api", &["api.example.com"]))
        .build()
        .unwrap();
    let report = again.start().await.unwrap();
    assert_eq!(report.loaded, 2);
    assert!(report.obtained.is_empty());
    assert_eq!(pebble.orders_created(), orders_before);
    let first = handshake(server.addr(), "api.example.com", &root)
        .await
        .unwrap();
    let other = TlsServer::bind("127.0.0.1:0", again.resolver().clone()).await;
    let second = handshake(other.addr(), "api.example.com", &root)
        .await
        .unwrap();
    assert_eq!(first.serial, second.serial);

    // renew_now replaces it in both the store and the resolver; the other manager
    // picks it up with reload.
    let outcome = manager.renew_now("api").await.unwrap();
    let RenewOutcome::Ordered { info, .. } = outcome else {
        panic!("expected a new order, got {outcome:?}");
    };
    assert_ne!(info.serial, first.serial);
    let served = handshake(server.addr(), "api.example.com", &root)
        .await
        .unwrap();
    assert_eq!(served.serial, info.serial);
    assert!(again.reload("api").await.unwrap());
    let reloaded = handshake(other.addr(), "api.example.com", &root)
        .await
        .unwrap();
    assert_eq!(reloaded.serial, info.serial);
}

#[tokio::test]
async fn tls_alpn01_through_the_standalone_listener() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let manager = Manager::builder(pebble.acme_config(), store)
        .cert(
            cert("alpn", &["alpn.example.com"]).with_challenge(tls_alpn(Some(pebble.tls_listen()))),
        )
        .build()
        .unwrap();
    let report = manager.start().await.unwrap();
    assert_eq!(report.obtained, ["alpn"], "{report:?}");
    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    handshake(server.addr(), "alpn.example.com", &root)
        .await
        .unwrap();
    // The standalone listener is gone once no order needs it.
    lobe_tls_tests::wait_until(
        Duration::from_secs(5),
        "the standalone TLS-ALPN-01 listener closed",
        || async {
            tokio::net::TcpStream::connect(pebble.tls_listen())
                .await
                .is_err()
        },
    )
    .await;
}

#[tokio::test]
async fn tls_alpn01_through_the_proxys_own_resolver() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let manager = Manager::builder(pebble.acme_config(), store)
        .cert(
            cert("edge", &["edge.example.com", "www.edge.example.com"])
                .with_challenge(tls_alpn(None)),
        )
        .build()
        .unwrap();
    // The proxy serves the manager's resolver on the port the CA validates against.
    let server = TlsServer::bind(&pebble.tls_listen(), manager.resolver().clone()).await;
    let report = manager.start().await.unwrap();
    assert_eq!(report.obtained, ["edge"], "{report:?}");
    for name in ["edge.example.com", "www.edge.example.com"] {
        handshake(server.addr(), name, &root).await.unwrap();
        assert!(
            !manager.resolver().has_challenge(name),
            "challenge certificates are removed after the order"
        );
    }
}

#[tokio::test]
async fn short_lived_certificates_renew_across_lifetimes_and_every_handshake_is_valid() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(30),
        ..PebbleOptions::default()
    });
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let manager = Manager::builder(pebble.acme_config(), store)
        .http01(registry)
        .cert(cert("short", &["short.example.com"]))
        .check_interval(Duration::from_millis(250))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    let report = manager.start().await.unwrap();
    assert_eq!(report.obtained, ["short"], "{report:?}");
    let _maintenance = manager.spawn();
    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;

    // Three lifetimes of 30 s, a handshake every 100 ms.
    let until = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut serials = Vec::<String>::new();
    let mut handshakes = 0;
    while tokio::time::Instant::now() < until {
        let seen = handshake(server.addr(), "short.example.com", &root)
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed: {e}"));
        assert!(seen.not_after > OffsetDateTime::now_utc());
        if serials.last() != Some(&seen.serial) {
            serials.push(seen.serial);
        }
        handshakes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut renewed = 0;
    let mut failed = Vec::new();
    while let Ok(event) = events.try_recv() {
        match event {
            Event::Renewed { .. } => renewed += 1,
            Event::RenewalFailed { error, .. } => failed.push(error),
            _ => {}
        }
    }
    assert!(failed.is_empty(), "renewals failed: {failed:?}");
    assert!(renewed >= 4, "only {renewed} renewals in three lifetimes");
    assert!(
        serials.len() >= 4,
        "handshakes saw only {} certificates",
        serials.len()
    );
    assert!(handshakes > 300, "{handshakes} handshakes");
}

#[tokio::test]
async fn failed_renewal_keeps_serving_the_old_certificate_and_says_so() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(40),
        ..PebbleOptions::default()
    });
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let manager = Manager::builder(pebble.acme_config(), store.clone())
        .http01(registry)
        .cert(cert("fail", &["fail.example.com"]))
        .check_interval(Duration::from_millis(250))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    manager.start().await.unwrap();
    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    let before = handshake(server.addr(), "fail.example.com", &root)
        .await
        .unwrap();

    // The CA goes away; renewal is due at half-life (20 s).
    drop(pebble);
    let _maintenance = manager.spawn();
    let (failures, next_attempt) = wait_for(&mut events, Duration::from_secs(40), |e| match e {
        Event::RenewalFailed {
            failures,
            next_attempt,
            ..
        } => Some((*failures, *next_attempt)),
        _ => None,
    })
    .await;
    assert_eq!(failures, 1);
    assert!(
        next_attempt < before.not_after,
        "the retry must come before expiry"
    );
    let after = handshake(server.addr(), "fail.example.com", &root)
        .await
        .unwrap();
    assert_eq!(after.serial, before.serial, "the old certificate is served");
    // Retries continue on the backoff schedule and are persisted.
    wait_for(&mut events, Duration::from_secs(15), |e| match e {
        Event::RenewalFailed { failures, .. } if *failures >= 2 => Some(()),
        _ => None,
    })
    .await;
    let state = store.load_renewal_state("fail").await.unwrap();
    assert!(state.failures >= 2, "{state:?}");
    assert!(state.last_error.is_some());
    let stored = store.load_cert("fail").await.unwrap().unwrap();
    assert_eq!(stored.bundle.info().unwrap().serial, before.serial);
}

#[tokio::test]
async fn ari_window_decides_when_to_renew_and_replaces_names_the_old_certificate() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let shim = AriShim::start(&pebble).await;
    let now = OffsetDateTime::now_utc();
    shim.set_default_window((
        now + time::Duration::days(300),
        now + time::Duration::days(301),
    ));
    shim.set_retry_after(3600);

    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let mut acme = pebble.acme_config();
    acme.directory = shim.directory_url.clone();
    let manager = Manager::builder(acme, store)
        .http01(registry)
        .cert(cert("ari", &["ari.example.com"]))
        .check_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    manager.start().await.unwrap();
    let first = manager.certificates().remove(0).info.unwrap();
    let first_id = first
        .ari_id
        .clone()
        .expect("Pebble certificates carry an AKI");

    // The CA asks for this certificate to be renewed 4-8 s from now, long before its
    // lifetime-based renewal time.
    let start = OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let end = start + time::Duration::seconds(4);
    shim.set_window(&first_id, (start, end));
    let _maintenance = manager.spawn();
    let (serial, replaced) = wait_for(&mut events, Duration::from_secs(30), |e| match e {
        Event::Renewed {
            serial,
            replaced_serial,
            ..
        } => Some((serial.clone(), replaced_serial.clone())),
        _ => None,
    })
    .await;
    let renewed_at = OffsetDateTime::now_utc();
    assert_eq!(replaced, first.serial);
    assert!(
        renewed_at >= start,
        "renewed at {renewed_at}, before the window opened at {start}"
    );
    // The order itself takes a moment after the chosen time.
    assert!(
        renewed_at <= end + time::Duration::seconds(3),
        "renewed at {renewed_at}, after the window closed at {end}"
    );
    assert_eq!(shim.new_orders(), [None, Some(first_id.clone())]);
    assert!(shim.queries().contains(&first_id));

    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    let seen = handshake(server.addr(), "ari.example.com", &root)
        .await
        .unwrap();
    assert_eq!(seen.serial, serial);
    // The new certificate's window is months away: no second renewal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(shim.new_orders().len(), 2);
}

#[tokio::test]
async fn already_replaced_is_retried_without_replaces() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    let now = OffsetDateTime::now_utc();
    shim.set_default_window((
        now + time::Duration::days(300),
        now + time::Duration::days(301),
    ));
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let mut acme = pebble.acme_config();
    acme.directory = shim.directory_url.clone();
    // A one-second backoff: the default schedule's minute is covered through the CLI
    // (serve_renewal.rs); this test is about what the retry sends.
    let policy = RenewalPolicy::default().with_backoff(vec![time::Duration::seconds(1)]);
    let manager = Manager::builder(acme, store.clone())
        .http01(registry)
        .cert(cert("ari", &["ari.example.com"]))
        .policy(policy)
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    manager.start().await.unwrap();
    let first = manager.certificates().remove(0).info.unwrap();
    let first_id = first.ari_id.clone().unwrap();

    // The CA wants it renewed now, and says another order already replaced it.
    shim.refuse_replaces(true);
    let start = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    shim.set_window(&first_id, (start, start + time::Duration::seconds(2)));
    let _maintenance = manager.spawn();
    let error = wait_for(&mut events, Duration::from_secs(20), |e| match e {
        Event::RenewalFailed { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await;
    assert!(error.contains("alreadyReplaced"), "{error}");
    let state = store.load_renewal_state("ari").await.unwrap();
    assert_eq!(state.replaces_refused.as_deref(), Some(first_id.as_str()));
    let replaced = wait_for(&mut events, Duration::from_secs(20), |e| match e {
        Event::Renewed {
            replaced_serial, ..
        } => Some(replaced_serial.clone()),
        _ => None,
    })
    .await;
    assert_eq!(replaced, first.serial);
    // The successful retry went without `replaces`.
    assert_eq!(shim.new_orders(), [None, None]);
}

#[tokio::test]
async fn managing_stored_certificates_orders_one_that_expired_while_nothing_ran() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();

    // What a server finds after months switched off: a certificate that expired
    // yesterday, stored with the order it came from.
    let key = lobe_tls::KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["old.example.com".to_owned()]).unwrap();
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(91);
    params.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = params.self_signed(&key).unwrap();
    let meta = lobe_tls::CertMeta::new(
        "old",
        domain::parse_all(&["old.example.com"]).unwrap(),
        pebble.acme_config().directory,
    )
    .with_issued_at(OffsetDateTime::now_utc() - time::Duration::days(91));
    store
        .save_cert(&lobe_tls::StoredCert::new(
            lobe_tls::CertBundle::from_pem(expired.pem(), key.serialize_pem()).unwrap(),
            meta,
        ))
        .await
        .unwrap();

    let manager = Manager::builder(pebble.acme_config(), store.clone())
        .http01(registry)
        .manage_stored(true)
        .build()
        .unwrap();
    let report = manager.start().await.unwrap();
    assert_eq!(report.unusable.len(), 1, "{report:?}");
    assert!(report.unusable[0].1.contains("expired"), "{report:?}");
    assert_eq!(report.obtained, ["old"], "{report:?}");

    let server = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    let served = handshake(server.addr(), "old.example.com", &root)
        .await
        .unwrap();
    assert!(served.not_after > OffsetDateTime::now_utc());
    let stored = store.load_cert("old").await.unwrap().unwrap();
    assert!(stored.bundle.info().unwrap().not_after > OffsetDateTime::now_utc());
}

#[tokio::test]
async fn a_manager_on_a_directory_serves_what_other_processes_store_without_a_restart() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();

    // The long-running process, as `lobe-tls serve` runs it.
    let serving_store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let serving = Manager::builder(pebble.acme_config(), serving_store)
        .http01(registry.clone())
        .cert(cert("site", &["site.example.com"]))
        .build()
        .unwrap();
    let _follow = lobe_tls::cluster::Cluster::builder(serving.clone())
        .resync_interval(Duration::from_secs(3600))
        .start()
        .unwrap();
    serving.start().await.unwrap();
    let server = TlsServer::bind("127.0.0.1:0", serving.resolver().clone()).await;
    let first = handshake(server.addr(), "site.example.com", &root)
        .await
        .unwrap();

    // Another process with its own handle on the directory: `lobe-tls issue` of a new
    // certificate, then a forced `renew` of the served one.
    let other_store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let other = Manager::builder(pebble.acme_config(), other_store.clone())
        .http01(registry.clone())
        .cert(cert("blog", &["blog.example.com"]))
        .manage_stored(true)
        .build()
        .unwrap();
    other.start().await.unwrap();
    let renewed = other.renew_now("site").await.unwrap();
    assert!(
        matches!(renewed, RenewOutcome::Ordered { .. }),
        "{renewed:?}"
    );

    let picked_up = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let blog = handshake(server.addr(), "blog.example.com", &root).await;
            let site = handshake(server.addr(), "site.example.com", &root).await;
            if let (Ok(_), Ok(site)) = (blog, site)
                && site.serial != first.serial
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        picked_up.is_ok(),
        "the serving process did not pick up the new and the renewed certificate"
    );

    // A `lobe-tls revoke` elsewhere: the serving manager takes the recorded state and
    // counts the certificate as due at once.
    let current = other_store.load_cert("site").await.unwrap().unwrap();
    let mut state = other_store.load_renewal_state("site").await.unwrap();
    state.revoked_serial = Some(current.bundle.info().unwrap().serial);
    other_store
        .save_renewal_state("site", &state)
        .await
        .unwrap();
    let due_now = tokio::time::timeout(Duration::from_secs(3), async {
        while serving
            .due_at("site")
            .await
            .is_none_or(|due| due > OffsetDateTime::now_utc())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        due_now.is_ok(),
        "the revocation recorded elsewhere was not seen"
    );
}
