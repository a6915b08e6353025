//! Counters for the terminator and the certificates it serves, rendered in the Prometheus
//! text exposition format, and a small HTTP listener that serves them.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `lobe_tls_certificate_expiry_timestamp_seconds` | gauge | `name`, `source` |
//! | `lobe_tls_renewal_failures_total` | counter | `name` |
//! | `lobe_tls_certificate_conflicts_total` | counter | `name` |
//! | `lobe_tls_unusable_certificates_total` | counter | `name` |
//! | `lobe_tls_handshakes_total` | counter | `result` = `ok` / `failed` |
//! | `lobe_tls_active_connections` | gauge | |
//! | `lobe_tls_connections_total` | counter | |
//! | `lobe_tls_upstream_errors_total` | counter | |

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::Result;
use crate::listen::ListenerTask;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One certificate's expiry, as a metrics source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// The certificate's name (its directory or managed name).
    pub name: String,
    /// Where it comes from: `dir` for the watcher, `managed` for the manager.
    pub source: &'static str,
    /// Its expiry as a Unix timestamp in seconds.
    pub not_after: i64,
}

type CertSource = Box<dyn Fn() -> Vec<CertExpiry> + Send + Sync>;
type TextSource = Box<dyn Fn() -> String + Send + Sync>;

/// The counters. Shared through an `Arc`; every method is cheap and lock-free except the
/// per-certificate ones, which are not on the handshake path.
#[derive(Default)]
pub struct Metrics {
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    active_connections: AtomicI64,
    connections_total: AtomicU64,
    upstream_errors: AtomicU64,
    renewal_failures: Mutex<BTreeMap<String, u64>>,
    conflicts: Mutex<BTreeMap<String, u64>>,
    unusable: Mutex<BTreeMap<String, u64>>,
    cert_sources: Mutex<Vec<CertSource>>,
    text_sources: Mutex<Vec<TextSource>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("handshakes_ok", &self.handshakes_ok)
            .field("handshakes_failed", &self.handshakes_failed)
            .field("active_connections", &self.active_connections)
            .finish_non_exhaustive()
    }
}

