//! Three `lobe-tls serve` instances on one Redis Cluster (3 masters, 3 replicas),
//! renewing 30-second Pebble certificates with the CLI's defaults otherwise, through
//! the drills an operator of a cluster meets:
//!
//! - the master that holds the certificate's slot is killed (SIGKILL);
//! - a replica takes over with `CLUSTER FAILOVER` while a renewal runs;
//! - the certificate's slot moves to another master (`redis-cli --cluster reshard`)
//!   while a renewal runs.
//!
//! Each passes with every verified request answered, renewals going on after the drill,
//! and one order per renewal (not one per instance).
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lobe_tls_tests::redis_cluster::RedisCluster;
use lobe_tls_tests::{Pebble, PebbleOptions};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "s3cret-cluster-pw";
const GREETING: &[u8] = b"upstream says hi\n";
const INSTANCES: usize = 3;

use lobe_tls_tests::cli::KillOnDrop as Serve;

fn serve(store: &str, pebble: &Pebble, name: &str, ports: [&str; 3], log: &Path) -> Serve {
    let [listen, upstream, http] = ports;
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--mode", "tcp", "--listen", listen])
        .args(["--upstream", upstream])
        .args(["-d", name, "--challenge", "http-01", "--http-listen", http])
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env(
            "LOBE_TLS_LOG",
            "info,lobe_tls::store=debug,lobe_tls::cluster=debug",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Serve(child)
}

/// One verified request through `addr`: a TLS handshake trusting Pebble's root only, and
/// the upstream's greeting read back. Returns the serial served.
async fn request(
    addr: SocketAddr,
    name: &str,
    client: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or("no certificate")?;
        let mut greeting = vec![0u8; GREETING.len()];
        tls.read_exact(&mut greeting)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if greeting != GREETING {
            return Err(format!("unexpected reply {greeting:?}"));
        }
        lobe_tls::CertInfo::from_der(&leaf)
            .map(|info| info.serial)
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[derive(Default)]
struct Seen {
    requests: usize,
    failures: Vec<String>,
    /// Every serial served, with when it was first seen.
    serials: Vec<(String, Instant)>,
}

#[derive(Clone, Copy, Debug)]
enum Drill {
    /// SIGKILL the master of the certificate's slot, between renewals.
    KillMaster,
    /// `CLUSTER FAILOVER` on a replica of that master while a renewal runs.
    ManualFailover,
    /// Move the certificate's slot to another master while a renewal runs.
    Reshard,
}

/// A name whose slot is on the same master as the events channel's, so that a drill
/// on that master also moves the change feed's subscription.
fn name_beside_the_feed(cluster: &RedisCluster) -> String {
    let feed_master = cluster.master_of_slot(cluster.slot_of("lobe-tls:events"));
    (0..2000)
        .map(|i| format!("c{i}.example.com"))
        .find(|name| cluster.master_of_slot(cluster.slot_of(name)) == feed_master)
        .expect("a name on the feed's master")
}

/// A name whose slot is among the first 64 of its master's: `redis-cli --cluster reshard`
/// moves a master's lowest slots, so moving a few of them moves the certificate's.
fn name_near_the_start_of_its_master(cluster: &RedisCluster) -> String {
    let firsts: Vec<u16> = cluster
        .master_ports()
        .into_iter()
        .filter_map(|master| cluster.slots_of(master).first().copied())
        .collect();
    (0..20_000)
        .map(|i| format!("r{i}.example.com"))
        .find(|name| {
            let slot = cluster.slot_of(name);
            firsts
                .iter()
                .any(|first| (*first..*first + 64).contains(&slot))
        })
        .expect("a name near the start of a master's slots")
}

/// Whether an instance holds the renewal lock of `name` now: an order is in flight.
fn order_in_flight(cluster: &RedisCluster, name: &str) -> bool {
    let lock = format!("lobe-tls:lock:{{{name}}}");
    let slot = cluster.slot_of(&lock);
    cluster.exists_on_master(slot, &lock)
}

/// One drill at a time: each runs six Redis nodes, Pebble and three instances.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(drill: Drill) {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(Some(PASSWORD)))
        .await
        .unwrap();
    let (cluster, name) = tokio::task::spawn_blocking(move || {
        let name = match drill {
            Drill::Reshard => name_near_the_start_of_its_master(&cluster),
            Drill::KillMaster | Drill::ManualFailover => name_beside_the_feed(&cluster),
        };
        (cluster, name)
    })
    .await
    .unwrap();
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(30),
        ..PebbleOptions::default()
    });
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(GREETING).await;
            });
        }
    });

    let logs = tempfile::tempdir().unwrap();
    let store = cluster.url();
    // Pebble validates on the first instance's HTTP listener; tokens are shared through
    // the cluster, so any instance's order passes once that listener is up.
    let mut reserved = Vec::new();
    let mut listens = Vec::new();
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let listen = lobe_tls_tests::reserve_port();
        let http = if i == 0 {
            pebble.http_listen()
        } else {
            let port = lobe_tls_tests::reserve_port();
            let addr = port.listen();
            reserved.push(port);
            addr
        };
        let log = logs.path().join(format!("serve-{i}.log"));
        let ports = [listen.listen(), upstream_addr.clone(), http.clone()];
        instances.push(serve(
            &store,
            &pebble,
            &name,
            [&ports[0], &ports[1], &ports[2]],
            &log,
        ));
        listens.push(listen.addr());
        reserved.push(listen);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&http).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "serve {i} never listened on {http}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let dump_logs = || {
        let mut out = String::new();
        for i in 0..INSTANCES {
            let text = std::fs::read_to_string(logs.path().join(format!("serve-{i}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(150).collect();
            out.push_str(&format!("\n== serve {i}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };

    // Every instance serves the first certificate.
    let client = lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let mut serials = Vec::new();
        for addr in &listens {
            serials.push(request(*addr, &name, client.clone()).await);
        }
        if let Ok(first) = &serials[0]
            && serials.iter().all(|s| s.as_ref().ok() == Some(first))
        {
            break first.clone();
        }
        for instance in &mut instances {
            assert!(
                instance.0.try_wait().unwrap().is_none(),
                "serve exited early: {}",
                dump_logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the instances never served one certificate: {serials:?}{}",
            dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // From here on, every request must succeed.
    let seen = Arc::new(Mutex::new(Seen {
        serials: vec![(first, Instant::now())],
        ..Seen::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let requester = {
        let (seen, stop, client, listens, name) = (
            seen.clone(),
            stop.clone(),
            client.clone(),
            listens.clone(),
            name.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for addr in &listens {
                    let result = request(*addr, &name, client.clone()).await;
                    let mut seen = seen.lock().unwrap();
                    seen.requests += 1;
                    match result {
                        Ok(serial) => {
                            if !seen.serials.iter().any(|(s, _)| *s == serial) {
                                seen.serials.push((serial, Instant::now()));
                            }
                        }
                        Err(e) => seen.failures.push(format!("{addr}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The drill. The kill comes between renewals; the others while an order is in flight.
    let started = Instant::now();
    let (cluster, done_at) = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || {
            let mut cluster = cluster;
            let slot = cluster.slot_of(&name);
            match drill {
                Drill::KillMaster => {
                    std::thread::sleep(Duration::from_secs(5));
                    let old = cluster.kill_master_of_slot(slot);
                    cluster.wait_for_promotion(old, slot, Duration::from_secs(30));
                }
                Drill::ManualFailover | Drill::Reshard => {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while !order_in_flight(&cluster, &name) {
                        assert!(Instant::now() < deadline, "no renewal began in 90 s");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let master = cluster.master_of_slot(slot);
                    if let Drill::ManualFailover = drill {
                        let replica = cluster.replicas_of(master)[0];
                        cluster.manual_failover(replica);
                        cluster.wait_master_of_slot(slot, replica, Duration::from_secs(30));
                    } else {
                        let to = cluster
                            .master_ports()
                            .into_iter()
                            .find(|port| *port != master)
                            .unwrap();
                        // As an operator does it: redis-cli moves the master's lowest
                        // slots, up to and including the certificate's.
                        let slots = cluster.slots_of(master);
                        let count = slots.iter().position(|s| *s == slot).unwrap() + 1;
                        let moved = cluster.reshard(master, to, u16::try_from(count).unwrap());
                        assert!(moved.contains(&slot), "slot {slot} not in {moved:?}");
                        assert_eq!(cluster.master_of_slot(slot), to);
                    }
                }
            }
            (cluster, Instant::now())
        })
        .await
        .unwrap()
    };
    eprintln!("{drill:?}: done {:?} after it began", done_at - started);

    // Two renewals after the drill.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let after = seen
            .lock()
            .unwrap()
            .serials
            .iter()
            .filter(|(_, at)| *at > done_at)
            .count();
        if after >= 2 {
            break;
        }
        for instance in &mut instances {
            assert!(
                instance.0.try_wait().unwrap().is_none(),
                "serve exited: {}",
                dump_logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "renewals stopped after the {drill:?} drill: {after} new serials{}",
            dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    requester.await.unwrap();

    let seen = seen.lock().unwrap();
    let certificates = seen.serials.len();
    let orders = pebble.orders_created();
    eprintln!(
        "{drill:?} under serve: {} requests, {} failed; {} certificates, {} orders",
        seen.requests,
        seen.failures.len(),
        certificates,
        orders
    );
    assert!(
        seen.failures.is_empty(),
        "{} failed requests in the {drill:?} drill, the first: {:?}{}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)],
        dump_logs()
    );
    assert_eq!(
        orders,
        certificates,
        "one order per certificate in the {drill:?} drill{}",
        dump_logs()
    );
    for i in 0..INSTANCES {
        let text = std::fs::read_to_string(logs.path().join(format!("serve-{i}.log"))).unwrap();
        assert!(
            !text.contains(PASSWORD),
            "the password is in serve {i}'s log"
        );
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_renew_through_the_kill_of_the_certificates_master() {
    run(Drill::KillMaster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_renew_through_a_manual_failover_during_a_renewal() {
    run(Drill::ManualFailover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_renew_while_the_certificates_slot_is_resharded() {
    run(Drill::Reshard).await;
}
