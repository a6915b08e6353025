//! What the admin listener reports: readiness (for `/readyz` and the `lobe_tls_ready`
//! gauge), the status page's model (certificates, sites and upstreams, the cluster, the
//! last renewal events) and its two renderings, plain HTML and JSON.
//!
//! Nothing secret is ever put in the model: no key, token, EAB value or store password
//! (the store is shown as its spec's `Display`, which redacts a Redis URL's password).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use html_escape::encode_text as esc;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::edge::{EdgeHandle, SiteStatus};
use crate::manager::{Event, Manager};
use crate::resolver::CertResolver;
use crate::watch::CertDirWatcher;

/// How many renewal events the page keeps.
pub(super) const EVENTS_KEPT: usize = 50;

/// Where the server is in its life: readiness depends on it.
#[derive(Debug, Default)]
pub(super) struct Phase(AtomicU8);

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;

impl Phase {
    /// The edge accepts: every listener is bound and served.
    pub(super) fn serving(&self) {
        let _ = self
            .0
            .compare_exchange(STARTING, SERVING, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The drain started: from now on the server is never ready again.
    pub(super) fn draining(&self) {
        self.0.store(DRAINING, Ordering::SeqCst);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The last renewal events, oldest first, bounded to [`EVENTS_KEPT`].
#[derive(Debug, Default)]
pub(super) struct EventRing(Mutex<VecDeque<EventEntry>>);

/// One renewal event as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventEntry {
    /// When it was seen (RFC 3339).
    pub at: String,
    /// The certificate's name.
    pub name: String,
    /// `loaded`, `obtained`, `renewed`, `renewal_failed`, `expiring_soon`, `unusable`
    /// or `config_conflict`.
    pub kind: &'static str,
    /// The rest, one line (a serial, an expiry, an error).
    pub detail: String,
}

impl EventRing {
    fn push(&self, entry: EventEntry) {
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == EVENTS_KEPT {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    fn snapshot(&self) -> Vec<EventEntry> {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }

    /// Feeds the ring from `manager`'s events until the manager is gone. Subscribed now,
    /// so call it before the manager starts to keep its first loads.
    pub(super) fn follow(self: &Arc<Self>, manager: &Manager) {
        let mut events = manager.subscribe();
        let ring = Arc::downgrade(self);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                };
                let Some(ring) = ring.upgrade() else { return };
                ring.push(entry_of(&event));
            }
        });
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn entry_of(event: &Event) -> EventEntry {
    let (kind, detail) = match event {
        Event::Loaded {
            serial, not_after, ..
        } => (
            "loaded",
            format!("serial {serial}, expires {}", rfc3339(*not_after)),
        ),
        Event::Obtained {
            serial, not_after, ..
        } => (
            "obtained",
            format!("serial {serial}, expires {}", rfc3339(*not_after)),
        ),
        Event::Renewed {
            serial,
            not_after,
            replaced_serial,
            ..
        } => (
            "renewed",
            format!(
                "serial {serial} replaces {replaced_serial}, expires {}",
                rfc3339(*not_after)
            ),
        ),
        Event::RenewalFailed {
            error,
            failures,
            next_attempt,
            ..
        } => (
            "renewal_failed",
            format!(
                "{error} (failure {failures}; next attempt {})",
                rfc3339(*next_attempt)
            ),
        ),
        Event::ExpiringSoon {
            serial, not_after, ..
        } => (
            "expiring_soon",
            format!("serial {serial}, expires {}", rfc3339(*not_after)),
        ),
        Event::Unusable { error, .. } => ("unusable", error.clone()),
        Event::ConfigConflict {
            stored, configured, ..
        } => (
            "config_conflict",
            format!(
                "stored for {}, configured for {}",
                stored.join(" "),
                configured.join(" ")
            ),
        ),
    };
    EventEntry {
        at: rfc3339(OffsetDateTime::now_utc()),
        name: event.name().to_owned(),
        kind,
        detail,
    }
}

/// What readiness is judged on, and what the page reads.
pub(super) struct Sources {
    pub phase: Arc<Phase>,
    pub edge: EdgeHandle,
    pub resolver: CertResolver,
    pub manager: Option<Manager>,
    pub watchers: Vec<Arc<CertDirWatcher>>,
    pub events: Arc<EventRing>,
    /// The store as its spec displays it (a Redis URL's password redacted).
    pub store: Option<String>,
    pub store_kind: &'static str,
    pub instance: String,
}

/// `/readyz`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Every check below passes.
    pub ready: bool,
    /// Every listener is bound and the edge accepts.
    pub listeners: bool,
    /// The drain has started (SIGTERM): never ready again.
    pub draining: bool,
    /// The initial load of the store is still running: stored names are served as
    /// handshakes ask for them, but not every certificate is loaded (nor scheduled
    /// for renewal) yet.
    pub loading: bool,
    /// The initial load and the certificates handshakes loaded ahead of it.
    pub initial_load: Option<crate::manager::InitialLoadStatus>,
    /// Configured names with no certificate loaded.
    pub missing_certificates: Vec<String>,
    /// Sites with no upstream in rotation.
    pub sites_without_upstream: Vec<String>,
}

impl Sources {
    pub(super) fn readiness(&self) -> Readiness {
        self.readiness_of(&self.edge.status())
    }

    fn readiness_of(&self, sites: &[SiteStatus]) -> Readiness {
        let phase = self.phase.get();
        let mut missing: Vec<String> = sites
            .iter()
            .flat_map(|site| &site.domains)
            .filter(|domain| !self.resolver.covers(domain))
            .cloned()
            .collect();
        if let Some(manager) = &self.manager {
            for name in manager.without_certificate() {
                if !missing.contains(&name) {
                    missing.push(name);
                }
            }
        }
        let down: Vec<String> = sites
            .iter()
            .filter(|site| !site.upstreams.iter().any(|u| u.up))
            .map(|site| site.name.clone())
            .collect();
        let listeners = phase != STARTING;
        let draining = phase == DRAINING;
        let loading = self.manager.as_ref().is_some_and(Manager::is_loading);
        Readiness {
            ready: listeners && !draining && !loading && missing.is_empty() && down.is_empty(),
            listeners,
            draining,
            loading,
            initial_load: self.manager.as_ref().map(Manager::initial_load),
            missing_certificates: missing,
            sites_without_upstream: down,
        }
    }

    /// The whole page's model, as of now.
    pub(super) fn status(&self) -> ServerStatus {
        let sites = self.edge.status();
        let readiness = self.readiness_of(&sites);
        let mut certificates = Vec::new();
        if let Some(manager) = &self.manager {
            for cert in manager.certificates() {
                let info = cert.info.as_ref();
                certificates.push(CertStatus {
                    name: cert.name.clone(),
                    domains: info.map(|i| i.domains.clone()).unwrap_or_default(),
                    issuer: info.map(|i| i.issuer.clone()),
                    profile: cert.profile.clone(),
                    not_after: info.map(|i| rfc3339(i.not_after)),
                    ari_window: cert
                        .ari_window
                        .map(|(start, end)| [rfc3339(start), rfc3339(end)]),
                    next_renewal: cert.next_attempt.or(cert.due_at).map(rfc3339),
                    last_error: cert.last_error.clone(),
                    source: "store",
                });
            }
        }
        for watcher in &self.watchers {
            for cert in watcher.certificates() {
                certificates.push(CertStatus {
                    name: cert.name.clone(),
                    domains: cert.info.domains.clone(),
                    issuer: Some(cert.info.issuer.clone()),
                    profile: None,
                    not_after: Some(rfc3339(cert.info.not_after)),
                    ari_window: None,
                    next_renewal: None,
                    last_error: None,
                    source: "dir",
                });
            }
        }
        ServerStatus {
            generated_at: rfc3339(OffsetDateTime::now_utc()),
            readiness,
            certificates,
            sites,
            cluster: ClusterStatus {
                store_kind: self.store_kind,
                store: self.store.clone(),
                instance_id: self.instance.clone(),
                orders_in_flight: self
                    .manager
                    .as_ref()
                    .map(Manager::orders_in_flight)
                    .unwrap_or_default(),
                // Neither store names the holder of another process's lock: a Redis lock
                // holds a random fencing token, a directory's lock a file handle.
                lock_holders_elsewhere: None,
            },
            events: self.events.snapshot(),
        }
    }
}

/// The status page's model.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ServerStatus {
    /// When it was made (RFC 3339).
    pub generated_at: String,
    /// `/readyz`'s verdict.
    pub readiness: Readiness,
    /// Every certificate served: from the store (issued and renewed here) and from
    /// certificate directories.
    pub certificates: Vec<CertStatus>,
    /// The sites and their upstreams.
    pub sites: Vec<SiteStatus>,
    /// The store and this instance.
    pub cluster: ClusterStatus,
    /// The last renewal events, oldest first.
    pub events: Vec<EventEntry>,
}

/// One certificate on the page.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CertStatus {
    /// Its name in the store or its directory.
    pub name: String,
    /// The names it covers.
    pub domains: Vec<String>,
    /// Its issuer's distinguished name.
    pub issuer: Option<String>,
    /// The ACME profile it is ordered under.
    pub profile: Option<String>,
    /// When it expires.
    pub not_after: Option<String>,
    /// The renewal window the CA suggested through ARI: [start, end].
    pub ari_window: Option<[String; 2]>,
    /// When it is renewed next (or retried, after a failure).
    pub next_renewal: Option<String>,
    /// The last renewal failure's message.
    pub last_error: Option<String>,
    /// `store` (managed here) or `dir` (a directory another tool writes).
    pub source: &'static str,
}

