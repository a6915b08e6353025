//! Upstream pools and the balancing policies that pick one upstream per request.
//!
//! A policy is a small trait with one implementation each (round robin, least
//! connections, consistent ip-hash); the cookie policy pins a client to the upstream
//! least-conn chose first, through an opaque HMAC'd token.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::config::{LbPolicy, SiteConfig, UpstreamSpec, secs};
use super::metrics::EdgeMetrics;
use super::pool::ConnPool;
use super::upstream_state::Upstream;
use crate::error::{Error, Result};
use arc_swap::ArcSwap;
use base64::Engine;

/// How long an idle keep-alive connection to an upstream is kept.
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Idle keep-alive connections kept per upstream and pool.
const POOL_MAX_IDLE: usize = 512;

/// A pool's entry: an upstream and its weight in this pool.
#[derive(Debug, Clone)]
pub struct Member {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// Its relative share, at least 1.
    pub weight: u32,
}

/// What a policy may look at besides the members.
#[derive(Debug, Clone, Copy)]
pub struct PickContext {
    /// The client's address.
    pub client_ip: IpAddr,
}

/// A balancing policy: the index of the member to use, among those `usable` accepts.
pub trait Balance: Send + Sync + fmt::Debug {
    /// Picks a member, or `None` when no usable one is left.
    fn pick(
        &self,
        members: &[Member],
        usable: &dyn Fn(usize) -> bool,
        cx: &PickContext,
    ) -> Option<usize>;
}

/// Smooth weighted round robin: each member gets its share, spread out.
#[derive(Debug, Default)]
pub struct RoundRobin {
    current: Mutex<Vec<i64>>,
}

impl Balance for RoundRobin {
    fn pick(
        &self,
        members: &[Member],
        usable: &dyn Fn(usize) -> bool,
        _: &PickContext,
    ) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.resize(members.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, member) in members.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            current[i] += i64::from(member.weight);
            total += i64::from(member.weight);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// The fewest open requests per weight; ties go round.
#[derive(Debug, Default)]
pub struct LeastConn {
    turn: AtomicUsize,
}

impl Balance for LeastConn {
    fn pick(
        &self,
        members: &[Member],
        usable: &dyn Fn(usize) -> bool,
        _: &PickContext,
    ) -> Option<usize> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| usable(i))
            // active/weight compared without division: a*w_b < b*w_a.
            .min_by(|&a, &b| {
                let load = |i: usize, j: usize| {
                    (members[i].upstream.active() as u128) * u128::from(members[j].weight)
                };
                load(a, b).cmp(&load(b, a))
            })
    }
}

/// Weighted rendezvous (highest random weight) hashing on the client's address: each
/// client ranks the upstreams by a hash of (client, upstream), so taking one out moves
/// only the clients that ranked it first.
#[derive(Debug, Default)]
pub struct IpHash;

impl IpHash {
    fn score(client: IpAddr, member: &Member) -> f64 {
        // Fixed seed: the same client ranks the same way after a reload.
        let hash = foldhash::fast::FixedState::with_seed(0x6c6f_6265_746c_7321)
            .hash_one((client, &member.upstream.addr));
        // A uniform draw in (0, 1), then -w/ln(u): the weighted HRW score.
        let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -f64::from(member.weight) / unit.ln()
    }
}

impl Balance for IpHash {
    fn pick(
        &self,
        members: &[Member],
        usable: &dyn Fn(usize) -> bool,
        cx: &PickContext,
    ) -> Option<usize> {
        (0..members.len()).filter(|&i| usable(i)).max_by(|&a, &b| {
            Self::score(cx.client_ip, &members[a])
                .total_cmp(&Self::score(cx.client_ip, &members[b]))
        })
    }
}

/// The key that makes an edge's affinity tokens: random for each edge, or shared
/// through the store by [`super::Edge::share_affinity_key`] (so a cookie from one
/// instance pins on every instance and across restarts). Each edge has its own, so a
/// cookie of one edge means nothing to another edge of the same process.
#[derive(Clone)]
pub(crate) struct AffinityKey(Arc<aws_lc_rs::hmac::Key>);

impl fmt::Debug for AffinityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A secret: never printed.
        f.write_str("AffinityKey(..)")
    }
}

