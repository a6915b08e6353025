//! `lobe-tls serve` as an edge: the real binary in http mode in front of real backend
//! processes, a real HAProxy in front of it. Balancing, health, routing, the client's
//! identity, limits, metrics.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn three_backends_share_the_load_and_a_killed_one_fails_no_request() {
    let mut backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let upstreams: Vec<String> = backends.iter().map(|b| b.addr.clone()).collect();
    let edge = Edge::start(
        &[
            "--upstream",
            &upstreams.join(","),
            "--health-path",
            "/healthz",
            "--health-interval",
            "1",
        ],
        None,
    )
    .await;
    // Eight clients, each sending requests one after the other; backend "b" is killed
    // while they run. Every request must succeed.
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client = edge.client.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop_at {
                let answer = client.get("/whoami", &[]).await;
                seen.push(served_by(&answer));
            }
            seen
        }));
    }
    // Killed mid-traffic, once it is seen serving.
    lobe_tls_tests::wait_until(Duration::from_secs(2), "\"b\" serving", || async {
        served_by(&edge.client.get("/whoami", &[]).await) == "b"
    })
    .await;
    backends[1].kill();
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(worker.await.unwrap());
    }
    for name in ["a", "b", "c"] {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} served nothing: {seen:?}"
        );
    }
    assert!(seen.len() > 50, "only {} requests", seen.len());

    // h2 through ALPN, to the backends that are left.
    let tcp = TcpStream::connect(&edge.listen).await.unwrap();
    let tls = edge
        .client
        .h2
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        let request = Request::get(format!("https://{NAME}/whoami"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_ne!(&body[..], b"b\n");
    }
}

#[tokio::test]
async fn unknown_hosts_get_421_and_path_routes_pick_their_pool() {
    let main = Backend::start("main");
    let api = Backend::start("api");
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{}\"]\nhsts = 600\n\n[[site.route]]\npath = \"/api/\"\nupstreams = [\"{}\"]\n",
        main.addr, api.addr
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let answer = edge
        .client
        .get_host("other.example.com", "/whoami", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST, "{answer:?}");
    assert!(answer.body.contains("no site"), "{answer:?}");
    let answer = edge.client.get("/whoami", &[]).await;
    assert_eq!(served_by(&answer), "main");
    assert_eq!(answer.headers["strict-transport-security"], "max-age=600");
    assert_eq!(served_by(&edge.client.get("/api/whoami", &[]).await), "api");
}

#[tokio::test]
async fn cookie_affinity_pins_a_client_and_re_pins_it_when_its_upstream_dies() {
    let mut backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [{}]\nlb = \"cookie\"\n",
        list.join(", ")
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let first = edge.client.get("/whoami", &[]).await;
    let pinned = served_by(&first);
    let set_cookie = first.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly")
            && set_cookie.contains("Secure")
            && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    for backend in &backends {
        let port = backend.addr.rsplit_once(':').unwrap().1;
        assert!(
            !cookie.contains(port) && !cookie.contains("127.0.0.1"),
            "{cookie}"
        );
    }
    for _ in 0..10 {
        let answer = edge.client.get("/whoami", &[("cookie", &cookie)]).await;
        assert_eq!(served_by(&answer), pinned);
        assert!(answer.headers.get("set-cookie").is_none());
    }
    let index = ["a", "b", "c"].iter().position(|n| *n == pinned).unwrap();
    backends[index].kill();
    let answer = edge.client.get("/whoami", &[("cookie", &cookie)]).await;
    let repinned = served_by(&answer);
    assert_ne!(repinned, pinned);
    let new_cookie = answer.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(new_cookie, cookie);
    let answer = edge.client.get("/whoami", &[("cookie", &new_cookie)]).await;
    assert_eq!(served_by(&answer), repinned);
}

#[tokio::test]
async fn an_affinity_cookie_pins_on_every_instance_sharing_the_store() {
    let backends: Vec<Backend> = ["a", "b", "c"].iter().map(|n| Backend::start(n)).collect();
    let store = tempfile::tempdir().unwrap();
    let ca = store_certificate(store.path()).await;
    let mut args = vec!["--lb", "cookie"];
    for backend in &backends {
        args.extend(["--upstream", backend.addr.as_str()]);
    }
    let one = Edge::start_on_store(&args, store.path(), &ca).await;
    let two = Edge::start_on_store(&args, store.path(), &ca).await;
    // Both instances read the key the first one stored (a secret, 0600).
    let key = store.path().join("secrets/affinity-cookie-key");
    assert_eq!(lobe_tls_tests::mode(&key), 0o600);
    for _ in 0..3 {
        let first = one.client.get("/whoami", &[]).await;
        let pinned = served_by(&first);
        let cookie = first.headers["set-cookie"].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_owned();
        for _ in 0..5 {
            let answer = two.client.get("/whoami", &[("cookie", &cookie)]).await;
            assert_eq!(served_by(&answer), pinned, "the other instance re-pinned");
            assert!(answer.headers.get("set-cookie").is_none());
        }
    }
}

