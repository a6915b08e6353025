//! Counters for the terminator and the certificates it serves, kept in a
//! [`prometheus_client`] registry and rendered in the OpenMetrics text format, and a small
//! HTTP listener that serves them.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `lobe_tls_certificate_expiry_timestamp_seconds` | gauge | `name`, `source` |
//! | `lobe_tls_certificate_not_before_timestamp_seconds` | gauge | `name`, `source` |
//! | `lobe_tls_renewal_failures_total` | counter | `name` |
//! | `lobe_tls_certificate_conflicts_total` | counter | `name` |
//! | `lobe_tls_unusable_certificates_total` | counter | `name` |
//! | `lobe_tls_handshakes_total` | counter | `result` = `ok` / `failed`, `resumed` = `true` / `false` |
//! | `lobe_tls_active_connections` | gauge | |
//! | `lobe_tls_connections_total` | counter | |
//! | `lobe_tls_upstream_errors_total` | counter | |
//!
//! An embedder (the edge, or a proxy of its own) adds its families to the same registry
//! with [`Metrics::register`], so one scrape shows them all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::Result;
use crate::listen::ListenerTask;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every metric lobe-tls registers.
pub(crate) const PREFIX: &str = "lobe_tls";

/// A label value written with the text format's escapes (backslash, double quote,
/// newline). prometheus-client writes label values as they are, and a name that comes from
/// a directory on disk may hold any of those characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelText(pub String);

impl From<&str> for LabelText {
    fn from(value: &str) -> Self {
        LabelText(value.to_owned())
    }
}

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// One certificate's expiry, as a metrics source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// The certificate's name (its directory or managed name).
    pub name: String,
    /// Where it comes from: `dir` for the watcher, `managed` for the manager.
    pub source: &'static str,
    /// The start of its validity as a Unix timestamp in seconds: with `not_after`, an
    /// alert can speak of the lifetime ("a third of it left") rather than of fixed days.
    pub not_before: i64,
    /// Its expiry as a Unix timestamp in seconds.
    pub not_after: i64,
    /// The renewal window (start, end) the CA suggested through ARI, Unix seconds.
    pub ari_window: Option<(i64, i64)>,
}

type CertSource = Box<dyn Fn() -> Vec<CertExpiry> + Send + Sync>;
type NameLabel = [(&'static str, LabelText); 1];
type ResultLabel = [(&'static str, &'static str); 2];

/// The counters. Shared through an `Arc`; every method is cheap and lock-free except
/// [`Metrics::register`] and the certificate sources, which are not on the handshake path.
pub struct Metrics {
    registry: RwLock<Registry>,
    /// Families under their own standard names, without the `lobe_tls_` prefix
    /// (`process_*`).
    unprefixed: RwLock<Registry>,
    // The family's three members, held so that a handshake costs one atomic add.
    handshakes_full: Counter,
    handshakes_resumed: Counter,
    handshakes_failed: Counter,
    active_connections: Gauge,
    connections_total: Counter,
    upstream_errors: Counter,
    renewal_failures: Family<NameLabel, Counter>,
    conflicts: Family<NameLabel, Counter>,
    unusable: Family<NameLabel, Counter>,
    cert_sources: Arc<CertSources>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ok, failed) = self.handshakes();
        f.debug_struct("Metrics")
            .field("handshakes_ok", &ok)
            .field("handshakes_failed", &failed)
            .field("active_connections", &self.active_connections())
            .finish_non_exhaustive()
    }
}

/// The certificate expiry gauge: asked of its sources at every scrape, so it always shows
/// what is served now and never a certificate that is gone.
#[derive(Default)]
struct CertSources(Mutex<Vec<CertSource>>);

impl std::fmt::Debug for CertSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSources")
    }
}

