//! The replay budgets: request bodies kept to be sent again to another upstream draw on
//! a byte budget per connection and one for the whole process; a body that does not fit
//! streams through once. The upstreams here read each request whole, count it and close
//! the connection without an answer, so the edge would try the next one if it could.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::support::{Backend, Edge, NAME, STEP, metric_until, plain_get};

const DROPPER_ENV: &str = "LOBE_TLS_TEST_DROPPER";

/// A backend that reads each request's body, counts it, and closes the connection without
/// an answer (`GET /attempts` answers the count), when this binary is started as one;
/// otherwise a check that it does so.
#[test]
fn dropping_backend_process() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Ok(addr) = std::env::var(DROPPER_ENV) else {
        runtime.block_on(async {
            use tokio::io::AsyncReadExt;
            let dropper = Dropper::start();
            assert_eq!(dropper.attempts().await, 0);
            let mut tcp = tokio::net::TcpStream::connect(&dropper.0.addr)
                .await
                .unwrap();
            tcp.write_all(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
                .await
                .unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(STEP, tcp.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            assert!(answer.is_empty(), "{answer:?}");
            assert_eq!(dropper.attempts().await, 1);
        });
        return;
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        let attempts = Arc::new(AtomicU64::new(0));
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let attempts = attempts.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let attempts = attempts.clone();
                        async move {
                            if req.uri().path() == "/attempts" {
                                let count = attempts.load(Ordering::SeqCst).to_string();
                                return Ok(http::Response::new(Full::new(Bytes::from(count))));
                            }
                            let _ = req.into_body().collect().await;
                            attempts.fetch_add(1, Ordering::SeqCst);
                            // An error from the service: hyper closes the connection unanswered.
                            Err(std::io::Error::other("dropped"))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// A dropping backend process, killed on drop.
struct Dropper(Backend);

impl Dropper {
    fn start() -> Dropper {
        let addr_port = lobe_tls_tests::reserve_port();
        let addr = addr_port.listen();
        let spec = addr.clone();
        Dropper(Backend::spawn(
            addr,
            "budget::dropping_backend_process",
            DROPPER_ENV,
            &spec,
        ))
    }

    async fn attempts(&self) -> u64 {
        let (status, body) = plain_get(&self.0.addr, "/attempts").await;
        assert_eq!(status, 200);
        body.trim().parse().unwrap()
    }
}

/// Two dropping upstreams behind `serve` with `args`, and its metrics address.
async fn edge_before_droppers(args: &[&str]) -> (Edge, [Dropper; 2], String) {
    let droppers = [Dropper::start(), Dropper::start()];
    let upstreams = format!("{},{}", droppers[0].0.addr, droppers[1].0.addr);
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let mut all = vec!["--upstream", &upstreams, "--metrics-listen", &metrics];
    all.extend_from_slice(args);
    let edge = Edge::start(&all, None).await;
    (edge, droppers, metrics)
}

async fn attempts(droppers: &[Dropper; 2]) -> u64 {
    droppers[0].attempts().await + droppers[1].attempts().await
}

/// A PUT of `size` bytes (with its length) on a new HTTP/1.1 connection; its status.
async fn put(edge: &Edge, size: usize) -> StatusCode {
    let tls = edge.client.connect().await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::put("/upload")
        .header("host", NAME)
        .body(Full::new(Bytes::from(vec![b'x'; size])))
        .unwrap();
    let response = tokio::time::timeout(STEP, send.send_request(request))
        .await
        .unwrap()
        .unwrap();
    response.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_connection_budget_is_sent_once_and_a_small_one_is_retried() {
    let (edge, droppers, metrics) =
        edge_before_droppers(&["--retry-buffer-per-conn", "4096"]).await;

    // Within the budget: kept, and sent to the second upstream when the first drops it.
    assert_eq!(put(&edge, 1024).await, StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&droppers).await, 2);

    // Over it (though under the 64 KiB a body may have): streamed, one attempt only.
    assert_eq!(put(&edge, 8192).await, StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&droppers).await, 3);

    let refused = metric_until(
        &metrics,
        "lobe_tls_edge_retry_buffer_refused_total{budget=\"connection\"}",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(refused, 1.0);
    // Nothing stays reserved once the requests are done.
    let held = metric_until(&metrics, "lobe_tls_edge_retry_buffer_bytes ", |v| v == 0.0).await;
    assert_eq!(held, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_share_the_total_budget_and_a_dropped_body_gives_its_part_back() {
    let (edge, droppers, metrics) = edge_before_droppers(&[
        "--retry-buffer-per-conn",
        "65536",
        "--retry-buffer-total",
        "65536",
    ])
    .await;

    // One client announces 60,000 bytes and sends a few: the edge reserves them all.
    let mut holder = edge.client.connect().await.unwrap();
    let head = format!("PUT /upload HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 60000\r\n\r\n");
    holder.write_all(head.as_bytes()).await.unwrap();
    holder.write_all(&[b'x'; 1000]).await.unwrap();
    holder.flush().await.unwrap();
    let held = metric_until(&metrics, "lobe_tls_edge_retry_buffer_bytes ", |v| {
        v == 60000.0
    })
    .await;
    assert_eq!(held, 60000.0);

    // Another connection has room in its own budget but not in the total: streamed once.
    assert_eq!(put(&edge, 10_000).await, StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&droppers).await, 1);
    let refused = metric_until(
        &metrics,
        "lobe_tls_edge_retry_buffer_refused_total{budget=\"total\"}",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(refused, 1.0);

    // The first client goes away mid-body: its reservation is given back.
    drop(holder);
    let held = metric_until(&metrics, "lobe_tls_edge_retry_buffer_bytes ", |v| v == 0.0).await;
    assert_eq!(held, 0.0);
    assert_eq!(put(&edge, 10_000).await, StatusCode::BAD_GATEWAY);
    assert_eq!(attempts(&droppers).await, 3);
}
