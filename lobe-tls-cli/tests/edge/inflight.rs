//! The per-client cap on requests in flight through the real binary: over HTTP/1.1 and
//! h2 together, one request past the cap is refused at once and counted while another
//! address is served; open WebSockets keep their places; trusted proxies are not capped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// The upstream's delay for the requests that hold their places.
const SLOW_MS: u64 = 4000;

/// Waits until `backend` sleeps on `n` `/slow` requests: they hold their places.
async fn until_slow_in_flight(backend: &Backend, n: usize) {
    let what = format!("{n} slow requests at the backend");
    lobe_tls_tests::wait_until(STEP, &what, || async {
        plain_get(&backend.addr, "/slow/in-flight").await.1.trim() == n.to_string()
    })
    .await;
}

const FIRST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const SECOND: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TLS connection to the edge from `source`, offering `tls`'s ALPN.
async fn connect_from(
    edge: &Edge,
    tls: &TlsConnector,
    source: IpAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(edge.listen.parse().unwrap()).await?;
    tls.connect(ServerName::try_from(NAME).unwrap(), tcp).await
}

/// An answer's status, its Retry-After, its body, and how long it took.
type Timed = (StatusCode, Option<String>, String, Duration);

async fn read(
    started: Instant,
    response: hyper::Result<hyper::Response<hyper::body::Incoming>>,
) -> Timed {
    let response = response.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        status,
        retry_after,
        String::from_utf8_lossy(&body).into_owned(),
        started.elapsed(),
    )
}

/// GET `path` on a new HTTP/1.1 connection from `source`.
async fn h1_get(edge: &Edge, source: IpAddr, path: &str) -> Timed {
    let started = Instant::now();
    let tls = connect_from(edge, &edge.client.tls, source).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(STEP, send.send_request(request))
        .await
        .unwrap();
    read(started, response).await
}

/// An h2 connection from `source`.
async fn h2_from(
    edge: &Edge,
    source: IpAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = connect_from(edge, &edge.client.h2, source).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// GET `path` as one more stream of the h2 connection `send`.
async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Timed {
    let started = Instant::now();
    send.ready().await.unwrap();
    let request = Request::get(format!("https://{NAME}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(STEP, send.send_request(request))
        .await
        .unwrap();
    read(started, response).await
}

/// The value of the metric line that starts with `name` (0 when absent), once `wanted`
/// says it is the one awaited (scraped until then, for up to a step).
async fn metric_until(metrics: &str, name: &str, wanted: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + STEP;
    loop {
        let (_, text) = plain_get(metrics, "/metrics").await;
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or(0.0);
        if wanted(value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REFUSED: &str = "lobe_tls_edge_rejected_requests_total{reason=\"max_requests_per_ip\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifth_request_in_flight_from_one_address_is_refused_at_once_and_counted() {
    let backend = Backend::start("a");
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--max-requests-per-ip",
            "4",
            "--metrics-listen",
            &metrics,
        ],
        None,
    )
    .await;
    let slow = format!("/slow?ms={SLOW_MS}");
    // Four slow requests from one address: three h2 streams and one HTTP/1.1 request.
    let mut h2 = h2_from(&edge, FIRST).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (mut send, slow) = (h2.clone(), slow.clone());
        held.push(tokio::spawn(async move { h2_get(&mut send, &slow).await }));
    }
    let edge = std::sync::Arc::new(edge);
    let (e, s) = (edge.clone(), slow.clone());
    held.push(tokio::spawn(async move { h1_get(&e, FIRST, &s).await }));
    until_slow_in_flight(&backend, 4).await;

    // The fifth, on either protocol, is refused at once.
    let (status, retry_after, body, took) = h2_get(&mut h2, &slow).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(body.contains("in flight"), "{body}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    let (status, _, body, took) = h1_get(&edge, FIRST, "/page").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    // Another address is served meanwhile.
    let (status, _, body, _) = h1_get(&edge, SECOND, "/whoami").await;
    assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
    let mut other = h2_from(&edge, SECOND).await;
    let (status, _, body, _) = h2_get(&mut other, "/whoami").await;
    assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
    assert_eq!(metric_until(&metrics, REFUSED, |v| v >= 2.0).await, 2.0);

    // The four were not disturbed, and their places come back when they end.
    for request in held {
        let (status, _, body, took) = request.await.unwrap();
        assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
        assert!(took >= Duration::from_millis(SLOW_MS), "{took:?}");
    }
    let (status, _, body, _) = h2_get(&mut h2, "/whoami").await;
    assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
    // The refusals did not count against the upstream: it is still in rotation.
    let (_, text) = plain_get(&metrics, "/metrics").await;
    let up = text
        .lines()
        .find(|line| line.starts_with("lobe_tls_edge_upstream_up{"))
        .unwrap_or_default();
    assert!(up.ends_with(" 1"), "{up:?}");
}

#[tokio::test]
async fn an_open_websocket_keeps_its_place_until_it_closes() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--max-requests-per-ip", "1"],
        None,
    )
    .await;
    let mut ws = edge.client.websocket("/ws").await;
    assert_eq!(echo(&mut ws, "one").await, "a: one");
    let (status, _, body, _) = h1_get(&edge, FIRST, "/whoami").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = Instant::now() + STEP;
    loop {
        let (status, _, body, _) = h1_get(&edge, FIRST, "/whoami").await;
        if status == StatusCode::OK {
            assert_eq!(body.trim(), "a");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place never came back: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_are_not_capped_but_other_addresses_are() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--max-requests-per-ip",
            "1",
            "--trusted-proxy",
            "127.0.0.1/32",
        ],
        None,
    )
    .await;
    let slow = format!("/slow?ms={SLOW_MS}");
    let mut proxy = h2_from(&edge, FIRST).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (mut send, slow) = (proxy.clone(), slow.clone());
        held.push(tokio::spawn(async move { h2_get(&mut send, &slow).await }));
    }
    let mut client = h2_from(&edge, SECOND).await;
    let (mut send, s) = (client.clone(), slow.clone());
    let first = tokio::spawn(async move { h2_get(&mut send, &s).await });
    until_slow_in_flight(&backend, 4).await;
    // Beside three requests of the proxy's: one more of its own is served.
    let (status, _, body, _) = h2_get(&mut proxy, "/whoami").await;
    assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
    // An untrusted address is capped.
    let (status, _, body, _) = h2_get(&mut client, "/whoami").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    for request in held.into_iter().chain([first]) {
        let (status, _, body, _) = request.await.unwrap();
        assert_eq!((status, body.trim()), (StatusCode::OK, "a"));
    }
}

#[tokio::test]
async fn the_cap_is_on_by_default_and_documented() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    let flag = help
        .split("--max-requests-per-ip")
        .nth(1)
        .unwrap_or_else(|| panic!("no --max-requests-per-ip in: {help}"));
    let flag: String = flag
        .split_whitespace()
        .take(80)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(flag.contains("Default: 1024; 0: no cap"), "{flag}");
    assert!(flag.contains("LOBE_TLS_MAX_REQUESTS_PER_IP"), "{flag}");
}
