//! Sites replaced while the server runs, and certificates for the domains they bring.

use crate::challenge::{ChallengeConfig, ChallengeKind};
use crate::domain;
use crate::edge::{EdgeHandle, SiteConfig};
use crate::error::{Error, Result};
use crate::manager::{ManagedCert, Manager};
use crate::resolver::CertResolver;
use crate::store::DynStore;

/// How sites' domains get their certificates: managed unless the store or a
/// certificate directory covers them.
#[derive(Debug, Clone)]
pub(super) struct SiteCerts {
    /// The challenge they are validated through.
    pub(super) challenge: ChallengeConfig,
    /// Whether the server answers HTTP-01 on a plain HTTP listener.
    pub(super) http_listener: bool,
}

impl SiteCerts {
    /// The domains of `sites` that nothing `resolver` serves covers (a certificate
    /// directory at start, anything served on a reload), one list per site.
    pub(super) fn uncovered(
        &self,
        sites: &[SiteConfig],
        resolver: &CertResolver,
    ) -> Vec<Vec<String>> {
        sites
            .iter()
            .map(|site| site.domains.clone())
            .filter(|domains| !domains.is_empty())
            .filter(|domains| !domains.iter().all(|d| resolver.lookup(Some(d)).is_some()))
            .collect()
    }

    /// A managed certificate for a site's domains, unless the store or another managed
    /// certificate already covers them.
    pub(super) async fn cert_for(
        &self,
        domains: &[String],
        store: &DynStore,
        managed: &[ManagedCert],
    ) -> Result<Option<ManagedCert>> {
        let parsed = domain::parse_all(domains)?;
        let covered_by_managed = managed.iter().any(|cert| {
            parsed
                .iter()
                .all(|d| cert.domains.iter().any(|m| m.as_str() == d.as_str()))
        });
        let name = domain::store_name(&parsed);
        if covered_by_managed || store.load_cert(&name).await?.is_some() {
            return Ok(None);
        }
        let mut challenge = self.challenge.clone();
        // TLS-ALPN-01 is answered by the edge's own listener, not a standalone one.
        challenge.tls_listen = None;
        Ok(Some(
            ManagedCert::new(name, parsed).with_challenge(challenge),
        ))
    }

    /// The challenge for sites' domains must be answerable: HTTP-01 needs the HTTP
    /// listener (or a webroot).
    pub(super) fn check_answerable(&self) -> Result<()> {
        self.check_kind(self.challenge.kind, self.challenge.http_webroot.is_some())
    }

    pub(super) fn check_kind(&self, kind: ChallengeKind, webroot: bool) -> Result<()> {
        if kind == ChallengeKind::Http01 && !webroot && !self.http_listener {
            return Err(Error::config(
                "--challenge http-01 answers on --http-listen: drop --no-http or use another challenge",
            ));
        }
        Ok(())
    }
}

/// Logs one site, at start or when a reload adds or changes it: its domains, its
/// upstreams and its balancing.
pub(super) fn log_site(what: &str, site: &SiteConfig) {
    let upstreams: Vec<&str> = site.upstreams.iter().map(|u| u.addr()).collect();
    tracing::info!(
        domains = %site_name(site),
        upstreams = %upstreams.join(","),
        lb = %site.lb,
        routes = site.routes.len(),
        "{what}"
    );
}

/// A site as the logs name it: its domains, or what the README calls the site without
/// any (the one the command-line flags describe, or a catch-all table).
fn site_name(site: &SiteConfig) -> String {
    if site.domains.is_empty() {
        "(every other host)".to_owned()
    } else {
        site.domains.join(",")
    }
}

/// Logs what a reload from `old` to `new` added, removed and changed, sites matched by
/// their domains.
fn log_changes(old: &[SiteConfig], new: &[SiteConfig]) {
    // Sites compare by everything they configure; every field is `Debug`.
    let by_name = |sites: &[SiteConfig]| -> std::collections::BTreeMap<String, String> {
        sites
            .iter()
            .map(|site| (site_name(site), format!("{site:?}")))
            .collect()
    };
    let (before, after) = (by_name(old), by_name(new));
    for site in new {
        match before.get(&site_name(site)) {
            None => log_site("reload: site added", site),
            Some(was) if *was != format!("{site:?}") => log_site("reload: site changed", site),
            Some(_) => {}
        }
    }
    for site in old
        .iter()
        .filter(|site| !after.contains_key(&site_name(site)))
    {
        log_site("reload: site removed", site);
    }
}

/// Reloads a running [`super::Server`]'s sites.
#[derive(Clone)]
pub struct ServerHandle {
    edge: EdgeHandle,
    resolver: CertResolver,
    manager: Option<Manager>,
    site_certs: SiteCerts,
    // The sites in force, for the reload's account of what changed.
    sites: std::sync::Arc<std::sync::Mutex<Vec<SiteConfig>>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    pub(super) fn new(
        edge: EdgeHandle,
        resolver: CertResolver,
        manager: Option<Manager>,
        site_certs: SiteCerts,
        sites: Vec<SiteConfig>,
    ) -> Self {
        ServerHandle {
            edge,
            resolver,
            manager,
            site_certs,
            sites: std::sync::Arc::new(std::sync::Mutex::new(sites)),
        }
    }

    /// Replaces the sites (see [`EdgeHandle::reload`]); on error the running ones stay.
    /// Domains of new sites that nothing serves are handed to the manager, which orders
    /// them at once. Certificates of removed sites are left as they are (renewed with
    /// the rest of the store, never revoked).
    pub async fn reload(&self, sites: Vec<SiteConfig>) -> Result<()> {
        self.edge.reload(sites.clone())?;
        let old = std::mem::replace(
            &mut *self.sites.lock().unwrap_or_else(|e| e.into_inner()),
            sites.clone(),
        );
        log_changes(&old, &sites);
        tracing::info!(sites = sites.len(), "sites reloaded");
        self.issue_new(&sites).await;
        Ok(())
    }

    async fn issue_new(&self, sites: &[SiteConfig]) {
        let new = self.site_certs.uncovered(sites, &self.resolver);
        if new.is_empty() {
            return;
        }
        let Some(manager) = &self.manager else {
            tracing::warn!(
                domains = ?new,
                "reload: no certificate covers these site domains and the server runs without a store to issue into; restart with the store (--store) to have them issued"
            );
            return;
        };
        if let Err(e) = self.site_certs.check_answerable() {
            tracing::error!("reload: cannot issue certificates for {new:?}: {e}");
            return;
        }
        for domains in new {
            let cert = match self
                .site_certs
                .cert_for(&domains, manager.store(), &[])
                .await
            {
                Ok(Some(cert)) => cert,
                // The store holds it: the manager serves and renews it already.
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("reload: cannot manage a certificate for {domains:?}: {e}");
                    continue;
                }
            };
            let name = cert.name.clone();
            // The maintenance loop orders a managed certificate that has none at once.
            match manager.add(cert) {
                Ok(true) => tracing::info!(
                    cert = name,
                    ?domains,
                    "reload: issuing a certificate for a new site"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("reload: cannot manage a certificate for {domains:?}: {e}")
                }
            }
        }
    }
}
