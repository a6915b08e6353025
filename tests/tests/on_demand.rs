//! On-demand TLS against real Pebble (and Redis for the cluster case), through the
//! terminator's accept path: an ask endpoint that allows some names and counts its calls,
//! first requests that wait for their certificate, refused names, and bursts of
//! concurrent first handshakes that must make exactly one order.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lobe_tls::cluster::Cluster;
use lobe_tls::store::DynStore;
use lobe_tls::{FileStore, Manager, Metrics, OnDemand, OnDemandConfig, RedisStore};
use lobe_tls_tests::http_server::HttpServer;
use lobe_tls_tests::tls::client_config;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The ask endpoint and the upstream in one: `/ask?domain=NAME` answers 200 for the
/// allowed names (and counts every ask), anything else answers "hello".
struct App {
    server: HttpServer,
    asks: Arc<AtomicUsize>,
}

impl App {
    async fn start(allowed: &[&str]) -> App {
        let allowed: Arc<HashSet<String>> =
            Arc::new(allowed.iter().map(|s| s.to_string()).collect());
        let asks = Arc::new(AtomicUsize::new(0));
        let counted = asks.clone();
        let server = HttpServer::start(move |req| {
            let allowed = allowed.clone();
            let asks = counted.clone();
            async move {
                let path = req.path_and_query;
                let (status, body) = match path.strip_prefix("/ask?domain=") {
                    Some(name) => {
                        asks.fetch_add(1, Ordering::SeqCst);
                        if allowed.contains(name) {
                            (200, "yes")
                        } else {
                            (403, "no")
                        }
                    }
                    None => (200, "hello"),
                };
                http::Response::builder()
                    .status(status)
                    .header("connection", "close")
                    .body(body.to_owned())
                    .unwrap()
            }
        })
        .await;
        App { server, asks }
    }

    fn asks(&self) -> usize {
        self.asks.load(Ordering::SeqCst)
    }
}

/// A terminator with on-demand issuance over its own manager; stops when dropped.
struct Edge {
    addr: SocketAddr,
    manager: Manager,
    _cluster: Option<Cluster>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Edge {
    async fn start(pebble: &Pebble, store: DynStore, app: &App, listen: SocketAddr) -> Edge {
        let manager = Manager::builder(pebble.acme_config(), store.clone())
            .manage_stored(true)
            .tls_alpn01_on_resolver(true)
            .build()
            .unwrap();
        let cluster = store
            .as_challenge_store()
            .is_some()
            .then(|| Cluster::builder(manager.clone()).start().unwrap());
        manager.start().await.unwrap();
        let mut config = OnDemandConfig::default();
        config.ask = Some(format!("{}/ask", app.server.url()));
        let on_demand = OnDemand::new(manager.clone(), config).unwrap();
        let terminator = lobe_tls::edge::Edge::bind(
            listen,
            Arc::new(manager.resolver().clone()),
            lobe_tls::edge::EdgeConfig::tcp(app.server.addr.to_string()),
            Metrics::new(),
        )
        .await
        .unwrap()
        .with_on_demand(on_demand);
        let addr = terminator.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(terminator.run(async move {
            let _ = stopped.await;
        }));
        Edge {
            addr,
            manager,
            _cluster: cluster,
            _stop: stop,
        }
    }
}

/// An HTTPS GET of `/` with SNI `name`, verified against `root`: the serial served and
/// the response.
async fn get(addr: SocketAddr, name: &str, root: &str) -> Result<(String, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let mut config = (*client_config(root)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no certificate")?;
    let serial = lobe_tls::CertInfo::from_der(&leaf)
        .map_err(|e| e.to_string())?
        .serial;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok((serial, response))
}

#[tokio::test]
async fn allowed_names_are_issued_on_their_first_request_refused_ones_never_ordered() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let app = App::start(&["shop.example.com", "burst.example.com"]).await;
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FileStore::open(dir.path()).unwrap());
    // On Pebble's TLS-ALPN-01 port: the validation handshakes arrive where clients do.
    let edge = Edge::start(&pebble, store, &app, pebble.tls_addr()).await;

    // An allowed name: issued while its first request waits, then served.
    let started = Instant::now();
    let (serial, response) = get(edge.addr, "shop.example.com", &root).await.unwrap();
    let first = started.elapsed();
    eprintln!("on-demand: first request for a new name answered in {first:?}");
    assert!(response.ends_with("hello"), "{response}");
    assert!(first < Duration::from_secs(5), "took {first:?}");
    assert_eq!(pebble.orders_created(), 1);
    assert_eq!(app.asks(), 1);
    // The next request is served at once with the same certificate, without asking.
    let (again, _) = get(edge.addr, "shop.example.com", &root).await.unwrap();
    assert_eq!(again, serial);
    assert_eq!(app.asks(), 1);
    // Added to the managed set: renewed like the others.
    let managed = edge.manager.certificates();
    assert!(
        managed.iter().any(|c| c.name == "shop.example.com"),
        "{managed:?}"
    );

    // A refused name: no certificate, no order; a retry is refused without asking again.
    for _ in 0..3 {
        let refused = get(edge.addr, "evil.example.com", &root).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    assert_eq!(app.asks(), 2);
    assert_eq!(pebble.orders_created(), 1);

    // 50 concurrent first requests for one name: one ask, one order, one certificate.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let root = root.clone();
        let addr = edge.addr;
        burst.spawn(async move { get(addr, "burst.example.com", &root).await });
    }
    let mut serials = HashSet::new();
    while let Some(done) = burst.join_next().await {
        let (serial, response) = done.unwrap().unwrap();
        assert!(response.ends_with("hello"), "{response}");
        serials.insert(serial);
    }
    assert_eq!(serials.len(), 1, "{serials:?}");
    assert_eq!(pebble.orders_created(), 2);
    assert_eq!(app.asks(), 3);
}

#[tokio::test]
async fn concurrent_first_requests_on_two_instances_sharing_redis_make_one_order() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let redis = RedisServer::start();
    let root = pebble.issuing_root_pem().await;
    let app = App::start(&["shared.example.com"]).await;
    let store_a: DynStore = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let store_b: DynStore = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    // Pebble validates through instance A's port; an order placed by B publishes its
    // challenge through Redis, which A follows.
    let a = Edge::start(&pebble, store_a, &app, pebble.tls_addr()).await;
    let b = Edge::start(
        &pebble,
        store_b,
        &app,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await;

    let mut burst = tokio::task::JoinSet::new();
    for i in 0..20 {
        let root = root.clone();
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        burst.spawn(async move { get(addr, "shared.example.com", &root).await });
    }
    let mut serials = HashSet::new();
    while let Some(done) = burst.join_next().await {
        let (serial, _) = done.unwrap().unwrap();
        serials.insert(serial);
    }
    assert_eq!(serials.len(), 1, "{serials:?}");
    assert_eq!(pebble.orders_created(), 1);
    // Each instance asked at most once.
    assert!(app.asks() <= 2, "{}", app.asks());
}
