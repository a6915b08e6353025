//! Cluster benchmark against a local redis-server and Pebble:
//!
//! - (a) renewal propagation: three manager instances share Redis; one renews, and the
//!   time until all three serve the new serial (verified TLS handshakes) is measured.
//!   Median over `BENCH_RENEWALS` runs (default 15), the renewing instance rotating.
//! - (b) handshake cost: full TLS 1.3 handshakes (no resumption) over loopback against a
//!   file-store instance and a cluster instance, in interleaved rounds, then again with
//!   Redis stopped; medians per handshake and their ratio, plus the number of commands
//!   Redis processed while the cluster instance handshook.
//!
//! Run with `cargo bench -p lobe-tls-tests --bench cluster`. `BENCH_HANDSHAKES` sets the
//! handshakes per round (default 500; 10 interleaved rounds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::cluster::Cluster;
use lobe_tls::manager::{ManagedCert, Manager};
use lobe_tls::store::DynStore;
use lobe_tls::{FileStore, Http01Listener, Http01Registry, RedisStore, domain};
use lobe_tls_tests::tls::{TlsServer, client_config, handshake_serial};
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const NAME: &str = "site";
const DOMAIN: &str = "bench-cluster.example.com";

fn main() -> BenchResult<()> {
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
        .clamp(1, 10_000)
}

struct Instance {
    manager: Manager,
    tls: TlsServer,
    _cluster: Option<Cluster>,
}

async fn cluster_instance(
    redis: &RedisServer,
    pebble: &Pebble,
) -> BenchResult<(Instance, Http01Registry)> {
    let store: DynStore = Arc::new(RedisStore::connect(&redis.url()).await?);
    let http01 = Http01Registry::with_shared_store(store.clone())?;
    let manager = Manager::builder(pebble.acme_config(), store)
        .http01(http01.clone())
        .cert(ManagedCert::new(NAME, domain::parse_all(&[DOMAIN])?))
        .build()?;
    // A long re-sync interval: the figures below are pub/sub alone.
    let cluster = Cluster::builder(manager.clone())
        .resync_interval(Duration::from_secs(3600))
        .start()?;
    let tls = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    Ok((
        Instance {
            manager,
            tls,
            _cluster: Some(cluster),
        },
        http01,
    ))
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn run() -> BenchResult<()> {
    let renewals = count("BENCH_RENEWALS", 15);
    let per_round = count("BENCH_HANDSHAKES", 500);
    let mut redis = RedisServer::start();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let verifying = client_config(&root);

    let mut instances = Vec::new();
    let mut registries = Vec::new();
    for _ in 0..3 {
        let (instance, http01) = cluster_instance(&redis, &pebble).await?;
        instances.push(instance);
        registries.push(http01);
    }
    let _port80 = Http01Listener::bind(pebble.http_addr(), registries[2].service()).await?;
    for instance in &instances {
        instance.manager.start().await?;
    }

    println!("cluster benchmark: redis-server and Pebble 2.4.0 on loopback, 3 manager instances");
    println!();
    println!("(a) renewal on one instance -> new serial served by all three (pub/sub only)");
    let mut serial = wait_converged(&instances, &verifying, None).await?;
    let mut propagation = Vec::with_capacity(renewals);
    for run in 0..renewals {
        let renewing = &instances[run % 3].manager;
        renewing.renew_now(NAME).await?;
        // The certificate is stored, announced and served locally when renew_now returns.
        let renewed = Instant::now();
        let new_serial = wait_converged(&instances, &verifying, Some(&serial)).await?;
        propagation.push(renewed.elapsed());
        serial = new_serial;
    }
    let mut sorted = propagation.clone();
    let med = median(&mut sorted);
    println!(
        "    runs {renewals}: median {}, min {}, max {}",
        ms(med),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1])
    );

    println!();
    println!(
        "(b) full TLS 1.3 handshake over loopback, no resumption, {per_round} x 10 rounds each"
    );
    // The file-store instance serves a copy of the same certificate.
    let dir = tempfile::tempdir()?;
    let files: DynStore = Arc::new(FileStore::open(dir.path())?);
    lobe_tls::store::copy(instances[0].manager.store().as_ref(), files.as_ref()).await?;
    let file_manager = Manager::builder(pebble.acme_config(), files).build()?;
    file_manager.start().await?;
    let file_instance = Instance {
        tls: TlsServer::bind("127.0.0.1:0", file_manager.resolver().clone()).await,
        manager: file_manager,
        _cluster: None,
    };

    let mut no_resumption = (*verifying).clone();
    no_resumption.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(no_resumption);
    let file_addr = file_instance.tls.addr();
    let cluster_addr = instances[0].tls.addr();
    // Warm up both.
    handshakes(file_addr, &client, 50).await?;
    handshakes(cluster_addr, &client, 50).await?;

    let mut probe = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let before = redis_commands(&mut probe).await?;
    let mut file_samples = Vec::new();
    let mut cluster_samples = Vec::new();
    for round in 0..10 {
        // Alternate which goes first, so drift within a round favours neither.
        let (a, b) = interleaved(round, file_addr, cluster_addr, &client, per_round).await?;
        file_samples.extend(a);
        cluster_samples.extend(b);
    }
    let after = redis_commands(&mut probe).await?;
    // The first INFO is counted by the second.
    let during = after.saturating_sub(before + 1);

    // Again with Redis stopped, interleaved with fresh file-store rounds.
    redis.stop();
    let mut outage_samples = Vec::new();
    let mut file_again = Vec::new();
    for round in 0..10 {
        let (a, b) = interleaved(round, file_addr, cluster_addr, &client, per_round).await?;
        file_again.extend(a);
        outage_samples.extend(b);
    }

    let file_med = median(&mut file_samples);
    let cluster_med = median(&mut cluster_samples);
    let outage_med = median(&mut outage_samples);
    let file_again_med = median(&mut file_again);
    println!("    file-store instance:        median {}", us(file_med));
    println!(
        "    cluster instance:           median {} (ratio to file store {:.3})",
        us(cluster_med),
        cluster_med.as_secs_f64() / file_med.as_secs_f64()
    );
    println!(
        "    Redis stopped: file-store median {}, cluster median {} (ratio {:.3})",
        us(file_again_med),
        us(outage_med),
        outage_med.as_secs_f64() / file_again_med.as_secs_f64()
    );
    println!(
        "    Redis commands processed during {} cluster-instance handshakes: {during}",
        per_round * 10
    );
    Ok(())
}

