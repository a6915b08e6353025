//! `lobe-tls serve` as an edge: the real binary in http mode in front of real backend
//! processes (this test binary re-run as `backend_process`), a real HAProxy in front of
//! it, real signals.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

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

const NAME: &str = "edge.example.com";
const STEP: Duration = Duration::from_secs(10);
const BACKEND_ENV: &str = "LOBE_TLS_TEST_BACKEND";

/// The backend, when this binary is started as one; otherwise a check that the backend
/// answers its health path.
#[test]
fn backend_process() {
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
struct Backend {
    addr: String,
    child: Child,
}

impl Backend {
    fn start(name: &str) -> Backend {
        let addr = format!("127.0.0.1:{}", lobe_tls_tests::free_port());
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "backend_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(BACKEND_ENV, format!("{addr} {name}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + STEP;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "backend {name} never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend { addr, child }
    }

    fn kill(&mut self) {
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
async fn plain_get(addr: &str, path: &str) -> (u16, String) {
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

/// A CA-signed pair for `NAME` under `dir/site/`; returns the CA's certificate.
fn write_certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![NAME.to_owned(), format!("*.{NAME}")])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/fullchain.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("site/privkey.pem"), key.serialize_pem()).unwrap();
    ca.der().clone()
}

fn connector(ca: &rustls::pki_types::CertificateDer<'static>, alpn: &[&[u8]]) -> TlsConnector {
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
struct Edge {
    child: Child,
    listen: String,
    client: Client,
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
    async fn start(args: &[&str], config: Option<&str>) -> Edge {
        Edge::start_with(args, config, true).await
    }

    /// As `start`; `handshake` false waits for the port only (a PROXY header is required).
    async fn start_with(args: &[&str], config: Option<&str>, handshake: bool) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_certificate(&dir.path().join("certs"));
        let listen = format!("127.0.0.1:{}", lobe_tls_tests::free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
        cmd.args(["serve", "--listen", &listen, "--no-http"])
            .arg("--cert-dir")
            .arg(dir.path().join("certs"))
            .args(args)
            .env_remove("LOBE_TLS_STORE")
            .env("RUST_LOG", "lobe_tls=info")
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

    fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("edge.toml")
    }

    fn signal(&self, name: &str) {
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
struct Client {
    addr: String,
    tls: TlsConnector,
    h2: TlsConnector,
}

/// An answer, body read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Client {
    async fn connect(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.addr).await?;
        self.tls
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
    }

    /// GET `path` for Host `host` on a new HTTP/1.1 connection.
    async fn get_host(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Answer> {
        let tls = self.connect().await?;
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

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.get_host(NAME, path, headers).await.unwrap()
    }

    /// A WebSocket through the edge over HTTP/1.1 Upgrade.
    async fn websocket(
        &self,
        path: &str,
    ) -> tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>> {
        let tls = self.connect().await.unwrap();
        let (ws, response) = tokio_tungstenite::client_async(format!("wss://{NAME}{path}"), tls)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws
    }
}

async fn echo(
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

fn served_by(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer.body.trim().to_owned()
}

#[tokio::test]
async fn three_backends_share_the_load_and_a_killed_one_fails_no_request() {
    let mut backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let upstreams: Vec<String> = backends.iter().map(|b| b.addr.clone()).collect();
    let edge = Edge::start(
        &[
            "--upstream",
            &upstreams.join(","),
            "--health-path",
            "/healthz",
            "--health-interval",
            "1",
        ],
        None,
    )
    .await;
    // Eight clients, each sending requests one after the other; backend "b" is killed
    // while they run. Every request must succeed.
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = edge.client.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop_at {
                let answer = client.get("/whoami", &[]).await;
                seen.push(served_by(&answer));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    backends[1].kill();
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.unwrap());
    }
    for name in ["a", "b", "c"] {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} served nothing: {seen:?}"
        );
    }
    assert!(seen.len() > 50, "only {} requests", seen.len());

    // h2 through ALPN, to the backends that are left.
    let tcp = TcpStream::connect(&edge.listen).await.unwrap();
    let tls = edge
        .client
        .h2
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        let request = Request::get(format!("https://{NAME}/whoami"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_ne!(&body[..], b"b\n");
    }
}

#[tokio::test]
async fn unknown_hosts_get_421_and_path_routes_pick_their_pool() {
    let main = Backend::start("main");
    let api = Backend::start("api");
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{}\"]\nhsts = 600\n\n[[site.route]]\npath = \"/api/\"\nupstreams = [\"{}\"]\n",
        main.addr, api.addr
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let answer = edge
        .client
        .get_host("other.example.com", "/whoami", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST, "{answer:?}");
    assert!(answer.body.contains("no site"), "{answer:?}");
    let answer = edge.client.get("/whoami", &[]).await;
    assert_eq!(served_by(&answer), "main");
    assert_eq!(answer.headers["strict-transport-security"], "max-age=600");
    assert_eq!(served_by(&edge.client.get("/api/whoami", &[]).await), "api");
}

#[tokio::test]
async fn cookie_affinity_pins_a_client_and_re_pins_it_when_its_upstream_dies() {
    let mut backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [{}]\nlb = \"cookie\"\n",
        list.join(", ")
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let first = edge.client.get("/whoami", &[]).await;
    let pinned = served_by(&first);
    let set_cookie = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly")
            && set_cookie.contains("Secure")
            && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    for backend in &backends {
        let port = backend.addr.rsplit_once(':').unwrap().1;
        assert!(
            !cookie.contains(port) && !cookie.contains("127.0.0.1"),
            "{cookie}"
        );
    }
    for _ in 0..10 {
        let answer = edge.client.get("/whoami", &[("cookie", &cookie)]).await;
        assert_eq!(served_by(&answer), pinned);
        assert!(answer.headers.get("set-cookie").is_none());
    }
    let index = ["a", "b", "c"].iter().position(|n| *n == pinned).unwrap();
    backends[index].kill();
    let answer = edge.client.get("/whoami", &[("cookie", &cookie)]).await;
    let repinned = served_by(&answer);
    assert_ne!(repinned, pinned);
    let new_cookie = answer.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(new_cookie, cookie);
    let answer = edge.client.get("/whoami", &[("cookie", &new_cookie)]).await;
    assert_eq!(served_by(&answer), repinned);
}

#[tokio::test]
async fn with_every_upstream_down_the_answer_is_quick_and_says_when_to_retry() {
    let dead = [lobe_tls_tests::free_port(), lobe_tls_tests::free_port()]
        .map(|p| format!("127.0.0.1:{p}"))
        .join(",");
    let edge = Edge::start(&["--upstream", &dead], None).await;
    for _ in 0..4 {
        let started = Instant::now();
        let answer = edge.client.get("/", &[]).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                answer.status,
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
            ),
            "{answer:?}"
        );
        assert!(answer.headers.contains_key("retry-after"), "{answer:?}");
    }
}

