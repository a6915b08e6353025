//! The flags of `lobe-tls serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lobe_tls::edge::{IpNet, LbPolicy, Mode};
use lobe_tls::{Error, OnDemandConfig, Result, domain};

use crate::challenge_args::ChallengeArgs;
use crate::profile_args::ProfileArgs;

/// Options of `lobe-tls serve`.
#[derive(clap::Args, Debug)]
// Shared with issue and renew, which list them under ACME: here --config is the sites
// file first, and --tls-listen still parses but is hidden (TLS-ALPN-01 is answered on
// --listen).
#[command(
    mut_arg("config_file", |a| a.help_heading("Sites and upstreams")),
    mut_arg("tls_listen", |a| a.hide(true))
)]
pub struct Args {
    /// Check the flags and the --config file, then exit: print `ok: N sites, M upstreams,
    /// K certificate names` (exit 0) or every error found, one line each (exit 2). Binds,
    /// orders and contacts nothing.
    #[arg(long)]
    pub check_config: bool,

    /// Address to accept TLS connections on.
    #[arg(
        long,
        env = "LOBE_TLS_LISTEN",
        default_value = "0.0.0.0:443",
        help_heading = "Listeners"
    )]
    pub listen: SocketAddr,

    /// `http` (default): an HTTP/1.1 and h2 proxy with pooled keep-alive connections to
    /// the upstreams. `tcp`: decrypted bytes forwarded as they arrive.
    #[arg(
        long,
        env = "LOBE_TLS_MODE",
        default_value = "http",
        help_heading = "Listeners"
    )]
    pub mode: Mode,

    /// Upstream address (host:port) of the site these flags describe, which answers every
    /// Host that no site of the --config file claims. Repeatable.
    #[arg(
        long,
        env = "LOBE_TLS_UPSTREAM",
        value_delimiter = ',',
        help_heading = "Sites and upstreams"
    )]
    pub upstream: Vec<String>,

    /// Balancing over the --upstream addresses: least-conn, round-robin, ip-hash or cookie.
    /// The affinity cookie's name is `cookie_name` of a `[[site]]` table (README, "Sites").
    #[arg(
        long,
        env = "LOBE_TLS_LB",
        default_value = "least-conn",
        help_heading = "Balancing and health"
    )]
    pub lb: LbPolicy,

    /// Path of the active HTTP health check of the --upstream addresses (e.g. /healthz).
    /// A `[[site]]` table of --config also sets `health_timeout` and the checks in a row
    /// that bring an upstream back (`rise`) or take it out (`fall`) (README, "Health").
    #[arg(
        long,
        env = "LOBE_TLS_HEALTH_PATH",
        help_heading = "Balancing and health"
    )]
    pub health_path: Option<String>,

    /// Seconds between health checks.
    #[arg(
        long,
        env = "LOBE_TLS_HEALTH_INTERVAL",
        default_value_t = 5.0,
        help_heading = "Balancing and health"
    )]
    pub health_interval: f64,

    /// Send `Strict-Transport-Security: max-age=SECONDS` from the --upstream site.
    #[arg(
        long,
        env = "LOBE_TLS_HSTS",
        value_name = "SECONDS",
        help_heading = "Sites and upstreams"
    )]
    pub hsts: Option<u64>,

    /// tcp mode: start each upstream connection with a PROXY v2 header.
    #[arg(long, env = "LOBE_TLS_SEND_PROXY_V2", help_heading = "Client identity")]
    pub send_proxy_v2: bool,

    /// Require a PROXY v1/v2 header from an outer load balancer on --listen; connections
    /// without one, or from a peer outside --trusted-proxy, are refused before TLS.
    #[arg(
        long,
        env = "LOBE_TLS_ACCEPT_PROXY_PROTOCOL",
        help_heading = "Client identity"
    )]
    pub accept_proxy_protocol: bool,

    /// Network (CIDR) whose X-Forwarded-* and Forwarded headers are kept (from anyone
    /// else they are replaced), and, with --accept-proxy-protocol, the only peers that
    /// may connect and whose PROXY headers are believed. Repeatable.
    #[arg(
        long = "trusted-proxy",
        env = "LOBE_TLS_TRUSTED_PROXY",
        value_delimiter = ',',
        help_heading = "Client identity"
    )]
    pub trusted_proxies: Vec<IpNet>,

    /// Largest request body in bytes for the --upstream site (413 beyond).
    #[arg(long, env = "LOBE_TLS_MAX_BODY_SIZE", help_heading = "Limits")]
    pub max_body_size: Option<u64>,

    /// Client network (CIDR, or a bare address) admitted to the --upstream site; with
    /// any, everyone else gets 403. Judged on the address after --trusted-proxy and
    /// PROXY handling, never X-Forwarded-For. Repeatable. (TOML sites: `allow`.)
    #[arg(
        long,
        env = "LOBE_TLS_ALLOW",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = cidr,
        help_heading = "Access control"
    )]
    pub allow: Vec<String>,

    /// Client network (CIDR, or a bare address) refused 403 by the --upstream site; wins
    /// over --allow. Repeatable. (TOML sites: `deny`.)
    #[arg(
        long,
        env = "LOBE_TLS_DENY",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = cidr,
        help_heading = "Access control"
    )]
    pub deny: Vec<String>,

    /// API keys admitted by the --upstream site: a file of `NAME:HASH` lines (HASH
    /// `sha256:<lowercase hex>`, from `printf %s KEY | sha256sum`, or `$argon2id$...`).
    /// The key comes in `X-Api-Key` or `Authorization: Bearer`; without a valid one, 401.
    /// Re-read on SIGHUP. (TOML sites: `api_keys_file`.)
    #[arg(
        long,
        env = "LOBE_TLS_API_KEYS_FILE",
        value_name = "PATH",
        help_heading = "Access control"
    )]
    pub api_keys_file: Option<PathBuf>,

    /// Basic-auth users admitted by the --upstream site: an htpasswd file with bcrypt
    /// (`htpasswd -B`) or argon2 hashes; without a valid password, 401. With
    /// --api-keys-file too, either credential admits. Re-read on SIGHUP. (TOML sites:
    /// `basic_auth_file`.)
    #[arg(
        long,
        env = "LOBE_TLS_BASIC_AUTH_FILE",
        value_name = "PATH",
        help_heading = "Access control"
    )]
    pub basic_auth_file: Option<PathBuf>,

    /// Connections open at once, in total; more are refused. Default: (open-file limit -
    /// 256) / 2, after serve raised its soft open-file limit to the hard one; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_CONNS", help_heading = "Limits")]
    pub max_conns: Option<usize>,

    /// Connections open at once from one client address (with --accept-proxy-protocol,
    /// the one the PROXY header names); more are refused. Peers in --trusted-proxy are
    /// not capped per address. Default: 4096; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_CONNS_PER_IP", help_heading = "Limits")]
    pub max_conns_per_ip: Option<usize>,

    /// Requests in flight at once from one client address (grouped as for
    /// --max-conns-per-ip), over HTTP/1.1 and h2 together; an event stream or a
    /// WebSocket counts while it is open. More are answered 429 at once, without reaching
    /// an upstream. Peers in --trusted-proxy are not capped. Default: 1024; 0: no cap.
    #[arg(long, env = "LOBE_TLS_MAX_REQUESTS_PER_IP", help_heading = "Limits")]
    pub max_requests_per_ip: Option<usize>,

    /// Bytes of request bodies one client connection may hold at once so that a request
    /// can be sent again to another upstream when the first fails (each body at most
    /// 64 KiB); a body that does not fit streams through once, unretried. Default:
    /// 1048576 (1 MiB); 0: no body is retried.
    #[arg(
        long,
        env = "LOBE_TLS_RETRY_BUFFER_PER_CONN",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub retry_buffer_per_conn: Option<usize>,

    /// As --retry-buffer-per-conn, for all connections together. Default: 67108864
    /// (64 MiB).
    #[arg(
        long,
        env = "LOBE_TLS_RETRY_BUFFER_TOTAL",
        value_name = "BYTES",
        help_heading = "Limits"
    )]
    pub retry_buffer_total: Option<usize>,

    /// Requests per second per client address; more are answered 429 with Retry-After.
    #[arg(long, env = "LOBE_TLS_RATE_LIMIT", help_heading = "Limits")]
    pub rate_limit: Option<u32>,

    /// Leading bits of an IPv4 address that make one client for --max-conns-per-ip and
    /// --rate-limit (or `client_prefix_v4` in --config). Default: 32, each address.
    #[arg(
        long,
        env = "LOBE_TLS_CLIENT_PREFIX_V4",
        value_name = "BITS",
        help_heading = "Client identity"
    )]
    pub client_prefix_v4: Option<u32>,

    /// Leading bits of an IPv6 address that make one client for --max-conns-per-ip and
    /// --rate-limit (or `client_prefix_v6` in --config). Default: 64, so a /64 (one
    /// host's or one site's subnet) is one client.
    #[arg(
        long,
        env = "LOBE_TLS_CLIENT_PREFIX_V6",
        value_name = "BITS",
        help_heading = "Client identity"
    )]
    pub client_prefix_v6: Option<u32>,

    /// Threads that accept and serve client connections, each serving its own
    /// connections start to finish (default: one per CPU).
    #[arg(long, env = "LOBE_TLS_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024), help_heading = "Listeners")]
    pub threads: Option<u16>,

    /// Seconds a client has to send a request's headers.
    #[arg(
        long,
        env = "LOBE_TLS_HEADER_READ_TIMEOUT",
        default_value_t = 10,
        help_heading = "Limits"
    )]
    pub header_read_timeout: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(
        long,
        env = "LOBE_TLS_METRICS_LISTEN",
        help_heading = "Logging and admin"
    )]
    pub metrics_listen: Option<SocketAddr>,

    /// The admin listener (plain HTTP): /healthz, /readyz, /metrics, /status and
    /// /status.json; `off` disables it. On an address that is not loopback, /status and
    /// /status.json need a Bearer token: give --admin-token-file.
    #[arg(
        long,
        env = "LOBE_TLS_ADMIN_LISTEN",
        value_name = "ADDR|off",
        default_value = "127.0.0.1:9180",
        value_parser = admin_listen,
        help_heading = "Logging and admin"
    )]
    pub admin_listen: AdminListen,

    /// A file holding the Bearer token that /status and /status.json require when
    /// --admin-listen is not a loopback address.
    #[arg(
        long,
        env = "LOBE_TLS_ADMIN_TOKEN_FILE",
        value_name = "PATH",
        help_heading = "Logging and admin"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// Access log: one line per request (and per WebSocket or event stream, when it
    /// ends) to stdout, stderr or a file (appended to, reopened on SIGUSR1 for
    /// logrotate); off by default. A `[[site]]` may set `access_log = false`.
    #[arg(
        long,
        env = "LOBE_TLS_ACCESS_LOG",
        value_name = "stdout|stderr|PATH|off",
        default_value = "off",
        help_heading = "Logging and admin"
    )]
    pub access_log: String,

    /// Access log lines as JSON objects (every field; see the README) or in the NCSA
    /// common log format.
    #[arg(
        long,
        env = "LOBE_TLS_ACCESS_LOG_FORMAT",
        value_name = "json|common",
        default_value = "json",
        help_heading = "Logging and admin"
    )]
    pub access_log_format: lobe_tls::edge::AccessLogFormat,

    /// Serve the certificates another process writes here (certbot's live/, a Kubernetes
    /// secret mount, fullchain.pem/privkey.pem or tls.crt/tls.key pairs); repeatable.
    #[arg(
        long = "cert-dir",
        env = "LOBE_TLS_CERT_DIR",
        value_delimiter = ',',
        help_heading = "Certificates"
    )]
    pub cert_dirs: Vec<PathBuf>,

    /// Certificate for clients that send no or an unknown server name: a certificate's
    /// name in the store, a pair's name under --cert-dir, or a DNS name one of them
    /// serves. Without it such handshakes are refused.
    #[arg(long, env = "LOBE_TLS_DEFAULT_NAME", help_heading = "Certificates")]
    pub default_name: Option<String>,

    /// Name of the managed certificate in the store (default: its first domain, with `*`
    /// as `_`, as `issue` names it).
    #[arg(long, help_heading = "Certificates")]
    pub name: Option<String>,

    /// Domain of a certificate to manage: issued at start if the store lacks it, then
    /// renewed in the background. Repeatable.
    #[arg(short = 'd', long = "domain", help_heading = "Certificates")]
    pub domains: Vec<String>,

    #[command(flatten)]
    pub challenge: ChallengeArgs,

    #[command(flatten)]
    pub profile: ProfileArgs,

    /// Do not listen for plain HTTP (challenges and the redirect to https) on --http-listen.
    #[arg(long, env = "LOBE_TLS_NO_HTTP", help_heading = "Listeners")]
    pub no_http: bool,

    /// Close connections, streams and WebSockets of the --upstream site that move no byte
    /// for this many seconds (sites of the --config file set their own idle_timeout).
    #[arg(
        long,
        env = "LOBE_TLS_IDLE_TIMEOUT",
        default_value_t = 3600,
        help_heading = "Sites and upstreams"
    )]
    pub idle_timeout: u64,

    /// Once every listener is bound, write their addresses here as JSON
    /// ({"listen": "127.0.0.1:8443", "http_listen": ..., "metrics_listen": ...}), for
    /// scripts and supervisors; the bound addresses are logged too (useful with port 0).
    #[arg(
        long,
        env = "LOBE_TLS_READY_FILE",
        value_name = "PATH",
        help_heading = "Listeners"
    )]
    pub ready_file: Option<PathBuf>,

    /// On SIGTERM, seconds to let open connections finish before cutting them.
    #[arg(
        long,
        env = "LOBE_TLS_DRAIN_TIMEOUT",
        default_value_t = 30,
        help_heading = "Listeners"
    )]
    pub drain_timeout: u64,

    #[command(flatten)]
    pub on_demand: OnDemandArgs,
}