/// The cluster section.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// `directory`, `redis`, or `none`.
    pub store_kind: &'static str,
    /// The store, its password redacted.
    pub store: Option<String>,
    /// This instance: host name and process id.
    pub instance_id: String,
    /// The orders this instance runs now: it holds their locks.
    pub orders_in_flight: Vec<String>,
    /// Who holds the locks of other instances' orders, where the store can say
    /// (`None`: it cannot).
    pub lock_holders_elsewhere: Option<Vec<String>>,
}

/// This instance's id: the host name and the process id.
pub(super) fn instance_id() -> String {
    let host = rustix::system::uname();
    let host = host.nodename().to_string_lossy();
    format!("{host}/{}", std::process::id())
}

/// The `lobe_tls_ready` gauge, judged at each scrape. Holds the sources weakly: the
/// registry must not keep a stopped server alive.
#[derive(Debug)]
pub(super) struct ReadyGauge(pub Weak<Sources>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Collector for ReadyGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let ready = self.0.upgrade().is_some_and(|s| s.readiness().ready);
        let gauge = ConstGauge::new(i64::from(ready));
        let metric = encoder.encode_descriptor(
            "ready",
            "1 while /readyz answers 200 (listeners bound, the store's certificates all loaded, an upstream up for every site), 0 otherwise and during the drain",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// The page as plain HTML: no script, no external resource, refreshed every 5 s.
pub fn render_html(status: &ServerStatus) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write_html(&mut h, status);
    h
}

fn opt(value: &Option<String>) -> std::borrow::Cow<'_, str> {
    esc(value.as_deref().unwrap_or("—"))
}