#[tokio::test]
async fn with_every_upstream_down_the_answer_is_quick_and_says_when_to_retry() {
    // Reserved, never listened on: connections are refused for the whole test.
    let dead_ports = [
        lobe_tls_tests::reserve_port(),
        lobe_tls_tests::reserve_port(),
    ];
    let dead = dead_ports.each_ref().map(|p| p.listen()).join(",");
    let edge = Edge::start(&["--upstream", &dead], None).await;
    for _ in 0..4 {
        let started = Instant::now();
        let answer = edge.client.get("/", &[]).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                answer.status,
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
            ),
            "{answer:?}"
        );
        assert!(answer.headers.contains_key("retry-after"), "{answer:?}");
    }
}

#[tokio::test]
async fn forwarding_headers_are_replaced_unless_the_peer_is_trusted() {
    let backend = Backend::start("a");
    let spoofed = [("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")];
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let seen = edge.client.get("/headers", &spoofed).await.body;
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(
        seen.contains(&format!(
            "forwarded: for=127.0.0.1;proto=https;host={NAME}\n"
        )),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    assert!(
        seen.contains(&format!("x-forwarded-host: {NAME}\n")),
        "{seen}"
    );
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    drop(edge);

    let trusting = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--trusted-proxy",
            "127.0.0.0/8",
        ],
        None,
    )
    .await;
    let seen = trusting.client.get("/headers", &spoofed).await.body;
    assert!(
        seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{seen}"
    );
}

