//! Cluster mode against real redis-server and Pebble: several manager instances share one
//! Redis store; one order per certificate, challenges answered by any instance, renewals
//! everywhere within a second, and the faults (Redis restarted, lock holder dead).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lobe_tls::cluster::{Cluster, resync_certs};
use lobe_tls::manager::{Event, ManagedCert, Manager};
use lobe_tls::store::DynStore;
use lobe_tls::{
    AcmeClient, AcmeConfig, CertResolver, Http01Listener, Http01Registry, Http01Solver, KeyType,
    OrderRequest, RedisStore, RenewalPolicy, RenewalState, TlsAlpn01Solver, domain,
};
use lobe_tls_tests::redis::sample_cert;
use lobe_tls_tests::tls::{TlsServer, client_config, handshake_serial};
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer, verify_chain};
use tokio::sync::broadcast;

const NAME: &str = "site";
const DOMAIN: &str = "cluster.example.com";

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

/// One proxy instance: a manager on its own Redis connection, following the cluster,
/// serving TLS from its resolver, and answering HTTP-01 from local memory then Redis.
struct Instance {
    manager: Manager,
    events: broadcast::Receiver<Event>,
    http01: Http01Registry,
    tls: TlsServer,
    _cluster: Cluster,
}

impl Instance {
    async fn new(redis: &RedisServer, pebble: &Pebble, policy: RenewalPolicy) -> Instance {
        Instance::configured(redis, pebble, policy, &[DOMAIN]).await
    }

    /// An instance configured to keep `NAME` issued for `domains`.
    async fn configured(
        redis: &RedisServer,
        pebble: &Pebble,
        policy: RenewalPolicy,
        domains: &[&str],
    ) -> Instance {
        let store = instance_store(redis).await;
        let http01 = Http01Registry::with_shared_store(store.clone()).unwrap();
        let manager = Manager::builder(pebble.acme_config(), store)
            .http01(http01.clone())
            .cert(ManagedCert::new(NAME, domain::parse_all(domains).unwrap()))
            .policy(policy)
            .check_interval(Duration::from_millis(200))
            .build()
            .unwrap();
        let events = manager.subscribe();
        let cluster = Cluster::builder(manager.clone())
            .resync_interval(Duration::from_secs(2))
            .start()
            .unwrap();
        let tls = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
        Instance {
            manager,
            events,
            http01,
            tls,
            _cluster: cluster,
        }
    }

    /// The kinds of events seen so far: "obtained", "renewed", "loaded", "failed".
    fn drain_events(&mut self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            kinds.push(match event {
                Event::Obtained { .. } => "obtained",
                Event::Renewed { .. } => "renewed",
                Event::Loaded { .. } => "loaded",
                Event::RenewalFailed { .. } => "failed",
                Event::ConfigConflict { .. } => "conflict",
                _ => "other",
            });
        }
        kinds
    }
}

fn fast_retries() -> RenewalPolicy {
    RenewalPolicy::default().with_backoff(vec![time::Duration::seconds(1)])
}

/// The serial each instance serves right now, through a real verified handshake.
async fn served_serials(
    instances: &[Instance],
    client: &Arc<rustls::ClientConfig>,
) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for instance in instances {
        out.push(handshake_serial(instance.tls.addr(), DOMAIN, client.clone()).await);
    }
    out
}