fn write_html(h: &mut String, s: &ServerStatus) -> std::fmt::Result {
    h.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"refresh\" content=\"5\">",
        "<title>lobe-tls status</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}",
        "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}",
        "th{background:#eee}.up{color:#060}.down{color:#b00;font-weight:bold}",
        "</style></head><body>\n<h1>lobe-tls status</h1>\n"
    ));
    let r = &s.readiness;
    let verdict = if r.ready {
        "<span class=\"up\">ready</span>"
    } else {
        "<span class=\"down\">not ready</span>"
    };
    writeln!(
        h,
        "<p>Readiness: {verdict}{}. Generated {}.</p>",
        if r.draining {
            " (draining)"
        } else if r.loading {
            " (loading the store)"
        } else {
            ""
        },
        esc(&s.generated_at)
    )?;
    if !r.missing_certificates.is_empty() {
        writeln!(
            h,
            "<p>No certificate loaded for: {}</p>",
            esc(&r.missing_certificates.join(", "))
        )?;
    }
    if !r.sites_without_upstream.is_empty() {
        writeln!(
            h,
            "<p>No upstream in rotation for: {}</p>",
            esc(&r.sites_without_upstream.join(", "))
        )?;
    }

    h.push_str("<h2>Certificates</h2>\n<table><tr><th>Name</th><th>Names</th><th>Issuer</th><th>Profile</th><th>Not after</th><th>ARI window</th><th>Next renewal</th><th>Last error</th><th>Source</th></tr>\n");
    for c in &s.certificates {
        let ari = c.ari_window.as_ref().map(|[a, b]| format!("{a} – {b}"));
        writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&c.domains.join(", ")),
            opt(&c.issuer),
            opt(&c.profile),
            opt(&c.not_after),
            opt(&ari),
            opt(&c.next_renewal),
            opt(&c.last_error),
            c.source
        )?;
    }
    h.push_str("</table>\n<h2>Sites and upstreams</h2>\n<table><tr><th>Site</th><th>Names</th><th>Upstream</th><th>State</th><th>In flight</th><th>Requests</th><th>Last check</th><th>Check latency</th></tr>\n");
    for site in &s.sites {
        let domains = site.domains.join(", ");
        for u in &site.upstreams {
            let state = if u.up {
                "<span class=\"up\">up</span>"
            } else {
                "<span class=\"down\">down</span>"
            };
            let (check, latency) = match &u.last_check {
                Some(c) => (c.result.clone(), format!("{} ms", c.latency.as_millis())),
                None => ("—".to_owned(), "—".to_owned()),
            };
            writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&site.name),
                esc(&domains),
                esc(&u.addr),
                u.in_flight,
                u.requests,
                esc(&check),
                latency
            )?;
        }
    }
    let c = &s.cluster;
    writeln!(
        h,
        "</table>\n<h2>Cluster</h2>\n<table><tr><th>Store kind</th><td>{}</td></tr><tr><th>Store</th><td>{}</td></tr><tr><th>This instance</th><td>{}</td></tr><tr><th>Orders in flight here (lock held by this instance)</th><td>{}</td></tr><tr><th>Lock holders elsewhere</th><td>{}</td></tr></table>",
        c.store_kind,
        opt(&c.store),
        esc(&c.instance_id),
        if c.orders_in_flight.is_empty() {
            "none".to_owned()
        } else {
            esc(&c.orders_in_flight.join(", ")).into_owned()
        },
        match &c.lock_holders_elsewhere {
            Some(holders) if holders.is_empty() => "none".into(),
            Some(holders) => esc(&holders.join(", ")).into_owned(),
            None => "not reported by this store".to_owned(),
        }
    )?;
    writeln!(
        h,
        "<h2>Renewal events (last {EVENTS_KEPT})</h2>\n<table><tr><th>When</th><th>Name</th><th>Event</th><th>Detail</th></tr>"
    )?;
    for e in s.events.iter().rev() {
        writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.at),
            esc(&e.name),
            e.kind,
            esc(&e.detail)
        )?;
    }
    h.push_str("</table>\n<p>Also as JSON: <a href=\"/status.json\">/status.json</a>.</p>\n</body></html>\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_fifty() {
        let ring = EventRing::default();
        for i in 0..60 {
            ring.push(EventEntry {
                at: String::new(),
                name: format!("n{i}"),
                kind: "loaded",
                detail: String::new(),
            });
        }
        let kept = ring.snapshot();
        assert_eq!(kept.len(), EVENTS_KEPT);
        assert_eq!(kept[0].name, "n10");
        assert_eq!(kept[49].name, "n59");
    }

    #[test]
    fn the_page_escapes_what_it_shows() {
        let status = ServerStatus {
            generated_at: "now".into(),
            readiness: Readiness {
                ready: false,
                listeners: true,
                draining: false,
                loading: false,
                initial_load: None,
                missing_certificates: vec!["<x>".into()],
                sites_without_upstream: Vec::new(),
            },
            certificates: vec![CertStatus {
                name: "a<script>alert(1)</script>".into(),
                domains: vec!["a.example".into()],
                issuer: Some("CN=\"Pebble & co\"".into()),
                profile: None,
                not_after: None,
                ari_window: None,
                next_renewal: None,
                last_error: None,
                source: "store",
            }],
            sites: Vec::new(),
            cluster: ClusterStatus {
                store_kind: "directory",
                store: None,
                instance_id: "h/1".into(),
                orders_in_flight: Vec::new(),
                lock_holders_elsewhere: None,
            },
            events: Vec::new(),
        };
        let html = render_html(&status);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("a&lt;script&gt;"), "{html}");
        assert!(html.contains("&lt;x&gt;"), "{html}");
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
    }
}
