//! Issue one certificate and store it: the path that `lobe-tls issue`, `lobe-tls renew`
//! and the renewal manager share.
//!
//! [`Issuance::prepare`] does everything that can fail before the CA is contacted: it
//! checks the names against the challenge type and binds the standalone HTTP-01
//! listener. [`Issuance::run`] then orders, validates the result and stores it in one
//! atomic write, so a failure leaves the store exactly as it was.

use std::net::SocketAddr;
use std::time::Duration;

use time::OffsetDateTime;

use crate::acme::{AcmeClient, OrderRequest, ProgressFn};
use crate::cert::KeyType;
use crate::challenge::http01::Http01Listener;
use crate::challenge::tls_alpn01::{TlsAlpn01Listener, TlsAlpn01Solver};
use crate::challenge::{
    ChallengeConfig, ChallengeKind, Dns01Solver, Http01Registry, Http01Solver, Solver,
    WebrootSolver,
};
use crate::domain::{DomainError, DomainName};
use crate::error::{Error, Result, StoreErrorKind};
use crate::resolver::CertResolver;
use crate::store::{CertMeta, Store, StoreLock, StoredCert};

/// What to issue and how to validate it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct IssueRequest {
    /// The certificate's name in the store (`live/<name>/`).
    pub name: String,
    /// The names on the certificate, the first being the main one.
    pub domains: Vec<DomainName>,
    /// The key type; a fresh key is generated for every issuance.
    pub key_type: KeyType,
    /// How to answer the CA's challenges.
    pub challenge: ChallengeConfig,
    /// The ARI identifier of the certificate this one replaces, if any.
    pub replaces: Option<String>,
    /// The ACME profile to order under (`classic`, `tlsserver`, `shortlived`, ...), which
    /// the CA's directory must list. `None`: the CA's default, or `shortlived` for an
    /// order with an IP address when the CA lists it.
    pub profile: Option<String>,
}

impl IssueRequest {
    /// A request for `domains` under the default name (see [`default_name`]).
    pub fn new(domains: Vec<DomainName>, key_type: KeyType, challenge: ChallengeConfig) -> Self {
        IssueRequest {
            name: default_name(&domains),
            domains,
            key_type,
            challenge,
            replaces: None,
            profile: None,
        }
    }

    /// Orders under the ACME profile `profile`.
    pub fn with_profile(mut self, profile: Option<String>) -> Self {
        self.profile = profile;
        self
    }

    /// A request that repeats the order a stored certificate came from.
    pub fn from_meta(meta: &CertMeta) -> Self {
        IssueRequest {
            name: meta.name.clone(),
            domains: meta.domains.clone(),
            key_type: meta.key_type,
            challenge: meta.challenge.clone(),
            replaces: None,
            profile: meta.profile.clone(),
        }
    }

    /// Checks what can be checked before anything is sent: the store name is usable,
    /// there is a domain, and no wildcard is asked for with a challenge that cannot
    /// validate it.
    pub fn validate(&self) -> Result<()> {
        crate::store::fs::check_name(&self.name)?;
        if self.domains.is_empty() {
            return Err(DomainError::Empty.into());
        }
        if self.challenge.kind != ChallengeKind::Dns01
            && let Some(wildcard) = self.domains.iter().find(|d| d.is_wildcard())
        {
            return Err(DomainError::WildcardNeedsDns(wildcard.to_string()).into());
        }
        if self.challenge.kind == ChallengeKind::Dns01
            && let Some(ip) = self.domains.iter().find(|d| d.ip().is_some())
        {
            return Err(DomainError::IpNeedsHttpOrAlpn(ip.to_string()).into());
        }
        if let Some(profile) = &self.profile {
            check_profile_name(profile)?;
        }
        Ok(())
    }
}

