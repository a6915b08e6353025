//! The admin listener of `lobe-tls serve` (`--admin-listen`): `/healthz`, `/readyz`,
//! `/metrics`, and the status page that headless Chromium renders, with real backends,
//! a certificate from Pebble, and real signals.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::{KillOnDrop as Serve, ReadyAddrs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "status.example.com";
const STEP: Duration = Duration::from_secs(10);

/// `lobe-tls serve` with `args`, the admin listener on a free loopback port unless
/// `args` or `env` say otherwise, and its store in `dir`.
fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("LOBE_TLS_STORE", dir.join("store"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Spawns `cmd` with `--ready-file` under `dir` and waits for its listeners.
async fn start(mut cmd: Command, dir: &Path) -> (Serve, ReadyAddrs) {
    let ready = dir.join("ready.json");
    cmd.arg("--ready-file").arg(&ready);
    let mut serve = Serve(cmd.spawn().unwrap());
    let addrs = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    (serve, addrs)
}

/// `GET path` over plain HTTP/1.1, with `Authorization: auth` if given: the status code
/// and the body.
async fn get(addr: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(STEP, exchange).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `path` until `done` accepts the answer (within 60 s); returns that answer.
async fn until(addr: &str, path: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(addr, path, None).await;
        if done(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered as expected; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP backend on a free loopback port, served by this test's runtime.
fn backend(name: &'static str) -> String {
    let addr = lobe_tls_tests::reserve_port().listen();
    let bound = addr.clone();
    tokio::spawn(async move {
        let _ = lobe_tls_tests::backend::serve(&bound, name).await;
    });
    let deadline = Instant::now() + STEP;
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the backend never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

/// A loopback address nothing listens on.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

/// Where test artifacts go: `target/test-artifacts/` of the build.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium on `url` with `mode` (`--dump-dom` or `--screenshot=PATH`), within
/// 60 s; its standard output.
fn chromium_run(url: &str, mode: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(lobe_tls_tests::cli::chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1400,1200",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {mode} {url} took over 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The text of an HTML document, tags dropped and white space collapsed.
fn text_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_renders_the_status_page_with_a_pebble_certificate_and_a_down_upstream() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let up = backend("replica-a");
    let down = closed_port();
    let config = dir.path().join("sites.toml");
    std::fs::write(
        &config,
        format!(
            "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{up}\"]\nhealth_path = \"/healthz\"\nhealth_interval = 0.5\n\n\
             [[site]]\nupstreams = [\"{down}\"]\nhealth_path = \"/healthz\"\nhealth_interval = 0.5\nfall = 1\n"
        ),
    )
    .unwrap();
    let cmd = serve(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http-listen",
            &pebble.http_listen(),
        ],
        &[
            ("LOBE_TLS_DIRECTORY", &pebble.directory_url),
            ("LOBE_TLS_DIRECTORY_CA", pebble.ca_file.to_str().unwrap()),
        ],
    );
    let (_serve, addrs) = start(cmd, dir.path()).await;
    let admin = addrs.admin();

    // Not ready while a site has no upstream in rotation, and it says which.
    let (status, body) = until(&admin, "/readyz", |_, body| {
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        json["sites_without_upstream"] == serde_json::json!(["default"])
            && json["missing_certificates"] == serde_json::json!([])
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["ready"], false);
    assert_eq!(readiness["listeners"], true);
    assert_eq!(get(&admin, "/healthz", None).await.0, 200);

    // The obtained event and the last checks are in before the browser looks.
    until(&admin, "/status.json", |_, body| {
        body.contains("\"kind\": \"obtained\"") && body.contains("\"result\": \"refused\"")
    })
    .await;
    let url = format!("http://{admin}/status");
    let dom = chromium_run(&url, "--dump-dom");
    let text = text_of(&dom);
    for needle in [
        "lobe-tls status",
        "not ready",
        "No upstream in rotation for: default",
        NAME,
        "Pebble",
        "store",
        &up,
        &down,
        "status 200",
        "refused",
        "directory",
        "obtained",
    ] {
        assert!(
            text.contains(needle),
            "{needle:?} missing from the page: {text}"
        );
    }
    assert!(dom.contains("http-equiv=\"refresh\""), "{dom}");
    assert!(!dom.contains("<script"), "{dom}");
    // The up upstream is up, the other down.
    assert!(
        text.contains(&format!("{up} up")),
        "{up} not shown up: {text}"
    );
    assert!(
        text.contains(&format!("{down} down")),
        "{down} not shown down: {text}"
    );

    let shot = artifacts().join("status.png");
    let _ = std::fs::remove_file(&shot);
    chromium_run(&url, &format!("--screenshot={}", shot.display()));
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot at {}",
        shot.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_when_the_drain_starts_and_process_metrics_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let root = lobe_tls_tests::tls::write_site_pair(&certs, &[NAME]);
    let connector = lobe_tls_tests::tls::connector(&root);
    let up = backend("replica-a");
    let cmd = serve(
        dir.path(),
        &[
            "--no-http",
            "--upstream",
            &up,
            "--cert-dir",
            certs.to_str().unwrap(),
            "--drain-timeout",
            "30",
        ],
        &[],
    );
    let (mut serve, addrs) = start(cmd, dir.path()).await;
    let admin = addrs.admin();
    let (_, body) = until(&admin, "/readyz", |status, _| status == 200).await;
    assert!(body.contains("\"ready\": true"), "{body}");
    let (status, metrics) = get(&admin, "/metrics", None).await;
    assert_eq!(status, 200);
    for name in [
        "lobe_tls_ready 1",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }

    // A slow request holds the drain open.
    let tls = TcpStream::connect(addrs.listen()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
    let mut tls = connector.connect(name, tls).await.unwrap();
    tls.write_all(format!("GET /slow?ms=8000 HTTP/1.1\r\nHost: {NAME}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        let (_, body) = get(&up, "/slow/in-flight", None).await;
        if body.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = serve.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, body) = until(&admin, "/readyz", |status, _| status == 503).await;
    assert_eq!(status, 503);
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readiness["draining"], true, "{body}");
    assert_eq!(readiness["ready"], false, "{body}");
    let (_, metrics) = get(&admin, "/metrics", None).await;
    assert!(metrics.contains("lobe_tls_ready 0"), "{metrics}");
    // Still draining: the slow request is in flight and serve still runs.
    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "serve ended before its drain"
    );
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_string(&mut answer))
        .await
        .unwrap()
        .ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_the_status_page_needs_the_token_and_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    lobe_tls_tests::tls::write_site_pair(&certs, &[NAME]);
    let up = backend("replica-a");
    let base = [
        "--no-http",
        "--upstream",
        up.as_str(),
        "--cert-dir",
        certs.to_str().unwrap(),
    ];

    // Without a token: refused by --check-config and at start, one line each.
    let mut check = serve(dir.path(), &base, &[]);
    let out = check
        .args(["--check-config", "--admin-listen", "0.0.0.0:9180"])
        .output()
        .unwrap();
    let err = lobe_tls_tests::cli::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--admin-token-file"), "{err}");
    let mut start_bare = serve(dir.path(), &base, &[]);
    let out = start_bare
        .args(["--admin-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    lobe_tls_tests::cli::assert_one_line_error(
        &out,
        &["--admin-listen 0.0.0.0:0", "--admin-token-file"],
    );
    // 127.0.0.2 is loopback: no token needed.
    let out = serve(dir.path(), &base, &[])
        .args(["--check-config", "--admin-listen", "127.0.0.2:9180"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        lobe_tls_tests::cli::stderr(&out)
    );

    // With a token: 401 without it, 200 with it; probes need none.
    let token = "admin-token-MARKER-7f3a";
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let eab_kid = "eab-kid-MARKER-51c2";
    let eab_key = "ZWFiLWhtYWMtTUFSS0VSLTkwZDE";
    let mut args = base.to_vec();
    args.extend(["--admin-listen", "0.0.0.0:0", "--admin-token-file"]);
    args.push(token_file.to_str().unwrap());
    let cmd = serve(
        dir.path(),
        &args,
        &[
            ("LOBE_TLS_EAB_KID", eab_kid),
            ("LOBE_TLS_EAB_HMAC_KEY", eab_key),
        ],
    );
    let (_serve, addrs) = start(cmd, dir.path()).await;
    let admin = format!("127.0.0.1:{}", addrs.admin_listen.unwrap().port());
    assert_eq!(get(&admin, "/healthz", None).await.0, 200);
    assert_eq!(until(&admin, "/readyz", |s, _| s == 200).await.0, 200);
    assert_eq!(get(&admin, "/metrics", None).await.0, 200);
    for path in ["/status", "/status.json"] {
        assert_eq!(get(&admin, path, None).await.0, 401, "{path}");
        assert_eq!(
            get(&admin, path, Some("Bearer wrong-token")).await.0,
            401,
            "{path}"
        );
        let (status, body) = get(&admin, path, Some(&format!("Bearer {token}"))).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains(NAME), "{path}: {body}");
        for secret in [token, eab_kid, eab_key, "PRIVATE KEY"] {
            assert!(!body.contains(secret), "{path} shows {secret}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_is_on_127_0_0_1_9180_by_default() {
    // The only test that uses the default address: every other one passes port 0.
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    lobe_tls_tests::tls::write_site_pair(&certs, &[NAME]);
    let up = backend("replica-a");
    let mut cmd = serve(
        dir.path(),
        &[
            "--no-http",
            "--upstream",
            &up,
            "--cert-dir",
            certs.to_str().unwrap(),
        ],
        &[],
    );
    cmd.env_remove("LOBE_TLS_ADMIN_LISTEN");
    let (_serve, addrs) = start(cmd, dir.path()).await;
    assert_eq!(addrs.admin(), "127.0.0.1:9180");
    assert_eq!(get("127.0.0.1:9180", "/healthz", None).await.0, 200);
    let (status, body) = until("127.0.0.1:9180", "/readyz", |s, _| s == 200).await;
    assert_eq!(status, 200, "{body}");
    // On loopback the page needs no token.
    let (status, page) = get("127.0.0.1:9180", "/status", None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_warnings_say_why_and_a_name_that_does_not_resolve_is_warned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    lobe_tls_tests::tls::write_site_pair(&certs, &[NAME]);
    let down = closed_port();
    let config = dir.path().join("sites.toml");
    std::fs::write(
        &config,
        format!(
            "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"no-such-upstream.invalid:8080\"]\n\n\
             [[site]]\nupstreams = [\"{down}\"]\nhealth_path = \"/healthz\"\nhealth_interval = 0.5\nfall = 1\n"
        ),
    )
    .unwrap();
    let cmd = serve(
        dir.path(),
        &[
            "--no-http",
            "--config",
            config.to_str().unwrap(),
            "--cert-dir",
            certs.to_str().unwrap(),
        ],
        &[],
    );
    let (mut serve, _addrs) = start(cmd, dir.path()).await;
    let stderr = serve.0.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let (mut unresolved, mut refused) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(unresolved && refused) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| {
            panic!("warnings missing: unresolved {unresolved}, refused {refused}")
        });
        if line.contains("upstream name does not resolve") {
            assert!(line.contains("no-such-upstream.invalid:8080"), "{line}");
            unresolved = true;
        }
        if line.contains("upstream fails its health checks") {
            assert!(
                line.contains("reason=\"refused\"") || line.contains("reason=refused"),
                "{line}"
            );
            assert!(line.contains(&down), "{line}");
            refused = true;
        }
    }
}
