//! Helpers of the tests that run the `lobe-tls` binary: reading its output, an upstream
//! for `serve` to forward to, and a client that makes one verified request through it.

use std::process::Output;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// Bytes of a process's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The standard output as text.
pub fn stdout(out: &Output) -> String {
    text(&out.stdout)
}

/// The standard error as text.
pub fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

/// Asserts success, showing both outputs otherwise.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

/// Asserts a failure (exit status 1) with exactly one line on stderr, the CLI's
/// `lobe-tls: error: ` line, containing every one of `needles`; returns it.
pub fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("lobe-tls: error: "), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    err
}

/// A TCP upstream on a free loopback port that writes `greeting` to every connection
/// and closes it; returns its address. It runs until the runtime stops.
pub async fn greeting_upstream(greeting: &'static str) -> String {
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = upstream.local_addr().expect("upstream address").to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(greeting.as_bytes()).await;
            });
        }
    });
    addr
}

/// What a client of `serve` got through one TLS connection.
#[derive(Debug)]
pub struct TlsAnswer {
    /// Everything the upstream wrote, to the end.
    pub text: String,
    /// The certificate served.
    pub leaf: lobe_tls::CertInfo,
    /// Whether the session was resumed.
    pub kind: rustls::HandshakeKind,
}

/// One request as a browser makes it: a handshake with `server_name` (an IP address is
/// sent without SNI) verified by `connector` (e.g. trusting Pebble's root), then the
/// upstream's whole answer, all within 5 s.
pub async fn tls_request(
    connector: &TlsConnector,
    addr: &str,
    server_name: &str,
) -> Result<TlsAnswer, String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let session = tls.get_ref().1;
        let kind = session.handshake_kind().ok_or("handshake unfinished")?;
        let leaf = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or("no certificate served")?;
        let leaf = lobe_tls::CertInfo::from_der(leaf).map_err(|e| e.to_string())?;
        let mut text = String::new();
        tls.read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
        Ok(TlsAnswer { text, leaf, kind })
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

/// A child process (`lobe-tls serve`, a peer server), killed and reaped when dropped,
/// so that a test failing half-way leaves nothing running.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
