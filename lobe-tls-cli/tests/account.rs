//! `lobe-tls account show | rollover | deactivate` against a real Pebble, with the file
//! store and with Redis: after a rollover an issue works with the new key; after a
//! deactivation the CA refuses a new order with a clear line.

use std::path::Path;
use std::process::{Command, Output};

use lobe_tls_tests::cli::{assert_ok, text};
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer, mode};
use serde_json::Value;

fn lobe(store: &str, pebble: &Pebble, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env("LOBE_TLS_EMAIL", "ops@example.com")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run lobe-tls")
}

fn one_line_error(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err
}

fn show(store: &str, pebble: &Pebble) -> Value {
    let out = lobe(store, pebble, &["account", "show", "--json"]);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The whole life of an account on `store`; `key_file` is where a directory store keeps it.
fn account_life(store: &str, pebble: &Pebble, key_file: Option<&Path>) {
    let issue = |name: &str| {
        lobe(
            store,
            pebble,
            &["issue", "-d", name, "--http-listen", &pebble.http_listen()],
        )
    };
    let out = lobe(store, pebble, &["account", "show"]);
    assert!(
        one_line_error(&out).contains("no account"),
        "{}",
        text(&out.stderr)
    );

    assert_ok(&issue("one.example.com"));
    let shown = show(store, pebble);
    assert_eq!(shown["directory"], pebble.directory_url.as_str());
    assert_eq!(shown["status"], "valid");
    assert_eq!(shown["key_type"], "ecdsa-p256");
    assert_eq!(
        shown["contacts"],
        serde_json::json!(["mailto:ops@example.com"])
    );
    let url = shown["url"].as_str().expect("url").to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let text_out = lobe(store, pebble, &["account", "show"]);
    assert_ok(&text_out);
    assert!(text(&text_out.stdout).contains(&format!("account:   {url}")));
    let key_before = key_file.map(|f| std::fs::read_to_string(f).expect("test step"));

    let out = lobe(store, pebble, &["account", "rollover", "--json"]);
    assert_ok(&out);
    let rolled: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rolled["url"], url.as_str(), "same account, new key");
    assert_eq!(rolled["status"], "valid");
    if let (Some(file), Some(before)) = (key_file, key_before) {
        let after = std::fs::read_to_string(file).expect("test step");
        let key = |json: &str| {
            serde_json::from_str::<Value>(json).expect("test step")["key_pkcs8"].clone()
        };
        assert_ne!(key(&before), key(&after), "the stored key changed");
        assert_eq!(mode(file), 0o600);
    }
    // The new key works.
    assert_ok(&issue("two.example.com"));
    assert_eq!(show(store, pebble)["url"], url.as_str());

    // No terminal, no --yes: refused, nothing changed.
    let out = lobe(store, pebble, &["account", "deactivate"]);
    assert!(one_line_error(&out).contains("--yes"));
    assert_eq!(show(store, pebble)["status"], "valid");
    let out = lobe(store, pebble, &["account", "deactivate", "--yes"]);
    assert_ok(&out);
    assert!(text(&out.stdout).contains(&url));
    assert_eq!(show(store, pebble)["status"], "deactivated");
    let err = one_line_error(&issue("three.example.com"));
    assert!(err.contains("deactivated"), "{err}");
    assert!(err.contains("--email"), "{err}");
}

#[test]
fn account_show_rollover_and_deactivate_with_the_file_store() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().expect("test step");
    let store = dir.path().join("store");
    let port = pebble
        .directory_url
        .trim_start_matches("https://127.0.0.1:")
        .trim_end_matches("/dir")
        .to_owned();
    let key_file = store.join(format!(
        "accounts/ops_example.com@127.0.0.1_{port}_dir.json"
    ));
    std::fs::create_dir(&store).expect("test step");
    account_life(store.to_str().expect("test step"), &pebble, Some(&key_file));
}

#[test]
fn account_show_rollover_and_deactivate_with_redis() {
    let pebble = Pebble::start(PebbleOptions::default());
    let redis = RedisServer::start();
    account_life(&redis.url(), &pebble, None);
}
