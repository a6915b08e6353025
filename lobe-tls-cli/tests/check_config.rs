//! `lobe-tls serve --check-config`: the flags and the --config file checked without
//! binding, ordering or contacting anything; every error on a line of its own; and
//! `serve --help` grouped by concern.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use lobe_tls_tests::cli::{stderr, stdout};

/// Runs `lobe-tls` with a clean environment and the store at `store`.
fn lobe(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store)
        .args(args)
        .output()
        .unwrap()
}

/// Writes `text` to `name` under `dir`; returns the path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The error lines of a failed check, after asserting exit status 2 and an empty stdout.
fn error_lines(out: &Output) -> Vec<String> {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(stdout(out), "", "stderr: {err}");
    let lines: Vec<String> = err.lines().map(str::to_owned).collect();
    for line in &lines {
        assert!(line.starts_with("lobe-tls: error: "), "{err}");
    }
    lines
}

#[test]
fn a_good_configuration_is_ok_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = write(
        dir.path(),
        "edge.toml",
        r#"
client_prefix_v6 = 56

[[site]]
domains = ["chat.example.com", "www.chat.example.com"]
upstreams = ["127.0.0.1:8081", { addr = "127.0.0.1:8082", weight = 2 }]
health_path = "/healthz"
rise = 3

[[site.route]]
path = "/api/"
upstreams = ["127.0.0.1:9000"]
"#,
    );
    // Ports this test holds: serve would fail to bind them, --check-config must not try.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let held_http = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let http = held_http.local_addr().unwrap().to_string();
    let out = lobe(
        &store,
        &[
            "serve",
            "--check-config",
            "--listen",
            &listen,
            "--http-listen",
            &http,
            "--metrics-listen",
            &listen,
            "--config",
            &config,
            "-d",
            "chat.example.com",
            "-d",
            "API.example.com",
            "--upstream",
            "127.0.0.1:7000",
        ],
    );
    assert_eq!(
        stdout(&out),
        "ok: 2 sites, 4 upstreams, 3 certificate names\n",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
    // Nothing was opened either: the store directory was not created.
    assert!(!store.exists(), "--check-config created the store");
}

#[test]
fn every_error_is_reported_on_a_line_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "edge.toml",
        "client_prefix_v4 = 40\n\n[[site]]\ndomains = [\"chat.example.com\"]\nupstreams = [\"127.0.0.1\"]\n",
    );
    let out = lobe(
        &dir.path().join("store"),
        &[
            "serve",
            "--check-config",
            "--config",
            &config,
            "--upstream",
            "http://127.0.0.1:8080",
        ],
    );
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let has = |needles: &[&str]| {
        lines
            .iter()
            .any(|line| needles.iter().all(|needle| line.contains(needle)))
    };
    assert!(
        has(&[
            "edge.toml: site chat.example.com: upstream \"127.0.0.1\" is not host:port",
            "add a port, e.g. 127.0.0.1:8080",
        ]),
        "{lines:#?}"
    );
    assert!(
        has(&["edge.toml: client_prefix_v4 = 40 is out of range"]),
        "{lines:#?}"
    );
    assert!(
        has(&[
            "--upstream \"http://127.0.0.1:8080\" is not host:port",
            "drop the scheme",
        ]),
        "{lines:#?}"
    );
}

#[test]
fn a_misspelled_table_is_an_error_that_names_the_key_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "edge.toml",
        "client_prefix_v6 = 56\n\n[[sites]]\nupstreams = [\"127.0.0.1:8080\"]\n",
    );
    let out = lobe(
        &dir.path().join("store"),
        &["serve", "--check-config", "--config", &config],
    );
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0]
            .contains("edge.toml: line 3: unknown top-level key `sites` (did you mean [[site]]?)"),
        "{lines:#?}"
    );
}

