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
    let log = dir.join("serve.log");
    // On Pebble's TLS-ALPN-01 port: on-demand certificates are validated there.
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "serve",
            "--listen",
            &pebble.tls_listen(),
            "--upstream",
            upstream,
        ])
        // The upstream greets in raw bytes: forward them (the default mode speaks HTTP).
        .args(["--on-demand-ask", ask, "--no-http", "--mode", "tcp"])
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
