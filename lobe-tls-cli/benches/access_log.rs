//! What the access log costs: `lobe-tls serve` with `--access-log PATH` against the same
//! `serve` without it, and nginx with its default access log (`combined`, one unbuffered
//! write per request) against nginx with `access_log off`, side by side in one run, all in
//! front of one nginx backend serving a 100-byte page on loopback.
//!
//! nginx runs as its experts run it here: `worker_processes auto` and `listen ...
//! reuseport`. wrk runs 32 keep-alive connections against each peer; peers take turns
//! within a round so the machine's noise falls on all alike, and the table gives medians
//! and each log's cost as the ratio with/without.
//!
//! Run with `cargo bench -p lobe-tls-cli --bench access_log`. Needs nginx and wrk
//! (Debian). `BENCH_ROUNDS` (default 5) and `BENCH_SECONDS` per run (default 5) change the
//! length.

mod peers;

use std::fmt::Write as _;

use peers::page::{CONNECTIONS, check_page, nginx_backend, wrk};
use peers::{BenchResult, Certs, Conf, NginxTuning, Peer, Scale, median};

fn main() -> BenchResult<()> {
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
    let serve_log = dir.path().join("serve-access.log");
    let nginx_log = dir.path().join("nginx-access.log");
    let serve_log_arg = serve_log.display().to_string();
    let mut peers: Vec<Peer> = vec![
        peers::lobe_with(
            &conf,
            Some("http"),
            &["--access-log", "off"],
            "lobe-tls serve, --access-log off",
        )?,
        peers::lobe_with(
            &conf,
            Some("http"),
            &["--access-log", &serve_log_arg],
            "lobe-tls serve, --access-log PATH (json)",
        )?,
        peers::nginx_with(
            &conf,
            &NginxTuning {
                access_log: None,
                ..NginxTuning::default()
            },
            "nginx 1.22, access_log off",
        )?,
        peers::nginx_with(
            &conf,
            &NginxTuning {
                access_log: Some(nginx_log.clone()),
                ..NginxTuning::default()
            },
            "nginx 1.22, default access log",
        )?,
    ];
    for peer in &peers {
        check_page(peer)?;
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            let rate = wrk(&peer.url, seconds, false)?.rate;
            eprintln!(
                "round {}: {:<42} keep-alive {rate:>9.0} req/s",
                round + 1,
                peer.label
            );
            results[i].push(rate);
        }
    }
    // The logs must have been written, or the comparison measured nothing.
    for (log, who) in [(&serve_log, "serve"), (&nginx_log, "nginx")] {
        let lines = std::fs::read_to_string(log)
            .map_err(|e| format!("{who} wrote no access log at {}: {e}", log.display()))?
            .lines()
            .count();
        eprintln!("{who}'s access log: {lines} lines");
        if lines == 0 {
            return Err(format!("{who}'s access log is empty").into());
        }
    }
    let medians: Vec<f64> = results.iter().map(|r| median(r)).collect();
    // Per round, the ratio with/without for each program: the noise of one round falls
    // on both of its runs.
    let paired = |with: usize, without: usize| {
        let ratios: Vec<f64> = results[with]
            .iter()
            .zip(&results[without])
            .map(|(w, wo)| w / wo)
            .collect();
        median(&ratios)
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{rounds} rounds of {seconds} s per run, wrk -t2 -c{CONNECTIONS} keep-alive, 100-byte page\n"
    );
    let _ = writeln!(
        table,
        "| peer | keep-alive req/s (median) | with log / without (median of per-round ratios) |"
    );
    let _ = writeln!(table, "|---|---:|---:|");
    for (i, peer) in peers.iter().enumerate() {
        let ratio = match i {
            1 => format!("{:.2}×", paired(1, 0)),
            3 => format!("{:.2}×", paired(3, 2)),
            _ => String::new(),
        };
        let _ = writeln!(table, "| {} | {:.0} | {ratio} |", peer.label, medians[i]);
    }
    println!("{table}");
    for peer in &mut peers {
        peer.stop();
    }
    Ok(())
}