impl AffinityKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let secret: [u8; 32] = rand::random();
        AffinityKey::from_secret(&secret)
    }

    /// The key made of `secret`.
    pub fn from_secret(secret: &[u8]) -> Self {
        AffinityKey(Arc::new(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            secret,
        )))
    }

    /// The affinity token of an upstream: an HMAC of its address, so the cookie says
    /// nothing about the upstream and cannot be forged to pick one.
    pub fn token(&self, site: &str, addr: &str) -> String {
        let tag = aws_lc_rs::hmac::sign(&self.0, format!("{site}\0{addr}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..18])
    }
}

/// The affinity token of each of `members`.
fn tokens(key: &AffinityKey, site: &str, members: &[Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| key.token(site, &m.upstream.addr))
        .collect()
}

/// The upstreams of one site, by address, reused from before a reload when they stay.
#[derive(Debug)]
pub(crate) struct UpstreamSet {
    by_addr: HashMap<String, Arc<Upstream>>,
    site: String,
    /// Mints the affinity tokens of the site's pools.
    key: AffinityKey,
}

impl UpstreamSet {
    pub fn new(
        config: &SiteConfig,
        site: &str,
        known: &[Arc<Upstream>],
        metrics: &EdgeMetrics,
        key: &AffinityKey,
    ) -> Self {
        let mut by_addr = HashMap::new();
        for spec in config
            .upstreams
            .iter()
            .chain(config.routes.iter().flat_map(|r| &r.upstreams))
        {
            let addr = spec.addr();
            let upstream = by_addr.entry(addr.to_owned()).or_insert_with(|| {
                known
                    .iter()
                    .find(|u| u.addr == addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Upstream::new(addr)))
            });
            metrics.set_up(site, addr, upstream.is_up());
        }
        UpstreamSet {
            by_addr,
            site: site.to_owned(),
            key: key.clone(),
        }
    }

    /// The site's name, for logs and metrics.
    pub fn site(&self) -> &str {
        &self.site
    }
}

/// The upstream chosen for a request.
#[derive(Debug)]
pub(crate) struct Choice {
    pub index: usize,
    /// A new affinity cookie to send back (cookie policy).
    pub set_cookie: Option<String>,
    /// Cookie policy: `hit` (the cookie's upstream), `new` (no valid cookie) or
    /// `repinned` (the cookie's upstream cannot take it); `None` for other policies.
    pub affinity: Option<&'static str>,
}

