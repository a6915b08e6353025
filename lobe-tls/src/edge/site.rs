//! Sites: routing a request to the pool that serves its Host and path.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{self, Authenticated, Credentials, Refusal, Verdict};
use super::config::{LbPolicy, SiteConfig, UpstreamSpec};
use super::health;
use super::ip_lists::IpAccess;
use super::metrics::EdgeMetrics;
use super::upstream::{AffinityKey, Pool, UpstreamSet};
use crate::error::{Error, Result};

/// A site ready to serve: its settings and its pools.
#[derive(Debug)]
pub(crate) struct Site {
    pub config: SiteConfig,
    pub name: String,
    pub metrics: super::metrics::SiteMetrics,
    pub default: Arc<Pool>,
    pub routes: Vec<(String, Arc<Pool>)>,
    /// The IP lists that judge requests outside every route.
    pub access: Option<Arc<IpAccess>>,
    /// The IP lists in force for each route (its own, or else the site's), by index.
    pub route_access: Vec<Option<Arc<IpAccess>>>,
    /// The API keys and basic-auth users that judge requests outside every route.
    pub auth: Option<Arc<Credentials>>,
    /// The credentials in force for each route (its own, or else the site's), by index.
    pub route_auth: Vec<Option<Arc<Credentials>>>,
    /// Each pool member's metrics, by route index (see [`Site::route`]) then member.
    pub upstream_metrics: Vec<Vec<super::metrics::UpstreamMetrics>>,
}

impl Site {
    /// The route index of `path`: 0 for the site's own upstreams, `i + 1` for route `i`
    /// (the first whose prefix matches).
    pub fn route(&self, path: &str) -> usize {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(0, |i| i + 1)
    }

    /// The pool of route index `route`.
    pub fn pool_of(&self, route: usize) -> &Arc<Pool> {
        route
            .checked_sub(1)
            .and_then(|i| self.routes.get(i))
            .map_or(&self.default, |(_, pool)| pool)
    }

    /// The IP lists that judge a request for `path` (the route's, as `pool` picks it),
    /// if any.
    pub fn access(&self, path: &str) -> Option<&IpAccess> {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.access.as_deref(), |i| {
                self.route_access.get(i).and_then(|a| a.as_deref())
            })
    }
}

impl Site {
    /// Whether `client` may make a request for `path`. Judged on the path as sent and,
    /// when it holds `%`-escapes, `//` or dot segments, on the path an upstream may read
    /// from it too (decoded, merged, resolved), so `/%61dmin/` or `/x/../admin/` cannot
    /// slip past the lists of `/admin/`.
    pub fn admits(&self, path: &str, client: IpAddr) -> bool {
        let judge = |path: &str| self.access(path).is_none_or(|a| a.admits(client));
        judge(path) && normalized(path).is_none_or(|path| judge(&path))
    }
}

impl Site {
    /// The credentials that judge a request for `path` (the route's, as `pool` picks
    /// it), if any.
    fn credentials(&self, path: &str) -> Option<&Arc<Credentials>> {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.auth.as_ref(), |i| {
                self.route_auth.get(i).and_then(Option::as_ref)
            })
    }

    /// Checks the API key or basic-auth credential of `req` where its path asks for one
    /// (as `admits` judges it: on the path as sent and as an upstream may read it). On
    /// success the request carries who it was admitted as (an [`Authenticated`]
    /// extension, for the forwarding phase); a refusal is counted and logged, with the
    /// name of the key or user that was tried, never the credential.
    pub async fn authenticate<B>(&self, req: &mut http::Request<B>) -> Result<(), Refused> {
        let path = req.uri().path();
        let first = self.credentials(path).cloned();
        let second = normalized(path)
            .and_then(|path| self.credentials(&path).cloned())
            .filter(|c| !first.as_ref().is_some_and(|f| Arc::ptr_eq(f, c)));
        let mut admitted: Option<Authenticated> = None;
        for credentials in first.iter().chain(second.iter()) {
            match credentials.verify(req.headers()).await {
                Verdict::Admitted(who) => {
                    admitted = Some(match admitted {
                        Some(before) => before.and(who),
                        None => who,
                    });
                }
                Verdict::Refused(refusal) => {
                    self.metrics.denied_auth.inc();
                    match &refusal.name {
                        Some(name) => {
                            tracing::info!(
                                site = self.name,
                                name = &**name,
                                "request refused: wrong credential"
                            )
                        }
                        None => tracing::debug!(
                            site = self.name,
                            "request refused: no valid credential"
                        ),
                    }
                    return Err(Refused::Unauthorized(refusal));
                }
                Verdict::Busy => {
                    tracing::warn!(
                        site = self.name,
                        "request refused: too many password checks waiting"
                    );
                    return Err(Refused::Busy);
                }
            }
        }
        if let Some(who) = admitted {
            tracing::debug!(site = self.name, name = &*who.name, "request authenticated");
            req.extensions_mut().insert(who);
        }
        Ok(())
    }
}