#[test]
fn serve_help_is_grouped_by_concern_and_every_flag_still_parses() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = lobe(&store, &["serve", "--help"]);
    let help = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for heading in [
        "Listeners",
        "Sites and upstreams",
        "Balancing and health",
        "Client identity",
        "Limits",
        "Access control",
        "Logging and admin",
        "Certificates",
        "ACME",
    ] {
        assert!(
            help.lines().any(|line| line == format!("{heading}:")),
            "no heading {heading:?} in:\n{help}"
        );
    }
    // The TOML-only keys are named, with where to read about them.
    for key in ["rise", "fall", "health_timeout", "cookie_name", "[[site]]"] {
        assert!(help.contains(key), "{key} missing from:\n{help}");
    }
    // Env names are kept (--tls-listen is hidden here: serve answers TLS-ALPN-01 on --listen).
    for env in [
        "ACCEPT_PROXY_PROTOCOL",
        "CAA_RESOLVER",
        "CERT_DIR",
        "CHALLENGE",
        "CLIENT_PREFIX_V4",
        "CONFIG",
        "DEFAULT_NAME",
        "DIRECTORY_CA",
        "DNS_RECURSIVE",
        "DRAIN_TIMEOUT",
        "EAB_HMAC_KEY",
        "FALLBACK_DIRECTORY",
        "HEADER_READ_TIMEOUT",
        "HEALTH_PATH",
        "HTTP_LISTEN",
        "LISTEN",
        "LOG",
        "MAX_REQUESTS_PER_IP",
        "METRICS_LISTEN",
        "ON_DEMAND_ASK",
        "PROFILE",
        "RETRY_BUFFER_TOTAL",
        "STORE",
        "TRUSTED_PROXY",
        "UPSTREAM",
    ] {
        assert!(
            help.contains(&format!("[env: LOBE_TLS_{env}")),
            "LOBE_TLS_{env} missing from:\n{help}"
        );
    }
    assert!(!help.contains("--tls-listen"), "{help}");

    // One flag of each group at least, global options after the subcommand included.
    let webroot = dir.path().join("webroot");
    std::fs::create_dir(&webroot).unwrap();
    let cert_dir = dir.path().to_str().unwrap();
    let out = lobe(
        &store,
        &[
            "serve",
            "--check-config",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "http",
            "--threads",
            "2",
            "--http-listen",
            "127.0.0.1:0",
            "--ready-file",
            "/tmp/never-written.json",
            "--drain-timeout",
            "5",
            "--upstream",
            "127.0.0.1:8080,127.0.0.1:8081",
            "--hsts",
            "60",
            "--idle-timeout",
            "60",
            "--lb",
            "cookie",
            "--health-path",
            "/healthz",
            "--health-interval",
            "2",
            "--max-body-size",
            "1000",
            "--max-conns",
            "100",
            "--max-conns-per-ip",
            "10",
            "--max-requests-per-ip",
            "10",
            "--retry-buffer-per-conn",
            "0",
            "--retry-buffer-total",
            "0",
            "--rate-limit",
            "5",
            "--header-read-timeout",
            "5",
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--client-prefix-v4",
            "24",
            "--client-prefix-v6",
            "56",
            "--allow",
            "192.0.2.0/24",
            "--deny",
            "192.0.2.7",
            "--cert-dir",
            cert_dir,
            "--default-name",
            "a.example.com",
            "--name",
            "a",
            "-d",
            "a.example.com",
            "--profile",
            "classic",
            "--on-demand-allow",
            "*.example.com",
            "--on-demand-timeout",
            "5",
            "--on-demand-rate",
            "5",
            "--challenge",
            "http-01",
            "--http-webroot",
            webroot.to_str().unwrap(),
            "--tls-listen",
            "127.0.0.1:0",
            "--dns-resolver",
            "127.0.0.1:53",
            "--propagation-timeout",
            "5",
            "--metrics-listen",
            "127.0.0.1:0",
            "--directory",
            "letsencrypt-staging",
            "--email",
            "ops@example.com",
            "--eab-kid",
            "kid",
            "--eab-hmac-key",
            "aGVsbG8",
            "--fallback-directory",
            "https://ca.example.net/directory",
            "--caa-resolver",
            "127.0.0.1:53",
            "--log",
            "warn",
        ],
    );
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(0), "ok: 1 sites, 2 upstreams, 1 certificate names\n"),
        "stderr: {}",
        stderr(&out)
    );
}
