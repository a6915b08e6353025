//! The `lobe-tls` binary with `--store redis://...` against a real redis-server (and
//! Pebble for `issue`), and `lobe-tls store copy` both ways.

use std::process::{Command, Output};

use lobe_tls::{FileStore, Store};
use lobe_tls_tests::redis::sample_cert;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};

fn lobe_tls(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(args)
        .env_remove("LOBE_TLS_STORE")
        .output()
        .expect("run lobe-tls")
}

/// `lobe-tls ARGS` with `--store` on `redis` and the CA set to `pebble`.
fn lobe_tls_on(redis: &RedisServer, pebble: &Pebble, args: &[&str]) -> Output {
    let ca = pebble.ca_file.to_str().expect("UTF-8 temp path");
    let url = redis.url();
    let mut all = vec!["--store", &url, "--directory", &pebble.directory_url];
    all.extend(["--directory-ca", ca]);
    all.extend(args);
    lobe_tls(&all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn listed_names(store: &str) -> Vec<String> {
    let out = lobe_tls(&["--store", store, "list", "--json"]);
    assert!(out.status.success(), "list failed: {}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json");
    json.as_array()
        .expect("array")
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn store_copy_moves_a_directory_into_redis_and_back() {
    let redis = RedisServer::start();
    let src = tempfile::tempdir().unwrap();
    let files = FileStore::open(src.path()).unwrap();
    let certs = [
        sample_cert("a.example.com", "a.example.com"),
        sample_cert("b.example.com", "b.example.com"),
    ];
    for cert in &certs {
        files.save_cert(cert).await.unwrap();
    }
    files.save_account("acct", b"{}").await.unwrap();
    let src_path = src.path().to_str().unwrap();

    let out = lobe_tls(&[
        "store",
        "copy",
        "--from",
        src_path,
        "--to",
        &redis.url(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["certs"], 2);
    assert_eq!(report["accounts"], 1);
    assert_eq!(
        listed_names(&redis.url()),
        ["a.example.com", "b.example.com"]
    );

    let back = tempfile::tempdir().unwrap();
    let back_path = back.path().join("store");
    let back_path = back_path.to_str().unwrap();
    let out = lobe_tls(&["store", "copy", "--from", &redis.url(), "--to", back_path]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("copied 2 certificates, 1 accounts"),
        "{}",
        stdout(&out)
    );
    for cert in &certs {
        let live = back.path().join("store/live").join(&cert.meta.name);
        let key = std::fs::read_to_string(live.join("privkey.pem")).unwrap();
        assert_eq!(key, cert.bundle.key_pem());
        let chain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
        assert_eq!(chain, cert.bundle.fullchain_pem());
    }
    assert_eq!(listed_names(back_path), ["a.example.com", "b.example.com"]);
}

#[test]
fn store_copy_refuses_a_missing_source_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = lobe_tls(&[
        "store",
        "copy",
        "--from",
        missing.to_str().unwrap(),
        "--to",
        dir.path().join("to").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("to").exists(), "nothing may be created");
}

#[test]
fn unreachable_redis_is_a_one_line_actionable_error() {
    // Reserved and never listened on: connections are refused.
    let dead = lobe_tls_tests::reserve_port();
    let url = format!("redis://{}/", dead.addr());
    let out = lobe_tls(&["--store", &url, "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("check that Redis is up"), "{err}");
    assert!(err.contains(&dead.listen()), "{err}");
}

#[tokio::test]
async fn issue_with_a_redis_store_stores_there_and_list_shows_it() {
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let out = lobe_tls_on(
        &redis,
        &pebble,
        &[
            "issue",
            "-d",
            "cli-redis.example.com",
            "--http-listen",
            &pebble.http_listen(),
        ],
    );
    assert!(out.status.success(), "issue failed: {}", stderr(&out));
    assert_eq!(listed_names(&redis.url()), ["cli-redis.example.com"]);
    let store = lobe_tls::RedisStore::connect(&redis.url()).await.unwrap();
    let cert = store
        .load_cert("cli-redis.example.com")
        .await
        .unwrap()
        .unwrap();
    let root = pebble.issuing_root_pem().await;
    lobe_tls_tests::verify_chain(cert.bundle.fullchain_pem(), &root, "cli-redis.example.com")
        .unwrap();
    assert_eq!(
        store.list_accounts().await.unwrap().len(),
        1,
        "the account lives in Redis too"
    );
}

/// `lobe-tls serve`, killed on drop.
struct Serve(std::process::Child);

impl Serve {
    /// `lobe-tls serve` on `listen` in front of `upstream`, managing `name` with its
    /// HTTP-01 listener on `http_listen`, on the Redis store, ordering from Pebble.
    fn start(
        redis: &RedisServer,
        pebble: &Pebble,
        [listen, upstream, name, http_listen]: [&str; 4],
    ) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .args(["serve", "--listen", listen, "--upstream", upstream])
            .args(["-d", name, "--http-listen", http_listen])
            .env("LOBE_TLS_STORE", redis.url())
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start lobe-tls serve");
        Serve(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn two_serve_instances_on_one_redis_order_once_and_serve_the_same_certificate() {
    use std::time::{Duration, Instant};
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    let name = "serve-cluster.example.com";
    // Only instance A's HTTP listener is where Pebble validates; B starts once it listens,
    // so an order by either instance finds it (tokens are shared through Redis).
    let second_http = lobe_tls_tests::reserve_port();
    let http_listens = [pebble.http_listen(), second_http.listen()];
    let mut listens = Vec::new();
    let mut instances = Vec::new();
    for http_listen in &http_listens {
        let listen_port = lobe_tls_tests::reserve_port();
        let listen = listen_port.listen();
        let args = [listen.as_str(), &upstream_addr, name, http_listen];
        instances.push(Serve::start(&redis, &pebble, args));
        listens.push(listen.parse::<std::net::SocketAddr>().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(http_listen).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "serve never listened on {http_listen}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let client = lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut serials = Vec::new();
        for addr in &listens {
            serials.push(lobe_tls_tests::tls::handshake_serial(*addr, name, client.clone()).await);
        }
        if serials[0].is_ok() && serials[0] == serials[1] {
            break;
        }
        for instance in &mut instances {
            assert!(
                instance.0.try_wait().unwrap().is_none(),
                "serve exited early"
            );
        }
        assert!(
            Instant::now() < deadline,
            "instances never served one certificate: {serials:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pebble.orders_created(), 1, "one order for the cluster");
}

#[tokio::test]
async fn issue_on_one_box_is_answered_by_a_serve_instance_sharing_the_redis_store() {
    use std::time::{Duration, Instant};
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    let client = lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await);

    // The cluster: one `serve` instance holds the port Pebble validates HTTP-01 on.
    let listen_port = lobe_tls_tests::reserve_port();
    let listen = listen_port.listen();
    let http_listen = pebble.http_listen();
    let args = [
        listen.as_str(),
        &upstream_addr,
        "front.example.com",
        &http_listen,
    ];
    let mut serve = Serve::start(&redis, &pebble, args);
    let listen: std::net::SocketAddr = listen.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lobe_tls_tests::tls::handshake_serial(listen, "front.example.com", client.clone())
        .await
        .is_err()
    {
        assert!(serve.0.try_wait().unwrap().is_none(), "serve exited early");
        assert!(Instant::now() < deadline, "serve never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another box runs `issue`: its own HTTP-01 listener is not where the CA looks.
    let elsewhere_port = lobe_tls_tests::reserve_port();
    let elsewhere = elsewhere_port.listen();
    let name = "added.example.com";
    let out = lobe_tls_on(
        &redis,
        &pebble,
        &["issue", "-d", name, "--http-listen", &elsewhere],
    );
    assert!(out.status.success(), "issue failed: {}", stderr(&out));

    // Every instance swaps the result in: the serve instance picks it up from the store.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lobe_tls_tests::tls::handshake_serial(listen, name, client.clone())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "serve never served the certificate issued elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = lobe_tls_tests::tls::handshake_serial(listen, name, client.clone())
        .await
        .unwrap();

    // A cron `renew` on that box orders through the manager's standalone listener, which
    // shares its tokens the same way. (Pebble may reuse the authorization here; the
    // `issue` above is the strict check.)
    let out = lobe_tls_on(&redis, &pebble, &["renew", "--name", name, "--force"]);
    assert!(out.status.success(), "renew failed: {}", stderr(&out));
    assert!(stdout(&out).contains("renewed"), "{}", stdout(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = lobe_tls_tests::tls::handshake_serial(listen, name, client.clone()).await;
        if served.as_ref().is_ok_and(|serial| *serial != first) {
            break;
        }
        assert!(Instant::now() < deadline, "the renewal never reached serve");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
