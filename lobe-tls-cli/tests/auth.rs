//! API keys and basic auth through the real binary, in front of real backend processes:
//! a password file written by Debian's `htpasswd -B`, key digests from `sha256sum`, an
//! argon2id key hash; 401 with its challenges, the credential kept from the upstream and
//! the name the edge vouches for given to it; a route's own keys; files re-read on
//! SIGHUP, a malformed one refused with the old set kept; the refusals counted; and no key
//! or password in `serve`'s trace log.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

// The edge tests' harness: backends (this binary re-run), certificates, an HTTPS client.
#[allow(dead_code)]
#[path = "edge/support.rs"]
mod support;

use support::{Answer, Backend, Client, NAME, STEP, connector, get_on, scrape_until};

const SHA_KEY: &str = "PLANTEDshaKEY-billing-5f2c";
const ARGON_KEY: &str = "PLANTEDargonKEY-reports-91ab";
const ADMIN_KEY: &str = "PLANTEDadminKEY-ops-07de";
const PASSWORD: &str = "PLANTEDpassword-alice-3c8e";
const NEW_KEY: &str = "PLANTEDnewKEY-rotated-44a1";
const THIRD_KEY: &str = "PLANTEDthirdKEY-never-6b20";
const DENIED: &str = r#"edge_denied_total{site="default",reason="auth"} "#;

/// `serve` at trace level, its stderr drained into a string as it runs.
struct Serve {
    child: Child,
    client: Client,
    metrics: String,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(args: &[&str], config: Option<&str>) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let ca = support::write_certificate(&dir.path().join("certs"));
        let ready = dir.path().join("ready.json");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--no-http"])
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .args(["--metrics-listen", "127.0.0.1:0", "--log", "trace"])
            .arg("--cert-dir")
            .arg(dir.path().join("certs"))
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .env_remove("LOBE_TLS_STORE")
            .env_remove("LOBE_TLS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            std::fs::write(dir.path().join("edge.toml"), config).unwrap();
            cmd.arg("--config").arg(dir.path().join("edge.toml"));
        }
        let mut child = cmd.spawn().unwrap();
        // Drained while it runs: a trace log fills a pipe quickly.
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addrs = lobe_tls_tests::cli::wait_ready(&ready, &mut child);
        let client = Client {
            addr: addrs.listen(),
            tls: connector(&ca, &[b"http/1.1"]),
            h2: connector(&ca, &[b"h2"]),
        };
        Serve {
            child,
            client,
            metrics: addrs.metrics(),
            log,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.get_host(NAME, path, headers).await
    }

