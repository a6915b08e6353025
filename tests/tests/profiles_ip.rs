//! ACME profiles through the shim in front of Pebble (Pebble 2.4 lists none), IP address
//! certificates (RFC 8738) from Pebble through HTTP-01 and TLS-ALPN-01, served to clients
//! that connect to the address without SNI, and ARI under pressure: a window that opened
//! already, and the window exported as a metric.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lobe_tls::challenge::ChallengeConfig;
use lobe_tls::issue::{Issuance, IssueRequest};
use lobe_tls::manager::{Event, ManagedCert, Manager};
use lobe_tls::resolver::LocalAddrConfigs;
use lobe_tls::store::DynStore;
use lobe_tls::{
    AcmeClient, CertResolver, FileStore, Http01Listener, Http01Registry, KeyType, Metrics, domain,
};
use lobe_tls_tests::ari_shim::AriShim;
use lobe_tls_tests::tls::{client_config, handshake_leaf, server_config};
use lobe_tls_tests::{Pebble, PebbleOptions};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// A TLS server that picks its configuration by the local address of each connection,
/// as the terminator does with `with_ip_certs`. Stops when dropped.
struct LocalAddrServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LocalAddrServer {
    async fn bind(addr: &str, resolver: CertResolver) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let configs = Arc::new(LocalAddrConfigs::new(
            server_config(resolver.clone()),
            resolver,
        ));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(configs.config_for(local.ip()));
                tokio::spawn(async move {
                    let _ = acceptor.accept(stream).await;
                });
            }
        });
        LocalAddrServer { addr, task }
    }
}

impl Drop for LocalAddrServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `addr` as a client that asked for `https://<ip>/`: the server name is the
/// address, so rustls sends no SNI and checks the leaf for an IP address SAN.
async fn handshake_ip(addr: SocketAddr, root: &str) -> Result<lobe_tls::CertInfo, String> {
    handshake_leaf(addr, &addr.ip().to_string(), client_config(root)).await
}

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
async fn an_ip_certificate_is_issued_through_http01_under_shortlived_and_served_without_sni() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    shim.set_profiles(&["classic", "shortlived", "tlsserver"]);
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let mut acme = pebble.acme_config();
    acme.directory = shim.directory_url.clone();
    let domains = domain::parse_all(&["127.0.0.1"]).unwrap();
    let name = domain::store_name(&domains);
    let manager = Manager::builder(acme, store.clone())
        .http01(registry)
        .cert(ManagedCert::new(&name, domains))
        .build()
        .unwrap();
    manager.start().await.unwrap();

    // No profile was asked for; the CA lists `shortlived` and the order holds an IP.
    assert_eq!(shim.order_profiles(), [Some("shortlived".to_owned())]);
    let stored = store.load_cert(&name).await.unwrap().expect("stored");
    assert_eq!(stored.meta.profile, None, "the CA's choice is not pinned");
    assert_eq!(stored.bundle.info().unwrap().domains, ["127.0.0.1"]);

    // A client of https://127.0.0.1:PORT/ sends no SNI: it gets the certificate for the
    // address it connected to, and verifies its IP SAN.
    let server = LocalAddrServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    let served = handshake_ip(server.addr, &root).await.unwrap();
    assert_eq!(served.domains, ["127.0.0.1"]);
    // Without the local address (a plain resolver, no default) there is nothing to serve.
    let plain =
        lobe_tls_tests::tls::TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    assert!(handshake_ip(plain.addr(), &root).await.is_err());
}

#[tokio::test]
async fn an_ipv6_certificate_is_validated_through_tls_alpn01_with_the_ip6_arpa_name() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    // Pebble validates `::1` on [::1]:tlsPort, sending the reverse-DNS name as SNI.
    let challenge = ChallengeConfig::tls_alpn01(Some(format!("[::1]:{}", pebble.tls_port)));
    let request = IssueRequest::new(
        domain::parse_all(&["::1"]).unwrap(),
        KeyType::EcdsaP256,
        challenge,
    );
    assert_eq!(request.name, "__1");
    let issuance = Issuance::prepare(request, None).await.unwrap();
    let client = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap();
    // Pebble lists no profiles: the order goes without one.
    assert!(client.profiles().is_empty());
    let stored = issuance.run(&client, &store, None).await.unwrap();
    drop(issuance);
    assert_eq!(stored.bundle.info().unwrap().domains, ["::1"]);

    let resolver = CertResolver::new();
    resolver.set(&["::1"], stored.bundle.certified_key().unwrap());
    let server = LocalAddrServer::bind("[::1]:0", resolver).await;
    let served = handshake_ip(server.addr, &root).await.unwrap();
    assert_eq!(served.domains, ["::1"]);
    assert_eq!(served.serial, stored.bundle.info().unwrap().serial);
}

