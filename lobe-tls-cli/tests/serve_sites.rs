//! `lobe-tls serve --config` with `[[site]]` tables: the sites' domains are issued and
//! served, at start and when a SIGHUP adds a site.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::{greeting_upstream, tls_request};
use tokio_rustls::TlsConnector;

// The binary, killed on drop if a test fails half-way.
use lobe_tls_tests::cli::KillOnDrop as Serve;

const NAME: &str = "serve.example.com";

/// `serve` in tcp mode for the `[[site]]`s of `config`, its store under `dir`, issuing
/// from `pebble` over HTTP-01; and the address it listens on.
async fn serve_sites(
    pebble: &lobe_tls_tests::Pebble,
    dir: &std::path::Path,
    config: &std::path::Path,
) -> (Serve, String) {
    let ready = dir.join("ready.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0");
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--mode", "tcp"])
        .args(["--ready-file", ready.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args([
            "--challenge",
            "http-01",
            "--http-listen",
            &pebble.http_listen(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd.env("LOBE_TLS_STORE", dir.join("store"))
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .stderr(Stdio::null());
    let mut serve = Serve(cmd.spawn().unwrap());
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0)
        .await
        .listen();
    (serve, listen)
}

#[tokio::test]
async fn a_site_of_the_config_file_gets_its_certificate_issued_and_served() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let upstream_addr = greeting_upstream("site upstream\n").await;
    // No -d and no --cert-dir: the site's domains are what gets managed.
    let config = store.path().join("edge.toml");
    std::fs::write(
        &config,
        format!("[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{upstream_addr}\"]\n"),
    )
    .unwrap();
    let (_serve, listen) = serve_sites(&pebble, store.path(), &config).await;
    let connector = lobe_tls_tests::tls::connector(&pebble.issuing_root_pem().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let greeting = loop {
        match greeting_for(&connector, &listen, NAME).await {
            Ok(greeting) => break greeting,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "never served a verified certificate: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(greeting, "site upstream\n");
    assert!(
        store
            .path()
            .join("store/live")
            .join(NAME)
            .join("fullchain.pem")
            .exists()
    );
}

/// What the upstream behind `server_name` says, over TLS verified by `connector`.
async fn greeting_for(
    connector: &TlsConnector,
    addr: &str,
    server_name: &str,
) -> Result<String, String> {
    tls_request(connector, addr, server_name)
        .await
        .map(|answer| answer.text)
}

#[tokio::test]
async fn a_site_added_by_a_reload_gets_its_certificate_issued_without_a_restart() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    const ADDED: &str = "added.example.com";
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let first = greeting_upstream("first site\n").await;
    let added = greeting_upstream("added site\n").await;
    let site = |domain: &str, upstream: &str| {
        format!("[[site]]\ndomains = [\"{domain}\"]\nupstreams = [\"{upstream}\"]\n")
    };
    let config = store.path().join("edge.toml");
    std::fs::write(&config, site(NAME, &first)).unwrap();
    let (serve, listen) = serve_sites(&pebble, store.path(), &config).await;
    let connector = lobe_tls_tests::tls::connector(&pebble.issuing_root_pem().await);
    let greeted = |name: &'static str, expected: &'static str| {
        let (connector, listen) = (connector.clone(), listen.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match greeting_for(&connector, &listen, name).await {
                    Ok(greeting) => break assert_eq!(greeting, expected),
                    Err(e) => assert!(Instant::now() < deadline, "{name} never served: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    greeted(NAME, "first site\n").await;
    assert!(greeting_for(&connector, &listen, ADDED).await.is_err());

    std::fs::write(&config, site(NAME, &first) + &site(ADDED, &added)).unwrap();
    let pid = serve.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    greeted(ADDED, "added site\n").await;
    greeted(NAME, "first site\n").await;
    assert!(
        store
            .path()
            .join("store/live")
            .join(ADDED)
            .join("fullchain.pem")
            .exists()
    );
}
