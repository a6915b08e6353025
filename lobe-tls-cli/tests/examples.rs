//! The deployment examples under `examples/` are checked as far as this machine can:
//!
//! - the `serve` configuration of each (the sites file plus the flags of the Compose
//!   command, the Kubernetes args and the systemd unit's ExecStart, with container paths
//!   rewritten to temporary files) passes `lobe-tls serve --check-config`;
//! - every metric name in the Grafana dashboard's queries and in the alert rules is
//!   exported by a running `serve`;
//! - `promtool check rules` and `promtool test rules` pass on the alerts;
//! - `systemd-analyze verify` passes on the units, and the exposure score the README
//!   quotes is the one `systemd-analyze security` computes.
//!
//! Containers cannot run here, so the Compose file and the manifests themselves are not
//! started: only what `serve` reads from them is.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::{KillOnDrop, stderr, stdout};
use lobe_tls_tests::{Pebble, PebbleOptions};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn read(relative: &str) -> String {
    let path = examples().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The items of the YAML block list under `key:`, the first one after the line `anchor`
/// (a service or container name): `- item` lines, comments skipped, up to the first
/// other line. The examples write their commands this way so that this reads them.
fn yaml_list(text: &str, anchor: &str, key: &str) -> Vec<String> {
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != anchor)
        .skip_while(|l| l.trim() != key);
    assert!(lines.next().is_some(), "no {key} after {anchor}");
    let mut items = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(item) = line.strip_prefix("- ") else {
            break;
        };
        items.push(item.trim_matches('"').to_owned());
    }
    assert!(!items.is_empty(), "{key} after {anchor} is empty");
    items
}

/// The value of `key: value` on the first line that has it.
fn yaml_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key}"))
        .trim_matches('"')
        .to_owned()
}

/// The words of the unit's `ExecStart=` (continuation lines joined).
fn exec_start(unit: &str) -> Vec<String> {
    let mut joined = String::new();
    let mut inside = false;
    for line in unit.lines() {
        if let Some(rest) = line.strip_prefix("ExecStart=") {
            inside = true;
            joined.push_str(rest);
        } else if inside {
            joined.push(' ');
            joined.push_str(line);
        } else {
            continue;
        }
        match joined.strip_suffix('\\') {
            Some(kept) => joined = kept.to_owned(),
            None => break,
        }
    }
    joined.split_whitespace().map(str::to_owned).collect()
}

