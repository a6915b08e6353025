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

/// Requests per second from one wrk run.
pub fn wrk(url: &str, seconds: u64, close: bool) -> BenchResult<f64> {
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
    if let Some(errors) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        eprintln!("  {url}: {}", errors.trim());
    }
    Ok(rate)
}
