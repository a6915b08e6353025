//! Upstream pools and the balancing policies that pick one upstream per request.
//!
//! A policy is a small trait with one implementation each (round robin, least
//! connections, consistent ip-hash); the cookie policy pins a client to the upstream
//! least-conn chose first, through an opaque HMAC'd token.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use serde::Deserialize;

use super::health::HealthTask;
use super::metrics::EdgeMetrics;
use super::pool::ConnPool;
use super::site::{SiteConfig, UpstreamSpec, secs};
use crate::error::{Error, Result};

/// How long an idle keep-alive connection to an upstream is kept.
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Idle keep-alive connections kept per upstream and pool.
const POOL_MAX_IDLE: usize = 512;

/// The body type sent to upstreams and back to clients.
pub(crate) type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
/// Errors of bodies in flight.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

impl std::str::FromStr for LbPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "round-robin" => Ok(LbPolicy::RoundRobin),
            "least-conn" => Ok(LbPolicy::LeastConn),
            "ip-hash" => Ok(LbPolicy::IpHash),
            "cookie" => Ok(LbPolicy::Cookie),
            other => Err(Error::Config(format!(
                "unknown balancing policy {other:?}: use round-robin, least-conn, ip-hash or cookie"
            ))),
        }
    }
}

/// The process's start, the zero of the upstreams' clocks.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One upstream address and what is known about it, shared by every pool that lists it
/// and kept across reloads.
pub struct Upstream {
    /// `host:port`.
    pub addr: String,
    active: AtomicUsize,
    /// Set by active checks.
    healthy: AtomicBool,
    /// Passive ejection: out until this time (ms since the epoch).
    ejected_until: AtomicU64,
    failures: AtomicU32,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr)
            .field("active", &self.active())
            .field("up", &self.is_up())
            .finish()
    }
}

impl Upstream {
    fn new(addr: &str) -> Self {
        Upstream {
            addr: addr.to_owned(),
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    /// Open requests, streams and connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Passing active checks and not ejected.
    pub fn is_up(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// Counts one request or connection as open until the guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A connect failure or a 5xx answer; `fall` of them in a row take the upstream out
    /// for `cooldown`.
    pub(crate) fn failed(&self, fall: u32, cooldown: std::time::Duration) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= fall {
            self.failures.store(0, Ordering::Relaxed);
            let until =
                now_ms().saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX));
            self.ejected_until.store(until, Ordering::Relaxed);
            tracing::warn!(
                upstream = self.addr,
                ?cooldown,
                "upstream failing; taken out for a cool-down"
            );
        }
    }

    /// A good answer: the failure streak ends.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Keeps an upstream's open count up while alive.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Upstream>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// The key that makes affinity tokens: shared through the store when
/// [`super::share_affinity_key`] ran first (so a cookie from one instance pins on every
/// instance and across restarts), else random per process.
static COOKIE_KEY: OnceLock<aws_lc_rs::hmac::Key> = OnceLock::new();

fn cookie_key() -> &'static aws_lc_rs::hmac::Key {
    COOKIE_KEY.get_or_init(|| {
        let secret: [u8; 32] = rand::random();
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret)
    })
}

/// Sets the affinity key from `secret`; false when a key is in use already.
pub(crate) fn set_cookie_key(secret: &[u8]) -> bool {
    COOKIE_KEY
        .set(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            secret,
        ))
        .is_ok()
}

/// The affinity token of an upstream: an HMAC of its address, so the cookie says
/// nothing about the upstream and cannot be forged to pick one.
pub(crate) fn affinity_token(site: &str, addr: &str) -> String {
    let tag = aws_lc_rs::hmac::sign(cookie_key(), format!("{site}\0{addr}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..18])
}

/// The upstreams of one site, by address, reused from before a reload when they stay.
#[derive(Debug)]
pub(crate) struct UpstreamSet {
    by_addr: HashMap<String, Arc<Upstream>>,
    site: String,
}

impl UpstreamSet {
    pub fn new(
        config: &SiteConfig,
        site: &str,
        known: &[Arc<Upstream>],
        metrics: &EdgeMetrics,
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
        }
    }
}

/// The upstream chosen for a request.
#[derive(Debug)]
pub(crate) struct Choice {
    pub index: usize,
    /// A new affinity cookie to send back (cookie policy).
    pub set_cookie: Option<String>,
}

/// Upstreams that serve a site (or one of its routes), their policy, their client and
/// their health checks.
pub(crate) struct Pool {
    members: Vec<Member>,
    tokens: Vec<String>,
    policy: Box<dyn Balance>,
    lb: LbPolicy,
    cookie_name: String,
    /// Keep-alive connections, one pool per member.
    conns: Vec<Arc<ConnPool>>,
    pub fall: u32,
    pub cooldown: std::time::Duration,
    _health: Vec<HealthTask>,
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
        metrics: &Arc<EdgeMetrics>,
    ) -> Result<Pool> {
        let mut members: Vec<Member> = Vec::new();
        for spec in specs {
            if members.iter().any(|m| m.upstream.addr == spec.addr()) {
                return Err(Error::Config(format!(
                    "site {}: upstream {} is listed twice",
                    set.site,
                    spec.addr()
                )));
            }
            let upstream = set.by_addr.get(spec.addr()).cloned().ok_or_else(|| {
                Error::Config(format!(
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
        let health = members
            .iter()
            .zip(&conns)
            .map(|(m, conns)| {
                HealthTask::spawn(
                    m.upstream.clone(),
                    Arc::downgrade(conns),
                    &set.site,
                    config,
                    metrics.clone(),
                )
            })
            .collect();
        Ok(Pool {
            tokens: members
                .iter()
                .map(|m| affinity_token(&set.site, &m.upstream.addr))
                .collect(),
            members,
            policy,
            lb,
            cookie_name: config.cookie_name.clone(),
            conns,
            fall: config.fall,
            cooldown: secs(config.cooldown),
            _health: health,
        })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
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
            if let Some(index) =
                cookie.and_then(|value| self.tokens.iter().position(|t| t == value))
                && usable(index)
            {
                return Some(Choice {
                    index,
                    set_cookie: None,
                });
            }
            let index = self.policy.pick(&self.members, &usable, cx)?;
            let set_cookie = format!(
                "{}={}; Path=/; HttpOnly; Secure; SameSite=Lax",
                self.cookie_name, self.tokens[index]
            );
            return Some(Choice {
                index,
                set_cookie: Some(set_cookie),
            });
        }
        let index = self.policy.pick(&self.members, &usable, cx)?;
        Some(Choice {
            index,
            set_cookie: None,
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
        let token = affinity_token("site", "10.0.0.1:8080");
        assert_eq!(token, affinity_token("site", "10.0.0.1:8080"));
        assert_ne!(token, affinity_token("site", "10.0.0.2:8080"));
        assert!(!token.contains("10.0.0.1"));
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