/// Polls until every instance serves the same serial, other than `not`; returns it and
/// how long that took.
async fn wait_for_same_serial(
    instances: &[Instance],
    client: &Arc<rustls::ClientConfig>,
    not: Option<&str>,
    within: Duration,
) -> (String, Duration) {
    let started = Instant::now();
    loop {
        let serials = served_serials(instances, client).await;
        if let Ok(first) = &serials[0] {
            let all_same = serials.iter().all(|s| s.as_ref() == Ok(first));
            if all_same && not != Some(first.as_str()) {
                return (first.clone(), started.elapsed());
            }
        }
        assert!(
            started.elapsed() < within,
            "instances did not converge within {within:?}: {serials:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn lock_is_held(redis: &RedisServer) -> bool {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("EXISTS")
        .arg(format!("lobe-tls:lock:{NAME}"))
        .query_async::<bool>(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn three_instances_make_one_order_validated_elsewhere_and_serve_it_within_a_second() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let client = client_config(&pebble.issuing_root_pem().await);
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::new(&redis, &pebble, fast_retries()).await);
    }
    // Pebble's HTTP-01 validation reaches instance 2 only.
    let _port80 = Http01Listener::bind(pebble.http_addr(), instances[2].http01.service())
        .await
        .unwrap();

    // Instance 0 starts first and takes the lock; then the other two start and wait.
    let first = instances[0].manager.clone();
    let ordering = tokio::spawn(async move { first.start().await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock_is_held(&redis).await {
        assert!(Instant::now() < deadline, "instance 0 never took the lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let others: Vec<_> = instances[1..]
        .iter()
        .map(|i| {
            let manager = i.manager.clone();
            tokio::spawn(async move { manager.start().await.unwrap() })
        })
        .collect();

    let report = ordering.await.unwrap();
    assert_eq!(report.obtained, [NAME], "{report:?}");
    let obtained_at = Instant::now();
    let (serial, took) =
        wait_for_same_serial(&instances, &client, None, Duration::from_secs(1)).await;
    for other in others {
        let report = other.await.unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
    }
    let converged = obtained_at.elapsed();
    assert!(
        converged < Duration::from_secs(1),
        "all served {serial} after {converged:?} ({took:?})"
    );
    assert_eq!(
        pebble.orders_created(),
        1,
        "exactly one order reaches the CA"
    );
    assert_eq!(instances[0].drain_events(), ["obtained"]);
    for waiter in &mut instances[1..] {
        let kinds = waiter.drain_events();
        assert!(
            !kinds.contains(&"obtained"),
            "a waiter ordered again: {kinds:?}"
        );
        assert!(kinds.contains(&"loaded"), "{kinds:?}");
    }
    assert!(
        instances[2].http01.is_empty(),
        "the validating instance answered from Redis, not from a token of its own"
    );

    // A renewal on one instance reaches the others through pub/sub alone.
    let renewed_at = Instant::now();
    instances[1].manager.renew_now(NAME).await.unwrap();
    let (new_serial, _) =
        wait_for_same_serial(&instances, &client, Some(&serial), Duration::from_secs(1)).await;
    let everywhere = renewed_at.elapsed();
    assert_ne!(new_serial, serial);
    assert_eq!(pebble.orders_created(), 2);
    eprintln!("cluster convergence: first issue {converged:?}, renewal {everywhere:?}");
}

#[tokio::test]
async fn a_dead_lock_holder_blocks_only_until_its_lease_expires_then_one_instance_orders() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let client = client_config(&pebble.issuing_root_pem().await);
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::new(&redis, &pebble, fast_retries()).await);
    }
    let _port80 = Http01Listener::bind(pebble.http_addr(), instances[2].http01.service())
        .await
        .unwrap();

    // A holder that took the lock from its own connection, then died: nobody renews it.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lease = Duration::from_millis(2000);
    let _: () = redis::cmd("SET")
        .arg(format!("lobe-tls:lock:{NAME}"))
        .arg("dead-holder")
        .arg("NX")
        .arg("PX")
        .arg(lease.as_millis() as u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();

    let starts: Vec<_> = instances
        .iter()
        .map(|i| {
            let manager = i.manager.clone();
            tokio::spawn(async move { manager.start().await.unwrap() })
        })
        .collect();
    for start in starts {
        let report = start.await.unwrap();
        assert_eq!(report.obtained, [NAME], "{report:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= lease - Duration::from_millis(100),
        "the dead holder's lock was ignored: {waited:?}"
    );
    wait_for_same_serial(&instances, &client, None, Duration::from_secs(1)).await;
    assert_eq!(
        pebble.orders_created(),
        1,
        "exactly one instance took over and ordered"
    );
    let ordered: usize = instances
        .iter_mut()
        .map(|i| {
            i.drain_events()
                .iter()
                .filter(|k| **k == "obtained")
                .count()
        })
        .sum();
    assert_eq!(ordered, 1);
}

#[tokio::test]
async fn redis_restarted_mid_run_never_fails_a_handshake_and_renewal_completes_after() {
    lobe_tls_tests::init_tracing();
    let mut redis = RedisServer::start();
    // Certificates live 20 s, so renewal falls due 10 s after issuance: while Redis is down.
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(20),
        ..PebbleOptions::default()
    });
    let client = client_config(&pebble.issuing_root_pem().await);
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(Instance::new(&redis, &pebble, fast_retries()).await);
    }
    let _port80 = Http01Listener::bind(pebble.http_addr(), instances[1].http01.service())
        .await
        .unwrap();
    let issued_at = Instant::now();
    for instance in &instances {
        instance.manager.start().await.unwrap();
    }
    let (first_serial, _) =
        wait_for_same_serial(&instances, &client, None, Duration::from_secs(1)).await;
    let _maintenance: Vec<_> = instances.iter().map(|i| i.manager.spawn()).collect();

    // Handshakes against every instance, all the time, from here on.
    let addrs: Vec<_> = instances.iter().map(|i| i.tls.addr()).collect();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let prober = {
        let (client, handshakes, failures) = (client.clone(), handshakes.clone(), failures.clone());
        tokio::spawn(async move {
            loop {
                for addr in &addrs {
                    match handshake_serial(*addr, DOMAIN, client.clone()).await {
                        Ok(_) => handshakes.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("{addr}: {e}"));
                            0
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    redis.stop();
    // Stay down past the renewal time: attempts fail and back off, serving goes on.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(issued_at.elapsed())).await;
    let served_during_outage = handshakes.load(Ordering::Relaxed);
    assert!(
        served_during_outage > 30,
        "only {served_during_outage} handshakes during the outage"
    );
    for instance in &mut instances {
        assert!(
            instance.drain_events().contains(&"failed"),
            "renewal must have been tried and failed"
        );
    }
    redis.restart();
    let (renewed_serial, took) = wait_for_same_serial(
        &instances,
        &client,
        Some(&first_serial),
        Duration::from_secs(6),
    )
    .await;
    assert_ne!(renewed_serial, first_serial);
    eprintln!("renewed everywhere {took:?} after Redis came back");
    prober.abort();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "handshakes failed: {failures:?}");
    assert_eq!(
        pebble.orders_created(),
        2,
        "one order for the renewal, not one per instance"
    );
}

#[tokio::test]
async fn http01_validation_is_answered_by_an_instance_that_did_not_order() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let ordering = instance_store(&redis).await;
    let answering = instance_store(&redis).await;
    // Only the answering instance listens where Pebble validates.
    let ordering_registry = Http01Registry::with_shared_store(ordering.clone()).unwrap();
    let answering_registry = Http01Registry::with_shared_store(answering.clone()).unwrap();
    let _listener = Http01Listener::bind(pebble.http_addr(), answering_registry.service())
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
            .as_challenge_store()
            .unwrap()
            .list_challenges("http-01/")
            .await
            .unwrap()
            .is_empty(),
        "shared tokens are removed when the order ends"
    );
}

#[tokio::test]
async fn tls_alpn01_validation_is_answered_by_an_instance_that_did_not_order() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let ordering = instance_store(&redis).await;

    // The answering instance: a manager following the cluster, its resolver on the port
    // Pebble validates TLS-ALPN-01 on.
    let answering = Manager::builder(pebble.acme_config(), instance_store(&redis).await)
        .build()
        .unwrap();
    let _cluster = Cluster::builder(answering.clone()).start().unwrap();
    let _tls = TlsServer::bind(&pebble.tls_listen(), answering.resolver().clone()).await;
    // The follower's feed is subscribed before the order starts.
    redis.wait_subscribers(1).await;

    let ordering_resolver = CertResolver::new();
    let solver = TlsAlpn01Solver::with_shared_store(ordering_resolver, ordering.clone()).unwrap();
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
            .as_challenge_store()
            .unwrap()
            .list_challenges("tls-alpn-01/")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn instances_that_disagree_on_the_names_converge_with_one_extra_order_and_raise_the_alarm() {
    lobe_tls_tests::init_tracing();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let client = client_config(&pebble.issuing_root_pem().await);
    // The old configuration runs and has its certificate.
    let old = Instance::new(&redis, &pebble, fast_retries()).await;
    let _port80 = Http01Listener::bind(pebble.http_addr(), old.http01.service())
        .await
        .unwrap();
    old.manager.start().await.unwrap();
    let _old_loop = old.manager.spawn();
    assert_eq!(pebble.orders_created(), 1);
    let first = handshake_serial(old.tls.addr(), DOMAIN, client.clone())
        .await
        .unwrap();

    // A rolling deploy starts an instance that also wants www: its configuration is
    // newer than what is stored, so it re-orders once.
    const WWW: &str = "www.cluster.example.com";
    let new = Instance::configured(&redis, &pebble, fast_retries(), &[DOMAIN, WWW]).await;
    new.manager.start().await.unwrap();
    let _new_loop = new.manager.spawn();
    let both = [old, new];
    let deadline = Instant::now() + Duration::from_secs(10);
    while pebble.orders_created() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new configuration was never ordered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (serial, _) =
        wait_for_same_serial(&both, &client, Some(&first), Duration::from_secs(5)).await;
    let [mut old, mut new] = both;

    // Both loops look every 200 ms: a fight would show as more orders within seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(pebble.orders_created(), 2, "at most one extra order");
    let old_events = old.drain_events();
    assert_eq!(
        old_events.iter().filter(|k| **k == "conflict").count(),
        1,
        "the old instance raised the alarm once: {old_events:?}"
    );
    assert!(!new.drain_events().contains(&"conflict"));
    let www = handshake_serial(old.tls.addr(), WWW, client.clone()).await;
    assert_eq!(
        www,
        Ok(serial.clone()),
        "the old instance serves the new order"
    );

    // A renewal on the old instance repeats the stored order, not its own: the new
    // instance takes it without re-ordering, and the alarm is not raised again.
    old.manager.renew_now(NAME).await.unwrap();
    let both = [old, new];
    let (renewed, _) =
        wait_for_same_serial(&both, &client, Some(&serial), Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pebble.orders_created(), 3);
    let [mut old, mut new] = both;
    assert!(!old.drain_events().contains(&"conflict"));
    assert!(!new.drain_events().contains(&"conflict"));
    let www = handshake_serial(new.tls.addr(), WWW, client.clone()).await;
    assert_eq!(www, Ok(renewed));
}

#[tokio::test]
async fn a_resync_reads_in_full_only_what_changed() {
    let redis = RedisServer::start();
    let store = instance_store(&redis).await;
    let names = ["s0", "s1", "s2"];
    let mut serials = Vec::new();
    for name in names {
        let cert = sample_cert(name, &format!("{name}.example.com"));
        serials.push(cert.bundle.info().unwrap().serial);
        store.save_cert(&cert).await.unwrap();
    }
    // Serving what is stored only: the CA is never contacted.
    let manager = Manager::builder(AcmeConfig::new("https://acme.invalid/directory"), store)
        .build()
        .unwrap();
    manager.start().await.unwrap();
    let quiet = resync_certs(&manager).await.unwrap();
    assert_eq!((quiet.checked, quiet.reloaded, quiet.replaced), (3, 0, 0));

    // Another instance renews s1 and revokes s2, and the announcements are lost.
    let other = instance_store(&redis).await;
    let renewed = sample_cert("s1", "s1.example.com");
    other.save_cert(&renewed).await.unwrap();
    let mut revoked = RenewalState::default();
    revoked.revoked_serial = Some(serials[2].clone());
    other.save_renewal_state("s2", &revoked).await.unwrap();
    let changed = resync_certs(&manager).await.unwrap();
    assert_eq!(
        (changed.checked, changed.reloaded, changed.replaced),
        (3, 2, 1)
    );
    assert!(changed.failed.is_empty(), "{:?}", changed.failed);
    let s1 = manager.served_version("s1").unwrap();
    assert_eq!(s1.serial, renewed.bundle.info().unwrap().serial);
    assert_eq!(manager.served_version("s2").unwrap().state, revoked);
    let again = resync_certs(&manager).await.unwrap();
    assert_eq!(again.reloaded, 0);

    // Junk stored over s0 is read in full each time and refused; s0 is still served.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        .arg("lobe-tls:cert:s0")
        .arg("{junk")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let junk = resync_certs(&manager).await.unwrap();
    assert_eq!((junk.reloaded, junk.replaced), (1, 0));
    assert_eq!(junk.failed.len(), 1);
    assert_eq!(junk.failed[0].0, "s0");
    assert_eq!(manager.served_version("s0").unwrap().serial, serials[0]);
}
