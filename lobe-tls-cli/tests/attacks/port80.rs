//! A flood of port 80, the plain listener that answers ACME HTTP-01 challenges: 5,000
//! idle connections from one client and 10,000 GETs for random tokens from another, with
//! a real Redis as the shared store. The listener must cap the idle connections and cut
//! them within its header timeout, answer the random tokens without a store round trip
//! (Redis MONITOR sees no lookup of them), and still pass a real HTTP-01 validation by
//! Pebble in the middle of it all.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

const IDLE: usize = 5_000;
const RANDOM_GETS: usize = 10_000;
/// Random-token GETs per kept-alive connection, and connections at once.
const GETS_PER_CONNECTION: usize = 25;
const GET_CONCURRENCY: usize = 200;
/// Where the idle connections and the GETs come from: two clients, neither of them the
/// CA (Pebble validates from 127.0.0.1).
const IDLE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 66));
const GET_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 67));
/// Port 80's per-client connection cap by default (README: the least of
/// `--max-conns-per-ip`, a quarter of port 80's total, and 256).
const PER_CLIENT_CAP: usize = 256;
/// serve's default `--header-read-timeout`, which port 80 applies as well.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A random token's prefix, to pick its lookups out of Redis's MONITOR stream.
const TOKEN_PREFIX: &str = "floodtoken";

const FIRST: &str = "first.flood.test";
const DURING: &str = "during.flood.test";

