//! `lobe-tls issue` with DNS-01 against real DNS: Knot (authoritative, updated by the
//! rfc2136 provider) behind unbound (Pebble's resolver).

use std::path::Path;
use std::process::{Command, Output};

use lobe_tls_tests::cli::assert_ok;
use lobe_tls_tests::dns::{DnsTestbed, TSIG_KEY, ZONE};
use lobe_tls_tests::{Pebble, PebbleOptions, verify_chain};

/// Runs `lobe-tls` with a clean environment plus `env`, the store at `store`, and the
/// directory and CA of `pebble`.
fn lobe(store: &Path, pebble: &Pebble, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store)
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().expect("run lobe-tls")
}

fn start() -> (DnsTestbed, Pebble, tempfile::TempDir) {
    let dns = DnsTestbed::start();
    let pebble = Pebble::start(PebbleOptions {
        dns_server: Some(dns.resolver_addr),
        ..PebbleOptions::default()
    });
    (dns, pebble, tempfile::tempdir().expect("tempdir"))
}

#[tokio::test]
async fn issue_rfc2136_wildcard_with_env_settings_keeps_secrets_out_of_the_store() {
    let (dns, pebble, dir) = start();
    let store = dir.path().join("store");
    let recursive = dns.resolver_addr.to_string();
    let nameserver = dns.knot_addr.to_string();
    let out = lobe(
        &store,
        &pebble,
        &[
            ("LOBE_TLS_RFC2136_NAMESERVER", &nameserver),
            ("LOBE_TLS_RFC2136_TSIG_KEY", TSIG_KEY),
            ("LOBE_TLS_RFC2136_TSIG_ALGORITHM", "hmac-sha256"),
            ("LOBE_TLS_RFC2136_TSIG_SECRET", &dns.tsig_secret),
        ],
        &[
            "issue",
            "-d",
            ZONE,
            "-d",
            &format!("*.{ZONE}"),
            "--challenge",
            "dns-01",
            "--dns-provider",
            "rfc2136",
            "--dns-recursive",
            &recursive,
            "--propagation-timeout",
            "10",
            "--propagation-interval",
            "0.5",
        ],
    );
    assert_ok(&out);
    let live = store.join(format!("live/{ZONE}"));
    let fullchain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(&fullchain, &root, &format!("www.{ZONE}")).unwrap();

    let meta = std::fs::read_to_string(live.join("lobe-tls.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(parsed["challenge"]["dns"]["provider"], "rfc2136");
    assert_eq!(parsed["challenge"]["dns"]["propagation_interval_ms"], 500);
    assert!(
        !meta.contains(&dns.tsig_secret),
        "the TSIG secret must not be stored"
    );
    assert!(
        dns.authoritative_txt(&format!("_acme-challenge.{ZONE}."))
            .is_empty()
    );
}

#[tokio::test]
async fn issue_rfc2136_with_config_file_through_cname_delegation() {
    let (dns, pebble, dir) = start();
    let store = dir.path().join("store");
    let config = dir.path().join("lobe-tls.toml");
    std::fs::write(
        &config,
        format!(
            "[rfc2136]\nnameserver = \"{}\"\ntsig_file = \"{}\"\n",
            dns.knot_addr,
            dns.write_tsig_file().display()
        ),
    )
    .unwrap();
    let apex = format!("alias.{ZONE}");
    let out = lobe(
        &store,
        &pebble,
        &[],
        &[
            "issue",
            "-d",
            &format!("*.{apex}"),
            "-d",
            &apex,
            "--challenge",
            "dns-01",
            "--dns-provider",
            "rfc2136",
            "--config",
            config.to_str().unwrap(),
            "--dns-recursive",
            &dns.resolver_addr.to_string(),
        ],
    );
    assert_ok(&out);
    let live = store.join(format!("live/_.{apex}"));
    let fullchain = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(&fullchain, &root, &apex).unwrap();

    // A renewal repeats the order from the metadata, which names the config file.
    let renew = lobe(
        &store,
        &pebble,
        &[],
        &["renew", "--force", "--name", &format!("_.{apex}")],
    );
    assert_ok(&renew);
    let renewed = std::fs::read_to_string(live.join("fullchain.pem")).unwrap();
    assert_ne!(
        renewed, fullchain,
        "the renewal must store a new certificate"
    );
    verify_chain(&renewed, &root, &format!("x.{apex}")).unwrap();
}

#[tokio::test]
async fn issue_with_missing_provider_setting_fails_in_one_line_before_ordering() {
    let (_dns, pebble, dir) = start();
    let store = dir.path().join("store");
    let out = lobe(
        &store,
        &pebble,
        &[],
        &[
            "issue",
            "-d",
            ZONE,
            "--challenge",
            "dns-01",
            "--dns-provider",
            "rfc2136",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("LOBE_TLS_RFC2136_NAMESERVER") && err.contains("--config"),
        "{err}"
    );
    assert_eq!(pebble.orders_created(), 0, "nothing may be ordered");
}
