//! The edge's metrics, per site and upstream, as prometheus-client families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A site, a route and a status class (`2xx`, ..., `5xx`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The site's name (its first domain).
    pub site: String,
    /// The answering `[[site.route]]`'s `path`; empty for the site's own upstreams.
    pub route: String,
    /// `1xx` to `5xx`.
    pub class: String,
}

/// A site and one of its routes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The site's name.
    pub site: String,
    /// The route's `path`; empty for the site's own upstreams.
    pub route: String,
}

/// An upstream of one route of a site (an address listed in two routes has two).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRouteLabels {
    /// The site's name.
    pub site: String,
    /// The route's `path`; empty for the site's own upstreams.
    pub route: String,
    /// `host:port`.
    pub upstream: String,
}

/// A site.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    /// The site's name (its first domain, or `default`; `unknown` before routing).
    pub site: String,
}

/// An upstream of a site.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The site's name.
    pub site: String,
    /// `host:port`.
    pub upstream: String,
}

/// Why a connection was refused before TLS, or a request before any upstream.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Connections: `max_conns`, `max_conns_per_ip` or `proxy_protocol`; requests:
    /// `max_requests_per_ip`.
    pub reason: String,
}

/// A site and why the edge refused a request there.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// The site's name.
    pub site: String,
    /// `ip`: the client's address is denied, or not allowed, by the IP lists (403);
    /// `auth`: no valid API key or password (401).
    pub reason: String,
}

/// Which byte budget for request bodies kept for replay was spent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `connection` or `total`.
    pub budget: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every family the edge updates.
#[derive(Debug)]
pub struct EdgeMetrics {
    /// Responses by site, route and status class.
    pub requests: Family<StatusLabels, Counter>,
    /// Seconds until the response's head, by site and route.
    pub latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Requests sent to an upstream (each attempt), by site, route and upstream.
    pub upstream_requests: Family<UpstreamRouteLabels, Counter>,
    /// Attempts that failed at an upstream: no connection, no answer, or a 5xx answer.
    pub upstream_errors: Family<UpstreamRouteLabels, Counter>,
    /// Seconds from sending a request to an upstream until its response head.
    pub upstream_response: Family<UpstreamRouteLabels, Histogram, fn() -> Histogram>,
    /// Access log lines dropped because the writer was behind.
    pub access_log_dropped: Counter,
    /// 1 while an upstream is in rotation, 0 while it is out.
    pub upstream_up: Family<UpstreamLabels, Gauge>,
    /// Open client connections (after TLS).
    pub connections: Gauge,
    /// Open WebSockets, by site.
    pub websockets: Family<SiteLabels, Gauge>,
    /// Open event streams (`text/event-stream` responses), by site.
    pub streams: Family<SiteLabels, Gauge>,
    /// Requests sent again to another upstream, by site.
    pub retries: Family<SiteLabels, Counter>,
    /// Requests answered 429 by the rate limit, by site.
    pub rate_limited: Family<SiteLabels, Counter>,
    /// Connections refused before TLS, by reason.
    pub rejected: Family<ReasonLabels, Counter>,
    /// Requests refused by the edge before any upstream was asked, by reason
    /// (`max_requests_per_ip`).
    pub rejected_requests: Family<ReasonLabels, Counter>,
    /// Bytes of request bodies held for replay now.
    pub retry_buffer_bytes: Gauge,
    /// Request bodies streamed once, unretried, because a replay budget was spent.
    pub retry_buffer_refused: Family<BudgetLabels, Counter>,
    /// Requests refused by the site's access rules, by site and reason (`ip`: 403,
    /// `auth`: 401).
    pub denied: Family<DeniedLabels, Counter>,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        EdgeMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            upstream_requests: Family::default(),
            upstream_errors: Family::default(),
            upstream_response: Family::new_with_constructor(latency_histogram),
            access_log_dropped: Counter::default(),
            upstream_up: Family::default(),
            connections: Gauge::default(),
            websockets: Family::default(),
            streams: Family::default(),
            retries: Family::default(),
            rate_limited: Family::default(),
            rejected: Family::default(),
            rejected_requests: Family::default(),
            retry_buffer_bytes: Gauge::default(),
            retry_buffer_refused: Family::default(),
            denied: Family::default(),
        }
    }
}

