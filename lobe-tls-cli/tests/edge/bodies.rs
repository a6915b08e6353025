//! Request bodies from clients that misbehave: one that trickles its body is cut, and
//! one that breaks its body off costs the upstream nothing.

use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::{Backend, Edge, NAME, STEP, plain_get};

/// Starts an upload of `length` bytes on a new connection, sends `sent` of them.
async fn start_upload(
    edge: &Edge,
    length: usize,
    sent: usize,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = edge.client.connect().await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&vec![b'x'; sent]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_off_its_body_does_not_take_the_upstream_out() {
    let backend = Backend::start("a");
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let uploads_at_backend = |n: &'static str| {
        let addr = backend.addr.clone();
        move || {
            let addr = addr.clone();
            async move { plain_get(&addr, "/upload/in-flight").await.1.trim() == n }
        }
    };
    // More aborted uploads than the failures that take an upstream out (3).
    for _ in 0..5 {
        let tls = start_upload(&edge, 1_000_000, 100_000).await;
        // Broken off once the edge streams the body to the upstream.
        lobe_tls_tests::wait_until(STEP, "the upload at the backend", uploads_at_backend("1"))
            .await;
        drop(tls);
        lobe_tls_tests::wait_until(
            STEP,
            "the upload cut at the backend",
            uploads_at_backend("0"),
        )
        .await;
    }
    let answer = edge.client.get("/whoami", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_answered_408_and_its_connection_closed() {
    let backend = Backend::start("a");
    // A 1 s grace period; the default (10 s) is the attack suite's.
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--header-read-timeout", "1"],
        None,
    )
    .await;
    let started = Instant::now();
    let tls = start_upload(&edge, 1_000_000, 10).await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    // One byte every 100 ms (10 bytes a second, far below the floor of 500) until the
    // edge has answered and closed.
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b"x").await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let mut answer = Vec::new();
    tokio::select! {
        _ = trickle => {}
        read = tokio::time::timeout(STEP, reader.read_to_end(&mut answer)) => {
            read.unwrap().unwrap();
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(8));
    // A body that keeps the pace is still whole.
    let mut tls = start_upload(&edge, 20_000, 20_000).await;
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.trim_end().ends_with("20000"), "{answer}");
}
