//! An SNI spray against on-demand issuance: 10,000 ClientHellos for random names under
//! an allowed suffix, with an ask endpoint that approves them all and a real Pebble as
//! the CA. The asks and the orders must stay within `--on-demand-rate` (its default), a
//! name issued before the spray must keep answering throughout, and `serve`'s memory
//! must not grow with the names.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lobe_tls_tests::http_server::{HttpServer, json_response};
use lobe_tls_tests::{Pebble, PebbleOptions};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::spray::Prober;
use crate::support::*;

const SUFFIX: &str = "spray.test";
const KEPT: &str = "kept.spray.test";
const NAMES: usize = 10_000;
const CONCURRENCY: usize = 32;
/// How long a sprayed ClientHello waits for an answer; names the guard lets through wait
/// for their order, which the spray does not.
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// `--on-demand-rate`'s default: new names per minute, in all (a burst of as many, then
/// one every 3 s).
const RATE_PER_MINUTE: usize = 20;
/// What `serve` may grow by: the orders the rate lets through (up to 20 at once, each
/// with its ACME exchange and new certificate), not the 10,000 names.
const RSS_GROWTH_KIB: u64 = 32 * 1024;

/// `serve` with on-demand issuance on Pebble's TLS-ALPN-01 port, killed on drop.
struct OnDemandServe {
    child: Child,
    log: std::path::PathBuf,
}

impl OnDemandServe {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OnDemandServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET of /page for `name` over TLS verified by `connector`: the status.
async fn https_get(
    connector: &TlsConnector,
    listen: SocketAddr,
    name: &str,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(listen)
        .await
        .map_err(|e| e.to_string())?;
    let server_name =
        rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::get("/page")
        .header("host", name)
        .header("connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = send
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// ClientHellos for `NAMES` random names under SUFFIX; how many were refused at once and
/// how many waited out [`HELLO_WAIT`].
async fn sni_spray(listen: SocketAddr, connector: TlsConnector) -> (usize, usize) {
    let refused = Arc::new(AtomicUsize::new(0));
    let waited = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (refused, waited, next, connector) = (
                refused.clone(),
                waited.clone(),
                next.clone(),
                connector.clone(),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < NAMES {
                    let name = format!("r{:016x}.{SUFFIX}", rand::random::<u64>());
                    let name = rustls::pki_types::ServerName::try_from(name).unwrap();
                    let hello = async {
                        let tcp = TcpStream::connect(listen).await?;
                        connector.connect(name, tcp).await
                    };
                    match tokio::time::timeout(HELLO_WAIT, hello).await {
                        Ok(_) => refused.fetch_add(1, Ordering::Relaxed),
                        Err(_) => waited.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    (
        refused.load(Ordering::Relaxed),
        waited.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sni_spray_stays_within_the_on_demand_rate_and_served_names_keep_answering() {
    let _alone = exclusive();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let asks = Arc::new(AtomicUsize::new(0));
    let counted = asks.clone();
    let ask = HttpServer::start(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { json_response(200, serde_json::json!({})) }
    })
    .await;
    let backend = Backend::start("on-demand");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let listen: SocketAddr = pebble.tls_listen().parse().unwrap();
    // On Pebble's TLS-ALPN-01 port: names issued on demand are validated there.
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--listen", &pebble.tls_listen()])
        .args(["--upstream", &backend.addr, "--no-http"])
        .args(["--on-demand-ask", &format!("{}/check", ask.url())])
        .args(["--on-demand-allow", &format!("*.{SUFFIX}")])
        .env("LOBE_TLS_STORE", dir.path().join("store"))
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
        .env_remove("LOBE_TLS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let serve = OnDemandServe { child, log };
    let pid = serve.child.id();
    let started = Instant::now();
    let deadline = started + STEP;
    while TcpStream::connect(listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serve never listened: {}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connector = lobe_tls_tests::tls::connector(&root);
    // The name in use before the spray: issued on its first request.
    let first = https_get(&connector, listen, KEPT).await;
    assert_eq!(first, Ok(200), "{}", serve.log());
    let mut legit = {
        let connector = connector.clone();
        // Every 20 ms: with an optimised build the spray lasts under a second.
        Prober::start(Duration::from_millis(20), move || {
            let connector = connector.clone();
            Box::pin(async move { https_get(&connector, listen, KEPT).await })
        })
    };
    legit.wait_for(10, STEP).await;
    let (asks_before, orders_before) = (asks.load(Ordering::SeqCst), pebble.orders_created());
    let before = Usage::of(pid).unwrap();
    let peak = RssPeak::start(pid);
    legit.phase("during");
    let spray_started = Instant::now();
    let (refused, waited) = sni_spray(listen, connector.clone()).await;
    let took = spray_started.elapsed();
    let during = Usage::of(pid).unwrap();
    let peak = peak.stop();
    legit.phase("after");
    legit.wait_for(10, STEP).await;
    legit.stop();
    let (b, d, a) = (
        legit.stats("before"),
        legit.stats("during"),
        legit.stats("after"),
    );
    let elapsed = started.elapsed();
    let (asks_total, orders_total) = (asks.load(Ordering::SeqCst), pebble.orders_created());
    eprintln!(
        "on-demand SNI spray: {NAMES} random names under {SUFFIX} in {took:.1?} ({refused} \
         refused at once, {waited} held past {HELLO_WAIT:?}); asks {asks_before} -> {asks_total}, \
         orders {orders_before} -> {orders_total} in {elapsed:.1?} of serve; serve CPU {:.1?}, \
         RSS {} -> peak {peak} KiB\n  {KEPT} before: {b}\n  {KEPT} during: {d}\n  {KEPT} after: {a}",
        during.cpu.saturating_sub(before.cpu),
        before.rss_kib,
    );
    // A burst of the rate's worth, then one every 60/rate seconds, since serve started.
    let allowed = RATE_PER_MINUTE + (elapsed.as_secs() as usize * RATE_PER_MINUTE).div_ceil(60);
    assert!(
        asks_total <= allowed,
        "{asks_total} asks in {elapsed:?}: more than --on-demand-rate allows ({allowed})"
    );
    assert!(
        orders_total <= allowed,
        "{orders_total} orders in {elapsed:?}: more than --on-demand-rate allows ({allowed})"
    );
    assert!(
        refused + waited == NAMES && refused >= NAMES * 9 / 10,
        "the spray was not refused at the guard: {refused} refused, {waited} held"
    );
    assert!(d.total() >= 5, "{KEPT} during: {d}");
    assert_eq!(
        (d.refused, d.failed),
        (0, 0),
        "{KEPT} during the spray: {d}"
    );
    assert_eq!((a.refused, a.failed), (0, 0), "{KEPT} after the spray: {a}");
    assert!(
        peak.saturating_sub(before.rss_kib) <= RSS_GROWTH_KIB,
        "RSS grew from {} to {peak} KiB over the spray",
        before.rss_kib
    );
}