/// `serve --check-config` with `args` (after `serve`), each path in `paths` replaced by
/// its file, and `env`.
fn check_config(args: &[String], paths: &[(&str, &Path)], env: &[(&str, &str)]) -> Output {
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    let args: Vec<String> = args
        .iter()
        .map(|arg| {
            paths
                .iter()
                .find(|(from, _)| arg == from)
                .map_or_else(|| arg.clone(), |(_, to)| to.display().to_string())
        })
        .collect();
    let mut command = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("serve")
        .arg("--check-config")
        .args(&args[1..]);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn assert_ok(out: &Output, expected: &str) {
    assert_eq!(stdout(out), expected, "stderr: {}", stderr(out));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
}

/// Writes `text` as `name` under `dir`, mode 0600 (a secret's file).
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn the_compose_edge_passes_check_config() {
    let compose = read("compose/compose.yaml");
    let args = yaml_list(&compose, "edge:", "command:");
    let dir = tempfile::tempdir().unwrap();
    let sites = write(dir.path(), "sites.toml", &read("compose/sites.toml"));
    let token = write(
        dir.path(),
        "admin-token",
        "0123456789abcdef0123456789abcdef\n",
    );
    let store = yaml_value(&compose, "LOBE_TLS_STORE");
    assert!(store.starts_with("redis://"), "{store}");
    let out = check_config(
        &args,
        &[
            ("/etc/lobe-tls/sites.toml", &sites),
            ("/run/secrets/admin-token", &token),
        ],
        &[
            ("LOBE_TLS_STORE", &store),
            ("LOBE_TLS_EMAIL", "ops@example.com"),
        ],
    );
    assert_ok(&out, "ok: 1 sites, 3 upstreams, 1 certificate names\n");
}

#[test]
fn the_kubernetes_deployment_passes_check_config() {
    let deployment = read("kubernetes/deployment.yaml");
    let args = yaml_list(&deployment, "- name: serve", "args:");
    let dir = tempfile::tempdir().unwrap();
    let sites = write(dir.path(), "sites.toml", &read("kubernetes/sites.toml"));
    let token = write(
        dir.path(),
        "admin-token",
        "0123456789abcdef0123456789abcdef\n",
    );
    // The Redis URL comes from the Secret, as the Deployment's env takes it.
    let store = yaml_value(&read("kubernetes/secret.yaml"), "redis-url");
    assert!(store.starts_with("redis://"), "{store}");
    let out = check_config(
        &args,
        &[
            ("/etc/lobe-tls/sites.toml", &sites),
            ("/etc/lobe-tls/admin/admin-token", &token),
        ],
        &[
            ("LOBE_TLS_STORE", &store),
            ("LOBE_TLS_EMAIL", "ops@example.com"),
        ],
    );
    assert_ok(&out, "ok: 1 sites, 3 upstreams, 1 certificate names\n");
    // The probes go to the admin port the args name.
    assert!(args.iter().any(|a| a == "0.0.0.0:9180"), "{args:?}");
    for probe in ["path: /healthz", "path: /readyz", "port: admin"] {
        assert!(deployment.contains(probe), "no {probe}");
    }
    assert!(deployment.contains("containerPort: 9180"));
}

#[test]
fn the_systemd_unit_passes_check_config() {
    let unit = read("systemd/lobe-tls-serve.service");
    let words = exec_start(&unit);
    assert_eq!(words[0], "/usr/local/bin/lobe-tls", "{words:?}");
    let dir = tempfile::tempdir().unwrap();
    let sites = write(dir.path(), "sites.toml", &read("systemd/sites.toml"));
    let out = check_config(
        &words[1..],
        &[("/etc/lobe-tls/sites.toml", &sites)],
        &[("LOBE_TLS_STORE", dir.path().join("store").to_str().unwrap())],
    );
    assert_ok(&out, "ok: 1 sites, 2 upstreams, 2 certificate names\n");
}

/// Runs `systemd-analyze` with `args`; fails if it is missing (CI installs it).
fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze: {e}; install Debian's systemd package"))
}

#[test]
fn the_systemd_units_verify_and_the_readme_quotes_the_exposure_score() {
    // verify wants ExecStart's program to exist: point the copies at the built binary.
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "lobe-tls-serve.service",
        "lobe-tls-renew.service",
        "lobe-tls-renew.timer",
    ] {
        let text = read(&format!("systemd/{name}"))
            .replace("/usr/local/bin/lobe-tls", env!("CARGO_BIN_EXE_lobe-tls"));
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    for name in ["lobe-tls-serve.service", "lobe-tls-renew.timer"] {
        let path = dir.path().join(name);
        let out = systemd_analyze(&["verify", path.to_str().unwrap()]);
        assert!(
            out.status.success() && stderr(&out).is_empty(),
            "{name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let unit = dir.path().join("lobe-tls-serve.service");
    let out = systemd_analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let overall = text
        .lines()
        .find_map(|l| l.split("lobe-tls-serve.service: ").nth(1))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    // "1.5 OK 🙂": the number and its rating.
    let mut words = overall.split_whitespace();
    let (score, rating) = (words.next().unwrap(), words.next().unwrap());
    let value: f64 = score.parse().unwrap();
    assert!(value <= 2.0, "the unit is exposed: {overall}\n{text}");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let quoted = format!("lobe-tls-serve.service: {score} {rating}");
    assert!(
        readme.contains(&quoted),
        "the README should quote `{quoted}`"
    );
    assert!(
        read("systemd/lobe-tls-serve.service").contains(&format!("{score} {rating}")),
        "the unit's comment should quote `{score} {rating}`"
    );
}

/// Runs promtool with `args` in `dir`; fails if it is missing (CI installs Debian's
/// prometheus package).
fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("promtool: {e}; install Debian's prometheus package"))
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = examples().join("prometheus");
    let out = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("SUCCESS"), "{}", stdout(&out));
    let out = promtool(&dir, &["test", "rules", "alerts.test.yml"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let rules = read("prometheus/alerts.yml");
    for alert in [
        "LobeTlsCertificateRenewalOverdue",
        "LobeTlsRenewalFailing",
        "LobeTlsUpstreamDown",
        "LobeTlsNotReady",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
}

/// The metric names in `query`: words that start with `lobe_tls_` or `process_`.
fn metric_names(query: &str, into: &mut BTreeSet<String>) {
    for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("lobe_tls_") || word.starts_with("process_") {
            into.insert(word.to_owned());
        }
    }
}

/// Every PromQL query of the dashboard: panel targets' `expr` and the variables' queries.
fn dashboard_queries(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(query)) => {
                        into.push(query.clone())
                    }
                    ("query", serde_json::Value::String(query)) if query.contains('(') => {
                        into.push(query.clone())
                    }
                    _ => dashboard_queries(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, into);
            }
        }
        _ => {}
    }
}

