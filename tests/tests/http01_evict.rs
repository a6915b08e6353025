//! Port 80 with its total cap full: a new connection takes the place of a waiting one,
//! never of one with a request in flight. The requests are held in flight by a real
//! redis-server, paused while the listener looks their token up in it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::challenge::http01::Http01ListenerConfig;
use lobe_tls::store::DynStore;
use lobe_tls::{Http01Listener, Http01Registry, RedisStore};
use lobe_tls_tests::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long Redis answers nothing; below the store's 2 s response timeout, so the
/// lookups held by it succeed in the end.
const PAUSE: Duration = Duration::from_millis(1500);

async fn redis_store(server: &RedisServer) -> DynStore {
    Arc::new(RedisStore::connect(&server.url()).await.unwrap())
}

/// Stops Redis from running any client's command for `PAUSE`.
async fn pause(server: &RedisServer) {
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let millis = u64::try_from(PAUSE.as_millis()).unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(millis)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Polls `done` every 10 ms, failing after 5 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection to `addr` from the loopback address 127.0.0.`last`.
async fn connect_from(last: u8, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0)))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

async fn send_get(stream: &mut TcpStream, token: &str) {
    let req =
        format!("GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
}

/// Everything the server sends until it closes or stays silent for `quiet`, and whether
/// it closed.
async fn read_for(stream: &mut TcpStream, quiet: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_a_request_in_flight_keep_their_place_when_the_total_is_full() {
    let server = RedisServer::start();
    let publishing = Http01Registry::with_shared_store(redis_store(&server).await).unwrap();
    let answering = Http01Registry::with_shared_store(redis_store(&server).await).unwrap();
    publishing.insert("tok", "tok.thumb").await.unwrap();
    let mut config = Http01ListenerConfig::default();
    config.max_conns = Some(2);
    let listener = Http01Listener::bind_with(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        answering.service(),
        config,
    )
    .await
    .unwrap();
    let addr = listener.local_addr();
    let metrics = listener.metrics();
    // The token published elsewhere is known here, so asking for it goes to Redis.
    until("the token view in step", || answering.shared_view_in_step()).await;

    pause(&server).await;
    let paused = Instant::now();
    let mut busy = connect_from(11, addr).await;
    send_get(&mut busy, "tok").await;
    until("the first lookup", || answering.shared_lookups() == 1).await;
    let mut idle = connect_from(12, addr).await;
    until("two connections open", || metrics.connections.get() == 2).await;

    // The total is full: the newcomer takes the waiting connection's place, not the
    // place of the one whose request is in flight.
    let mut busy_too = connect_from(13, addr).await;
    let (sent, closed) = read_for(&mut idle, Duration::from_secs(1)).await;
    assert!(
        closed && sent.is_empty(),
        "the waiting connection kept its place"
    );
    assert_eq!(metrics.evicted.get(), 1);
    send_get(&mut busy_too, "tok").await;
    until("the second lookup", || answering.shared_lookups() == 2).await;

    // Every place holds a request in flight: a newcomer is refused.
    let mut refused = connect_from(14, addr).await;
    let (sent, closed) = read_for(&mut refused, Duration::from_secs(1)).await;
    assert!(closed && sent.is_empty(), "a newcomer got in");
    assert_eq!(metrics.evicted.get(), 1);
    assert_eq!(metrics.rejected("max_conns"), 1);
    assert!(
        paused.elapsed() < PAUSE,
        "too slow: the requests may not have been in flight throughout"
    );

    // Both requests in flight are answered once Redis is back.
    for stream in [&mut busy, &mut busy_too] {
        let mut rsp = String::new();
        let mut buf = [0u8; 1024];
        while !rsp.ends_with("tok.thumb") {
            let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf));
            match read.await {
                Ok(Ok(n)) if n > 0 => rsp.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            }
        }
        assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
        assert!(rsp.ends_with("tok.thumb"), "{rsp}");
    }
}
