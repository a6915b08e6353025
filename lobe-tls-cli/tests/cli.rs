//! The `lobe-tls` binary against a real Pebble: `issue`, `list` and `check`, their JSON,
//! their exit codes, and the one-line errors.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lobe_tls_tests::cli::{assert_ok, assert_one_line_error, stderr, stdout};
use lobe_tls_tests::{EAB_HMAC, EAB_KID, Pebble, PebbleOptions, mode, verify_chain};
use serde_json::Value;

/// Runs `lobe-tls` with a clean environment, the store at `store` and, if given, the
/// directory and CA of `pebble`.
fn lobe(store: &Path, pebble: Option<&Pebble>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store);
    if let Some(pebble) = pebble {
        cmd.env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    }
    cmd.args(args).output().expect("run lobe-tls")
}

fn list_json(store: &Path) -> Vec<Value> {
    let out = lobe(store, None, &["list", "--json"]);
    assert_ok(&out);
    match serde_json::from_str(&stdout(&out)).expect("list --json is JSON") {
        Value::Array(entries) => entries,
        other => panic!("not an array: {other}"),
    }
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

#[tokio::test]
async fn issue_then_list_and_check_report_the_certificate() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let http = pebble.http_listen();

    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "www.cli.example.com",
            "--domain",
            "cli.example.com",
            "--http-listen",
            &http,
        ],
    );
    assert_ok(&out);
    assert!(
        stderr(&out).is_empty(),
        "no terminal, so no progress: {}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("issued www.cli.example.com"));

    // The files a web server reads: verified chain, private key, private directories.
    let live = store.join("live/www.cli.example.com");
    let fullchain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(&fullchain, &root, "cli.example.com").unwrap();
    verify_chain(&fullchain, &root, "www.cli.example.com").unwrap();
    assert_eq!(mode(&live.join("privkey.pem")), 0o600);
    assert_eq!(mode(&std::fs::canonicalize(&live).unwrap()), 0o700);
    assert_eq!(mode(&store), 0o700);

    // A second certificate under a chosen name, with another key type.
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "--name",
            "api",
            "-d",
            "api.cli.example.com",
            "--key-type",
            "ecdsa-p384",
            "--http-listen",
            &http,
        ],
    );
    assert_ok(&out);

    let entries = list_json(&store);
    assert_eq!(entries.len(), 2);
    let api = &entries[0];
    assert_eq!(api["name"], "api");
    assert_eq!(api["key_type"], "ecdsa-p384");
    let www = &entries[1];
    assert_eq!(www["name"], "www.cli.example.com");
    assert_eq!(
        www["domains"],
        serde_json::json!(["www.cli.example.com", "cli.example.com"])
    );
    for field in ["not_before", "not_after", "renew_after"] {
        assert!(is_rfc3339(&www[field]), "{field}: {}", www[field]);
    }
    let serial = www["serial"].as_str().unwrap();
    assert!(!serial.is_empty() && serial.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(www["issuer"].as_str().unwrap().contains("Pebble"));
    assert_eq!(www["key_type"], "ecdsa-p256");
    assert_eq!(www["status"], "valid");

    let table = stdout(&lobe(&store, None, &["list"]));
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("www.cli.example.com") && table.contains("valid"));
    assert!(table.contains(serial));

    let check = lobe(&store, None, &["check"]);
    assert_eq!(check.status.code(), Some(0), "{}", stdout(&check));

    // Pebble's certificates live for years; a window longer than that warns.
    let check = lobe(&store, None, &["check", "--warn-days", "100000", "--json"]);
    assert_eq!(check.status.code(), Some(1), "{}", stdout(&check));
    let reports: Value = serde_json::from_str(&stdout(&check)).unwrap();
    assert_eq!(reports[0]["status"], "expiring");
}

