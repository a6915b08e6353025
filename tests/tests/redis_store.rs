//! The Redis store against a real redis-server: round trips, locks, challenges, the
//! change feed, outages, and copying to and from the file store.

use std::time::{Duration, Instant};

use lobe_tls::store::{ChallengeStore, FeedStore, LockStore, StoreEvent, StoreSubscription};
use lobe_tls::{FileStore, RedisStore, RenewalState, Store};
use lobe_tls_tests::RedisServer;
use lobe_tls_tests::redis::sample_cert;

const LEASE: Duration = Duration::from_secs(60);

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn next_event(sub: &mut StoreSubscription, within: Duration) -> Option<StoreEvent> {
    tokio::time::timeout(within, sub.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn certificate_round_trips_with_its_key_and_metadata() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    assert!(store.load_cert("site").await.unwrap().is_none());
    let cert = sample_cert("site", "a.example.com");
    store.save_cert(&cert).await.unwrap();
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), cert.bundle.fullchain_pem());
    assert_eq!(loaded.bundle.key_pem(), cert.bundle.key_pem());
    assert_eq!(loaded.meta, cert.meta);
    store
        .save_cert(&sample_cert("other", "b.example.com"))
        .await
        .unwrap();
    assert_eq!(store.list_certs().await.unwrap(), ["other", "site"]);

    // A replacement changes chain and key together.
    let newer = sample_cert("site", "a.example.com");
    store.save_cert(&newer).await.unwrap();
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.key_pem(), newer.bundle.key_pem());
    assert_eq!(loaded.bundle.fullchain_pem(), newer.bundle.fullchain_pem());
    loaded
        .bundle
        .certified_key()
        .expect("key matches the certificate");
}

#[tokio::test]
async fn prefixes_keep_stores_apart_and_keys_live_under_the_prefix() {
    let server = RedisServer::start();
    let a = RedisStore::connect(&format!("{}?prefix=app-a", server.url()))
        .await
        .unwrap();
    let b = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .with_prefix("app-b");
    assert_eq!(a.prefix(), "app-a");
    a.save_cert(&sample_cert("site", "a.example.com"))
        .await
        .unwrap();
    assert!(b.load_cert("site").await.unwrap().is_none());
    assert!(b.list_certs().await.unwrap().is_empty());

    let mut conn = raw(&server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("app-a:")), "{keys:?}");
}

#[tokio::test]
async fn accounts_and_renewal_state_round_trip() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    assert!(store.load_account("acct").await.unwrap().is_none());
    store.save_account("acct", b"{\"k\":1}").await.unwrap();
    assert_eq!(
        store.load_account("acct").await.unwrap().unwrap(),
        b"{\"k\":1}"
    );
    assert_eq!(store.list_accounts().await.unwrap(), ["acct"]);

    assert_eq!(
        store.load_renewal_state("site").await.unwrap(),
        RenewalState::default()
    );
    let mut state = RenewalState::default();
    state.failures = 3;
    state.last_error = Some("rate limited".into());
    state.next_attempt = Some(time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(20000));
    store.save_renewal_state("site", &state).await.unwrap();
    assert_eq!(store.load_renewal_state("site").await.unwrap(), state);
}

#[tokio::test]
async fn names_that_could_escape_a_file_store_are_refused() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let err = store
        .save_cert(&sample_cert("../x", "a.example.com"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid certificate name"),
        "{err}"
    );
}