/// Why [`Site::authenticate`] refused a request.
#[derive(Debug)]
pub(crate) enum Refused {
    /// 401, with these `WWW-Authenticate` challenges.
    Unauthorized(Refusal),
    /// 503: too many password checks wait already.
    Busy,
}

impl Refused {
    /// The status of the answer.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refused::Unauthorized(_) => http::StatusCode::UNAUTHORIZED,
            Refused::Busy => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The text of the answer.
    pub fn text(&self) -> &'static str {
        match self {
            Refused::Unauthorized(_) => "lobe-tls: a valid API key or password is required",
            Refused::Busy => "lobe-tls: too many credential checks at once; retry",
        }
    }

    /// `answer` (the edge's plain answer of `status` and `text`) with its challenges, or
    /// a Retry-After.
    pub fn answer<B>(self, mut answer: http::Response<B>) -> http::Response<B> {
        let headers = answer.headers_mut();
        match self {
            Refused::Unauthorized(refusal) => {
                for challenge in refusal.challenges {
                    headers.append(http::header::WWW_AUTHENTICATE, challenge);
                }
            }
            Refused::Busy => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
            }
        }
        answer
    }
}

/// A block's credentials loaded, with the site's name in any error.
fn credentials(
    site: &str,
    block: &str,
    sources: auth::Sources<'_>,
    pass_credentials: bool,
) -> Result<Option<Arc<Credentials>>> {
    Credentials::load(site, sources, pass_credentials)
        .map(|c| c.map(Arc::new))
        .map_err(|e| Error::config(format!("site {site}{block}: {e}")))
}

