//! The `lobe-tls` binary with a fallback CA, with the default timeouts: a primary that
//! refuses connections, one that hangs, and the return to the primary on `renew`; and the
//! pre-flight checks: CAA (against Knot), a paused account and a rate limit.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use lobe_tls_tests::ari_shim::{AriShim, NewOrderProblem};
use lobe_tls_tests::cli::{assert_ok, assert_one_line_error, text};
use lobe_tls_tests::dns::{DnsTestbed, TSIG_KEY, ZONE};
use lobe_tls_tests::faulty_path::FaultyPath;
use lobe_tls_tests::{Pebble, PebbleOptions};
use serde_json::Value;

/// Runs `lobe-tls` with a clean environment, the store at `store`, and `env` set.
async fn lobe(store: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store);
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.args(args).output().await.expect("run lobe-tls")
}

async fn listed_directory(store: &Path, name: &str) -> String {
    let out = lobe(store, &[], &["list", "--json"]).await;
    assert_ok(&out);
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let entry = list
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {list:?}"));
    entry["directory"].as_str().expect("directory").to_owned()
}

/// The config file giving the fallback `b` its own trust root.
fn ca_config(dir: &Path, b: &Pebble) -> String {
    let path = dir.join("lobe-tls.toml");
    std::fs::write(
        &path,
        format!(
            "[[ca]]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\n",
            b.directory_url,
            b.ca_file.display()
        ),
    )
    .expect("test step");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_falls_back_from_a_primary_that_refuses_connections() {
    let b = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .expect("test step");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("test step");
    let primary = format!("https://{}/dir", closed.local_addr().expect("test step"));
    drop(closed);
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let config = ca_config(dir.path(), &b);
    let started = Instant::now();
    let out = lobe(
        &store,
        &[
            ("LOBE_TLS_DIRECTORY", &primary),
            ("LOBE_TLS_FALLBACK_DIRECTORY", &b.directory_url),
        ],
        &[
            "issue",
            "-d",
            "refused.example.com",
            "--http-listen",
            &b.http_listen(),
            "--config",
            &config,
        ],
    )
    .await;
    let took = started.elapsed();
    assert_ok(&out);
    eprintln!("primary refusing connections: issued by the fallback in {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(
        listed_directory(&store, "refused.example.com").await,
        b.directory_url
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_falls_back_from_a_primary_that_hangs_and_renew_returns_to_it() {
    let b = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .expect("test step");
    let dns = b.dns_addr;
    let a = tokio::task::spawn_blocking(move || {
        Pebble::start(PebbleOptions {
            dns_server: Some(dns),
            ..PebbleOptions::default()
        })
    })
    .await
    .expect("test step");
    let a_addr = a
        .directory_url
        .trim_start_matches("https://")
        .trim_end_matches("/dir")
        .parse()
        .expect("test step");
    let path = FaultyPath::start(a_addr).await;
    let primary = format!("https://{}/dir", path.addr);
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let config = ca_config(dir.path(), &b);
    let ca_file = a.ca_file.display().to_string();
    let resolver = b.dns_addr.to_string();
    let env = [
        ("LOBE_TLS_DIRECTORY", primary.as_str()),
        ("LOBE_TLS_DIRECTORY_CA", ca_file.as_str()),
        ("LOBE_TLS_FALLBACK_DIRECTORY", b.directory_url.as_str()),
        ("LOBE_TLS_CONFIG", config.as_str()),
    ];

    path.go_dead();
    let started = Instant::now();
    let out = lobe(
        &store,
        &env,
        &[
            "issue",
            "-d",
            "hang.example.com",
            "--challenge",
            "dns-01",
            "--dns-provider",
            "challtestsrv",
            "--challtestsrv",
            &b.challtestsrv_url,
            "--dns-resolver",
            &resolver,
        ],
    )
    .await;
    let took = started.elapsed();
    assert_ok(&out);
    // The default request timeout is 30 s: the primary's directory request gives up then.
    eprintln!("primary hanging (default 30 s request timeout): issued by the fallback in {took:?}");
    assert!(took >= Duration::from_secs(30), "{took:?}");
    assert!(took < Duration::from_secs(45), "{took:?}");
    assert_eq!(
        listed_directory(&store, "hang.example.com").await,
        b.directory_url
    );

    // The next renewal tries the primary first, which answers again.
    path.heal();
    let out = lobe(&store, &env, &["renew", "--force"]).await;
    assert_ok(&out);
    assert_eq!(listed_directory(&store, "hang.example.com").await, primary);
    assert_eq!(a.orders_created(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_account_and_a_rate_limit_are_one_line_errors_with_what_to_do() {
    let pebble = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .expect("test step");
    let shim = AriShim::start(&pebble).await;
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let ca_file = pebble.ca_file.display().to_string();
    let env = [
        ("LOBE_TLS_DIRECTORY", shim.directory_url.as_str()),
        ("LOBE_TLS_DIRECTORY_CA", ca_file.as_str()),
    ];
    let issue = [
        "issue",
        "-d",
        "paused.example.com",
        "--http-listen",
        &pebble.http_listen(),
    ];

    let url = "https://portal.letsencrypt.org/sfe/v1/unpause?jwt=eyJhbGciOiJIUzI1NiJ9.e30.sig";
    shim.set_new_order_problem(Some(NewOrderProblem {
        status: 403,
        kind: "unauthorized".into(),
        detail: format!(
            "Your account is temporarily prevented from requesting certificates for paused.example.com and possibly others. Please visit: {url}"
        ),
        retry_after: None,
    }));
    let out = lobe(&store, &env, &issue).await;
    assert_one_line_error(
        &out,
        &["paused", &format!("unpause at {url}"), "paused.example.com"],
    );

    shim.set_new_order_problem(Some(NewOrderProblem {
        status: 429,
        kind: "rateLimited".into(),
        detail: "too many new orders recently".into(),
        retry_after: Some("120".into()),
    }));
    let out = lobe(&store, &env, &issue).await;
    assert_one_line_error(&out, &["rateLimited", "the CA asks not to retry before 20"]);
    assert_eq!(shim.refused_new_orders(), 2);
}

/// Adds CAA records to Knot's zone with a TSIG-signed dynamic update.
fn add_caa(dns: &DnsTestbed, records: &[&str]) {
    let mut script = format!(
        "server {} {}\nkey hmac-sha256:{TSIG_KEY} {}\nzone {ZONE}.\n",
        dns.knot_addr.ip(),
        dns.knot_addr.port(),
        dns.tsig_secret
    );
    for record in records {
        script.push_str(&format!("update add {record}\n"));
    }
    script.push_str("send\n");
    let path = dns.dir().join("caa.nsupdate");
    std::fs::write(&path, script).expect("test step");
    let out = std::process::Command::new("knsupdate")
        .arg(&path)
        .output()
        .expect("run knsupdate");
    assert!(out.status.success(), "knsupdate: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caa_that_forbids_the_ca_stops_the_order_and_caa_that_allows_it_issues() {
    let dns = tokio::task::spawn_blocking(DnsTestbed::start)
        .await
        .expect("test step");
    let pebble = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .expect("test step");
    add_caa(
        &dns,
        &[
            &format!("caa-deny.{ZONE}. 60 CAA 0 issue \"ca.invalid\""),
            &format!("caa-allow.{ZONE}. 60 CAA 0 issue \"pebble.test\""),
            &format!("caa-allow.{ZONE}. 60 CAA 0 issuewild \";\""),
        ],
    );
    // The shim gives Pebble's directory the identity it lacks.
    let shim = AriShim::start(&pebble).await;
    shim.set_caa_identities(&["pebble.test"]);
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let ca_file = pebble.ca_file.display().to_string();
    let resolver = dns.resolver_addr.to_string();
    let env = [
        ("LOBE_TLS_DIRECTORY", shim.directory_url.as_str()),
        ("LOBE_TLS_DIRECTORY_CA", ca_file.as_str()),
        ("LOBE_TLS_CAA_RESOLVER", resolver.as_str()),
    ];
    let http_listen = pebble.http_listen();

    // The record sits on a parent of the name: the check climbs to it.
    let denied = format!("www.caa-deny.{ZONE}");
    let out = lobe(
        &store,
        &env,
        &["issue", "-d", &denied, "--http-listen", &http_listen],
    )
    .await;
    assert_one_line_error(
        &out,
        &[
            "CAA forbids",
            &denied,
            &format!("caa-deny.{ZONE}. CAA 0 issue \"ca.invalid\""),
        ],
    );
    assert!(shim.new_orders().is_empty(), "an order was placed");

    let allowed = format!("www.caa-allow.{ZONE}");
    let out = lobe(
        &store,
        &env,
        &["issue", "-d", &allowed, "--http-listen", &http_listen],
    )
    .await;
    assert_ok(&out);
    assert_eq!(shim.new_orders().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_obtains_its_certificate_from_the_fallback_when_the_primary_refuses() {
    let b = tokio::task::spawn_blocking(|| Pebble::start(PebbleOptions::default()))
        .await
        .expect("test step");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("test step");
    let primary = format!("https://{}/dir", closed.local_addr().expect("test step"));
    drop(closed);
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let config = ca_config(dir.path(), &b);
    let listen_port = lobe_tls_tests::reserve_port();
    let listen = listen_port.listen();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", &store)
        .env("LOBE_TLS_DIRECTORY", &primary)
        .env("LOBE_TLS_FALLBACK_DIRECTORY", &b.directory_url)
        .env("LOBE_TLS_CONFIG", &config)
        .args(["serve", "--listen", &listen, "--upstream", "127.0.0.1:9"])
        .args([
            "-d",
            "served.example.com",
            "--http-listen",
            &b.http_listen(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start serve");
    let started = Instant::now();
    let directory = loop {
        let out = lobe(&store, &[], &["list", "--json"]).await;
        let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(entry) = listed.iter().find(|e| e["name"] == "served.example.com") {
            break entry["directory"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "serve stored nothing within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "serve, primary refusing connections: stored from the fallback after {:?}",
        started.elapsed()
    );
    assert_eq!(directory, b.directory_url);
    let _ = serve.kill().await;
}