async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// Whether the peer has closed `tcp` (EOF or reset), without waiting.
fn closed(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tcp.try_read(&mut buf) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Counts Redis commands that look up a random token, through MONITOR.
struct TokenLookups {
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenLookups {
    async fn start(port: u16) -> TokenLookups {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = BufReader::new(tcp).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        assert_eq!(first, "+OK");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(TOKEN_PREFIX) {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        TokenLookups { count, task }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for TokenLookups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Redis's call counts by command, from INFO commandstats.
async fn commandstats(port: u16) -> std::collections::BTreeMap<String, u64> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// GETs of random tokens on kept-alive connections from GET_SOURCE; the statuses seen.
async fn random_token_gets(target: SocketAddr) -> (usize, usize, usize) {
    let (not_found, other, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..GET_CONCURRENCY)
        .map(|_| {
            let (not_found, other, failed, next) = (
                not_found.clone(),
                other.clone(),
                failed.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(GETS_PER_CONNECTION, Ordering::Relaxed);
                    if first >= RANDOM_GETS {
                        return;
                    }
                    // A connection that fails on a loaded machine (its step timed out)
                    // hands its GETs left to a new one, twice at most: the flood's
                    // answers are what is measured, not the client's luck.
                    let mut left = GETS_PER_CONNECTION.min(RANDOM_GETS - first);
                    for _attempt in 0..3 {
                        let left = &mut left;
                        let done = tokio::time::timeout(STEP, async {
                            let tcp = connect_from(GET_SOURCE, target).await?;
                            let (mut send, conn) =
                                hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                                    .await
                                    .map_err(std::io::Error::other)?;
                            tokio::spawn(conn);
                            while *left > 0 {
                                let token =
                                    format!("{TOKEN_PREFIX}{:032x}", rand::random::<u128>());
                                let request =
                                    Request::get(format!("/.well-known/acme-challenge/{token}"))
                                        .header("host", "random.flood.test")
                                        .body(Empty::<Bytes>::new())
                                        .unwrap();
                                send.ready().await.map_err(std::io::Error::other)?;
                                let response = send
                                    .send_request(request)
                                    .await
                                    .map_err(std::io::Error::other)?;
                                let counter = if response.status() == 404 {
                                    &not_found
                                } else {
                                    &other
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                *left -= 1;
                                response
                                    .into_body()
                                    .collect()
                                    .await
                                    .map_err(std::io::Error::other)?;
                            }
                            std::io::Result::Ok(())
                        })
                        .await;
                        if matches!(done, Ok(Ok(()))) {
                            break;
                        }
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    (
        not_found.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    )
}

/// Whether `serve` at `listen` completes a handshake for `name` with a certificate
/// `connector` trusts (Pebble's root).
async fn served(connector: &tokio_rustls::TlsConnector, listen: SocketAddr, name: &str) -> bool {
    let Ok(tcp) = TcpStream::connect(listen).await else {
        return false;
    };
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    matches!(
        tokio::time::timeout(STEP, connector.connect(name, tcp)).await,
        Ok(Ok(_))
    )
}

fn site(domain: &str, upstream: &str) -> String {
    format!("[[site]]\ndomains = [\"{domain}\"]\nupstreams = [\"{upstream}\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_80_flood_is_capped_costs_the_store_nothing_and_a_validation_still_passes() {
    // 5,000 sockets here, beside the test's others.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let _alone = exclusive();
    let redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let backend = Backend::start("flood");
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("edge.toml");
    std::fs::write(&config, site(FIRST, &backend.addr)).unwrap();
    let config_arg = config.to_string_lossy().into_owned();
    let http = pebble.http_listen();
    let serve = Serve::start_with(Options {
        upstream: Some(backend.addr.clone()),
        no_http: false,
        env: vec![
            ("LOBE_TLS_STORE".into(), redis.url()),
            ("LOBE_TLS_DIRECTORY".into(), pebble.directory_url.clone()),
            (
                "LOBE_TLS_DIRECTORY_CA".into(),
                pebble.ca_file.to_string_lossy().into_owned(),
            ),
        ],
        ..Options::args(&["--config", &config_arg, "--http-listen", &http])
    })
    .await;
    let http: SocketAddr = http.parse().unwrap();
    let root = pebble.issuing_root_pem().await;
    let pebble_trusted = lobe_tls_tests::tls::connector(&root);
    // The site's name is issued at start, before the flood, through HTTP-01.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !served(&pebble_trusted, serve.listen, FIRST).await {
        assert!(
            Instant::now() < deadline,
            "{FIRST} never issued: {}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lookups = TokenLookups::start(redis.port()).await;
    let stats_before = commandstats(redis.port()).await;
    let before = serve.usage();
    let peak = RssPeak::start(serve.pid());

    // The idle connections: opened, then left without a byte.
    let flood_started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    let mut not_connected = 0;
    for _ in 0..IDLE {
        match connect_from(IDLE_SOURCE, http).await {
            Ok(tcp) => idle.push(tcp),
            Err(_) => not_connected += 1,
        }
    }
    let opened = flood_started.elapsed();
    // The random tokens, and a new site whose name Pebble validates in the middle of it.
    let gets = tokio::spawn(random_token_gets(http));
    std::fs::write(
        &config,
        site(FIRST, &backend.addr) + &site(DURING, &backend.addr),
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &serve.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open_idle = idle.iter().filter(|tcp| !closed(tcp)).count();
    let validation_started = Instant::now();
    let deadline = validation_started + Duration::from_secs(30);
    while !served(&pebble_trusted, serve.listen, DURING).await {
        assert!(
            Instant::now() < deadline,
            "{DURING} was not issued during the flood: {}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued_after = flood_started.elapsed();
    let still_idle_at_issue = idle.iter().filter(|tcp| !closed(tcp)).count();
    let (not_found, other, failed) = gets.await.unwrap();
    let gets_done = flood_started.elapsed();
    // Every idle connection is cut by the header timeout, counted from its accept: the
    // last ones were opened `opened` into the flood, and under load serve accepts the
    // backlog a few seconds behind the connects. Polled until all are gone, or 5 s past
    // the timeout of the last one opened.
    let cut_by = opened + HEADER_TIMEOUT + Duration::from_secs(5);
    let mut open_at_timeout = idle.iter().filter(|tcp| !closed(tcp)).count();
    while open_at_timeout > 0 && flood_started.elapsed() < cut_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
        open_at_timeout = idle.iter().filter(|tcp| !closed(tcp)).count();
    }
    let peak = peak.stop();
    let after = serve.usage();
    let stats_after = commandstats(redis.port()).await;
    let token_lookups = lookups.count();
    let gets_delta = stats_after.get("get").copied().unwrap_or(0)
        - stats_before.get("get").copied().unwrap_or(0);
    eprintln!(
        "port-80 flood: {IDLE} idle connections opened in {opened:.1?} ({not_connected} not \
         connected), {open_idle} held 1.5 s later, {still_idle_at_issue} when {DURING} was issued \
         ({issued_after:.1?} into the flood), {open_at_timeout} after {cut_by:?}; \
         {RANDOM_GETS} random-token GETs: {not_found} 404, {other} other, {failed} connections \
         failed, done after {gets_done:.1?}; Redis: {token_lookups} lookups of random tokens, \
         {gets_delta} GETs in all; serve CPU {:.1?}, RSS {} -> peak {peak} -> {} KiB",
        after.cpu.saturating_sub(before.cpu),
        before.rss_kib,
        after.rss_kib,
    );
    assert_eq!(
        token_lookups, 0,
        "random tokens were looked up in the store"
    );
    assert!(
        open_idle <= PER_CLIENT_CAP && open_idle < IDLE - not_connected,
        "{open_idle} idle connections of one client held: not capped"
    );
    assert_eq!(
        open_at_timeout, 0,
        "idle connections outlived the {HEADER_TIMEOUT:?} header timeout"
    );
    assert!(
        not_found >= RANDOM_GETS * 99 / 100,
        "random tokens: {not_found} 404, {other} other, {failed} connections failed"
    );
    assert!(
        served(&pebble_trusted, serve.listen, FIRST).await,
        "{FIRST} no longer served"
    );
}