impl Collector for CertSources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut certs: Vec<CertExpiry> = match self.0.lock() {
            Ok(sources) => sources.iter().flat_map(|source| source()).collect(),
            Err(_) => Vec::new(),
        };
        certs.sort_by(|a, b| (a.source, &a.name).cmp(&(b.source, &b.name)));
        let probe = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "certificate_expiry_timestamp_seconds",
            "When each served certificate expires (Unix time)",
            None,
            probe.metric_type(),
        )?;
        let labels = |cert: &CertExpiry| {
            [
                ("name", LabelText(cert.name.clone())),
                ("source", LabelText(cert.source.to_owned())),
            ]
        };
        for cert in &certs {
            ConstGauge::new(cert.not_after).encode(family.encode_family(&labels(cert))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "certificate_not_before_timestamp_seconds",
            "When each served certificate became valid (Unix time)",
            None,
            probe.metric_type(),
        )?;
        for cert in &certs {
            ConstGauge::new(cert.not_before).encode(family.encode_family(&labels(cert))?)?;
        }
        for (edge, pick) in [("start", 0), ("end", 1)] {
            let name = format!("certificate_ari_window_{edge}_timestamp_seconds");
            let help =
                format!("The {edge} of the renewal window the CA suggests through ARI (Unix time)");
            let mut family = encoder.encode_descriptor(&name, &help, None, probe.metric_type())?;
            for cert in &certs {
                if let Some(window) = cert.ari_window {
                    let at = if pick == 0 { window.0 } else { window.1 };
                    ConstGauge::new(at).encode(family.encode_family(&labels(cert))?)?;
                }
            }
        }
        Ok(())
    }
}

/// Counts one connection as active until dropped.
#[derive(Debug)]
pub struct ActiveConnection {
    metrics: Arc<Metrics>,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.metrics.active_connections.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let handshakes = Family::<ResultLabel, Counter>::default();
        let active_connections = Gauge::default();
        let connections_total = Counter::default();
        let upstream_errors = Counter::default();
        let renewal_failures = Family::<NameLabel, Counter>::default();
        let conflicts = Family::<NameLabel, Counter>::default();
        let unusable = Family::<NameLabel, Counter>::default();
        let cert_sources = Arc::new(CertSources::default());
        registry.register_collector(Box::new(cert_sources.clone()));
        registry.register(
            "renewal_failures",
            "Failed renewal attempts per managed certificate",
            renewal_failures.clone(),
        );
        registry.register(
            "certificate_conflicts",
            "Times another instance stored a certificate with a configuration other than this one's",
            conflicts.clone(),
        );
        registry.register(
            "unusable_certificates",
            "Times a stored certificate could not be served (unreadable, key mismatch, expired)",
            unusable.clone(),
        );
        registry.register("handshakes", "TLS handshakes by result", handshakes.clone());
        registry.register(
            "active_connections",
            "Connections being forwarded now",
            active_connections.clone(),
        );
        registry.register(
            "connections",
            "Connections forwarded since start",
            connections_total.clone(),
        );
        registry.register(
            "upstream_errors",
            "Connections whose upstream could not be reached",
            upstream_errors.clone(),
        );
        let handshakes_full = handshakes.get_or_create(&FULL).clone();
        let handshakes_resumed = handshakes.get_or_create(&RESUMED).clone();
        let handshakes_failed = handshakes.get_or_create(&FAILED).clone();
        Metrics {
            registry: RwLock::new(registry),
            unprefixed: RwLock::new(Registry::default()),
            handshakes_full,
            handshakes_resumed,
            handshakes_failed,
            active_connections,
            connections_total,
            upstream_errors,
            renewal_failures,
            conflicts,
            unusable,
            cert_sources,
        }
    }
}

const FULL: ResultLabel = [("result", "ok"), ("resumed", "false")];
const RESUMED: ResultLabel = [("result", "ok"), ("resumed", "true")];
// A failed handshake resumed nothing.
const FAILED: ResultLabel = [("result", "failed"), ("resumed", "false")];

