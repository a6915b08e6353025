//! Putting a server together from its configuration: which store to open, which
//! certificates to manage, and the listeners, bound before anything is ordered so that
//! the CA can reach the challenges.

use std::sync::Arc;
use std::time::Duration;

use super::reload::{ServerHandle, SiteCerts};
use super::{Server, ServerAddrs, ServerConfig};
use crate::challenge::ChallengeConfig;
use crate::challenge::http01::{Http01Listener, Http01ListenerConfig, Http01Registry};
use crate::cluster::Cluster;
use crate::edge::Edge;
use crate::error::{Error, Result};
use crate::manager::{MaintenanceHandle, ManagedCert, Manager};
use crate::metrics::{CertExpiry, Metrics, MetricsListener};
use crate::on_demand::OnDemand;
use crate::resolver::CertResolver;
use crate::store::{DynStore, StoreSpec};
use crate::tickets::{SharedTickets, TicketConfig};
use crate::watch::{CertDirWatcher, WatchOptions};

pub(super) async fn start(config: ServerConfig) -> Result<Server> {
    let ServerConfig {
        listen,
        edge: edge_config,
        http_listen,
        metrics_listen,
        admin_listen,
        admin_token,
        store: store_spec,
        acme,
        managed,
        challenge,
        cert_dirs,
        default_name,
        on_demand,
    } = config;
    // Refused before anything is opened: an exposed status page without a token.
    if let Some(addr) = admin_listen {
        super::admin::check_exposure(addr, admin_token.is_some())?;
    }
    let resolver = CertResolver::new();
    let metrics = Metrics::new();
    let mut watchers = Vec::new();
    for dir in &cert_dirs {
        watchers.push(watch_dir(dir, default_name.clone(), &resolver, &metrics).await?);
    }
    let site_certs = SiteCerts {
        challenge,
        http_listener: http_listen.is_some(),
    };
    // A site's domains are managed unless a certificate directory covers them (or,
    // checked below, the store already holds their certificate).
    let site_domains = site_certs.uncovered(&edge_config.sites, &resolver);
    if !managed.is_empty() || !site_domains.is_empty() {
        site_certs.check_answerable()?;
        for cert in &managed {
            site_certs.check_kind(cert.challenge.kind, cert.challenge.http_webroot.is_some())?;
        }
    }
    // Checked before the store is opened, like the managed names' challenge.
    let on_demand = match on_demand {
        Some(mut config) => {
            config.challenge = Some(on_demand_challenge(config.challenge, &site_certs)?);
            Some(config)
        }
        None => None,
    };
    // The store is served (and everything in it renewed) with managed names, and when
    // nothing else is given.
    let store = match &store_spec {
        Some(spec) if !managed.is_empty() || !site_domains.is_empty() || on_demand.is_some() => {
            Some(spec.open().await?)
        }
        Some(spec) if cert_dirs.is_empty() => Some(store_to_serve(spec).await?),
        None if cert_dirs.is_empty() || !managed.is_empty() || !site_domains.is_empty() => {
            return Err(Error::config(
                "nothing to serve: give a store (--store) or a certificate directory (--cert-dir)",
            ));
        }
        _ => None,
    };
    if let (Some(default), Some(store)) = (&default_name, &store) {
        set_default_name(&resolver, default, &managed, store, !cert_dirs.is_empty()).await?;
    }
    let mut managed_certs = managed;
    // Orders write the store: one it cannot write is refused now, not at the first
    // renewal weeks later.
    if let Some(store) = &store
        && (!managed_certs.is_empty() || !site_domains.is_empty())
    {
        store.check_writable().await?;
    }
    if let Some(store) = &store {
        for domains in &site_domains {
            if let Some(cert) = site_certs.cert_for(domains, store, &managed_certs).await? {
                managed_certs.push(cert);
            }
        }
    }

    // With a store that shares challenge tokens, any instance of a cluster answers
    // HTTP-01.
    let registry = match &store {
        Some(store) if store.as_challenge_store().is_some() => {
            Http01Registry::with_shared_store(store.clone())?
        }
        _ => Http01Registry::new(),
    };
    let manager = match store {
        Some(store) => {
            let acme = acme.ok_or_else(|| {
                Error::config("serving a store needs the CA it renews from (an ACME configuration)")
            })?;
            let mut builder = Manager::builder(acme, store)
                .resolver(resolver.clone())
                .http01(registry.clone())
                // Everything in the store is renewed here too, so no cron job is
                // needed beside the server.
                .manage_stored(true)
                .tls_alpn01_on_resolver(true);
            for cert in managed_certs {
                builder = builder.cert(cert);
            }
            Some(builder.build()?)
        }
        None => None,
    };
    let on_demand = match (on_demand, &manager) {
        (Some(config), Some(manager)) => Some(OnDemand::new(manager.clone(), config)?),
        _ => None,
    };
    // Sessions resume on any instance sharing the store: the ticket keys live there.
    let tickets = match &manager {
        Some(manager) => {
            match SharedTickets::start(manager.store().clone(), TicketConfig::default()).await {
                Ok(tickets) => Some(tickets),
                Err(e) => {
                    tracing::warn!(error = %e, "session ticket keys are not shared; sessions resume on this instance only");
                    None
                }
            }
        }
        None => None,
    };

    // Port 80 has caps of its own, derived from the TLS listener's: a flood there does
    // not take connections from HTTPS clients.
    let http_config = Http01ListenerConfig::beside_tls(
        edge_config.max_conns,
        edge_config.max_conns_per_ip,
        edge_config.client_prefixes,
        edge_config.trusted_proxies.clone(),
    );
    let sites = edge_config.sites.len();
    let site_list = edge_config.sites.clone();
    let tls = crate::tls_config::server_config(
        Arc::new(resolver.clone()),
        &edge_config.alpn(),
        tickets.as_ref().map(SharedTickets::ticketer),
    )?;
    let mut edge = Edge::bind_tls(listen, Arc::new(tls), edge_config, metrics.clone())
        .await?
        // Certificates for IP addresses go to clients that connect to that address
        // without SNI.
        .with_ip_certs(resolver.clone());
    if let Some(on_demand) = on_demand {
        edge = edge.with_on_demand(on_demand);
    }
    if let Some(manager) = &manager {
        edge = edge.with_stored_certs(manager.clone());
    }
    // Affinity cookies pin on any instance sharing the store: the key lives there too.
    if let Some(manager) = &manager
        && let Err(e) = edge.share_affinity_key(manager.store()).await
    {
        tracing::warn!(error = %e, "the affinity cookie key is not shared; cookies pin on this instance only");
    }
    let edge_metrics = edge.handle().metrics();
    metrics.register(|registry| edge_metrics.register(registry));

    // HTTP-01 through the HTTP listener, TLS-ALPN-01 through the edge itself.
    let http = match http_listen {
        Some(addr) => {
            let service = registry.service().redirect_others_to_https();
            let http = Http01Listener::bind_with(addr, service, http_config).await?;
            let http_metrics = http.metrics();
            metrics.register(|registry| http_metrics.register(registry));
            Some(http)
        }
        None => None,
    };
    let metrics_listener = match metrics_listen {
        Some(addr) => Some(MetricsListener::bind(addr, metrics.clone()).await?),
        None => None,
    };
    let events = Arc::new(super::status::EventRing::default());
    if let Some(manager) = &manager {
        // Subscribed before the manager starts (in `run`), so its first loads show.
        events.follow(manager);
    }
    let status = Arc::new(super::status::Sources {
        phase: Arc::default(),
        edge: edge.handle(),
        resolver: resolver.clone(),
        manager: manager.clone(),
        watchers: watchers.clone(),
        events,
        store: store_spec.as_ref().map(ToString::to_string),
        store_kind: match &store_spec {
            Some(StoreSpec::Dir(_)) => "directory",
            Some(StoreSpec::Redis(_)) => "redis",
            None => "none",
        },
        instance: super::status::instance_id(),
    });
    let ready = super::status::ReadyGauge(Arc::downgrade(&status));
    metrics.register(|registry| registry.register_collector(Box::new(ready)));
    #[cfg(target_os = "linux")]
    metrics.register_unprefixed(|registry| {
        registry.register_collector(Box::new(super::process::ProcessMetrics));
    });
    let admin = match admin_listen {
        Some(addr) => Some(
            super::admin::AdminListener::bind(addr, status.clone(), metrics.clone(), admin_token)
                .await?,
        ),
        None => None,
    };
    let addrs = ServerAddrs {
        listen: edge.local_addr(),
        http_listen: http.as_ref().map(Http01Listener::local_addr),
        metrics_listen: metrics_listener.as_ref().map(MetricsListener::local_addr),
        admin_listen: admin.as_ref().map(super::admin::AdminListener::local_addr),
    };
    tracing::info!(addr = %addrs.listen, "listening for TLS");
    if let Some(addr) = addrs.http_listen {
        tracing::info!(%addr, "listening for plain HTTP (HTTP-01, redirects to https)");
    }
    if let Some(addr) = addrs.metrics_listen {
        tracing::info!(%addr, "listening for metrics scrapes (/metrics)");
    }
    if let Some(addr) = addrs.admin_listen {
        tracing::info!(
            %addr,
            "admin listener: /healthz /readyz /metrics /status /status.json"
        );
    }
    for site in &site_list {
        super::reload::log_site("site", site);
    }
    // Names that do not resolve are warned about now, not at the first failed check.
    let names = site_list.clone();
    tokio::spawn(async move { crate::edge::warn_unresolved_upstreams(&names).await });
    let handle = ServerHandle::new(
        edge.handle(),
        resolver.clone(),
        manager.clone(),
        site_certs,
        site_list,
    );
    Ok(Server {
        addrs,
        edge,
        handle,
        manager,
        resolver,
        metrics,
        sites,
        watchers,
        tickets,
        http,
        metrics_listener,
        admin,
        status,
    })
}