#[tokio::test]
async fn issue_json_prints_the_stored_facts_of_a_dns01_wildcard() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "*.wild.cli.example.com",
            "-d",
            "wild.cli.example.com",
            "--challenge",
            "dns-01",
            "--dns-provider",
            "challtestsrv",
            "--challtestsrv",
            &pebble.challtestsrv_url,
            "--dns-resolver",
            &pebble.dns_addr.to_string(),
            "--key-type",
            "rsa2048",
            "--json",
        ],
    );
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let facts: Value = serde_json::from_str(&stdout(&out)).expect("issue --json is JSON");
    assert_eq!(facts["name"], "_.wild.cli.example.com");
    assert_eq!(
        facts["domains"],
        serde_json::json!(["*.wild.cli.example.com", "wild.cli.example.com"])
    );
    assert_eq!(facts["key_type"], "rsa2048");
    assert_eq!(facts["status"], "valid");
    assert_eq!(
        list_json(&store)[0],
        facts,
        "issue --json matches list --json"
    );

    let fullchain =
        std::fs::read_to_string(store.join("live/_.wild.cli.example.com/fullchain.pem")).unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(&fullchain, &root, "any.wild.cli.example.com").unwrap();

    // The metadata remembers how to repeat the order, without secrets.
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(store.join("live/_.wild.cli.example.com/lobe-tls.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["challenge"]["kind"], "dns-01");
    assert_eq!(meta["challenge"]["dns"]["provider"], "challtestsrv");
    assert_eq!(meta["key_type"], "rsa2048");
    assert_eq!(meta["directory"], pebble.directory_url.as_str());
}

#[tokio::test]
async fn check_exits_2_once_a_certificate_is_past_its_renewal_time() {
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(16),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "short.cli.example.com",
            "--http-listen",
            &pebble.http_listen(),
        ],
    );
    assert_ok(&out);
    let entry = &list_json(&store)[0];
    assert_eq!(entry["status"], "valid");
    let renew_after = time::OffsetDateTime::parse(
        entry["renew_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let wait = renew_after - time::OffsetDateTime::now_utc() + time::Duration::milliseconds(500);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;

    let check = lobe(&store, None, &["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    assert!(stdout(&check).contains("renewal-due"), "{}", stdout(&check));
    assert_eq!(list_json(&store)[0]["status"], "renewal-due");
}

#[tokio::test]
async fn check_exits_2_for_a_key_mismatch_and_for_a_missing_store() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    for name in ["good.cli.example.com", "bad.cli.example.com"] {
        let out = lobe(
            &store,
            Some(&pebble),
            &["issue", "-d", name, "--http-listen", &pebble.http_listen()],
        );
        assert_ok(&out);
    }
    // Put the good certificate's key next to the bad one's certificate.
    let key = std::fs::read(store.join("live/good.cli.example.com/privkey.pem")).unwrap();
    std::fs::write(store.join("live/bad.cli.example.com/privkey.pem"), key).unwrap();

    let check = lobe(&store, None, &["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    assert!(
        stdout(&check).contains("bad.cli.example.com: invalid"),
        "{}",
        stdout(&check)
    );
    let entries = list_json(&store);
    assert_eq!(entries[0]["name"], "bad.cli.example.com");
    assert_eq!(entries[0]["status"], "invalid");
    assert!(
        entries[0]["error"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        entries[0]
    );
    assert_eq!(entries[1]["status"], "valid");

    let missing = dir.path().join("no-such-store");
    let check = lobe(&missing, None, &["check"]);
    assert_eq!(check.status.code(), Some(2), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("does not exist"),
        "{}",
        stderr(&check)
    );
    assert!(!missing.exists(), "check must not create a store");
    assert_one_line_error(&lobe(&missing, None, &["list"]), &["does not exist"]);
}

#[tokio::test]
async fn issue_failures_exit_1_with_one_line_and_write_no_certificate() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let http = pebble.http_listen();

    // Refused before anything is created or ordered.
    let squatter = std::net::TcpListener::bind(&http).unwrap();
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "busy.cli.example.com",
            "--http-listen",
            &http,
        ],
    );
    assert_one_line_error(&out, &[&format!("cannot listen on {http}")]);
    drop(squatter);
    let out = lobe(&store, Some(&pebble), &["issue", "-d", "a..example.com"]);
    assert_one_line_error(&out, &["empty label"]);
    let out = lobe(
        &store,
        Some(&pebble),
        &["issue", "-d", "*.cli.example.com", "--http-listen", &http],
    );
    assert_one_line_error(&out, &["dns-01"]);
    let out = lobe(
        &store,
        Some(&pebble),
        &["issue", "-d", "x.cli.example.com", "--challenge", "dns-01"],
    );
    assert_one_line_error(&out, &["--dns-provider"]);
    let out = lobe(
        &store,
        Some(&pebble),
        &["issue", "--name", "../etc", "-d", "x.cli.example.com"],
    );
    assert_one_line_error(&out, &["invalid certificate name"]);
    assert!(!store.exists(), "nothing may be written for local errors");
    assert_eq!(pebble.orders_created(), 0);

    // An unreachable CA, and a CA file that is not PEM.
    // Reserved and never listened on: connections are refused.
    let dead = lobe_tls_tests::reserve_port();
    let unreachable = format!("https://{}/dir", dead.addr());
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "--directory",
            &unreachable,
            "issue",
            "-d",
            "x.cli.example.com",
            "--http-listen",
            &http,
        ],
    );
    assert_one_line_error(&out, &["cannot reach the ACME directory"]);
    let bad_ca = dir.path().join("bad-ca.pem");
    std::fs::write(&bad_ca, "not a certificate\n").unwrap();
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "--directory-ca",
            bad_ca.to_str().unwrap(),
            "issue",
            "-d",
            "x.cli.example.com",
            "--http-listen",
            &http,
        ],
    );
    assert_one_line_error(&out, &[bad_ca.to_str().unwrap()]);

    // Nothing answers where Pebble validates: the CA's problem detail comes through.
    let elsewhere_port = lobe_tls_tests::reserve_port();
    let elsewhere = elsewhere_port.listen();
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "nobody.cli.example.com",
            "--http-listen",
            &elsewhere,
        ],
    );
    assert_one_line_error(&out, &["validation failed: "]);
    assert!(
        stderr(&out).contains("connection refused"),
        "{}",
        stderr(&out)
    );
    assert!(
        list_json(&store).is_empty(),
        "a failed order stores nothing"
    );
    assert!(!store.join("live/nobody.cli.example.com").exists());
}

