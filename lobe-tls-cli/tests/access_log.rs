//! The access log of `lobe-tls serve --access-log PATH`: the real binary in front of real
//! backend processes, its lines read from the file it writes. A plain request, one
//! retried after a dead upstream, a WebSocket and an event stream (each written when it
//! ends), a site that opts out, the common format, a reopen on SIGUSR1 after logrotate
//! moved the file, and no credential in any line.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

// The edge tests' harness: backends, `serve` with a certificate, an HTTPS client.
#[path = "edge/support.rs"]
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{Backend, Edge, NAME, STEP, echo};

/// The lines of `path` so far.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The JSON lines of `path`, once at least `n` are there and `ready` holds for them.
async fn json_lines(path: &Path, n: usize, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + STEP;
    loop {
        let parsed: Vec<Value> = lines(path)
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        if parsed.len() >= n && ready(&parsed) {
            return parsed;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {n} lines, have {parsed:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `serve --access-log <dir>/access.log` with `args`; the edge and the log's path.
async fn edge_with_log(args: &[&str], config: Option<&str>) -> (Edge, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut all = vec!["--access-log", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let edge = Edge::start(&all, config).await;
    (edge, dir, path)
}

/// The record of the request to `path` (first one).
fn record<'a>(records: &'a [Value], path: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["path"] == path)
        .unwrap_or_else(|| panic!("no record of {path}: {records:#?}"))
}

#[tokio::test]
async fn a_request_leaves_one_json_line_with_every_field() {
    let backend = Backend::start("a");
    let (edge, _dir, path) = edge_with_log(&["--upstream", &backend.addr], None).await;
    let answer = edge
        .client
        .get(
            "/whoami?x=1&y=%22q%22",
            &[
                ("user-agent", "probe/1.0"),
                ("referer", "https://ref.example/"),
            ],
        )
        .await;
    assert_eq!(support::served_by(&answer), "a");
    let id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    let records = json_lines(&path, 1, |r| r.iter().any(|r| r["path"] != "/")).await;
    let r = record(&records, "/whoami?x=1&y=%22q%22");
    let ts = r["ts"].as_str().unwrap();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
        "ts {ts}"
    );
    assert_eq!(r["request_id"], id.as_str());
    assert_eq!(r["client_ip"], "127.0.0.1");
    assert!(r["client_port"].as_u64().unwrap() > 0);
    assert_eq!(r["method"], "GET");
    assert_eq!(r["host"], NAME);
    assert_eq!(r["proto"], "HTTP/1.1");
    assert_eq!(r["tls_version"], "TLSv1.3");
    assert_eq!(r["sni"], NAME);
    assert_eq!(r["alpn"], "http/1.1");
    assert_eq!(r["status"], 200);
    assert_eq!(r["bytes_in"], 0);
    assert_eq!(r["bytes_out"], 2, "the body is \"a\\n\"");
    assert!(r["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(r["upstream_connect_ms"].as_f64().is_some());
    assert!(r["upstream_ttfb_ms"].as_f64().is_some());
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["site"], "default");
    assert_eq!(r["upstream"], backend.addr.as_str());
    assert_eq!(r["affinity"], Value::Null);
    assert_eq!(r["user_agent"], "probe/1.0");
    assert_eq!(r["referer"], "https://ref.example/");
    assert_eq!(r["upgrade"], Value::Null);
    assert_eq!(r.as_object().unwrap().len(), 24, "{r}");
}

#[tokio::test]
async fn a_request_retried_after_a_dead_upstream_says_two_attempts() {
    let backend = Backend::start("live");
    // Reserved and closed: nothing listens there.
    let dead = lobe_tls_tests::reserve_port().listen();
    let (edge, _dir, path) = edge_with_log(
        &[
            "--upstream",
            &dead,
            "--upstream",
            &backend.addr,
            "--lb",
            "round-robin",
        ],
        None,
    )
    .await;
    // Round robin: one of two requests goes to the dead upstream first.
    for _ in 0..2 {
        let answer = edge.client.get("/whoami", &[]).await;
        assert_eq!(support::served_by(&answer), "live");
    }
    let records = json_lines(&path, 2, |r| {
        r.iter().filter(|r| r["path"] == "/whoami").count() == 2
    })
    .await;
    let retried = records
        .iter()
        .find(|r| r["path"] == "/whoami" && r["attempts"] == 2)
        .unwrap_or_else(|| panic!("no retried request: {records:#?}"));
    assert_eq!(retried["status"], 200);
    assert_eq!(retried["upstream"], backend.addr.as_str());
    assert!(retried["upstream_ttfb_ms"].as_f64().is_some());
}

#[tokio::test]
async fn websockets_and_event_streams_are_written_when_they_end() {
    let backend = Backend::start("a");
    let (edge, _dir, path) = edge_with_log(&["--upstream", &backend.addr], None).await;
    let mut ws = edge.client.websocket("/ws").await;
    let said = echo(&mut ws, "hello").await;
    assert!(said.contains("hello"), "{said}");
    // Open: not written yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !lines(&path).iter().any(|l| l.contains("\"/ws\"")),
        "{:?}",
        lines(&path)
    );
    futures_util::SinkExt::close(&mut ws).await.unwrap();
    drop(ws);

    // An event stream of three events 100 ms apart.
    let tls = edge.client.connect().await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/sse?n=3&gap_ms=100")
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();

    let records = json_lines(&path, 2, |r| {
        r.iter().any(|r| r["path"] == "/ws") && r.iter().any(|r| r["upgrade"] == "sse")
    })
    .await;
    let ws = record(&records, "/ws");
    assert_eq!(ws["upgrade"], "websocket");
    assert_eq!(ws["status"], 101);
    assert!(ws["bytes_in"].as_u64().unwrap() > 0, "{ws}");
    assert!(ws["bytes_out"].as_u64().unwrap() > 0, "{ws}");
    assert!(ws["duration_ms"].as_f64().unwrap() >= 300.0, "{ws}");
    let sse = record(&records, "/sse?n=3&gap_ms=100");
    assert_eq!(sse["upgrade"], "sse");
    assert_eq!(sse["status"], 200);
    assert_eq!(sse["bytes_out"].as_u64().unwrap(), body.len() as u64);
    assert!(sse["duration_ms"].as_f64().unwrap() >= 250.0, "{sse}");
}

#[tokio::test]
async fn a_site_can_opt_out_and_the_common_format_is_ncsas() {
    let loud = Backend::start("loud");
    let quiet = Backend::start("quiet");
    let config = format!(
        "[[site]]\ndomains = [\"quiet.{NAME}\"]\nupstreams = [\"{}\"]\naccess_log = false\n",
        quiet.addr
    );
    let (edge, _dir, path) = edge_with_log(
        &["--upstream", &loud.addr, "--access-log-format", "common"],
        Some(&config),
    )
    .await;
    let host = format!("quiet.{NAME}");
    let answer = support::get_on(edge.client.connect().await.unwrap(), &host, "/whoami", &[])
        .await
        .unwrap();
    assert_eq!(support::served_by(&answer), "quiet");
    let answer = edge.client.get("/whoami?loud=1", &[]).await;
    assert_eq!(support::served_by(&answer), "loud");
    let deadline = Instant::now() + STEP;
    while !lines(&path).iter().any(|l| l.contains("/whoami?loud=1")) {
        assert!(Instant::now() < deadline, "{:?}", lines(&path));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = lines(&path);
    // 127.0.0.1 - - [07/Dec/2026:16:48:09 +0000] "GET /whoami?loud=1 HTTP/1.1" 200 5
    let line = all
        .iter()
        .find(|l| l.contains("/whoami?loud=1"))
        .unwrap()
        .clone();
    let (head, rest) = line.split_once(" [").unwrap();
    assert_eq!(head, "127.0.0.1 - -");
    let (date, rest) = rest.split_once("] ").unwrap();
    assert!(date.ends_with(" +0000") && date.len() == 26, "{date}");
    assert_eq!(rest, "\"GET /whoami?loud=1 HTTP/1.1\" 200 5");
    assert!(
        !all.iter().any(|l| l.contains("/whoami ")),
        "the quiet site was logged: {all:?}"
    );
}

#[tokio::test]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let backend = Backend::start("a");
    let (edge, dir, path) = edge_with_log(&["--upstream", &backend.addr], None).await;
    edge.client.get("/whoami?before", &[]).await;
    json_lines(&path, 1, |r| {
        r.iter().any(|r| r["path"] == "/whoami?before")
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o137,
        0,
        "mode {mode:o}: not writable by others, not executable"
    );
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    edge.signal("-USR1");
    let deadline = Instant::now() + STEP;
    while !path.exists() {
        assert!(Instant::now() < deadline, "the log was never reopened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edge.client.get("/whoami?after", &[]).await;
    json_lines(&path, 1, |r| r.iter().any(|r| r["path"] == "/whoami?after")).await;
    let old = lines(&rotated);
    assert!(old.iter().any(|l| l.contains("/whoami?before")), "{old:?}");
    assert!(!old.iter().any(|l| l.contains("/whoami?after")), "{old:?}");
    // Still serving, as SIGUSR1 would otherwise have ended the process.
    assert_eq!(
        support::served_by(&edge.client.get("/whoami", &[]).await),
        "a"
    );
}

#[tokio::test]
async fn credentials_never_reach_the_access_log() {
    const MARKERS: [&str; 6] = [
        "PLANTEDauthorization1a2b",
        "PLANTEDcookie3c4d",
        "PLANTEDproxyauth5e6f",
        "PLANTEDapikey7a8b",
        "PLANTEDbearer9c0d",
        "PLANTEDsetcookie",
    ];
    let backend = Backend::start("a");
    let (edge, _dir, path) =
        edge_with_log(&["--upstream", &backend.addr, "--lb", "cookie"], None).await;
    let basic = format!("Basic {}", MARKERS[0]);
    let cookie = format!("session={}; lobe_tls_affinity=x", MARKERS[1]);
    let bearer = format!("Bearer {}", MARKERS[4]);
    let proxy = format!("Basic {}", MARKERS[2]);
    for headers in [
        vec![
            ("authorization", basic.as_str()),
            ("cookie", cookie.as_str()),
            ("proxy-authorization", proxy.as_str()),
            ("x-api-key", MARKERS[3]),
        ],
        vec![("authorization", bearer.as_str())],
    ] {
        let answer = edge.client.get("/headers", &headers).await;
        assert_eq!(answer.status, 200);
    }
    // The edge's affinity cookie goes back in Set-Cookie: its value must stay out too.
    let answer = edge.client.get("/whoami", &[]).await;
    let set_cookie = answer.headers["set-cookie"].to_str().unwrap().to_owned();
    let token = set_cookie
        .split(';')
        .next()
        .and_then(|c| c.split_once('='))
        .unwrap()
        .1
        .to_owned();
    let records = json_lines(&path, 3, |r| r.iter().any(|r| r["path"] == "/whoami")).await;
    assert_eq!(record(&records, "/whoami")["affinity"], "new");
    let text = std::fs::read_to_string(&path).unwrap();
    for marker in MARKERS.iter().copied().chain([token.as_str()]) {
        assert!(
            !text.contains(marker),
            "{marker} in the access log:\n{text}"
        );
    }
}