/// How names issued on demand are validated. A pinned configuration is used alone
/// (HTTP-01 only with the HTTP listener or a webroot; TLS-ALPN-01 on the TLS listener).
/// Otherwise HTTP-01 comes first when the HTTP listener is on or a webroot is given
/// (what reaches a server behind a CDN or a TLS-terminating balancer), and TLS-ALPN-01
/// on the TLS listener after it: whichever the CA offers, and the other when one fails.
fn on_demand_challenge(
    pinned: Option<ChallengeConfig>,
    site_certs: &SiteCerts,
) -> Result<ChallengeConfig> {
    if let Some(mut pinned) = pinned {
        site_certs.check_kind(pinned.kind, pinned.http_webroot.is_some())?;
        pinned.tls_listen = None;
        pinned.fallbacks.clear();
        return Ok(pinned);
    }
    let tls_alpn = ChallengeConfig::tls_alpn01(None);
    Ok(match &site_certs.challenge.http_webroot {
        Some(dir) => ChallengeConfig::http01_webroot(dir.clone()),
        None if site_certs.http_listener => ChallengeConfig::http01(None),
        None => return Ok(tls_alpn),
    }
    .with_fallbacks([tls_alpn.kind]))
}

/// The store when the server is given neither managed names nor certificate
/// directories: it must exist and hold a certificate, or there is nothing to serve.
async fn store_to_serve(spec: &StoreSpec) -> Result<DynStore> {
    let nothing = |why: String| {
        Error::config(format!(
            "nothing to serve: {why}; give -d DOMAIN to have a certificate issued, --cert-dir DIR to serve files another tool writes, or run lobe-tls issue first"
        ))
    };
    // Messages name the store by its spec, which hides a Redis URL's password.
    if let Some(dir) = spec.dir()
        && !dir.is_dir()
    {
        return Err(nothing(format!(
            "the store {spec} does not exist (check --store)"
        )));
    }
    let store = spec.open().await?;
    if store.list_certs().await?.is_empty() {
        return Err(nothing(format!("the store {spec} holds no certificate")));
    }
    Ok(store)
}

