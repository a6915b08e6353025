//! `lobe-tls serve --on-demand-ask URL` as a user runs it, with every timer and limit at
//! its default: the real binary in front of real Pebble, an ask endpoint that allows one
//! name, and a client that resumes its session.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::{greeting_upstream, tls_request};
use lobe_tls_tests::http_server::{HttpServer, json_response};
use lobe_tls_tests::{Pebble, PebbleOptions};
use rustls::HandshakeKind;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const ALLOWED: &str = "new.example.test";
const REFUSED: &str = "other.example.test";
const GREETING: &str = "upstream says hi\n";

/// `lobe-tls serve`, killed on drop; its log goes to a file shown when a test fails.
struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request for `name`, verified against Pebble's root: how the handshake went.
async fn request(
    connector: &TlsConnector,
    listen: &str,
    name: &str,
) -> Result<HandshakeKind, String> {
    let answer = tls_request(connector, listen, name).await?;
    if answer.text != GREETING {
        return Err(format!("upstream answer {:?}", answer.text));
    }
    Ok(answer.kind)
}

fn start_serve(dir: &Path, pebble: &Pebble, ask: &str, upstream: &str) -> Serve {
    // On Pebble's TLS-ALPN-01 port: on-demand certificates are validated there.
    let listen = pebble.tls_listen();
    start_serve_with(
        dir,
        pebble,
        &listen,
        upstream,
        &["--on-demand-ask", ask, "--no-http"],
    )
}

