//! The edge's configuration: its settings ([`EdgeConfig`]), the `[[site]]` tables of the
//! configuration file, their upstreams and balancing policy, and the duration helpers. A leaf: it imports nothing
//! of the edge, so every phase may read it.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{Error, Result};

/// How the edge treats decrypted connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// L7: HTTP/1.1 and h2 to clients, pooled keep-alive HTTP/1.1 to upstreams.
    #[default]
    Http,
    /// L4: decrypted bytes forwarded to an upstream as they arrive.
    Tcp,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "http" => Ok(Mode::Http),
            "tcp" => Ok(Mode::Tcp),
            other => Err(Error::config(format!(
                "unknown mode {other:?}: use http or tcp"
            ))),
        }
    }
}

/// The edge's settings; the sites can be replaced later through
/// [`EdgeHandle::reload`](crate::edge::EdgeHandle::reload).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EdgeConfig {
    /// `http` (default) or `tcp`.
    pub mode: Mode,
    /// The sites.
    pub sites: Vec<SiteConfig>,
    /// ALPN offered (besides `acme-tls/1`). Default: `h2`, `http/1.1` in http mode,
    /// `http/1.1` in tcp mode (see [`EdgeConfig::alpn`]).
    pub alpn: Option<Vec<Vec<u8>>>,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a client has to send a request's headers (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, h2 header list), bytes.
    pub max_header_size: usize,
    /// On shutdown, how long open connections may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// How long an HTTP connection may wait, with no request in flight, for its next
    /// request (its first one: `header_read_timeout`).
    pub keepalive_timeout: Duration,
    /// Connections open at once, in total.
    pub max_conns: Option<usize>,
    /// Connections open at once from one client address: the address a PROXY header
    /// names when one is required, else the peer's. Peers in `trusted_proxies` are not
    /// capped per address (many clients share them); they count toward `max_conns`.
    pub max_conns_per_ip: Option<usize>,
    /// Requests per second per client address (429 beyond).
    pub rate_limit: Option<u32>,
    /// Who counts as one client for `max_conns_per_ip` and `rate_limit`: an IPv4
    /// address (/32) and an IPv6 /64 by default.
    pub client_prefixes: crate::client_key::ClientPrefixes,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are kept, and (with
    /// `accept_proxy_protocol`) the only peers whose PROXY headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Require a PROXY v1/v2 header before TLS, within this time. Only peers in
    /// `trusted_proxies` may connect (others are refused before anything is read), so
    /// [`Edge::bind`](crate::edge::Edge::bind) refuses this without them.
    pub accept_proxy_protocol: Option<Duration>,
    /// tcp mode: send a PROXY v2 header to the upstream.
    pub send_proxy_v2: bool,
    /// Threads that accept and serve connections, each with its own single-threaded
    /// runtime (see [`Edge::run`](crate::edge::Edge::run)); 1 (the default) serves on the caller's runtime.
    pub threads: usize,
    /// Bytes of request bodies one client connection may hold at once so that they can
    /// be sent again to another upstream (each body at most 64 KiB); a body that does
    /// not fit streams through once, unretried. 0: no body is retried.
    pub retry_buffer_per_conn: usize,
    /// As `retry_buffer_per_conn`, for all connections together.
    pub retry_buffer_total: usize,
    /// h2 streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub h2_max_streams: u32,
    /// Requests in flight at once from one client (grouped as for `max_conns_per_ip`),
    /// over HTTP/1.1 and h2 together; an event stream or a WebSocket counts while it is
    /// open. More are answered 429 at once, without reaching an upstream. Peers in
    /// `trusted_proxies` are not capped. `None`: no cap.
    pub max_requests_per_ip: Option<usize>,
    /// Where the access log goes: one line per request, WebSocket or stream (written
    /// when it ends). `None` (the default): no access log. A site may opt out with
    /// [`SiteConfig::access_log`].
    pub access_log: Option<AccessLogTarget>,
    /// How access log lines are written: JSON (the default) or NCSA common.
    pub access_log_format: AccessLogFormat,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessLogTarget {
    /// The process's standard output (for a collector reading the container's logs).
    Stdout,
    /// The process's standard error.
    Stderr,
    /// A file, opened in append mode (created 0640) and reopened on demand
    /// ([`EdgeHandle::reopen_access_log`](crate::edge::EdgeHandle::reopen_access_log)),
    /// for logrotate.
    File(std::path::PathBuf),
}

impl AccessLogTarget {
    /// `stdout`, `stderr`, `off` (`None`) or a path.
    pub fn parse(text: &str) -> Result<Option<Self>> {
        match text {
            "" => Err(Error::config(
                "the access log needs stdout, stderr, off or a file path",
            )),
            "off" => Ok(None),
            "stdout" | "-" => Ok(Some(AccessLogTarget::Stdout)),
            "stderr" => Ok(Some(AccessLogTarget::Stderr)),
            path => Ok(Some(AccessLogTarget::File(path.into()))),
        }
    }
}

/// How access log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessLogFormat {
    /// One JSON object per line, with every field (see the README).
    #[default]
    Json,
    /// The NCSA common log format (`host - - [date] "request" status bytes`).
    Common,
}

