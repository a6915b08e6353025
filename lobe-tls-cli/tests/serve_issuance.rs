//! A first issuance that fails is reported as an issuance, not a renewal, and when the
//! CA's HTTP-01 probe was refused or got a 404 the error names the port the CA probed
//! (Pebble's `httpPort` here, 80 on the Internet) and the `--http-listen` in use: the
//! mistake a new operator makes with Pebble is to leave `--http-listen` elsewhere.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::KillOnDrop;
use lobe_tls_tests::http_server::HttpServer;
use lobe_tls_tests::ports::reserve_port;
use lobe_tls_tests::{Pebble, PebbleOptions};

/// Runs `serve -d first.example.com` with `--http-listen http_listen` against `pebble`
/// until its log holds the failure line; returns that line.
async fn failed_first_issuance(pebble: &Pebble, http_listen: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let log_path = dir.path().join("serve.log");
    let upstream = lobe_tls_tests::cli::greeting_upstream("hello").await;
    let mut serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .args(["serve", "-d", "first.example.com", "--upstream", &upstream])
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .args(["--listen", "127.0.0.1:0", "--http-listen", http_listen])
            .arg("--ready-file")
            .arg(&ready)
            .env("LOBE_TLS_STORE", dir.path().join("store"))
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    // serve starts (and writes the ready file) with the name still unissued.
    lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = read(&log_path);
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("issuance failed") || l.contains("renewal failed"))
        {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no failure logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn assert_names_port_and_listen(line: &str, pebble: &Pebble, http_listen: &str, what: &str) {
    assert!(line.contains("certificate issuance failed"), "{line}");
    assert!(!line.contains("renewal failed"), "{line}");
    assert!(line.contains(what), "{line}");
    let port = pebble.http_port;
    assert!(
        line.contains(&format!("the CA probed port {port}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("--http-listen {http_listen}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("--http-listen 0.0.0.0:{port}")),
        "the fix is named: {line}"
    );
}

#[tokio::test]
async fn a_refused_probe_names_the_probed_port_and_the_http_listen() {
    let pebble = Pebble::start(PebbleOptions::default());
    // serve listens on a port of its own; nobody listens on Pebble's httpPort.
    let http = reserve_port();
    let line = failed_first_issuance(&pebble, &http.listen()).await;
    assert_names_port_and_listen(&line, &pebble, &http.listen(), "found no listener");
}

#[tokio::test]
async fn a_404_from_another_server_names_the_probed_port_and_the_http_listen() {
    let pebble = Pebble::start(PebbleOptions::default());
    // Another web server holds the port the CA probes, as nginx often holds port 80.
    let _other = HttpServer::start_on(&pebble.http_listen(), |_| async {
        http::Response::builder()
            .status(404)
            .body("not found".to_owned())
            .unwrap()
    })
    .await;
    let http = reserve_port();
    let line = failed_first_issuance(&pebble, &http.listen()).await;
    assert_names_port_and_listen(&line, &pebble, &http.listen(), "got 404");
}
