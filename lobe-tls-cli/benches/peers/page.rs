//! The page the request benches fetch: one nginx backend serving 100 bytes, the check
//! that a peer serves it, and wrk's rate.

use std::path::Path;
use std::process::Command;

use super::{BenchResult, Peer};

pub const PAGE: &str = "lobe-tls benchmark page, exactly one hundred bytes long, for every proxy in this run alike.........\n";
/// wrk's connections at once.
pub const CONNECTIONS: &str = "32";

/// An nginx that serves the page on 127.0.0.1, and its port.
pub fn nginx_backend(dir: &Path) -> BenchResult<(Peer, u16)> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let backend_reserved = lobe_tls_tests::reserve_port();
    let backend = backend_reserved.port();
    let conf = dir.join("backend.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; pid {pid}; error_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000;\n\
               server {{ listen 127.0.0.1:{backend}; default_type text/html;\n\
                 location / {{ return 200 '{page}'; }} }} }}\n",
            pid = dir.join("backend.pid").display(),
            page = PAGE.trim_end(),
        ),
    )?;
    let conf_str = conf.display().to_string();
    let peer = super::spawn(
        "backend",
        "nginx",
        &["-c", &conf_str, "-e", "stderr"],
        backend,
        format!("http://127.0.0.1:{backend}/"),
    )?;
    Ok((peer, backend))
}

/// One request through the peer with curl: it must answer 200 with the page.
pub fn check_page(peer: &Peer) -> BenchResult<()> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", &peer.url])
        .output()?;
    let body = String::from_utf8_lossy(&out.stdout);
    if body != PAGE.trim_end() {
        return Err(format!("{} did not serve the page: {body:?}", peer.label).into());
    }
    Ok(())
}

/// What one load run measured: its rate, and what makes it invalid.
#[derive(Clone, Debug, Default)]
pub struct LoadRun {
    /// Answered requests per second.
    pub rate: f64,
    /// Requests answered.
    pub requests: u64,
    /// Why the run does not count (non-2xx answers, socket errors), if it does not.
    pub invalid: Option<String>,
}

/// One wrk run: 2 threads, `CONNECTIONS` connections, keep-alive or `Connection: close`.
pub fn wrk(url: &str, seconds: u64, close: bool) -> BenchResult<LoadRun> {
    let duration = format!("{seconds}s");
    let mut args = vec!["-t2", "-c", CONNECTIONS, "-d", &duration, "--timeout", "5s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = Command::new("wrk").args(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("wrk printed no rate for {url}: {text}"))?;
    // "  123456 requests in 5.00s, 30.00MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let invalid: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect();
    Ok(LoadRun {
        rate,
        requests,
        invalid: (!invalid.is_empty()).then(|| invalid.join("; ")),
    })
}

/// One h2load run over h2: `clients` connections with up to `streams` requests in flight
/// on each, 2 threads, for `seconds`.
pub fn h2load(url: &str, seconds: u64, clients: u32, streams: u32) -> BenchResult<LoadRun> {
    let out = Command::new("h2load")
        .args([
            "-t2",
            "-c",
            &clients.to_string(),
            "-m",
            &streams.to_string(),
            "-D",
            &seconds.to_string(),
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 5.00s, 41234.60 req/s, 5.12MB/s"
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse::<f64>().ok())
        .ok_or_else(|| format!("h2load printed no rate for {url}: {text}"))?;
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let counts = |prefix: &str| -> Vec<(String, u64)> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|l| {
                l.split(", ")
                    .filter_map(|part| {
                        let (n, what) = part.trim().split_once(' ')?;
                        Some((what.to_owned(), n.parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let requests = counts("requests: ");
    let statuses = counts("status codes: ");
    let get = |list: &[(String, u64)], what: &str| {
        list.iter().find(|(w, _)| w == what).map_or(0, |(_, n)| *n)
    };
    let succeeded = get(&requests, "succeeded");
    let mut problems = Vec::new();
    for what in ["failed", "errored", "timeout"] {
        let n = get(&requests, what);
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    for what in ["3xx", "4xx", "5xx"] {
        let n = get(&statuses, what);
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    if succeeded == 0 {
        problems.push(format!("no request succeeded: {}", text.trim()));
    }
    if !text.contains("ALPN protocol: h2") && !text.contains("Application protocol: h2") {
        problems.push("not spoken over h2".to_owned());
    }
    Ok(LoadRun {
        rate,
        requests: succeeded,
        invalid: (!problems.is_empty()).then(|| problems.join(", ")),
    })
}
