//! The CPU cost of one cluster re-sync at 10,000 certificates, against a local
//! redis-server.
//!
//! 10,000 certificates (distinct ECDSA P-256 keys, two names each, one CA) are written
//! into Redis; a manager loads them all, as a cluster instance does at start-up. Then, in
//! interleaved rounds with nothing changed in the store:
//!
//! - **full**: what the follower's re-sync did before it compared versions: list the
//!   stored certificates and `Manager::reload` every one (every key parsed);
//! - **compare-first**: `cluster::resync_certs`, which reads each certificate's serial
//!   and renewal state and reloads only what differs (nothing here).
//!
//! Reported per variant, medians over `BENCH_ROUNDS` rounds (default 7): wall time, CPU
//! time of this process (all threads, `CLOCK_PROCESS_CPUTIME_ID`) and CPU time of
//! redis-server (`INFO cpu`). Set `BENCH_ONLY=full` to run the first variant alone.
//!
//! Run: `cargo bench -p lobe-tls-tests --bench resync`
// A failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::manager::Manager;
use lobe_tls::store::DynStore;
use lobe_tls::{AcmeConfig, CertBundle, CertMeta, KeyType, RedisStore, StoredCert, domain};
use lobe_tls_tests::RedisServer;
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
    let only_full = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "full");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(rounds, only_full));
}

async fn run(rounds: usize, only_full: bool) {
    let redis = RedisServer::start();
    let store: DynStore = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    fill(&store).await;
    let manager = Manager::builder(AcmeConfig::new("https://acme.invalid/directory"), store)
        .build()
        .unwrap();
    let report = manager.start().await.unwrap();
    assert_eq!(report.loaded, CERTS, "{:?}", report.unusable);
    let mut info = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let mut full = Vec::new();
    let mut compare = Vec::new();
    for _ in 0..rounds {
        full.push(measure(&mut info, || full_resync(&manager)).await);
        if !only_full {
            compare.push(measure(&mut info, || compare_first(&manager)).await);
        }
    }
    report_variant("full (list + reload every certificate)", &mut full);
    if !only_full {
        report_variant("compare-first (cluster::resync_certs)", &mut compare);
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

async fn measure<F, Fut>(info: &mut redis::aio::MultiplexedConnection, f: F) -> Sample
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let redis_before = redis_cpu(info).await;
    let cpu_before = process_cpu();
    let started = Instant::now();
    f().await;
    let wall = started.elapsed();
    let cpu = process_cpu() - cpu_before;
    let redis_cpu = redis_cpu(info).await.saturating_sub(redis_before);
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

/// redis-server's own CPU time so far (user + system), from `INFO cpu`.
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> Duration {
    let text: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    let seconds: f64 = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum();
    Duration::from_secs_f64(seconds)
}

fn report_variant(label: &str, samples: &mut [Sample]) {
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
        "{label}: {CERTS} certificates, {} rounds: median wall {:.1} ms, median CPU {:.1} ms (this process; rounds: {}), median redis-server CPU {:.1} ms",
        samples.len(),
        ms(wall),
        ms(cpu),
        cpus.join(", "),
        ms(redis)
    );
}

/// Writes `CERTS` certificates, 32 saves at a time.
async fn fill(store: &DynStore) {
    let started = Instant::now();
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Arc::new(rcgen::Issuer::new(params, ca_key));
    let mut saves = tokio::task::JoinSet::new();
    for i in 0..CERTS {
        if saves.len() >= 32 {
            saves.join_next().await.unwrap().unwrap();
        }
        let (store, issuer) = (store.clone(), issuer.clone());
        saves.spawn(async move {
            let name = format!("site-{i}.example.com");
            let www = format!("www.{name}");
            let key = KeyType::EcdsaP256.generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.clone(), www.clone()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let bundle = CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
            let domains = domain::parse_all(&[name.as_str(), www.as_str()]).unwrap();
            let meta = CertMeta::new(name.clone(), domains, "https://acme.invalid/directory");
            store
                .save_cert(&StoredCert::new(bundle, meta))
                .await
                .unwrap();
        });
    }
    while let Some(done) = saves.join_next().await {
        done.unwrap();
    }
    eprintln!("wrote {CERTS} certificates in {:?}", started.elapsed());
}
