//! The Redis Cluster test helper (`lobe_tls_tests::RedisCluster`) against itself, with
//! redis-rs's cluster client: six real `redis-server` processes per test.

use std::time::Duration;

use lobe_tls_tests::RedisCluster;
use redis::AsyncCommands;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

const PASSWORD: &str = "s3cret-cluster-pw";

/// A cluster client seeded with the three first masters, with short timeouts.
async fn client(cluster: &RedisCluster) -> ClusterConnection {
    let seeds: Vec<String> = cluster.ports()[..3]
        .iter()
        .map(|port| cluster.node_url(*port))
        .collect();
    let client = ClusterClient::builder(seeds)
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2))
        .build()
        .expect("cluster client");
    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
        .await
        .expect("cluster connect in time")
        .expect("cluster connect")
}

/// GET `key` on node `port` alone (no redirects followed).
fn get_on_node(cluster: &RedisCluster, port: u16, key: &str) -> redis::RedisResult<Option<String>> {
    let client = redis::Client::open(cluster.node_url(port))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    redis::cmd("GET").arg(key).query(&mut conn)
}

#[tokio::test]
async fn starts_three_masters_with_a_replica_each_and_serves_keys() {
    let cluster = RedisCluster::start(Some(PASSWORD));
    assert_eq!(cluster.ports().len(), 6);
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3, "{cluster:?}");
    for master in &masters {
        assert_eq!(
            cluster.replicas_of(*master).len(),
            1,
            "replicas of {master}"
        );
    }
    let url = cluster.url();
    assert!(url.starts_with(&format!("redis+cluster://:{PASSWORD}@127.0.0.1:")));
    assert_eq!(url.matches("127.0.0.1:").count(), 3, "{url}");

    let mut conn = client(&cluster).await;
    for i in 0..20 {
        let _: () = conn.set(format!("key-{i}"), i).await.expect("SET");
    }
    for i in 0..20 {
        let value: i64 = conn.get(format!("key-{i}")).await.expect("GET");
        assert_eq!(value, i);
    }
    // The keys are spread, and each sits on the master the helper names for its slot.
    let owners: std::collections::BTreeSet<u16> = (0..20)
        .map(|i| {
            let key = format!("key-{i}");
            let owner = cluster.master_of_slot(cluster.slot_of(&key));
            assert_eq!(
                get_on_node(&cluster, owner, &key).expect("GET on the owner"),
                Some(i.to_string())
            );
            owner
        })
        .collect();
    assert_eq!(owners.len(), 3);
    assert_eq!(cluster.slot_of("{user1000}.following"), 3443);
}

#[tokio::test]
async fn a_killed_master_is_replaced_by_its_replica() {
    let mut cluster = RedisCluster::start(None);
    let slot = cluster.slot_of("cert:example.org");
    let old = cluster.master_of_slot(slot);
    let replica = cluster.replicas_of(old);
    let killed = cluster.kill_master_of_slot(slot);
    assert_eq!(killed, old);
    let new = cluster.wait_for_promotion(old, slot, Duration::from_secs(20));
    assert_eq!(vec![new], replica);
    assert!(!cluster.master_ports().contains(&old));

    let mut conn = client(&cluster).await;
    let _: () = conn.set("cert:example.org", "v2").await.expect("SET");
    assert_eq!(
        get_on_node(&cluster, new, "cert:example.org").expect("GET"),
        Some("v2".to_owned())
    );

    // Back from the dead, the old master finds its slots taken and follows the new one.
    cluster.restart_node(old);
    cluster.wait_healthy(Duration::from_secs(20));
    assert_eq!(cluster.role(old).as_deref(), Some("slave"));
    assert_eq!(cluster.replicas_of(new), vec![old]);
}

#[tokio::test]
async fn a_manual_failover_swaps_master_and_replica() {
    let cluster = RedisCluster::start(Some(PASSWORD));
    let slot = cluster.slot_of("lock:a");
    let master = cluster.master_of_slot(slot);
    let replica = cluster.replicas_of(master)[0];
    cluster.manual_failover(replica);
    cluster.wait_master_of_slot(slot, replica, Duration::from_secs(20));
    cluster.wait_healthy(Duration::from_secs(20));
    assert_eq!(cluster.role(master).as_deref(), Some("slave"));
    assert_eq!(cluster.replicas_of(replica), vec![master]);
}

#[tokio::test]
async fn resharding_moves_one_slot_with_its_keys() {
    let cluster = RedisCluster::start(Some(PASSWORD));
    let key = "cert:moved.example";
    let mut conn = client(&cluster).await;
    let _: () = conn.set(key, "pem").await.expect("SET");
    let slot = cluster.slot_of(key);
    let from = cluster.master_of_slot(slot);
    let to = cluster
        .master_ports()
        .into_iter()
        .find(|p| *p != from)
        .expect("another master");
    let before = cluster.slots_of(from).len();

    cluster.reshard_slot(slot, to);
    assert_eq!(cluster.master_of_slot(slot), to);
    assert_eq!(cluster.slots_of(from).len(), before - 1);
    assert_eq!(
        get_on_node(&cluster, to, key).expect("GET"),
        Some("pem".to_owned())
    );
    assert!(
        get_on_node(&cluster, from, key).is_err(),
        "the old owner redirects"
    );
    let value: String = conn.get(key).await.expect("GET through the cluster client");
    assert_eq!(value, "pem");

    // redis-cli's own reshard, which picks the slots.
    let moved = cluster.reshard(to, from, 2);
    assert_eq!(moved.len(), 2, "{moved:?}");
    for slot in moved {
        assert_eq!(cluster.master_of_slot(slot), from);
    }
    let value: String = conn.get(key).await.expect("GET after redis-cli reshard");
    assert_eq!(value, "pem");
}

#[tokio::test]
async fn an_uncovered_slot_fails_the_cluster() {
    let cluster = RedisCluster::start(None);
    let slot = cluster.slot_of("cert:uncovered");
    let owner = cluster.uncover_slot(slot);
    assert!(cluster.master_ports().contains(&owner));
    for port in cluster.ports() {
        assert_eq!(cluster.cluster_state(port).as_deref(), Some("fail"));
    }
    // Still failed a moment later: nothing hands the slot back.
    std::thread::sleep(Duration::from_millis(1500));
    cluster.wait_cluster_state("fail", Duration::from_secs(1));
}
