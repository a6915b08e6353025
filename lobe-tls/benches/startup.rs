//! Start-up: `Manager::start` loads 10,000 certificates from the file store into the
//! resolver; the resident memory each one costs is reported too.
//!
//! The store is written once (distinct ECDSA P-256 keys, one CA). Each measurement runs in
//! a fresh child process, so the memory figure is the load alone: resident set size
//! before and after, from /proc/self/statm. Medians of the runs are printed.
//!
//! Set `LOBE_TLS_BENCH_STORE=DIR` to keep the generated store between runs, or
//! `LOBE_TLS_BENCH_STORE=redis://HOST:PORT/` to measure a Redis store instead (a cluster
//! instance starting up).
//!
//! Run: `cargo bench -p lobe-tls --bench startup`
// A failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use lobe_tls::store::DynStore;
use lobe_tls::{
    AcmeConfig, CertBundle, CertMeta, CertResolver, FileStore, KeyType, Manager, RedisStore,
    StoredCert, domain,
};

const CERTS: usize = 10_000;
const RUNS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "--load") {
        load(&args[at + 1]);
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let root = std::env::var("LOBE_TLS_BENCH_STORE")
        .unwrap_or_else(|_| temp.path().to_string_lossy().into_owned());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(fill(&root));

    let mut seconds = Vec::new();
    let mut per_cert = Vec::new();
    for _ in 0..RUNS {
        let output = Command::new(std::env::current_exe().unwrap())
            .arg("--load")
            .arg(&root)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let line = String::from_utf8(output.stdout).unwrap();
        let fields: Vec<f64> = line
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        let (secs, before, after, loaded) = (fields[0], fields[1], fields[2], fields[3]);
        assert_eq!(loaded as usize, CERTS, "every certificate is served");
        println!(
            "run: {CERTS} certificates in {secs:.3} s, RSS {:.1} MiB -> {:.1} MiB",
            before / 1048576.0,
            after / 1048576.0
        );
        seconds.push(secs);
        per_cert.push((after - before) / CERTS as f64);
    }
    seconds.sort_by(f64::total_cmp);
    per_cert.sort_by(f64::total_cmp);
    println!(
        "startup: {CERTS} certificates, median {:.3} s, median resident memory {:.1} KiB per certificate",
        seconds[RUNS / 2],
        per_cert[RUNS / 2] / 1024.0
    );
}

/// A directory or a `redis://` URL.
async fn open_store(spec: &str) -> DynStore {
    if spec.starts_with("redis://") {
        Arc::new(RedisStore::connect(spec).await.unwrap())
    } else {
        Arc::new(FileStore::open(spec).unwrap())
    }
}

/// Writes `CERTS` certificates into the store at `root`, unless they are there already.
async fn fill(root: &str) {
    let store = open_store(root).await;
    let have = store.list_certs().await.unwrap().len();
    if have >= CERTS {
        return;
    }
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(params, ca_key);
    let started = Instant::now();
    for i in have..CERTS {
        let name = format!("site-{i}.example.com");
        let key = KeyType::EcdsaP256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.clone(), format!("www.{name}")])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let bundle = CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
        let domains = domain::parse_all(&[name.as_str(), &format!("www.{name}")]).unwrap();
        let meta = CertMeta::new(name.clone(), domains, "https://acme.invalid/directory");
        store
            .save_cert(&StoredCert::new(bundle, meta))
            .await
            .unwrap();
    }
    eprintln!(
        "wrote {} certificates in {:?}",
        CERTS - have,
        started.elapsed()
    );
}

/// The measured part, in a fresh process: prints `seconds rss_before rss_after served`.
fn load(root: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before = resident_bytes();
    let started = Instant::now();
    let resolver = runtime.block_on(load_into_resolver(root));
    let secs = started.elapsed().as_secs_f64();
    let after = resident_bytes();
    println!("{secs} {before} {after} {}", resolver.len() / 2);
}

/// What a proxy does at start: `Manager::start` reads, checks and serves every stored
/// certificate (no managed names, so nothing is ordered and the CA is never contacted).
async fn load_into_resolver(root: &str) -> CertResolver {
    let store = open_store(root).await;
    let resolver = CertResolver::new();
    let manager = Manager::builder(AcmeConfig::new("https://acme.invalid/directory"), store)
        .resolver(resolver.clone())
        .build()
        .unwrap();
    let report = manager.start().await.unwrap();
    assert!(report.unusable.is_empty(), "{:?}", report.unusable);
    resolver
}

fn resident_bytes() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0
}
