//! Helpers of the tests that run the `lobe-tls` binary: reading its output, an upstream
//! for `serve` to forward to, and a client that makes one verified request through it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

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

/// The addresses `lobe-tls serve --ready-file` reports once every listener is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyAddrs {
    /// The TLS listener.
    pub listen: SocketAddr,
    /// The plain HTTP listener, if on.
    pub http_listen: Option<SocketAddr>,
    /// The metrics listener, if on.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin listener, if on.
    pub admin_listen: Option<SocketAddr>,
}

impl ReadyAddrs {
    /// The TLS listener as `"127.0.0.1:PORT"`.
    pub fn listen(&self) -> String {
        self.listen.to_string()
    }

    /// The metrics listener as `"127.0.0.1:PORT"`; panics when it is off.
    pub fn metrics(&self) -> String {
        self.metrics_listen
            .expect("no metrics listener")
            .to_string()
    }

    /// The admin listener as `"127.0.0.1:PORT"`; panics when it is off.
    pub fn admin(&self) -> String {
        self.admin_listen.expect("no admin listener").to_string()
    }

    /// The plain HTTP listener as `"127.0.0.1:PORT"`; panics when it is off.
    pub fn http(&self) -> String {
        self.http_listen.expect("no HTTP listener").to_string()
    }
}

/// Waits (up to 60 s) for `serve --ready-file path` to write `path`, and returns what it
/// wrote. Panics at once, with the exit status, if `child` exits first.
pub fn wait_ready(path: &Path, child: &mut Child) -> ReadyAddrs {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // serve writes the file with a rename: what exists is whole.
        if let Ok(text) = std::fs::read_to_string(path) {
            return parse_ready(&text)
                .unwrap_or_else(|e| panic!("{}: {e}: {text:?}", path.display()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "lobe-tls serve exited with {status} before writing {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "lobe-tls serve did not write {} within 60 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process, std's or tokio's, that [`wait_ready_async`] checks on.
pub trait ChildProcess {
    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus>;
}

impl ChildProcess for Child {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.try_wait().ok().flatten()
    }
}

impl ChildProcess for tokio::process::Child {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.try_wait().ok().flatten()
    }
}

/// [`wait_ready`] for async tests: sleeps without blocking the runtime, so servers the
/// test runs on it keep answering meanwhile.
pub async fn wait_ready_async(path: &Path, child: &mut impl ChildProcess) -> ReadyAddrs {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return parse_ready(&text)
                .unwrap_or_else(|e| panic!("{}: {e}: {text:?}", path.display()));
        }
        if let Some(status) = child.exited() {
            panic!(
                "lobe-tls serve exited with {status} before writing {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "lobe-tls serve did not write {} within 60 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn parse_ready(text: &str) -> Result<ReadyAddrs, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let addr = |key: &str| -> Result<Option<SocketAddr>, String> {
        match json.get(key) {
            Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => {
                s.parse().map(Some).map_err(|e| format!("{key}: {e}"))
            }
            _ => Err(format!("{key} missing or not a string")),
        }
    };
    Ok(ReadyAddrs {
        listen: addr("listen")?.ok_or("listen is null")?,
        http_listen: addr("http_listen")?,
        metrics_listen: addr("metrics_listen")?,
        admin_listen: addr("admin_listen")?,
    })
}

/// The sample names `/metrics` at `addr` can show: each `# TYPE` family under its own
/// name and with the suffixes of its type (`_total` for counters; `_bucket`, `_sum`,
/// `_count` for histograms), so that a family shows even before its first sample.
pub async fn exported_metric_names(addr: &str) -> std::collections::BTreeSet<String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["", "_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The headless browser the browser tests drive: the first Chromium found on PATH.
pub fn chromium() -> &'static str {
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|p| p.join(candidate).is_file()))
            .unwrap_or(false);
        if found {
            return candidate;
        }
    }
    panic!("chromium not found on PATH: install Debian's chromium package (.ci/run does)");
}
