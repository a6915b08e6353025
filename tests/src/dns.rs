//! A real DNS test bed: Knot as the authoritative server and unbound as the recursive
//! resolver in front of it (for Pebble, which does not chase CNAMEs across zones itself),
//! both killed when dropped.
//!
//! Knot listens on port 53 of a random loopback address (127.x.y.z), so that the zones'
//! NS records name a real address and port that the propagation check can reach after
//! discovering them, as it would on the internet. That needs root (or
//! CAP_NET_BIND_SERVICE). unbound listens on a free port of 127.0.0.1.
//!
//! Zones, all served by Knot:
//! - `test.`: the parent, so that no `.test` query leaves the machine;
//! - `lobe.test.`: updatable with the TSIG key; `*` and the apex have A 127.0.0.1;
//!   `_acme-challenge.alias` is a CNAME to `alias.delegate.test.`, and there is a CNAME
//!   loop at `_acme-challenge.loop` and a chain of 12 links at `_acme-challenge.long`;
//! - `delegate.test.`: updatable with the TSIG key, the target of the delegation.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

/// The updatable zone.
pub const ZONE: &str = "lobe.test";
/// The zone that `_acme-challenge.alias.lobe.test` delegates to.
pub const DELEGATE_ZONE: &str = "delegate.test";
/// The name of the hmac-sha256 TSIG key allowed to update both zones.
pub const TSIG_KEY: &str = "acme-update";
/// The name of the hmac-sha512 TSIG key allowed to update both zones.
pub const TSIG_KEY_512: &str = "acme-update-512";

/// Knot plus unbound, with the zones described in the module docs.
pub struct DnsTestbed {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    /// Knot's address (port 53 of a random loopback address).
    pub knot_addr: SocketAddr,
    /// unbound's address.
    pub resolver_addr: SocketAddr,
    /// The secret of [`TSIG_KEY`] (hmac-sha256), base64.
    pub tsig_secret: String,
    /// The secret of [`TSIG_KEY_512`] (hmac-sha512), base64.
    pub tsig_secret_512: String,
    /// unbound's TCP port, held while it lives ([`crate::ports`]; unbound sets SO_REUSEADDR).
    _resolver_port: crate::Reserved,
}