/// Serves the default name from the store: the certificate stored (or managed) under
/// that name, or the one serving that DNS name. It is looked up at each handshake, so
/// the default follows renewals. A name that is none of these is an error, unless a
/// certificate directory may carry it.
async fn set_default_name(
    resolver: &CertResolver,
    default: &str,
    managed: &[ManagedCert],
    store: &DynStore,
    cert_dirs: bool,
) -> Result<()> {
    let managed_domain = managed
        .iter()
        .find(|cert| cert.name == default)
        .and_then(|cert| cert.domains.first())
        .map(|domain| domain.as_str().to_owned());
    let server_name = match managed_domain {
        Some(domain) => Some(domain),
        None => crate::store::default_server_name(store.as_ref(), default).await,
    };
    match server_name {
        Some(name) => {
            tracing::info!(default, server_name = name, "default certificate");
            resolver.set_default_name(Some(&name));
            Ok(())
        }
        None if cert_dirs => Ok(()),
        None => Err(Error::config(format!(
            "--default-name {default:?} is neither a certificate in the store nor a DNS name; see lobe-tls list"
        ))),
    }
}

/// Starts watching `dir` and reports its certificates to the metrics.
async fn watch_dir(
    dir: &std::path::Path,
    default_name: Option<String>,
    resolver: &CertResolver,
    metrics: &Arc<Metrics>,
) -> Result<Arc<CertDirWatcher>> {
    let options = WatchOptions::default().with_default_name(default_name);
    let watcher = Arc::new(CertDirWatcher::start(dir, resolver.clone(), options).await?);
    let source = watcher.clone();
    metrics.add_cert_source(move || {
        source
            .certificates()
            .into_iter()
            .map(|cert| CertExpiry {
                name: cert.name,
                source: "dir",
                not_before: cert.info.not_before.unix_timestamp(),
                not_after: cert.info.not_after.unix_timestamp(),
                ari_window: None,
            })
            .collect()
    });
    Ok(watcher)
}