fn name_label(name: &str) -> NameLabel {
    [("name", LabelText::from(name))]
}

impl Metrics {
    /// Fresh counters, all zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds families of the embedder's own to the registry behind [`Metrics::render`]
    /// (names get the `lobe_tls_` prefix). Call it at setup, not per request.
    pub fn register(&self, add: impl FnOnce(&mut Registry)) {
        match self.registry.write() {
            Ok(mut registry) => add(&mut registry),
            Err(poisoned) => add(&mut poisoned.into_inner()),
        }
    }

    /// As [`Metrics::register`], for families whose standard names carry no prefix (the
    /// process metrics, `process_*`).
    pub fn register_unprefixed(&self, add: impl FnOnce(&mut Registry)) {
        match self.unprefixed.write() {
            Ok(mut registry) => add(&mut registry),
            Err(poisoned) => add(&mut poisoned.into_inner()),
        }
    }

    /// Counts a completed TLS handshake; `resumed` when it resumed an earlier session (a
    /// ticket or the session cache), so no key exchange with a signature was made.
    pub fn handshake_ok(&self, resumed: bool) {
        if resumed {
            self.handshakes_resumed.inc();
        } else {
            self.handshakes_full.inc();
        }
    }

    /// Counts a failed or refused TLS handshake.
    pub fn handshake_failed(&self) {
        self.handshakes_failed.inc();
    }

    /// Counts a connection as active for as long as the returned guard lives.
    pub fn connection_opened(self: &Arc<Self>) -> ActiveConnection {
        self.connections_total.inc();
        self.active_connections.inc();
        ActiveConnection {
            metrics: self.clone(),
        }
    }

    /// Counts a connection whose upstream could not be reached.
    pub fn upstream_error(&self) {
        self.upstream_errors.inc();
    }

    /// Connections whose upstream could not be reached, so far.
    pub fn upstream_errors(&self) -> u64 {
        self.upstream_errors.get()
    }

    /// The number of connections being forwarded now.
    pub fn active_connections(&self) -> i64 {
        self.active_connections.get()
    }

    /// Completed (full and resumed) and failed handshakes so far.
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.handshakes_full.get() + self.handshakes_resumed.get(),
            self.handshakes_failed.get(),
        )
    }

    /// Completed handshakes that resumed an earlier session, so far.
    pub fn resumed_handshakes(&self) -> u64 {
        self.handshakes_resumed.get()
    }

    /// Makes `name` appear in the renewal failure, conflict and unusable counters, at
    /// zero until they count something.
    pub fn track_renewals(&self, name: &str) {
        let label = name_label(name);
        let _ = self.renewal_failures.get_or_create(&label);
        let _ = self.conflicts.get_or_create(&label);
        let _ = self.unusable.get_or_create(&label);
    }

    /// Counts a failed renewal of `name`.
    pub fn renewal_failed(&self, name: &str) {
        self.renewal_failures.get_or_create(&name_label(name)).inc();
    }

    /// Counts a configuration conflict on `name`: another instance stored it for other
    /// names or another key type (the manager's `ConfigConflict` event).
    pub fn config_conflict(&self, name: &str) {
        self.conflicts.get_or_create(&name_label(name)).inc();
    }

    /// Counts a stored certificate found unusable (garbage, a key that does not match).
    pub fn unusable(&self, name: &str) {
        self.unusable.get_or_create(&name_label(name)).inc();
    }

    /// Adds a source of certificate expiries, asked at every scrape.
    pub fn add_cert_source(&self, source: impl Fn() -> Vec<CertExpiry> + Send + Sync + 'static) {
        if let Ok(mut sources) = self.cert_sources.0.lock() {
            sources.push(Box::new(source));
        }
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let read = |lock: &RwLock<Registry>, out: &mut String| match lock.read() {
            Ok(registry) => encode_registry(out, &registry),
            Err(poisoned) => encode_registry(out, &poisoned.into_inner()),
        };
        let encoded = read(&self.registry, &mut out)
            .and_then(|()| read(&self.unprefixed, &mut out))
            .and_then(|()| encode_eof(&mut out));
        if let Err(e) = encoded {
            // Writing into a String cannot fail; a collector that did is a bug worth a line.
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

/// An HTTP listener that serves `GET /metrics`. Stops when dropped.
#[derive(Debug)]
pub struct MetricsListener {
    task: ListenerTask,
}

impl MetricsListener {
    /// Binds `addr` and serves `metrics` there.
    pub async fn bind(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Self> {
        let task = ListenerTask::spawn(addr, |listener| serve(listener, metrics)).await?;
        Ok(MetricsListener { task })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.task.local_addr()
    }
}

async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, req.method(), req.uri().path())) }
            });
            let builder = crate::listen::http_builder();
            let _ = tokio::time::timeout(
                crate::listen::HTTP_CONNECTION_LIMIT,
                builder.serve_connection(TokioIo::new(stream), service),
            )
            .await;
        });
    }
}

