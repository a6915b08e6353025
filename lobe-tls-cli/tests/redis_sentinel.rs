//! Two `lobe-tls serve` instances on one Redis store behind Sentinel (a master, a replica
//! and three sentinels), renewing 30-second Pebble certificates while the master is
//! killed: every verified request succeeds, renewals go on after the promotion, and each
//! renewal is one order.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lobe_tls_tests::redis::SentinelCluster;
use lobe_tls_tests::{Pebble, PebbleOptions};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "ha.example.com";
const PASSWORD: &str = "s3cret-ha-pw";
const GREETING: &[u8] = b"upstream says hi\n";

// `lobe-tls serve`, killed on drop; its stderr goes to a file.
use lobe_tls_tests::cli::KillOnDrop as Serve;

fn serve(
    store: &str,
    pebble: &Pebble,
    listen: &str,
    upstream: &str,
    http: &str,
    log: &Path,
) -> Serve {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "serve",
            "--mode",
            "tcp",
            "--listen",
            listen,
            "--upstream",
            upstream,
        ])
        .args(["-d", NAME, "--challenge", "http-01", "--http-listen", http])
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env("LOBE_TLS_LOG", "info,lobe_tls::store=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Serve(child)
}

/// One verified request through `addr`: a TLS handshake trusting Pebble's root only, and
/// the upstream's greeting read back. Returns the serial served.
async fn request(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(NAME).map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
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

impl Seen {
    fn first_seen(&self, serial: &str) -> bool {
        self.serials.iter().any(|(s, _)| s == serial)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_instances_keep_renewing_through_a_sentinel_failover() {
    // Data nodes with a password, sentinels without one.
    let cluster = tokio::task::spawn_blocking(|| SentinelCluster::start(Some(PASSWORD), false))
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
    // Only the first instance's HTTP listener is where Pebble validates; tokens are
    // shared through Redis, so either instance's order passes once that listener is up.
    // The second starts after it listens, so its first order does not race it.
    let second_http = lobe_tls_tests::reserve_port();
    let https = [pebble.http_listen(), second_http.listen()];
    let mut listens = Vec::new();
    let mut instances = Vec::new();
    for (i, http) in https.iter().enumerate() {
        let listen_port = lobe_tls_tests::reserve_port();
        let listen = listen_port.listen();
        let log = logs.path().join(format!("serve-{i}.log"));
        instances.push(serve(&store, &pebble, &listen, &upstream_addr, http, &log));
        listens.push(listen.parse::<SocketAddr>().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(http).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "serve {i} never listened on {http}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let dump_logs = || {
        let mut out = String::new();
        for i in 0..2 {
            let text = std::fs::read_to_string(logs.path().join(format!("serve-{i}.log"))).unwrap();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("\n== serve {i}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };

    // Both instances serve the first certificate.
    let client = lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let a = request(listens[0], client.clone()).await;
        let b = request(listens[1], client.clone()).await;
        if let (Ok(a), Ok(b)) = (&a, &b)
            && a == b
        {
            break a.clone();
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
            "the instances never served one certificate: {a:?} {b:?}{}",
            dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // From here on, every request must succeed.
    let seen = Arc::new(Mutex::new(Seen {
        serials: vec![(first, Instant::now())],
        ..Seen::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requester = {
        let (seen, stop, client, listens) =
            (seen.clone(), stop.clone(), client.clone(), listens.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for addr in &listens {
                    let result = request(*addr, client.clone()).await;
                    let mut seen = seen.lock().unwrap();
                    seen.requests += 1;
                    match result {
                        Ok(serial) => {
                            if !seen.first_seen(&serial) {
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

    // Kill the master mid-life of the first certificate, while no order is in flight
    // (the first renewal falls due after 45 s).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let killed_at = Instant::now();
    let (cluster, promoted_at) = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let old = cluster.kill_master();
        cluster.wait_for_failover(old, Duration::from_secs(30));
        (cluster, Instant::now())
    })
    .await
    .unwrap();

    // Two renewals after the promotion: at 45 s, then at the next check (60 s later at
    // most).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let after = seen
            .lock()
            .unwrap()
            .serials
            .iter()
            .filter(|(_, at)| *at > promoted_at)
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
            "renewals stopped after the failover: {after} new serials{}",
            dump_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    requester.await.unwrap();

    let seen = seen.lock().unwrap();
    let certificates = seen.serials.len();
    let orders = pebble.orders_created();
    eprintln!(
        "sentinel failover under serve: {} requests, {} failed; promotion {:?} after the kill; {} certificates, {} orders",
        seen.requests,
        seen.failures.len(),
        promoted_at - killed_at,
        certificates,
        orders
    );
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}{}",
        seen.failures,
        dump_logs()
    );
    assert_eq!(
        orders,
        certificates,
        "one order per certificate{}",
        dump_logs()
    );
    for i in 0..2 {
        let text = std::fs::read_to_string(logs.path().join(format!("serve-{i}.log"))).unwrap();
        assert!(
            !text.contains(PASSWORD),
            "the password is in serve {i}'s log"
        );
    }
    drop(cluster);
}
