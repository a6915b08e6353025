//! The bench's own clients, where wrk and h2load do not measure what is asked:
//!
//! - **handshakes**: new TLS connections, each one handshake, one `GET` with
//!   `Connection: close` and its whole answer, with session resumption either off (every
//!   handshake full) or on (a ticket from an earlier connection), and each connection's
//!   kind read off the client's rustls, so a run says how many were in fact resumed;
//! - **paced**: keep-alive requests sent on a fixed schedule, each one's latency taken from
//!   the time it was due (not when it went out), so a server that stalls is charged for the
//!   requests that queued behind the stall.
//!
//! Both speak HTTP through hyper and TLS through rustls with the aws-lc provider, offering
//! X25519 only (as the peers' OpenSSL and Go stacks all do; rustls would otherwise also
//! offer a post-quantum hybrid that only `serve` accepts, a costlier exchange).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::BenchResult;
use super::page::PAGE;

/// What one handshake run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandshakeRun {
    /// Connections that answered 200 with the page.
    pub ok: u64,
    /// Of those, connections whose handshake resumed a session.
    pub resumed: u64,
    /// Connections that failed anywhere (connect, handshake, request, wrong answer).
    pub failed: u64,
    /// Full handshakes made before the clock started, one per client, to get each one
    /// its first ticket (with resumption on).
    pub warmup: u64,
    pub seconds: f64,
}

impl HandshakeRun {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// The client's TLS: trusts `ca`, offers `http/1.1`, X25519, and resumption as asked.
fn connector(ca: &str, resume: bool) -> BenchResult<TlsConnector> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(4096)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A runtime like wrk's: two threads.
fn runtime() -> BenchResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `conns` clients open connections to `port` one after another for `seconds`.
pub fn handshakes(
    port: u16,
    ca: &str,
    resume: bool,
    conns: usize,
    seconds: u64,
) -> BenchResult<HandshakeRun> {
    // A client each, with a session cache of its own, as browsers and wrk's threads
    // have: one shared cache of a few tickets would run dry with 32 clients at once.
    let connectors = (0..conns)
        .map(|_| connector(ca, resume))
        .collect::<BenchResult<Vec<_>>>()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    runtime()?.block_on(async move {
        if resume {
            // One connection each first, so that every client's first measured
            // connection has a ticket to present.
            for connector in &connectors {
                let _ = one_connection(connector, addr).await;
            }
        }
        let warmup = if resume { connectors.len() as u64 } else { 0 };
        let ok = Arc::new(AtomicU64::new(0));
        let resumed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for connector in connectors {
            let (ok, resumed, failed) = (ok.clone(), resumed.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    match one_connection(&connector, addr).await {
                        Ok(was_resumed) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if was_resumed {
                                resumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        Ok(HandshakeRun {
            ok: ok.load(Ordering::Relaxed),
            resumed: resumed.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            warmup,
            seconds: start.elapsed().as_secs_f64(),
        })
    })
}

/// One connection: handshake, `GET /` with `Connection: close`, the page. Whether the
/// handshake resumed a session.
async fn one_connection(connector: &TlsConnector, addr: SocketAddr) -> BenchResult<bool> {
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let request = http::Request::get("/")
            .header(http::header::HOST, "localhost")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            BenchResult::Ok((status, body))
        };
        // The connection reads the ticket and the answer, and ends at the server's close.
        let (done, exchanged) = tokio::join!(conn, exchange);
        let (status, body) = exchanged?;
        done?;
        if status != http::StatusCode::OK || body != PAGE.trim_end().as_bytes() {
            return Err(format!("answer {status}, {} bytes", body.len()).into());
        }
        Ok(resumed)
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "no answer within 5 s")?
}

/// What one paced run measured.
#[derive(Clone, Debug, Default)]
pub struct PacedRun {
    /// Latency of each answered request, from the time it was due, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Requests that failed or got another answer.
    pub failed: u64,
    /// Requests that were due within the run.
    pub due: u64,
}

impl PacedRun {
    /// The `q` quantile of the latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[at] as f64 / 1000.0
    }
}

/// `conns` keep-alive connections to `port` send `rate` requests per second in all,
/// evenly spaced, for `seconds`.
pub fn paced(port: u16, ca: &str, rate: f64, conns: usize, seconds: u64) -> BenchResult<PacedRun> {
    let connector = connector(ca, true)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    runtime()?.block_on(async move {
        let mut senders = Vec::new();
        for _ in 0..conns {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            senders.push(sender);
        }
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for (i, mut sender) in senders.into_iter().enumerate() {
            // The connections' schedules are staggered over one interval.
            let first = start + interval.mul_f64(i as f64 / conns as f64);
            tasks.push(tokio::spawn(async move {
                let mut run = PacedRun::default();
                let mut due = first;
                while due < end {
                    tokio::time::sleep_until(due.into()).await;
                    run.due += 1;
                    let request = http::Request::get("/")
                        .header(http::header::HOST, "localhost")
                        .body(Empty::<Bytes>::new());
                    let answered = async {
                        let response = sender.send_request(request?).await?;
                        let status = response.status();
                        let body = response.into_body().collect().await?.to_bytes();
                        BenchResult::Ok(
                            status == http::StatusCode::OK && body == PAGE.trim_end().as_bytes(),
                        )
                    };
                    match tokio::time::timeout(Duration::from_secs(5), answered).await {
                        Ok(Ok(true)) => run
                            .latencies_us
                            .push(due.elapsed().as_micros().try_into().unwrap_or(u64::MAX)),
                        _ => run.failed += 1,
                    }
                    due += interval;
                }
                run
            }));
        }
        let mut all = PacedRun::default();
        for task in tasks {
            let run = task.await?;
            all.latencies_us.extend(run.latencies_us);
            all.failed += run.failed;
            all.due += run.due;
        }
        Ok(all)
    })
}