/// On-demand TLS: certificates issued during the first handshake for a new name.
#[derive(clap::Args)]
pub struct OnDemandArgs {
    /// Issue a certificate during the first handshake for a name nothing serves, if
    /// GET URL?domain=NAME answers 2xx. Validated through HTTP-01 on --http-listen (or
    /// --http-webroot) when that is on, else or when it fails through TLS-ALPN-01 on
    /// --listen; --challenge pins one.
    // The URL may carry a token: its value stays out of --help.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_ASK",
        value_name = "URL",
        hide_env_values = true,
        help_heading = "Certificates"
    )]
    pub on_demand_ask: Option<String>,

    /// Issue on demand only names matching PATTERN (example.com, or *.example.com for one
    /// label under it); repeatable. Alone it turns on-demand issuance on; with
    /// --on-demand-ask a name must pass both. Validated as for --on-demand-ask.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_ALLOW",
        value_name = "PATTERN",
        value_delimiter = ',',
        help_heading = "Certificates"
    )]
    pub on_demand_allow: Vec<String>,

    /// Seconds a handshake waits for its on-demand certificate.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_TIMEOUT",
        default_value_t = 20,
        help_heading = "Certificates"
    )]
    pub on_demand_timeout: u64,

    /// New names issued on demand per minute, in all.
    #[arg(
        long,
        env = "LOBE_TLS_ON_DEMAND_RATE",
        default_value_t = 20,
        help_heading = "Certificates"
    )]
    pub on_demand_rate: u32,
}

