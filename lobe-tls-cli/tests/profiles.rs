//! `--profile` on `issue` and `serve` and in the config file, through the shim in front of
//! Pebble that lists profiles (Pebble 2.4 lists none); and `serve -d 127.0.0.1`, which
//! orders an IP address certificate and serves it to `https://127.0.0.1:PORT/`.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::ari_shim::AriShim;
use lobe_tls_tests::cli::{assert_ok, assert_one_line_error, greeting_upstream, tls_request};
use lobe_tls_tests::{Pebble, PebbleOptions};
use serde_json::Value;
use tokio::process::Command;

const GREETING: &str = "upstream says hi\n";

fn command(store: &Path, pebble: &Pebble, directory: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", directory)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `lobe-tls` against the shim, without blocking the runtime the shim runs on.
async fn lobe(store: &Path, pebble: &Pebble, shim: &AriShim, args: &[&str]) -> Output {
    command(store, pebble, &shim.directory_url)
        .args(args)
        .output()
        .await
        .unwrap()
}

async fn listed(store: &Path, pebble: &Pebble, shim: &AriShim) -> Vec<Value> {
    let out = lobe(store, pebble, shim, &["list", "--json"]).await;
    assert_ok(&out);
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn entry<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_profile_is_checked_stored_listed_and_ordered_again_by_renew() {
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    shim.set_profiles(&["classic", "shortlived", "tlsserver"]);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let http = pebble.http_listen();
    let issue = |name: &'static str, extra: &'static [&'static str]| {
        let mut args = vec!["issue", "-d", name, "--http-listen", &http];
        args.extend_from_slice(extra);
        args
    };

    // Not listed: one line naming what the CA lists, and no order.
    let out = lobe(
        &store,
        &pebble,
        &shim,
        &issue("p.example.com", &["--profile", "nonesuch"]),
    )
    .await;
    assert_one_line_error(
        &out,
        &["does not list the profile \"nonesuch\"; it lists classic, shortlived, tlsserver"],
    );
    assert!(shim.order_profiles().is_empty());

    let out = lobe(
        &store,
        &pebble,
        &shim,
        &issue("p.example.com", &["--profile", "tlsserver"]),
    )
    .await;
    assert_ok(&out);
    // From the config file, beside the DNS providers' tables.
    let config = dir.path().join("lobe-tls.toml");
    std::fs::write(&config, "profile = \"shortlived\"\n[rfc2136]\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    let mut args = issue("c.example.com", &[]);
    args.extend(["--config", &config]);
    assert_ok(&lobe(&store, &pebble, &shim, &args).await);

    let list = listed(&store, &pebble, &shim).await;
    assert_eq!(entry(&list, "p.example.com")["profile"], "tlsserver");
    assert_eq!(entry(&list, "c.example.com")["profile"], "shortlived");

    // A renewal repeats the stored profile.
    let out = lobe(
        &store,
        &pebble,
        &shim,
        &["renew", "--force", "--name", "p.example.com", "--json"],
    )
    .await;
    assert_ok(&out);
    let some = |p: &str| Some(p.to_owned());
    assert_eq!(
        shim.order_profiles(),
        [some("tlsserver"), some("shortlived"), some("tlsserver")]
    );

    // `serve --profile` without -d has nothing to apply it to.
    let out = lobe(
        &store,
        &pebble,
        &shim,
        &[
            "serve",
            "--profile",
            "shortlived",
            "--upstream",
            "127.0.0.1:1",
        ],
    )
    .await;
    assert_one_line_error(&out, &["--profile applies to the certificate -d names"]);
}

/// `https://127.0.0.1:PORT/` as a client makes it: no SNI (the host is an address), the
/// leaf verified against Pebble's root for the IP address, then the upstream's answer.
async fn request_ip(listen: &str, root: &str) -> Result<lobe_tls::CertInfo, String> {
    let answer = tls_request(&lobe_tls_tests::tls::connector(root), listen, "127.0.0.1").await?;
    if answer.text != GREETING {
        return Err(format!("upstream answer {:?}", answer.text));
    }
    Ok(answer.leaf)
}

/// Pebble behind the shim that lists `classic` and `shortlived`, and Pebble's root.
async fn shortlived_ca() -> (Pebble, AriShim, String) {
    let pebble = Pebble::start(PebbleOptions::default());
    let shim = AriShim::start(&pebble).await;
    shim.set_profiles(&["classic", "shortlived"]);
    let root = pebble.issuing_root_pem().await;
    (pebble, shim, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_orders_an_ip_certificate_under_shortlived_and_answers_https_127_0_0_1() {
    let (pebble, shim, root) = shortlived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let upstream = greeting_upstream(GREETING).await;
    let log = dir.path().join("serve.log");
    let ready = dir.path().join("ready.json");
    let mut serve = command(&store, &pebble, &shim.directory_url)
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream", &upstream])
        .args(["--ready-file", ready.to_str().unwrap()])
        // The upstream greets in raw bytes: forward them (the default mode speaks HTTP).
        .args(["--mode", "tcp"])
        .args(["-d", "127.0.0.1", "--http-listen", &pebble.http_listen()])
        .env("LOBE_TLS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve)
        .await
        .listen();

    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        match request_ip(&listen, &root).await {
            Ok(info) => break info,
            Err(e) if Instant::now() > deadline => panic!(
                "no verified request to https://{listen}/ within 20 s: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert_eq!(served.domains, ["127.0.0.1"]);
    // No --profile: the CA lists shortlived and the order holds an IP address.
    assert_eq!(shim.order_profiles(), [Some("shortlived".to_owned())]);
    let list = listed(&store, &pebble, &shim).await;
    let stored = entry(&list, "127.0.0.1");
    assert_eq!(stored["domains"], serde_json::json!(["127.0.0.1"]));
    assert!(stored.get("profile").is_none(), "{stored}");
}

/// A `[[site]]` for an IP address that a SIGHUP adds is ordered and answered like one
/// given at start: `https://127.0.0.1:PORT/` (no SNI) reaches that site's upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_for_an_ip_address_added_by_a_reload_is_issued_and_answered_without_sni() {
    const FIRST: &str = "first.example.com";
    let (pebble, shim, root) = shortlived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let first = greeting_upstream("first site\n").await;
    let by_ip = greeting_upstream(GREETING).await;
    let site = |domain: &str, upstream: &str| {
        format!("[[site]]\ndomains = [\"{domain}\"]\nupstreams = [\"{upstream}\"]\n")
    };
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, site(FIRST, &first)).unwrap();
    let log = dir.path().join("serve.log");
    let ready = dir.path().join("ready.json");
    let mut serve = command(&store, &pebble, &shim.directory_url)
        .args(["serve", "--listen", "127.0.0.1:0", "--mode", "tcp"])
        .args(["--ready-file", ready.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(["--http-listen", &pebble.http_listen()])
        .env("LOBE_TLS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve)
        .await
        .listen();
    let connector = lobe_tls_tests::tls::connector(&root);
    let within_30s = |what: &str, e: String, deadline: Instant| {
        assert!(
            Instant::now() < deadline,
            "{what} not served within 30 s: {e}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tls_request(&connector, &listen, FIRST).await {
            Ok(answer) => break assert_eq!(answer.text, "first site\n"),
            Err(e) => within_30s(FIRST, e, deadline),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(request_ip(&listen, &root).await.is_err());

    std::fs::write(&config, site(FIRST, &first) + &site("127.0.0.1", &by_ip)).unwrap();
    let pid = serve.id().unwrap().to_string();
    let hup = Command::new("kill").args(["-HUP", &pid]).status().await;
    assert!(hup.unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        match request_ip(&listen, &root).await {
            Ok(info) => break info,
            Err(e) => within_30s("https://127.0.0.1/", e, deadline),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served.domains, ["127.0.0.1"]);
    assert_eq!(
        shim.order_profiles().last(),
        Some(&Some("shortlived".to_owned()))
    );
    // The first site is still served by its name.
    let answer = tls_request(&connector, &listen, FIRST).await.unwrap();
    assert_eq!(answer.text, "first site\n");
}
