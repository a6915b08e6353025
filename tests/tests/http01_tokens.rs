//! HTTP-01 tokens shared through a real redis-server: a flood of random tokens on port 80
//! costs no store round trip, while a token another instance published is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lobe_tls::store::DynStore;
use lobe_tls::{Http01Listener, Http01Registry, RedisStore};
use lobe_tls_tests::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How many GET commands the server has run (`INFO commandstats`).
async fn redis_gets(server: &RedisServer) -> u64 {
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// A keep-alive HTTP/1.1 client of the port-80 listener.
struct Client(BufReader<TcpStream>);

impl Client {
    async fn connect(listener: &Http01Listener) -> Client {
        Client(BufReader::new(
            TcpStream::connect(listener.local_addr()).await.unwrap(),
        ))
    }

    /// The status and body of a GET of the challenge path of `token`.
    async fn get(&mut self, token: &str) -> (u16, String) {
        let req = format!(
            "GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
        );
        self.0.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).await.unwrap();
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0;
        loop {
            line.clear();
            self.0.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// `count` GETs of random tokens over 50 keep-alive connections (each unknown token waits
/// out the announcement grace, so they go in parallel); all must be 404.
async fn flood(listener: &Http01Listener, count: usize) {
    const CONNECTIONS: usize = 50;
    let mut clients = Vec::new();
    for part in 0..CONNECTIONS {
        let mut client = Client::connect(listener).await;
        clients.push(tokio::spawn(async move {
            for i in 0..count / CONNECTIONS {
                let token = format!("random-{part}-{i}-{:016x}", rand::random::<u64>());
                assert_eq!(client.get(&token).await.0, 404, "{token}");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}

async fn in_step(registry: &Http01Registry, within: Duration) {
    let deadline = Instant::now() + within;
    while !registry.shared_view_in_step() {
        assert!(
            Instant::now() < deadline,
            "the token view never came in step"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn redis_store(server: &RedisServer) -> DynStore {
    Arc::new(RedisStore::connect(&server.url()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_make_no_store_round_trips_while_published_ones_are_answered() {
    let server = RedisServer::start();
    let publishing = Http01Registry::with_shared_store(redis_store(&server).await).unwrap();
    let answering = Http01Registry::with_shared_store(redis_store(&server).await).unwrap();
    // A token published before the answering instance started listening.
    publishing.insert("early", "early.thumb").await.unwrap();
    let listener = Http01Listener::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        answering.service(),
    )
    .await
    .unwrap();
    in_step(&answering, Duration::from_secs(5)).await;

    let before = redis_gets(&server).await;
    let started = Instant::now();
    flood(&listener, 10_000).await;
    let flooded = started.elapsed();
    assert_eq!(
        redis_gets(&server).await - before,
        0,
        "unknown tokens reached the store"
    );
    assert_eq!(answering.shared_lookups(), 0);
    eprintln!("10,000 random-token GETs in {flooded:?}, 0 store lookups");

    // Tokens the store announced are still answered: the one from before the listener,
    // and one published now by another instance (within the feed's latency).
    let mut client = Client::connect(&listener).await;
    assert_eq!(client.get("early").await, (200, "early.thumb".to_owned()));
    let published = Instant::now();
    publishing.insert("tok_1", "tok_1.thumb").await.unwrap();
    loop {
        match client.get("tok_1").await {
            (200, body) => {
                assert_eq!(body, "tok_1.thumb");
                break;
            }
            (status, _) => {
                assert_eq!(status, 404);
                assert!(
                    published.elapsed() < Duration::from_secs(1),
                    "a published token was not answered within a second"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    eprintln!("published token answered after {:?}", published.elapsed());
    assert!(
        redis_gets(&server).await - before >= 2,
        "known tokens are read from the store"
    );

    // A removed token is forgotten, and asked for no more.
    publishing.remove("tok_1").await.unwrap();
    let removed = Instant::now();
    while client.get("tok_1").await.0 != 404 {
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "a removed token was still answered after a second"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gets = redis_gets(&server).await;
    assert_eq!(client.get("tok_1").await.0, 404);
    assert_eq!(redis_gets(&server).await, gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_feed_is_down_unknown_tokens_are_looked_up_at_a_bounded_rate() {
    let mut server = RedisServer::start();
    let answering = Http01Registry::with_shared_store(redis_store(&server).await).unwrap();
    let listener = Http01Listener::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        answering.service(),
    )
    .await
    .unwrap();
    in_step(&answering, Duration::from_secs(5)).await;

    server.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while answering.shared_view_in_step() {
        assert!(Instant::now() < deadline, "the lost feed went unnoticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    flood(&listener, 400).await;
    let seconds = started.elapsed().as_secs_f64();
    let lookups = answering.shared_lookups();
    eprintln!("400 random-token GETs in {seconds:.1} s with the feed down: {lookups} lookups");
    // A burst of 10, then 10 a second.
    assert!(
        (lookups as f64) <= 10.0 + 10.0 * seconds + 1.0,
        "{lookups} lookups in {seconds} s"
    );

    // Back in step once Redis is: no lookups again.
    server.restart();
    in_step(&answering, Duration::from_secs(15)).await;
    let lookups = answering.shared_lookups();
    let before = redis_gets(&server).await;
    flood(&listener, 400).await;
    assert_eq!(answering.shared_lookups(), lookups);
    assert_eq!(redis_gets(&server).await, before);
}
