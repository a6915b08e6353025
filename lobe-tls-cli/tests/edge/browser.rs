//! A real browser through the edge: headless Chromium loads a page from the replicas,
//! opens an `EventSource` and a `WebSocket` through `lobe-tls serve`, and must see every
//! token and every echo although the replica its cookie pins it to is killed midway.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::support::{Backend, Edge, NAME, plain_get};

/// Tokens the page's `EventSource` must see, and messages its WebSocket must get echoed.
const TOKENS: u32 = 40;
const MESSAGES: u32 = 40;

/// Chromium, killed with its whole process group on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn open(url: &str, port_host: &str, spki: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(lobe_tls_tests::cli::chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // The page's name resolves to the edge on loopback; the edge's certificate is
            // trusted by its key alone (a pin, not "ignore all errors").
            .arg(format!("--host-resolver-rules=MAP {NAME} {port_host}"))
            .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        Browser {
            child,
            _profile: profile,
        }
    }
}

/// base64(SHA-256(SubjectPublicKeyInfo)) of the edge's certificate, as Chromium pins it.
fn spki_pin(edge: &Edge) -> String {
    let key_pem = std::fs::read_to_string(edge.cert_dir().join("site/privkey.pem")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// `/streams` of a backend: its open token streams and WebSockets.
async fn open_streams(backend: &Backend) -> Option<(u32, u32)> {
    let (status, body) = plain_get(&backend.addr, "/streams").await;
    if status != 200 {
        return None;
    }
    let mut parts = body.split_whitespace();
    let sse = parts.next()?.parse().ok()?;
    let ws = parts.next()?.parse().ok()?;
    Some((sse, ws))
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_sees_every_token_and_echo_through_the_edge_while_its_replica_dies() {
    let mut backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let mut args = vec!["--lb", "cookie", "--health-interval", "1"];
    for backend in &backends {
        args.extend(["--upstream", backend.addr.as_str()]);
    }
    let edge = Edge::start(&args, None).await;
    let port = edge.listen.rsplit_once(':').unwrap().1.to_owned();
    let url = format!("https://{NAME}:{port}/app?tokens={TOKENS}&messages={MESSAGES}");
    let _browser = Browser::open(&url, "127.0.0.1", &spki_pin(&edge));

    // Wait until the page's streams are open on one replica (its cookie pins both there),
    // then kill that replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let mut found = None;
        for (i, backend) in backends.iter().enumerate() {
            if let Some((sse, ws)) = open_streams(backend).await
                && sse + ws > 0
            {
                found = Some((i, sse, ws));
            }
        }
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the page never opened its streams through the edge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    backends[victim.0].kill();

    // The page posts its report to whichever replica it is pinned to next.
    let deadline = Instant::now() + Duration::from_secs(40);
    let report = loop {
        let mut report = None;
        for (i, backend) in backends.iter().enumerate() {
            if i == victim.0 {
                continue;
            }
            let (status, body) = plain_get(&backend.addr, "/report").await;
            if status == 200 && !body.trim().is_empty() {
                report = Some(body);
            }
        }
        if let Some(report) = report {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the page never reported (streams open on the killed replica: {victim:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    eprintln!(
        "killed replica {} (token streams, WebSockets open: {}, {}); the page reported {report}",
        victim.0, victim.1, victim.2
    );
    assert_eq!(report["tokens"], TOKENS, "{report}");
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["echoes"], MESSAGES, "{report}");
    // The kill cut a stream the page had to resume through another replica.
    let resumed = report["sse_opens"].as_u64().unwrap() + report["ws_opens"].as_u64().unwrap();
    assert!(resumed >= 3, "no stream was cut and resumed: {report}");
}
