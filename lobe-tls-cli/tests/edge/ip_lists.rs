//! IP allow and deny lists through the real binary: judged on the address the connection
//! established (the TCP peer, or what a trusted balancer's PROXY header names), never on
//! `X-Forwarded-For`; per site and per route; counted; reloaded with SIGHUP.
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// A TLS connection to the edge from the loopback address `from` (e.g. `127.0.0.2`).
pub async fn connect_from(client: &Client, from: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let source: IpAddr = from.parse().unwrap();
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let edge: SocketAddr = client.addr.parse().unwrap();
    let tcp = socket.connect(edge).await?;
    client
        .tls
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
}

/// GET `path` from the loopback address `from`.
pub async fn get_from(client: &Client, from: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let tls = connect_from(client, from).await.unwrap();
    get_on(tls, NAME, path, headers).await.unwrap()
}

/// The status of GET `path` from `from`, once the edge answers at all.
async fn status_from(client: &Client, from: &str, path: &str) -> StatusCode {
    eventually("a request", || async {
        let tls = connect_from(client, from).await?;
        get_on(tls, NAME, path, &[]).await
    })
    .await
    .status
}

const DENIED: &str = r#"edge_denied_total{site="default",reason="ip"} "#;

#[tokio::test]
async fn a_denied_address_gets_403_and_is_counted_while_another_passes() {
    let backend = Backend::start("a");
    let metrics_port = lobe_tls_tests::reserve_port();
    let metrics = metrics_port.listen();
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--deny",
            "127.0.0.2",
            "--deny",
            "192.0.2.0/24",
            "--metrics-listen",
            &metrics,
        ],
        None,
    )
    .await;
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::OK
    );
    let refused = get_from(&edge.client, "127.0.0.2", "/whoami", &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    assert!(refused.body.contains("forbidden"), "{refused:?}");
    // The edge's own answer carries a request id too.
    let id = refused
        .headers
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(id.len(), 32, "{id}");
    let (count, scraped) = scrape_until(&metrics, DENIED, |v| v >= 1.0).await;
    assert_eq!(count, 1.0, "{scraped}");
    assert!(
        scraped.contains(r#"lobe_tls_edge_denied_total{site="default",reason="ip"} 1"#),
        "{scraped}"
    );
    let passed = get_from(&edge.client, "127.0.0.3", "/whoami", &[]).await;
    assert_eq!(served_by(&passed), "a");
}

#[tokio::test]
async fn a_route_allow_list_guards_its_path_only() {
    let backend = Backend::start("a");
    let config = format!(
        r#"
[[site]]
domains = ["{NAME}"]
upstreams = ["{addr}"]

[[site.route]]
path = "/admin/"
upstreams = ["{addr}"]
allow = ["127.0.0.2/32"]
"#,
        addr = backend.addr
    );
    let edge = Edge::start(&[], Some(&config)).await;
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/admin/whoami").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::OK
    );
    // Spelled otherwise, the path is still the admin one.
    for disguised in ["/%61dmin/whoami", "//admin/whoami", "/x/../admin/whoami"] {
        let answer = get_from(&edge.client, "127.0.0.3", disguised, &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{disguised}: {answer:?}"
        );
    }
    let admitted = get_from(&edge.client, "127.0.0.2", "/admin/whoami", &[]).await;
    assert_eq!(served_by(&admitted), "a");
}

#[tokio::test]
async fn an_allow_list_admits_its_networks_only() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--allow",
            "127.0.0.2,127.0.0.4/32",
        ],
        None,
    )
    .await;
    assert_eq!(
        status_from(&edge.client, "127.0.0.4", "/whoami").await,
        StatusCode::OK
    );
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn the_proxy_named_address_is_judged_and_x_forwarded_for_is_not() {
    let backend = Backend::start("a");
    // Behind a trusted balancer: the address its PROXY header names decides.
    let balanced = Edge::behind_balancer(&backend, &["--deny", "192.0.2.66"], None).await;
    let refused = eventually("a client behind the balancer", || async {
        get_on(
            balanced.client.connect_as("192.0.2.66").await?,
            NAME,
            "/whoami",
            &[],
        )
        .await
    })
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    // The balancer's own address (127.0.0.1) is not denied, and a header naming the
    // denied address blocks nobody.
    let tls = balanced.client.connect_as("192.0.2.7").await.unwrap();
    let passed = get_on(tls, NAME, "/whoami", &[("x-forwarded-for", "192.0.2.66")])
        .await
        .unwrap();
    assert_eq!(served_by(&passed), "a");

    // Straight from untrusted clients: a spoofed header neither gets in nor blocks.
    let edge = Edge::start(&["--upstream", &backend.addr, "--deny", "127.0.0.2"], None).await;
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::OK
    );
    let spoofed_in = get_from(
        &edge.client,
        "127.0.0.2",
        "/whoami",
        &[("x-forwarded-for", "127.0.0.3"), ("x-real-ip", "127.0.0.3")],
    )
    .await;
    assert_eq!(spoofed_in.status, StatusCode::FORBIDDEN, "{spoofed_in:?}");
    let framed = get_from(
        &edge.client,
        "127.0.0.3",
        "/whoami",
        &[("x-forwarded-for", "127.0.0.2")],
    )
    .await;
    assert_eq!(served_by(&framed), "a");
}

#[tokio::test]
async fn sighup_reloads_the_lists() {
    let backend = Backend::start("a");
    let site = |deny: &str| {
        format!(
            "[[site]]\ndomains = [\"{NAME}\"]\nupstreams = [\"{}\"]\ndeny = [\"{deny}\"]\n",
            backend.addr
        )
    };
    let edge = Edge::start(&[], Some(&site("127.0.0.2"))).await;
    assert_eq!(
        status_from(&edge.client, "127.0.0.2", "/whoami").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::OK
    );
    std::fs::write(edge.config_path(), site("127.0.0.3/32")).unwrap();
    edge.signal("-HUP");
    let deadline = Instant::now() + STEP;
    while status_from(&edge.client, "127.0.0.2", "/whoami").await != StatusCode::OK {
        assert!(Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status_from(&edge.client, "127.0.0.3", "/whoami").await,
        StatusCode::FORBIDDEN
    );
}
