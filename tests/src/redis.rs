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
    /// Holds `port` across restarts ([`crate::ports`]).
    _reserved: crate::Reserved,
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
        let reserved = crate::reserve_port();
        let mut server = RedisServer {
            dir: tempfile::tempdir().expect("tempdir"),
            port: reserved.port(),
            child: None,
            password,
            _reserved: reserved,
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

    /// How many subscriptions to channels the server holds, over all clients.
    pub async fn subscribers(&self) -> usize {
        let url = match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => self.url(),
        };
        let client = redis::Client::open(url).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server");
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut conn)
            .await
            .expect("PUBSUB CHANNELS");
        if channels.is_empty() {
            return 0;
        }
        let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channels)
            .query_async(&mut conn)
            .await
            .expect("PUBSUB NUMSUB");
        counts.iter().map(|(_, n)| n).sum()
    }

    /// Waits (10 s at most) until the server holds `at_least` channel subscriptions: a
    /// subscriber started in the background is in place, and hears what is published next.
    pub async fn wait_subscribers(&self, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.subscribers().await;
            if now >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{now} subscriptions on redis-server after 10 s, expected {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    let domains = vec![lobe_tls::DomainName::parse(domain).expect("domain")];
    let issued_at = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("time");
    StoredCert::new(
        CertBundle::from_pem(cert.pem(), key.serialize_pem()).expect("bundle"),
        CertMeta::new(name, domains, "https://ca.test/dir").with_issued_at(issued_at),
    )
}

/// A Redis deployment behind Sentinel on loopback: a master, one replica and three
/// sentinels (quorum 2) monitoring it as [`SentinelCluster::SERVICE`]. Failover is quick:
/// a node is down after 1 s without answers. Every process dies with this value.
pub struct SentinelCluster {
    dir: tempfile::TempDir,
    password: Option<String>,
    sentinel_password: bool,
    /// Data nodes: the first master, then the replica.
    nodes: Vec<(u16, Option<Child>)>,
    sentinels: Vec<(u16, Option<Child>)>,
    /// Every node's and sentinel's port, held while the cluster lives ([`crate::ports`]).
    ports: Vec<crate::Reserved>,
}

impl std::fmt::Debug for SentinelCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelCluster")
            .field("nodes", &self.nodes.iter().map(|n| n.0).collect::<Vec<_>>())
            .field(
                "sentinels",
                &self.sentinels.iter().map(|n| n.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl SentinelCluster {
    /// The master name the sentinels monitor.
    pub const SERVICE: &'static str = "lobe";

    /// Starts the data nodes and the sentinels, and waits until the sentinels know the
    /// replica and each other (so a failover can be authorised). With `password`, the
    /// data nodes require it; with `sentinel_password` too, so do the sentinels (the same
    /// one), otherwise the sentinels take no password.
    pub fn start(password: Option<&str>, sentinel_password: bool) -> SentinelCluster {
        crate::require("redis-server");
        let mut cluster = SentinelCluster {
            dir: tempfile::tempdir().expect("tempdir"),
            password: password.map(str::to_owned),
            sentinel_password: sentinel_password && password.is_some(),
            nodes: Vec::new(),
            sentinels: Vec::new(),
            ports: Vec::new(),
        };
        let master = cluster.reserve_port();
        cluster.start_data_node(master, None);
        let replica = cluster.reserve_port();
        cluster.start_data_node(replica, Some(master));
        cluster.wait(Duration::from_secs(20), "the replica to sync", |c| {
            c.query(replica, &["INFO", "replication"])
                .is_some_and(|info| info.contains("master_link_status:up"))
        });
        for _ in 0..3 {
            cluster.start_sentinel(master);
        }
        cluster.wait(
            Duration::from_secs(30),
            "the sentinels to know the replica and each other",
            |c| {
                c.sentinels.iter().all(|(port, _)| {
                    let Some(info) = c.sentinel_query(*port, &["INFO", "sentinel"]) else {
                        return false;
                    };
                    info.contains("status=ok,address=127.0.0.1:")
                        && info.contains(",slaves=1,sentinels=3")
                })
            },
        );
        cluster
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/lobe/`.
    pub fn url(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!(
            "redis+sentinel://{auth}{}/{}/",
            hosts.join(","),
            Self::SERVICE
        )
    }

    /// A plain `redis://` URL for data node `port` (to look behind the store's back).
    pub fn node_url(&self, port: u16) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("redis://{auth}127.0.0.1:{port}/")
    }

    /// The port of the master as the first sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|(port, _)| {
            let addr: Vec<String> = self.sentinel_cmd(
                *port,
                &["SENTINEL", "get-master-addr-by-name", Self::SERVICE],
            )?;
            addr.get(1)?.parse().ok()
        })
    }

    /// Kills the current master with SIGKILL and returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let master = self.master_port().expect("the sentinels name a master");
        let node = self
            .nodes
            .iter_mut()
            .find(|(port, _)| *port == master)
            .expect("the master is one of the data nodes");
        if let Some(mut child) = node.1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        master
    }

    /// Waits until the sentinels name a master other than `old` and it says it is one;
    /// returns its port.
    pub fn wait_for_failover(&self, old: u16, within: Duration) -> u16 {
        self.wait(within, "the sentinels to promote the replica", |c| {
            c.master_port().is_some_and(|port| {
                port != old
                    && c.query(port, &["ROLE"])
                        .is_some_and(|role| role.starts_with("master"))
            })
        });
        self.master_port().expect("a master")
    }

    /// Asks a sentinel for a graceful failover (`SENTINEL FAILOVER`): the master stays up
    /// and becomes a replica. Returns the old master's port.
    pub fn failover(&self) -> u16 {
        let old = self.master_port().expect("the sentinels name a master");
        let (port, _) = self
            .sentinels
            .iter()
            .find(|(_, child)| child.is_some())
            .expect("a live sentinel");
        let ok: Option<String> = self.sentinel_cmd(*port, &["SENTINEL", "FAILOVER", Self::SERVICE]);
        assert_eq!(ok.as_deref(), Some("OK"), "SENTINEL FAILOVER refused");
        old
    }

    /// Kills sentinel `index` (in the order of [`SentinelCluster::url`]) with SIGKILL.
    pub fn kill_sentinel(&mut self, index: usize) {
        if let Some(mut child) = self.sentinels[index].1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until a client (a store following the sentinels: they do not subscribe to
    /// each other) is subscribed on one of the live sentinels.
    pub fn wait_sentinel_subscriber(&self, within: Duration) {
        self.wait(within, "a client subscribed on a live sentinel", |c| {
            c.sentinels.iter().any(|(port, child)| {
                child.is_some()
                    && c.sentinel_query(*port, &["CLIENT", "LIST"])
                        .is_some_and(|list| {
                            list.split_whitespace()
                                .any(|field| field.starts_with("sub=") && field != "sub=0")
                        })
            })
        });
    }

    /// The ports of the data nodes, master first as started.
    pub fn data_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(port, _)| *port).collect()
    }

    /// Runs `args` on data node `port` and asserts it answers OK.
    pub fn command(&self, port: u16, args: &[&str]) {
        let reply = self.query(port, args);
        assert_eq!(reply.as_deref(), Some("OK"), "{args:?} on {port}");
    }

    /// What data node `port` says its role is (`master`, `slave`), if it answers.
    pub fn role(&self, port: u16) -> Option<String> {
        self.query(port, &["ROLE"])
    }

    fn start_data_node(&mut self, port: u16, replica_of: Option<u16>) {
        let log = self.dir.path().join(format!("redis-{port}.log"));
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dbfilename", &format!("dump-{port}.rdb")])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password, "--masterauth", password]);
        }
        if let Some(master) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = spawn_logged(cmd, &log);
        self.nodes.push((port, Some(child)));
        self.wait(Duration::from_secs(20), "redis-server to start", |c| {
            c.query(port, &["PING"]).is_some()
        });
    }

    /// A port held for as long as the cluster lives.
    fn reserve_port(&mut self) -> u16 {
        let reserved = crate::reserve_port();
        let port = reserved.port();
        self.ports.push(reserved);
        port
    }

    fn start_sentinel(&mut self, master: u16) {
        let port = self.reserve_port();
        let service = Self::SERVICE;
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {service} 127.0.0.1 {master} 2\n\
             sentinel down-after-milliseconds {service} 1000\n\
             sentinel failover-timeout {service} 3000\n\
             sentinel parallel-syncs {service} 1\n",
            dir = self.dir.path().display()
        );
        if let Some(password) = &self.password {
            conf.push_str(&format!("sentinel auth-pass {service} {password}\n"));
            if self.sentinel_password {
                conf.push_str(&format!("requirepass {password}\n"));
            }
        }
        let path = self.dir.path().join(format!("sentinel-{port}.conf"));
        std::fs::write(&path, conf).expect("write sentinel.conf");
        let mut cmd = Command::new("redis-server");
        cmd.arg(&path).arg("--sentinel");
        let log = self.dir.path().join(format!("sentinel-{port}.log"));
        let child = spawn_logged(cmd, &log);
        self.sentinels.push((port, Some(child)));
        self.wait(Duration::from_secs(20), "redis-sentinel to start", |c| {
            c.sentinel_query(port, &["PING"]).is_some()
        });
    }

    fn wait(&self, within: Duration, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs in {}: {}",
                self.dir.path().display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    out.push_str(&format!("\n== {}\n", path.display()));
                    for line in tail.into_iter().rev() {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// A data node's reply to `args` as text (a status, bulk string or the first element
    /// of an array), or `None` when it does not answer.
    fn query(&self, port: u16, args: &[&str]) -> Option<String> {
        let value: redis::Value = run(port, self.password.as_deref(), args)?;
        text_of(&value)
    }

    fn sentinel_query(&self, port: u16, args: &[&str]) -> Option<String> {
        let value: redis::Value = self.sentinel_cmd(port, args)?;
        text_of(&value)
    }

    fn sentinel_cmd<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> Option<T> {
        let password = self.password.as_deref().filter(|_| self.sentinel_password);
        run(port, password, args)
    }
}

impl Drop for SentinelCluster {
    fn drop(&mut self) {
        for (_, child) in self.sentinels.iter_mut().chain(self.nodes.iter_mut()) {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn_logged(mut cmd: Command, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    cmd.stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start redis-server")
}

/// Runs one command on 127.0.0.1:`port` with short timeouts; `None` on any failure.
fn run<T: redis::FromRedisValue>(port: u16, password: Option<&str>, args: &[&str]) -> Option<T> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn).ok()
}

fn text_of(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::Okay => Some("OK".to_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        redis::Value::Array(items) => items.first().and_then(text_of),
        _ => None,
    }
}
