//! The CPU cost of one cluster re-sync at 10,000 certificates, against a local
//! redis-server and against a local 6-node Redis Cluster (three masters, one replica
//! each).
//!
//! 10,000 certificates (distinct ECDSA P-256 keys, two names each, one CA) are written
//! into each store; a manager per store loads them all, as a cluster instance does at
//! start-up. Then, in interleaved rounds (stores alternating which goes first) with
//! nothing changed in the stores:
//!
//! - **full**: what the follower's re-sync did before it compared versions: list the
//!   stored certificates and `Manager::reload` every one (every key parsed);
//! - **compare-first**: `cluster::resync_certs`, which reads each certificate's serial
//!   and renewal state and reloads only what differs (nothing here).
//!
//! Reported per store and variant, medians over `BENCH_ROUNDS` rounds (default 7): wall
//! time, CPU time of this process (all threads, `CLOCK_PROCESS_CPUTIME_ID`) and CPU time
//! of Redis (`INFO cpu`; on the cluster, the sum over the three masters). Set
//! `BENCH_ONLY=full` or `BENCH_ONLY=compare` to run one variant alone, and
//! `BENCH_STORE=standalone` or `BENCH_STORE=cluster` to run one store alone.
//!
//! Run: `cargo bench -p lobe-tls-tests --bench resync`
// A failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::manager::Manager;
use lobe_tls::store::DynStore;
use lobe_tls::{AcmeConfig, CertBundle, CertMeta, KeyType, RedisStore, StoredCert, domain};
use lobe_tls_tests::{RedisCluster, RedisServer};
use rustix::time::{ClockId, clock_gettime};

const CERTS: usize = 10_000;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
        .max(1);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let variants = Variants {
        full: only != "compare",
        compare: only != "full",
    };
    let store = std::env::var("BENCH_STORE").unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(
        rounds,
        variants,
        store != "cluster",
        store != "standalone",
    ));
}

#[derive(Clone, Copy)]
struct Variants {
    full: bool,
    compare: bool,
}

/// One store under test: its manager, and connections to the Redis nodes whose CPU
/// counts (the server; the cluster's masters).
struct Target {
    label: &'static str,
    manager: Manager,
    cpu_probes: Vec<redis::aio::MultiplexedConnection>,
    full: Vec<Sample>,
    compare: Vec<Sample>,
}

async fn run(rounds: usize, variants: Variants, standalone: bool, cluster: bool) {
    let certs = Arc::new(generate());
    let mut targets = Vec::new();
    // Kept alive until the end.
    let mut _server = None;
    let mut _cluster = None;
    if standalone {
        let redis = RedisServer::start();
        let url = redis.url();
        targets.push(target("standalone", &url, std::slice::from_ref(&url), &certs).await);
        _server = Some(redis);
    }
    if cluster {
        let redis = RedisCluster::start(None);
        let masters: Vec<String> = redis
            .master_ports()
            .into_iter()
            .map(|p| redis.node_url(p))
            .collect();
        assert_eq!(masters.len(), 3);
        targets.push(target("cluster", &redis.url(), &masters, &certs).await);
        _cluster = Some(redis);
    }

    for round in 0..rounds {
        // Alternate which store goes first, so drift within a round favours neither.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for i in order {
            let t = &mut targets[i];
            if variants.full {
                let s = measure(&mut t.cpu_probes, || full_resync(&t.manager)).await;
                t.full.push(s);
            }
            if variants.compare {
                let s = measure(&mut t.cpu_probes, || compare_first(&t.manager)).await;
                t.compare.push(s);
            }
        }
    }
    for t in &mut targets {
        if variants.full {
            report_variant(
                t.label,
                "full (list + reload every certificate)",
                &mut t.full,
            );
        }
        if variants.compare {
            report_variant(
                t.label,
                "compare-first (cluster::resync_certs)",
                &mut t.compare,
            );
        }
    }
}

async fn target(
    label: &'static str,
    url: &str,
    cpu_urls: &[String],
    certs: &Arc<Vec<Generated>>,
) -> Target {
    let store: DynStore = Arc::new(RedisStore::connect(url).await.unwrap());
    fill(label, &store, certs).await;
    let manager = Manager::builder(AcmeConfig::new("https://acme.invalid/directory"), store)
        .build()
        .unwrap();
    let report = manager.start().await.unwrap();
    assert_eq!(report.loaded, CERTS, "{:?}", report.unusable);
    let mut cpu_probes = Vec::new();
    for url in cpu_urls {
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        cpu_probes.push(conn);
    }
    Target {
        label,
        manager,
        cpu_probes,
        full: Vec::new(),
        compare: Vec::new(),
    }
}

