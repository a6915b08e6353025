//! Address sprays behind a trusted balancer: every connection comes from 127.0.0.1 (in
//! `--trusted-proxy`) with a PROXY v2 header naming a new client address, 200,000 of them
//! in one IPv6 /64 or 100,000 IPv4 addresses, each sending requests. Beside them a
//! legitimate client on another network must never be refused, and `serve`'s memory must
//! stay within its rate table's documented cap.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

/// Requests per second per client that the rows give `--rate-limit`: the legitimate
/// client sends 10.
const RATE_LIMIT: &str = "20";
/// The legitimate client's pace (one new connection and request each).
const LEGIT_EVERY: Duration = Duration::from_millis(100);
/// Requests each sprayed address sends, on one kept-alive connection.
const REQUESTS_PER_ADDRESS: usize = 2;
/// Sprayed connections in flight at once.
const CONCURRENCY: usize = 64;
/// The rate table's documented cap (README): 100,000 clients of about 70 bytes, in KiB.
const RATE_TABLE_KIB: u64 = 100_000 * 70 / 1024;
/// What `serve` may hold for each connection in flight (TLS and HTTP buffers) beyond the
/// table, in KiB, and what the allocator keeps besides.
const PER_CONNECTION_KIB: u64 = 128;
const SLACK_KIB: u64 = 16 * 1024;

/// A PROXY v2 header announcing `client` connecting to `local`, as a balancer sends it.
pub fn proxy_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = match (client, local) {
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::from((l.ip().to_ipv6_mapped(), l.port())),
        ),
        pair => pair,
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, local),
    )
    .build()
    .unwrap()
}

/// A client config trusting `ca_pem` that resumes sessions, so a spray of new
/// connections costs `serve` resumed handshakes, as an attacker would arrange.
pub fn resuming_connector(ca_pem: &str) -> TlsConnector {
    let mut config = (*lobe_tls_tests::tls::client_config(ca_pem)).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(1024);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `target` from 127.0.0.1 whose PROXY v2 header names `client`.
pub async fn proxied_tls(
    target: SocketAddr,
    connector: &TlsConnector,
    client: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&proxy_v2(client, target)).await?;
    connector
        .connect(
            ServerName::try_from(NAME).map_err(std::io::Error::other)?,
            tcp,
        )
        .await
}

/// `requests` GETs of `path` on one connection through the balancer for `client`; the
/// statuses in order, and the last response's body.
pub async fn proxied_gets(
    target: SocketAddr,
    connector: &TlsConnector,
    client: SocketAddr,
    path: &str,
    requests: usize,
) -> std::io::Result<(Vec<u16>, Bytes)> {
    let tls = proxied_tls(target, connector, client).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut statuses = Vec::with_capacity(requests);
    let mut body = Bytes::new();
    for n in 0..requests {
        let mut request = Request::get(path).header("host", NAME);
        if n + 1 == requests {
            request = request.header("connection", "close");
        }
        send.ready().await.map_err(std::io::Error::other)?;
        let response = send
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .map_err(std::io::Error::other)?;
        statuses.push(response.status().as_u16());
        body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
    }
    Ok((statuses, body))
}

/// One request of a [`Prober`]: its status, or why it got none.
pub type Probe = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u16, String>> + Send>>;

