//! Ready time of `lobe-tls serve` over a large store: 100,000 certificates.
//!
//! Per run, for the file store and for Redis (`redis-server --save ''`):
//! - ready: from spawning the real binary to the first successful TLS handshake for a
//!   random stored name (one client retrying at once);
//! - p50/p99 of full handshakes for random stored names from that moment to 10 s after
//!   spawn, from `CLIENTS` clients in a loop (failed handshakes counted apart);
//! - loaded: from spawn to `/readyz` answering 200 (every certificate loaded), under
//!   the clients' load, and again in a second spawn with no handshake;
//! - in that second spawn: resident memory per certificate once
//!   loaded (RSS minus the RSS of `serve` over a one-certificate store, over the count),
//!   then again after `KEYS_USED` distinct names were handshaked (their keys loaded).
//!
//! Medians of `RUNS` runs are printed. The store is written once: set
//! `LOBE_TLS_READY_DIR=DIR` to keep it (and its CA) between invocations.
//! `LOBE_TLS_READY_CERTS` (default 100000) and `LOBE_TLS_READY_RUNS` (default 3) change
//! the size and the number of runs; `LOBE_TLS_READY_STORES=fs` or `=redis` runs one store.
//!
//! Run: `cargo bench -p lobe-tls-cli --bench ready`
// A failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::store::DynStore;
use lobe_tls::{CertBundle, CertMeta, FileStore, KeyType, StoredCert, domain};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const CLIENTS: usize = 4;
const WINDOW: Duration = Duration::from_secs(10);
const KEYS_USED: usize = 1000;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let certs = env_usize("LOBE_TLS_READY_CERTS", 100_000);
    let runs = env_usize("LOBE_TLS_READY_RUNS", 3);
    let stores = std::env::var("LOBE_TLS_READY_STORES").unwrap_or_else(|_| "fs,redis".into());
    let temp = tempfile::tempdir().unwrap();
    let dir = std::env::var("LOBE_TLS_READY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| temp.path().join("store"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca_pem = runtime.block_on(fill(&dir, certs));
    let small = temp.path().join("one");
    runtime.block_on(fill(&small, 1));
    let connector = lobe_tls_tests::tls::connector(&ca_pem);

    for kind in stores.split(',') {
        let (spec, small_spec, _redis) = match kind {
            "fs" => (dir.display().to_string(), small.display().to_string(), None),
            "redis" => {
                let redis = lobe_tls_tests::RedisServer::start();
                let small_redis = lobe_tls_tests::RedisServer::start();
                let copied = Instant::now();
                copy_store(&dir, &redis.url());
                copy_store(&small, &small_redis.url());
                eprintln!("copied to redis in {:?}", copied.elapsed());
                (redis.url(), small_redis.url(), Some((redis, small_redis)))
            }
            other => panic!("unknown store kind {other}"),
        };
        let baseline = runtime.block_on(idle_rss(&small_spec, &connector, 0));
        let mut ready = Vec::new();
        let mut loaded = Vec::new();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut kib = Vec::new();
        let mut kib_used = Vec::new();
        let mut quiet = Vec::new();
        for run in 0..runs {
            let r = runtime.block_on(ready_run(&spec, &connector, certs));
            println!(
                "{kind} run {run}: ready {:.3} s, /readyz 200 at {:.3} s, {} handshakes in the window ({} failed), p50 {:.2} ms, p99 {:.2} ms, {} loaded on demand",
                r.ready, r.loaded, r.ok, r.failed, r.p50, r.p99, r.on_demand
            );
            ready.push(r.ready);
            loaded.push(r.loaded);
            p50.push(r.p50);
            p99.push(r.p99);
            let (idle, used, quiet_load) = runtime.block_on(idle_rss(&spec, &connector, certs));
            quiet.push(quiet_load);
            let per = |rss: f64| (rss - baseline.0) / certs as f64 / 1024.0;
            println!(
                "{kind} run {run}: all loaded at {quiet_load:.3} s with no handshake; RSS {:.1} MiB loaded ({:.2} KiB/cert), {:.1} MiB after {KEYS_USED} keys used ({:.2} KiB/cert); one-certificate serve {:.1} MiB",
                idle / 1048576.0,
                per(idle),
                used / 1048576.0,
                per(used),
                baseline.0 / 1048576.0
            );
            kib.push(per(idle));
            kib_used.push(per(used));
        }
        println!(
            "ready {kind}: {certs} certificates, median of {runs}: ready {:.3} s, p50 {:.2} ms, p99 {:.2} ms over the first {} s, all loaded at {:.3} s ({:.3} s with no handshake), {:.2} KiB/cert loaded, {:.2} KiB/cert after {KEYS_USED} keys used",
            median(&mut ready),
            median(&mut p50),
            median(&mut p99),
            WINDOW.as_secs(),
            median(&mut loaded),
            median(&mut quiet),
            median(&mut kib),
            median(&mut kib_used),
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn copy_store(from: &Path, to: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .args(["store", "copy", "--from"])
        .arg(from)
        .args(["--to", to])
        .env_remove("LOBE_TLS_STORE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn name_of(i: usize) -> String {
    format!("site-{i}.example.com")
}

/// Writes `certs` certificates (ECDSA P-256, one CA) into the file store at `dir`,
/// unless they are there; returns the CA's PEM (kept beside the store).
async fn fill(dir: &Path, certs: usize) -> String {
    let ca_path = dir.with_extension("ca.pem");
    let ca_key_path = dir.with_extension("ca-key.pem");
    std::fs::create_dir_all(dir).unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir).unwrap());
    let (ca_pem, ca_key) = match (
        std::fs::read_to_string(&ca_path),
        std::fs::read_to_string(&ca_key_path),
    ) {
        (Ok(pem), Ok(key)) => (pem, rcgen::KeyPair::from_pem(&key).unwrap()),
        _ => {
            let key = KeyType::EcdsaP256.generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = params.self_signed(&key).unwrap();
            std::fs::write(&ca_path, ca.pem()).unwrap();
            std::fs::write(&ca_key_path, key.serialize_pem()).unwrap();
            (ca.pem(), key)
        }
    };
    let have = store.list_certs().await.unwrap().len();
    if have >= certs {
        return ca_pem;
    }
    let issuer = Arc::new(rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in have..certs {
        if tasks.len() >= 16 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let (store, issuer) = (store.clone(), issuer.clone());
        tasks.spawn(async move {
            let name = name_of(i);
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
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    eprintln!(
        "wrote {} certificates in {:?}",
        certs - have,
        started.elapsed()
    );
    ca_pem
}

/// `serve` on `store`, its listener on a reserved port, the admin listener on another.
struct Serve {
    child: Child,
    listen: String,
    admin: String,
    _reserved: lobe_tls_tests::Reserved,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(store: &str) -> Serve {
    let reserved = lobe_tls_tests::reserve_port();
    let admin = lobe_tls_tests::reserve_port();
    let upstream = lobe_tls_tests::reserve_port();
    let listen = format!("127.0.0.1:{}", reserved.port());
    let admin_addr = format!("127.0.0.1:{}", admin.port());
    let child = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .args(["--store", store])
        // Nothing here is due; a CA that does not answer keeps any poll short.
        .args(["--directory", "https://127.0.0.1:9/directory"])
        .args(["serve", "--listen", &listen, "--no-http"])
        .args(["--upstream", &format!("127.0.0.1:{}", upstream.port())])
        .args(["--admin-listen", &admin_addr])
        .env_remove("LOBE_TLS_STORE")
        .env_remove("LOBE_TLS_ADMIN_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(admin);
    Serve {
        child,
        listen,
        admin: admin_addr,
        _reserved: reserved,
    }
}

async fn handshake(connector: &TlsConnector, addr: &str, name: &str) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
        .map(drop)
}

fn random_name(certs: usize) -> String {
    name_of(rand::random_range(0..certs))
}

struct ReadyRun {
    ready: f64,
    loaded: f64,
    ok: usize,
    failed: usize,
    p50: f64,
    p99: f64,
    on_demand: u64,
}

async fn ready_run(store: &str, connector: &TlsConnector, certs: usize) -> ReadyRun {
    let spawned = Instant::now();
    let serve = spawn_serve(store);
    let first = random_name(certs);
    loop {
        if handshake(connector, &serve.listen, &first).await.is_ok() {
            break;
        }
        assert!(spawned.elapsed() < Duration::from_secs(60), "never ready");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready = spawned.elapsed().as_secs_f64();
    let end = spawned + WINDOW;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (connector, addr) = (connector.clone(), serve.listen.clone());
        clients.spawn(async move {
            let (mut times, mut failed) = (Vec::new(), 0usize);
            while Instant::now() < end {
                let name = random_name(certs);
                let t = Instant::now();
                match handshake(&connector, &addr, &name).await {
                    Ok(()) => times.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => failed += 1,
                }
            }
            (times, failed)
        });
    }
    let (mut times, mut failed) = (Vec::new(), 0);
    while let Some(done) = clients.join_next().await {
        let (t, f) = done.unwrap();
        times.extend(t);
        failed += f;
    }
    let loaded = wait_loaded(&serve.admin, spawned).await;
    let on_demand = status_on_demand(&serve.admin).await;
    if failed > 0 {
        eprintln!(
            "{failed} handshakes failed; /readyz: {:?}",
            admin_get(&serve.admin, "/readyz").await.map(|r| r.1)
        );
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    ReadyRun {
        ready,
        loaded,
        ok: times.len(),
        failed,
        p50: at(0.50),
        p99: at(0.99),
        on_demand,
    }
}

async fn admin_get(admin: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}

/// Seconds from `spawned` until `/readyz` answers 200.
async fn wait_loaded(admin: &str, spawned: Instant) -> f64 {
    loop {
        if let Some((200, _)) = admin_get(admin, "/readyz").await {
            return spawned.elapsed().as_secs_f64();
        }
        assert!(spawned.elapsed() < Duration::from_secs(120), "never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many certificates handshakes loaded on demand, from `/readyz`.
async fn status_on_demand(admin: &str) -> u64 {
    let Some((_, response)) = admin_get(admin, "/readyz").await else {
        return 0;
    };
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["initial_load"]["loaded_on_demand"].as_u64())
        .unwrap_or(0)
}

fn rss_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024.0
}

/// RSS of `serve` once its store is loaded with no handshake, then after `KEYS_USED`
/// distinct names (capped at `certs`) were handshaked.
async fn idle_rss(store: &str, connector: &TlsConnector, certs: usize) -> (f64, f64, f64) {
    let spawned = Instant::now();
    let serve = spawn_serve(store);
    let loaded = wait_loaded(&serve.admin, spawned).await;
    // Let the allocator settle after the load's transient buffers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_of(serve.child.id());
    for i in 0..KEYS_USED.min(certs) {
        handshake(
            connector,
            &serve.listen,
            &name_of(i * (certs / KEYS_USED).max(1)),
        )
        .await
        .unwrap();
    }
    let used = rss_of(serve.child.id());
    (idle, used, loaded)
}
