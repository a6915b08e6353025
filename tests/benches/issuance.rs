//! Issuance benchmark against a local Pebble (`PEBBLE_VA_NOSLEEP=1`, other defaults on):
//!
//! - (a) sequential HTTP-01 certificates through the library: median, p90, min, and where
//!   the time goes (phases from the order's progress reports);
//! - (b) 50 certificates for distinct names issued concurrently, on a Pebble of their own:
//!   total wall time (retried on a fresh Pebble if Pebble deadlocks, see BENCHMARKS.md);
//! - (c) the same as (a) with `lego` against the same Pebble, and the ratio of medians;
//! - (d) DNS-01 (wildcard plus apex) through challtestsrv, for reference.
//!
//! Run with `cargo bench -p lobe-tls-tests --bench issuance`. Loopback only, bounded loops.
//! `BENCH_SEQ`, `BENCH_CONCURRENT`, `BENCH_LEGO` and `BENCH_DNS` override the counts
//! (`BENCH_LEGO=0` skips lego).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lobe_tls::acme::ProgressFn;
use lobe_tls::challenge::dns01::{ChalltestsrvProvider, Dns01Solver, PropagationCheck};
use lobe_tls::{
    AcmeClient, FileStore, Http01Listener, Http01Registry, Http01Solver, KeyType, OrderRequest,
    domain,
};
use lobe_tls_tests::{Pebble, PebbleOptions};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> BenchResult<()> {
    // `cargo bench` passes `--bench`; a filter argument is not supported, so ignore args.
    lobe_tls_tests::init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .min(200)
}

/// A tag that keeps names distinct between bench runs too (Pebble is fresh anyway).
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos ^ std::process::id())
}

async fn run() -> BenchResult<()> {
    let seq = count("BENCH_SEQ", 20);
    let concurrent = count("BENCH_CONCURRENT", 50);
    let lego_runs = count("BENCH_LEGO", 9);
    let dns_runs = count("BENCH_DNS", 5);
    let tag = run_tag();

    let pebble = Pebble::start(PebbleOptions::default());
    let store_dir = tempfile::tempdir()?;
    let store = FileStore::open(store_dir.path())?;
    let client = AcmeClient::connect(&pebble.acme_config(), &store).await?;
    let registry = Http01Registry::new();
    let solver = Http01Solver::new(registry.clone());

    println!(
        "issuance benchmark: Pebble 2.4.0 on loopback, PEBBLE_VA_NOSLEEP=1, nonce reject 5%, authz reuse 50%"
    );
    println!("every name is distinct, so no authorization is reused; ECDSA P-256 keys");

    // (a) sequential HTTP-01 through the library.
    let listener = Http01Listener::bind(pebble.http_addr(), registry.service()).await?;
    // One warm-up order: connections and the account's first requests.
    issue_http01(
        &client,
        &solver,
        &format!("warmup-{tag}.bench.example.com"),
        None,
    )
    .await?;
    let mut times = Vec::with_capacity(seq);
    let phases = Arc::new(Mutex::new(PhaseTotals::default()));
    for i in 0..seq {
        let name = format!("seq-{i}-{tag}.bench.example.com");
        let started = Instant::now();
        issue_http01(&client, &solver, &name, Some(phases.clone())).await?;
        times.push(started.elapsed());
    }
    let lib = Summary::of(&times);
    println!();
    println!("(a) lobe-tls, sequential HTTP-01, n={seq}: {lib}");
    if let Ok(phases) = phases.lock() {
        phases.print(seq);
    }

    drop(listener);

    // (b) concurrent HTTP-01, distinct names, each attempt on a Pebble of its own.
    for attempt in 1..=CONCURRENT_ATTEMPTS {
        match concurrent_bench(concurrent, &format!("{tag}-{attempt}")).await {
            Ok(()) => break,
            Err(e) => println!(
                "(b) attempt {attempt} of {CONCURRENT_ATTEMPTS} failed: {e}\n    \
                 (Pebble 2.4.0's in-memory store can deadlock under concurrent new-orders: \
                 every request touching it then hangs; see BENCHMARKS.md)"
            ),
        }
    }

    // (c) lego on the Pebble of (a) and the same HTTP-01 port.
    if lego_runs > 0 {
        match lego_bench(&pebble, lego_runs, &tag) {
            Ok((lego, each)) => {
                println!();
                println!("(c) lego, sequential HTTP-01, n={lego_runs}: {lego}");
                let each: Vec<String> = each
                    .iter()
                    .map(|t| format!("{:.2}", t.as_secs_f64()))
                    .collect();
                println!("    each run (s): {}", each.join(" "));
                println!(
                    "    ratio of medians lego / lobe-tls: {:.1}x",
                    lego.median.as_secs_f64() / lib.median.as_secs_f64()
                );
            }
            Err(e) => println!("(c) lego: skipped ({e})"),
        }
    }

    // (d) DNS-01, wildcard plus apex, through challtestsrv with the propagation check.
    if dns_runs > 0 {
        let provider = ChalltestsrvProvider::new(&pebble.challtestsrv_url)?;
        let check = PropagationCheck::at_servers(vec![pebble.dns_addr], Duration::from_secs(10));
        let dns_solver = Dns01Solver::new(Arc::new(provider), Some(check));
        let mut times = Vec::with_capacity(dns_runs);
        for i in 0..dns_runs {
            let apex = format!("dns-{i}-{tag}.bench.example.com");
            let request = OrderRequest {
                domains: domain::parse_all(&[format!("*.{apex}"), apex])?,
                key_type: KeyType::EcdsaP256,
                replaces: None,
            };
            let started = Instant::now();
            client.issue(&request, &dns_solver, None).await?;
            times.push(started.elapsed());
        }
        println!();
        println!(
            "(d) lobe-tls, sequential DNS-01 wildcard+apex (2 authorizations), n={dns_runs}: {}",
            Summary::of(&times)
        );
    }
    Ok(())
}