#[tokio::test]
async fn forwarding_headers_are_replaced_unless_the_peer_is_trusted() {
    let backend = Backend::start("a");
    let spoofed = [("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")];
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let seen = edge.client.get("/headers", &spoofed).await.body;
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(
        seen.contains(&format!(
            "forwarded: for=127.0.0.1;proto=https;host={NAME}\n"
        )),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    assert!(
        seen.contains(&format!("x-forwarded-host: {NAME}\n")),
        "{seen}"
    );
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    drop(edge);

    let trusting = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--trusted-proxy",
            "127.0.0.0/8",
        ],
        None,
    )
    .await;
    let seen = trusting.client.get("/headers", &spoofed).await.body;
    assert!(
        seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{seen}"
    );
}

#[tokio::test]
async fn haproxy_in_front_sends_proxy_v2_and_the_backend_sees_the_client() {
    let backend = Backend::start("a");
    let edge = Edge::start_with(
        &["--upstream", &backend.addr, "--accept-proxy-protocol"],
        None,
        false,
    )
    .await;
    // Without a PROXY header: refused at once, no handshake.
    let started = Instant::now();
    assert!(edge.client.connect().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(6));
    let front = format!("127.0.0.1:{}", lobe_tls_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend tls\n  bind {front}\n  default_backend edge\nbackend edge\n  server edge {} send-proxy-v2\n",
        edge.listen
    );
    std::fs::write(dir.path().join("haproxy.cfg"), config).unwrap();
    let mut haproxy = Command::new("haproxy")
        .arg("-f")
        .arg(dir.path().join("haproxy.cfg"))
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is installed (apt-get install haproxy)");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _haproxy = Kill(&mut haproxy);
    // The client connects to HAProxy from 127.0.0.2, so its address differs from
    // HAProxy's own (127.0.0.1).
    let deadline = Instant::now() + STEP;
    let tls = loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let attempt = async {
            let tcp = socket.connect(front.parse().unwrap()).await?;
            edge.client
                .tls
                .connect(ServerName::try_from(NAME).unwrap(), tcp)
                .await
        };
        match attempt.await {
            Ok(tls) => break tls,
            Err(e) => {
                assert!(Instant::now() < deadline, "no TLS through haproxy: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/headers")
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.contains("x-forwarded-for: 127.0.0.2\n"), "{seen}");
}

#[tokio::test]
async fn streams_and_websockets_stay_up_through_silence_at_the_defaults() {
    // More than 60 s of silence (the usual proxy read timeout) at the CLI's defaults.
    let backend = Backend::start("a");
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let client = edge.client.clone();
    let sse = tokio::spawn(async move {
        let tls = client.connect().await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::get("/sse?n=1&gap_ms=65000")
            .header("host", NAME)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let mut events = Vec::new();
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(80), body.frame())
            .await
            .unwrap()
        {
            if let Ok(data) = frame.unwrap().into_data() {
                events.push(String::from_utf8_lossy(&data).into_owned());
            }
        }
        events.concat()
    });
    let mut ws = edge.client.websocket("/ws").await;
    assert_eq!(echo(&mut ws, "hello").await, "a: hello");
    tokio::time::sleep(Duration::from_secs(66)).await;
    assert_eq!(echo(&mut ws, "still there").await, "a: still there");
    assert_eq!(sse.await.unwrap(), "data: a 0\n\n");
}

