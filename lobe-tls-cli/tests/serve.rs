//! `lobe-tls serve` as a user runs it: the real binary, real sockets, real signals.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls_tests::cli::greeting_upstream;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const NAME: &str = "serve.example.com";
const STEP: Duration = Duration::from_secs(10);

/// Writes a CA-signed pair for `NAME` under `dir/site/` and returns a connector trusting the CA.
fn write_certificate(dir: &Path) -> TlsConnector {
    lobe_tls_tests::tls::connector(&lobe_tls_tests::tls::write_site_pair(dir, &[NAME]))
}

// The binary, killed on drop if a test fails half-way.
use lobe_tls_tests::cli::KillOnDrop as Serve;

fn lobe_tls(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0");
    cmd.args(args)
        .env_remove("LOBE_TLS_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn tls_connect(
    connector: &TlsConnector,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    response
}

#[tokio::test]
async fn serve_forwards_redirects_reports_metrics_and_drains_on_sigterm() {
    let certs = tempfile::tempdir().unwrap();
    let connector = write_certificate(certs.path());
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // Every listener on a port the kernel picks; serve says which in its ready file.
    let ready = certs.path().join("ready.json");
    let mut serve = Serve(
        lobe_tls(&[
            "serve",
            "--ready-file",
            ready.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            // Byte forwarding to an echo server: the tcp mode.
            "--mode",
            "tcp",
            "--upstream",
            &upstream_addr,
            "--cert-dir",
            certs.path().to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "20",
        ])
        .spawn()
        .unwrap(),
    );
    let addrs = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    let (listen, http, metrics) = (addrs.listen(), addrs.http(), addrs.metrics());

    // Ready once a handshake succeeds.
    let deadline = Instant::now() + STEP;
    let mut open = loop {
        match tls_connect(&connector, &listen).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => panic!("serve never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    open.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello");

    let redirect = http_get(&http, "/chat?x=1").await;
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(
        redirect.contains(&format!("location: https://{NAME}/chat?x=1")),
        "{redirect}"
    );
    let challenge = http_get(&http, "/.well-known/acme-challenge/unknown").await;
    assert!(challenge.starts_with("HTTP/1.1 404"), "{challenge}");

    let scraped = http_get(&metrics, "/metrics").await;
    assert!(
        scraped.contains(
            "lobe_tls_certificate_expiry_timestamp_seconds{name=\"site\",source=\"dir\"} "
        ),
        "{scraped}"
    );
    assert!(
        scraped.contains("lobe_tls_active_connections 1\n"),
        "{scraped}"
    );

    // SIGTERM: stop accepting, keep the open connection going, exit once it closes.
    let pid = serve.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(&listen).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open.write_all(b"again").await.unwrap();
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"again");
    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "exited before draining"
    );
    open.shutdown().await.unwrap();
    drop(open);

    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn busy_port_is_one_clear_line_and_exit_status_1() {
    let certs = tempfile::tempdir().unwrap();
    write_certificate(certs.path());
    let taken = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = lobe_tls(&[
        "serve",
        "--listen",
        &addr,
        "--upstream",
        "127.0.0.1:1",
        "--cert-dir",
        certs.path().to_str().unwrap(),
        "--no-http",
    ])
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    // serve logs at info by default (here, the certificate the directory holds); the
    // error is the one line that is not a log line, and the last.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.contains(" INFO "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("lobe-tls: error: ")
            && errors[0].contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
}

#[tokio::test]
async fn nothing_to_serve_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("missing");
    for (store, why) in [
        (empty.path(), "holds no certificate"),
        (missing.as_path(), "does not exist"),
    ] {
        let output = lobe_tls(&["serve", "--upstream", "127.0.0.1:1", "--no-http"])
            .env("LOBE_TLS_STORE", store)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert!(
            stderr.contains("-d DOMAIN") && stderr.contains("--cert-dir"),
            "{stderr}"
        );
    }
    assert!(
        !missing.exists(),
        "a missing store is not created just to say so"
    );
}

