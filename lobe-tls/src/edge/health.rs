//! Active health checks: an HTTP GET of the site's `health_path` on each upstream every
//! `health_interval`, bounded by `health_timeout`; `rise` passes bring an upstream back,
//! `fall` failures take it out. Passive ejection lives on the upstream itself
//! (`Upstream::failed`); this task also keeps the up/down gauge current, and sweeps the
//! upstream's idle keep-alive connections.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::AbortHandle;

use super::config::{SiteConfig, secs};
use super::metrics::EdgeMetrics;
use super::pool::ConnPool;
use super::upstream_state::{CheckResult, Upstream};

/// Starts the checks of `upstream`, writing its health state and sweeping the idle
/// connections of `conns`; the caller stops them through the handle (when the pool that
/// owns them is dropped).
pub(crate) fn spawn(
    upstream: Arc<Upstream>,
    conns: Weak<ConnPool>,
    site: &str,
    config: &SiteConfig,
    metrics: Arc<EdgeMetrics>,
) -> AbortHandle {
    let site = site.to_owned();
    let path = config.health_path.clone();
    let host = config
        .domains
        .first()
        .cloned()
        .unwrap_or_else(|| upstream.addr.clone());
    let interval = secs(config.health_interval);
    let timeout = secs(config.health_timeout);
    let (rise, fall) = (config.rise, config.fall);
    tokio::spawn(async move {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        // No pool: each check opens a connection, as a new client would.
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let (mut passes, mut failures) = (0u32, 0u32);
        // The gauge follows passive ejections too, so it is refreshed at least each second.
        let tick = interval.min(Duration::from_secs(1));
        let mut next_check = tokio::time::Instant::now();
        loop {
            if let Some(path) = &path
                && tokio::time::Instant::now() >= next_check
            {
                next_check += interval;
                let result = check(&client, &upstream.addr, &host, path, timeout).await;
                let (ok, reason) = (result.ok, result.result.clone());
                upstream.record_check(result);
                if ok {
                    passes += 1;
                    failures = 0;
                    if !upstream.is_healthy() && passes >= rise && upstream.set_healthy(true) {
                        tracing::info!(
                            upstream = upstream.addr,
                            site,
                            "upstream passes its health checks again"
                        );
                    }
                } else {
                    failures += 1;
                    passes = 0;
                    if upstream.is_healthy() && failures >= fall && upstream.set_healthy(false) {
                        tracing::warn!(
                            upstream = upstream.addr,
                            site,
                            path,
                            reason,
                            "upstream fails its health checks; taken out"
                        );
                    }
                }
            }
            metrics.refresh_up(&site, &upstream.addr, upstream.is_up());
            if let Some(conns) = conns.upgrade() {
                conns.sweep();
            }
            let wake = if path.is_some() {
                next_check.min(tokio::time::Instant::now() + tick)
            } else {
                tokio::time::Instant::now() + tick
            };
            tokio::time::sleep_until(wake).await;
        }
    })
    .abort_handle()
}

/// One check: a 2xx or 3xx answer within `timeout` passes. The result says why not:
/// `dns`, `refused`, `timeout`, `reset`, `status 404`, or `error` with the cause.
async fn check(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: &str,
    host: &str,
    path: &str,
    timeout: Duration,
) -> CheckResult {
    let started = std::time::Instant::now();
    let at = std::time::SystemTime::now();
    let done = |ok: bool, result: String| CheckResult {
        ok,
        result,
        latency: started.elapsed(),
        at,
    };
    let Ok(request) = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "lobe-tls health check")
        .body(Empty::new())
    else {
        return done(false, "error: not a valid request URL".to_owned());
    };
    let answered = tokio::time::timeout(timeout, async {
        let response = client.request(request).await?;
        let status = response.status();
        // Read the (small) body so the upstream sees a complete exchange.
        let _ = response.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    })
    .await;
    match answered {
        Err(_) => done(false, "timeout".to_owned()),
        Ok(Err(e)) => done(false, failure_reason(&e)),
        Ok(Ok(status)) => done(
            status.is_success() || status.is_redirection(),
            format!("status {}", status.as_u16()),
        ),
    }
}

/// Why a check's request failed, in one word where the cause is a common one.
fn failure_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut source = Some(error);
    let mut text = String::new();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "refused".to_owned(),
                std::io::ErrorKind::TimedOut => return "timeout".to_owned(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                    return "reset".to_owned();
                }
                _ => {}
            }
        }
        text = e.to_string();
        // hyper-util's connector names its resolver's failures so.
        if text.contains("dns error") {
            return "dns".to_owned();
        }
        source = e.source();
    }
    format!("error: {text}")
}

/// Resolves every upstream host name of `sites` once and warns about each that does
/// not resolve (a typo, a missing /etc/hosts entry), so the operator learns it at start
/// rather than from a health check later. Addresses are skipped; each lookup is bounded
/// to 5 s.
pub async fn warn_unresolved_upstreams(sites: &[SiteConfig]) {
    let mut seen = std::collections::HashSet::new();
    for site in sites {
        let name = site.name();
        let specs = site
            .upstreams
            .iter()
            .chain(site.routes.iter().flat_map(|r| &r.upstreams));
        for spec in specs {
            let addr = spec.addr();
            let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.parse::<std::net::IpAddr>().is_ok() || !seen.insert(addr.to_owned()) {
                continue;
            }
            let looked_up =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(addr)).await;
            let problem = match looked_up {
                Err(_) => Some("no answer within 5 s".to_owned()),
                Ok(Err(e)) => Some(e.to_string()),
                Ok(Ok(mut addrs)) => addrs.next().is_none().then(|| "no address".to_owned()),
            };
            if let Some(error) = problem {
                tracing::warn!(
                    site = name,
                    upstream = addr,
                    error,
                    "upstream name does not resolve"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_check_says_why() {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let timeout = Duration::from_secs(5);
        let refused = check(&client, &addr, "x", "/", timeout).await;
        assert_eq!((refused.ok, refused.result.as_str()), (false, "refused"));
        let dns = check(&client, "no-such-host.invalid:80", "x", "/", timeout).await;
        assert_eq!((dns.ok, dns.result.as_str()), (false, "dns"));
        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let slow = check(&client, &addr, "x", "/", Duration::from_millis(200)).await;
        assert_eq!((slow.ok, slow.result.as_str()), (false, "timeout"));
        assert!(slow.latency >= Duration::from_millis(200));
    }
}
