//! Sites: the `[[site]]` tables of the configuration file, and routing a request to the
//! pool that serves its Host and path.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::metrics::EdgeMetrics;
use super::upstream::{LbPolicy, Pool, UpstreamSet};
use crate::error::{Error, Result};

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
        }
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

    fn check(&self) -> Result<()> {
        let name = self.name();
        let bad = |what: &str| Err(Error::Config(format!("site {name}: {what}")));
        if self.upstreams.is_empty() {
            return bad("needs at least one upstream (upstreams = [\"host:port\"])");
        }
        for (what, value) in [
            ("health_interval", self.health_interval),
            ("health_timeout", self.health_timeout),
            ("cooldown", self.cooldown),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if !(value.is_finite() && value > 0.0 && value < 1e9) {
                return bad(&format!("{what} must be a positive number of seconds"));
            }
        }
        if let Some(path) = &self.health_path
            && !path.starts_with('/')
        {
            return bad("health_path must start with /");
        }
        if self.rise == 0 || self.fall == 0 {
            return bad("rise and fall must be at least 1");
        }
        for spec in self
            .upstreams
            .iter()
            .chain(self.routes.iter().flat_map(|r| &r.upstreams))
        {
            check_addr(&name, spec.addr())?;
        }
        for route in &self.routes {
            if !route.path.starts_with('/') {
                return bad(&format!("route path {:?} must start with /", route.path));
            }
            if route.upstreams.is_empty() {
                return bad(&format!("route {} needs at least one upstream", route.path));
            }
        }
        Ok(())
    }
}

fn check_addr(site: &str, addr: &str) -> Result<()> {
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && !addr.contains('/')
        && !addr.contains('@');
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "site {site}: upstream {addr:?} is not host:port"
        )))
    }
}

/// Seconds as a duration (callers checked the range).
pub(crate) fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::from_secs(3600))
}

/// A site ready to serve: its settings and its pools.
#[derive(Debug)]
pub(crate) struct Site {
    pub config: SiteConfig,
    pub name: String,
    pub metrics: super::metrics::SiteMetrics,
    pub default: Arc<Pool>,
    pub routes: Vec<(String, Arc<Pool>)>,
}

impl Site {
    /// The pool for `path`.
    pub fn pool(&self, path: &str) -> &Arc<Pool> {
        self.routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, pool)| pool)
            .unwrap_or(&self.default)
    }
}

/// Host → site, swapped whole on reload.
#[derive(Debug, Default)]
pub(crate) struct Router {
    sites: Vec<Arc<Site>>,
    fallback: Option<Arc<Site>>,
}

impl Router {
    /// Builds the sites, reusing the upstream state (health, open connections) of
    /// `previous` for addresses that stay.
    pub fn build(
        configs: &[SiteConfig],
        previous: Option<&Router>,
        metrics: &Arc<EdgeMetrics>,
    ) -> Result<Router> {
        let mut router = Router::default();
        let known = previous.map(|p| p.upstreams()).unwrap_or_default();
        let mut claimed = std::collections::HashSet::new();
        for config in configs {
            config.check()?;
            let name = config.name();
            let mut site_domains = Vec::new();
            for domain in &config.domains {
                let domain = domain.trim_end_matches('.').to_ascii_lowercase();
                // An address in one spelling: the one `site` looks up (no brackets).
                let bare = domain.trim_start_matches('[').trim_end_matches(']');
                let domain = match bare.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip.to_canonical().to_string(),
                    Err(_) => domain,
                };
                if !claimed.insert(domain.clone()) {
                    return Err(Error::Config(format!(
                        "domain {domain} is claimed by two sites"
                    )));
                }
                site_domains.push(domain);
            }
            let set = UpstreamSet::new(config, &name, &known, metrics);
            let default = Arc::new(Pool::new(
                &set,
                &config.upstreams,
                config.lb,
                config,
                metrics,
            )?);
            let mut routes = Vec::new();
            for route in &config.routes {
                let lb = route.lb.unwrap_or(config.lb);
                routes.push((
                    route.path.clone(),
                    Arc::new(Pool::new(&set, &route.upstreams, lb, config, metrics)?),
                ));
            }
            let mut config = config.clone();
            config.domains = site_domains;
            let site = Arc::new(Site {
                metrics: metrics.for_site(&name),
                name,
                default,
                routes,
                config,
            });
            if site.config.domains.is_empty() {
                if router.fallback.is_some() {
                    return Err(Error::Config(
                        "two sites without domains: only one may take every other Host".into(),
                    ));
                }
                router.fallback = Some(site);
            } else {
                router.sites.push(site);
            }
        }
        Ok(router)
    }

    /// Every upstream of every pool, by address, for reuse across a reload.
    fn upstreams(&self) -> Vec<Arc<super::upstream::Upstream>> {
        self.sites
            .iter()
            .chain(self.fallback.iter())
            .flat_map(|site| {
                std::iter::once(&site.default)
                    .chain(site.routes.iter().map(|(_, pool)| pool))
                    .flat_map(|pool| pool.members().iter().map(|m| m.upstream.clone()))
            })
            .collect()
    }

    /// (site, upstream address) of every pool member, for the metrics' labels.
    pub fn upstream_labels(&self) -> std::collections::HashSet<(String, String)> {
        self.all()
            .flat_map(|site| {
                std::iter::once(&site.default)
                    .chain(site.routes.iter().map(|(_, pool)| pool))
                    .flat_map(|pool| pool.members().iter())
                    .map(|m| (site.name.clone(), m.upstream.addr.clone()))
            })
            .collect()
    }

    /// The site for `host` (no port, any case), or the site without domains.
    pub fn site(&self, host: Option<&str>) -> Option<&Arc<Site>> {
        let found = host.and_then(|host| {
            let host = host.trim_end_matches('.');
            // A Host of an IPv6 address comes in brackets.
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            // Hosts come lower-case nearly always; only the others are copied.
            let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                host.to_ascii_lowercase().into()
            } else {
                host.into()
            };
            self.sites
                .iter()
                .find(|site| site.config.domains.iter().any(|d| *d == *host))
                .or_else(|| {
                    let (_, parent) = host.split_once('.')?;
                    self.sites.iter().find(|site| {
                        site.config
                            .domains
                            .iter()
                            .any(|d| d.strip_prefix("*.") == Some(parent))
                    })
                })
        });
        found.or(self.fallback.as_ref())
    }

    /// All sites, for the tcp mode's SNI routing and the idle watchdog.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Site>> {
        self.sites.iter().chain(self.fallback.iter())
    }

    /// The longest idle timeout of any site.
    pub fn longest_idle(&self) -> Duration {
        self.all()
            .map(|site| site.config.idle())
            .max()
            .unwrap_or(Duration::from_secs(3600))
    }
}