#[tokio::test]
async fn a_profile_is_checked_against_the_directory_stored_and_used_again_on_renewal() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    shim.set_profiles(&["classic", "shortlived", "tlsserver"]);
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let mut acme = pebble.acme_config();
    acme.directory = shim.directory_url.clone();
    let client = AcmeClient::connect(&acme, store.as_ref()).await.unwrap();
    assert_eq!(client.profiles(), ["classic", "shortlived", "tlsserver"]);
    let request = |profile: &str| {
        IssueRequest::new(
            domain::parse_all(&["p.example.com"]).unwrap(),
            KeyType::EcdsaP256,
            ChallengeConfig::http01(None),
        )
        .with_profile(Some(profile.to_owned()))
    };

    // A profile the directory does not list: one line naming what it lists, no order.
    let err = Issuance::prepare(request("nonesuch"), Some(registry.clone()))
        .await
        .unwrap()
        .run(&client, store.as_ref(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"nonesuch\"") && err.contains("classic, shortlived, tlsserver"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(shim.order_profiles().is_empty());
    assert!(store.load_cert("p.example.com").await.unwrap().is_none());

    let stored = Issuance::prepare(request("tlsserver"), Some(registry.clone()))
        .await
        .unwrap()
        .run(&client, store.as_ref(), None)
        .await
        .unwrap();
    assert_eq!(stored.meta.profile.as_deref(), Some("tlsserver"));
    let reloaded = store.load_cert("p.example.com").await.unwrap().unwrap();
    assert_eq!(reloaded.meta.profile.as_deref(), Some("tlsserver"));

    // The renewal repeats the stored order, profile included.
    let manager = Manager::builder(acme.clone(), store.clone())
        .http01(registry)
        .manage_stored(true)
        .build()
        .unwrap();
    manager.start().await.unwrap();
    manager.renew_now("p.example.com").await.unwrap();
    assert_eq!(
        shim.order_profiles(),
        [Some("tlsserver".to_owned()), Some("tlsserver".to_owned())]
    );

    // A CA that lists no profiles refuses any, before an order.
    shim.set_profiles(&[]);
    let other = tempfile::tempdir().unwrap();
    let other_store = FileStore::open(other.path()).unwrap();
    let client = AcmeClient::connect(&acme, &other_store).await.unwrap();
    let err = Issuance::prepare(request("shortlived"), Some(Http01Registry::new()))
        .await
        .unwrap()
        .run(&client, &other_store, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lists no profiles"), "{err}");
    assert_eq!(shim.order_profiles().len(), 2);
}

/// A mass-revocation drill: the CA moves the window of a certificate into the past. The
/// poll that sees it renews at once (not at a random time up to the window's end), the
/// new order names the old certificate in `replaces`, and the metrics show the window
/// the CA suggests for each certificate.
#[tokio::test]
async fn an_ari_window_that_opened_already_is_acted_on_within_one_poll_and_exported() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    let now = OffsetDateTime::now_utc();
    let later = (
        now + time::Duration::days(300),
        now + time::Duration::days(301),
    );
    shim.set_default_window(later);
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let registry = Http01Registry::new();
    let _http = Http01Listener::bind(pebble.http_addr(), registry.service())
        .await
        .unwrap();
    let mut acme = pebble.acme_config();
    acme.directory = shim.directory_url.clone();
    let manager = Manager::builder(acme, store.clone())
        .http01(registry)
        .cert(ManagedCert::new(
            "drill",
            domain::parse_all(&["drill.example.com"]).unwrap(),
        ))
        .build()
        .unwrap();
    let metrics = Metrics::new();
    manager.export_metrics(&metrics);
    let mut events = manager.subscribe();
    manager.start().await.unwrap();
    let first = manager.certificates().remove(0).info.unwrap();
    let first_id = first.ari_id.clone().unwrap();

    // Opened an hour ago, open for two more days: a uniform pick over what is left would
    // almost never fall within the next seconds.
    let drill = (
        now - time::Duration::hours(1),
        now + time::Duration::days(2),
    );
    shim.set_window(&first_id, drill);
    let started = std::time::Instant::now();
    let _maintenance = manager.spawn();
    let replaced = wait_for(&mut events, Duration::from_secs(15), |e| match e {
        Event::Renewed {
            replaced_serial, ..
        } => Some(replaced_serial.clone()),
        _ => None,
    })
    .await;
    assert_eq!(replaced, first.serial);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(shim.new_orders(), [None, Some(first_id.clone())]);
    assert_eq!(
        shim.queries().iter().filter(|q| **q == first_id).count(),
        1,
        "acted on within the one poll that saw the window"
    );

    // The replacement's own window (the default, months away) reaches the metrics.
    let gauge = |edge: &str, at: OffsetDateTime| {
        format!(
            "lobe_tls_certificate_ari_window_{edge}_timestamp_seconds{{name=\"drill\",source=\"managed\"}} {}",
            at.unix_timestamp()
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics.render();
        if text.lines().any(|l| l == gauge("start", later.0))
            && text.lines().any(|l| l == gauge("end", later.1))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ARI window gauges in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = manager.certificates().remove(0);
    assert_eq!(state.ari_window, Some(later));
    // Months away: no second renewal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(shim.new_orders().len(), 2);
}
