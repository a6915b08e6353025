//! Unit tests of the manager that need no CA.

use super::*;
use crate::cert::KeyType;
use crate::challenge::ChallengeConfig;
use crate::store::{FileStore, Store, StoredCert};

fn self_signed(domains: &[&str], not_after: OffsetDateTime) -> crate::cert::CertBundle {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(domains.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    crate::cert::CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap()
}

fn stored(name: &str, domains: &[&str], not_after: OffsetDateTime) -> StoredCert {
    StoredCert {
        bundle: self_signed(domains, not_after),
        meta: CertMeta {
            name: name.into(),
            domains: crate::domain::parse_all(domains).unwrap(),
            key_type: KeyType::EcdsaP256,
            challenge: ChallengeConfig::default(),
            directory: "https://ca.invalid/dir".into(),
            issued_at: OffsetDateTime::now_utc(),
            profile: None,
        },
    }
}

fn unreachable_ca() -> AcmeConfig {
    AcmeConfig::new("https://127.0.0.1:1/dir")
}

#[tokio::test]
async fn start_serves_stored_certificates_and_skips_unusable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let later = OffsetDateTime::now_utc() + time::Duration::days(30);
    store
        .save_cert(&stored("a", &["a.example.com"], later))
        .await
        .unwrap();
    let expired = OffsetDateTime::now_utc() - time::Duration::hours(1);
    store
        .save_cert(&stored("old", &["old.example.com"], expired))
        .await
        .unwrap();
    let manager = Manager::builder(unreachable_ca(), store).build().unwrap();
    let mut events = manager.subscribe();
    let report = manager.start().await.unwrap();
    assert_eq!(report.loaded, 1);
    assert_eq!(report.unusable.len(), 1);
    assert!(report.unusable[0].1.contains("expired"), "{report:?}");
    assert!(manager.resolver().lookup(Some("a.example.com")).is_some());
    assert!(manager.resolver().lookup(Some("old.example.com")).is_none());
    match events.recv().await.unwrap() {
        Event::Loaded { name, .. } => assert_eq!(name, "a"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn failed_issue_keeps_serving_and_reports_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let soon = OffsetDateTime::now_utc() + time::Duration::hours(1);
    store
        .save_cert(&stored("a", &["a.example.com"], soon))
        .await
        .unwrap();
    let manager = Manager::builder(unreachable_ca(), store.clone())
        .manage_stored(true)
        .build()
        .unwrap();
    manager.start().await.unwrap();
    let served = manager.resolver().lookup(Some("a.example.com")).unwrap();
    let mut events = manager.subscribe();
    assert!(manager.renew_now("a").await.is_err());
    assert!(Arc::ptr_eq(
        &served,
        &manager.resolver().lookup(Some("a.example.com")).unwrap()
    ));
    match events.recv().await.unwrap() {
        Event::RenewalFailed {
            name,
            failures,
            next_attempt,
            ..
        } => {
            assert_eq!(name, "a");
            assert_eq!(failures, 1);
            assert!(next_attempt > OffsetDateTime::now_utc());
        }
        other => panic!("unexpected {other:?}"),
    }
    let state = store.load_renewal_state("a").await.unwrap();
    assert_eq!(state.failures, 1);
    assert!(state.last_error.is_some());
}

#[tokio::test]
async fn reload_swaps_in_a_new_stored_certificate_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let later = OffsetDateTime::now_utc() + time::Duration::days(30);
    store
        .save_cert(&stored("a", &["a.example.com"], later))
        .await
        .unwrap();
    let manager = Manager::builder(unreachable_ca(), store.clone())
        .build()
        .unwrap();
    manager.start().await.unwrap();
    assert!(!manager.reload("a").await.unwrap(), "nothing changed");
    let first = manager.resolver().lookup(Some("a.example.com")).unwrap();
    store
        .save_cert(&stored("a", &["a.example.com", "b.example.com"], later))
        .await
        .unwrap();
    assert!(manager.reload("a").await.unwrap());
    let second = manager.resolver().lookup(Some("a.example.com")).unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(manager.resolver().lookup(Some("b.example.com")).is_some());
    assert!(!manager.reload("missing").await.unwrap());
}

#[tokio::test]
async fn expiring_soon_is_announced_once_per_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    // Lifetime about a day, one hour left: inside the warning window (a sixth).
    let soon = OffsetDateTime::now_utc() + time::Duration::hours(1);
    store
        .save_cert(&stored("soon", &["soon.example.com"], soon))
        .await
        .unwrap();
    let later = OffsetDateTime::now_utc() + time::Duration::days(30);
    store
        .save_cert(&stored("later", &["later.example.com"], later))
        .await
        .unwrap();
    let manager = Manager::builder(unreachable_ca(), store)
        .check_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    manager.start().await.unwrap();
    let mut events = manager.subscribe();
    let maintenance = manager.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(maintenance);
    let mut warned = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::ExpiringSoon {
            name, not_after, ..
        } = event
        {
            assert_eq!(not_after.unix_timestamp(), soon.unix_timestamp());
            warned.push(name);
        }
    }
    assert_eq!(
        warned,
        ["soon"],
        "one warning, for the expiring certificate only"
    );
}

#[test]
fn building_refuses_duplicate_and_empty_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    let cert = ManagedCert::new("a", crate::domain::parse_all(&["a.example.com"]).unwrap());
    let err = Manager::builder(unreachable_ca(), store.clone())
        .cert(cert.clone())
        .cert(cert)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let err = Manager::builder(unreachable_ca(), store)
        .cert(ManagedCert::new("e", Vec::new()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no domains"), "{err}");
}

#[tokio::test]
async fn a_reissue_for_a_changed_configuration_follows_the_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let later = OffsetDateTime::now_utc() + time::Duration::days(30);
    store
        .save_cert(&stored("a", &["a.example.com"], later))
        .await
        .unwrap();
    // The configuration now wants a second name; the CA cannot be reached. The loop runs
    // with its defaults: a failure wakes it, so a reissue that ignored the backoff would
    // be tried again every round.
    let domains = crate::domain::parse_all(&["a.example.com", "b.example.com"]).unwrap();
    let manager = Manager::builder(unreachable_ca(), store)
        .cert(ManagedCert::new("a", domains))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    manager.start().await.unwrap();
    let maintenance = manager.spawn();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(maintenance);
    let mut failures = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::RenewalFailed { next_attempt, .. } = event {
            failures.push(next_attempt);
        }
    }
    assert_eq!(
        failures.len(),
        1,
        "one attempt, then the backoff: {failures:?}"
    );
    assert!(failures[0] >= OffsetDateTime::now_utc() + time::Duration::seconds(50));
    // Still served meanwhile.
    assert!(manager.resolver().lookup(Some("a.example.com")).is_some());
}