/// Refuses a profile name that no directory could list: empty, or with characters
/// beyond letters, digits, `-`, `_` and `.` (it ends up in logs and metadata).
pub fn check_profile_name(profile: &str) -> Result<()> {
    let ok = !profile.is_empty()
        && profile.len() <= 64
        && profile
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid --profile {profile:?}: give a profile name the CA lists, such as classic or shortlived"
        )))
    }
}

/// The store name derived from the first domain: `*.example.com` becomes `_.example.com`
/// (the rule of [`crate::domain::store_name`]).
pub fn default_name(domains: &[DomainName]) -> String {
    crate::domain::store_name(domains)
}

/// An issuance that passed every local check and holds its challenge solver (and the
/// standalone HTTP-01 listener, if it bound one) until dropped.
pub struct Issuance {
    request: IssueRequest,
    solver: Box<dyn Solver>,
    listener: Option<Http01Listener>,
    tls_listener: Option<TlsAlpn01Listener>,
}

impl std::fmt::Debug for Issuance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuance")
            .field("request", &self.request)
            .field("listener", &self.listener)
            .field("tls_listener", &self.tls_listener)
            .finish_non_exhaustive()
    }
}

impl Issuance {
    /// Validates `request` and builds its solver from its [`ChallengeConfig`].
    ///
    /// For HTTP-01, pass the registry of an HTTP server that already answers challenges
    /// (an embedding proxy, `lobe-tls serve`); without one the standalone listener is
    /// bound on `challenge.http_listen` now, so a busy port fails before anything is
    /// ordered. TLS-ALPN-01 binds a standalone listener on `challenge.tls_listen` the
    /// same way; to answer it from a proxy's own resolver, use [`Issuance::with_solver`]
    /// with a [`TlsAlpn01Solver`].
    pub async fn prepare(request: IssueRequest, http01: Option<Http01Registry>) -> Result<Self> {
        request.validate()?;
        let config = &request.challenge;
        let mut tls_listener = None;
        let (solver, listener): (Box<dyn Solver>, _) = match config.kind {
            ChallengeKind::Http01 if config.http_webroot.is_some() => {
                let dir = config.http_webroot.clone().unwrap_or_default();
                (Box::new(WebrootSolver::new(dir)?), None)
            }
            ChallengeKind::Http01 => match http01 {
                Some(registry) => (Box::new(Http01Solver::new(registry)), None),
                None => {
                    let addr = config.http_listen.as_deref().ok_or_else(|| {
                        Error::config("http-01 needs a listen address (--http-listen)")
                    })?;
                    let addr = crate::listen::parse_addr(addr, "--http-listen")?;
                    let registry = Http01Registry::new();
                    let listener = Http01Listener::bind(addr, registry.service()).await?;
                    (Box::new(Http01Solver::new(registry)), Some(listener))
                }
            },
            ChallengeKind::Dns01 => {
                let dns = config
                    .dns
                    .as_ref()
                    .ok_or_else(|| Error::config("dns-01 needs a DNS provider (--dns-provider)"))?;
                (Box::new(Dns01Solver::from_config(dns)?), None)
            }
            ChallengeKind::TlsAlpn01 => {
                let addr = config.tls_listen.as_deref().ok_or_else(|| {
                    Error::config("tls-alpn-01 needs a listen address (--tls-listen)")
                })?;
                let addr = crate::listen::parse_addr(addr, "--tls-listen")?;
                let resolver = CertResolver::new();
                let listener = TlsAlpn01Listener::bind(addr, resolver.clone()).await?;
                tls_listener = Some(listener);
                (Box::new(TlsAlpn01Solver::new(resolver)), None)
            }
        };
        Ok(Issuance {
            request,
            solver,
            listener,
            tls_listener,
        })
    }

    /// Validates `request` and uses `solver` for its challenges, for embedders with a
    /// solver of their own (TLS-ALPN-01 in a proxy's resolver, a custom DNS provider).
    pub fn with_solver(request: IssueRequest, solver: Box<dyn Solver>) -> Result<Self> {
        request.validate()?;
        if solver.kind() != request.challenge.kind {
            return Err(Error::config(format!(
                "the solver answers {} but the request asks for {}",
                solver.kind(),
                request.challenge.kind
            )));
        }
        Ok(Issuance {
            request,
            solver,
            listener: None,
            tls_listener: None,
        })
    }