impl std::fmt::Debug for OnDemandArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ask URL may carry a token.
        f.debug_struct("OnDemandArgs")
            .field("on_demand_ask", &self.on_demand_ask.is_some())
            .field("on_demand_allow", &self.on_demand_allow)
            .finish_non_exhaustive()
    }
}

impl OnDemandArgs {
    /// The library configuration, when on-demand issuance is asked for.
    pub fn to_config(&self) -> Result<Option<OnDemandConfig>> {
        if self.on_demand_ask.is_none() && self.on_demand_allow.is_empty() {
            return Ok(None);
        }
        // Checked before the store is opened: a bad pattern is a typo, not a reason to
        // create anything.
        for pattern in &self.on_demand_allow {
            domain::DomainName::parse(pattern)?;
        }
        let mut config = OnDemandConfig::default();
        config.ask = self.on_demand_ask.clone();
        config.allow = self.on_demand_allow.clone();
        config.issue_timeout = Duration::from_secs(self.on_demand_timeout.max(1));
        config.global_per_minute = std::num::NonZeroU32::new(self.on_demand_rate)
            .ok_or_else(|| Error::config("--on-demand-rate must be at least 1"))?;
        Ok(Some(config))
    }
}

/// A network for --allow and --deny, checked here so that a typo fails at parse time.
fn cidr(text: &str) -> std::result::Result<String, String> {
    lobe_tls::edge::parse_cidr(text)
        .map(|_| text.trim().to_owned())
        .map_err(|e| e.to_string())
}

/// `--admin-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

fn admin_listen(value: &str) -> std::result::Result<AdminListen, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(AdminListen(None));
    }
    value
        .parse()
        .map(|addr| AdminListen(Some(addr)))
        .map_err(|_| "an IP address and port (e.g. 127.0.0.1:9180), or off".to_owned())
}
