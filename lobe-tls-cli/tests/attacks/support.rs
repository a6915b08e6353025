//! The attack suite's harness: `serve` (the real binary, CLI defaults plus the flags a row
//! names) in front of a backend process, its memory and CPU from /proc, a legitimate
//! client that runs beside an attack from its own loopback address, and the Python
//! attack scripts.
// Each row uses the part of the harness it needs.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;

// The edge tests' harness: certificates, backend processes, an HTTPS client.
#[path = "../edge/support.rs"]
#[allow(dead_code)]
pub mod edge;

pub use edge::{Backend, NAME, STEP};

/// The legitimate client's source address; attacks come from 127.0.0.1 (or another
/// address of their own), so per-address limits never stand between the two.
pub const LEGIT_SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// The backend, when this binary is started as one (`edge::Backend::start` runs
/// `support::backend_process`); otherwise a check that /proc reads this process's usage.
#[test]
pub fn backend_process() {
    if let Ok(spec) = std::env::var(edge::BACKEND_ENV) {
        let (addr, name) = spec.split_once(' ').unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(lobe_tls_tests::backend::serve(addr, name))
            .unwrap();
        return;
    }
    let usage = Usage::of(std::process::id()).unwrap();
    assert!(usage.rss_kib > 1024, "{usage:?}");
}

/// Rows that need the CPU to themselves (floods whose latency or CPU figures another
/// row running beside them would spoil) hold this while they run.
pub fn exclusive() -> Exclusive {
    static LOCK: Mutex<()> = Mutex::new(());
    Exclusive(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The right to run alone among the rows that ask for it, until dropped. It is held
/// across the row's awaits on purpose: each test has its own runtime and thread, so
/// waiting for it blocks only the tests that queue for it.
pub struct Exclusive(#[allow(dead_code)] MutexGuard<'static, ()>);

/// How to start `serve`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Flags after `serve --listen ADDR --cert-dir DIR --upstream UP`.
    pub args: Vec<String>,
    /// The upstream; `None` starts a backend process (`edge::Backend`).
    pub upstream: Option<String>,
    /// Pass `--no-http` (true unless a row tests the plain listener).
    pub no_http: bool,
    /// Wait for a TLS handshake (false: for the port only, e.g. when a PROXY header is
    /// required first).
    pub wait_handshake: bool,
    /// Extra environment, e.g. `("LOBE_TLS_LOG", "debug")`.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            args: Vec::new(),
            upstream: None,
            no_http: true,
            wait_handshake: true,
            env: Vec::new(),
        }
    }
}

impl Options {
    /// The defaults plus `args`.
    pub fn args(args: &[&str]) -> Options {
        Options {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Options::default()
        }
    }
}

/// A `serve` process (killed on drop) with a certificate for NAME from its own CA, in
/// front of its upstream.
pub struct Serve {
    pub child: Child,
    /// `--listen`, on 127.0.0.1.
    pub listen: SocketAddr,
    /// The upstream `serve` proxies to.
    pub upstream: String,
    /// The CA that signed the certificate, PEM, and the same written to a file.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    /// An HTTPS client of it (from 127.0.0.1), as the edge tests use.
    pub client: edge::Client,
    pub backend: Option<Backend>,
    dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `serve` with its defaults plus `args`, in front of a new backend process.
    pub async fn start(args: &[&str]) -> Serve {
        Serve::start_with(Options::args(args)).await
    }

