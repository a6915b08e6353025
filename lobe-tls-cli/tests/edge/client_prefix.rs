//! Who counts as one client: an IPv6 /64 by default, set by `--client-prefix-v6` or
//! `client_prefix_v6` in the --config file (the flag wins); a bad value stops `serve`
//! with one line.
use std::process::{Command, Stdio};

use tokio::net::TcpStream;

use crate::support::*;

/// The first connection of `client`, retried while the edge settles (the readiness
/// probe's connection may still count for a moment).
async fn first(edge: &Edge, client: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    eventually(client, || edge.client.connect_as(client)).await
}

/// `serve` behind a trusted balancer on loopback, one connection per client.
async fn edge(backend: &Backend, extra: &[&str], config: Option<&str>) -> Edge {
    let mut args = vec!["--max-conns-per-ip", "1"];
    args.extend_from_slice(extra);
    Edge::behind_balancer(backend, &args, config).await
}

#[tokio::test]
async fn an_ipv6_64_is_one_client_unless_the_prefix_says_otherwise() {
    let backend = Backend::start("a");

    // The default: two addresses of one /64 share one place; another /64 has its own.
    let by_64 = edge(&backend, &[], None).await;
    let _held = first(&by_64, "2001:db8:0:1::1").await;
    assert!(
        by_64
            .client
            .connect_as("2001:db8:0:1:ffff::2")
            .await
            .is_err(),
        "a second address of the same /64 got a place of its own"
    );
    let _other = by_64.client.connect_as("2001:db8:0:2::1").await.unwrap();
    drop(by_64);

    // client_prefix_v6 = 128 in the --config file: each address is a client.
    let config = "client_prefix_v6 = 128\n";
    let by_address = edge(&backend, &[], Some(config)).await;
    let _held = first(&by_address, "2001:db8:0:1::1").await;
    let _second = by_address
        .client
        .connect_as("2001:db8:0:1::2")
        .await
        .unwrap();
    assert!(
        by_address
            .client
            .connect_as("2001:db8:0:1::1")
            .await
            .is_err(),
        "the per-address cap did not hold with client_prefix_v6 = 128"
    );
    drop(by_address);

    // The flag wins over the file: a /48 is one client.
    let by_48 = edge(&backend, &["--client-prefix-v6", "48"], Some(config)).await;
    let _held = first(&by_48, "2001:db8:0:1::1").await;
    assert!(
        by_48.client.connect_as("2001:db8:0:2::1").await.is_err(),
        "--client-prefix-v6 48 did not win over the file"
    );
    let _other = by_48.client.connect_as("2001:db8:1:1::1").await.unwrap();
}

#[tokio::test]
async fn an_out_of_range_client_prefix_is_one_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    write_certificate(&dir.path().join("certs"));
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, "client_prefix_v4 = 33\n").unwrap();
    let listen_port = lobe_tls_tests::reserve_port();
    let listen = listen_port.listen();
    // Flags, an environment variable, and what stderr must say.
    type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 3] = [
        (
            &["--client-prefix-v6", "129"],
            None,
            "--client-prefix-v6 129 is out of range: give 1 to 128 bits",
        ),
        (
            &[],
            Some(("LOBE_TLS_CLIENT_PREFIX_V4", "0")),
            "--client-prefix-v4 0 is out of range: give 1 to 32 bits",
        ),
        (
            &["--config", config.to_str().unwrap()],
            None,
            "client_prefix_v4 = 33 is out of range: give 1 to 32 bits",
        ),
    ];
    for (args, env, expected) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
        cmd.env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0");
        cmd.args(["serve", "--listen", &listen, "--no-http", "--upstream"])
            .arg("127.0.0.1:1")
            .arg("--cert-dir")
            .arg(dir.path().join("certs"))
            .args(args)
            .env_remove("LOBE_TLS_STORE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