impl std::str::FromStr for AccessLogFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "json" => Ok(AccessLogFormat::Json),
            "common" => Ok(AccessLogFormat::Common),
            other => Err(Error::config(format!(
                "unknown access log format {other:?}: use json or common"
            ))),
        }
    }
}

/// Connections open at once, in total, unless [`EdgeConfig::max_conns`] says otherwise.
pub const DEFAULT_MAX_CONNS: usize = 10_000;
/// Connections open at once from one client address, unless
/// [`EdgeConfig::max_conns_per_ip`] says otherwise.
pub const DEFAULT_MAX_CONNS_PER_IP: usize = 4096;
/// h2 streams open at once on one connection, unless [`EdgeConfig::h2_max_streams`]
/// says otherwise (nginx has 128; RFC 9113 §6.5.2 advises no fewer than 100).
pub const DEFAULT_H2_MAX_STREAMS: u32 = 128;
/// Requests in flight at once from one client, unless
/// [`EdgeConfig::max_requests_per_ip`] says otherwise. A chat front end holds one event
/// stream or WebSocket per open tab, and an office behind one NAT address may hold
/// hundreds of them, so the cap sits well above that; at about 37 KiB per request in
/// flight (a task and an upstream connection), it keeps what one client can make the
/// edge hold to about 37 MiB, where `max_conns_per_ip` × `h2_max_streams` alone would
/// allow half a million requests.
pub const DEFAULT_MAX_REQUESTS_PER_IP: usize = 1024;

impl EdgeConfig {
    /// tcp mode with one site that takes every name and forwards its decrypted bytes
    /// to `upstream` (`host:port`), offering ALPN `http/1.1`: a plain TLS terminator.
    /// Idle connections close after an hour, as [`SiteConfig::new`] sets.
    pub fn tcp(upstream: impl Into<String>) -> Self {
        let site = SiteConfig::new(Vec::new(), vec![UpstreamSpec::Addr(upstream.into())]);
        let mut config = EdgeConfig::new(vec![site]);
        config.mode = Mode::Tcp;
        config.alpn = Some(vec![b"http/1.1".to_vec()]);
        config
    }

    /// The defaults for `sites`, safe to face the Internet as they are: http mode, 10 s
    /// handshakes and header reads, 75 s keep-alive, 16 KiB heads, 30 s drain;
    /// at most 10,000 connections in total and 4,096 from one client address; 128 h2
    /// streams per connection and 1,024 requests in flight from one client; request
    /// bodies kept for replay within 1 MiB per connection and 64 MiB in total. No rate
    /// limit.
    pub fn new(sites: Vec<SiteConfig>) -> Self {
        EdgeConfig {
            mode: Mode::Http,
            sites,
            alpn: None,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            drain_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            max_conns: Some(DEFAULT_MAX_CONNS),
            max_conns_per_ip: Some(DEFAULT_MAX_CONNS_PER_IP),
            rate_limit: None,
            client_prefixes: crate::client_key::ClientPrefixes::default(),
            trusted_proxies: Vec::new(),
            accept_proxy_protocol: None,
            send_proxy_v2: false,
            threads: 1,
            retry_buffer_per_conn: DEFAULT_RETRY_BUFFER_PER_CONN,
            retry_buffer_total: DEFAULT_RETRY_BUFFER_TOTAL,
            h2_max_streams: DEFAULT_H2_MAX_STREAMS,
            max_requests_per_ip: Some(DEFAULT_MAX_REQUESTS_PER_IP),
            access_log: None,
            access_log_format: AccessLogFormat::Json,
        }
    }

