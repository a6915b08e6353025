//! Renewal propagation per Redis topology: standalone, Sentinel and Cluster.
//!
//! For each topology, a real deployment on loopback (one redis-server; a master, a
//! replica and three sentinels; a 6-node cluster), a fresh Pebble with its defaults, and
//! three manager instances sharing the store, each with a `Cluster` follower (re-sync
//! set to an hour, so the figure is the change feed alone) and its own TLS listener.
//! One instance (rotating) renews with `renew_now`; the clock starts when it returns
//! (the certificate is stored, announced and served locally by then) and stops when
//! verified TLS handshakes show all three serving the new serial. Each poll is three
//! full handshakes (~2 ms), which is the floor of the figure.
//!
//! `BENCH_RENEWALS` renewals per topology (default 100), median and p99 (nearest rank)
//! printed per topology. A topology stops early after `BENCH_MINUTES` minutes (default
//! 4) and reports what it has. `BENCH_STORES=cluster,sentinel` runs a subset.
//!
//! Run: `cargo bench -p lobe-tls-tests --bench propagation_stores`

use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::cluster::Cluster;
use lobe_tls::manager::{ManagedCert, Manager};
use lobe_tls::store::DynStore;
use lobe_tls::{Http01Listener, Http01Registry, RedisStore, domain};
use lobe_tls_tests::redis::SentinelCluster;
use lobe_tls_tests::tls::{TlsServer, client_config, handshake_serial};
use lobe_tls_tests::{Pebble, PebbleOptions, RedisCluster, RedisServer};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const NAME: &str = "site";
const DOMAIN: &str = "bench-propagation.example.com";
const TOPOLOGIES: [&str; 3] = ["standalone", "sentinel", "cluster"];

fn main() -> BenchResult<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    lobe_tls_tests::init_tracing();
    let renewals = env_number("BENCH_RENEWALS", 100).clamp(1, 10_000);
    let minutes = env_number("BENCH_MINUTES", 4).clamp(1, 600);
    let wanted = std::env::var("BENCH_STORES").unwrap_or_else(|_| TOPOLOGIES.join(","));
    println!(
        "renewal -> new serial served by all three instances (change feed only), Pebble defaults"
    );
    for topology in TOPOLOGIES {
        if !wanted.split(',').any(|w| w.trim() == topology) {
            continue;
        }
        let budget = Duration::from_secs(minutes as u64 * 60);
        // A runtime per topology, shut down (every instance's tasks with it) before the
        // deployment and Pebble stop, so no follower sees them go or outlives them.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let (samples, deployment, pebble) = runtime.block_on(run(topology, renewals, budget))?;
        drop(runtime);
        drop((deployment, pebble));
        report(topology, samples);
    }
    Ok(())
}

fn env_number(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deployment kept alive while its instances run.
enum Deployment {
    Standalone(RedisServer),
    Sentinel(SentinelCluster),
    Cluster(RedisCluster),
}

impl Deployment {
    fn start(topology: &str) -> Deployment {
        match topology {
            "standalone" => Deployment::Standalone(RedisServer::start()),
            "sentinel" => Deployment::Sentinel(SentinelCluster::start(None, false)),
            _ => Deployment::Cluster(RedisCluster::start(None)),
        }
    }

    fn url(&self) -> String {
        match self {
            Deployment::Standalone(redis) => redis.url(),
            Deployment::Sentinel(sentinel) => sentinel.url(),
            Deployment::Cluster(cluster) => cluster.url(),
        }
    }
}

struct Instance {
    manager: Manager,
    tls: TlsServer,
    _cluster: Cluster,
}

async fn instance(url: &str, pebble: &Pebble) -> BenchResult<(Instance, Http01Registry)> {
    let store: DynStore = Arc::new(RedisStore::connect(url).await?);
    let http01 = Http01Registry::with_shared_store(store.clone())?;
    let manager = Manager::builder(pebble.acme_config(), store)
        .http01(http01.clone())
        .cert(ManagedCert::new(NAME, domain::parse_all(&[DOMAIN])?))
        .build()?;
    // A long re-sync interval: the figures are the change feed alone.
    let cluster = Cluster::builder(manager.clone())
        .resync_interval(Duration::from_secs(3600))
        .start()?;
    let tls = TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
    Ok((
        Instance {
            manager,
            tls,
            _cluster: cluster,
        },
        http01,
    ))
}

async fn run(
    topology: &str,
    renewals: usize,
    budget: Duration,
) -> BenchResult<(Vec<Duration>, Deployment, Pebble)> {
    let deployment = Deployment::start(topology);
    let url = deployment.url();
    let pebble = Pebble::start(PebbleOptions::default());
    let verifying = client_config(&pebble.issuing_root_pem().await);
    let mut instances = Vec::new();
    let mut registries = Vec::new();
    for _ in 0..3 {
        let (instance, http01) = instance(&url, &pebble).await?;
        instances.push(instance);
        registries.push(http01);
    }
    let _port80 = Http01Listener::bind(pebble.http_addr(), registries[0].service()).await?;
    for instance in &instances {
        instance.manager.start().await?;
    }

    let started = Instant::now();
    let mut serial = wait_converged(&instances, &verifying, None).await?;
    let mut samples = Vec::with_capacity(renewals);
    for run in 0..renewals {
        if started.elapsed() > budget {
            eprintln!("{topology}: time budget spent after {run} renewals");
            break;
        }
        instances[run % 3].manager.renew_now(NAME).await?;
        let renewed = Instant::now();
        serial = wait_converged(&instances, &verifying, Some(&serial)).await?;
        samples.push(renewed.elapsed());
    }
    drop(instances);
    Ok((samples, deployment, pebble))
}

/// Polls verified handshakes until all instances serve one serial other than `not`.
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

fn report(topology: &str, mut samples: Vec<Duration>) {
    if samples.is_empty() {
        println!("{topology:<11} no renewals");
        return;
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let n = samples.len();
    // Nearest rank: the smallest sample with at least 99 % of samples at or below it.
    let p99 = samples[(n * 99).div_ceil(100) - 1];
    println!(
        "{topology:<11} n={n:<3} median {:>6.1} ms  p99 {:>6.1} ms  min {:>6.1} ms  max {:>6.1} ms",
        ms(samples[n / 2]),
        ms(p99),
        ms(samples[0]),
        ms(samples[n - 1])
    );
}
