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
use super::upstream_state::Upstream;

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
                let ok = check(&client, &upstream.addr, &host, path, timeout).await;
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

/// One check: a 2xx or 3xx answer within `timeout` passes.
async fn check(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: &str,
    host: &str,
    path: &str,
    timeout: Duration,
) -> bool {
    let Ok(request) = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "lobe-tls health check")
        .body(Empty::new())
    else {
        return false;
    };
    let answered = tokio::time::timeout(timeout, async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        // Read the (small) body so the upstream sees a complete exchange.
        let _ = response.into_body().collect().await;
        Some(status)
    })
    .await;
    matches!(answered, Ok(Some(status)) if status.is_success() || status.is_redirection())
}
