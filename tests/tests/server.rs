//! `lobe_tls::server::Server`, the whole of `lobe-tls serve` as a library call: a managed
//! name issued from Pebble through HTTP-01 on the server's own port 80, served by the
//! edge in front of a real backend on ports the kernel picked, and a reload that adds a
//! site whose certificate is then issued without a restart.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lobe_tls::edge::{EdgeConfig, SiteConfig, UpstreamSpec};
use lobe_tls::server::{Server, ServerConfig};
use lobe_tls::store::StoreSpec;
use lobe_tls::{ChallengeConfig, ManagedCert, domain};
use lobe_tls_tests::http_server::HttpServer;
use lobe_tls_tests::tls::client_config;
use lobe_tls_tests::{Pebble, PebbleOptions};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTPS GET to `name` at `addr`; the response, or why there was none.
async fn get(addr: SocketAddr, name: &str, root: &str) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = (*client_config(root)).clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), stream)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// Polls `get` until the answer ends with `body`, for up to 60 s.
async fn served(addr: SocketAddr, name: &str, root: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = get(addr, name, root).await;
        if matches!(&got, Ok(response) if response.ends_with(body)) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never served: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_server_issues_serves_and_reloads_in_one_library_call() {
    let pebble = Pebble::start(PebbleOptions::default());
    let root = pebble.issuing_root_pem().await;
    let app = HttpServer::start(|_| async { http::Response::new("from the app".to_owned()) }).await;
    let store = tempfile::tempdir().unwrap();

    let site = SiteConfig::new(
        vec!["app.example.com".into()],
        vec![UpstreamSpec::Addr(app.addr.to_string())],
    );
    let mut config = ServerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EdgeConfig::new(vec![site.clone()]),
    );
    // Pebble validates HTTP-01 on its own port: the server's port 80 is that one.
    config.http_listen = Some(pebble.http_addr());
    config.store = Some(StoreSpec::parse(store.path().to_str().unwrap()).unwrap());
    config.acme = Some(pebble.acme_config());
    config.challenge = ChallengeConfig::http01(None);
    config.managed = vec![ManagedCert::new(
        "api",
        domain::parse_all(&["api.example.com"]).unwrap(),
    )];
    let server = Server::start(config).await.unwrap();
    let addrs = server.addrs();
    assert_ne!(addrs.listen.port(), 0, "the bound port is reported");
    assert_eq!(addrs.http_listen, Some(pebble.http_addr()));
    let handle = server.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    // The site's domain and the managed name are both issued at start; the managed name
    // has a certificate but no site, so the edge answers 421 over a verified handshake.
    served(addrs.listen, "app.example.com", &root, "from the app").await;
    served(
        addrs.listen,
        "api.example.com",
        &root,
        "no site is configured for this host\n",
    )
    .await;

    // A reload adds a site; its certificate is ordered without a restart.
    let added = SiteConfig::new(
        vec!["new.example.com".into()],
        vec![UpstreamSpec::Addr(app.addr.to_string())],
    );
    handle.reload(vec![site, added]).await.unwrap();
    served(addrs.listen, "new.example.com", &root, "from the app").await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(40), running)
        .await
        .expect("the server drains within its drain timeout")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addrs.listen).await.is_err(),
        "nothing listens after the server ended"
    );
}