fn respond(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if method == Method::GET && path == "/metrics" {
        (StatusCode::OK, CONTENT_TYPE, metrics.render())
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        )
    };
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_certificate_and_counter() {
        let metrics = Metrics::new();
        metrics.add_cert_source(|| {
            vec![
                CertExpiry {
                    name: "a\"b".into(),
                    source: "dir",
                    not_before: 1_790_000_000,
                    not_after: 1_800_000_000,
                    ari_window: None,
                },
                CertExpiry {
                    name: "m".into(),
                    source: "managed",
                    not_before: 1_790_000_000,
                    not_after: 1_800_000_000,
                    ari_window: Some((1_700_000_000, 1_700_086_400)),
                },
            ]
        });
        metrics.track_renewals("managed.example");
        metrics.renewal_failed("managed.example");
        metrics.handshake_ok(false);
        metrics.handshake_ok(true);
        metrics.handshake_ok(true);
        metrics.handshake_failed();
        metrics.handshake_failed();
        let guard = metrics.connection_opened();
        let text = metrics.render();
        for line in [
            "lobe_tls_certificate_expiry_timestamp_seconds{name=\"a\\\"b\",source=\"dir\"} 1800000000",
            "lobe_tls_certificate_not_before_timestamp_seconds{name=\"m\",source=\"managed\"} 1790000000",
            "lobe_tls_renewal_failures_total{name=\"managed.example\"} 1",
            "lobe_tls_certificate_ari_window_start_timestamp_seconds{name=\"m\",source=\"managed\"} 1700000000",
            "lobe_tls_certificate_ari_window_end_timestamp_seconds{name=\"m\",source=\"managed\"} 1700086400",
            "lobe_tls_handshakes_total{result=\"ok\",resumed=\"false\"} 1",
            "lobe_tls_handshakes_total{result=\"ok\",resumed=\"true\"} 2",
            "lobe_tls_handshakes_total{result=\"failed\",resumed=\"false\"} 2",
            "lobe_tls_active_connections 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics:\n{text}");
        drop(guard);
        assert!(metrics.render().contains("lobe_tls_active_connections 0\n"));
    }

    #[test]
    fn families_an_embedder_registers_show_in_the_same_scrape() {
        let metrics = Metrics::new();
        let requests = Family::<[(&'static str, LabelText); 1], Counter>::default();
        metrics.register(|registry| {
            registry.register("edge_requests", "Requests", requests.clone());
        });
        requests
            .get_or_create(&[("site", LabelText::from("chat"))])
            .inc();
        let text = metrics.render();
        assert!(
            text.lines()
                .any(|l| l == "lobe_tls_edge_requests_total{site=\"chat\"} 1"),
            "{text}"
        );
        assert!(text.contains("lobe_tls_handshakes_total{result=\"ok\",resumed=\"true\"} 0"));
    }
}