    /// The ALPN list in effect.
    pub fn alpn(&self) -> Vec<Vec<u8>> {
        match (&self.alpn, self.mode) {
            (Some(alpn), _) => alpn.clone(),
            (None, Mode::Http) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (None, Mode::Tcp) => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Bytes of request bodies one client connection may hold for replay at once, unless
/// [`EdgeConfig::retry_buffer_per_conn`](EdgeConfig::retry_buffer_per_conn) says
/// otherwise: sixteen 64 KiB bodies in flight on one h2 connection.
pub const DEFAULT_RETRY_BUFFER_PER_CONN: usize = 1024 * 1024;

/// Bytes of request bodies the whole edge may hold for replay at once, unless
/// [`EdgeConfig::retry_buffer_total`](EdgeConfig::retry_buffer_total) says
/// otherwise.
pub const DEFAULT_RETRY_BUFFER_TOTAL: usize = 64 * 1024 * 1024;

/// One `[[site]]` table: the domains it answers for and where their requests go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SiteConfig {
    /// Host names served by this site (`*.example.com` matches one label). Empty: every
    /// Host that no other site claims.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Upstreams, `host:port` or `{ addr = "host:port", weight = 2 }`.
    pub upstreams: Vec<UpstreamSpec>,
    /// Balancing policy: `least-conn` (default), `round-robin`, `ip-hash` or `cookie`.
    #[serde(default)]
    pub lb: LbPolicy,
    /// Path of the active HTTP health check (e.g. `/healthz`); none: passive checks only.
    #[serde(default)]
    pub health_path: Option<String>,
    /// Seconds between active checks.
    #[serde(default = "defaults::health_interval")]
    pub health_interval: f64,
    /// Seconds an active check may take.
    #[serde(default = "defaults::health_timeout")]
    pub health_timeout: f64,
    /// Consecutive passing checks that bring an upstream back.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Consecutive failing checks (or, passively, connect failures and 5xx answers) that
    /// take an upstream out.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// Seconds an upstream taken out by passive checks stays out.
    #[serde(default = "defaults::cooldown")]
    pub cooldown: f64,
    /// Seconds a connection to an upstream may take.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: f64,
    /// Seconds without a byte on a response, stream or WebSocket before it is cut
    /// (default one hour, so quiet SSE and WebSocket streams stay up).
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: f64,
    /// Largest request body in bytes (413 beyond); none: unlimited.
    #[serde(default)]
    pub max_body_size: Option<u64>,
    /// `Strict-Transport-Security: max-age=N` on every response when set (opt-in).
    #[serde(default)]
    pub hsts: Option<u64>,
    /// Name of the affinity cookie (`lb = "cookie"`).
    #[serde(default = "defaults::cookie_name")]
    pub cookie_name: String,
    /// Path routes, first match wins; requests matching none go to `upstreams`.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Client networks (CIDR, or a bare address) admitted; empty: everyone not denied.
    /// Judged on the client address after `trusted_proxies` and PROXY handling, never on
    /// `X-Forwarded-For`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client networks refused with 403; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// API keys admitted: a file of `NAME:HASH` lines (HASH `sha256:<lowercase hex>` or
    /// an argon2id PHC string), read when the sites are built (at start and on SIGHUP).
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// The header that carries an API key (default `X-Api-Key`); `Authorization: Bearer
    /// KEY` is accepted too.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Basic-auth users admitted: an htpasswd file with bcrypt (`htpasswd -B`) or
    /// argon2 hashes. With `api_keys_file` too, either credential admits.
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
    /// Send the credential that admitted a request on to the upstream (by default it is
    /// removed; `X-Authenticated-Name` says who it was either way).
    #[serde(default)]
    pub pass_credentials: bool,
    /// `false`: this site's requests leave no access log line (default `true`; the
    /// access log itself is the edge's, [`EdgeConfig::access_log`]).
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
}

/// A path prefix with its own upstreams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteConfig {
    /// Requests whose path starts with this go here.
    pub path: String,
    /// This route's upstreams.
    pub upstreams: Vec<UpstreamSpec>,
    /// This route's balancing policy (default: the site's).
    #[serde(default)]
    pub lb: Option<LbPolicy>,
    /// As the site's `allow`. A route that sets `allow` or `deny` is judged by its own
    /// lists alone (the site's do not apply to it, as with nginx's `location`); one that
    /// sets neither inherits the site's.
    #[serde(default)]
    pub allow: Vec<String>,
    /// As the site's `deny`; see `allow` for how a route's lists replace the site's.
    #[serde(default)]
    pub deny: Vec<String>,
    /// As the site's `api_keys_file`. A route that sets `api_keys_file` or
    /// `basic_auth_file` is judged by its own credentials alone; one that sets neither
    /// inherits the site's.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// As the site's `api_key_header` (default: the site's, else `X-Api-Key`).
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// As the site's `basic_auth_file`; see `api_keys_file` for how a route's
    /// credentials replace the site's.
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
}

/// An upstream address with its weight.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
#[non_exhaustive]
pub enum UpstreamSpec {
    /// `host:port`, weight 1.
    Addr(String),
    /// `{ addr = "host:port", weight = N }`.
    Weighted {
        /// `host:port`.
        addr: String,
        /// Relative share of new requests (default 1).
        #[serde(default = "defaults::weight")]
        weight: u32,
    },
}

impl UpstreamSpec {
    /// The address, `host:port`.
    pub fn addr(&self) -> &str {
        match self {
            UpstreamSpec::Addr(addr) | UpstreamSpec::Weighted { addr, .. } => addr,
        }
    }