/// Reads the `[[site]]` tables of a configuration file's text (other tables are left to
/// their readers).
pub fn parse_sites(text: &str) -> Result<Vec<SiteConfig>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        site: Vec<SiteConfig>,
    }
    let file: File = toml::from_str(text).map_err(|e| {
        Error::Config(format!(
            "cannot read the [[site]] tables: {}",
            e.to_string().replace('\n', " ").trim_end()
        ))
    })?;
    Ok(file.site)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_parse_with_defaults_and_routes() {
        let sites = parse_sites(
            r#"
[rfc2136]
server = "127.0.0.1:53"

[[site]]
domains = ["chat.example.com"]
upstreams = ["10.0.0.1:8080", { addr = "10.0.0.2:8080", weight = 3 }]
lb = "cookie"
health_path = "/healthz"
health_interval = 0.5

[[site.route]]
path = "/api/"
upstreams = ["10.0.0.9:9000"]
lb = "ip-hash"
"#,
        )
        .unwrap_or_default();
        assert_eq!(sites.len(), 1);
        let site = &sites[0];
        assert_eq!(site.lb, LbPolicy::Cookie);
        assert_eq!(site.upstreams[1].weight(), 3);
        assert_eq!(site.health_interval, 0.5);
        assert!(
            site.idle() >= Duration::from_secs(3600),
            "idle default under 1 h"
        );
        assert_eq!(site.routes[0].lb, Some(LbPolicy::IpHash));
    }

    #[test]
    fn the_default_idle_timeout_is_at_least_an_hour() {
        let sites = parse_sites("[[site]]\nupstreams = [\"127.0.0.1:1\"]\n").unwrap_or_default();
        assert!(sites[0].idle() >= Duration::from_secs(3600));
        assert_eq!(sites[0].lb, LbPolicy::LeastConn);
    }

    #[test]
    fn a_broken_file_is_one_line() {
        let Err(e) = parse_sites("[[site]]\nupstreams = 3\n") else {
            panic!("accepted a broken file");
        };
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[tokio::test]
    async fn bad_upstreams_and_duplicate_domains_are_refused() {
        let metrics = Arc::new(EdgeMetrics::default());
        let bad = SiteConfig::new(vec![], vec![UpstreamSpec::Addr("nope".into())]);
        assert!(Router::build(&[bad], None, &metrics).is_err());
        let a = SiteConfig::new(
            vec!["a.example".into()],
            vec![UpstreamSpec::Addr("127.0.0.1:1".into())],
        );
        assert!(Router::build(&[a.clone(), a], None, &metrics).is_err());
    }

    #[tokio::test]
    async fn address_sites_answer_their_host_in_any_spelling() {
        let metrics = Arc::new(EdgeMetrics::default());
        let upstream = || vec![UpstreamSpec::Addr("127.0.0.1:1".into())];
        let v4 = SiteConfig::new(vec!["192.0.2.10".into()], upstream());
        let v6 = SiteConfig::new(vec!["[2001:DB8::1]".into()], upstream());
        let named = SiteConfig::new(vec!["a.example".into()], upstream());
        let router = Router::build(&[v4, v6, named], None, &metrics).unwrap_or_default();
        let site = |host: &str| router.site(Some(host)).map(|s| s.config.domains[0].clone());
        assert_eq!(site("192.0.2.10").as_deref(), Some("192.0.2.10"));
        assert_eq!(site("[2001:db8::1]").as_deref(), Some("2001:db8::1"));
        assert_eq!(site("2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(site("A.example.").as_deref(), Some("a.example"));
        assert_eq!(site("192.0.2.11"), None);
    }
}