/// `lobe-tls serve` on `listen` before `upstream`, with `flags` for on-demand issuance.
fn start_serve_with(
    dir: &Path,
    pebble: &Pebble,
    listen: &str,
    upstream: &str,
    flags: &[&str],
) -> Serve {
    let log = dir.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--listen", listen, "--upstream", upstream])
        .args(flags)
        // The upstream greets in raw bytes: forward them (the default mode speaks HTTP).
        .args(["--mode", "tcp"])
        .env("LOBE_TLS_STORE", dir.join("store"))
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env("LOBE_TLS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    Serve { child, log }
}

#[tokio::test]
async fn serve_issues_an_allowed_name_on_its_first_request_and_resumes_sessions() {
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let dir = tempfile::tempdir().unwrap();
    let asks = Arc::new(AtomicUsize::new(0));
    let counted = asks.clone();
    let ask = HttpServer::start(move |req| {
        counted.fetch_add(1, Ordering::SeqCst);
        let allowed = req.path_and_query == format!("/check?domain={ALLOWED}");
        async move { json_response(if allowed { 200 } else { 404 }, serde_json::json!({})) }
    })
    .await;
    let upstream = greeting_upstream(GREETING).await;
    let serve = start_serve(
        dir.path(),
        &pebble,
        &format!("{}/check", ask.url()),
        &upstream,
    );
    let listen = pebble.tls_listen();
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(&listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not listen\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client that keeps its session tickets (the harness's clients do not).
    let mut config = (*lobe_tls_tests::tls::client_config(&root)).clone();
    config.resumption = rustls::client::Resumption::default();
    let connector = TlsConnector::from(std::sync::Arc::new(config));
    let started = Instant::now();
    let first = request(&connector, &listen, ALLOWED).await;
    let took = started.elapsed();
    eprintln!("serve: first request for a new name answered in {took:?}");
    assert_eq!(first, Ok(HandshakeKind::Full), "{}", serve.log());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(pebble.orders_created(), 1);
    // The same client resumes (tickets sealed with keys kept in the store).
    for _ in 0..2 {
        let again = request(&connector, &listen, ALLOWED).await;
        assert_eq!(again, Ok(HandshakeKind::Resumed), "{}", serve.log());
    }
    assert_eq!(
        lobe_tls_tests::mode(&dir.path().join("store/secrets/session-ticket-keys")),
        0o600
    );

    // A name the endpoint refuses: no handshake, no order, and no second ask.
    for _ in 0..2 {
        let refused = request(&connector, &listen, REFUSED).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    assert_eq!(asks.load(Ordering::SeqCst), 2);
    assert_eq!(pebble.orders_created(), 1);
    assert!(
        dir.path().join("store/live").join(ALLOWED).exists(),
        "{}",
        serve.log()
    );
}

#[test]
fn serve_refuses_an_empty_guard() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--on-demand-allow", "", "--no-http"])
        .env("LOBE_TLS_STORE", dir.path().join("store"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!dir.path().join("store").exists());
}

/// `--on-demand-timeout`'s default: how long a first handshake may wait.
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until `serve` accepts connections on `listen`.
async fn wait_listening(serve: &Serve, listen: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not listen\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One first handshake for `name`, verified against Pebble's root by `connector`, with
/// room for the whole on-demand wait: how long it took, or why it failed.
async fn first_request(
    connector: &TlsConnector,
    listen: &str,
    name: &str,
) -> Result<Duration, String> {
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let started = Instant::now();
    let exchange = async {
        let tcp = TcpStream::connect(listen)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut tls, &mut text)
            .await
            .map_err(|e| e.to_string())?;
        if text != GREETING {
            return Err(format!("upstream answer {text:?}"));
        }
        Ok(started.elapsed())
    };
    tokio::time::timeout(ON_DEMAND_TIMEOUT + Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer".to_owned())?
}

/// The challenge kind the store's metadata for `name` starts with.
fn recorded_challenge(dir: &Path, name: &str) -> String {
    let path = dir.join("store/live").join(name).join("lobe-tls.json");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    meta["challenge"]["kind"]
        .as_str()
        .unwrap_or(&text)
        .to_owned()
}

/// `serve` with on-demand issuance at its defaults (no --challenge), its TLS listener on
/// a port Pebble's TLS-ALPN-01 validation never reaches and its HTTP listener on the
/// port Pebble's HTTP-01 validation goes to: as behind a CDN, only port 80 reaches it.
async fn serve_behind_port_80(
    dir: &Path,
    pebble: &Pebble,
    listen: &str,
    flags: &[&str],
) -> (Serve, TlsConnector) {
    let upstream = greeting_upstream(GREETING).await;
    let http_listen = pebble.http_listen();
    let mut all = vec![
        "--on-demand-allow",
        "*.example.test",
        "--http-listen",
        &http_listen,
    ];
    all.extend_from_slice(flags);
    let serve = start_serve_with(dir, pebble, listen, &upstream, &all);
    wait_listening(&serve, listen).await;
    let root = pebble.issuing_root_pem().await;
    let connector = TlsConnector::from(lobe_tls_tests::tls::client_config(&root));
    (serve, connector)
}

#[tokio::test]
async fn on_demand_validates_through_http01_when_only_port_80_reaches_serve() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    // Pebble's TLS-ALPN-01 port stays reserved with nobody listening.
    let listen = lobe_tls_tests::reserve_port();
    let (serve, connector) = serve_behind_port_80(dir.path(), &pebble, &listen.listen(), &[]).await;

    let took = first_request(&connector, &listen.listen(), ALLOWED).await;
    eprintln!("serve: first request through HTTP-01 answered in {took:?}");
    let took = took.unwrap_or_else(|e| panic!("{e}\n{}", serve.log()));
    assert!(took < ON_DEMAND_TIMEOUT, "took {took:?}");
    assert_eq!(pebble.orders_created(), 1, "{}", serve.log());
    // The store records the challenge that worked first, for the renewals.
    assert_eq!(recorded_challenge(dir.path(), ALLOWED), "http-01");
}

#[tokio::test]
async fn a_burst_of_50_first_handshakes_makes_one_http01_order() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let listen = lobe_tls_tests::reserve_port();
    let (serve, connector) = serve_behind_port_80(dir.path(), &pebble, &listen.listen(), &[]).await;

    let handshakes: Vec<_> = (0..50)
        .map(|_| {
            let connector = connector.clone();
            let listen = listen.listen();
            tokio::spawn(async move { first_request(&connector, &listen, ALLOWED).await })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for handshake in handshakes {
        // Each handshake that completes verified the certificate against Pebble's root.
        let took = handshake
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}\n{}", serve.log()));
        slowest = slowest.max(took);
    }
    eprintln!("serve: 50 first handshakes, the slowest answered in {slowest:?}");
    assert!(slowest < ON_DEMAND_TIMEOUT, "took {slowest:?}");
    assert_eq!(pebble.orders_created(), 1, "{}", serve.log());
}

#[tokio::test]
async fn on_demand_falls_back_to_tls_alpn01_when_http01_fails() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let upstream = greeting_upstream(GREETING).await;
    // The HTTP listener on a port Pebble never reaches; the TLS listener on its
    // TLS-ALPN-01 port.
    let http = lobe_tls_tests::reserve_port();
    let listen = pebble.tls_listen();
    let http_listen = http.listen();
    let serve = start_serve_with(
        dir.path(),
        &pebble,
        &listen,
        &upstream,
        &["--on-demand-allow", ALLOWED, "--http-listen", &http_listen],
    );
    wait_listening(&serve, &listen).await;
    let root = pebble.issuing_root_pem().await;
    let connector = TlsConnector::from(lobe_tls_tests::tls::client_config(&root));

    let took = first_request(&connector, &listen, ALLOWED).await;
    eprintln!("serve: first request after the fallback answered in {took:?}");
    let took = took.unwrap_or_else(|e| panic!("{e}\n{}", serve.log()));
    assert!(took < ON_DEMAND_TIMEOUT, "took {took:?}");
    // One order failed through HTTP-01, the next one validated through TLS-ALPN-01.
    assert_eq!(pebble.orders_created(), 2, "{}", serve.log());
    assert_eq!(recorded_challenge(dir.path(), ALLOWED), "tls-alpn-01");
}

#[tokio::test]
async fn challenge_tls_alpn01_pins_on_demand_to_the_tls_listener() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let listen = lobe_tls_tests::reserve_port();
    let (serve, connector) = serve_behind_port_80(
        dir.path(),
        &pebble,
        &listen.listen(),
        &["--challenge", "tls-alpn-01"],
    )
    .await;

    // Port 80 would have done, but the pin keeps to TLS-ALPN-01, which cannot pass.
    let refused = first_request(&connector, &listen.listen(), ALLOWED).await;
    assert!(refused.is_err(), "{refused:?}\n{}", serve.log());
    let log = serve.log();
    assert!(log.contains("for the tls-alpn-01 challenge"), "{log}");
    assert_eq!(pebble.orders_created(), 1, "{}", serve.log());
    assert!(!dir.path().join("store/live").join(ALLOWED).exists());
}

#[test]
fn challenge_http01_without_a_way_to_answer_it_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--on-demand-allow", ALLOWED, "--no-http"])
        .args(["--challenge", "http-01"])
        .env("LOBE_TLS_STORE", dir.path().join("store"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--http-listen"), "{stderr}");
    assert!(!dir.path().join("store").exists());
}

#[tokio::test]
async fn http01_for_an_on_demand_name_is_answered_by_any_instance_sharing_the_store() {
    let pebble = Pebble::start(PebbleOptions::default());
    let redis = lobe_tls_tests::RedisServer::start();
    let store = redis.url();
    let upstream = greeting_upstream(GREETING).await;
    // A takes the handshake; its HTTP listener is on a port Pebble never reaches. B's is
    // the one Pebble's HTTP-01 validation reaches.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (listen_a, http_a) = (
        lobe_tls_tests::reserve_port(),
        lobe_tls_tests::reserve_port(),
    );
    let listen_b = lobe_tls_tests::reserve_port();
    let start = |dir: &Path, listen: &str, http_listen: &str| {
        start_serve_with(
            dir,
            &pebble,
            listen,
            &upstream,
            &[
                "--store",
                &store,
                "--on-demand-allow",
                ALLOWED,
                "--http-listen",
                http_listen,
            ],
        )
    };
    let a = start(dir_a.path(), &listen_a.listen(), &http_a.listen());
    let b = start(dir_b.path(), &listen_b.listen(), &pebble.http_listen());
    wait_listening(&a, &listen_a.listen()).await;
    wait_listening(&b, &listen_b.listen()).await;
    let root = pebble.issuing_root_pem().await;
    let connector = TlsConnector::from(lobe_tls_tests::tls::client_config(&root));

    let took = first_request(&connector, &listen_a.listen(), ALLOWED).await;
    let took = took.unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
    assert!(took < ON_DEMAND_TIMEOUT, "took {took:?}");
    assert_eq!(pebble.orders_created(), 1, "{}", a.log());
}
