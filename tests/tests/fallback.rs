//! Fallback to a second CA and the pre-flight checks, through the renewal manager, against
//! two real Pebbles: a primary that hangs, one that is rate limited (through the shim),
//! and the return to the primary at the next renewal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::challenge::{ChallengeConfig, DnsConfig, DnsProviderConfig};
use lobe_tls::manager::{ManagedCert, Manager, RenewOutcome};
use lobe_tls::store::DynStore;
use lobe_tls::{AcmeConfig, FileStore, Store, domain};
use lobe_tls_tests::ari_shim::{AriShim, Fault, NewOrderProblem};
use lobe_tls_tests::faulty_path::FaultyPath;
use lobe_tls_tests::{Pebble, PebbleOptions};

/// Two Pebbles started side by side: the fallback `b`, and `a`, which validates against
/// `b`'s DNS so that one DNS-01 solver (on `b`'s challtestsrv) serves both.
async fn two_pebbles() -> (Pebble, Pebble) {
    let b = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .unwrap();
    let dns = b.dns_addr;
    let a = tokio::task::spawn_blocking(move || {
        Pebble::start(PebbleOptions {
            dns_server: Some(dns),
            ..PebbleOptions::default()
        })
    })
    .await
    .unwrap();
    (a, b)
}

fn dns01(pebble: &Pebble) -> ChallengeConfig {
    let mut dns = DnsConfig::new(DnsProviderConfig::Challtestsrv {
        url: pebble.challtestsrv_url.clone(),
    });
    dns.resolvers = vec![pebble.dns_addr];
    dns.propagation_timeout_secs = 10;
    ChallengeConfig::dns01(dns)
}

fn cert(name: &str, b: &Pebble) -> ManagedCert {
    ManagedCert::new(
        name,
        domain::parse_all(&[&format!("{name}.example.com")]).unwrap(),
    )
    .with_challenge(dns01(b))
}

/// A manager over a fresh file store (kept in the returned directory) with the one
/// certificate `name`, validated through DNS-01 on `dns`'s challtestsrv.
fn manager_for(
    acme: AcmeConfig,
    name: &str,
    dns: &Pebble,
) -> (tempfile::TempDir, DynStore, Manager) {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let manager = Manager::builder(acme, store.clone())
        .cert(cert(name, dns))
        .build()
        .unwrap();
    (dir, store, manager)
}

async fn directory_of(store: &dyn Store, name: &str) -> String {
    store
        .load_cert(name)
        .await
        .unwrap()
        .expect("stored")
        .meta
        .directory
}

