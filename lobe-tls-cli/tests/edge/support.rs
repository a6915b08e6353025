//! The edge tests' harness: backend processes (the test binary re-run as
//! `backend_process`), the `serve` process with a certificate for `NAME`, and an HTTPS
//! client of it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const NAME: &str = "edge.example.com";
pub const STEP: Duration = Duration::from_secs(10);
pub const BACKEND_ENV: &str = "LOBE_TLS_TEST_BACKEND";

/// The backend, when this binary is started as one; otherwise a check that the backend
/// answers its health path.
#[test]
pub fn backend_process() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if let Ok(spec) = std::env::var(BACKEND_ENV) {
        let (addr, name) = spec.split_once(' ').unwrap();
        runtime
            .block_on(lobe_tls_tests::backend::serve(addr, name))
            .unwrap();
        return;
    }
    runtime.block_on(async {
        let backend = Backend::start("self");
        let (status, body) = plain_get(&backend.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
    });
}

/// A backend process, killed on drop.
pub struct Backend {
    pub addr: String,
    pub child: Child,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let addr_port = lobe_tls_tests::reserve_port();
        let addr = addr_port.listen();
        let spec = format!("{addr} {name}");
        Backend::spawn(addr, "support::backend_process", BACKEND_ENV, &spec)
    }

    /// This test binary re-run as the process of `test` (a `#[test]` that serves at
    /// `addr` when the variable `env` holds `spec`), once `addr` accepts connections.
    pub fn spawn(addr: String, test: &str, env: &str, spec: &str) -> Backend {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(env, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + STEP;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "{test} ({spec}) never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend { addr, child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.1 GET (to a backend directly).
pub async fn plain_get(addr: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    // The backend answers small bodies with a length, not chunked.
    (status, body)
}

/// A file store at `store` holding a CA-signed certificate for NAME; returns the CA's
/// certificate.
pub async fn store_certificate(store: &Path) -> rustls::pki_types::CertificateDer<'static> {
    use lobe_tls::store::{CertMeta, Store, StoredCert};
    let pair = tempfile::tempdir().unwrap();
    let ca = write_certificate(pair.path());
    let fullchain = std::fs::read_to_string(pair.path().join("site/fullchain.pem")).unwrap();
    let key = std::fs::read_to_string(pair.path().join("site/privkey.pem")).unwrap();
    let cert = StoredCert::new(
        lobe_tls::CertBundle::from_pem(fullchain, key).unwrap(),
        CertMeta::new(
            NAME,
            lobe_tls::domain::parse_all(&[NAME]).unwrap(),
            "https://ca.invalid/directory",
        ),
    );
    lobe_tls::FileStore::open(store)
        .unwrap()
        .save_cert(&cert)
        .await
        .unwrap();
    ca
}

/// A CA-signed pair for `NAME` (and its subdomains) under `dir/site/`; returns the CA's
/// certificate.
pub fn write_certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    let ca = lobe_tls_tests::tls::write_site_pair(dir, &[NAME, &format!("*.{NAME}")]);
    rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()
}