/// The re-sync before versions were compared: every stored certificate reloaded.
async fn full_resync(manager: &Manager) {
    let names = manager.store().list_certs().await.unwrap();
    assert_eq!(names.len(), CERTS);
    for name in names {
        manager.reload(&name).await.unwrap();
    }
}

async fn compare_first(manager: &Manager) {
    let report = lobe_tls::cluster::resync_certs(manager).await.unwrap();
    assert_eq!((report.checked, report.reloaded), (CERTS, 0));
}

struct Sample {
    wall: Duration,
    cpu: Duration,
    redis_cpu: Duration,
}

async fn measure<F, Fut>(probes: &mut [redis::aio::MultiplexedConnection], f: F) -> Sample
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let redis_before = redis_cpu(probes).await;
    let cpu_before = process_cpu();
    let started = Instant::now();
    f().await;
    let wall = started.elapsed();
    let cpu = process_cpu() - cpu_before;
    let redis_cpu = redis_cpu(probes).await.saturating_sub(redis_before);
    Sample {
        wall,
        cpu,
        redis_cpu,
    }
}

fn process_cpu() -> Duration {
    let t = clock_gettime(ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The CPU time so far (user + system, from `INFO cpu`) of every probed redis-server,
/// summed.
async fn redis_cpu(probes: &mut [redis::aio::MultiplexedConnection]) -> Duration {
    let mut seconds = 0.0;
    for conn in probes {
        let text: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(conn)
            .await
            .unwrap();
        seconds += text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("used_cpu_user:")
                    .or_else(|| l.strip_prefix("used_cpu_sys:"))
            })
            .map(|v| v.trim().parse::<f64>().unwrap())
            .sum::<f64>();
    }
    Duration::from_secs_f64(seconds)
}

fn report_variant(store: &str, label: &str, samples: &mut [Sample]) {
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let wall = median(samples.iter().map(|s| s.wall).collect());
    let cpu = median(samples.iter().map(|s| s.cpu).collect());
    let redis = median(samples.iter().map(|s| s.redis_cpu).collect());
    let cpus: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.1}", ms(s.cpu)))
        .collect();
    println!(
        "{store}: {label}: {CERTS} certificates, {} rounds: median wall {:.1} ms, median CPU {:.1} ms (this process; rounds: {}), median redis-server CPU {:.1} ms",
        samples.len(),
        ms(wall),
        ms(cpu),
        cpus.join(", "),
        ms(redis)
    );
}

/// A certificate and key in PEM, and its two names.
struct Generated {
    cert: String,
    key: String,
    name: String,
    www: String,
}

/// `CERTS` certificates under one CA, made once for every store.
fn generate() -> Vec<Generated> {
    let started = Instant::now();
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(params, ca_key);
    let certs = (0..CERTS)
        .map(|i| {
            let name = format!("site-{i}.example.com");
            let www = format!("www.{name}");
            let key = KeyType::EcdsaP256.generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.clone(), www.clone()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            Generated {
                cert: cert.pem(),
                key: key.serialize_pem(),
                name,
                www,
            }
        })
        .collect();
    eprintln!("generated {CERTS} certificates in {:?}", started.elapsed());
    certs
}

/// Writes the certificates into `store`, 32 saves at a time.
async fn fill(label: &str, store: &DynStore, certs: &Arc<Vec<Generated>>) {
    let started = Instant::now();
    let mut saves = tokio::task::JoinSet::new();
    for i in 0..certs.len() {
        if saves.len() >= 32 {
            saves.join_next().await.unwrap().unwrap();
        }
        let (store, certs) = (store.clone(), certs.clone());
        saves.spawn(async move {
            let g = &certs[i];
            let bundle = CertBundle::from_pem(g.cert.clone(), g.key.clone()).unwrap();
            let domains = domain::parse_all(&[g.name.as_str(), g.www.as_str()]).unwrap();
            let meta = CertMeta::new(g.name.clone(), domains, "https://acme.invalid/directory");
            store
                .save_cert(&StoredCert::new(bundle, meta))
                .await
                .unwrap();
        });
    }
    while let Some(done) = saves.join_next().await {
        done.unwrap();
    }
    eprintln!(
        "{label}: wrote {CERTS} certificates in {:?}",
        started.elapsed()
    );
}