fn ordered(outcome: RenewOutcome) {
    assert!(
        matches!(outcome, RenewOutcome::Ordered { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn the_manager_falls_back_from_a_hung_primary_and_returns_to_it_at_the_next_renewal() {
    lobe_tls_tests::init_tracing();
    let (a, b) = two_pebbles().await;
    let a_addr: std::net::SocketAddr = a
        .directory_url
        .trim_start_matches("https://")
        .trim_end_matches("/dir")
        .parse()
        .unwrap();
    let path = FaultyPath::start(a_addr).await;
    let primary_url = format!("https://{}/dir", path.addr);
    let mut primary = AcmeConfig::new(primary_url.clone()).with_fallback(b.acme_config());
    primary.directory_ca = Some(a.ca_file.clone());
    // Short so that the test is quick; the CLI tests hang a primary with the defaults.
    primary.request_timeout = Duration::from_secs(1);
    let (_dir, store, manager) = manager_for(primary, "hang", &b);

    path.go_dead();
    let started = Instant::now();
    ordered(manager.renew_now("hang").await.unwrap());
    let took = started.elapsed();
    eprintln!("hung primary (1 s request timeout): issued by the fallback in {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(directory_of(store.as_ref(), "hang").await, b.directory_url);
    assert_eq!(a.orders_created(), 0);

    // The next renewal goes to the primary first, which answers again.
    path.heal();
    ordered(manager.renew_now("hang").await.unwrap());
    assert_eq!(directory_of(store.as_ref(), "hang").await, primary_url);
    assert_eq!(a.orders_created(), 1);

    // A primary that goes dead after it was connected hangs the order itself: the
    // request timeout ends it there, and the fallback issues.
    path.go_dead();
    let started = Instant::now();
    ordered(manager.renew_now("hang").await.unwrap());
    let took = started.elapsed();
    eprintln!("primary hung mid-order (1 s request timeout): issued by the fallback in {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(directory_of(store.as_ref(), "hang").await, b.directory_url);
}

#[tokio::test]
async fn a_failing_or_rate_limited_primary_falls_back_and_is_not_asked_again_before_its_retry_after()
 {
    lobe_tls_tests::init_tracing();
    let (a, b) = two_pebbles().await;
    let shim = AriShim::start(&a).await;
    let mut primary = AcmeConfig::new(shim.directory_url.clone()).with_fallback(b.acme_config());
    primary.directory_ca = Some(a.ca_file.clone());
    let (_dir, store, manager) = manager_for(primary, "limited", &b);

    // A primary that answers 5xx to everything: the fallback issues.
    shim.set_fault(Some(Fault::Status(503)));
    ordered(manager.renew_now("limited").await.unwrap());
    assert_eq!(
        directory_of(store.as_ref(), "limited").await,
        b.directory_url
    );
    shim.set_fault(None);

    shim.set_new_order_problem(Some(NewOrderProblem {
        status: 429,
        kind: "rateLimited".into(),
        detail: "too many certificates (5) already issued for this exact set of identifiers".into(),
        retry_after: Some("3600".into()),
    }));
    ordered(manager.renew_now("limited").await.unwrap());
    assert_eq!(
        directory_of(store.as_ref(), "limited").await,
        b.directory_url
    );
    assert_eq!(shim.refused_new_orders(), 1);
    // Within the hour the primary asked for, it is not asked again.
    ordered(manager.renew_now("limited").await.unwrap());
    assert_eq!(shim.refused_new_orders(), 1, "the primary was asked again");
    assert_eq!(
        directory_of(store.as_ref(), "limited").await,
        b.directory_url
    );
}

#[tokio::test]
async fn a_rate_limit_is_honoured_and_reported_in_the_error_and_the_renewal_state() {
    lobe_tls_tests::init_tracing();
    let pebble = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .unwrap();
    let shim = AriShim::start(&pebble).await;
    shim.set_new_order_problem(Some(NewOrderProblem {
        status: 429,
        kind: "rateLimited".into(),
        detail: "too many new orders recently".into(),
        retry_after: Some("600".into()),
    }));
    let mut config = AcmeConfig::new(shim.directory_url.clone());
    config.directory_ca = Some(pebble.ca_file.clone());
    let (_dir, store, manager) = manager_for(config, "slow", &pebble);

    let before = time::OffsetDateTime::now_utc();
    let err = manager.renew_now("slow").await.unwrap_err();
    let text = err.to_string();
    assert_eq!(err.ca_problem(), Some("rateLimited"), "{text}");
    assert!(text.contains("the CA asks not to retry before"), "{text}");
    let at = err.retry_after().expect("Retry-After kept");
    assert!(at >= before + time::Duration::seconds(590), "{at}");
    assert!(at <= before + time::Duration::seconds(610), "{at}");
    let state = store.load_renewal_state("slow").await.unwrap();
    assert!(state.next_attempt.expect("next attempt") >= at, "{state:?}");
    assert!(state.last_error.unwrap().contains("rateLimited"));

    // Asked again within the window: refused here, without a request to the CA.
    let again = manager.renew_now("slow").await.unwrap_err();
    assert_eq!(again.retry_after(), Some(at), "{again}");
    assert_eq!(shim.refused_new_orders(), 1);
}

#[tokio::test]
async fn ari_polls_ask_the_ca_that_issued_the_certificate() {
    lobe_tls_tests::init_tracing();
    let (a, b) = two_pebbles().await;
    let shim_a = AriShim::start(&a).await;
    let shim_b = AriShim::start(&b).await;
    // The fallback asks for a renewal within hours, long before the lifetime would.
    let now = time::OffsetDateTime::now_utc();
    let window = (
        now + time::Duration::hours(1),
        now + time::Duration::hours(2),
    );
    shim_b.set_default_window(window);
    let mut fallback = b.acme_config();
    fallback.directory = shim_b.directory_url.clone();
    let mut primary = AcmeConfig::new(shim_a.directory_url.clone()).with_fallback(fallback);
    primary.directory_ca = Some(a.ca_file.clone());
    let (_dir, store, manager) = manager_for(primary, "arifallback", &b);

    shim_a.set_fault(Some(Fault::Status(503)));
    ordered(manager.renew_now("arifallback").await.unwrap());
    assert_eq!(
        directory_of(store.as_ref(), "arifallback").await,
        shim_b.directory_url
    );
    shim_a.set_fault(None);

    // The poll goes to the CA that issued the certificate; the primary never saw it.
    let due = manager.due_at("arifallback").await.expect("managed");
    let id = manager.certificates()[0]
        .info
        .as_ref()
        .and_then(|info| info.ari_id.clone())
        .expect("Pebble certificates carry an AKI");
    assert!(shim_b.queries().contains(&id), "{:?}", shim_b.queries());
    assert!(shim_a.queries().is_empty(), "{:?}", shim_a.queries());
    assert!(
        due >= window.0 && due <= window.1,
        "due at {due}, the fallback's window is {window:?}"
    );
}