    /// The weight (at least 1).
    pub fn weight(&self) -> u32 {
        match self {
            UpstreamSpec::Addr(_) => 1,
            UpstreamSpec::Weighted { weight, .. } => (*weight).max(1),
        }
    }
}

mod defaults {
    pub fn health_interval() -> f64 {
        5.0
    }
    pub fn health_timeout() -> f64 {
        2.0
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn cooldown() -> f64 {
        10.0
    }
    pub fn connect_timeout() -> f64 {
        5.0
    }
    pub fn idle_timeout() -> f64 {
        3600.0
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn yes() -> bool {
        true
    }
    pub fn cookie_name() -> String {
        "lobe_tls_affinity".into()
    }
}

impl SiteConfig {
    /// A site for `upstreams` with every default (least-conn, no active checks, one
    /// hour idle timeout), answering for `domains` (empty: any Host).
    pub fn new(domains: Vec<String>, upstreams: Vec<UpstreamSpec>) -> Self {
        SiteConfig {
            domains,
            upstreams,
            lb: LbPolicy::default(),
            health_path: None,
            health_interval: defaults::health_interval(),
            health_timeout: defaults::health_timeout(),
            rise: defaults::rise(),
            fall: defaults::fall(),
            cooldown: defaults::cooldown(),
            connect_timeout: defaults::connect_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_body_size: None,
            hsts: None,
            cookie_name: defaults::cookie_name(),
            routes: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            api_keys_file: None,
            api_key_header: None,
            basic_auth_file: None,
            pass_credentials: false,
            access_log: true,
        }
    }

    /// Whether the site or one of its routes asks for API keys or basic auth.
    pub fn has_auth(&self) -> bool {
        self.api_keys_file.is_some()
            || self.basic_auth_file.is_some()
            || self
                .routes
                .iter()
                .any(|r| r.api_keys_file.is_some() || r.basic_auth_file.is_some())
    }

    /// The name the site goes by in metrics and logs: its first domain, or `default`.
    pub fn name(&self) -> String {
        self.domains
            .first()
            .cloned()
            .unwrap_or_else(|| "default".into())
    }

    /// The idle timeout as a duration.
    pub fn idle(&self) -> Duration {
        secs(self.idle_timeout)
    }

    /// Refuses values the edge cannot serve with (a missing upstream, a bad duration):
    /// the first of [`problems`](Self::problems), naming the site.
    pub(crate) fn check(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            Some(problem) => Err(Error::config(format!("site {}: {problem}", self.name()))),
            None => Ok(()),
        }
    }

    /// Every value the edge cannot serve with, one line each, without the site's name
    /// (the caller knows what to call it); empty when the site is fine.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.upstreams.is_empty() {
            problems.push("needs at least one upstream (upstreams = [\"host:port\"])".to_owned());
        }
        for (what, value) in [
            ("health_interval", self.health_interval),
            ("health_timeout", self.health_timeout),
            ("cooldown", self.cooldown),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if !(value.is_finite() && value > 0.0 && value < 1e9) {
                problems.push(format!("{what} must be a positive number of seconds"));
            }
        }
        if let Some(path) = &self.health_path
            && !path.starts_with('/')
        {
            problems.push("health_path must start with /".to_owned());
        }
        if self.rise == 0 || self.fall == 0 {
            problems.push("rise and fall must be at least 1".to_owned());
        }
        for spec in self
            .upstreams
            .iter()
            .chain(self.routes.iter().flat_map(|r| &r.upstreams))
        {
            if let Some(problem) = upstream_addr_problem(spec.addr()) {
                problems.push(format!("upstream {problem}"));
            }
        }
        for route in &self.routes {
            if !route.path.starts_with('/') {
                problems.push(format!("route path {:?} must start with /", route.path));
            }
            if route.upstreams.is_empty() {
                problems.push(format!("route {} needs at least one upstream", route.path));
            }
        }
        for (place, header) in std::iter::once(("", &self.api_key_header)).chain(
            self.routes
                .iter()
                .map(|r| (r.path.as_str(), &r.api_key_header)),
        ) {
            if let Some(header) = header
                && http::HeaderName::from_bytes(header.as_bytes()).is_err()
            {
                let place = if place.is_empty() {
                    String::new()
                } else {
                    format!("route {place}: ")
                };
                problems.push(format!(
                    "{place}api_key_header {header:?} is not a header name"
                ));
            }
        }
        problems
    }
}

