//! Test harness: real Pebble and pebble-challtestsrv processes on reserved loopback ports,
//! killed when dropped.
//!
//! Pebble needs a TLS certificate for its own listener. The harness makes a small CA and
//! a `localhost` leaf signed by it, and hands the CA to clients as `--directory-ca`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lobe_tls::AcmeConfig;

pub mod ari_shim;
pub mod backend;
pub mod cli;
pub mod cloudflare_api;
pub mod dns;
pub mod faulty_path;
pub mod http_server;
pub mod ports;
pub mod redis;
pub mod redis_cluster;
pub mod tls;

pub use ports::{Reserved, reserve_dns_port, reserve_port};
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;

/// Pebble's example EAB key id and its HMAC key (base64url).
pub const EAB_KID: &str = "kid-1";
/// The HMAC key for [`EAB_KID`].
pub const EAB_HMAC: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

/// Polls `check` every 20 ms until it holds; panics naming `what` after `within`. For
/// waiting on a condition instead of sleeping a guessed time.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How to start Pebble.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Require External Account Binding (with [`EAB_KID`]).
    pub eab_required: bool,
    /// `certificateValidityPeriod` in seconds, if not Pebble's default.
    pub validity_secs: Option<u64>,
    /// `PEBBLE_WFE_NONCEREJECT` (percent); Pebble's default (5) when `None`.
    pub nonce_reject: Option<u8>,
    /// `PEBBLE_AUTHZREUSE` (percent); Pebble's default (50) when `None`.
    pub authz_reuse: Option<u8>,
    /// A DNS server for Pebble to validate against instead of challtestsrv.
    pub dns_server: Option<SocketAddr>,
    /// `PEBBLE_VA_NOSLEEP=1`: skip Pebble's random validation delay. On by default.
    pub no_sleep: bool,
}

impl Default for PebbleOptions {
    fn default() -> Self {
        PebbleOptions {
            eab_required: false,
            validity_secs: None,
            nonce_reject: None,
            authz_reuse: None,
            dns_server: None,
            no_sleep: true,
        }
    }
}

/// A running Pebble plus challtestsrv. Both die with this value.
pub struct Pebble {
    _dir: tempfile::TempDir,
    children: Vec<Child>,
    /// The ACME directory URL.
    pub directory_url: String,
    /// The CA file that makes Pebble's own HTTPS trusted.
    pub ca_file: PathBuf,
    /// Pebble's management API base URL (HTTPS).
    pub management_url: String,
    /// The port Pebble sends HTTP-01 validation requests to (on 127.0.0.1).
    pub http_port: u16,
    /// The port Pebble sends TLS-ALPN-01 validation handshakes to (on 127.0.0.1).
    pub tls_port: u16,
    /// challtestsrv's DNS server.
    pub dns_addr: SocketAddr,
    /// challtestsrv's management API base URL.
    pub challtestsrv_url: String,
    /// Where Pebble's log goes.
    pub log_file: PathBuf,
    /// Its ports, held until it dies ([`crate::ports`]); `http_port` and `tls_port` stay
    /// reserved for the test's own server.
    _ports: Vec<Reserved>,
}

impl std::fmt::Debug for Pebble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pebble")
            .field("directory_url", &self.directory_url)
            .finish_non_exhaustive()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes a CA and a `localhost`/`127.0.0.1` leaf signed by it, for Pebble's listener.
