//! Every metric the README's table documents is exported by a running `serve`, under
//! exactly that name, from the start: dashboards and alerts written from the README find
//! what they look for. `serve` runs with a managed name from Pebble (the manager's
//! families), port 80 (the HTTP-01 listener's) and the edge.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::KillOnDrop;
use lobe_tls_tests::{Pebble, PebbleOptions};

/// The metric names in the first column of the README's metrics table.
fn documented() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut names = BTreeSet::new();
    let metric = |n: &str| n.starts_with("lobe_tls_") || n.starts_with("process_");
    for line in readme
        .lines()
        .filter(|l| l.starts_with("| `lobe_tls_") || l.starts_with("| `process_"))
    {
        let first = line.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').filter(|n| metric(n)) {
            names.insert(name.to_owned());
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_readme_documents_is_exported_under_its_name() {
    let documented = documented();
    assert!(
        documented.len() >= 20,
        "the table was not found: {documented:?}"
    );
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let ready = store.path().join("ready.json");
    let upstream = lobe_tls_tests::cli::greeting_upstream("hello").await;
    let mut serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .args([
                "serve",
                "-d",
                "metrics.example.com",
                "--upstream",
                &upstream,
            ])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", &pebble.http_listen()])
            .arg("--ready-file")
            .arg(&ready)
            .env("LOBE_TLS_STORE", store.path())
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addrs = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    let metrics = addrs.metrics_listen.unwrap().to_string();
    // The manager's families join once it has started (after the first order).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let exported = lobe_tls_tests::cli::exported_metric_names(&metrics).await;
        let missing: Vec<_> = documented.difference(&exported).cloned().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (missing, exported);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.0.is_empty(),
        "documented in the README but not exported: {:?}\nexported: {:?}",
        missing.0,
        missing.1
    );
}