pub fn connector(ca: &rustls::pki_types::CertificateDer<'static>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// The edge process, killed on drop; keeps its stderr for the log checks.
pub struct Edge {
    pub child: Child,
    pub listen: String,
    pub client: Client,
    _dir: tempfile::TempDir,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    /// Starts `serve` with a --cert-dir for NAME and `args`; `config` is written to a
    /// --config file when given.
    pub async fn start(args: &[&str], config: Option<&str>) -> Edge {
        Edge::start_with(args, config, true).await
    }

    /// As `start`; `handshake` false waits for the port only (a PROXY header is required).
    pub async fn start_with(args: &[&str], config: Option<&str>, handshake: bool) -> Edge {
        Edge::launch(args, config, handshake, None).await
    }

    /// `serve` to `backend` behind a trusted balancer on loopback
    /// (`--accept-proxy-protocol`, `--trusted-proxy 127.0.0.0/8`), with `extra` flags;
    /// ready once its port is, as a connection must start with a PROXY header.
    pub async fn behind_balancer(backend: &Backend, extra: &[&str], config: Option<&str>) -> Edge {
        let mut args = vec![
            "--upstream",
            &backend.addr,
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.0/8",
        ];
        args.extend_from_slice(extra);
        Edge::start_with(&args, config, false).await
    }

    /// `serve` of the certificate for NAME that `store` holds (a file store several
    /// instances share; see [`store_certificate`]), with no --cert-dir.
    pub async fn start_on_store(
        args: &[&str],
        store: &Path,
        ca: &rustls::pki_types::CertificateDer<'static>,
    ) -> Edge {
        Edge::launch(args, None, true, Some((store, ca))).await
    }

    async fn launch(
        args: &[&str],
        config: Option<&str>,
        handshake: bool,
        store: Option<(&Path, &rustls::pki_types::CertificateDer<'static>)>,
    ) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let listen_port = lobe_tls_tests::reserve_port();
        let listen = listen_port.listen();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
        cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0");
        let ca = match store {
            Some((store, ca)) => {
                cmd.arg("--store").arg(store);
                ca.clone()
            }
            None => write_certificate(&dir.path().join("certs")),
        };
        cmd.args(["serve", "--listen", &listen, "--no-http"]);
        if store.is_none() {
            cmd.arg("--cert-dir").arg(dir.path().join("certs"));
        }
        cmd.args(args)
            .env_remove("LOBE_TLS_STORE")
            // The default level (warn): the log checks look for warnings, and stderr is
            // read only at the end, so a chattier level could fill the pipe.
            .env_remove("LOBE_TLS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            std::fs::write(dir.path().join("edge.toml"), config).unwrap();
            cmd.arg("--config").arg(dir.path().join("edge.toml"));
        }
        let child = cmd.spawn().unwrap();
        let client = Client {
            addr: listen.clone(),
            tls: connector(&ca, &[b"http/1.1"]),
            h2: connector(&ca, &[b"h2"]),
        };
        let edge = Edge {
            child,
            listen,
            client,
            _dir: dir,
        };
        let deadline = Instant::now() + STEP;
        loop {
            let up = if handshake {
                edge.client.connect().await.is_ok()
            } else {
                TcpStream::connect(&edge.listen).await.is_ok()
            };
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "serve never came up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        edge
    }

    /// The --cert-dir, holding `site/{fullchain,privkey}.pem` for NAME.
    pub fn cert_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("certs")
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("edge.toml")
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

/// An HTTPS client of the edge.
#[derive(Clone)]
pub struct Client {
    pub addr: String,
    pub tls: TlsConnector,
    pub h2: TlsConnector,
}

/// An answer, body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.addr).await?;
        self.tls
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
    }

    /// A TLS connection that starts with a PROXY v1 header naming `client` (an IPv4 or
    /// IPv6 address), as a trusted balancer sends it.
    pub async fn connect_as(&self, client: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let mut tcp = TcpStream::connect(&self.addr).await?;
        let header = if client.contains(':') {
            format!("PROXY TCP6 {client} ::1 40000 443\r\n")
        } else {
            format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n")
        };
        tcp.write_all(header.as_bytes()).await?;
        self.tls
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
    }

    /// GET `path` for Host `host` on a new HTTP/1.1 connection.
    pub async fn get_host(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Answer> {
        get_on(self.connect().await?, host, path, headers).await
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.get_host(NAME, path, headers).await.unwrap()
    }

    /// A WebSocket through the edge over HTTP/1.1 Upgrade.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
        self.try_websocket(path).await.unwrap()
    }

    /// As `websocket`, or why the connection or the upgrade failed.
    pub async fn try_websocket(
        &self,
        path: &str,
    ) -> std::io::Result<tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>> {
        let tls = self.connect().await?;
        let (ws, response) = tokio_tungstenite::client_async(format!("wss://{NAME}{path}"), tls)
            .await
            .map_err(std::io::Error::other)?;
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        Ok(ws)
    }
}

pub async fn echo(
    ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    text: &str,
) -> String {
    ws.send(text.into()).await.unwrap();
    let message = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    message.into_text().unwrap().to_string()
}

pub fn served_by(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer.body.trim().to_owned()
}

/// GET `path` for NAME on `tls`, an HTTP/1.1 connection already made; the body.
pub async fn get_body(tls: TlsStream<TcpStream>, path: &str) -> std::io::Result<String> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = send
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Retries `connect` until it succeeds: the readiness probe's connection, or one just
/// closed, may still count for a moment.
pub async fn eventually<T, F: std::future::Future<Output = std::io::Result<T>>>(
    what: &str,
    mut connect: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        match connect().await {
            Ok(done) => return done,
            Err(e) => assert!(Instant::now() < deadline, "{what}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes `metrics` until the value on the line that holds `series` (whatever the
/// registry's own prefix before it; NaN while it is absent) is one `wanted` accepts, for
/// up to a step; that value and the last scrape. A port not open yet scrapes as empty.
pub async fn scrape_until(
    metrics: &str,
    series: &str,
    wanted: impl Fn(f64) -> bool,
) -> (f64, String) {
    let deadline = Instant::now() + STEP;
    loop {
        let text = match TcpStream::connect(metrics).await {
            Ok(_) => plain_get(metrics, "/metrics").await.1,
            Err(_) => String::new(),
        };
        let value = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| line.find(series).map(|at| &line[at + series.len()..]))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or(f64::NAN);
        if wanted(value) || Instant::now() > deadline {
            return (value, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As [`scrape_until`], the value alone.
pub async fn metric_until(metrics: &str, series: &str, wanted: impl Fn(f64) -> bool) -> f64 {
    scrape_until(metrics, series, wanted).await.0
}

/// GET `path` for Host `host` on `tls`, a connection already made (e.g. from a chosen
/// source address), with `headers`.
pub async fn get_on(
    tls: TlsStream<TcpStream>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn.with_upgrades());
    let mut request = Request::get(path).header("host", host);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = tokio::time::timeout(
        STEP,
        send.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