impl EdgeMetrics {
    /// Adds every family to `registry` under the prefix `edge_`. The registry is expected
    /// to carry the crate's `lobe_tls` prefix already (as the one behind
    /// [`crate::metrics::Metrics::register`] does), so the names read `lobe_tls_edge_*`.
    pub fn register(&self, registry: &mut Registry) {
        // Every reason shows from the start, at zero, so a dashboard or an alert has a
        // series to read before the first refusal.
        for reason in ["max_conns", "max_conns_per_ip", "proxy_protocol"] {
            let _ = self.rejected.get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            });
        }
        let _ = self.rejected_requests.get_or_create(&ReasonLabels {
            reason: "max_requests_per_ip".to_owned(),
        });
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer was behind",
            self.access_log_dropped.clone(),
        );
        let r = registry.sub_registry_with_prefix("edge");
        r.register(
            "requests",
            "Responses by site, route and status class",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Seconds until the response head, by site and route",
            self.latency.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests sent to an upstream (each attempt), by site, route and upstream",
            self.upstream_requests.clone(),
        );
        r.register(
            "upstream_errors",
            "Attempts that failed at an upstream: no connection, no answer, or a 5xx answer",
            self.upstream_errors.clone(),
        );
        r.register(
            "upstream_response_seconds",
            "Seconds from sending a request to an upstream until its response head",
            self.upstream_response.clone(),
        );
        r.register(
            "upstream_up",
            "1 while an upstream is in rotation",
            self.upstream_up.clone(),
        );
        r.register(
            "connections",
            "Open client connections",
            self.connections.clone(),
        );
        r.register("websockets", "Open WebSockets", self.websockets.clone());
        r.register("streams", "Open event streams", self.streams.clone());
        r.register(
            "retries",
            "Requests sent again to another upstream",
            self.retries.clone(),
        );
        r.register(
            "rate_limited",
            "Requests answered 429 by the rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "rejected_connections",
            "Connections refused before TLS",
            self.rejected.clone(),
        );
        r.register(
            "rejected_requests",
            "Requests refused before any upstream was asked",
            self.rejected_requests.clone(),
        );
        r.register(
            "retry_buffer_bytes",
            "Bytes of request bodies held for replay",
            self.retry_buffer_bytes.clone(),
        );
        r.register(
            "retry_buffer_refused",
            "Request bodies streamed once, unretried, because a replay budget was spent",
            self.retry_buffer_refused.clone(),
        );
        r.register(
            "denied",
            "Requests refused by a site's access rules (ip: 403, auth: 401), by reason",
            self.denied.clone(),
        );
    }

    /// The families in the text format, without the OpenMetrics `# EOF` line, to append
    /// to another exposition.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix(crate::metrics::PREFIX);
        self.register(&mut registry);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            return String::new();
        }
        out.trim_end().trim_end_matches("# EOF").to_owned()
    }

    pub(crate) fn site(&self, site: &str) -> SiteLabels {
        SiteLabels {
            site: site.to_owned(),
        }
    }

    pub(crate) fn set_up(&self, site: &str, upstream: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                site: site.to_owned(),
                upstream: upstream.to_owned(),
            })
            .set(i64::from(up));
    }

    /// As `set_up`, for an upstream still listed: a pool draining after a reload does not
    /// bring back the label of an upstream the reload removed.
    pub(crate) fn refresh_up(&self, site: &str, upstream: &str, up: bool) {
        let labels = UpstreamLabels {
            site: site.to_owned(),
            upstream: upstream.to_owned(),
        };
        if let Some(gauge) = self.upstream_up.get(&labels) {
            gauge.set(i64::from(up));
        }
    }

    /// Counts a response outside every site's routes (no site for the Host).
    pub(crate) fn response(&self, site: &str, status: http::StatusCode, seconds: f64) {
        let class = format!("{}xx", status.as_u16() / 100);
        self.requests
            .get_or_create(&StatusLabels {
                site: site.to_owned(),
                route: String::new(),
                class,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                site: site.to_owned(),
                route: String::new(),
            })
            .observe(seconds);
    }

    /// The metrics of one upstream of one route, created (at zero) if new.
    pub(crate) fn for_upstream(&self, site: &str, route: &str, upstream: &str) -> UpstreamMetrics {
        let labels = UpstreamRouteLabels {
            site: site.to_owned(),
            route: route.to_owned(),
            upstream: upstream.to_owned(),
        };
        UpstreamMetrics {
            requests: self.upstream_requests.get_or_create(&labels).clone(),
            errors: self.upstream_errors.get_or_create(&labels).clone(),
            response: self.upstream_response.get_or_create(&labels).clone(),
        }
    }

    /// Drops the per-upstream series of `labels` (an upstream a reload removed).
    pub(crate) fn remove_upstream(&self, labels: &UpstreamRouteLabels) {
        self.upstream_requests.remove(labels);
        self.upstream_errors.remove(labels);
        self.upstream_response.remove(labels);
    }

    pub(crate) fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// One upstream's metrics in one route, looked up once when the site is built.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamMetrics {
    pub requests: Counter,
    pub errors: Counter,
    pub response: Histogram,
}