/// Loads the store, issues what is missing, and renews in the background. Renewal
/// failures and expiries go to the metrics.
///
/// With a shared store the instance joins the cluster: it follows the other instances'
/// renewals and challenges, and orders only when it wins the store's lock.
pub(super) async fn start_manager(
    manager: Manager,
    metrics: &Arc<Metrics>,
) -> Result<(MaintenanceHandle, Option<Cluster>)> {
    manager.export_metrics(metrics);
    // Followed before start, so no renewal by another instance is missed. A Redis store
    // is followed through its announcements (and a re-sync every 30 s, for announcements
    // lost in an outage); a directory through its watch, which another process's
    // `issue`, `renew` or `revoke` trips, with a re-sync every 10 minutes as a safety net.
    let resync = if manager.store().as_challenge_store().is_some() {
        crate::cluster::DEFAULT_RESYNC_INTERVAL
    } else {
        Duration::from_secs(600)
    };
    let cluster = match Cluster::builder(manager.clone())
        .resync_interval(resync)
        .start()
    {
        Ok(cluster) => Some(cluster),
        Err(e) => {
            tracing::warn!(error = %e, "not following the store; certificates other processes store are served after a restart");
            None
        }
    };
    let report = manager.start().await?;
    for (failed, error) in &report.failed {
        tracing::error!(
            name = failed,
            error,
            "could not issue the certificate; retrying in the background"
        );
    }
    for (unusable, error) in &report.unusable {
        tracing::error!(name = unusable, error, "stored certificate is unusable");
    }
    Ok((manager.spawn(), cluster))
}