/// Returns (ca_pem, leaf_pem, leaf_key_pem).
pub fn make_listener_certs() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lobe-tls test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("leaf params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

fn wait_for_tcp(addr: SocketAddr, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(crate) fn require(binary: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{binary} not found on PATH: install its Debian package (pebble, redis-server), or run .ci/run"
    );
}

impl Pebble {
    /// Starts Pebble and challtestsrv with `options`, and waits until both listen.
    pub fn start(options: PebbleOptions) -> Pebble {
        require("pebble");
        require("pebble-challtestsrv");
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, leaf_pem, leaf_key) = make_listener_certs();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write ca");
        std::fs::write(dir.path().join("cert.pem"), leaf_pem).expect("write cert");
        std::fs::write(dir.path().join("key.pem"), leaf_key).expect("write key");

        let ports = vec![
            reserve_port(),
            reserve_port(),
            reserve_port(),
            reserve_port(),
            reserve_dns_port(),
            reserve_port(),
        ];
        let [
            acme_port,
            mgmt_port,
            http_port,
            tls_port,
            dns_port,
            cts_mgmt_port,
        ] = [0, 1, 2, 3, 4, 5].map(|i| ports[i].port());

        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": options.eab_required,
            }
        });
        if options.eab_required {
            config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ EAB_KID: EAB_HMAC });
        }
        if let Some(secs) = options.validity_secs {
            config["pebble"]["certificateValidityPeriod"] = serde_json::json!(secs);
        }
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).expect("write config");

        let mut children = Vec::new();
        let cts_log = std::fs::File::create(dir.path().join("challtestsrv.log")).expect("log");
        let mut cts = Command::new("pebble-challtestsrv")
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{cts_mgmt_port}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::from(cts_log.try_clone().expect("log")))
            .stderr(Stdio::from(cts_log))
            .spawn()
            .expect("start pebble-challtestsrv");
        wait_for_tcp(
            SocketAddr::from(([127, 0, 0, 1], cts_mgmt_port)),
            &mut cts,
            "pebble-challtestsrv",
        );
        children.push(cts);

        let dns_addr = SocketAddr::from(([127, 0, 0, 1], dns_port));
        let log_file = dir.path().join("pebble.log");
        let log = std::fs::File::create(&log_file).expect("log");
        let mut pebble = Command::new("pebble");
        pebble
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(options.dns_server.unwrap_or(dns_addr).to_string())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        if options.no_sleep {
            pebble.env("PEBBLE_VA_NOSLEEP", "1");
        }
        if let Some(pct) = options.nonce_reject {
            pebble.env("PEBBLE_WFE_NONCEREJECT", pct.to_string());
        }
        if let Some(pct) = options.authz_reuse {
            pebble.env("PEBBLE_AUTHZREUSE", pct.to_string());
        }
        let mut pebble = pebble.spawn().expect("start pebble");
        wait_for_tcp(
            SocketAddr::from(([127, 0, 0, 1], acme_port)),
            &mut pebble,
            "pebble",
        );
        wait_for_tcp(
            SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
            &mut pebble,
            "pebble's management API",
        );
        children.push(pebble);

        Pebble {
            _dir: dir,
            children,
            directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
            ca_file,
            management_url: format!("https://127.0.0.1:{mgmt_port}"),
            http_port,
            tls_port,
            dns_addr,
            challtestsrv_url: format!("http://127.0.0.1:{cts_mgmt_port}"),
            log_file,
            _ports: ports,
        }
    }

    /// An ACME configuration pointing at this Pebble.
    pub fn acme_config(&self) -> AcmeConfig {
        let mut config = AcmeConfig::new(self.directory_url.clone());
        config.directory_ca = Some(self.ca_file.clone());
        config.order_timeout = Duration::from_secs(60);
        config
    }

    /// The HTTP-01 listen address matching Pebble's `httpPort`.
    pub fn http_listen(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// The same address, for binding a listener in the test.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// The TLS-ALPN-01 listen address matching Pebble's `tlsPort`.
    pub fn tls_listen(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    /// The same address, for binding a listener in the test.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port))
    }

    /// Fetches the root that issues this Pebble's certificates (`/roots/0`).
    pub async fn issuing_root_pem(&self) -> String {
        self.management_get("/roots/0").await
    }

    /// GETs a path from Pebble's management API and returns the body.
    pub async fn management_get(&self, path: &str) -> String {
        use http_body_util::BodyExt;
        let roots = lobe_tls::net::root_store(Some(&self.ca_file)).expect("roots");
        let client = lobe_tls::net::http_client::<http_body_util::Empty<bytes::Bytes>>(roots)
            .expect("client");
        let uri: hyper::Uri = format!("{}{path}", self.management_url)
            .parse()
            .expect("uri");
        // Pebble opens its management listener a moment after the ACME one: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let rsp = loop {
            match client.get(uri.clone()).await {
                Ok(rsp) => break rsp,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("management API unreachable: {e:?}"),
            }
        };
        assert!(
            rsp.status().is_success(),
            "management API: {}",
            rsp.status()
        );
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(body.to_vec()).expect("utf-8")
    }

    /// The number of orders Pebble has accepted, from its log.
    pub fn orders_created(&self) -> usize {
        std::fs::read_to_string(&self.log_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("There are now") && l.ends_with("orders in the db"))
            .count()
    }

    /// The temp directory holding Pebble's files.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// Verifies `fullchain_pem` against `root_pem` for `server_name` with webpki, as a client would.
pub fn verify_chain(fullchain_pem: &str, root_pem: &str, server_name: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots
            .add(root.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        lobe_tls::cert::crypto_provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Starts a tracing subscriber once, honouring `RUST_LOG`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The TXT values a DNS server at `server` returns for `fqdn`, asked without a cache.
/// Empty when the name has none.
pub async fn txt_values(server: SocketAddr, fqdn: &str) -> Vec<String> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;

    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    let resolver = hickory_resolver::TokioResolver::builder_with_config(
        config,
        TokioConnectionProvider::default(),
    )
    .with_options(opts)
    .build();
    let mut values: Vec<String> = match resolver.txt_lookup(fqdn).await {
        Ok(lookup) => lookup
            .iter()
            .map(|txt| {
                txt.txt_data()
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    values.sort();
    values
}

/// Asks challtestsrv (at `challtestsrv_url`) to add a TXT value, as another client would.
pub async fn challtestsrv_set_txt(challtestsrv_url: &str, fqdn: &str, value: &str) {
    use lobe_tls::challenge::DnsProvider;
    lobe_tls::challenge::dns01::ChalltestsrvProvider::new(challtestsrv_url)
        .expect("provider")
        .present(fqdn, value)
        .await
        .expect("set-txt");
}

/// The Unix permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