#[tokio::test]
async fn haproxy_in_front_sends_proxy_v2_and_the_backend_sees_the_client() {
    let backend = Backend::start("a");
    let edge = Edge::behind_balancer(&backend, &[], None).await;
    // Without a PROXY header: refused at once, no handshake.
    let started = Instant::now();
    assert!(edge.client.connect().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(6));
    let front_port = lobe_tls_tests::reserve_port();
    let front = front_port.listen();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend tls\n  bind {front}\n  default_backend edge\nbackend edge\n  server edge {} send-proxy-v2\n",
        edge.listen
    );
    std::fs::write(dir.path().join("haproxy.cfg"), config).unwrap();
    let _haproxy = lobe_tls_tests::cli::KillOnDrop(
        Command::new("haproxy")
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg"))
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy is installed (apt-get install haproxy)"),
    );
    // The client connects to HAProxy from 127.0.0.2, so its address differs from
    // HAProxy's own (127.0.0.1).
    let deadline = Instant::now() + STEP;
    let tls = loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let attempt = async {
            let tcp = socket.connect(front.parse().unwrap()).await?;
            edge.client
                .tls
                .connect(ServerName::try_from(NAME).unwrap(), tcp)
                .await
        };
        match attempt.await {
            Ok(tls) => break tls,
            Err(e) => {
                assert!(Instant::now() < deadline, "no TLS through haproxy: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let seen = get_body(tls, "/headers").await.unwrap();
    assert!(seen.contains("x-forwarded-for: 127.0.0.2\n"), "{seen}");
}

#[tokio::test]
async fn connection_and_rate_limits_refuse_the_excess() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--max-conns-per-ip",
            "3",
            "--rate-limit",
            "5",
        ],
        None,
    )
    .await;
    // The readiness probe's connection may still count for a moment after it closed.
    let deadline = Instant::now() + STEP;
    let held = loop {
        let held: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| edge.client.connect())).await;
        if held.iter().all(Result::is_ok) {
            break held;
        }
        drop(held);
        assert!(
            Instant::now() < deadline,
            "three connections from one address were refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        edge.client.connect().await.is_err(),
        "a fourth connection from one address was accepted"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut limited = 0;
    let mut ok = 0;
    for _ in 0..15 {
        let answer = edge.client.get("/whoami", &[]).await;
        match answer.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(answer.headers.contains_key("retry-after"), "{answer:?}");
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(ok >= 5 && limited >= 5, "ok {ok}, limited {limited}");
}

#[tokio::test]
async fn metrics_count_requests_by_site_and_class_and_upstream_state() {
    let backend = Backend::start("a");
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--metrics-listen", &metrics],
        None,
    )
    .await;
    assert_eq!(
        edge.client.get("/status/503", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(edge.client.get("/whoami", &[]).await.status, StatusCode::OK);
    let (status, scraped) = plain_get(&metrics, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "lobe_tls_edge_requests_total{site=\"default\",route=\"\",class=\"2xx\"} 1",
        "lobe_tls_edge_requests_total{site=\"default\",route=\"\",class=\"5xx\"} 1",
        &format!(
            "lobe_tls_edge_upstream_up{{site=\"default\",upstream=\"{}\"}} 1",
            backend.addr
        ),
        "lobe_tls_edge_request_duration_seconds_count{site=\"default\",route=\"\"} 2",
        "lobe_tls_certificate_expiry_timestamp_seconds{name=\"site\",source=\"dir\"}",
    ] {
        assert!(
            scraped.contains(expected),
            "{expected} missing from:\n{scraped}"
        );
    }
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_and_others_pass() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--max-body-size", "1000"],
        None,
    )
    .await;
    for (size, expected) in [
        (500usize, StatusCode::OK),
        (2000, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let tls = edge.client.connect().await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post("/upload")
            .header("host", NAME)
            .body(http_body_util::Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.status(), expected);
        if expected == StatusCode::OK {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"500\n");
        }
    }
}

#[tokio::test]
async fn active_health_checks_take_a_failing_upstream_out_and_back_in_rotation() {
    let sick = Backend::start("sick");
    let well = Backend::start("well");
    let config = format!(
        "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{}\", \"{}\"]\nlb = \"round-robin\"\nhealth_path = \"/healthz\"\nhealth_interval = 0.2\nfall = 2\nrise = 2\n",
        sick.addr, well.addr
    );
    let edge = Edge::start(&[], Some(&config)).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(served_by(&edge.client.get("/whoami", &[]).await));
    }
    assert!(seen.iter().any(|s| s == "sick"), "{seen:?}");
    // The backend's health path starts failing; its other paths still answer, so only
    // the active check can take it out.
    assert_eq!(plain_get(&sick.addr, "/sick").await.0, 200);
    lobe_tls_tests::wait_until(
        Duration::from_secs(5),
        "\"sick\" out of rotation",
        || async {
            let two = [
                edge.client.get("/whoami", &[]).await,
                edge.client.get("/whoami", &[]).await,
            ];
            two.iter().all(|answer| served_by(answer) == "well")
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(served_by(&edge.client.get("/whoami", &[]).await), "well");
    }
    // Healthy again: back after `rise` passing checks.
    assert_eq!(plain_get(&sick.addr, "/well").await.0, 200);
    lobe_tls_tests::wait_until(
        Duration::from_secs(5),
        "\"sick\" back in rotation",
        || async { served_by(&edge.client.get("/whoami", &[]).await) == "sick" },
    )
    .await;
}

#[tokio::test]
async fn tcp_mode_sends_a_proxy_v2_header_with_the_client_address_then_the_bytes() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    let edge = Edge::start(
        &[
            "--mode",
            "tcp",
            "--send-proxy-v2",
            "--upstream",
            &upstream_addr,
        ],
        None,
    )
    .await;
    let mut tls = edge.client.connect().await.unwrap();
    let client_port = tls.get_ref().0.local_addr().unwrap().port();
    tls.write_all(b"hello").await.unwrap();
    // The readiness probe's connection may come first: take the one that sends bytes.
    let deadline = Instant::now() + STEP;
    let received = loop {
        let (mut stream, _) = tokio::time::timeout(STEP, upstream.accept())
            .await
            .unwrap()
            .unwrap();
        let mut buf = vec![0u8; 28 + 5];
        if tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
            && &buf[28..] == b"hello"
        {
            break buf;
        }
        assert!(Instant::now() < deadline, "no proxied connection");
    };
    // v2 signature, PROXY command, TCP over IPv4, 12 address bytes.
    assert_eq!(&received[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(received[12], 0x21);
    assert_eq!(received[13], 0x11);
    assert_eq!(u16::from_be_bytes([received[14], received[15]]), 12);
    assert_eq!(&received[16..20], &[127, 0, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([received[24], received[25]]),
        client_port
    );
}