/// What is wrong with `addr` as an upstream address (`host:port`), quoting it and saying
/// how to fix it (`"127.0.0.1" is not host:port: add a port, e.g. 127.0.0.1:8080`);
/// `None` when it is one.
pub(crate) fn upstream_addr_problem(addr: &str) -> Option<String> {
    // An IPv6 host is bracketed, or "::1" would read as host ":" and port 1.
    let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    }) && !addr.contains('/')
        && !addr.contains('@');
    if valid {
        return None;
    }
    let fix = if let Some((scheme, rest)) = addr.split_once("://") {
        // The edge speaks HTTP/1.1 to upstreams in the clear; a scheme says nothing more.
        let rest = rest.split('/').next().unwrap_or_default();
        let port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        };
        match rest.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => {
                format!("drop the scheme, e.g. {rest}")
            }
            _ if !rest.is_empty() => format!("drop the scheme, e.g. {rest}:{port}"),
            _ => "drop the scheme and give host:port, e.g. 127.0.0.1:8080".to_owned(),
        }
    } else if addr.contains('/') {
        "drop the path: an upstream is host:port, e.g. 127.0.0.1:8080".to_owned()
    } else if addr.contains('@') {
        "drop the user part: an upstream is host:port, e.g. 127.0.0.1:8080".to_owned()
    } else if !addr.is_empty() && !addr.contains(':') {
        format!("add a port, e.g. {addr}:8080")
    } else if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("bracket an IPv6 address and add a port, e.g. [{addr}]:8080")
    } else if let Some((host, port)) = addr.rsplit_once(':')
        && host.parse::<std::net::Ipv6Addr>().is_ok()
    {
        format!("bracket an IPv6 address, e.g. [{host}]:{port}")
    } else {
        "give host:port with a port from 1 to 65535, e.g. 127.0.0.1:8080".to_owned()
    };
    Some(format!("{addr:?} is not host:port: {fix}"))
}