/// One route's response metrics (index 0 of a site's: its own upstreams).
#[derive(Debug, Clone)]
struct RouteMetrics {
    requests: [Counter; 5],
    latency: Histogram,
}

/// One site's metrics, looked up once when the site is built, so a request touches
/// atomics only (no label lookup).
#[derive(Debug, Clone)]
pub(crate) struct SiteMetrics {
    /// By route index: 0 for the site's own upstreams, then its routes in order.
    routes: Vec<RouteMetrics>,
    pub retries: Counter,
    pub rate_limited: Counter,
    pub websockets: Gauge,
    pub streams: Gauge,
    /// Requests refused by the IP lists.
    pub denied_ip: Counter,
    /// Requests refused 401 for a missing or wrong API key or password.
    pub denied_auth: Counter,
}

impl SiteMetrics {
    /// Counts a response of route `route` (0: the site's own upstreams, then its routes
    /// in order) by status class and records its latency.
    pub fn response(&self, route: usize, status: http::StatusCode, seconds: f64) {
        let Some(metrics) = self.routes.get(route).or(self.routes.first()) else {
            return;
        };
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        metrics.requests[class].inc();
        metrics.latency.observe(seconds);
    }
}

impl EdgeMetrics {
    /// The metrics of site `site` whose routes have the paths `routes` (in order).
    pub(crate) fn for_site(&self, site: &str, routes: &[&str]) -> SiteMetrics {
        let labels = self.site(site);
        let route = |route: &str| {
            let class = |n: u16| {
                self.requests
                    .get_or_create(&StatusLabels {
                        site: site.to_owned(),
                        route: route.to_owned(),
                        class: format!("{n}xx"),
                    })
                    .clone()
            };
            RouteMetrics {
                requests: [class(1), class(2), class(3), class(4), class(5)],
                latency: self
                    .latency
                    .get_or_create(&RouteLabels {
                        site: site.to_owned(),
                        route: route.to_owned(),
                    })
                    .clone(),
            }
        };
        // One statement each: a family's read guard lives to the end of the statement
        // that took it, and a second `get_or_create` on the family would wait for it.
        let denied = |reason: &str| {
            self.denied
                .get_or_create(&DeniedLabels {
                    site: site.to_owned(),
                    reason: reason.to_owned(),
                })
                .clone()
        };
        let denied_ip = denied("ip");
        let denied_auth = denied("auth");
        SiteMetrics {
            routes: std::iter::once("")
                .chain(routes.iter().copied())
                .map(route)
                .collect(),
            retries: self.retries.get_or_create(&labels).clone(),
            rate_limited: self.rate_limited.get_or_create(&labels).clone(),
            websockets: self.websockets.get_or_create(&labels).clone(),
            streams: self.streams.get_or_create(&labels).clone(),
            denied_ip,
            denied_auth,
        }
    }
}

/// Keeps a gauge one higher while alive.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