/// A request of a [`Prober`]: its phase, its status (or why none), its latency.
type Sample = (&'static str, Result<u16, String>, Duration);

/// A legitimate client of its own kind (behind the balancer, or for a name issued on
/// demand): `probe` every `every`, on a thread and runtime of its own so that the test's
/// other work does not delay it, each request tagged with the phase current when it
/// starts ("before" at first).
pub struct Prober {
    phase: Arc<Mutex<&'static str>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    pub fn start(every: Duration, probe: impl Fn() -> Probe + Send + 'static) -> Prober {
        let phase = Arc::new(Mutex::new("before"));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, flag) = (phase.clone(), samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                while !flag.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let phase = *p.lock().unwrap();
                    let outcome = tokio::time::timeout(LEGIT_TIMEOUT, probe())
                        .await
                        .unwrap_or_else(|_| Err("timed out".to_owned()));
                    let latency = started.elapsed();
                    s.lock().unwrap().push((phase, outcome, latency));
                    tokio::time::sleep(every.saturating_sub(latency)).await;
                }
            });
        });
        Prober {
            phase,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// A legitimate client behind the balancer, as `client`: one GET of /page on a new
    /// connection (a full handshake, as a new visitor's) every [`LEGIT_EVERY`].
    pub fn proxied(target: SocketAddr, ca_pem: &str, client: SocketAddr) -> Prober {
        let connector = lobe_tls_tests::tls::connector(ca_pem);
        Prober::start(LEGIT_EVERY, move || {
            let connector = connector.clone();
            Box::pin(async move {
                proxied_gets(target, &connector, client, "/page", 1)
                    .await
                    .map(|(statuses, _)| statuses[0])
                    .map_err(|e| e.to_string())
            })
        })
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
                .filter(|s| s.0 == phase)
                .count();
            if done >= n || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The figures of the requests tagged `phase`.
    pub fn stats(&self, phase: &str) -> Stats {
        let samples = self.samples.lock().unwrap();
        let mut stats = Stats::default();
        let mut latencies = Vec::new();
        for (_, outcome, latency) in samples.iter().filter(|s| s.0 == phase) {
            match outcome {
                Ok(200) => stats.ok += 1,
                Ok(code) => {
                    stats.refused += 1;
                    if stats.errors.len() < 3 {
                        stats.errors.push(format!("status {code}"));
                    }
                }
                Err(e) => {
                    stats.failed += 1;
                    if stats.errors.len() < 3 {
                        stats.errors.push(e.clone());
                    }
                }
            }
            latencies.push(*latency);
        }
        latencies.sort();
        stats.p50 = percentile(&latencies, 0.50);
        stats.p99 = percentile(&latencies, 0.99);
        stats
    }

    /// Stops it (its last request ends first).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the sprayed addresses got.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicUsize,
    limited: AtomicUsize,
    other: AtomicUsize,
    failed: AtomicUsize,
}

/// Sends [`REQUESTS_PER_ADDRESS`] requests from each of `count` addresses (`address(i)`),
/// [`CONCURRENCY`] at a time.
async fn spray(
    target: SocketAddr,
    ca_pem: &str,
    count: usize,
    address: fn(usize) -> IpAddr,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let connector = resuming_connector(ca_pem);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (tally, next, connector) = (tally.clone(), next.clone(), connector.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let client = SocketAddr::new(address(i), 1024 + (i % 60_000) as u16);
                    let sent = tokio::time::timeout(
                        STEP,
                        proxied_gets(target, &connector, client, "/page", REQUESTS_PER_ADDRESS),
                    )
                    .await;
                    match sent {
                        Ok(Ok((statuses, _))) => {
                            for status in statuses {
                                let counter = match status {
                                    200 => &tally.ok,
                                    429 => &tally.limited,
                                    _ => &tally.other,
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    tally
}

/// The sprayed /64: 2001:db8:a77a:cc::/64, interface identifiers spread over it.
fn in_one_64(i: usize) -> IpAddr {
    // An odd multiplier is a bijection modulo 2^64: distinct and scattered.
    let id = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let prefix: u128 = 0x2001_0db8_a77a_00cc << 64;
    IpAddr::V6(Ipv6Addr::from(prefix | u128::from(id)))
}

/// Distinct IPv4 addresses from 10.0.0.1 on.
fn ipv4_each(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i as u32))
}

/// Runs one spray row; `limited_as_one` says the sprayed addresses form one client (the
/// /64), which the rate limit must then throttle.
async fn spray_row(
    row: &str,
    count: usize,
    address: fn(usize) -> IpAddr,
    legit_client: SocketAddr,
    limited_as_one: bool,
) {
    let _alone = exclusive();
    let mut serve = Serve::start_with(Options {
        wait_handshake: false,
        ..Options::args(&[
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.0/8",
            "--rate-limit",
            RATE_LIMIT,
        ])
    })
    .await;
    let mut legit = Prober::proxied(serve.listen, &serve.ca_pem, legit_client);
    legit.wait_for(10, STEP).await;
    let before = serve.usage();
    let peak = RssPeak::start(serve.pid());
    legit.phase("during");
    let started = Instant::now();
    let tally = spray(serve.listen, &serve.ca_pem, count, address).await;
    let took = started.elapsed();
    let during = serve.usage();
    let peak = peak.stop();
    legit.phase("after");
    legit.wait_for(10, STEP).await;
    let after = serve.usage();
    legit.stop();
    let (ok, limited, other, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.limited.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let (b, d, a) = (
        legit.stats("before"),
        legit.stats("during"),
        legit.stats("after"),
    );
    eprintln!(
        "{row}: {count} addresses x {REQUESTS_PER_ADDRESS} requests in {took:.1?} \
         ({:.0} addresses/s): {ok} ok, {limited} 429, {other} other, {failed} failed connections; \
         serve CPU {:.1?}, RSS {} -> peak {} -> {} KiB\n  legit before: {b}\n  legit during: {d}\n  legit after: {a}",
        count as f64 / took.as_secs_f64(),
        during.cpu.saturating_sub(before.cpu),
        before.rss_kib,
        peak,
        after.rss_kib,
    );
    assert!(serve.alive(), "serve died: {}", serve.log());
    // The spray reached serve: nearly every address got its answers.
    let answered = ok + limited + other;
    assert!(
        answered >= count * REQUESTS_PER_ADDRESS * 99 / 100,
        "{row}: only {answered} answers to {count} addresses ({failed} connections failed)"
    );
    assert!(d.total() >= 10, "{row}: legit client ran {d} during");
    assert_eq!(
        (d.refused, d.failed),
        (0, 0),
        "{row}: the legitimate client was refused during the spray: {d}"
    );
    assert_eq!(
        (a.refused, a.failed),
        (0, 0),
        "{row}: the legitimate client was refused after the spray: {a}"
    );
    if limited_as_one {
        // One /64 is one client: the spray as a whole is held to the rate limit.
        assert!(
            limited > answered / 2,
            "{row}: the /64 was not limited as one client: {ok} ok, {limited} 429"
        );
    }
    let bound = RATE_TABLE_KIB + CONCURRENCY as u64 * PER_CONNECTION_KIB + SLACK_KIB;
    assert!(
        peak.saturating_sub(before.rss_kib) <= bound,
        "{row}: RSS grew from {} to {peak} KiB, past {bound} KiB (rate table {RATE_TABLE_KIB} KiB)",
        before.rss_kib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_of_200000_addresses_in_one_ipv6_64_locks_out_no_one() {
    let legit: SocketAddr = "[2001:db8:1e:617::7]:50000".parse().unwrap();
    spray_row("IPv6 /64 spray", 200_000, in_one_64, legit, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_of_100000_ipv4_addresses_locks_out_no_one() {
    let legit: SocketAddr = "198.51.100.7:50000".parse().unwrap();
    spray_row("IPv4 spray", 100_000, ipv4_each, legit, false).await;
}