impl std::fmt::Debug for DnsTestbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsTestbed")
            .field("knot_addr", &self.knot_addr)
            .field("resolver_addr", &self.resolver_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for DnsTestbed {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address whose port 53 is free for both UDP and TCP.
fn free_loopback_dns_addr() -> SocketAddr {
    for _ in 0..100 {
        let [a, b, c]: [u8; 3] = rand::random();
        let ip = std::net::Ipv4Addr::new(127, 100 + a % 100, b, c.max(1));
        let addr = SocketAddr::from((ip, 53));
        let udp = UdpSocket::bind(addr);
        let tcp = std::net::TcpListener::bind(addr);
        match (udp, tcp) {
            (Ok(_), Ok(_)) => return addr,
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                panic!(
                    "cannot bind port 53 on loopback ({e}): the DNS tests run Knot there and need root or CAP_NET_BIND_SERVICE"
                )
            }
            _ => {}
        }
    }
    panic!("no loopback address with a free port 53");
}

fn wait_for_tcp(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited early with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn require(binary: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{binary} not found on PATH: apt-get install -y {package}, or run .ci/run"
    );
}

fn zone_files(ns: std::net::IpAddr) -> Vec<(&'static str, String)> {
    // SOA minimum 0: no negative caching, so a record is seen as soon as it exists.
    let soa = |zone: &str| {
        format!(
            "$ORIGIN {zone}.\n$TTL 60\n@ SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 0\n@ NS ns.{zone}.\nns A {ns}\n"
        )
    };
    let mut long_chain = String::new();
    for i in 0..12 {
        let from = if i == 0 {
            "_acme-challenge.long".to_owned()
        } else {
            format!("link{i}")
        };
        long_chain.push_str(&format!("{from} CNAME link{}\n", i + 1));
    }
    vec![
        (
            "test",
            format!(
                "{}lobe NS ns.lobe.test.\nns.lobe A {ns}\ndelegate NS ns.delegate.test.\nns.delegate A {ns}\n",
                soa("test")
            ),
        ),
        (
            ZONE,
            format!(
                "{}@ A 127.0.0.1\n* A 127.0.0.1\n_acme-challenge.alias CNAME alias.{DELEGATE_ZONE}.\n_acme-challenge.loop CNAME loop-back\nloop-back CNAME _acme-challenge.loop\n{long_chain}",
                soa(ZONE)
            ),
        ),
        (DELEGATE_ZONE, soa(DELEGATE_ZONE)),
    ]
}

impl DnsTestbed {
    /// Starts Knot and unbound and waits until both listen.
    pub fn start() -> DnsTestbed {
        require("knotd", "knot");
        require("unbound", "unbound");
        let dir = tempfile::tempdir().expect("tempdir");
        let knot_addr = free_loopback_dns_addr();
        let secret_bytes: [u8; 32] = rand::random();
        let tsig_secret = base64::engine::general_purpose::STANDARD.encode(secret_bytes);
        let secret_bytes: [u8; 64] = std::array::from_fn(|_| rand::random());
        let tsig_secret_512 = base64::engine::general_purpose::STANDARD.encode(secret_bytes);

        for (zone, text) in zone_files(knot_addr.ip()) {
            std::fs::write(dir.path().join(format!("{zone}.zone")), text).expect("zone file");
        }
        let d = dir.path().display();
        let knot_conf = format!(
            r#"server:
    rundir: "{d}"
    pidfile: "{d}/knot.pid"
    listen: {ip}@53
log:
  - target: stderr
    any: info
database:
    storage: "{d}/db"
key:
  - id: {TSIG_KEY}
    algorithm: hmac-sha256
    secret: {tsig_secret}
  - id: {TSIG_KEY_512}
    algorithm: hmac-sha512
    secret: {tsig_secret_512}
acl:
  - id: acme-update
    key: [{TSIG_KEY}, {TSIG_KEY_512}]
    action: update
template:
  - id: default
    storage: "{d}"
    file: "%s.zone"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
zone:
  - domain: test.
  - domain: {ZONE}.
    acl: acme-update
  - domain: {DELEGATE_ZONE}.
    acl: acme-update
"#,
            ip = knot_addr.ip(),
        );
        let knot_conf_path = dir.path().join("knot.conf");
        std::fs::write(&knot_conf_path, knot_conf).expect("knot.conf");

        let mut children = Vec::new();
        let knot_log = dir.path().join("knot.log");
        let log = std::fs::File::create(&knot_log).expect("log");
        let mut knot = Command::new("knotd")
            .arg("-c")
            .arg(&knot_conf_path)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start knotd");
        wait_for_tcp(knot_addr, &mut knot, "knotd", &knot_log);
        children.push(knot);

        let resolver = crate::reserve_dns_port();
        let resolver_port = resolver.port();
        let resolver_addr = SocketAddr::from(([127, 0, 0, 1], resolver_port));
        // Only `.test` is resolved, through Knot; everything else is refused, so that
        // nothing leaves the machine. No DNSSEC validation, no caching of negative answers
        // (Pebble asks right after our own look-ups), no remote control.
        let unbound_conf = format!(
            r#"server:
    interface: 127.0.0.1@{resolver_port}
    port: {resolver_port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: ""
    logfile: ""
    use-syslog: no
    verbosity: 1
    do-ip6: no
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    cache-max-negative-ttl: 0
    cache-max-ttl: 0
    local-zone: "." refuse
    local-zone: "test." transparent
remote-control:
    control-enable: no
stub-zone:
    name: "test."
    stub-addr: {ip}@53
"#,
            ip = knot_addr.ip(),
        );
        let unbound_conf_path = dir.path().join("unbound.conf");
        std::fs::write(&unbound_conf_path, unbound_conf).expect("unbound.conf");
        let unbound_log = dir.path().join("unbound.log");
        let log = std::fs::File::create(&unbound_log).expect("log");
        let mut unbound = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&unbound_conf_path)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start unbound");
        wait_for_tcp(resolver_addr, &mut unbound, "unbound", &unbound_log);
        children.push(unbound);

        DnsTestbed {
            dir,
            children,
            knot_addr,
            resolver_addr,
            tsig_secret,
            tsig_secret_512,
            _resolver_port: resolver,
        }
    }

    /// Writes the TSIG key in BIND's `tsig-keygen` format and returns the file's path.
    pub fn write_tsig_file(&self) -> PathBuf {
        let path = self.dir.path().join("acme-update.key");
        std::fs::write(
            &path,
            format!(
                "key \"{TSIG_KEY}\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{}\";\n}};\n",
                self.tsig_secret
            ),
        )
        .expect("tsig file");
        path
    }

    /// An rfc2136 provider for Knot with the right key.
    pub fn rfc2136_provider(&self) -> lobe_tls::challenge::dns01::Rfc2136Provider {
        let key = lobe_tls::challenge::dns01::TsigKey::new(
            TSIG_KEY,
            lobe_tls::challenge::dns01::TsigAlgorithm::HmacSha256,
            &self.tsig_secret,
        )
        .expect("tsig key");
        lobe_tls::challenge::dns01::Rfc2136Provider::new(&self.knot_addr.to_string(), Some(key))
    }

    /// The TXT values Knot itself serves at `name` (asked with kdig, no recursion).
    pub fn authoritative_txt(&self, name: &str) -> Vec<String> {
        self.dig(self.knot_addr, name, "TXT", true)
    }

    /// Runs `kdig` against `server` and returns the `+short` answer lines, unquoted.
    pub fn dig(&self, server: SocketAddr, name: &str, rtype: &str, norec: bool) -> Vec<String> {
        let mut cmd = Command::new("kdig");
        cmd.arg(format!("@{}", server.ip()))
            .args(["-p", &server.port().to_string(), "+short", "+timeout=2"])
            .args([rtype, name]);
        if norec {
            cmd.arg("+norec");
        }
        let out = cmd.output().expect("run kdig");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().trim_matches('"').to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The temp directory holding the servers' files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