#[tokio::test]
async fn events_are_flushed_one_by_one_and_a_site_idle_timeout_cuts_quiet_websockets() {
    let backend = Backend::start("a");
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{}\"]\n\n[[site]]\ndomains = [\"quiet.{NAME}\"]\nupstreams = [\"{}\"]\nidle_timeout = 1\n",
        backend.addr, backend.addr
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let tls = edge.client.connect().await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/sse?n=3&gap_ms=400")
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let mut body = send.send_request(request).await.unwrap().into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_data() {
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(arrivals.len(), 3, "{arrivals:?}");
    // Each event came on its own, about 400 ms after the one before.
    assert!(arrivals[0] < Duration::from_millis(700), "{arrivals:?}");
    assert!(
        arrivals[1] - arrivals[0] > Duration::from_millis(250),
        "{arrivals:?}"
    );

    // The quiet site's WebSocket: cut after a second of silence.
    let tls = edge.client.connect().await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://quiet.{NAME}/ws"), tls)
        .await
        .unwrap();
    assert_eq!(echo(&mut ws, "hi").await, "a: hi");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a quiet WebSocket outlived its site's idle timeout"
    );
    // The other site's (default one hour) WebSocket stays through the same silence.
    let mut ws = edge.client.websocket("/ws").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(echo(&mut ws, "still").await, "a: still");
}

#[tokio::test]
async fn slowloris_clients_are_cut_at_the_default_header_timeout() {
    let backend = Backend::start("a");
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let mut slow = Vec::new();
    for _ in 0..5 {
        let mut tls = edge.client.connect().await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: edge.example.com\r\n")
            .await
            .unwrap();
        slow.push(tls);
    }
    let started = Instant::now();
    let mut cut = 0;
    for mut tls in slow {
        // A header line every two seconds, never the end of the head.
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    read = tls.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => return,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {
                        if tls.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        assert!(outcome.is_ok(), "a slowloris connection stayed open");
        cut += 1;
    }
    assert_eq!(cut, 5);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(8) && elapsed < Duration::from_secs(16),
        "{elapsed:?}"
    );
    // Meanwhile a normal client is served.
    assert_eq!(served_by(&edge.client.get("/whoami", &[]).await), "a");
}

