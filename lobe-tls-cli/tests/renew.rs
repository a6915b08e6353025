//! `lobe-tls renew`, `revoke` and `issue --challenge tls-alpn-01` against a real Pebble.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lobe_tls_tests::{Pebble, PebbleOptions, verify_chain};

/// Runs `lobe-tls` with a clean environment, the store at `store`, and `pebble`'s
/// directory and CA.
fn lobe(store: &Path, pebble: &Pebble, args: &[&str]) -> Output {
    command(store, pebble, args).output().expect("run lobe-tls")
}

fn command(store: &Path, pebble: &Pebble, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .args(args);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
}

fn json(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn issue(store: &Path, pebble: &Pebble, domain: &str) {
    let http = pebble.http_listen();
    assert_ok(&lobe(
        store,
        pebble,
        &["issue", "-d", domain, "--http-listen", &http],
    ));
}

fn serial_of(store: &Path, name: &str) -> String {
    let pem = std::fs::read_to_string(store.join("live").join(name).join("cert.pem"))
        .expect("read cert.pem");
    let der =
        rustls_pki_types::CertificateDer::from(pem::parse(pem).expect("PEM").contents().to_vec());
    lobe_tls::CertInfo::from_der(&der)
        .expect("certificate")
        .serial
}

#[tokio::test]
async fn renew_leaves_fresh_certificates_alone_and_renews_due_ones_running_the_deploy_hook() {
    // 20 s certificates are due at half-life, after 10 s.
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(20),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    issue(&store, &pebble, "a.renew.example.com");
    issue(&store, &pebble, "b.renew.example.com");
    let before = serial_of(&store, "a.renew.example.com");

    let out = lobe(&store, &pebble, &["renew", "--json"]);
    assert_ok(&out);
    let results = json(&out);
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_eq!(r["result"], "not-due", "{r}");
    }

    tokio::time::sleep(Duration::from_secs(11)).await;
    let hook_log = dir.path().join("hook.log");
    let hook = format!(
        "echo \"$LOBE_TLS_NAME|$LOBE_TLS_DOMAINS|$LOBE_TLS_CERT_PATH|$LOBE_TLS_KEY_PATH|$LOBE_TLS_FULLCHAIN_PATH\" >> {}",
        hook_log.display()
    );
    let out = lobe(
        &store,
        &pebble,
        &[
            "renew",
            "--name",
            "a.renew.example.com",
            "--deploy-hook",
            &hook,
        ],
    );
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a.renew.example.com: renewed"),
        "{}",
        text(&out)
    );
    assert_ne!(serial_of(&store, "a.renew.example.com"), before);
    let log = std::fs::read_to_string(&hook_log).unwrap();
    let live = store.join("live/a.renew.example.com");
    assert_eq!(
        log.trim_end(),
        format!(
            "a.renew.example.com|a.renew.example.com|{}|{}|{}",
            live.join("cert.pem").display(),
            live.join("privkey.pem").display(),
            live.join("fullchain.pem").display()
        ),
        "the hook runs once, for the renewed certificate only"
    );
    let fullchain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    verify_chain(
        &fullchain,
        &pebble.issuing_root_pem().await,
        "a.renew.example.com",
    )
    .unwrap();

    // The CA is gone: the due certificate fails, the exit status says so, and the
    // stored certificate is untouched.
    let b_before = serial_of(&store, "b.renew.example.com");
    let directory = pebble.directory_url.clone();
    let ca = pebble.ca_file.clone();
    let keep_ca = dir.path().join("ca.pem");
    std::fs::copy(&ca, &keep_ca).unwrap();
    drop(pebble);
    let out = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", &store)
        .env("LOBE_TLS_DIRECTORY", &directory)
        .env("LOBE_TLS_DIRECTORY_CA", &keep_ca)
        .args(["renew", "--name", "b.renew.example.com"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lobe-tls: error: b.renew.example.com:"),
        "{}",
        text(&out)
    );
    assert_eq!(serial_of(&store, "b.renew.example.com"), b_before);
}

#[tokio::test]
async fn two_concurrent_renew_runs_order_each_certificate_once() {
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(20),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let names = [
        "c1.renew.example.com",
        "c2.renew.example.com",
        "c3.renew.example.com",
    ];
    for name in names {
        issue(&store, &pebble, name);
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let orders_before = pebble.orders_created();

    let first = command(&store, &pebble, &["renew", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let second = command(&store, &pebble, &["renew", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert_ok(&first);
    assert_ok(&second);

    assert_eq!(
        pebble.orders_created() - orders_before,
        names.len(),
        "one order per certificate\n{}\n{}",
        text(&first),
        text(&second)
    );
    let all: Vec<serde_json::Value> = json(&first).into_iter().chain(json(&second)).collect();
    for name in names {
        let renewed = all
            .iter()
            .filter(|r| r["name"] == name && r["result"] == "renewed")
            .count();
        assert_eq!(renewed, 1, "{name}: {all:?}");
        let other = all
            .iter()
            .find(|r| r["name"] == name && r["result"] != "renewed")
            .unwrap();
        assert!(
            other["result"] == "renewed-elsewhere" || other["result"] == "not-due",
            "{other}"
        );
    }
}

#[tokio::test]
async fn revoke_revokes_at_the_ca_marks_it_for_check_and_the_next_renew_replaces_it() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    issue(&store, &pebble, "revoke.example.com");
    let serial = serial_of(&store, "revoke.example.com");

    let out = lobe(
        &store,
        &pebble,
        &[
            "revoke",
            "--name",
            "revoke.example.com",
            "--reason",
            "superseded",
        ],
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&serial));
    let status = pebble
        .management_get(&format!("/cert-status-by-serial/{serial}"))
        .await;
    assert!(status.contains("Revoked"), "{status}");

    // Revoking again is the CA's refusal, on one line.
    let out = lobe(&store, &pebble, &["revoke", "--name", "revoke.example.com"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );

    let out = lobe(&store, &pebble, &["revoke", "--name", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no certificate named \"nope\""), "{err}");

    // The monitoring probe sees the revoked certificate, and the next plain renew (what
    // cron runs) replaces it without --force.
    let out = lobe(&store, &pebble, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(json(&out)[0]["status"], "revoked", "{}", text(&out));
    let out = lobe(&store, &pebble, &["renew", "--json"]);
    assert_ok(&out);
    assert_eq!(json(&out)[0]["result"], "renewed", "{}", text(&out));
    assert_ne!(serial_of(&store, "revoke.example.com"), serial);
    let out = lobe(&store, &pebble, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test]
async fn issue_with_tls_alpn01_uses_the_standalone_listener() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let tls = pebble.tls_listen();
    let out = lobe(
        &store,
        &pebble,
        &[
            "issue",
            "-d",
            "alpn.cli.example.com",
            "--challenge",
            "tls-alpn-01",
            "--tls-listen",
            &tls,
        ],
    );
    assert_ok(&out);
    let fullchain =
        std::fs::read_to_string(store.join("live/alpn.cli.example.com/fullchain.pem")).unwrap();
    verify_chain(
        &fullchain,
        &pebble.issuing_root_pem().await,
        "alpn.cli.example.com",
    )
    .unwrap();
    // renew --force repeats the order with the same challenge and listener.
    let out = lobe(
        &store,
        &pebble,
        &["renew", "--force", "--name", "alpn.cli.example.com"],
    );
    assert_ok(&out);
}