    /// The request this issuance carries out.
    pub fn request(&self) -> &IssueRequest {
        &self.request
    }

    /// The address the standalone TLS-ALPN-01 listener bound, if there is one.
    pub fn tls_listen_addr(&self) -> Option<SocketAddr> {
        self.tls_listener
            .as_ref()
            .map(TlsAlpn01Listener::local_addr)
    }

    /// The address the standalone HTTP-01 listener bound, if there is one.
    pub fn http_listen_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(Http01Listener::local_addr)
    }

    /// Orders the certificate, checks it, and stores it atomically together with the
    /// metadata a later renewal needs. Nothing is written unless every step succeeded.
    pub async fn run(
        &self,
        client: &AcmeClient,
        store: &dyn Store,
        progress: Option<ProgressFn>,
    ) -> Result<StoredCert> {
        self.run_inner(client, store, None, progress).await
    }

    /// [`Issuance::run`] for a caller holding the store's `lock` on the name: the new
    /// certificate is stored only if the lock is still held when the order ends (see
    /// [`LockStore::save_cert_fenced`]), so a holder whose lease ran out never writes
    /// over what another process stored since.
    ///
    /// [`LockStore::save_cert_fenced`]: crate::store::LockStore::save_cert_fenced
    pub async fn run_locked(
        &self,
        client: &AcmeClient,
        store: &dyn Store,
        lock: &dyn StoreLock,
        progress: Option<ProgressFn>,
    ) -> Result<StoredCert> {
        self.run_inner(client, store, Some(lock), progress).await
    }

    /// `error` with the port the CA probed and the address this process answers on,
    /// when an HTTP-01 validation found nobody or got a 404 (not for a webroot, which
    /// another server answers).
    fn explain_http01(&self, error: Error) -> Error {
        let challenge = &self.request.challenge;
        if challenge.kind != ChallengeKind::Http01 || challenge.http_webroot.is_some() {
            return error;
        }
        let listen = self
            .http_listen_addr()
            .map(|addr| addr.to_string())
            .or_else(|| challenge.http_listen.clone());
        crate::challenge::http01::explain_probe_failure(error, listen.as_deref())
    }

    pub(crate) async fn run_inner(
        &self,
        client: &AcmeClient,
        store: &dyn Store,
        lock: Option<&dyn StoreLock>,
        progress: Option<ProgressFn>,
    ) -> Result<StoredCert> {
        let order = OrderRequest {
            domains: self.request.domains.clone(),
            key_type: self.request.key_type,
            replaces: self.request.replaces.clone(),
        };
        let bundle = client
            .issue_with_profile(
                &order,
                self.request.profile.as_deref(),
                self.solver.as_ref(),
                progress,
            )
            .await
            .map_err(|e| self.explain_http01(e))?;
        bundle.validate_for(&self.request.domains)?;
        let stored = StoredCert {
            bundle,
            meta: CertMeta {
                name: self.request.name.clone(),
                domains: self.request.domains.clone(),
                key_type: self.request.key_type,
                challenge: self.request.challenge.clone(),
                directory: client.config().directory.clone(),
                issued_at: OffsetDateTime::now_utc(),
                profile: self.request.profile.clone(),
            },
        };
        match lock {
            Some(lock) => {
                store
                    .locks_for("storing a certificate under a lock")?
                    .save_cert_fenced(&stored, lock)
                    .await?
            }
            None => store.save_cert(&stored).await?,
        }
        Ok(stored)
    }
}