#[tokio::test]
async fn connection_and_rate_limits_refuse_the_excess() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--max-conns-per-ip",
            "3",
            "--rate-limit",
            "5",
        ],
        None,
    )
    .await;
    // The readiness probe's connection may still count for a moment after it closed.
    let deadline = Instant::now() + STEP;
    let held = loop {
        let held: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| edge.client.connect())).await;
        if held.iter().all(Result::is_ok) {
            break held;
        }
        drop(held);
        assert!(
            Instant::now() < deadline,
            "three connections from one address were refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        edge.client.connect().await.is_err(),
        "a fourth connection from one address was accepted"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..15 {
        let answer = edge.client.get("/whoami", &[]).await;
        match answer.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(answer.headers.contains_key("retry-after"), "{answer:?}");
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(ok >= 5 && limited >= 5, "ok {ok}, limited {limited}");
}

#[tokio::test]
async fn sighup_reloads_sites_while_a_websocket_stays_open_and_a_broken_file_is_refused() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let site = |addr: &str| format!("[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{addr}\"]\n");
    let mut edge = Edge::start(&[], Some(&site(&old.addr))).await;
    let mut ws = edge.client.websocket("/ws").await;
    assert_eq!(echo(&mut ws, "one").await, "old: one");
    assert_eq!(served_by(&edge.client.get("/whoami", &[]).await), "old");

    std::fs::write(edge.config_path(), site(&new.addr)).unwrap();
    edge.signal("-HUP");
    let deadline = Instant::now() + STEP;
    while served_by(&edge.client.get("/whoami", &[]).await) != "new" {
        assert!(Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The WebSocket opened before the reload is still up, on its old upstream.
    assert_eq!(echo(&mut ws, "two").await, "old: two");

    std::fs::write(edge.config_path(), "[[site]]\nupstreams = 42\n").unwrap();
    edge.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_by(&edge.client.get("/whoami", &[]).await), "new");
    assert_eq!(echo(&mut ws, "three").await, "old: three");

    // The refusal is one line in the log.
    edge.signal("-TERM");
    drop(ws);
    let output = std::mem::replace(&mut edge.child, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("configuration refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains("edge.toml"), "{log}");
}

#[tokio::test]
async fn metrics_count_requests_by_site_and_class_and_upstream_state() {
    let backend = Backend::start("a");
    let metrics = format!("127.0.0.1:{}", lobe_tls_tests::free_port());
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--metrics-listen", &metrics],
        None,
    )
    .await;
    assert_eq!(
        edge.client.get("/status/503", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(edge.client.get("/whoami", &[]).await.status, StatusCode::OK);
    let (status, scraped) = plain_get(&metrics, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "lobe_tls_edge_requests_total{site=\"default\",class=\"2xx\"} 1",
        "lobe_tls_edge_requests_total{site=\"default\",class=\"5xx\"} 1",
        &format!(
            "lobe_tls_edge_upstream_up{{site=\"default\",upstream=\"{}\"}} 1",
            backend.addr
        ),
        "lobe_tls_edge_request_duration_seconds_count{site=\"default\"} 2",
        "lobe_tls_certificate_expiry_timestamp_seconds{name=\"site\",source=\"dir\"}",
    ] {
        assert!(
            scraped.contains(expected),
            "{expected} missing from:\n{scraped}"
        );
    }
}

#[tokio::test]
async fn websockets_over_h2_extended_connect_reach_an_http1_upstream() {
    let backend = Backend::start("a");
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let tcp = TcpStream::connect(&edge.listen).await.unwrap();
    let tls = edge
        .client
        .h2
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut request = Request::connect(format!("https://{NAME}/ws"))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = tokio::time::timeout(STEP, send.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    ws.send("over h2".into()).await.unwrap();
    let message = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(message.into_text().unwrap().as_str(), "a: over h2");
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_and_others_pass() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--max-body-size", "1000"],
        None,
    )
    .await;
    for (size, expected) in [
        (500usize, StatusCode::OK),
        (2000, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let tls = edge.client.connect().await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post("/upload")
            .header("host", NAME)
            .body(http_body_util::Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), expected);
        if expected == StatusCode::OK {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"500\n");
        }
    }
}

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish_then_exits() {
    let backend = Backend::start("a");
    let mut edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let tls = edge.client.connect().await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/sse?n=3&gap_ms=700")
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = send.send_request(request).await.unwrap().into_body();
    edge.signal("-TERM");
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(&edge.listen).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut events = 0;
    while let Some(frame) = tokio::time::timeout(STEP, body.frame()).await.unwrap() {
        if frame.unwrap().is_data() {
            events += 1;
        }
    }
    assert_eq!(events, 3, "the stream was cut by the shutdown");
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = edge.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}
