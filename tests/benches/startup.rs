//! Start-up: how long `Manager::start` takes to load N certificates from the file store
//! into the resolver, and the resident memory per certificate.
//!
//! `cargo bench -p lobe-tls-tests --bench startup` (N = 10,000; set STARTUP_CERTS to change).
//! The store lives on /dev/shm when it exists, so the figure is the manager's work (read,
//! parse, validate, swap in) rather than the disk's. Each run is reported; the median of
//! five is the figure to quote.

use std::sync::Arc;
use std::time::Instant;

use lobe_tls::store::DynStore;
use lobe_tls::{
    AcmeConfig, CertBundle, CertMeta, ChallengeConfig, FileStore, KeyType, Manager, Store,
    StoredCert, domain,
};
use time::OffsetDateTime;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One CA signs every leaf, as a real CA would; chains carry the CA as intermediate.
fn make_certs(count: usize) -> Vec<StoredCert> {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    (0..count)
        .map(|i| {
            let name = format!("site{i}.example.com");
            let key = KeyType::EcdsaP256.generate().expect("key");
            let mut params = rcgen::CertificateParams::new(vec![name.clone()]).expect("params");
            params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
            params.not_after = OffsetDateTime::now_utc() + time::Duration::days(80);
            let leaf = params.signed_by(&key, &issuer).expect("leaf");
            let bundle = CertBundle::from_pem(
                format!("{}{}", leaf.pem(), ca_cert.pem()),
                key.serialize_pem(),
            )
            .expect("bundle");
            StoredCert {
                bundle,
                meta: CertMeta {
                    name: name.clone(),
                    domains: domain::parse_all(&[name.as_str()]).expect("domain"),
                    key_type: KeyType::EcdsaP256,
                    challenge: ChallengeConfig::default(),
                    directory: "https://ca.invalid/dir".into(),
                    issued_at: OffsetDateTime::now_utc(),
                },
            }
        })
        .collect()
}

fn main() {
    let count: usize = std::env::var("STARTUP_CERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    runtime.block_on(async {
        let store = Arc::new(FileStore::open(base.path().join("store")).expect("store"));
        let started = Instant::now();
        let certs = make_certs(count);
        for cert in &certs {
            store.save_cert(cert).await.expect("save");
        }
        drop(certs);
        eprintln!(
            "prepared {count} certificates in {:.1}s",
            started.elapsed().as_secs_f64()
        );

        let mut times = Vec::new();
        for run in 0..5 {
            let store: DynStore = store.clone();
            let rss_before = rss_kib();
            let manager = Manager::builder(AcmeConfig::new("https://ca.invalid/dir"), store)
                .build()
                .expect("manager");
            let started = Instant::now();
            let report = manager.start().await.expect("start");
            let elapsed = started.elapsed();
            assert_eq!(report.loaded, count, "{:?}", report.unusable.first());
            assert!(manager.resolver().lookup(Some("site0.example.com")).is_some());
            let rss_after = rss_kib();
            println!(
                "run {run}: loaded {count} certificates in {:.3}s; RSS +{} KiB ({:.1} KiB per certificate)",
                elapsed.as_secs_f64(),
                rss_after.saturating_sub(rss_before),
                rss_after.saturating_sub(rss_before) as f64 / count as f64
            );
            times.push(elapsed.as_secs_f64());
            drop(manager);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "median start-up for {count} certificates: {:.3}s (min {:.3}s, max {:.3}s)",
            times[2], times[0], times[4]
        );
    });
}