/// How often (b) is tried on a fresh Pebble before giving up.
const CONCURRENT_ATTEMPTS: u32 = 3;
/// The order deadline in (b): far above the target, well below the bench's time budget.
const CONCURRENT_ORDER_TIMEOUT: Duration = Duration::from_secs(20);

/// (b): `count` orders for distinct names at once on a fresh Pebble; prints the total.
async fn concurrent_bench(count: usize, tag: &str) -> BenchResult<()> {
    let pebble = Pebble::start(PebbleOptions::default());
    let store_dir = tempfile::tempdir()?;
    let store = FileStore::open(store_dir.path())?;
    let mut config = pebble.acme_config();
    config.order_timeout = CONCURRENT_ORDER_TIMEOUT;
    let client = AcmeClient::connect(&config, &store).await?;
    let registry = Http01Registry::new();
    let solver = Http01Solver::new(registry.clone());
    let _listener = Http01Listener::bind(pebble.http_addr(), registry.service()).await?;

    let pebble_pid = pebble_pid(&pebble);
    let cpu_before = (cpu_time("self"), pebble_pid.as_deref().and_then(cpu_time));
    let phases = Arc::new(Mutex::new(PhaseTotals::default()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let client = client.clone();
        let solver = solver.clone();
        let name = format!("par-{i}-{tag}.bench.example.com");
        let phases = phases.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            issue_http01(&client, &solver, &name, Some(phases))
                .await
                .map(|()| started.elapsed())
        });
    }
    let mut each = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        each.push(joined??);
    }
    let total = started.elapsed();
    println!();
    println!(
        "(b) lobe-tls, {count} concurrent HTTP-01: total {:.2} s (target <= 10 s); per order {}",
        total.as_secs_f64(),
        Summary::of(&each)
    );
    if let Ok(phases) = phases.lock() {
        phases.print(count);
    }
    if let ((Some(ours0), Some(pebble0)), Some(ours1), Some(pebble1)) = (
        cpu_before,
        cpu_time("self"),
        pebble_pid.as_deref().and_then(cpu_time),
    ) {
        println!(
            "    CPU time during (b): Pebble {:.2} s, lobe-tls {:.2} s, over {:.2} s wall on {} cores",
            pebble1 - pebble0,
            ours1 - ours0,
            total.as_secs_f64(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    Ok(())
}

async fn issue_http01(
    client: &AcmeClient,
    solver: &Http01Solver,
    name: &str,
    phases: Option<Arc<Mutex<PhaseTotals>>>,
) -> BenchResult<()> {
    let request = OrderRequest {
        domains: domain::parse_all(&[name])?,
        key_type: KeyType::EcdsaP256,
        replaces: None,
    };
    let progress = phases.map(|totals| {
        let last = Mutex::new((Instant::now(), String::from("start")));
        let report: ProgressFn = Arc::new(move |msg: &str| {
            let now = Instant::now();
            if let (Ok(mut last), Ok(mut totals)) = (last.lock(), totals.lock()) {
                totals.add(&last.1, now - last.0);
                *last = (now, phase_of(msg).to_owned());
            }
        });
        report
    });
    client.issue(&request, solver, progress).await?;
    Ok(())
}

/// Names the phase that starts with a progress message.
fn phase_of(msg: &str) -> &'static str {
    if msg.starts_with("ordering") {
        "new order + fetch authorization"
    } else if msg.contains("presenting") || msg.contains("waiting until") {
        "present + answer challenge"
    } else if msg.starts_with("waiting for the CA") {
        "poll until order ready"
    } else if msg.starts_with("finalizing") {
        "key + CSR + finalize + poll + download"
    } else {
        "other"
    }
}

/// Time per phase, summed over orders.
#[derive(Default)]
struct PhaseTotals(BTreeMap<String, Duration>);

impl PhaseTotals {
    fn add(&mut self, phase: &str, spent: Duration) {
        if phase != "start" {
            *self.0.entry(phase.to_owned()).or_default() += spent;
        }
    }

    fn print(&self, orders: usize) {
        let orders = orders.max(1) as f64;
        for (phase, total) in &self.0 {
            println!(
                "    mean {:>6.1} ms  {phase}",
                total.as_secs_f64() * 1000.0 / orders
            );
        }
    }
}

struct Summary {
    median: Duration,
    p90: Duration,
    min: Duration,
    max: Duration,
}

impl Summary {
    fn of(times: &[Duration]) -> Summary {
        let mut sorted = times.to_vec();
        sorted.sort();
        let at = |q: f64| {
            let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted.get(index).copied().unwrap_or_default()
        };
        Summary {
            median: at(0.5),
            p90: at(0.9),
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "median {:.0} ms, p90 {:.0} ms, min {:.0} ms, max {:.0} ms",
            ms(self.median),
            ms(self.p90),
            ms(self.min),
            ms(self.max)
        )
    }
}

/// Runs lego once for a warm-up (account registration) and then `runs` times, timed.
///
/// lego's time is bimodal: when the challenge is already valid in the CA's answer to
/// lego's POST it goes on at once, otherwise it sleeps 5 s (its default when the CA sends
/// no Retry-After) before looking again. Each run's time is returned too.
fn lego_bench(pebble: &Pebble, runs: usize, tag: &str) -> BenchResult<(Summary, Vec<Duration>)> {
    let lego_dir = tempfile::tempdir()?;
    run_lego(
        pebble,
        lego_dir.path(),
        &format!("legowarm-{tag}.bench.example.com"),
    )?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let started = Instant::now();
        run_lego(
            pebble,
            lego_dir.path(),
            &format!("lego-{i}-{tag}.bench.example.com"),
        )?;
        times.push(started.elapsed());
    }
    Ok((Summary::of(&times), times))
}

fn run_lego(pebble: &Pebble, path: &Path, name: &str) -> BenchResult<()> {
    let output = Command::new("lego")
        .env("LEGO_CA_CERTIFICATES", &pebble.ca_file)
        .args(["--server", &pebble.directory_url])
        .args(["--email", "bench@example.com", "--accept-tos"])
        .args(["--domains", name, "--key-type", "ec256"])
        .args(["--http", "--http.port", &pebble.http_listen()])
        .arg("--path")
        .arg(path)
        .arg("run")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run lego: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("no output");
        return Err(format!("lego failed for {name}: {last}").into());
    }
    Ok(())
}

/// The process id of this Pebble (not challtestsrv), found by its config path.
fn pebble_pid(pebble: &Pebble) -> Option<String> {
    let config = pebble.dir().join("pebble-config.json");
    let config = config.to_str()?;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            let mut args = cmdline.split('\0');
            let program = args.next()?;
            (program.ends_with("pebble") && args.any(|a| a == config))
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

/// User plus system CPU seconds of a process (`self` or a pid), from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports in clock ticks; USER_HZ is 100 on every mainstream architecture.
    Some((utime + stime) / 100.0)
}
