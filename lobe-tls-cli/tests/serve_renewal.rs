//! `lobe-tls serve` keeping short-lived certificates fresh with the defaults users get:
//! no shortened check interval, no test-only knob. Clients make verified requests all
//! along; a single failure means a client met an expired certificate.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::{greeting_upstream, tls_request};
use lobe_tls_tests::faulty_path::FaultyPath;
use lobe_tls_tests::tls::connector;
use lobe_tls_tests::{Pebble, PebbleOptions};
use tokio_rustls::TlsConnector;

const NAME: &str = "app.example.test";
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

/// Starts `serve` for `NAME` through HTTP-01 on Pebble's validation port, forwarding to
/// `upstream`, with every timer at its default.
async fn start_serve(
    dir: &Path,
    pebble: &Pebble,
    directory_url: &str,
    upstream: &str,
) -> (Serve, String) {
    let log = dir.join("serve.log");
    let ready = dir.join("ready.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "serve",
            "--mode",
            "tcp",
            "--ready-file",
            ready.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
        ])
        .args(["-d", NAME, "--challenge", "http-01"])
        .args(["--http-listen", &pebble.http_listen()])
        .env("LOBE_TLS_STORE", dir.join("store"))
        .env("LOBE_TLS_DIRECTORY", directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env("LOBE_TLS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut child)
        .await
        .listen();
    (Serve { child, log }, listen)
}

/// One request as a browser makes it: a handshake verified against Pebble's root at the
/// current time, then the upstream's answer. Returns the served certificate.
async fn verified_request(
    connector: &TlsConnector,
    listen: &str,
) -> Result<lobe_tls::CertInfo, String> {
    let answer = tls_request(connector, listen, NAME).await?;
    if answer.text != GREETING {
        return Err(format!("upstream answer {:?}", answer.text));
    }
    Ok(answer.leaf)
}

/// Waits for the first verified request; panics with serve's log if none comes.
async fn first_certificate(
    serve: &Serve,
    connector: &TlsConnector,
    listen: &str,
) -> lobe_tls::CertInfo {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match verified_request(connector, listen).await {
            Ok(info) => return info,
            Err(e) if Instant::now() > deadline => {
                panic!("no verified request within 30 s: {e}\n{}", serve.log())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Verified requests every `every` for `span`: returns the failures (with the time into
/// the run) and the serials served, in order of first sight.
async fn requests_for(
    connector: &TlsConnector,
    listen: &str,
    span: Duration,
    every: Duration,
    mut at_each: impl FnMut(Duration),
) -> (Vec<String>, Vec<(Duration, String)>, usize) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut serials: Vec<(Duration, String)> = Vec::new();
    let mut count = 0;
    while started.elapsed() < span {
        let at = started.elapsed();
        at_each(at);
        count += 1;
        match verified_request(connector, listen).await {
            Ok(info) => {
                if serials.last().is_none_or(|(_, s)| *s != info.serial) {
                    serials.push((at, info.serial));
                }
            }
            Err(e) => failures.push(format!("{:.1}s: {e}", at.as_secs_f64())),
        }
        tokio::time::sleep(every).await;
    }
    (failures, serials, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_its_defaults_keeps_30_second_certificates_fresh_over_three_lifetimes() {
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(30),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = greeting_upstream(GREETING).await;
    let (serve, listen) = start_serve(dir.path(), &pebble, &pebble.directory_url, &upstream).await;
    let connector = connector(&pebble.issuing_root_pem().await);
    let first = first_certificate(&serve, &connector, &listen).await;
    assert!(first.not_after - first.not_before <= time::Duration::seconds(31));

    // Three lifetimes and a bit, a request every 250 ms.
    let (failures, serials, count) = requests_for(
        &connector,
        &listen,
        Duration::from_secs(100),
        Duration::from_millis(250),
        |_| {},
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} verified requests failed: {failures:#?}\n{}",
        failures.len(),
        serve.log()
    );
    let distinct: BTreeSet<&String> = serials.iter().map(|(_, s)| s).collect();
    // Renewed at half of each 30 s lifetime: a new serial at least every lifetime.
    assert!(
        distinct.len() >= 4,
        "serials served: {serials:?}\n{}",
        serve.log()
    );
    for pair in serials.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap < Duration::from_secs(30),
            "a serial served for {gap:?}: {serials:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_renews_before_expiry_after_the_path_to_the_ca_was_dead_for_25_seconds() {
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(60),
        ..PebbleOptions::default()
    });
    let pebble_addr = pebble
        .directory_url
        .trim_start_matches("https://")
        .trim_end_matches("/dir")
        .parse()
        .unwrap();
    let path = FaultyPath::start(pebble_addr).await;
    let directory_url = format!("https://{}/dir", path.addr);
    let dir = tempfile::tempdir().unwrap();
    let upstream = greeting_upstream(GREETING).await;
    let (serve, listen) = start_serve(dir.path(), &pebble, &directory_url, &upstream).await;
    let connector = connector(&pebble.issuing_root_pem().await);
    let first = first_certificate(&serve, &connector, &listen).await;

    // The renewal falls due at half the lifetime. The path goes dead a second before and
    // stays dead for 25 s, pooled connections included; the certificate expires 5 s later.
    let now = time::OffsetDateTime::now_utc();
    let lifetime = first.not_after - first.not_before;
    let due = first.not_before + lifetime / 2;
    let dead_from = Duration::try_from(due - now - time::Duration::seconds(1)).unwrap_or_default();
    let dead_until = dead_from + Duration::from_secs(25);
    let until_expiry = Duration::try_from(first.not_after - now).unwrap();
    let (mut dead, mut healed) = (false, false);
    let mut accepted_at_heal = 0;
    let (failures, serials, count) = requests_for(
        &connector,
        &listen,
        until_expiry + Duration::from_secs(10),
        Duration::from_millis(250),
        |at| {
            if !dead && at >= dead_from {
                path.go_dead();
                dead = true;
            }
            if dead && !healed && at >= dead_until {
                path.heal();
                accepted_at_heal = path.accepted();
                healed = true;
            }
        },
    )
    .await;
    assert!(dead && healed, "the drill ran");
    assert!(
        failures.is_empty(),
        "{} of {count} verified requests failed: {failures:#?}\n{}",
        failures.len(),
        serve.log()
    );
    let renewed = serials
        .iter()
        .find(|(_, serial)| *serial != first.serial)
        .unwrap_or_else(|| panic!("never renewed: {serials:?}\n{}", serve.log()));
    assert!(
        renewed.0 >= dead_until,
        "renewed at {:?}, while the path was dead until {dead_until:?}?",
        renewed.0
    );
    assert!(
        renewed.0 < until_expiry,
        "renewed after expiry: {serials:?}"
    );
    assert!(
        path.accepted() > accepted_at_heal,
        "the renewal went over a fresh connection"
    );
    let log = serve.log();
    assert!(
        log.contains("renewal failed"),
        "the dead path was noticed and logged: {log}"
    );
}