/// Counts one connection as active until dropped.
#[derive(Debug)]
pub struct ActiveConnection {
    metrics: Arc<Metrics>,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.metrics
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Fresh counters, all zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a completed TLS handshake.
    pub fn handshake_ok(&self) {
        self.handshakes_ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed or refused TLS handshake.
    pub fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection as active for as long as the returned guard lives.
    pub fn connection_opened(self: &Arc<Self>) -> ActiveConnection {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.active_connections.fetch_add(1, Ordering::Relaxed);
        ActiveConnection {
            metrics: self.clone(),
        }
    }

    /// Counts a connection whose upstream could not be reached.
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections whose upstream could not be reached, so far.
    pub fn upstream_errors(&self) -> u64 {
        self.upstream_errors.load(Ordering::Relaxed)
    }

    /// The number of connections being forwarded now.
    pub fn active_connections(&self) -> i64 {
        self.active_connections.load(Ordering::Relaxed)
    }

    /// Completed and failed handshakes so far.
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.handshakes_ok.load(Ordering::Relaxed),
            self.handshakes_failed.load(Ordering::Relaxed),
        )
    }

    /// Makes `name` appear in the renewal failure counter, at zero if it has not failed.
    pub fn track_renewals(&self, name: &str) {
        if let Ok(mut failures) = self.renewal_failures.lock() {
            failures.entry(name.to_owned()).or_insert(0);
        }
    }

    /// Counts a failed renewal of `name`.
    pub fn renewal_failed(&self, name: &str) {
        if let Ok(mut failures) = self.renewal_failures.lock() {
            *failures.entry(name.to_owned()).or_insert(0) += 1;
        }
    }

    /// Counts a configuration conflict on `name`: another instance stored it for other
    /// names or another key type (the manager's `ConfigConflict` event).
    pub fn config_conflict(&self, name: &str) {
        if let Ok(mut conflicts) = self.conflicts.lock() {
            *conflicts.entry(name.to_owned()).or_insert(0) += 1;
        }
    }

    /// Counts a stored certificate found unusable (garbage, a key that does not match).
    pub fn unusable(&self, name: &str) {
        if let Ok(mut unusable) = self.unusable.lock() {
            *unusable.entry(name.to_owned()).or_insert(0) += 1;
        }
    }

    /// Adds a source of certificate expiries, asked at every scrape.
    pub fn add_cert_source(&self, source: impl Fn() -> Vec<CertExpiry> + Send + Sync + 'static) {
        if let Ok(mut sources) = self.cert_sources.lock() {
            sources.push(Box::new(source));
        }
    }

    /// Appends what `source` renders (families in the text format, e.g. the edge's) to
    /// every scrape.
    pub fn add_text_source(&self, source: impl Fn() -> String + Send + Sync + 'static) {
        if let Ok(mut sources) = self.text_sources.lock() {
            sources.push(Box::new(source));
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP lobe_tls_certificate_expiry_timestamp_seconds When each served certificate expires (Unix time).\n");
        out.push_str("# TYPE lobe_tls_certificate_expiry_timestamp_seconds gauge\n");
        let mut certs: Vec<CertExpiry> = match self.cert_sources.lock() {
            Ok(sources) => sources.iter().flat_map(|source| source()).collect(),
            Err(_) => Vec::new(),
        };
        certs.sort_by(|a, b| (a.source, &a.name).cmp(&(b.source, &b.name)));
        for cert in &certs {
            let _ = writeln!(
                out,
                "lobe_tls_certificate_expiry_timestamp_seconds{{name=\"{}\",source=\"{}\"}} {}",
                escape_label(&cert.name),
                cert.source,
                cert.not_after
            );
        }
        out.push_str("# HELP lobe_tls_renewal_failures_total Failed renewal attempts per managed certificate.\n");
        out.push_str("# TYPE lobe_tls_renewal_failures_total counter\n");
        if let Ok(failures) = self.renewal_failures.lock() {
            for (name, count) in failures.iter() {
                let _ = writeln!(
                    out,
                    "lobe_tls_renewal_failures_total{{name=\"{}\"}} {count}",
                    escape_label(name)
                );
            }
        }
        out.push_str("# HELP lobe_tls_certificate_conflicts_total Times another instance stored a certificate with a configuration other than this one's.\n");
        out.push_str("# TYPE lobe_tls_certificate_conflicts_total counter\n");
        if let Ok(conflicts) = self.conflicts.lock() {
            for (name, count) in conflicts.iter() {
                let _ = writeln!(
                    out,
                    "lobe_tls_certificate_conflicts_total{{name=\"{}\"}} {count}",
                    escape_label(name)
                );
            }
        }
        out.push_str("# HELP lobe_tls_unusable_certificates_total Times a stored certificate could not be served (unreadable, key mismatch, expired).\n");
        out.push_str("# TYPE lobe_tls_unusable_certificates_total counter\n");
        if let Ok(unusable) = self.unusable.lock() {
            for (name, count) in unusable.iter() {
                let _ = writeln!(
                    out,
                    "lobe_tls_unusable_certificates_total{{name=\"{}\"}} {count}",
                    escape_label(name)
                );
            }
        }
        let (ok, failed) = self.handshakes();
        let _ = write!(
            out,
            "# HELP lobe_tls_handshakes_total TLS handshakes by result.\n\
             # TYPE lobe_tls_handshakes_total counter\n\
             lobe_tls_handshakes_total{{result=\"ok\"}} {ok}\n\
             lobe_tls_handshakes_total{{result=\"failed\"}} {failed}\n\
             # HELP lobe_tls_active_connections Connections being forwarded now.\n\
             # TYPE lobe_tls_active_connections gauge\n\
             lobe_tls_active_connections {}\n\
             # HELP lobe_tls_connections_total Connections forwarded since start.\n\
             # TYPE lobe_tls_connections_total counter\n\
             lobe_tls_connections_total {}\n\
             # HELP lobe_tls_upstream_errors_total Connections whose upstream could not be reached.\n\
             # TYPE lobe_tls_upstream_errors_total counter\n\
             lobe_tls_upstream_errors_total {}\n",
            self.active_connections(),
            self.connections_total.load(Ordering::Relaxed),
            self.upstream_errors()
        );
        if let Ok(sources) = self.text_sources.lock() {
            for source in sources.iter() {
                let text = source();
                out.push_str(text.trim_end());
                if !text.trim_end().is_empty() {
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An HTTP listener that serves `GET /metrics`. Stops when dropped.
#[derive(Debug)]
pub struct MetricsListener {
    task: ListenerTask,
}

impl MetricsListener {
    /// Binds `addr` and serves `metrics` there.
    pub async fn bind(addr: &str, metrics: Arc<Metrics>) -> Result<Self> {
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
            vec![CertExpiry {
                name: "a\"b".into(),
                source: "dir",
                not_after: 1_800_000_000,
            }]
        });
        metrics.track_renewals("managed.example");
        metrics.renewal_failed("managed.example");
        metrics.handshake_ok();
        metrics.handshake_failed();
        metrics.handshake_failed();
        let guard = metrics.connection_opened();
        let text = metrics.render();
        for line in [
            "lobe_tls_certificate_expiry_timestamp_seconds{name=\"a\\\"b\",source=\"dir\"} 1800000000",
            "lobe_tls_renewal_failures_total{name=\"managed.example\"} 1",
            "lobe_tls_handshakes_total{result=\"ok\"} 1",
            "lobe_tls_handshakes_total{result=\"failed\"} 2",
            "lobe_tls_active_connections 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        drop(guard);
        assert!(metrics.render().contains("lobe_tls_active_connections 0\n"));
    }
}
