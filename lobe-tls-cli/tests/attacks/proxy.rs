//! PROXY headers from a peer that is not a trusted balancer: with
//! `--accept-proxy-protocol`, a client that reaches the port directly must not choose the
//! address `serve` believes. Its connection is refused before TLS, counted, and the
//! address it claimed shows up nowhere: not in the logs, not in the headers the upstream
//! sees, not in the metrics.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lobe_tls_tests::http_server::HttpServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::spray::{proxied_gets, proxy_v2, resuming_connector};
use crate::support::*;

/// The peer the attack comes from: loopback, but outside `--trusted-proxy`.
const UNTRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const SPOOFED_V4: &str = "203.0.113.66";
const SPOOFED_V6: &str = "2001:db8:dead::66";
/// Attempts of each kind.
const ATTEMPTS: usize = 5;

async fn from_untrusted(target: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(UNTRUSTED, 0)).unwrap();
    socket.connect(target).await.unwrap()
}

/// A ClientHello for NAME, as bytes on the wire.
fn client_hello(ca_pem: &str) -> Vec<u8> {
    let config = lobe_tls_tests::tls::client_config(ca_pem);
    let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// What the server sent before it closed, within `limit`: `Err` if it kept the
/// connection open that long.
async fn bytes_until_closed(tcp: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Err(got),
        }
    }
}

/// A GET of `path` on a plain listener (the metrics).
async fn plain_get(addr: &str, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    response
}

fn rejected_proxy_protocol(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("lobe_tls_edge_rejected_connections_total")
                && l.contains("reason=\"proxy_protocol\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_from_an_untrusted_peer_is_refused_before_tls_and_its_address_is_nowhere() {
    // An upstream that keeps every header it is sent.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let upstream = HttpServer::start(move |req| {
        let mut text = format!("{} {}\n", req.method, req.path_and_query);
        for (k, v) in &req.headers {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        record.lock().unwrap().push(text);
        async move { http::Response::new("seen\n".to_owned()) }
    })
    .await;
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let serve = Serve::start_with(Options {
        upstream: Some(upstream.addr.to_string()),
        wait_handshake: false,
        // Debug logs: the most a log could reveal.
        env: vec![("LOBE_TLS_LOG".into(), "debug".into())],
        ..Options::args(&[
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--metrics-listen",
            &metrics,
        ])
    })
    .await;

    // The balancer (trusted) is believed: the upstream learns the client it names, so the
    // checks below would see an address that got through.
    let connector = resuming_connector(&serve.ca_pem);
    let named: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    let deadline = Instant::now() + STEP;
    let statuses = loop {
        match proxied_gets(serve.listen, &connector, named, "/trusted", 1).await {
            Ok((statuses, _)) => break statuses,
            Err(e) => assert!(Instant::now() < deadline, "trusted balancer: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(statuses, [200]);
    let trusted_seen = seen.lock().unwrap().join("\n");
    assert!(trusted_seen.contains("192.0.2.10"), "{trusted_seen}");

    let hello = client_hello(&serve.ca_pem);
    let spoofed_v4: SocketAddr = format!("{SPOOFED_V4}:4444").parse().unwrap();
    let spoofed_v6: SocketAddr = format!("[{SPOOFED_V6}]:4444").parse().unwrap();
    let headers = [
        format!("PROXY TCP4 {SPOOFED_V4} 127.0.0.1 4444 443\r\n").into_bytes(),
        proxy_v2(spoofed_v4, serve.listen),
        proxy_v2(spoofed_v6, serve.listen),
    ];
    let mut refused = 0;
    for _ in 0..ATTEMPTS {
        for header in &headers {
            // A header, then a ClientHello: not one TLS byte comes back.
            let mut tcp = from_untrusted(serve.listen).await;
            let _ = tcp.write_all(header).await;
            let _ = tcp.write_all(&hello).await;
            match bytes_until_closed(&mut tcp, STEP).await {
                Ok(got) => assert!(
                    got.is_empty(),
                    "an untrusted peer's PROXY header led to {} bytes of TLS ({:02x?})",
                    got.len(),
                    &got[..got.len().min(8)]
                ),
                Err(got) => panic!(
                    "an untrusted peer's connection stayed open {STEP:?} ({} bytes sent to it)",
                    got.len()
                ),
            }
            refused += 1;
        }
        // Refused before anything is read: a silent untrusted peer is let go at once,
        // not after the PROXY header's time limit.
        let mut idle = from_untrusted(serve.listen).await;
        let started = Instant::now();
        let closed = bytes_until_closed(&mut idle, Duration::from_secs(2)).await;
        assert_eq!(
            closed,
            Ok(Vec::new()),
            "a silent untrusted peer was kept {:?}",
            started.elapsed()
        );
        refused += 1;
    }

    // The trusted balancer still works after the attempts.
    let (statuses, _) = proxied_gets(serve.listen, &connector, named, "/again", 1)
        .await
        .unwrap();
    assert_eq!(statuses, [200]);

    let text = plain_get(&metrics, "/metrics").await;
    let counted = rejected_proxy_protocol(&text);
    let upstream_saw = seen.lock().unwrap().join("\n");
    let log = serve.log();
    for spoofed in [SPOOFED_V4, SPOOFED_V6] {
        assert!(!log.contains(spoofed), "{spoofed} in serve's log:\n{log}");
        assert!(
            !upstream_saw.contains(spoofed),
            "{spoofed} reached the upstream:\n{upstream_saw}"
        );
        assert!(!text.contains(spoofed), "{spoofed} in the metrics");
    }
    assert!(
        counted >= refused as f64,
        "{refused} refusals, {counted} counted under reason=\"proxy_protocol\": {}",
        text.lines()
            .filter(|l| l.contains("rejected"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "PROXY from an untrusted peer: {refused} connections refused before TLS, \
         {counted} counted as proxy_protocol; the spoofed addresses in no log line, header or metric"
    );
}