#[tokio::test]
async fn a_missing_cert_dir_is_named_by_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let missing = dir.path().join("nope");
    for (path, why) in [
        (missing.as_path(), "no such directory"),
        (file.as_path(), "not a directory"),
    ] {
        let output = lobe_tls(&["serve", "--upstream", "127.0.0.1:1", "--no-http"])
            .arg("--cert-dir")
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8(output.stderr).unwrap();
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|line| !line.contains(" INFO "))
            .collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        let expected = format!("--cert-dir {}: {why}", path.display());
        assert!(errors[0].contains(&expected), "{stderr}");
    }
}

/// Runs `serve` for one managed name against Pebble with `challenge`, and checks that the
/// issued certificate is served, verified by Pebble's root, and reported in the metrics.
async fn managed_name_is_issued_and_served(challenge: &str) {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let upstream_addr = greeting_upstream("upstream says hi\n").await;
    // TLS-ALPN-01 is validated on the terminator's own port; HTTP-01 on the HTTP listener.
    // Otherwise any port: serve says which in its ready file.
    let listen = if challenge == "tls-alpn-01" {
        pebble.tls_listen()
    } else {
        "127.0.0.1:0".to_owned()
    };
    let ready = pebble.dir().join("ready.json");
    let mut cmd = lobe_tls(&[
        "serve",
        "--ready-file",
        ready.to_str().unwrap(),
        "--listen",
        &listen,
        "--mode",
        "tcp",
        "--upstream",
        &upstream_addr,
        "-d",
        NAME,
        "--challenge",
        challenge,
        "--http-listen",
        &pebble.http_listen(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    cmd.env("LOBE_TLS_STORE", store.path())
        .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
        .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    let mut serve = Serve(cmd.spawn().unwrap());
    let addrs = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0).await;
    let (listen, metrics) = (addrs.listen(), addrs.metrics());

    let connector = lobe_tls_tests::tls::connector(&pebble.issuing_root_pem().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tls = loop {
        match tls_connect(&connector, &listen).await {
            Ok(stream) => break stream,
            Err(e) => {
                if let Some(status) = serve.0.try_wait().unwrap() {
                    let mut err = String::new();
                    use std::io::Read;
                    serve
                        .0
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    panic!("serve exited with {status}: {err}");
                }
                assert!(
                    Instant::now() < deadline,
                    "never served a verified certificate: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut greeting = String::new();
    tokio::time::timeout(STEP, tls.read_to_string(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, "upstream says hi\n");
    drop(tls);
    assert!(
        store
            .path()
            .join("live")
            .join(NAME)
            .join("privkey.pem")
            .exists()
    );

    let scraped = http_get(&metrics, "/metrics").await;
    assert!(
        scraped.contains(&format!(
            "lobe_tls_certificate_expiry_timestamp_seconds{{name=\"{NAME}\",source=\"managed\"}} "
        )),
        "{scraped}"
    );
    assert!(
        scraped.contains(&format!(
            "lobe_tls_renewal_failures_total{{name=\"{NAME}\"}} 0"
        )),
        "{scraped}"
    );

    let pid = serve.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn managed_name_is_issued_through_http01_on_the_http_listener_and_served() {
    managed_name_is_issued_and_served("http-01").await;
}

#[tokio::test]
async fn managed_name_is_issued_through_tls_alpn01_on_the_terminator_and_served() {
    managed_name_is_issued_and_served("tls-alpn-01").await;
}

/// The serial of the leaf served to `connector` at `addr`, once a verified handshake works.
async fn served_serial(connector: &TlsConnector, addr: &str) -> Option<String> {
    let tls = tls_connect(connector, addr).await.ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?.first()?.clone();
    Some(lobe_tls::CertInfo::from_der(&leaf).ok()?.serial)
}

#[tokio::test]
async fn serve_with_only_a_store_serves_and_renews_what_it_holds() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    // 30 s certificates: due for renewal after 15 s.
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(30),
        ..PebbleOptions::default()
    });
    let store = tempfile::tempdir().unwrap();
    let with_pebble = |cmd: &mut Command| {
        cmd.env("LOBE_TLS_STORE", store.path())
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    };
    let http = pebble.http_listen();
    let mut issue = lobe_tls(&["issue", "-d", NAME, "--http-listen", &http]);
    with_pebble(&mut issue);
    let issued = issue.output().unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );

    // No -d, no --cert-dir: serve what the store holds, and keep it renewed.
    let ready = pebble.dir().join("ready.json");
    let mut cmd = lobe_tls(&[
        "serve",
        "--ready-file",
        ready.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--http-listen",
        &http,
    ]);
    with_pebble(&mut cmd);
    let mut serve = Serve(cmd.spawn().unwrap());
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0)
        .await
        .listen();
    let connector = lobe_tls_tests::tls::connector(&pebble.issuing_root_pem().await);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(serial) = served_serial(&connector, &listen).await {
                return serial;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the stored certificate was never served");

    let renewed = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            match served_serial(&connector, &listen).await {
                Some(serial) if serial != first => return serial,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    })
    .await
    .expect("serve did not renew the stored certificate");
    let pem =
        std::fs::read_to_string(store.path().join("live").join(NAME).join("cert.pem")).unwrap();
    assert!(
        pem.contains("BEGIN CERTIFICATE"),
        "the renewal is in the store too"
    );
    let mut list = lobe_tls(&["list", "--json"]);
    with_pebble(&mut list);
    let listed: serde_json::Value = serde_json::from_slice(&list.output().unwrap().stdout).unwrap();
    assert_eq!(listed[0]["serial"], renewed.as_str());
}

/// `lobe-tls list --json` on `store`, as a map from name to its report.
fn listed(store: &Path) -> serde_json::Map<String, serde_json::Value> {
    let out = lobe_tls(&["list", "--json"])
        .env("LOBE_TLS_STORE", store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    reports
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r))
        .collect()
}

/// Waits until a verified handshake for `server_name` works and returns the serial served.
async fn wait_for_serial(
    connector: &TlsConnector,
    addr: &str,
    server_name: &str,
    serve: &mut Serve,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tcp = TcpStream::connect(addr).await;
        let served = match tcp {
            Ok(tcp) => connector
                .connect(ServerName::try_from(server_name.to_owned()).unwrap(), tcp)
                .await
                .ok()
                .and_then(|tls| tls.get_ref().1.peer_certificates()?.first().cloned()),
            Err(_) => None,
        };
        if let Some(leaf) = served {
            return lobe_tls::CertInfo::from_der(&leaf).unwrap().serial;
        }
        if let Some(status) = serve.0.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            serve
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("serve exited with {status}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{server_name} was never served on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn serve_stores_a_wildcard_apart_from_its_apex() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    const APEX: &str = "wild.example.com";
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let with_pebble = |cmd: &mut Command| {
        cmd.env("LOBE_TLS_STORE", store.path())
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    };
    let mut issue = lobe_tls(&["issue", "-d", APEX, "--http-listen", &pebble.http_listen()]);
    with_pebble(&mut issue);
    let issued = issue.output().unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let apex_serial = listed(store.path())[APEX]["serial"].clone();

    // The wildcard of the same name, issued by serve: it must not take the apex's place.
    let wildcard = format!("*.{APEX}");
    let dns = pebble.dns_addr.to_string();
    let ready = pebble.dir().join("ready.json");
    let mut cmd = lobe_tls(&[
        "serve",
        "--ready-file",
        ready.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--http-listen",
        "127.0.0.1:0",
        "-d",
        &wildcard,
        "--challenge",
        "dns-01",
        "--dns-provider",
        "challtestsrv",
        "--challtestsrv",
        &pebble.challtestsrv_url,
        "--dns-recursive",
        &dns,
        "--propagation-timeout",
        "10",
    ]);
    with_pebble(&mut cmd);
    let mut serve = Serve(cmd.spawn().unwrap());
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0)
        .await
        .listen();
    let connector = lobe_tls_tests::tls::connector(&pebble.issuing_root_pem().await);
    let wildcard_serial =
        wait_for_serial(&connector, &listen, &format!("www.{APEX}"), &mut serve).await;
    let apex_served = wait_for_serial(&connector, &listen, APEX, &mut serve).await;
    assert_eq!(
        serde_json::Value::String(apex_served),
        apex_serial,
        "the apex must keep its own certificate"
    );

    let stored = listed(store.path());
    let wildcard_name = format!("_.{APEX}");
    assert_eq!(stored[APEX]["serial"], apex_serial, "{stored:?}");
    assert_eq!(stored[APEX]["domains"], serde_json::json!([APEX]));
    assert_eq!(
        stored[&wildcard_name]["serial"],
        serde_json::Value::String(wildcard_serial)
    );
    assert_eq!(
        stored[&wildcard_name]["domains"],
        serde_json::json!([wildcard])
    );
}

/// Verifies the chain as a browser would, but against `expected` whatever name the
/// client asked for, so a handshake for an unknown name can still be checked.
#[derive(Debug)]
struct ExpectName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for ExpectName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.expected, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client trusting `root_pem` that expects a certificate for `expected`, sending SNI
/// (the name it connects with) only when `sni` is set.
fn expecting(root_pem: &str, expected: &str, sni: bool) -> TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectName {
            inner,
            expected: ServerName::try_from(expected.to_owned()).unwrap(),
        }))
        .with_no_client_auth();
    config.enable_sni = sni;
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn default_name_serves_clients_without_or_with_an_unknown_name_from_the_store() {
    use lobe_tls_tests::{Pebble, PebbleOptions};
    let pebble = Pebble::start(PebbleOptions::default());
    let store = tempfile::tempdir().unwrap();
    let with_pebble = |cmd: &mut Command| {
        cmd.env("LOBE_TLS_STORE", store.path())
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    };
    // Stored under a name that is not a DNS name: --default-name takes the store's name.
    let mut issue = lobe_tls(&[
        "issue",
        "--name",
        "site",
        "-d",
        NAME,
        "--http-listen",
        &pebble.http_listen(),
    ]);
    with_pebble(&mut issue);
    let issued = issue.output().unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );

    let ready = pebble.dir().join("ready.json");
    let mut cmd = lobe_tls(&[
        "serve",
        "--ready-file",
        ready.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--no-http",
        "--default-name",
        "site",
    ]);
    with_pebble(&mut cmd);
    let mut serve = Serve(cmd.spawn().unwrap());
    let listen = lobe_tls_tests::cli::wait_ready_async(&ready, &mut serve.0)
        .await
        .listen();
    let root = pebble.issuing_root_pem().await;
    let serial = wait_for_serial(
        &lobe_tls_tests::tls::connector(&root),
        &listen,
        NAME,
        &mut serve,
    )
    .await;
    assert_eq!(
        listed(store.path())["site"]["serial"],
        serde_json::Value::String(serial.clone())
    );

    // No SNI at all, and a name nothing serves: both get the default, verified for NAME.
    let no_sni = wait_for_serial(&expecting(&root, NAME, false), &listen, NAME, &mut serve).await;
    assert_eq!(no_sni, serial);
    let unknown = wait_for_serial(
        &expecting(&root, NAME, true),
        &listen,
        "unknown.example.org",
        &mut serve,
    )
    .await;
    assert_eq!(unknown, serial);

    // A name that is neither stored nor a DNS name is a clear error at start.
    let mut cmd = lobe_tls(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--no-http",
        "--default-name",
        "nosuchname",
    ]);
    with_pebble(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--default-name \"nosuchname\""), "{stderr}");
}