    pub async fn start_with(options: Options) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = lobe_tls_tests::tls::write_site_pair(
            &dir.path().join("certs"),
            &[NAME, &format!("*.{NAME}")],
        );
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let (backend, upstream) = match options.upstream {
            Some(upstream) => (None, upstream),
            None => {
                let backend = Backend::start("backend");
                let addr = backend.addr.clone();
                (Some(backend), addr)
            }
        };
        let listen_port = lobe_tls_tests::reserve_port();
        let listen: SocketAddr = listen_port.addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
        cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0");
        cmd.args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &upstream,
        ])
        .arg("--cert-dir")
        .arg(dir.path().join("certs"));
        if options.no_http {
            cmd.arg("--no-http");
        }
        // Its log goes to a file: attacks can make it chatty, and a full pipe would stall
        // the process under test.
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        cmd.args(&options.args)
            .env_remove("LOBE_TLS_STORE")
            .env_remove("LOBE_TLS_LOG")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd.spawn().unwrap();
        let ca = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()
        };
        let client = edge::Client {
            addr: listen.to_string(),
            tls: edge::connector(&ca, &[b"http/1.1"]),
            h2: edge::connector(&ca, &[b"h2"]),
        };
        let mut serve = Serve {
            child,
            listen,
            upstream,
            ca_pem,
            ca_file,
            client,
            backend,
            dir,
        };
        let deadline = Instant::now() + STEP;
        loop {
            let up = if options.wait_handshake {
                serve.client.connect().await.is_ok()
            } else {
                tokio::net::TcpStream::connect(listen).await.is_ok()
            };
            if up {
                break;
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("serve exited ({status}): {}", serve.log());
            }
            assert!(
                Instant::now() < deadline,
                "serve never came up: {}",
                serve.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        serve
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory and CPU time now.
    pub fn usage(&self) -> Usage {
        Usage::of(self.pid()).unwrap()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The legitimate client, started.
    pub fn legit(&self) -> Legit {
        Legit::start(self.listen, &self.ca_pem, LEGIT_SOURCE, "/page")
    }

    /// A scratch directory that lives as long as the process.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A process's resident memory and CPU time (user + system).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub cpu: Duration,
}

impl Usage {
    /// Reads /proc/PID/status (VmRSS) and /proc/PID/stat (utime + stime).
    pub fn of(pid: u32) -> std::io::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no VmRSS"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name (field 2) may hold spaces; the fields after its ')' are fixed:
        // utime and stime are the 14th and 15th of the line.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| std::io::Error::other("bad stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .ok_or_else(|| std::io::Error::other("short stat"))?
            .iter()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .sum();
        Ok(Usage {
            rss_kib,
            cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64),
        })
    }
}

/// USER_HZ, the unit of /proc/PID/stat's times (100 on Linux, asked once).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Samples a process's RSS every 20 ms until stopped; keeps the peak.
pub struct RssPeak {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssPeak {
    pub fn start(pid: u32) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                match Usage::of(pid) {
                    Ok(u) => peak = peak.max(u.rss_kib),
                    Err(_) => break,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssPeak {
            stop,
            thread: Some(thread),
        }
    }

    /// The peak RSS seen, KiB.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request of the legitimate client.
#[derive(Debug, Clone)]
struct Sample {
    phase: &'static str,
    outcome: Outcome,
    latency: Duration,
}

/// How a legitimate request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200.
    Ok,
    /// Another status (429, 503, ...).
    Refused(u16),
    /// No answer: connect, handshake or read failed or timed out.
    Failed(String),
}

/// The legitimate client's figures for one phase.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub ok: usize,
    pub refused: usize,
    pub failed: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// The first few failures and refusals, for messages.
    pub errors: Vec<String>,
}

impl Stats {
    pub fn total(&self) -> usize {
        self.ok + self.refused + self.failed
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, {} refused, {} failed, p50 {:.1} ms, p99 {:.1} ms",
            self.ok,
            self.refused,
            self.failed,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )?;
        if !self.errors.is_empty() {
            write!(f, " ({})", self.errors.join("; "))?;
        }
        Ok(())
    }
}