    async fn get_host(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let tls = self.client.connect().await.unwrap();
        get_on(tls, host, path, headers).await.unwrap()
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for a log line holding `text`; the line.
    fn log_line(&self, text: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .lines()
                .find(|line| line.contains(text))
            {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no log line with {text:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails, naming the secret, if any of `secrets` shows in the log so far.
    fn assert_log_hides(&self, secrets: &[String]) {
        let log = self.log.lock().unwrap();
        assert!(log.contains("TRACE"), "no trace logs: {log}");
        for secret in secrets {
            if let Some(line) = log.lines().find(|line| line.contains(secret.as_str())) {
                panic!("the log shows {secret:?}: {line}");
            }
        }
    }
}

/// `NAME:sha256:<hex>` for `key`, the digest from `printf %s KEY | sha256sum` as the
/// README says.
fn sha256_line(name: &str, key: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", "printf %s \"$KEY\" | sha256sum"])
        .env("KEY", key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    format!("{name}:sha256:{}", text.split_whitespace().next().unwrap())
}

/// `NAME:$argon2id$...` for `key`.
fn argon2id_line(name: &str, key: &str) -> String {
    use argon2::password_hash::PasswordHasher;
    let hash = argon2::Argon2::default()
        .hash_password_with_salt(key.as_bytes(), b"lobe-tls-test-salt")
        .unwrap();
    format!("{name}:{hash}")
}

/// An htpasswd file for `user`, written by Debian's `htpasswd -B`.
fn htpasswd(path: &Path, user: &str, password: &str) {
    let status = Command::new("htpasswd")
        .args(["-B", "-b", "-c"])
        .arg(path)
        .args([user, password])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("htpasswd (apache2-utils) is installed");
    assert!(status.success());
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.starts_with(&format!("{user}:$2y$")), "{text}");
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn challenges(answer: &Answer) -> Vec<String> {
    answer
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The header lines the backend saw (`/headers` echoes them), lower case.
fn seen(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer.body.to_ascii_lowercase()
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn keys_and_passwords_admit_and_the_upstream_sees_the_name_not_the_credential() {
    let site = Backend::start("site");
    let admin = Backend::start("admin");
    let files = tempfile::tempdir().unwrap();
    let keys = write(
        files.path(),
        "keys",
        &format!(
            "# who may call the API\n\n{}\n{}\n",
            sha256_line("billing", SHA_KEY),
            argon2id_line("reports", ARGON_KEY)
        ),
    );
    let admin_keys = write(
        files.path(),
        "admin-keys",
        &format!("{}\n", sha256_line("ops", ADMIN_KEY)),
    );
    let users = files.path().join("users");
    htpasswd(&users, "alice", PASSWORD);
    let config = format!(
        r#"
[[site]]
upstreams = ["{site}"]
api_keys_file = "{keys}"
basic_auth_file = "{users}"

[[site.route]]
path = "/admin/"
upstreams = ["{admin}"]
api_keys_file = "{admin_keys}"
api_key_header = "X-Admin-Key"

[[site]]
domains = ["pass.{NAME}"]
upstreams = ["{site}"]
api_keys_file = "{keys}"
pass_credentials = true
"#,
        site = site.addr,
        admin = admin.addr,
        keys = keys.display(),
        users = users.display(),
        admin_keys = admin_keys.display(),
    );
    let serve = Serve::start(&[], Some(&config));
    // Counted from the start, at 0.
    let (count, scraped) = scrape_until(&serve.metrics, DENIED, |v| v == 0.0).await;
    assert_eq!(count, 0.0, "{scraped}");

    // No credential, a wrong key, a wrong password: 401 with both challenges.
    let refused = serve.get("/headers", &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(
        challenges(&refused),
        [
            r#"Basic realm="default", charset="UTF-8""#,
            r#"Bearer realm="default""#
        ]
    );
    assert!(refused.headers.get("x-request-id").is_some());
    for wrong in [
        ("x-api-key", "PLANTEDwrongKEY".to_owned()),
        ("authorization", "Bearer PLANTEDwrongKEY".to_owned()),
        ("authorization", basic("alice", "PLANTEDwrongPW")),
        ("authorization", basic("mallory", PASSWORD)),
    ] {
        let answer = serve.get("/headers", &[(wrong.0, &wrong.1)]).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
    }
    // The wrong password of a known user is logged with the user's name.
    let line = serve.log_line("request refused: wrong credential");
    assert!(line.contains("alice"), "{line}");

    // A sha256 key in X-Api-Key, spoofing the name: the edge's name wins, the key stays.
    let answer = serve
        .get(
            "/headers",
            &[("X-Api-Key", SHA_KEY), ("X-Authenticated-Name", "root")],
        )
        .await;
    let headers = seen(&answer);
    assert!(
        headers.contains("x-authenticated-name: billing\n"),
        "{headers}"
    );
    assert_eq!(
        headers.matches("x-authenticated-name").count(),
        1,
        "{headers}"
    );
    assert!(!headers.contains("x-api-key") && !headers.contains(&SHA_KEY.to_ascii_lowercase()));
    // The argon2id key as a Bearer token (twice: the second from the cache).
    for _ in 0..2 {
        let bearer = format!("Bearer {ARGON_KEY}");
        let answer = serve.get("/headers", &[("Authorization", &bearer)]).await;
        let headers = seen(&answer);
        assert!(
            headers.contains("x-authenticated-name: reports\n"),
            "{headers}"
        );
        assert!(!headers.contains("authorization:"), "{headers}");
    }
    // The htpasswd -B user.
    let answer = serve
        .get("/headers", &[("Authorization", &basic("alice", PASSWORD))])
        .await;
    let headers = seen(&answer);
    assert!(
        headers.contains("x-authenticated-name: alice\n"),
        "{headers}"
    );
    assert!(!headers.contains("authorization:"), "{headers}");

    // The admin route takes its own keys alone, in its own header.
    let answer = serve.get("/admin/whoami", &[("X-Api-Key", SHA_KEY)]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    assert_eq!(challenges(&answer), [r#"Bearer realm="default""#]);
    let answer = serve
        .get("/admin/whoami", &[("X-Admin-Key", ADMIN_KEY)])
        .await;
    assert_eq!(
        (answer.status, answer.body.trim()),
        (StatusCode::OK, "admin")
    );
    let answer = serve
        .get(
            "/admin/whoami",
            &[("Authorization", &format!("Bearer {ADMIN_KEY}"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    // An escaped path that an upstream may read as /admin/ needs the admin key too.
    let answer = serve
        .get("/%61dmin/whoami", &[("X-Api-Key", SHA_KEY)])
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");

    // pass_credentials: the key goes on, with the name beside it.
    let host = format!("pass.{NAME}");
    let answer = serve
        .get_host(&host, "/headers", &[("X-Api-Key", SHA_KEY)])
        .await;
    let headers = seen(&answer);
    assert!(headers.contains(&format!("x-api-key: {}\n", SHA_KEY.to_ascii_lowercase())));
    assert!(
        headers.contains("x-authenticated-name: billing\n"),
        "{headers}"
    );
    let answer = serve.get_host(&host, "/headers", &[]).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
    assert_eq!(
        challenges(&answer),
        [r#"Bearer realm="pass.edge.example.com""#]
    );

    // Every refusal of the default site counted (the pass site counts apart).
    let (count, scraped) = scrape_until(&serve.metrics, DENIED, |v| v >= 7.0).await;
    assert_eq!(count, 7.0, "{scraped}");
    serve.assert_log_hides(&secrets());
}

/// Every key and password the tests plant, and the Basic header values.
fn secrets() -> Vec<String> {
    let mut all: Vec<String> = [SHA_KEY, ARGON_KEY, ADMIN_KEY, PASSWORD, NEW_KEY, THIRD_KEY]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    all.push(basic("alice", PASSWORD)["Basic ".len()..].to_owned());
    all
}

#[tokio::test]
async fn sighup_rereads_the_files_and_a_malformed_one_keeps_the_old_set() {
    let backend = Backend::start("a");
    let files = tempfile::tempdir().unwrap();
    let keys = write(
        files.path(),
        "keys",
        &format!("{}\n", sha256_line("old", SHA_KEY)),
    );
    let keys_arg = keys.to_str().unwrap();
    let serve = Serve::start(
        &["--upstream", &backend.addr, "--api-keys-file", keys_arg],
        None,
    );
    let status = |key: &'static str| {
        let serve = &serve;
        async move { serve.get("/whoami", &[("X-Api-Key", key)]).await.status }
    };
    assert_eq!(status(SHA_KEY).await, StatusCode::OK);
    assert_eq!(status(NEW_KEY).await, StatusCode::UNAUTHORIZED);

    // The key rotated: the new one admits, the old one no longer.
    write(
        files.path(),
        "keys",
        &format!("{}\n", sha256_line("new", NEW_KEY)),
    );
    serve.signal("-HUP");
    let deadline = Instant::now() + STEP;
    while status(NEW_KEY).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "the new key never took");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(SHA_KEY).await, StatusCode::UNAUTHORIZED);

    // A malformed line: one line naming the file and the line, and the set in force stays.
    write(
        files.path(),
        "keys",
        &format!("{}\nbroken {THIRD_KEY}\n", sha256_line("third", THIRD_KEY)),
    );
    serve.signal("-HUP");
    let line = serve.log_line("SIGHUP: configuration refused");
    assert!(
        line.contains(&format!("{keys_arg}:2: expected NAME:HASH")),
        "{line}"
    );
    assert_eq!(status(NEW_KEY).await, StatusCode::OK);
    assert_eq!(status(THIRD_KEY).await, StatusCode::UNAUTHORIZED);

    // `serve --check-config` finds the same line.
    let out = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .args(["serve", "--check-config", "--upstream", &backend.addr])
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["--api-keys-file", keys_arg])
        .env_remove("LOBE_TLS_STORE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{keys_arg}:2: expected NAME:HASH")),
        "{stderr}"
    );
    assert!(!stderr.contains(THIRD_KEY), "{stderr}");
    serve.assert_log_hides(&secrets());
}
