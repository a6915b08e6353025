//! TLS 1.3 session resumption through the terminator: on one instance with rustls's own
//! ticketer, and across two instances whose ticket keys are shared through a real Redis
//! or one directory. Two instances that share nothing must not resume on each other, or
//! the other checks would prove nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use lobe_tls::edge::EdgeConfig;
use lobe_tls::store::DynStore;
use lobe_tls::tickets::{SharedTickets, TicketConfig};
use lobe_tls::{CertBundle, CertResolver, FileStore, Metrics, RedisStore, tls_config};
use lobe_tls_tests::http_server::HttpServer;
use lobe_tls_tests::tls::client_config;
use lobe_tls_tests::{RedisServer, make_listener_certs};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A terminator serving `localhost` in front of `upstream`; stops when dropped.
struct Edge {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn edge(
    resolver: &CertResolver,
    upstream: &HttpServer,
    tickets: Option<&SharedTickets>,
) -> Edge {
    let config = EdgeConfig::tcp(upstream.addr.to_string());
    let tls = tls_config::server_config(
        Arc::new(resolver.clone()),
        &config.alpn(),
        tickets.map(SharedTickets::ticketer),
    )
    .unwrap();
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let terminator = lobe_tls::edge::Edge::bind_tls(listen, Arc::new(tls), config, Metrics::new())
        .await
        .unwrap();
    let addr = terminator.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(terminator.run(async move {
        let _ = stopped.await;
    }));
    Edge { addr, _stop: stop }
}

/// One HTTPS request to `localhost` at `addr`, read to the end (which also takes in the
/// server's tickets); how the handshake went.
async fn request(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, stream)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.ends_with("hello"), "{response}");
    tls.get_ref().1.handshake_kind().unwrap()
}

struct Setup {
    resolver: CertResolver,
    upstream: HttpServer,
    client: Arc<rustls::ClientConfig>,
}

async fn setup() -> Setup {
    let (ca, leaf, key) = make_listener_certs();
    let resolver = CertResolver::new();
    let bundle = CertBundle::from_pem(leaf, key).unwrap();
    resolver.set(&["localhost"], bundle.certified_key().unwrap());
    let upstream = HttpServer::start(|_| async {
        http::Response::builder()
            .header("connection", "close")
            .body("hello".to_owned())
            .unwrap()
    })
    .await;
    let mut client = (*client_config(&ca)).clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Setup {
        resolver,
        upstream,
        client: Arc::new(client),
    }
}

/// A fresh client (empty session cache) with the same trust.
fn fresh(client: &Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    let mut config = (**client).clone();
    config.resumption = rustls::client::Resumption::default();
    Arc::new(config)
}

#[tokio::test]
async fn a_client_resumes_on_the_same_instance() {
    let s = setup().await;
    let single = edge(&s.resolver, &s.upstream, None).await;
    let client = fresh(&s.client);
    assert_eq!(request(single.addr, &client).await, HandshakeKind::Full);
    for _ in 0..3 {
        assert_eq!(request(single.addr, &client).await, HandshakeKind::Resumed);
    }
}

#[tokio::test]
async fn a_ticket_from_one_instance_resumes_on_another_sharing_redis_or_a_directory() {
    let s = setup().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let redis_a: DynStore = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let redis_b: DynStore = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let files: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    for (kind, store_a, store_b) in [
        ("redis", redis_a, redis_b),
        ("file", files.clone(), files.clone()),
    ] {
        let tickets_a = SharedTickets::start(store_a, TicketConfig::default())
            .await
            .unwrap();
        let tickets_b = SharedTickets::start(store_b, TicketConfig::default())
            .await
            .unwrap();
        let a = edge(&s.resolver, &s.upstream, Some(&tickets_a)).await;
        let b = edge(&s.resolver, &s.upstream, Some(&tickets_b)).await;
        let client = fresh(&s.client);
        assert_eq!(
            request(a.addr, &client).await,
            HandshakeKind::Full,
            "{kind}"
        );
        assert_eq!(
            request(b.addr, &client).await,
            HandshakeKind::Resumed,
            "{kind}: a ticket from A must resume on B"
        );
        assert_eq!(
            request(a.addr, &client).await,
            HandshakeKind::Resumed,
            "{kind}"
        );
    }
    // The same store's key blob is private.
    assert_eq!(
        lobe_tls_tests::mode(&dir.path().join("secrets/session-ticket-keys")),
        0o600
    );

    // Instances that share nothing: a ticket from one is useless on the other.
    let a = edge(&s.resolver, &s.upstream, None).await;
    let b = edge(&s.resolver, &s.upstream, None).await;
    let client = fresh(&s.client);
    assert_eq!(request(a.addr, &client).await, HandshakeKind::Full);
    assert_eq!(request(b.addr, &client).await, HandshakeKind::Full);
}

/// A client that leaves right after the handshake, having asked nothing (as
/// `openssl s_client -reconnect` does), still has a ticket: the edge sends its tickets
/// with the handshake, not with the first response.
#[tokio::test]
async fn a_client_that_asks_nothing_still_resumes() {
    let s = setup().await;
    let single = edge(&s.resolver, &s.upstream, None).await;
    let client = fresh(&s.client);
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tokio::net::TcpStream::connect(single.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, stream)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    // Reading takes in whatever records arrived; nothing else will come.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(1), tls.read(&mut buf)).await;
    assert!(
        read.is_err(),
        "the edge sent application data unasked: {read:?}"
    );
    drop(tls);
    assert_eq!(request(single.addr, &client).await, HandshakeKind::Resumed);
}