/// A legitimate user beside the attack: one HTTPS GET on a new connection (TCP, TLS,
/// HTTP/1.1) every 20 ms from its own source address, on a thread and runtime of its own
/// so that the test's other work does not delay it. Requests are tagged with the phase
/// current when they start ("before" at first; see [`Legit::phase`]).
pub struct Legit {
    phase: Arc<Mutex<&'static str>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The legitimate client's wait for one answer.
pub const LEGIT_TIMEOUT: Duration = Duration::from_secs(5);

impl Legit {
    /// Starts GETting `path` from `target` (SNI and Host NAME, trusting `ca_pem`), from
    /// `source`.
    pub fn start(target: SocketAddr, ca_pem: &str, source: IpAddr, path: &str) -> Legit {
        let phase = Arc::new(Mutex::new("before"));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let connector = lobe_tls_tests::tls::connector(ca_pem);
        let (p, s, flag, path) = (
            phase.clone(),
            samples.clone(),
            stop.clone(),
            path.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                while !flag.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let phase = *p.lock().unwrap();
                    let outcome = match tokio::time::timeout(
                        LEGIT_TIMEOUT,
                        legit_get(target, &connector, source, &path),
                    )
                    .await
                    {
                        Ok(Ok(200)) => Outcome::Ok,
                        Ok(Ok(status)) => Outcome::Refused(status),
                        Ok(Err(e)) => Outcome::Failed(e.to_string()),
                        Err(_) => Outcome::Failed("timed out".into()),
                    };
                    let latency = started.elapsed();
                    s.lock().unwrap().push(Sample {
                        phase,
                        outcome,
                        latency,
                    });
                    tokio::time::sleep(Duration::from_millis(20).saturating_sub(latency)).await;
                }
            });
        });
        Legit {
            phase,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Tags the requests that start from now on.
    pub fn phase(&self, name: &'static str) {
        *self.phase.lock().unwrap() = name;
    }

    /// Waits until `n` requests of the current phase have ended (or `within` passed).
    pub async fn wait_for(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let phase = *self.phase.lock().unwrap();
            let done = self
                .samples
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.phase == phase)
                .count();
            if done >= n || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The figures of the requests tagged `phase` so far.
    pub fn stats(&self, phase: &str) -> Stats {
        let samples = self.samples.lock().unwrap();
        let mut stats = Stats::default();
        let mut latencies = Vec::new();
        for s in samples.iter().filter(|s| s.phase == phase) {
            match &s.outcome {
                Outcome::Ok => stats.ok += 1,
                Outcome::Refused(code) => {
                    stats.refused += 1;
                    if stats.errors.len() < 3 {
                        stats.errors.push(format!("status {code}"));
                    }
                }
                Outcome::Failed(e) => {
                    stats.failed += 1;
                    if stats.errors.len() < 3 {
                        stats.errors.push(e.clone());
                    }
                }
            }
            latencies.push(s.latency);
        }
        latencies.sort();
        stats.p50 = percentile(&latencies, 0.50);
        stats.p99 = percentile(&latencies, 0.99);
        stats
    }

    /// Stops the client (its last request ends first).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Legit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn legit_get(
    target: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    source: IpAddr,
    path: &str,
) -> std::io::Result<u16> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(target).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(
            ServerName::try_from(NAME).map_err(std::io::Error::other)?,
            tcp,
        )
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", NAME)
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let response = send
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?;
    Ok(status)
}

/// The Python of `.ci/venv` with the `h2` package; made as .ci/run makes it when missing.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let venv = root.join(".ci/venv");
            let python = venv.join("bin/python");
            let has_h2 = |python: &Path| {
                Command::new(python)
                    .args(["-c", "import h2"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_h2(&python) {
                if !python.exists() {
                    let made = Command::new("python3")
                        .args(["-m", "venv"])
                        .arg(&venv)
                        .status()
                        .unwrap();
                    assert!(made.success(), "python3 -m venv .ci/venv failed");
                }
                let installed = Command::new(venv.join("bin/pip"))
                    .args(["install", "-q", "h2"])
                    .status()
                    .unwrap();
                assert!(installed.success(), "pip install h2 (in .ci/venv) failed");
            }
            python
        })
        .clone()
}

