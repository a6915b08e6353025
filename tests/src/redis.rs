//! A real `redis-server` on a free loopback port, without persistence, killed on drop.
//! It can be stopped and started again on the same port to test outages.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or deliberately stopped) redis-server.
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    password: Option<String>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        Self::start_inner(None)
    }

    /// Starts redis-server with `requirepass password`: clients must authenticate.
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_inner(Some(password.to_owned()))
    }

    fn start_inner(password: Option<String>) -> RedisServer {
        crate::require("redis-server");
        let mut server = RedisServer {
            dir: tempfile::tempdir().expect("tempdir"),
            port: crate::free_port(),
            child: None,
            password,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL: an outage, not a clean shutdown). Data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::stop`]), empty.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("log");
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start redis-server");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers_ping(addr) {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log"));
                panic!("redis-server exited early with {status}: {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

/// Whether a server on `addr` answers an inline PING with +PONG, or with -NOAUTH when it
/// wants a password (it accepts connections before it has loaded, so a TCP connect alone
/// is not enough).
fn answers_ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate stored under `name` for `domain`, for store tests.
pub fn sample_cert(name: &str, domain: &str) -> lobe_tls::StoredCert {
    use lobe_tls::{CertBundle, CertMeta, KeyType, StoredCert};
    let key = KeyType::EcdsaP256.generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![domain.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    StoredCert {
        bundle: CertBundle::from_pem(cert.pem(), key.serialize_pem()).expect("bundle"),
        meta: CertMeta {
            name: name.into(),
            domains: vec![lobe_tls::DomainName::parse(domain).expect("domain")],
            key_type: KeyType::EcdsaP256,
            challenge: Default::default(),
            directory: "https://ca.test/dir".into(),
            issued_at: time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .expect("time"),
        },
    }
}