/// Prepares and runs one issuance: validate, build the solver, order, store.
///
/// Where several processes may issue the same name, hold [`lock_name`] around this call.
pub async fn issue_and_store(
    client: &AcmeClient,
    store: &dyn Store,
    request: IssueRequest,
    http01: Option<Http01Registry>,
    progress: Option<ProgressFn>,
) -> Result<StoredCert> {
    Issuance::prepare(request, http01)
        .await?
        .run(client, store, progress)
        .await
}

/// The one lease rule for locks on a certificate name, for `issue`, `renew` and the
/// manager alike: how long a holder that died can block the others. A live holder keeps
/// its lock however long its order runs: stores with leases renew them while the lock is
/// held (Redis), and a file lock dies with its process.
pub const LOCK_LEASE: Duration = Duration::from_secs(60);

/// Takes the store's lock on `name`, waiting up to `wait`, with an error that says who
/// to wait for when another process holds it. Refused when the store has no locks
/// ([`LockStore`](crate::store::LockStore)).
pub async fn lock_name(
    store: &dyn Store,
    name: &str,
    wait: Duration,
) -> Result<Box<dyn StoreLock>> {
    let locks = store.locks_for("locking a certificate name")?;
    locks.lock(name, LOCK_LEASE, wait).await?.ok_or_else(|| {
        Error::store(
            None,
            StoreErrorKind::Locked,
            format!(
                "another lobe-tls process is issuing {name:?}; wait for it to finish and try again"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_all;

    #[test]
    fn default_name_replaces_the_wildcard_star() {
        let domains = parse_all(&["*.example.com", "example.com"]).unwrap();
        assert_eq!(default_name(&domains), "_.example.com");
        let domains = parse_all(&["www.example.com"]).unwrap();
        assert_eq!(default_name(&domains), "www.example.com");
    }

    #[test]
    fn wildcard_with_http01_is_refused_naming_dns01() {
        let domains = parse_all(&["*.example.com"]).unwrap();
        let request = IssueRequest::new(domains, KeyType::default(), ChallengeConfig::default());
        let err = request.validate().unwrap_err().to_string();
        assert!(err.contains("dns-01"), "{err}");
        assert!(err.contains("*.example.com"), "{err}");
    }

    #[test]
    fn store_names_that_would_escape_the_store_are_refused() {
        let mut request = IssueRequest::new(
            parse_all(&["a.example.com"]).unwrap(),
            KeyType::default(),
            ChallengeConfig::default(),
        );
        request.name = "../etc".into();
        let err = request.validate().unwrap_err().to_string();
        assert!(err.contains("invalid certificate name"), "{err}");
    }

    #[test]
    fn ip_addresses_with_dns01_and_bad_profile_names_are_refused() {
        let challenge = ChallengeConfig {
            kind: ChallengeKind::Dns01,
            ..ChallengeConfig::default()
        };
        let request = IssueRequest::new(
            parse_all(&["192.0.2.10"]).unwrap(),
            KeyType::default(),
            challenge,
        );
        let err = request.validate().unwrap_err().to_string();
        assert!(
            err.contains("http-01") && err.contains("192.0.2.10"),
            "{err}"
        );
        let request = IssueRequest::new(
            parse_all(&["192.0.2.10"]).unwrap(),
            KeyType::default(),
            ChallengeConfig::default(),
        );
        request.validate().unwrap();
        for bad in ["", "short lived", "a\nb"] {
            let err = request
                .clone()
                .with_profile(Some(bad.into()))
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("--profile") && !err.contains('\n'), "{err}");
        }
        request
            .with_profile(Some("shortlived".into()))
            .validate()
            .unwrap();
    }

    #[tokio::test]
    async fn busy_listen_port_fails_in_prepare() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let challenge = ChallengeConfig {
            http_listen: Some(addr.clone()),
            ..ChallengeConfig::default()
        };
        let request = IssueRequest::new(
            parse_all(&["a.example.com"]).unwrap(),
            KeyType::default(),
            challenge,
        );
        let err = Issuance::prepare(request, None).await.unwrap_err();
        assert!(matches!(err, Error::Listen { .. }), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }
}