/// Runs `attacks/SCRIPT ARGS` under [`python`], bounded by `limit`, and parses the JSON
/// object it prints last. The attacker runs at a lower priority (`nice -n 10`): on the
/// Internet its CPU is not the edge host's, and here the figures should be `serve`'s, not
/// those of two processes fighting over 2 cores.
pub async fn run_python(script: &str, args: &[String], limit: Duration) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/attacks")
        .join(script);
    let child = tokio::process::Command::new("nice")
        .args(["-n", "10"])
        .arg(python())
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} ran past {limit:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    match last.and_then(|l| serde_json::from_str(l).ok()) {
        Some(v) => v,
        None => panic!(
            "{script} {args:?}: no JSON ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A row's figures: the legitimate client before, during and after the attack, and
/// `serve`'s usage.
#[derive(Debug)]
pub struct Measured {
    pub before: Stats,
    pub during: Stats,
    pub after: Stats,
    /// Usage when the attack started and when the "after" phase ended.
    pub start: Usage,
    pub end: Usage,
    /// serve's CPU time while the attack ran.
    pub attack_cpu: Duration,
    /// Peak RSS while the attack ran and after, KiB.
    pub rss_peak_kib: u64,
    /// What the attack reported.
    pub result: serde_json::Value,
}

impl Measured {
    /// Peak RSS above the start, KiB.
    pub fn rss_growth_kib(&self) -> u64 {
        self.rss_peak_kib.saturating_sub(self.start.rss_kib)
    }

    /// The line a row prints (run with --nocapture to see it), for RELIABILITY.md.
    pub fn print(&self, row: &str) {
        eprintln!(
            "[{row}] before: {}\n[{row}] during: {}\n[{row}] after: {}\n[{row}] serve: rss {} -> peak {} -> {} KiB, attack cpu {:.2} s\n[{row}] attack: {}",
            self.before,
            self.during,
            self.after,
            self.start.rss_kib,
            self.rss_peak_kib,
            self.end.rss_kib,
            self.attack_cpu.as_secs_f64(),
            self.result
        );
    }
}

/// Runs `attack` against `serve` beside the legitimate client: a baseline of 100 requests
/// first, then the attack (its requests tagged "during"), then 25 more ("after").
pub async fn measure<F>(serve: &Serve, attack: F) -> Measured
where
    F: std::future::Future<Output = serde_json::Value>,
{
    let mut legit = serve.legit();
    legit.wait_for(100, Duration::from_secs(20)).await;
    let start = serve.usage();
    let peak = RssPeak::start(serve.pid());
    legit.phase("during");
    let result = attack.await;
    let attack_cpu = serve.usage().cpu.saturating_sub(start.cpu);
    legit.phase("after");
    legit.wait_for(25, Duration::from_secs(20)).await;
    let end = serve.usage();
    legit.stop();
    let rss_peak_kib = peak.stop().max(end.rss_kib);
    Measured {
        before: legit.stats("before"),
        during: legit.stats("during"),
        after: legit.stats("after"),
        start,
        end,
        attack_cpu,
        rss_peak_kib,
        result,
    }
}

/// `--addr`, `--sni` and `--source` for the attack scripts, then `rest`.
pub fn script_args(serve: &Serve, rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--addr", &serve.listen.to_string(), "--sni", NAME]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(rest.iter().map(|s| (*s).to_owned()));
    args
}

/// The legitimate client's p99 may grow to `factor` times its baseline; a baseline under
/// 10 ms counts as 10 ms (scheduler noise on a busy 2-core machine is of that order; an
/// unprotected edge moves it by hundreds of ms).
pub fn p99_bound(before: &Stats, factor: u32) -> Duration {
    before.p99.max(Duration::from_millis(10)) * factor
}

/// The legitimate client got every answer in every phase.
pub fn assert_legit_unharmed(m: &Measured) {
    for (phase, stats) in [
        ("before", &m.before),
        ("during", &m.during),
        ("after", &m.after),
    ] {
        assert!(
            stats.total() > 0,
            "no legitimate request {phase} the attack"
        );
        assert_eq!(
            (stats.refused, stats.failed),
            (0, 0),
            "legitimate client {phase} the attack: {stats}"
        );
    }
}
