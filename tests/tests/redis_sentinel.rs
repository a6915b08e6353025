//! The Redis store behind Sentinel, against real `redis-server` and `redis-server
//! --sentinel` processes: a master, a replica and three sentinels on loopback.

use std::time::{Duration, Instant};

use lobe_tls::store::{FeedStore, LockStore, StoreEvent, StoreSubscription};
use lobe_tls::{RedisStore, Store};
use lobe_tls_tests::redis::{SentinelCluster, sample_cert};

const PASSWORD: &str = "s3cret-sentinel-pw";
const LEASE: Duration = Duration::from_secs(30);

/// Waits for the first event matching `wanted`, skipping others.
async fn event_matching(
    sub: &mut StoreSubscription,
    within: Duration,
    wanted: impl Fn(&StoreEvent) -> bool,
) -> Option<StoreEvent> {
    tokio::time::timeout(within, async {
        while let Some(event) = sub.recv().await {
            if wanted(&event) {
                return Some(event);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Whether data node `port` holds `key` in database 0, asked directly.
async fn node_has(cluster: &SentinelCluster, port: u16, key: &str) -> bool {
    node_has_in(cluster, port, 0, key).await
}

async fn node_has_in(cluster: &SentinelCluster, port: u16, db: u8, key: &str) -> bool {
    let url = format!("{}{db}", cluster.node_url(port));
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut conn)
        .await
        .is_ok_and(|n| n == 1)
}

/// Retries `op` until it succeeds; returns how long that took from `since`.
async fn until_ok<T, F, Fut>(
    since: Instant,
    within: Duration,
    what: &str,
    mut op: F,
) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = lobe_tls::Result<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(value) => return (value, since.elapsed()),
            Err(e) => {
                assert!(
                    !e.to_string().contains(PASSWORD),
                    "password in an error: {e}"
                );
                assert!(Instant::now() < deadline, "{what} never worked again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_follows_the_master_through_a_failover_after_sigkill() {
    lobe_tls_tests::init_tracing();
    // The data nodes take a password and the sentinels none: the store offers the
    // sentinels the password, is refused, and asks without it.
    let mut cluster = tokio::task::spawn_blocking(|| SentinelCluster::start(Some(PASSWORD), false))
        .await
        .unwrap();
    // Database 2, with a key prefix of its own.
    let url = format!("{}2?prefix=ha", cluster.url());
    let store = RedisStore::connect(&url).await.unwrap();
    assert!(!format!("{store:?}").contains(PASSWORD), "{store:?}");
    let writer = RedisStore::connect(&url).await.unwrap();
    let mut feed = store.subscribe().expect("a change feed");
    assert_eq!(
        event_matching(&mut feed, Duration::from_secs(10), |_| true).await,
        Some(StoreEvent::Resync),
        "the feed connects and says so"
    );

    let cert = sample_cert("site", "a.example.com");
    store.save_cert(&cert).await.unwrap();
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), cert.bundle.fullchain_pem());
    assert_eq!(
        event_matching(&mut feed, Duration::from_secs(5), |e| matches!(
            e,
            StoreEvent::CertSaved(_)
        ))
        .await,
        Some(StoreEvent::CertSaved("site".into()))
    );
    let held = store.lock("held", LEASE, Duration::ZERO).await.unwrap();
    assert!(held.is_some());

    // The replica has the certificate before the master dies (replication is
    // asynchronous: what the master had not passed on would be lost).
    let master = cluster.master_port().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut on_all = true;
        for port in cluster_data_ports(&cluster, master) {
            on_all &= node_has_in(&cluster, port, 2, "ha:cert:site").await;
        }
        if on_all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never got the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let killed_at = Instant::now();
    let old = cluster.kill_master();
    assert_eq!(old, master);
    let (cluster, new_master) = tokio::task::spawn_blocking(move || {
        let new = cluster.wait_for_failover(old, Duration::from_secs(30));
        (cluster, new)
    })
    .await
    .unwrap();
    let promoted = killed_at.elapsed();

    // Saves, loads and locks work again without a new store, on the new master.
    let newer = sample_cert("site", "a.example.com");
    let ((), saved) = until_ok(killed_at, Duration::from_secs(30), "saving", || {
        writer.save_cert(&newer)
    })
    .await;
    assert!(node_has_in(&cluster, new_master, 2, "ha:cert:site").await);
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), newer.bundle.fullchain_pem());
    let (lock, locked) = until_ok(killed_at, Duration::from_secs(30), "locking", || {
        store.lock("after", LEASE, Duration::ZERO)
    })
    .await;
    let lock = lock.expect("a free lock is taken");
    lock.release().await.unwrap();
    assert!(node_has_in(&cluster, new_master, 2, "ha:certs").await);

    // The feed reconnects to the new master (and says so: what was announced meanwhile
    // is lost, so followers re-read everything), and keeps delivering.
    let resynced = event_matching(&mut feed, Duration::from_secs(15), |e| {
        *e == StoreEvent::Resync
    })
    .await;
    assert!(resynced.is_some(), "the feed never reconnected");
    let fed = killed_at.elapsed();
    writer
        .save_cert(&sample_cert("later", "b.example.com"))
        .await
        .unwrap();
    let delivered = event_matching(&mut feed, Duration::from_secs(15), |e| {
        *e == StoreEvent::CertSaved("later".into())
    })
    .await;
    assert!(
        delivered.is_some(),
        "the feed stopped delivering after the failover"
    );
    eprintln!(
        "sentinel failover: promoted after {promoted:?}; first save after {saved:?}; first lock after {locked:?}; feed back after {fed:?}"
    );
    assert!(saved < Duration::from_secs(20), "{saved:?}");
    drop(held);
}

/// The data nodes other than `master`.
fn cluster_data_ports(cluster: &SentinelCluster, master: u16) -> Vec<u16> {
    cluster
        .data_ports()
        .into_iter()
        .filter(|port| *port != master)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_move_to_the_new_master_after_a_graceful_failover() {
    // Here the sentinels take the same password as the data nodes.
    let cluster = tokio::task::spawn_blocking(|| SentinelCluster::start(Some(PASSWORD), true))
        .await
        .unwrap();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    store.save_account("before", b"{}").await.unwrap();

    // The first sentinel listed, the one the store follows first, dies: the store
    // moves on to the next to hear the switch.
    let mut cluster = cluster;
    cluster.kill_sentinel(0);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_sentinel_subscriber(Duration::from_secs(10));
        cluster
    })
    .await
    .unwrap();

    // The old master stays up, still a writable master until the sentinels reconfigure
    // it (at their next look, up to 10 s later). The store hears the switch and moves
    // its writes to the new master well before that.
    let (cluster, old, new, promoted) = tokio::task::spawn_blocking(move || {
        let old = cluster.failover();
        let new = cluster.wait_for_failover(old, Duration::from_secs(30));
        (cluster, old, new, Instant::now())
    })
    .await
    .unwrap();
    let mut n = 0;
    let moved = loop {
        n += 1;
        let key = format!("mark{n}");
        if store.save_account(&key, b"{}").await.is_ok()
            && node_has(&cluster, new, &format!("lobe-tls:account:{key}")).await
        {
            break promoted.elapsed();
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(5),
            "writes did not reach the new master within 5 s of the promotion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let old_role = cluster.role(old);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.role(old).as_deref() != Some("slave") {
        assert!(
            Instant::now() < deadline,
            "the old master never became a replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Writes keep landing on the new master, and what was stored before the failover
    // (replicated by then) is still there.
    store.save_account("after", b"{}").await.unwrap();
    assert!(node_has(&cluster, new, "lobe-tls:account:after").await);
    assert!(node_has(&cluster, new, "lobe-tls:account:before").await);
    eprintln!(
        "graceful failover: writes on the new master {moved:?} after the promotion; the old master then said {old_role:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_behind_the_sentinels_back_gets_no_write_and_is_let_go() {
    let cluster = tokio::task::spawn_blocking(|| SentinelCluster::start(None, false))
        .await
        .unwrap();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    store.save_account("before", b"{}").await.unwrap();

    // Swap the roles by hand: the sentinels still name the old master for a while.
    let master = cluster.master_port().unwrap();
    let replica = cluster
        .data_ports()
        .into_iter()
        .find(|port| *port != master)
        .unwrap();
    cluster.command(replica, &["REPLICAOF", "NO", "ONE"]);
    cluster.command(master, &["REPLICAOF", "127.0.0.1", &replica.to_string()]);
    assert_eq!(cluster.role(master).as_deref(), Some("slave"));

    // The write (a MULTI transaction) is refused, and the connection is let go: the
    // next attempt asks the sentinels again instead of meeting READONLY again.
    let first = store
        .save_account("after", b"{}")
        .await
        .unwrap_err()
        .to_string();
    assert!(first.to_lowercase().contains("read only"), "{first}");
    let second = store
        .save_account("after", b"{}")
        .await
        .unwrap_err()
        .to_string();
    assert!(!second.to_lowercase().contains("read only"), "{second}");
    assert!(!node_has(&cluster, master, "lobe-tls:account:after").await);
    assert!(!node_has(&cluster, replica, "lobe-tls:account:after").await);
}

#[tokio::test]
async fn a_wrong_service_or_dead_sentinels_fail_fast_with_one_line_and_no_password() {
    let cluster = tokio::task::spawn_blocking(|| SentinelCluster::start(Some(PASSWORD), true))
        .await
        .unwrap();
    let wrong = cluster.url().replace("/lobe/", "/nosuch/");
    let started = Instant::now();
    let err = RedisStore::connect(&wrong).await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.contains(PASSWORD), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("check that Redis is up"), "{err}");

    // Reserved and never listened on: connections are refused.
    let dead_ports = [
        lobe_tls_tests::reserve_port(),
        lobe_tls_tests::reserve_port(),
    ];
    let dead = format!(
        "redis+sentinel://:{PASSWORD}@{},{}/lobe",
        dead_ports[0].addr(),
        dead_ports[1].addr()
    );
    let started = Instant::now();
    let err = RedisStore::connect(&dead).await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.contains(PASSWORD), "{err}");

    let err = RedisStore::open(&format!("redis+sentinel://:{PASSWORD}@h:1"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains(PASSWORD), "{err}");
    assert!(
        err.contains("redis+sentinel://[:PASSWORD@]HOST:PORT"),
        "{err}"
    );
}