/// What makes `sites` unservable together, one line each: a domain two sites claim, or
/// two sites without domains (only one may take every other Host). Spelled as
/// `Router::build` compares them (lower case, no trailing dot, one spelling per address).
pub fn claim_problems(sites: &[SiteConfig]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut claimed = std::collections::HashSet::new();
    let mut fallbacks = 0;
    for site in sites {
        if site.domains.is_empty() {
            fallbacks += 1;
        }
        for domain in &site.domains {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            let bare = domain.trim_start_matches('[').trim_end_matches(']');
            let domain = match bare.parse::<std::net::IpAddr>() {
                Ok(ip) => ip.to_canonical().to_string(),
                Err(_) => domain,
            };
            if !claimed.insert(domain.clone()) {
                problems.push(format!("domain {domain} is claimed by two sites"));
            }
        }
    }
    if fallbacks > 1 {
        problems.push("two sites without domains: only one may take every other Host".to_owned());
    }
    problems
}

/// Seconds as a duration (callers checked the range).
pub(crate) fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::from_secs(3600))
}

/// How a pool picks an upstream for a new request or connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LbPolicy {
    /// In turn, by weight.
    RoundRobin,
    /// The upstream with the fewest open requests and streams per weight (the default:
    /// long streams skew round robin).
    #[default]
    LeastConn,
    /// By the client's address, consistently: removing an upstream moves only its own
    /// clients (rendezvous hashing).
    IpHash,
    /// By an affinity cookie; clients without one (or pinned to an upstream that is
    /// down) are placed by least-conn and get a new cookie.
    Cookie,
}

impl std::fmt::Display for LbPolicy {
    /// The name `--lb` and the `lb` key take.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LbPolicy::RoundRobin => "round-robin",
            LbPolicy::LeastConn => "least-conn",
            LbPolicy::IpHash => "ip-hash",
            LbPolicy::Cookie => "cookie",
        })
    }
}

impl std::str::FromStr for LbPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "round-robin" => Ok(LbPolicy::RoundRobin),
            "least-conn" => Ok(LbPolicy::LeastConn),
            "ip-hash" => Ok(LbPolicy::IpHash),
            "cookie" => Ok(LbPolicy::Cookie),
            other => Err(Error::config(format!(
                "unknown balancing policy {other:?}: use round-robin, least-conn, ip-hash or cookie"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_address_errors_say_how_to_fix_them() {
        let fix = |addr: &str| upstream_addr_problem(addr).unwrap_or_default();
        assert_eq!(
            fix("127.0.0.1"),
            "\"127.0.0.1\" is not host:port: add a port, e.g. 127.0.0.1:8080"
        );
        assert_eq!(
            fix("http://app.internal:3000/"),
            "\"http://app.internal:3000/\" is not host:port: drop the scheme, e.g. app.internal:3000"
        );
        assert!(fix("http://app").ends_with("drop the scheme, e.g. app:80"));
        assert!(fix("::1").contains("[::1]:8080"));
        // A port of five digits cannot be read as one more group of the address.
        assert!(fix("fd00::1:10000").ends_with("e.g. [fd00::1]:10000"));
        assert!(fix("a:0").contains("port from 1 to 65535"));
        assert_eq!(upstream_addr_problem("[::1]:8080"), None);
        let mut site = SiteConfig::new(vec![], vec![UpstreamSpec::Addr("127.0.0.1".into())]);
        site.rise = 0;
        let problems = site.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        let e = site
            .check()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(e, "site default: rise and fall must be at least 1");
        site.rise = 1;
        let e = site
            .check()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("site default: upstream \"127.0.0.1\" is not host:port: add a port"),
            "{e}"
        );
    }

    #[test]
    fn two_sites_may_not_claim_one_name() {
        let site = |domains: &[&str]| {
            SiteConfig::new(
                domains.iter().map(|d| d.to_string()).collect(),
                vec![UpstreamSpec::Addr("127.0.0.1:1".into())],
            )
        };
        assert!(claim_problems(&[site(&["a.example"]), site(&[])]).is_empty());
        let problems = claim_problems(&[
            site(&["a.example"]),
            site(&["A.example."]),
            site(&[]),
            site(&[]),
        ]);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