/// Polls verified handshakes until all instances serve the same serial other than `not`.
async fn wait_converged(
    instances: &[Instance],
    client: &Arc<rustls::ClientConfig>,
    not: Option<&str>,
) -> BenchResult<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut serials = Vec::new();
        for instance in instances {
            serials.push(handshake_serial(instance.tls.addr(), DOMAIN, client.clone()).await);
        }
        if let Ok(first) = &serials[0]
            && serials.iter().all(|s| s.as_ref() == Ok(first))
            && not != Some(first.as_str())
        {
            return Ok(first.clone());
        }
        if Instant::now() > deadline {
            return Err(format!("instances did not converge: {serials:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One round against both addresses, `first` going first on even rounds.
async fn interleaved(
    round: usize,
    first: SocketAddr,
    second: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    n: usize,
) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
    if round.is_multiple_of(2) {
        let a = handshakes(first, client, n).await?;
        let b = handshakes(second, client, n).await?;
        Ok((a, b))
    } else {
        let b = handshakes(second, client, n).await?;
        let a = handshakes(first, client, n).await?;
        Ok((a, b))
    }
}

/// `n` sequential full handshakes; each sample is connect + handshake.
async fn handshakes(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    n: usize,
) -> BenchResult<Vec<Duration>> {
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let name = ServerName::try_from(DOMAIN)?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let tls = connector.connect(name.clone(), stream).await?;
        samples.push(started.elapsed());
        drop(tls);
    }
    Ok(samples)
}

/// Redis's `total_commands_processed`.
async fn redis_commands(conn: &mut redis::aio::MultiplexedConnection) -> BenchResult<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no total_commands_processed in INFO".into())
}