#[tokio::test]
async fn challenges_are_shared_until_deleted_or_expired() {
    let server = RedisServer::start();
    let one = RedisStore::connect(&server.url()).await.unwrap();
    let two = RedisStore::connect(&server.url()).await.unwrap();
    one.put_challenge("http-01/tok", "tok.thumb", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        two.get_challenge("http-01/tok").await.unwrap().as_deref(),
        Some("tok.thumb")
    );
    one.put_challenge(
        "tls-alpn-01/a.example.com",
        "material",
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert_eq!(
        two.list_challenges("tls-alpn-01/").await.unwrap(),
        ["tls-alpn-01/a.example.com"]
    );
    one.delete_challenge("http-01/tok").await.unwrap();
    assert!(two.get_challenge("http-01/tok").await.unwrap().is_none());
    // The 300 ms one expires (Redis checks expiry lazily, so poll rather than guess).
    lobe_tls_tests::wait_until(Duration::from_secs(5), "the challenge expired", || async {
        two.get_challenge("tls-alpn-01/a.example.com")
            .await
            .unwrap()
            .is_none()
    })
    .await;
}

#[tokio::test]
async fn lock_excludes_others_until_released_and_a_waiter_gets_it_then() {
    let server = RedisServer::start();
    let one = RedisStore::connect(&server.url()).await.unwrap();
    let two = RedisStore::connect(&server.url()).await.unwrap();
    let held = one
        .lock("site", LEASE, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(
        two.lock("site", LEASE, Duration::from_millis(200))
            .await
            .unwrap()
            .is_none()
    );
    // Other names are not affected.
    let other = two.lock("other", LEASE, Duration::ZERO).await.unwrap();
    assert!(other.is_some());

    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let lock = two
            .lock("site", LEASE, Duration::from_secs(10))
            .await
            .unwrap();
        (lock.is_some(), started.elapsed())
    });
    // The behaviour under test: the waiter waits while the lock is held this long.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await.unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert!(got, "the waiter must get the lock once it is released");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

#[tokio::test]
async fn lease_is_renewed_while_the_lock_is_held() {
    let server = RedisServer::start();
    let one = RedisStore::connect(&server.url()).await.unwrap();
    let two = RedisStore::connect(&server.url()).await.unwrap();
    let lease = Duration::from_secs(1);
    let held = one
        .lock("site", lease, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        two.lock("site", lease, Duration::ZERO)
            .await
            .unwrap()
            .is_none(),
        "a held lock must outlive its first lease"
    );
    drop(held);
    // Dropping releases in the background.
    assert!(
        two.lock("site", lease, Duration::from_secs(2))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn abandoned_lock_expires_with_its_lease_and_another_takes_over() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    // A holder on another connection that took the lock and then died: nobody renews it.
    let mut conn = raw(&server).await;
    let _: () = redis::cmd("SET")
        .arg("lobe-tls:lock:site")
        .arg("dead-holder")
        .arg("NX")
        .arg("PX")
        .arg(1200)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let lock = store
        .lock("site", LEASE, Duration::from_secs(10))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(lock.is_some());
    assert!(
        waited >= Duration::from_millis(900),
        "took over too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "took over too late: {waited:?}"
    );
}

#[tokio::test]
async fn release_never_removes_a_lock_another_instance_took_over() {
    let server = RedisServer::start();
    let one = RedisStore::connect(&server.url()).await.unwrap();
    let two = RedisStore::connect(&server.url()).await.unwrap();
    let stale = one
        .lock("site", LEASE, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    // The lease ran out behind the holder's back (e.g. a long pause), and two took over.
    let mut conn = raw(&server).await;
    let _: () = redis::cmd("DEL")
        .arg("lobe-tls:lock:site")
        .query_async(&mut conn)
        .await
        .unwrap();
    let current = two
        .lock("site", LEASE, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    stale.release().await.unwrap();
    assert!(
        one.lock("site", LEASE, Duration::ZERO)
            .await
            .unwrap()
            .is_none(),
        "the stale holder's release removed the new holder's lock"
    );
    current.release().await.unwrap();
}

#[tokio::test]
async fn saved_certificates_and_challenges_are_announced_within_a_second() {
    let server = RedisServer::start();
    let writer = RedisStore::connect(&server.url()).await.unwrap();
    let reader = RedisStore::connect(&server.url()).await.unwrap();
    let mut sub = reader.subscribe().expect("redis has a change feed");
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(5)).await,
        Some(StoreEvent::Resync)
    );

    let started = Instant::now();
    writer
        .save_cert(&sample_cert("site", "a.example.com"))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(1)).await,
        Some(StoreEvent::CertSaved("site".into()))
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    writer
        .put_challenge("tls-alpn-01/a.example.com", "m", LEASE)
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(1)).await,
        Some(StoreEvent::ChallengePut("tls-alpn-01/a.example.com".into()))
    );
    writer
        .delete_challenge("tls-alpn-01/a.example.com")
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(1)).await,
        Some(StoreEvent::ChallengeDeleted(
            "tls-alpn-01/a.example.com".into()
        ))
    );
    // Another prefix's announcements are not ours.
    let foreign = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .with_prefix("x");
    foreign
        .save_cert(&sample_cert("site", "a.example.com"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut sub, Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn outage_gives_clear_errors_then_everything_recovers_by_itself() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut sub = store.subscribe().unwrap();
    assert_eq!(
        next_event(&mut sub, Duration::from_secs(5)).await,
        Some(StoreEvent::Resync)
    );
    store
        .save_cert(&sample_cert("site", "a.example.com"))
        .await
        .unwrap();
    assert!(next_event(&mut sub, Duration::from_secs(1)).await.is_some());

    server.stop();
    let started = Instant::now();
    let err = store.load_cert("site").await.unwrap_err().to_string();
    assert!(err.contains("check that Redis is up"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "errors must come fast: {:?}",
        started.elapsed()
    );
    let err = store
        .lock("site", LEASE, Duration::from_secs(1))
        .await
        .err()
        .expect("lock must fail");
    assert!(err.to_string().contains("lock"), "{err}");

    server.restart();
    // The restarted server is empty (no persistence); the store reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.save_cert(&sample_cert("site", "a.example.com")).await {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(store.load_cert("site").await.unwrap().is_some());
    // The feed reconnects and asks for a re-sync, since announcements may have been missed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let event = next_event(&mut sub, deadline.saturating_duration_since(Instant::now())).await;
        match event {
            Some(StoreEvent::Resync) => break,
            Some(_) => continue,
            None => panic!("the change feed did not reconnect"),
        }
    }
}

#[tokio::test]
async fn copy_moves_everything_from_files_to_redis_and_back() {
    let server = RedisServer::start();
    let src_dir = tempfile::tempdir().unwrap();
    let files = FileStore::open(src_dir.path()).unwrap();
    let certs = [
        sample_cert("a", "a.example.com"),
        sample_cert("b", "b.example.com"),
    ];
    for cert in &certs {
        files.save_cert(cert).await.unwrap();
    }
    files
        .save_account("acct", b"{\"account\":true}")
        .await
        .unwrap();
    let mut state = RenewalState::default();
    state.failures = 1;
    files.save_renewal_state("b", &state).await.unwrap();

    let redis = RedisStore::connect(&server.url()).await.unwrap();
    let report = lobe_tls::store::copy(&files, &redis).await.unwrap();
    assert_eq!(
        (report.certs, report.accounts, report.renewal_states),
        (2, 1, 1)
    );

    let back_dir = tempfile::tempdir().unwrap();
    let back = FileStore::open(back_dir.path()).unwrap();
    let report = lobe_tls::store::copy(&redis, &back).await.unwrap();
    assert_eq!(
        (report.certs, report.accounts, report.renewal_states),
        (2, 1, 1)
    );
    for cert in &certs {
        let name = &cert.meta.name;
        let copied = back.load_cert(name).await.unwrap().unwrap();
        assert_eq!(copied.bundle.fullchain_pem(), cert.bundle.fullchain_pem());
        assert_eq!(copied.bundle.key_pem(), cert.bundle.key_pem());
        assert_eq!(copied.meta, cert.meta);
    }
    assert_eq!(
        back.load_account("acct").await.unwrap().unwrap(),
        b"{\"account\":true}"
    );
    assert_eq!(back.load_renewal_state("b").await.unwrap(), state);
    assert_eq!(
        back.load_renewal_state("a").await.unwrap(),
        RenewalState::default()
    );
}

#[tokio::test]
async fn versions_are_read_without_the_key_and_batches_load_in_one_trip() {
    use redis::AsyncCommands;
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let site = sample_cert("site", "a.example.com");
    store.save_cert(&site).await.unwrap();
    let mut revoked = RenewalState::default();
    revoked.revoked_serial = Some("01".into());
    revoked.failures = 2;
    store.save_renewal_state("site", &revoked).await.unwrap();
    // A value as lobe-tls wrote it before the serial led it, and one that is junk.
    let mut conn = raw(&server).await;
    let older = sample_cert("older", "b.example.com");
    let value = serde_json::json!({
        "fullchain": older.bundle.fullchain_pem(),
        "key": older.bundle.key_pem(),
        "meta": older.meta,
    });
    let _: () = conn
        .set("lobe-tls:cert:older", value.to_string())
        .await
        .unwrap();
    let _: () = conn.set("lobe-tls:cert:junk", "{nope").await.unwrap();
    let _: () = conn
        .sadd("lobe-tls:certs", &["older", "junk"])
        .await
        .unwrap();

    let names = ["site", "older", "junk", "missing"].map(String::from);
    let versions = store.load_cert_versions(&names).await.unwrap();
    let site_version = versions[0].as_ref().expect("site");
    assert_eq!(site_version.serial, site.bundle.info().unwrap().serial);
    assert_eq!(site_version.state, revoked);
    let older_version = versions[1].as_ref().expect("older value, read whole");
    assert_eq!(older_version.serial, older.bundle.info().unwrap().serial);
    assert_eq!(older_version.state, RenewalState::default());
    assert!(versions[2].is_none(), "junk is left to a full read");
    assert!(versions[3].is_none());

    let batch = store.load_cert_batch(&names).await;
    assert_eq!(batch.len(), names.len());
    let loaded = batch[0].cert.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(loaded.bundle.key_pem(), site.bundle.key_pem());
    assert_eq!(batch[0].state.as_ref().unwrap(), &revoked);
    let loaded = batch[1].cert.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(loaded.bundle.key_pem(), older.bundle.key_pem());
    let err = batch[2].cert.as_ref().unwrap_err().to_string();
    assert!(err.contains("junk") && err.contains("unreadable"), "{err}");
    assert!(batch[3].cert.as_ref().unwrap().is_none());
    for (entry, name) in batch.iter().zip(&names) {
        let single = store.load_cert(name).await;
        assert_eq!(entry.cert.is_ok(), single.is_ok(), "{name}");
    }
}

#[tokio::test]
async fn a_holder_whose_lock_was_lost_does_not_overwrite_the_newer_certificate() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let slow = store.lock("site", LEASE, LEASE).await.unwrap().unwrap();
    // Its lease runs out (here: the key is dropped) and another instance locks the name,
    // renews, and stores a newer certificate.
    let mut conn = raw(&server).await;
    redis::cmd("DEL")
        .arg("lobe-tls:lock:site")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let fast = store.lock("site", LEASE, LEASE).await.unwrap().unwrap();
    let newer = sample_cert("site", "a.example.com");
    store.save_cert_fenced(&newer, fast.as_ref()).await.unwrap();
    fast.release().await.unwrap();

    // The first holder's order ends: its save is refused, and the newer one stays.
    let late = sample_cert("site", "a.example.com");
    let err = store
        .save_cert_fenced(&late, slow.as_ref())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lock on site was lost"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    let stored = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(stored.bundle.key_pem(), newer.bundle.key_pem());
    let _ = slow.release().await;
}

#[tokio::test]
async fn renewal_state_writes_are_announced() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut sub = store.subscribe().unwrap();
    // Publish only once the subscription is in place on the server.
    server.wait_subscribers(1).await;
    let mut state = RenewalState::default();
    state.revoked_serial = Some("01".into());
    store.save_renewal_state("site", &state).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let event = next_event(&mut sub, Duration::from_secs(5)).await;
        if matches!(&event, Some(StoreEvent::CertSaved(name)) if name == "site") {
            break;
        }
        assert!(Instant::now() < deadline, "no announcement: {event:?}");
    }
}