/// Upstreams that serve a site (or one of its routes), their policy, their client and
/// their health checks.
pub(crate) struct Pool {
    members: Vec<Member>,
    /// The affinity token of each member; replaced whole when the edge's key changes.
    tokens: ArcSwap<Vec<String>>,
    site: String,
    policy: Box<dyn Balance>,
    lb: LbPolicy,
    cookie_name: String,
    /// Keep-alive connections, one pool per member.
    conns: Vec<Arc<ConnPool>>,
    pub fall: u32,
    pub cooldown: std::time::Duration,
    /// The members' health checks, stopped on drop.
    checks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for check in &self.checks {
            check.abort();
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("members", &self.members)
            .field("lb", &self.lb)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(
        set: &UpstreamSet,
        specs: &[UpstreamSpec],
        lb: LbPolicy,
        config: &SiteConfig,
    ) -> Result<Pool> {
        let mut members: Vec<Member> = Vec::new();
        for spec in specs {
            if members.iter().any(|m| m.upstream.addr == spec.addr()) {
                return Err(Error::config(format!(
                    "site {}: upstream {} is listed twice",
                    set.site,
                    spec.addr()
                )));
            }
            let upstream = set.by_addr.get(spec.addr()).cloned().ok_or_else(|| {
                Error::config(format!(
                    "site {}: upstream {} unknown",
                    set.site,
                    spec.addr()
                ))
            })?;
            members.push(Member {
                upstream,
                weight: spec.weight(),
            });
        }
        let policy: Box<dyn Balance> = match lb {
            LbPolicy::RoundRobin => Box::new(RoundRobin::default()),
            LbPolicy::IpHash => Box::new(IpHash),
            LbPolicy::LeastConn | LbPolicy::Cookie => Box::new(LeastConn::default()),
        };
        let conns = members
            .iter()
            .map(|m| {
                ConnPool::new(
                    m.upstream.addr.clone(),
                    secs(config.connect_timeout),
                    POOL_IDLE_TIMEOUT,
                    POOL_MAX_IDLE,
                )
            })
            .collect();
        Ok(Pool {
            tokens: ArcSwap::from_pointee(tokens(&set.key, &set.site, &members)),
            site: set.site.clone(),
            members,
            policy,
            lb,
            cookie_name: config.cookie_name.clone(),
            conns,
            fall: config.fall,
            cooldown: secs(config.cooldown),
            checks: Vec::new(),
        })
    }

    /// Keeps the running health checks of the members; they stop when the pool is
    /// dropped (after a reload, once the old pool's last request is done).
    pub fn keep_checks(&mut self, checks: Vec<tokio::task::AbortHandle>) {
        self.checks.extend(checks);
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Mints the affinity tokens again with `key` (the edge's key changed before it
    /// served: see [`super::Edge::share_affinity_key`]).
    pub fn rekey(&self, key: &AffinityKey) {
        self.tokens
            .store(Arc::new(tokens(key, &self.site, &self.members)));
    }

    /// The keep-alive connections of member `index`.
    pub fn conns(&self, index: usize) -> Option<&Arc<ConnPool>> {
        self.conns.get(index)
    }

    /// Picks an upstream that is up and not in `tried`. With the cookie policy, a valid
    /// cookie naming a usable upstream wins; otherwise a new cookie is issued.
    pub fn choose(
        &self,
        cx: &PickContext,
        cookie: Option<&str>,
        tried: &[usize],
    ) -> Option<Choice> {
        let usable = |i: usize| self.members[i].upstream.is_up() && !tried.contains(&i);
        if self.lb == LbPolicy::Cookie {
            let tokens = self.tokens.load();
            let pinned = cookie.and_then(|value| tokens.iter().position(|t| t == value));
            if let Some(index) = pinned
                && usable(index)
            {
                return Some(Choice {
                    index,
                    set_cookie: None,
                    affinity: Some("hit"),
                });
            }
            let index = self.policy.pick(&self.members, &usable, cx)?;
            let set_cookie = format!(
                "{}={}; Path=/; HttpOnly; Secure; SameSite=Lax",
                self.cookie_name,
                tokens.get(index).map(String::as_str).unwrap_or_default()
            );
            return Some(Choice {
                index,
                set_cookie: Some(set_cookie),
                affinity: Some(if pinned.is_some() { "repinned" } else { "new" }),
            });
        }
        let index = self.policy.pick(&self.members, &usable, cx)?;
        Some(Choice {
            index,
            set_cookie: None,
            affinity: None,
        })
    }

    /// The affinity cookie's name (cookie policy), for reading it from requests.
    pub fn cookie_name(&self) -> Option<&str> {
        (self.lb == LbPolicy::Cookie).then_some(self.cookie_name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{Edge, EdgeConfig};

    /// An edge on loopback with one site of two upstreams, balanced by cookie.
    async fn cookie_edge() -> Edge {
        let mut site = SiteConfig::new(
            Vec::new(),
            vec![
                UpstreamSpec::Addr("127.0.0.1:1".into()),
                UpstreamSpec::Addr("127.0.0.1:2".into()),
            ],
        );
        site.lb = LbPolicy::Cookie;
        Edge::bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(crate::resolver::CertResolver::new()),
            EdgeConfig::new(vec![site]),
            crate::metrics::Metrics::new(),
        )
        .await
        .unwrap()
    }

    /// The cookie `edge` sets for a new client.
    fn cookie_of(edge: &Edge) -> String {
        let router = edge.shared.router.load();
        let site = router.all().next().unwrap();
        let cx = PickContext {
            client_ip: IpAddr::from([192, 0, 2, 1]),
        };
        let set = site
            .default
            .choose(&cx, None, &[])
            .unwrap()
            .set_cookie
            .unwrap();
        let (pair, _) = set.split_once(';').unwrap();
        pair.split_once('=').unwrap().1.to_owned()
    }

    /// Whether `edge` takes `cookie` (pins to its upstream, sets no new cookie).
    fn accepts(edge: &Edge, cookie: &str) -> bool {
        let router = edge.shared.router.load();
        let site = router.all().next().unwrap();
        let cx = PickContext {
            client_ip: IpAddr::from([192, 0, 2, 1]),
        };
        let choice = site.default.choose(&cx, Some(cookie), &[]).unwrap();
        choice.set_cookie.is_none()
    }

    #[tokio::test]
    async fn two_edges_of_one_process_do_not_take_each_others_cookies() {
        let (one, two) = (cookie_edge().await, cookie_edge().await);
        let cookie = cookie_of(&one);
        assert!(accepts(&one, &cookie));
        assert!(
            !accepts(&two, &cookie),
            "one edge's cookie pinned on another"
        );
        assert!(!accepts(&one, &cookie_of(&two)));

        // Edges sharing a store share its key, from their first token on; a third edge
        // of the process keeps its own.
        let dir = tempfile::tempdir().unwrap();
        let store: crate::store::DynStore =
            Arc::new(crate::store::FileStore::open(dir.path()).unwrap());
        one.share_affinity_key(&store).await.unwrap();
        two.share_affinity_key(&store).await.unwrap();
        let shared = cookie_of(&one);
        assert_ne!(shared, cookie, "the pools kept tokens of the old key");
        assert!(accepts(&two, &shared));
        assert!(accepts(&one, &cookie_of(&two)));
        let three = cookie_edge().await;
        assert!(!accepts(&three, &shared));
        // A reload after the key was shared mints with it too.
        let handle = two.handle();
        handle.reload(two.shared.config.sites.clone()).unwrap();
        assert!(accepts(&two, &shared));
    }

    fn members(addrs: &[&str]) -> Vec<Member> {
        addrs
            .iter()
            .map(|a| Member {
                upstream: Arc::new(Upstream::new(a)),
                weight: 1,
            })
            .collect()
    }

    #[test]
    fn ip_hash_moves_only_the_clients_of_a_removed_upstream() {
        let all = members(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]);
        let policy = IpHash;
        let mut moved = 0;
        let mut kept = 0;
        for n in 0..2000u32 {
            let cx = PickContext {
                client_ip: IpAddr::from(std::net::Ipv4Addr::from(0x0a01_0000 + n)),
            };
            let before = policy.pick(&all, &|_| true, &cx).unwrap_or(usize::MAX);
            // Upstream 2 goes away.
            let after = policy.pick(&all, &|i| i != 2, &cx).unwrap_or(usize::MAX);
            if before == 2 {
                assert_ne!(after, 2);
                moved += 1;
            } else {
                assert_eq!(before, after, "a client of a remaining upstream moved");
                kept += 1;
            }
            // Same client, same answer.
            assert_eq!(policy.pick(&all, &|_| true, &cx), Some(before));
        }
        // Roughly a quarter of the clients were on the removed upstream.
        assert!((300..700).contains(&moved), "moved {moved}, kept {kept}");
    }

    #[test]
    fn round_robin_follows_weights() {
        let mut all = members(&["a:1", "b:1"]);
        all[1].weight = 3;
        let policy = RoundRobin::default();
        let cx = PickContext {
            client_ip: IpAddr::from([127, 0, 0, 1]),
        };
        let picks: Vec<_> = (0..8)
            .filter_map(|_| policy.pick(&all, &|_| true, &cx))
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 6, "{picks:?}");
    }

    #[test]
    fn least_conn_prefers_the_idle_upstream() {
        let all = members(&["a:1", "b:1", "c:1"]);
        let _busy = (all[0].upstream.open(), all[2].upstream.open());
        let cx = PickContext {
            client_ip: IpAddr::from([127, 0, 0, 1]),
        };
        for _ in 0..5 {
            assert_eq!(LeastConn::default().pick(&all, &|_| true, &cx), Some(1));
        }
    }

    #[test]
    fn affinity_tokens_are_opaque_and_stable() {
        let key = AffinityKey::random();
        let token = key.token("site", "10.0.0.1:8080");
        assert_eq!(token, key.token("site", "10.0.0.1:8080"));
        assert_ne!(token, key.token("site", "10.0.0.2:8080"));
        assert!(!token.contains("10.0.0.1"));
        // Another key (another edge) mints other tokens.
        assert_ne!(token, AffinityKey::random().token("site", "10.0.0.1:8080"));
        let shared = AffinityKey::from_secret(&[7; 32]);
        assert_eq!(
            shared.token("site", "10.0.0.1:8080"),
            AffinityKey::from_secret(&[7; 32]).token("site", "10.0.0.1:8080")
        );
        assert_eq!(format!("{shared:?}"), "AffinityKey(..)");
    }

    #[test]
    fn passive_failures_eject_for_the_cooldown() {
        let upstream = Upstream::new("a:1");
        upstream.failed(2, std::time::Duration::from_secs(60));
        assert!(upstream.is_up());
        upstream.failed(2, std::time::Duration::from_secs(60));
        assert!(!upstream.is_up());
    }
}
