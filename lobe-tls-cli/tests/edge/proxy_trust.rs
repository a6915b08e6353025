//! PROXY headers through the real binary: believed only from `--trusted-proxy` peers,
//! read however the balancer's packets split them, and refused at start without a
//! trusted network.
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The address a client behind the balancer has; nobody but a trusted peer may say so.
const NAMED: &str = "203.0.113.77";

/// A PROXY v2 header naming `client` as the source.
fn v2_header(client: &str) -> Vec<u8> {
    let source: SocketAddr = format!("{client}:40000").parse().unwrap();
    let destination: SocketAddr = "127.0.0.1:443".parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

/// Keeps reading the child's stderr (so a chatty log never fills the pipe); the text,
/// once the child is gone.
fn collect_stderr(edge: &mut Edge) -> std::thread::JoinHandle<String> {
    let mut stderr = edge.child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

/// Scrapes `metrics` until the connections refused for the PROXY protocol number `n`;
/// the scrape.
async fn refused_reach(metrics: &str, n: u64) -> String {
    let series = r#"edge_rejected_connections_total{reason="proxy_protocol"} "#;
    let (count, scraped) = scrape_until(metrics, series, |v| v >= n as f64).await;
    assert_eq!(
        count, n as f64,
        "refused connections: {count}, not {n}\n{scraped}"
    );
    scraped
}

#[tokio::test]
async fn a_proxy_header_from_an_untrusted_peer_is_refused_before_tls_and_counted() {
    let backend = Backend::start("a");
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let mut edge = Edge::start_with(
        &[
            "--upstream",
            &backend.addr,
            "--accept-proxy-protocol",
            // The balancers' network: not the loopback the test connects from.
            "--trusted-proxy",
            "192.0.2.0/24",
            "--metrics-listen",
            &metrics,
            "--log",
            "lobe_tls=debug",
        ],
        None,
        false,
    )
    .await;
    let log = collect_stderr(&mut edge);
    // The readiness probe was one refused connection already.
    refused_reach(&metrics, 1).await;

    for version in ["v1", "v2"] {
        let mut tcp = TcpStream::connect(&edge.listen).await.unwrap();
        let header = match version {
            "v1" => format!("PROXY TCP4 {NAMED} 127.0.0.1 40000 443\r\n").into_bytes(),
            _ => v2_header(NAMED),
        };
        // The header, then the start of a TLS ClientHello: no byte of TLS comes back.
        let _ = tcp.write_all(&header).await;
        let _ = tcp
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0])
            .await;
        let mut answer = Vec::new();
        // Closed at once (a reset, as the bytes sent were never read) with nothing sent.
        let closed = tokio::time::timeout(STEP, tcp.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "{version}: the connection was kept open");
        assert!(
            answer.is_empty(),
            "{version}: {} bytes came back",
            answer.len()
        );
    }
    // A plain TLS client from that peer is refused the same way.
    assert!(edge.client.connect().await.is_err());
    let scraped = refused_reach(&metrics, 4).await;
    assert!(!scraped.contains(NAMED), "{scraped}");
    // No request reached the backend; the log names the peer, never what it claimed.
    edge.signal("-TERM");
    let status = edge.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let log = log.join().unwrap();
    assert!(log.contains("connection refused before TLS"), "{log}");
    assert!(log.contains("not a trusted proxy"), "{log}");
    assert!(!log.contains(NAMED), "{log}");
}

#[tokio::test]
async fn a_trusted_balancer_may_split_its_header_over_several_packets() {
    let backend = Backend::start("a");
    let edge = Edge::behind_balancer(&backend, &[], None).await;
    let header = v2_header("198.51.100.9");
    let deadline = Instant::now() + STEP;
    let answer = loop {
        let mut tcp = TcpStream::connect(&edge.listen).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        // Part of the fixed 16 bytes, a pause, then the rest: the edge waits for it.
        tcp.write_all(&header[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tcp.write_all(&header[10..]).await.unwrap();
        let exchange = async {
            let tls = edge
                .client
                .tls
                .connect(ServerName::try_from(NAME).unwrap(), tcp)
                .await?;
            get_body(tls, "/headers").await
        };
        match tokio::time::timeout(STEP, exchange).await {
            Ok(Ok(body)) => break body,
            // The readiness probe's first connections may race the certificate's load.
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.contains("x-forwarded-for: 198.51.100.9\n"),
        "{answer}"
    );
}

#[test]
fn accept_proxy_protocol_without_a_trusted_proxy_is_refused_at_start_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(&dir.path().join("certs"));
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--no-http", "--listen", "127.0.0.1:0"])
        .arg("--cert-dir")
        .arg(dir.path().join("certs"))
        .args(["--upstream", "127.0.0.1:9", "--accept-proxy-protocol"])
        .env_remove("LOBE_TLS_STORE")
        .env_remove("LOBE_TLS_TRUSTED_PROXY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(started.elapsed() < STEP);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("lobe-tls: error: --accept-proxy-protocol believes PROXY headers only from --trusted-proxy peers"),
        "{stderr}"
    );
    assert!(stderr.contains("--trusted-proxy 10.0.0.0/8"), "{stderr}");
    assert!(
        stderr.contains("--trusted-proxy 0.0.0.0/0 --trusted-proxy ::/0"),
        "{stderr}"
    );
}