/// The dashboard, parsed, with its shape checked: a Prometheus data source variable that
/// every panel uses, and the panels the README promises.
fn dashboard() -> serde_json::Value {
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana/lobe-tls.json"))
        .unwrap_or_else(|e| panic!("grafana/lobe-tls.json is not JSON: {e}"));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus data source variable"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut titles = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        titles.push(panel["title"].as_str().unwrap().to_owned());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{target}");
        }
    }
    let mut ids: Vec<_> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for wanted in [
        "Requests per second",
        "Latency p50 / p99",
        "5xx per second",
        "429 per second",
        "Open WebSockets",
        "Open event streams",
        "Upstreams up",
        "Days to expiry",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    dashboard
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let mut queries = Vec::new();
    dashboard_queries(&dashboard(), &mut queries);
    let mut wanted = BTreeSet::new();
    for query in &queries {
        metric_names(query, &mut wanted);
    }
    assert!(wanted.len() >= 15, "the queries were not found: {wanted:?}");
    let rules = read("prometheus/alerts.yml");
    let mut in_rules = BTreeSet::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        metric_names(line, &mut in_rules);
    }
    assert!(
        in_rules.contains("lobe_tls_certificate_not_before_timestamp_seconds")
            && in_rules.contains("lobe_tls_ready"),
        "{in_rules:?}"
    );
    wanted.extend(in_rules);

    // serve as the examples run it: a site from a sites file, with a backend, and a
    // managed name from Pebble (the certificate families).
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let backend = lobe_tls_tests::cli::greeting_upstream("HTTP/1.1 200 OK\r\n\r\n").await;
    let sites = dir.path().join("sites.toml");
    std::fs::write(
        &sites,
        format!("[[site]]\ndomains = [\"dash.example.com\"]\nupstreams = [\"{backend}\"]\n"),
    )
    .unwrap();
    let mut serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .arg("serve")
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .arg("--config")
            .arg(&sites)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", &pebble.http_listen()])
            .arg("--ready-file")
            .arg(&ready)
            .env("LOBE_TLS_STORE", dir.path().join("store"))
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addrs = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    let metrics = addrs.metrics();
    // The manager's families join once it has started (after the first order).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (missing, exported) = loop {
        let exported = lobe_tls_tests::cli::exported_metric_names(&metrics).await;
        let missing: Vec<_> = wanted.difference(&exported).cloned().collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (missing, exported);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "queried by examples/grafana or examples/prometheus but not exported: {missing:?}\nexported: {exported:?}"
    );
}
