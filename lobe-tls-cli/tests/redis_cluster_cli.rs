//! The `lobe-tls` commands with `--store redis+cluster://...` against a real Redis Cluster
//! (3 masters, 3 replicas; Pebble for `issue`, `renew` and `revoke`), the URLs that do
//! not fit the server they reach, and a cluster that loses a slot.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::{FileStore, Store};
use lobe_tls_tests::redis::sample_cert;
use lobe_tls_tests::redis_cluster::RedisCluster;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};

const PASSWORD: &str = "s3cret-cluster-cli";

fn lobe_tls(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(args)
        .env_remove("LOBE_TLS_STORE")
        .output()
        .unwrap()
}

/// `lobe-tls ARGS` on `store` with the CA set to `pebble`.
fn lobe_tls_on(store: &str, pebble: &Pebble, args: &[&str]) -> Output {
    let ca = pebble.ca_file.to_str().unwrap();
    let mut all = vec!["--store", store, "--directory", &pebble.directory_url];
    all.extend(["--directory-ca", ca]);
    all.extend(args);
    lobe_tls(&all)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{}\n{}", stdout(out), stderr(out));
}

/// The error of a command that must fail: one line, no password.
fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", stdout(out));
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains(PASSWORD), "the password leaked: {err}");
    err
}