/// `path` with `%XX` decoded once, empty and `.` segments dropped and `..` resolved;
/// `None` when there is nothing to do (nearly always).
fn normalized(path: &str) -> Option<String> {
    if !(path.contains('%') || path.contains("//") || path.contains("/.")) {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                decoded.push(((hex(h).unwrap_or(0) << 4) | hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    let last = decoded.rsplit('/').next().unwrap_or_default();
    if out.is_empty() || decoded.ends_with('/') || last == "." || last == ".." {
        out.push('/');
    }
    Some(out)
}

/// A block's lists compiled, with the site's name in any error.
fn lists(
    site: &str,
    block: &str,
    allow: &[String],
    deny: &[String],
) -> Result<Option<Arc<IpAccess>>> {
    IpAccess::new(allow, deny)
        .map(|access| access.map(Arc::new))
        .map_err(|e| Error::config(format!("site {site}{block}: allow/deny: {e}")))
}

/// A pool with a health check running for each member, kept as long as the pool.
fn checked_pool(
    set: &UpstreamSet,
    specs: &[UpstreamSpec],
    lb: LbPolicy,
    config: &SiteConfig,
    metrics: &Arc<EdgeMetrics>,
) -> Result<Arc<Pool>> {
    let mut pool = Pool::new(set, specs, lb, config)?;
    let checks = pool
        .members()
        .iter()
        .enumerate()
        .filter_map(|(index, member)| {
            let conns = pool.conns(index)?;
            Some(health::spawn(
                member.upstream.clone(),
                Arc::downgrade(conns),
                set.site(),
                config,
                metrics.clone(),
            ))
        })
        .collect();
    pool.keep_checks(checks);
    Ok(Arc::new(pool))
}

/// One site as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct SiteStatus {
    /// The site's name (its first domain, or `default`).
    pub name: String,
    /// The names it answers.
    pub domains: Vec<String>,
    /// Every upstream of its pools (its own and its routes'), once each.
    pub upstreams: Vec<super::upstream_state::UpstreamStatus>,
}

impl Site {
    /// What the status page shows of this site.
    pub fn status(&self) -> SiteStatus {
        let mut upstreams: Vec<super::upstream_state::UpstreamStatus> = Vec::new();
        let pools = std::iter::once(&self.default).chain(self.routes.iter().map(|(_, p)| p));
        for member in pools.flat_map(|pool| pool.members().iter()) {
            if !upstreams.iter().any(|u| u.addr == member.upstream.addr) {
                upstreams.push(member.upstream.status());
            }
        }
        SiteStatus {
            name: self.name.clone(),
            domains: self.config.domains.clone(),
            upstreams,
        }
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
    /// `previous` for addresses that stay; `key` mints the affinity tokens.
    pub fn build(
        configs: &[SiteConfig],
        previous: Option<&Router>,
        metrics: &Arc<EdgeMetrics>,
        key: &AffinityKey,
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
                    return Err(Error::config(format!(
                        "domain {domain} is claimed by two sites"
                    )));
                }
                site_domains.push(domain);
            }
            let set = UpstreamSet::new(config, &name, &known, metrics, key);
            let default = checked_pool(&set, &config.upstreams, config.lb, config, metrics)?;
            let access = lists(&name, "", &config.allow, &config.deny)?;
            // The credential files, read now: on a reload a malformed one refuses the
            // new sites, and the running ones (with the old sets) stay.
            let mut blocks = auth::blocks(config).into_iter();
            let pass = config.pass_credentials;
            let site_auth = match blocks.next() {
                Some((block, sources)) => credentials(&name, &block, sources, pass)?,
                None => None,
            };
            let mut route_auth = Vec::new();
            for (block, sources) in blocks {
                // The most specific block that sets credentials decides.
                route_auth
                    .push(credentials(&name, &block, sources, pass)?.or_else(|| site_auth.clone()));
            }
            let mut routes = Vec::new();
            let mut route_access = Vec::new();
            for route in &config.routes {
                let lb = route.lb.unwrap_or(config.lb);
                routes.push((
                    route.path.clone(),
                    checked_pool(&set, &route.upstreams, lb, config, metrics)?,
                ));
                let block = format!(" route {}", route.path);
                // The most specific block that sets lists decides.
                route_access.push(
                    lists(&name, &block, &route.allow, &route.deny)?.or_else(|| access.clone()),
                );
            }
            let mut config = config.clone();
            config.domains = site_domains;
            let paths: Vec<&str> = routes.iter().map(|(path, _)| path.as_str()).collect();
            let site_metrics = metrics.for_site(&name, &paths);
            // Every upstream's series exists from the start, at zero.
            let upstream_metrics = std::iter::once(("", &default))
                .chain(routes.iter().map(|(path, pool)| (path.as_str(), pool)))
                .map(|(route, pool)| {
                    pool.members()
                        .iter()
                        .map(|m| metrics.for_upstream(&name, route, &m.upstream.addr))
                        .collect()
                })
                .collect();
            let site = Arc::new(Site {
                metrics: site_metrics,
                upstream_metrics,
                name,
                default,
                routes,
                access,
                route_access,
                auth: site_auth,
                route_auth,
                config,
            });
            if site.config.domains.is_empty() {
                if router.fallback.is_some() {
                    return Err(Error::config(
                        "two sites without domains: only one may take every other Host",
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
    fn upstreams(&self) -> Vec<Arc<super::upstream_state::Upstream>> {
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

    /// (site, route, upstream address) of every pool member, for the per-upstream
    /// metrics' labels.
    pub fn upstream_route_labels(
        &self,
    ) -> std::collections::HashSet<super::metrics::UpstreamRouteLabels> {
        self.all()
            .flat_map(|site| {
                std::iter::once(("", &site.default))
                    .chain(site.routes.iter().map(|(path, pool)| (path.as_str(), pool)))
                    .flat_map(move |(route, pool)| {
                        pool.members()
                            .iter()
                            .map(move |m| super::metrics::UpstreamRouteLabels {
                                site: site.name.clone(),
                                route: route.to_owned(),
                                upstream: m.upstream.addr.clone(),
                            })
                    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::config::RouteConfig;

    #[tokio::test]
    async fn bad_upstreams_and_duplicate_domains_are_refused() {
        let metrics = Arc::new(EdgeMetrics::default());
        let bad = SiteConfig::new(vec![], vec![UpstreamSpec::Addr("nope".into())]);
        assert!(Router::build(&[bad], None, &metrics, &AffinityKey::random()).is_err());
        let a = SiteConfig::new(
            vec!["a.example".into()],
            vec![UpstreamSpec::Addr("127.0.0.1:1".into())],
        );
        assert!(Router::build(&[a.clone(), a], None, &metrics, &AffinityKey::random()).is_err());
    }

    #[tokio::test]
    async fn the_most_specific_block_with_lists_decides() {
        let metrics = Arc::new(EdgeMetrics::default());
        let upstream = || vec![UpstreamSpec::Addr("127.0.0.1:1".into())];
        let route = |path: &str, allow: &[&str]| RouteConfig {
            path: path.into(),
            upstreams: upstream(),
            lb: None,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: Vec::new(),
            api_keys_file: None,
            api_key_header: None,
            basic_auth_file: None,
        };
        let mut site = SiteConfig::new(vec![], upstream());
        site.deny = vec!["192.0.2.6".into()];
        site.routes = vec![route("/admin/", &["198.51.100.0/24"]), route("/api/", &[])];
        let router =
            Router::build(&[site], None, &metrics, &AffinityKey::random()).unwrap_or_default();
        let Some(site) = router.site(None) else {
            panic!("no site");
        };
        let admits = |path: &str, ip: [u8; 4]| site.admits(path, IpAddr::from(ip));
        // The site's deny list; the route without lists inherits it.
        assert!(!admits("/", [192, 0, 2, 6]));
        assert!(!admits("/api/x", [192, 0, 2, 6]));
        assert!(admits("/api/x", [192, 0, 2, 7]));
        // The admin route's own lists replace the site's.
        assert!(!admits("/admin/x", [192, 0, 2, 7]));
        assert!(admits("/admin/x", [198, 51, 100, 9]));
        assert!(!admits("/%61dmin/x", [192, 0, 2, 7]));
        assert!(!admits("/api/../admin/x", [192, 0, 2, 7]));
        let mut bad = SiteConfig::new(vec![], upstream());
        bad.allow = vec!["office".into()];
        let Err(e) = Router::build(&[bad], None, &metrics, &AffinityKey::random()) else {
            panic!("accepted a bad list");
        };
        assert!(e.to_string().contains("office"), "{e}");
    }

    #[test]
    fn paths_are_judged_as_an_upstream_may_read_them() {
        assert_eq!(normalized("/admin/x"), None);
        for (sent, read) in [
            ("/%61dmin/x", "/admin/x"),
            ("//admin/", "/admin/"),
            ("/x/../admin/", "/admin/"),
            ("/./admin", "/admin"),
            ("/admin/..", "/"),
            ("/a/%2e%2e/admin/", "/admin/"),
            ("/%zz", "/%zz"),
        ] {
            assert_eq!(normalized(sent).as_deref(), Some(read), "{sent}");
        }
    }

    #[tokio::test]
    async fn address_sites_answer_their_host_in_any_spelling() {
        let metrics = Arc::new(EdgeMetrics::default());
        let upstream = || vec![UpstreamSpec::Addr("127.0.0.1:1".into())];
        let v4 = SiteConfig::new(vec!["192.0.2.10".into()], upstream());
        let v6 = SiteConfig::new(vec!["[2001:DB8::1]".into()], upstream());
        let named = SiteConfig::new(vec!["a.example".into()], upstream());
        let router = Router::build(&[v4, v6, named], None, &metrics, &AffinityKey::random())
            .unwrap_or_default();
        let site = |host: &str| router.site(Some(host)).map(|s| s.config.domains[0].clone());
        assert_eq!(site("192.0.2.10").as_deref(), Some("192.0.2.10"));
        assert_eq!(site("[2001:db8::1]").as_deref(), Some("2001:db8::1"));
        assert_eq!(site("2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(site("A.example.").as_deref(), Some("a.example"));
        assert_eq!(site("192.0.2.11"), None);
    }
}
