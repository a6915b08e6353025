//! `lobe-tls serve` as an edge for long-lived streams: server-sent events, WebSockets
//! (HTTP/1.1 and h2), silence, slow clients, reloads and shutdown with streams open.
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

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
    // And one that says nothing at all after its handshake.
    let mut silent = edge.client.connect().await.unwrap();
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
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a silent connection stayed open: {closed:?}"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(8) && elapsed < Duration::from_secs(16),
        "{elapsed:?}"
    );
    // Meanwhile a normal client is served.
    assert_eq!(served_by(&edge.client.get("/whoami", &[]).await), "a");
}

#[tokio::test]
async fn sighup_reloads_sites_while_a_websocket_stays_open_and_a_broken_file_is_refused() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let site = |addr: &str| format!("[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{addr}\"]\n");
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let mut edge = Edge::start(&["--metrics-listen", &metrics], Some(&site(&old.addr))).await;
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
    // The gauge lists the new upstream only.
    let scraped = plain_get(&metrics, "/metrics").await.1;
    let gauge =
        |addr: &str| format!("lobe_tls_edge_upstream_up{{site=\"{NAME}\",upstream=\"{addr}\"}}");
    assert!(
        scraped.contains(&format!("{} 1", gauge(&new.addr))),
        "{scraped}"
    );
    assert!(!scraped.contains(&gauge(&old.addr)), "{scraped}");

    std::fs::write(edge.config_path(), "[[site]]\nupstreams = 42\n").unwrap();
    edge.signal("-HUP");
    // Nothing observable marks a refused reload until the log is read at exit: give it
    // time to be tried, then check that nothing changed.
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
