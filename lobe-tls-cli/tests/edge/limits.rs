//! Connection caps through the real binary: upgraded connections keep their places, and
//! behind a PROXY header the per-address cap counts the client the header names.
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn open_websockets_keep_their_places_under_the_per_address_cap() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &["--upstream", &backend.addr, "--max-conns-per-ip", "2"],
        None,
    )
    .await;
    let mut first = eventually("first WebSocket", || edge.client.try_websocket("/ws")).await;
    let mut second = eventually("second WebSocket", || edge.client.try_websocket("/ws")).await;
    assert_eq!(echo(&mut first, "one").await, "a: one");
    assert_eq!(echo(&mut second, "two").await, "a: two");
    // Both upgraded connections still count: a third from the same address is refused.
    assert!(
        edge.client.connect().await.is_err(),
        "a third connection was accepted beside two open WebSockets"
    );
    // Closing one gives its place back.
    first.close(None).await.unwrap();
    drop(first);
    let _third = eventually("a connection after a WebSocket closed", || {
        edge.client.connect()
    })
    .await;
    assert_eq!(echo(&mut second, "still").await, "a: still");
}

#[tokio::test]
async fn behind_a_proxy_header_the_per_address_cap_counts_the_named_client() {
    let backend = Backend::start("a");
    let edge = Edge::behind_balancer(&backend, &["--max-conns-per-ip", "1"], None).await;
    // All from 127.0.0.1: the balancer's address is not what is capped.
    let _first = eventually("a first client behind the balancer", || {
        edge.client.connect_as("192.0.2.1")
    })
    .await;
    let _other = edge.client.connect_as("192.0.2.2").await.unwrap();
    assert!(
        edge.client.connect_as("192.0.2.1").await.is_err(),
        "a second connection of one client behind the balancer was accepted"
    );
}

/// The soft and hard open-file limits of process `pid`.
fn nofile_of(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn serve_raises_its_open_file_limit_and_caps_connections_by_default() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    assert!(help.contains("Default: 4096; 0: no cap"), "{help}");
    assert!(
        help.contains("Default: (open-file limit - 256) / 2"),
        "{help}"
    );

    let (_, hard) = nofile_of("self");
    assert!(
        hard == "unlimited" || hard.parse::<u64>().unwrap() > 512,
        "the hard open-file limit ({hard}) leaves nothing to raise"
    );
    let backend = Backend::start("a");
    let certs = tempfile::tempdir().unwrap();
    write_certificate(certs.path());
    let listen_port = lobe_tls_tests::reserve_port();
    let listen = listen_port.listen();
    // Started with a low soft limit, as many systems start services.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args(["serve", "--listen", &listen, "--no-http", "--upstream"])
        .arg(&backend.addr)
        .arg("--cert-dir")
        .arg(certs.path())
        .env_remove("LOBE_TLS_STORE")
        .env("LOBE_TLS_LOG", "lobe_tls=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(&listen).await.is_err() {
        assert!(Instant::now() < deadline, "serve never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().to_string();
    let (soft, hard) = nofile_of(&pid);
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    assert_eq!(soft, hard, "the soft open-file limit was not raised");
    let log = String::from_utf8_lossy(&output.stderr);
    let caps = log
        .lines()
        .find(|l| l.contains("connection caps"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(caps.contains("max_conns_per_ip=Some(4096)"), "{caps}");
    if let Ok(hard) = hard.parse::<u64>() {
        let total = format!("max_conns=Some({})", (hard - 256) / 2);
        assert!(caps.contains(&total), "{caps}");
    }
}

/// The sockets `pid` holds open now.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

#[tokio::test]
async fn idle_upstream_connections_the_upstream_closed_are_let_go_without_more_traffic() {
    const BURST: usize = 16;
    let mut backend = Backend::start("a");
    let edge = Edge::start(&["--upstream", &backend.addr], None).await;
    let pid = edge.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sockets_of(pid);
    // Concurrent requests, so the pool keeps one upstream connection for each.
    let burst = (0..BURST).map(|_| edge.client.get("/slow?ms=300", &[]));
    for answer in futures_util::future::join_all(burst).await {
        assert_eq!(answer.status, 200);
    }
    lobe_tls_tests::wait_until(Duration::from_secs(5), "the pooled connections", || async {
        sockets_of(pid) >= before + BURST
    })
    .await;
    let pooled = sockets_of(pid);
    assert!(pooled >= before + BURST, "{before} sockets, then {pooled}");
    // The upstream goes away and nothing asks for it again: its closed connections must
    // not stay open here (in CLOSE_WAIT) until the next request.
    backend.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = sockets_of(pid);
        if now <= before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{before} sockets before the burst, {pooled} after, still {now} 5 s after the upstream closed them"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
