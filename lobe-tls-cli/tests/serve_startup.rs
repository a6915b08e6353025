//! `serve` over a large store answers before its initial load ends: a handshake for a
//! stored name not read yet reads that certificate on the spot, and once the load ends
//! every stored name is served and `/readyz` says so.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::store::DynStore;
use lobe_tls::store::Store;
use lobe_tls::{CertBundle, CertMeta, FileStore, KeyType, StoredCert, domain};
use lobe_tls_tests::cli::KillOnDrop;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Enough that reading the store takes far longer than reading one certificate.
const CERTS: usize = 6000;
const STEP: Duration = Duration::from_secs(60);

fn name_of(i: usize) -> String {
    format!("site-{i}.example.com")
}

/// Writes `CERTS` certificates signed by one CA into a file store; returns the CA PEM.
async fn fill(dir: &Path) -> String {
    let store: DynStore = Arc::new(FileStore::open(dir).unwrap());
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Arc::new(rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CERTS {
        if tasks.len() >= 16 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let (store, issuer) = (store.clone(), issuer.clone());
        tasks.spawn(async move {
            let name = name_of(i);
            let key = KeyType::EcdsaP256.generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.clone()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let bundle = CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
            let domains = domain::parse_all(&[name.as_str()]).unwrap();
            let meta = CertMeta::new(name, domains, "https://acme.invalid/directory");
            store
                .save_cert(&StoredCert::new(bundle, meta))
                .await
                .unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    ca.pem()
}

async fn handshake(connector: &TlsConnector, addr: &str, name: &str) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
        .map(drop)
}

/// `/readyz`: its status and JSON body.
async fn readyz(admin: &str) -> Option<(u16, serde_json::Value)> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    tokio::time::timeout(STEP, tcp.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1)?;
    Some((status, serde_json::from_str(body).ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_name_is_served_during_the_initial_load_and_every_name_after_it() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("store");
    let ca = fill(&dir).await;
    let connector = lobe_tls_tests::tls::connector(&ca);

    let listen = lobe_tls_tests::reserve_port();
    let admin = lobe_tls_tests::reserve_port();
    let upstream = lobe_tls_tests::reserve_port();
    let addr = format!("127.0.0.1:{}", listen.port());
    let admin_addr = format!("127.0.0.1:{}", admin.port());
    drop(admin);
    let spawned = Instant::now();
    let _serve = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .arg("--store")
            .arg(&dir)
            .args(["--directory", "https://127.0.0.1:9/directory"])
            .args(["serve", "--listen", &addr, "--no-http"])
            .args(["--upstream", &format!("127.0.0.1:{}", upstream.port())])
            .args(["--admin-listen", &admin_addr])
            .env_remove("LOBE_TLS_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The first answer from the admin listener comes while the store is being read.
    let first = loop {
        if let Some(answer) = readyz(&admin_addr).await {
            break answer;
        }
        assert!(
            spawned.elapsed() < STEP,
            "the admin listener never answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(first.0, 503, "not ready while loading: {}", first.1);
    assert_eq!(first.1["loading"], true, "{}", first.1);

    // The name the load reads last, asked for at once.
    let listed = FileStore::open(&dir).unwrap().list_certs().await.unwrap();
    let name = listed.last().unwrap().clone();
    handshake(&connector, &addr, &name).await.unwrap();
    let (_, during) = readyz(&admin_addr).await.unwrap();
    assert!(
        during["initial_load"]["loaded_on_demand"].as_u64().unwrap() >= 1,
        "the handshake read its certificate ahead of the load: {during}"
    );

    // Then the load ends, and every stored name is served.
    let loaded = loop {
        if let Some((200, body)) = readyz(&admin_addr).await {
            break body;
        }
        assert!(spawned.elapsed() < 2 * STEP, "the load never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(loaded["loading"], false, "{loaded}");
    for i in (0..CERTS).step_by(97) {
        handshake(&connector, &addr, &name_of(i)).await.unwrap();
    }
    handshake(&connector, &addr, &name_of(CERTS - 2))
        .await
        .unwrap();
}
