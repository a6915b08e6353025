//! Connection caps through the real binary: upgraded connections keep their places, and
//! behind a PROXY header the per-address cap counts the client the header names.
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// Retries `connect` until it succeeds: the readiness probe's connection, or one just
/// closed, may still count for a moment.
async fn eventually<T, F: std::future::Future<Output = std::io::Result<T>>>(
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

#[tokio::test]
async fn open_websockets_keep_their_places_under_the_per_address_cap() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--max-conns-per-ip", "2"],
        None,
    )
    .await;
    let mut first = eventually("first WebSocket", || edge.client.try_websocket("/ws")).await;
    let mut second = eventually("second WebSocket", || edge.client.try_websocket("/ws")).await;
    assert_eq!(echo(&mut first, "one").await, "a: one");
    assert_eq!(echo(&mut second, "two").await, "a: two");
    // Both upgraded connections still count: a third from the same address is refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        edge.client.connect().await.is_err(),
        "a third connection was accepted beside two open WebSockets"
    );
    // Closing one gives its place back.
    first.close(None).await.unwrap();
    drop(first);
    let _third = eventually("a connection after a WebSocket closed", || {
        edge.client.connect()
    })
    .await;
    assert_eq!(echo(&mut second, "still").await, "a: still");
}

/// A TLS connection that starts with a PROXY v1 header naming `client`.
async fn through_proxy(
    edge: &Edge,
    client: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(&edge.listen).await?;
    let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n");
    tcp.write_all(header.as_bytes()).await?;
    edge.client
        .tls
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
}

#[tokio::test]
async fn behind_a_proxy_header_the_per_address_cap_counts_the_named_client() {
    let backend = Backend::start("a");
    let edge = Edge::start_with(
        &[
            "--upstream",
            &backend.addr,
            "--accept-proxy-protocol",
            "--max-conns-per-ip",
            "1",
        ],
        None,
        false,
    )
    .await;
    // All from 127.0.0.1: the balancer's address is not what is capped.
    let _first = eventually("a first client behind the balancer", || {
        through_proxy(&edge, "192.0.2.1")
    })
    .await;
    let _other = through_proxy(&edge, "192.0.2.2").await.unwrap();
    assert!(
        through_proxy(&edge, "192.0.2.1").await.is_err(),
        "a second connection of one client behind the balancer was accepted"
    );
}
