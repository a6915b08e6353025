//! The edge in tcp mode (a plain TLS terminator, `EdgeConfig::tcp`) with a real TLS
//! client in front and a plain TCP upstream behind.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::edge::{Edge, EdgeConfig};
use lobe_tls::metrics::CertExpiry;
use lobe_tls::{CertBundle, CertResolver, KeyType, Metrics, MetricsListener};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const NAME: &str = "app.example.com";
const STEP: Duration = Duration::from_secs(5);

/// A CA and a leaf for `NAME` signed by it, loaded into a resolver.
struct Pki {
    resolver: CertResolver,
    connector: TlsConnector,
    /// The same client, offering ALPN `http/1.1` as browsers do.
    http11: TlsConnector,
}

fn pki() -> Pki {
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = KeyType::EcdsaP256.generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![NAME.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let bundle = CertBundle::from_pem(leaf.pem(), leaf_key.serialize_pem()).unwrap();
    let resolver = CertResolver::new();
    resolver.set(&[NAME], bundle.certified_key().unwrap());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http11 = config.clone();
    http11.alpn_protocols = vec![b"http/1.1".to_vec()];
    Pki {
        resolver,
        connector: TlsConnector::from(Arc::new(config)),
        http11: TlsConnector::from(Arc::new(http11)),
    }
}

/// A running terminator in front of `upstream`; stops when `stop` is sent or dropped.
struct Running {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn terminator(
    pki: &Pki,
    upstream: SocketAddr,
    tweak: impl FnOnce(&mut EdgeConfig),
) -> Running {
    let mut config = EdgeConfig::tcp(upstream.to_string());
    tweak(&mut config);
    let metrics = Metrics::new();
    let terminator = Edge::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(pki.resolver.clone()),
        config,
        metrics.clone(),
    )
    .await
    .unwrap();
    let addr = terminator.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(terminator.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        metrics,
        stop: Some(stop),
        done,
    }
}

async fn connect(pki: &Pki, addr: SocketAddr, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    pki.connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

/// Reads one `\n`-terminated line within `STEP`.
async fn line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> String {
    let mut line = String::new();
    tokio::time::timeout(STEP, reader.read_line(&mut line))
        .await
        .expect("a line should arrive without waiting for more data")
        .unwrap();
    line
}

/// Reads an HTTP request head (up to the blank line).
async fn request_head<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> String {
    let mut head = String::new();
    loop {
        let l = line(reader).await;
        if l == "\r\n" || l.is_empty() {
            return head;
        }
        head.push_str(&l);
    }
}

#[tokio::test]
async fn websocket_upgrade_streams_messages_both_ways_as_they_are_written() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = upstream.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let head = request_head(&mut stream).await;
        assert!(head.contains("Upgrade: websocket"), "{head}");
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        // Answer each message before the next one is sent: only works if nothing is held back.
        for i in 0..20 {
            assert_eq!(line(&mut stream).await, format!("ping {i}\n"));
            stream
                .get_mut()
                .write_all(format!("pong {i}\n").as_bytes())
                .await
                .unwrap();
        }
        // A server-initiated push with no request in flight.
        stream.get_mut().write_all(b"push\n").await.unwrap();
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;

    let tls = connect(&pki, running.addr, NAME).await.unwrap();
    let mut client = BufReader::new(tls);
    client
        .get_mut()
        .write_all(b"GET /chat HTTP/1.1\r\nHost: app.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        line(&mut client).await,
        "HTTP/1.1 101 Switching Protocols\r\n"
    );
    let _ = request_head(&mut client).await;
    for i in 0..20 {
        client
            .get_mut()
            .write_all(format!("ping {i}\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(line(&mut client).await, format!("pong {i}\n"));
    }
    assert_eq!(line(&mut client).await, "push\n");
    server.await.unwrap();
    assert_eq!(running.metrics.handshakes(), (1, 0));
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_before_the_response_ends() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    // The upstream sends event N+1 only once the client has reported event N.
    let (got_tx, mut got_rx) = mpsc::channel::<usize>(1);
    let server = tokio::spawn(async move {
        let (stream, _) = upstream.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let _ = request_head(&mut stream).await;
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
            .await
            .unwrap();
        for i in 0..5 {
            stream
                .get_mut()
                .write_all(format!("id: {i}\ndata: event {i}\n\n").as_bytes())
                .await
                .unwrap();
            let seen = tokio::time::timeout(STEP, got_rx.recv())
                .await
                .expect("the client never saw the event: the terminator is holding it back");
            assert_eq!(seen, Some(i));
        }
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;

    let tls = connect(&pki, running.addr, NAME).await.unwrap();
    let mut client = BufReader::new(tls);
    client
        .get_mut()
        .write_all(
            b"GET /events HTTP/1.1\r\nHost: app.example.com\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
    let head = request_head(&mut client).await;
    assert!(head.contains("text/event-stream"), "{head}");
    for i in 0..5 {
        assert_eq!(line(&mut client).await, format!("id: {i}\n"));
        assert_eq!(line(&mut client).await, format!("data: event {i}\n"));
        assert_eq!(line(&mut client).await, "\n");
        got_tx.send(i).await.unwrap();
    }
    server.await.unwrap();
}

#[tokio::test]
async fn client_half_close_still_gets_the_whole_response() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = upstream.accept().await.unwrap();
        // Read the whole request: EOF means the client finished sending.
        let mut request = Vec::new();
        tokio::time::timeout(STEP, stream.read_to_end(&mut request))
            .await
            .expect("the client's half-close never reached the upstream")
            .unwrap();
        // Answer after the EOF, in pieces.
        for chunk in [
            &b"you sent "[..],
            format!("{} bytes", request.len()).as_bytes(),
        ] {
            stream.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.shutdown().await.unwrap();
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;

    let mut tls = connect(&pki, running.addr, NAME).await.unwrap();
    tls.write_all(&[b'x'; 100_000]).await.unwrap();
    tls.shutdown().await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, tls.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response, "you sent 100000 bytes");
    server.await.unwrap();
}

#[tokio::test]
async fn upstream_half_close_lets_the_client_keep_sending() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = upstream.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"bye\n").await.unwrap();
        write.shutdown().await.unwrap();
        let mut reader = BufReader::new(read);
        let mut rest = String::new();
        tokio::time::timeout(STEP, reader.read_to_string(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;

    let tls = connect(&pki, running.addr, NAME).await.unwrap();
    let mut client = BufReader::new(tls);
    let mut all = String::new();
    tokio::time::timeout(STEP, client.read_to_string(&mut all))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all, "bye\n", "the upstream's EOF reaches the client");
    client.get_mut().write_all(b"still here\n").await.unwrap();
    client.get_mut().shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), "still here\n");
}

#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let running = terminator(&pki, upstream_addr, |c| c.sites[0].idle_timeout = 0.4).await;

    // Busy: a byte every 100 ms for well over the idle timeout keeps it open.
    let mut busy = connect(&pki, running.addr, NAME).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        busy.write_all(b"x").await.unwrap();
        let mut echo = [0u8; 1];
        tokio::time::timeout(STEP, busy.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Idle: closed by the terminator soon after the timeout.
    let mut idle = connect(&pki, running.addr, NAME).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(STEP, idle.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection must be closed: {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "closed too early: {waited:?}"
    );
}

#[tokio::test]
async fn unknown_name_without_default_is_refused_and_counted() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = terminator(&pki, upstream.local_addr().unwrap(), |_| {}).await;
    let refused = connect(&pki, running.addr, "other.example.com").await;
    assert!(
        refused.is_err(),
        "no certificate for other.example.com and no default"
    );
    let ok = connect(&pki, running.addr, NAME).await;
    assert!(ok.is_ok());
    // The server side counts after its own handshake finishes.
    let deadline = Instant::now() + STEP;
    while running.metrics.handshakes() != (1, 1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running.metrics.handshakes(), (1, 1));
}

#[tokio::test]
async fn resumed_handshakes_are_counted_apart_from_full_ones() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            let _ = stream.write_all(b"hi\n").await;
        }
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;
    // The same client config twice: the second connection presents the ticket the first
    // one read along with its line.
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tls = connect(&pki, running.addr, NAME).await.unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        let mut client = BufReader::new(tls);
        assert_eq!(line(&mut client).await, "hi\n");
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
    assert_eq!(running.metrics.handshakes(), (2, 0));
    assert_eq!(running.metrics.resumed_handshakes(), 1);
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (_stream, _) = upstream.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let running = terminator(&pki, upstream_addr, |_| {}).await;
    running.metrics.add_cert_source(|| {
        vec![CertExpiry {
            name: NAME.into(),
            source: "dir",
            not_before: 1_890_000_000,
            not_after: 1_900_000_000,
            ari_window: None,
        }]
    });
    let listener = MetricsListener::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        running.metrics.clone(),
    )
    .await
    .unwrap();
    let _open = connect(&pki, running.addr, NAME).await.unwrap();
    let _ = connect(&pki, running.addr, "nope.example.com").await;
    let deadline = Instant::now() + STEP;
    while running.metrics.active_connections() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut http = TcpStream::connect(listener.local_addr()).await.unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, http.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("application/openmetrics-text; version=1.0.0"),
        "{response}"
    );
    for line in [
        "lobe_tls_certificate_expiry_timestamp_seconds{name=\"app.example.com\",source=\"dir\"} 1900000000",
        "lobe_tls_handshakes_total{result=\"ok\",resumed=\"false\"} 1",
        "lobe_tls_handshakes_total{result=\"failed\",resumed=\"false\"} 1",
        "lobe_tls_active_connections 1",
        "# TYPE lobe_tls_handshakes counter",
        "# EOF",
    ] {
        assert!(
            response.lines().any(|l| l == line),
            "missing {line:?} in\n{response}"
        );
    }
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_connections_finish() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut running = terminator(&pki, upstream_addr, |c| {
        c.drain_timeout = Duration::from_secs(2)
    })
    .await;
    let mut open = connect(&pki, running.addr, NAME).await.unwrap();
    open.write_all(b"a").await.unwrap();
    let mut echo = [0u8; 1];
    open.read_exact(&mut echo).await.unwrap();

    running.stop.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(running.addr).await.is_err(),
        "no new connections after shutdown"
    );
    // The open connection still works while draining...
    open.write_all(b"b").await.unwrap();
    open.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"b");
    assert!(!running.done.is_finished());
    // ...and run() returns once it closes.
    open.shutdown().await.unwrap();
    tokio::time::timeout(STEP, &mut running.done)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn drain_is_bounded_for_connections_that_never_finish() {
    let pki = pki();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (_stream, _) = upstream.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let mut running = terminator(&pki, upstream_addr, |c| {
        c.drain_timeout = Duration::from_millis(300)
    })
    .await;
    let mut open = connect(&pki, running.addr, NAME).await.unwrap();
    let deadline = Instant::now() + STEP;
    while running.metrics.active_connections() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    running.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(STEP, &mut running.done)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(STEP, open.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the cut connection is closed: {read:?}"
    );
    assert_eq!(running.metrics.active_connections(), 0);
}