fn listed_names(store: &str) -> Vec<String> {
    let out = lobe_tls(&["--store", store, "list", "--json"]);
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

fn start_cluster() -> RedisCluster {
    RedisCluster::start(Some(PASSWORD))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_against_a_cluster() {
    let cluster = tokio::task::spawn_blocking(start_cluster).await.unwrap();
    let pebble = Pebble::start(PebbleOptions::default());
    let url = cluster.url();
    // Names spread over the masters: each is its own hash tag, so its own slot.
    let names = ["a.example.com", "b.example.com", "c.example.com"];
    for name in names {
        let out = lobe_tls_on(
            &url,
            &pebble,
            &["issue", "-d", name, "--http-listen", &pebble.http_listen()],
        );
        assert_ok(&out);
    }
    assert_eq!(listed_names(&url), names);
    let masters: std::collections::BTreeSet<u16> = names
        .iter()
        .map(|name| cluster.master_of_slot(cluster.slot_of(name)))
        .collect();
    eprintln!("certificates on {} masters", masters.len());

    let out = lobe_tls_on(&url, &pebble, &["check", "--json"]);
    assert_ok(&out);

    let out = lobe_tls_on(
        &url,
        &pebble,
        &["renew", "--force", "--name", "b.example.com", "--json"],
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("renewed"), "{}", stdout(&out));

    let out = lobe_tls_on(&url, &pebble, &["revoke", "--name", "c.example.com"]);
    assert_ok(&out);
    // `check` now flags the revoked certificate.
    let out = lobe_tls_on(&url, &pebble, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));

    // store copy: the cluster to a directory, and a directory into the cluster under
    // another prefix.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    let copy = copy.to_str().unwrap();
    let out = lobe_tls(&["store", "copy", "--from", &url, "--to", copy, "--json"]);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["certs"], 3);
    assert_eq!(listed_names(copy), names);

    let other = format!("{url}?prefix=copied");
    let out = lobe_tls(&["store", "copy", "--from", copy, "--to", &other]);
    assert_ok(&out);
    assert_eq!(listed_names(&other), names);
    let files = FileStore::open(copy).unwrap();
    let store = lobe_tls::RedisStore::connect(&other).await.unwrap();
    for name in names {
        let a = files.load_cert(name).await.unwrap().unwrap();
        let b = store.load_cert(name).await.unwrap().unwrap();
        assert_eq!(a.bundle.fullchain_pem(), b.bundle.fullchain_pem());
        assert_eq!(a.bundle.key_pem(), b.bundle.key_pem());
    }
    assert_eq!(store.list_accounts().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_that_do_not_fit_the_server_are_one_line_errors() {
    let cluster = tokio::task::spawn_blocking(start_cluster).await.unwrap();
    let standalone = RedisServer::start_with_password(PASSWORD);

    // A cluster URL at a standalone Redis.
    let url = format!(
        "redis+cluster://:{PASSWORD}@127.0.0.1:{}/",
        standalone.port()
    );
    let err = one_line_error(&lobe_tls(&["--store", &url, "list"]));
    assert!(err.contains("standalone Redis, not a cluster"), "{err}");
    assert!(err.contains("redis://"), "{err}");

    // A plain URL at a node of the cluster.
    let node = cluster.master_ports()[0];
    let err = one_line_error(&lobe_tls(&["--store", &cluster.node_url(node), "list"]));
    assert!(err.contains("node of a Redis Cluster"), "{err}");
    assert!(err.contains("redis+cluster://"), "{err}");

    // A database number.
    let url = format!("redis+cluster://:{PASSWORD}@127.0.0.1:{node}/2");
    let err = one_line_error(&lobe_tls(&["--store", &url, "list"]));
    assert!(err.contains("only database 0"), "{err}");

    // Nothing listening.
    let dead = lobe_tls_tests::reserve_port();
    let url = format!("redis+cluster://:{PASSWORD}@{}/", dead.addr());
    let err = one_line_error(&lobe_tls(&["--store", &url, "list"]));
    assert!(err.contains(&dead.listen()), "{err}");
}

/// `lobe-tls serve` on the cluster, killed on drop.
use lobe_tls_tests::cli::KillOnDrop as Serve;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_is_an_error_at_start_and_serve_keeps_serving_what_it_had() {
    let cluster = tokio::task::spawn_blocking(start_cluster).await.unwrap();
    let pebble = Pebble::start(PebbleOptions::default());
    let url = cluster.url();
    let name = "kept.example.com";
    let out = lobe_tls_on(
        &url,
        &pebble,
        &["issue", "-d", name, "--http-listen", &pebble.http_listen()],
    );
    assert_ok(&out);

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"hi\n").await;
            });
        }
    });
    let listen = lobe_tls_tests::reserve_port();
    let log_dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(log_dir.path().join("serve.log")).unwrap();
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .args(["serve", "--mode", "tcp", "--listen", &listen.listen()])
            .args(["--upstream", &upstream_addr, "-d", name])
            .args(["--http-listen", &pebble.http_listen()])
            .env("LOBE_TLS_STORE", &url)
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let client = lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await);
    let handshake = |client: Arc<rustls::ClientConfig>| {
        let addr = listen.addr();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let server_name = rustls::pki_types::ServerName::try_from(name).ok()?;
            let tls = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(client).connect(server_name, tcp),
            )
            .await
            .ok()?
            .ok()?;
            tls.get_ref().1.peer_certificates().map(|c| c.len())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while handshake(client.clone()).await.is_none() {
        assert!(Instant::now() < deadline, "serve never served {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The certificate's slot loses its master and the master's replica: the slot is
    // served by no one, and the cluster says it is down.
    let slot = cluster.slot_of(name);
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let master = cluster.master_of_slot(slot);
        for replica in cluster.replicas_of(master) {
            cluster.kill_node(replica);
        }
        cluster.kill_node(master);
        cluster.wait_cluster_state("fail", Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap();

    // The instance that was serving goes on serving, through its re-syncs and failing
    // store calls.
    let until = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while Instant::now() < until {
        assert!(
            handshake(client.clone()).await.is_some(),
            "serve stopped serving {name} when the cluster lost a slot: {}",
            std::fs::read_to_string(log_dir.path().join("serve.log")).unwrap_or_default()
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{answered} handshakes answered with a slot lost");

    // A command that starts now is told the cluster is down, on one line.
    let err = one_line_error(&lobe_tls(&["--store", &url, "list"]));
    assert!(err.contains("cluster_state:fail"), "{err}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_api_round_trips_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(start_cluster).await.unwrap();
    let store = lobe_tls::RedisStore::connect(&cluster.url()).await.unwrap();
    assert!(store.is_cluster());
    let names: Vec<String> = (0..50).map(|i| format!("n{i}.example.com")).collect();
    for name in &names {
        store.save_cert(&sample_cert(name, name)).await.unwrap();
    }
    let mut listed = store.list_certs().await.unwrap();
    listed.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(listed, expected);
    let versions = store.load_cert_versions(&names).await.unwrap();
    assert!(versions.iter().all(Option::is_some));
    let batch = store.load_cert_batch(&names).await;
    assert!(batch.iter().all(|entry| matches!(entry.cert, Ok(Some(_)))));
}