#[tokio::test]
async fn eab_required_names_the_flags_and_issues_with_them_from_the_environment() {
    let pebble = Pebble::start(PebbleOptions {
        eab_required: true,
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let http = pebble.http_listen();
    let args = ["issue", "-d", "eab.cli.example.com", "--http-listen", &http];
    assert_one_line_error(
        &lobe(&store, Some(&pebble), &args),
        &["pass --eab-kid and --eab-hmac-key"],
    );

    let out = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("LOBE_TLS_STORE", &store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env("LOBE_TLS_EAB_KID", EAB_KID)
        .env("LOBE_TLS_EAB_HMAC_KEY", EAB_HMAC)
        .args(args)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(list_json(&store)[0]["status"], "valid");
}

#[tokio::test]
async fn a_bad_log_filter_is_one_line_error_and_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = lobe(&store, None, &["--log", "lobe_tls=loud", "list"]);
    assert_one_line_error(&out, &["--log \"lobe_tls=loud\" is not a log filter"]);

    // stderr is a pipe here, as under systemd or cron: logs come as plain text.
    let pebble = Pebble::start(PebbleOptions::default());
    let http = pebble.http_listen();
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "--log",
            "info",
            "issue",
            "-d",
            "log.example.com",
            "--http-listen",
            &http,
        ],
    );
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("registered a new ACME account"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in piped logs: {err:?}"
    );
}