#[tokio::test]
async fn busy_port_is_one_clear_error() {
    let pki = pki();
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Edge::bind(
        addr,
        Arc::new(pki.resolver.clone()),
        EdgeConfig::tcp("127.0.0.1:1"),
        Metrics::new(),
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("cannot listen on {addr}")),
        "{message}"
    );
    assert!(!message.contains('\n'));
}

#[tokio::test]
async fn an_unreachable_upstream_gives_http_clients_a_502_and_is_counted() {
    let pki = pki();
    // A port that refuses connections: bound, then closed.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = closed.local_addr().unwrap();
    drop(closed);
    let running = terminator(&pki, upstream, |_| {}).await;

    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let mut tls = pki
        .http11
        .connect(ServerName::try_from(NAME.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: app.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(STEP, tls.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(
        response.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{response}"
    );
    assert!(
        response.ends_with("cannot reach the upstream server\n"),
        "{response}"
    );

    // A client that named no HTTP protocol gets no HTTP bytes, only a clean close.
    let mut plain = connect(&pki, running.addr, NAME).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(STEP, plain.read_to_end(&mut bytes))
        .await
        .unwrap()
        .unwrap();
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));

    assert_eq!(running.metrics.upstream_errors(), 2);
    assert!(
        running
            .metrics
            .render()
            .contains("lobe_tls_upstream_errors_total 2\n")
    );
    assert_eq!(running.metrics.active_connections(), 0);
}
