//! ACME on instant-acme: account load-or-create (with EAB), one order end to end, and
//! revocation.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::time::Instant;

use crate::cert::{CertBundle, KeyType};
use crate::challenge::{ChallengeData, Solver};
use crate::domain::DomainName;
use crate::error::{CertificateErrorKind, ChallengeErrorKind, Error, Result, StoreErrorKind};
use crate::store::Store;

pub mod account;
mod ca_file;
pub mod caa;
mod csr;
pub mod fallback;
mod http;
mod problem;

use problem::*;
pub(crate) use problem::{error_chain, unpause_url};

pub use ca_file::fallbacks_from;
pub use caa::CaaCheck;
pub use fallback::{CaChain, falls_back};
pub use http::RequestTimedOut;
pub(crate) use http::with_request_bound;
pub use instant_acme::RevocationReason;

/// Let's Encrypt's production directory.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory, for trying things out without rate limits.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How many times one step is repeated when the CA keeps rejecting nonces, on top of
/// instant-acme's own three attempts. At a 50% rejection rate a step then fails once in
/// about 10^9 tries, instead of once in eight.
const BAD_NONCE_RETRIES: u32 = 8;

/// Polls an order with an instant-acme poll call in two stages: soon and doubling
/// ([`fast_poll_policy`]), then steady ([`steady_poll_policy`]) until `deadline`. A CA's
/// `Retry-After` overrides either schedule (instant-acme honours it).
///
/// Two stages because one geometric schedule either starts slow or, doubling on, stops
/// polling long before the deadline: instant-acme ends a schedule once its next interval
/// would overshoot. A macro rather than a function taking an async closure, whose
/// future the compiler cannot yet prove `Send`.
macro_rules! poll_order {
    ($deadline:expr, |$policy:ident| $call:expr) => {{
        let deadline = $deadline;
        let $policy = fast_poll_policy(deadline);
        match $call {
            Err(instant_acme::Error::Timeout(None)) => match steady_poll_policy(deadline) {
                Some($policy) => $call,
                None => Err(instant_acme::Error::Timeout(None)),
            },
            outcome => outcome,
        }
    }};
}

/// Runs an instant-acme call again while it fails with `badNonce`. Each run signs a new
/// request with a fresh nonce; a rejected request changed nothing at the CA, so
/// repeating it is safe.
macro_rules! retry_bad_nonce {
    ($call:expr) => {{
        let mut attempt = 0;
        loop {
            match $call {
                Err(e) if is_bad_nonce(&e) && attempt < BAD_NONCE_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, "badNonce from the CA; retrying");
                }
                outcome => break outcome,
            }
        }
    }};
}

/// The default whole-order deadline.
pub const DEFAULT_ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The default bound on one ACME request, answer body included. Public CAs answer in well
/// under a second; a request still open after this is on a dead path.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Turns `letsencrypt` / `letsencrypt-staging` into URLs; checks that anything else is one.
pub fn resolve_directory(name_or_url: &str) -> Result<String> {
    match name_or_url {
        "letsencrypt" | "le" => Ok(LETSENCRYPT.to_owned()),
        "letsencrypt-staging" | "le-staging" => Ok(LETSENCRYPT_STAGING.to_owned()),
        url if url.starts_with("https://") || url.starts_with("http://") => Ok(url.to_owned()),
        other => Err(Error::config_key(
            "--directory",
            format!(
                "invalid --directory {other:?}: give an https:// URL, letsencrypt or letsencrypt-staging"
            ),
        )),
    }
}

/// External Account Binding credentials, as some CAs (ZeroSSL, Google, private CAs) require.
#[derive(Clone)]
pub struct Eab {
    /// The key identifier the CA gave.
    pub kid: String,
    /// The HMAC key, base64url as the CA gave it.
    pub hmac_key_b64: String,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key_b64", &"<redacted>")
            .finish()
    }
}

/// How to reach the CA and which account to use. Start from [`AcmeConfig::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcmeConfig {
    /// The directory URL (see [`resolve_directory`]).
    pub directory: String,
    /// An extra trust root for the CA's own HTTPS.
    pub directory_ca: Option<PathBuf>,
    /// The account's contact address.
    pub email: Option<String>,
    /// External Account Binding, when the CA requires it.
    pub eab: Option<Eab>,
    /// The deadline for one whole order.
    pub order_timeout: Duration,
    /// The bound on each request to the CA (directory, nonce, account, order,
    /// authorization, challenge, finalize, download, renewalInfo, revoke), answer included.
    pub request_timeout: Duration,
    /// CAs to try in turn when this one fails for reasons of its own (unreachable, no
    /// answer within the request timeout, 5xx, `rateLimited`, paused); each has its own
    /// account, EAB and trust root. Their own `fallbacks` are ignored. See [`CaChain`].
    pub fallbacks: Vec<AcmeConfig>,
    /// The CAA pre-flight before each order.
    pub caa: CaaCheck,
}

impl AcmeConfig {
    /// Settings for `directory` with everything else at its default.
    pub fn new(directory: impl Into<String>) -> Self {
        AcmeConfig {
            directory: directory.into(),
            directory_ca: None,
            email: None,
            eab: None,
            order_timeout: DEFAULT_ORDER_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            fallbacks: Vec::new(),
            caa: CaaCheck::default(),
        }
    }

    /// Adds a CA to try when the ones before it fail for reasons of their own.
    pub fn with_fallback(mut self, fallback: AcmeConfig) -> Self {
        self.fallbacks.push(fallback);
        self
    }

    /// Bounds each request to the CA by `timeout` (default 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bounds one whole order by `timeout` (default 300 s).
    pub fn with_order_timeout(mut self, timeout: Duration) -> Self {
        self.order_timeout = timeout;
        self
    }

    /// The store key of the account for this directory and email.
    pub fn account_key(&self) -> String {
        account_key(&self.directory, self.email.as_deref())
    }
}

/// The store key of the account for `directory` and `email` (`default` without one), as
/// [`AcmeClient::connect`] looks it up.
pub(crate) fn account_key(directory: &str, email: Option<&str>) -> String {
    {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let dir = directory
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let mut key = format!("{}@{}", clean(email.unwrap_or("default")), clean(dir));
        key.truncate(200);
        key
    }
}

/// What to order.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    /// The names, the first of which is the certificate's main name.
    pub domains: Vec<DomainName>,
    /// The key type for the new certificate; a fresh key is generated every time.
    pub key_type: KeyType,
    /// The ARI identifier of the certificate this one replaces, if the CA offers ARI.
    pub replaces: Option<String>,
}

/// The profile Let's Encrypt issues IP address certificates under.
pub const SHORTLIVED_PROFILE: &str = "shortlived";

/// A progress report, for a terminal that wants to show what an order is waiting on.
pub type ProgressFn = Arc<dyn Fn(&str) + Send + Sync>;

/// A connected ACME account.
#[derive(Clone)]
pub struct AcmeClient {
    account: Account,
    config: AcmeConfig,
    http: http::BoundedClient,
    /// The last `Retry-After` the CA sent with an error answer.
    retry_after: Arc<Mutex<Option<SystemTime>>>,
    /// The directory's `meta.caaIdentities`, read on first use.
    caa_identities: Arc<tokio::sync::OnceCell<Vec<String>>>,
}

impl fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeClient")
            .field("directory", &self.config.directory)
            .field("account", &self.account.id())
            .finish()
    }
}

impl AcmeClient {
    /// Loads the account for this directory and email from `store`, or registers a new
    /// one and stores it.
    pub async fn connect(config: &AcmeConfig, store: &dyn Store) -> Result<Self> {
        let roots = crate::net::root_store(config.directory_ca.as_deref())?;
        let http =
            http::BoundedClient::new(crate::net::http_client(roots)?, config.request_timeout);
        let key = config.account_key();
        let unreachable = |e: instant_acme::Error| {
            match e {
            // A 5xx answer (made a `serverInternal` problem by the HTTP client) is the
            // CA's failure, as an unreachable directory is.
            instant_acme::Error::Api(_) => acme_error(
                &format!("the ACME directory {} failed", config.directory),
                e,
            ),
            e => Error::ca_unavailable(format!(
                "cannot reach the ACME directory {}: {}; check --directory, --directory-ca and that the CA is up",
                config.directory,
                error_chain(&e)
            ))
            .with_source(e),
        }
        };
        if let Some(saved) = store.load_account(&key).await? {
            let credentials: AccountCredentials = serde_json::from_slice(&saved).map_err(|e| {
                Error::store(
                    None,
                    StoreErrorKind::Corrupt,
                    format!("account {key} is unreadable ({e}); move it aside to register anew"),
                )
                .with_source(e)
            })?;
            let account = Account::builder_with_http(Box::new(http.clone()))
                .from_credentials(credentials)
                .await
                .map_err(unreachable)?;
            return Ok(AcmeClient::new(account, config, http));
        }

        let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = match &config.eab {
            Some(eab) => {
                let hmac = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(eab.hmac_key_b64.trim_end_matches('='))
                    .map_err(|e| {
                        Error::config_key(
                            "--eab-hmac-key",
                            format!("--eab-hmac-key is not base64url: {e}"),
                        )
                        .with_source(e)
                    })?;
                Some(ExternalAccountKey::new(eab.kid.clone(), &hmac))
            }
            None => None,
        };
        let new_account = NewAccount {
            contact: &contacts,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = retry_bad_nonce!(
            Account::builder_with_http(Box::new(http.clone()))
                .create(&new_account, config.directory.clone(), eab.as_ref())
                .await
        )
        .map_err(|e| match &e {
            instant_acme::Error::Api(problem) if !ca_side(problem) => account_problem(e),
            _ => unreachable(e),
        })?;
        let saved = account::with_contacts(&credentials, &account::contacts_for(config))?;
        store.save_account(&key, &saved).await?;
        tracing::info!(directory = %config.directory, "registered a new ACME account");
        Ok(AcmeClient::new(account, config, http))
    }

    fn new(account: Account, config: &AcmeConfig, http: http::BoundedClient) -> Self {
        AcmeClient {
            account,
            config: config.clone(),
            retry_after: http.retry_after_slot(),
            http,
            caa_identities: Arc::default(),
        }
    }

    /// [`acme_error`] with the `Retry-After` the CA sent along, if it sent one.
    fn ca_error(&self, context: &str, error: instant_acme::Error) -> Error {
        let mut error = acme_error(context, error);
        let sent = self
            .retry_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (
            Error::CaProblem {
                message,
                retry_after,
                ..
            },
            Some(at),
        ) = (&mut error, sent)
        {
            let at = time::OffsetDateTime::from(at);
            message.push_str(&format!(
                "; the CA asks not to retry before {}",
                crate::cert::rfc3339(at)
            ));
            *retry_after = Some(at);
        }
        error
    }

    /// The CA's CAA identities: the configured ones, else the directory's
    /// `meta.caaIdentities` (empty when it lists none or cannot be read).
    async fn caa_identities(&self) -> &[String] {
        if !self.config.caa.identities.is_empty() {
            return &self.config.caa.identities;
        }
        self.caa_identities
            .get_or_init(|| async {
                match self.http.get_json(&self.config.directory).await {
                    Ok(directory) => caa_identities_of(&directory),
                    Err(e) => {
                        tracing::warn!(directory = %self.config.directory, error = %e, "cannot read the directory's caaIdentities");
                        Vec::new()
                    }
                }
            })
            .await
    }

    /// The instant-acme account, for ARI queries and the like.
    pub fn account(&self) -> &Account {
        &self.account
    }

    /// The configuration this client was connected with.
    pub fn config(&self) -> &AcmeConfig {
        &self.config
    }

    /// The profiles the CA's directory lists (`meta.profiles`), sorted by name.
    pub fn profiles(&self) -> Vec<String> {
        let mut names: Vec<String> = self.account.profiles().map(|p| p.name.to_owned()).collect();
        names.sort_unstable();
        names
    }

    /// The profile an order for `domains` goes under: `requested` if the CA lists it (an
    /// error otherwise, before anything is ordered); without a request, `shortlived`
    /// for an order that holds an IP address when the CA lists it; else none, the CA's
    /// default.
    pub fn order_profile(
        &self,
        requested: Option<&str>,
        domains: &[DomainName],
    ) -> Result<Option<String>> {
        let offered = self.profiles();
        match requested {
            Some(profile) if offered.iter().any(|p| p == profile) => Ok(Some(profile.to_owned())),
            Some(profile) if offered.is_empty() => Err(Error::config_key(
                "--profile",
                format!(
                    "the CA at {} lists no profiles, so it cannot issue under --profile {profile:?}; drop --profile",
                    self.config.directory
                ),
            )),
            Some(profile) => Err(Error::config_key(
                "--profile",
                format!(
                    "the CA at {} does not list the profile {profile:?}; it lists {}",
                    self.config.directory,
                    // The CA's names, escaped: the message stays one line whatever it sends.
                    offered
                        .iter()
                        .map(|p| p.escape_debug().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            None if domains.iter().any(|d| d.ip().is_some())
                && offered.iter().any(|p| p == SHORTLIVED_PROFILE) =>
            {
                Ok(Some(SHORTLIVED_PROFILE.to_owned()))
            }
            None => Ok(None),
        }
    }

    /// Orders a certificate for `request`, answering challenges with `solver`, within the
    /// whole-order deadline. Every presented challenge is cleaned up, whatever happens.
    /// The order goes under the CA's default profile, or `shortlived` for an IP address
    /// when the CA lists it (see [`AcmeClient::issue_with_profile`]).
    pub async fn issue(
        &self,
        request: &OrderRequest,
        solver: &dyn Solver,
        progress: Option<ProgressFn>,
    ) -> Result<CertBundle> {
        self.issue_with_profile(request, None, solver, progress)
            .await
    }

    /// [`AcmeClient::issue`] under the ACME profile `profile`, which the CA's directory
    /// must list (checked before anything is ordered, see [`AcmeClient::order_profile`]).
    pub async fn issue_with_profile(
        &self,
        request: &OrderRequest,
        profile: Option<&str>,
        solver: &dyn Solver,
        progress: Option<ProgressFn>,
    ) -> Result<CertBundle> {
        let say = |msg: &str| {
            tracing::debug!("{msg}");
            if let Some(p) = &progress {
                p(msg);
            }
        };
        for domain in &request.domains {
            if domain.is_wildcard() && solver.kind() != crate::challenge::ChallengeKind::Dns01 {
                return Err(
                    crate::domain::DomainError::WildcardNeedsDns(domain.to_string()).into(),
                );
            }
            if domain.ip().is_some() && solver.kind() == crate::challenge::ChallengeKind::Dns01 {
                return Err(
                    crate::domain::DomainError::IpNeedsHttpOrAlpn(domain.to_string()).into(),
                );
            }
        }
        // Checked against the directory before anything is ordered.
        let profile = self.order_profile(profile, &request.domains)?;
        let identities = self.caa_identities().await;
        caa::check(
            &self.config.caa,
            &request.domains,
            &caa::CaaSubject {
                identities,
                account_uri: self.account.id(),
                method: solver.kind(),
            },
        )
        .await?;
        let mut presented = Vec::new();
        let deadline = self.config.order_timeout;
        let outcome = tokio::time::timeout(
            deadline,
            self.run_order(request, profile.as_deref(), solver, &mut presented, &say),
        )
        .await;
        for challenge in &presented {
            if let Err(e) = solver.cleanup(challenge).await {
                tracing::warn!(domain = %challenge.domain, error = %e, "challenge cleanup failed");
            }
        }
        match outcome {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "the order for {} did not finish within {}s",
                names(&request.domains),
                deadline.as_secs()
            ))),
        }
    }

    async fn run_order(
        &self,
        request: &OrderRequest,
        profile: Option<&str>,
        solver: &dyn Solver,
        presented: &mut Vec<ChallengeData>,
        say: &(dyn Fn(&str) + Sync),
    ) -> Result<CertBundle> {
        let started = Instant::now();
        let identifiers: Vec<Identifier> = request
            .domains
            .iter()
            .map(|d| match d.ip() {
                Some(ip) => Identifier::Ip(ip),
                None => Identifier::Dns(d.as_str().to_owned()),
            })
            .collect();
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(profile) = profile {
            new_order = new_order.profile(profile);
        }
        let replaces = match &request.replaces {
            Some(id) => Some(
                serde_json::from_str::<instant_acme::CertificateIdentifier<'_>>(
                    &serde_json::Value::String(id.clone()).to_string(),
                )
                .map(|id| id.into_owned())
                .map_err(|e| {
                    Error::certificate(
                        CertificateErrorKind::Malformed,
                        format!("bad ARI certificate id {id:?}: {e}"),
                    )
                    .with_source(e)
                })?,
            ),
            None => None,
        };
        if let Some(replaces) = replaces {
            new_order = new_order.replaces(replaces);
        }
        say(&format!(
            "ordering a certificate for {}{}",
            names(&request.domains),
            profile
                .map(|p| format!(" (profile {p})"))
                .unwrap_or_default()
        ));
        let mut order = retry_bad_nonce!(self.account.new_order(&new_order).await)
            .map_err(|e| self.ca_error("the CA refused the order", e))?;

        fetch_authorizations(&mut order).await?;

        // Present every pending challenge first, then wait for all of them to be visible,
        // then answer: a CA may validate as soon as one is answered.
        let kind = solver.kind();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| acme_error("cannot fetch an authorization", e))?;
            if !matches!(
                authz.identifier().identifier,
                Identifier::Dns(_) | Identifier::Ip(_)
            ) {
                return Err(Error::acme(format!(
                    "the CA sent an unexpected identifier {}",
                    authz.identifier()
                )));
            }
            let domain = DomainName::parse(&authz.identifier().to_string())?;
            match authz.status {
                AuthorizationStatus::Valid => {
                    say(&format!("{domain}: already authorized"));
                    continue;
                }
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(Error::challenge(
                        ChallengeErrorKind::AuthorizationNotPending,
                        format!("the authorization for {domain} is {status:?}; start a new order"),
                    ));
                }
            }
            let challenge = authz.challenge(kind.acme_type()).ok_or_else(|| {
                Error::challenge(
                    ChallengeErrorKind::NotOffered,
                    format!(
                        "the CA offers no {kind} challenge for {domain}; try another --challenge"
                    ),
                )
            })?;
            let key_auth = challenge.key_authorization();
            let mut digest = [0u8; 32];
            digest.copy_from_slice(key_auth.digest().as_ref());
            let data = ChallengeData {
                domain,
                token: challenge.token.clone(),
                key_authorization: key_auth.as_str().to_owned(),
                dns_value: key_auth.dns_value(),
                digest,
            };
            say(&format!("{}: presenting the {kind} challenge", data.domain));
            solver.present(&data).await?;
            presented.push(data);
        }

        for challenge in presented.iter() {
            say(&format!(
                "{}: waiting until the challenge is visible",
                challenge.domain
            ));
            solver.wait_visible(challenge).await?;
        }

        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| acme_error("cannot fetch an authorization", e))?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            if let Some(mut challenge) = authz.challenge(kind.acme_type()) {
                retry_bad_nonce!(challenge.set_ready().await)
                    .map_err(|e| acme_error("the CA refused the challenge answer", e))?;
            }
        }

        if !presented.is_empty() {
            say("waiting for the CA to validate");
        }
        let deadline = started + self.config.order_timeout;
        let status = retry_bad_nonce!(poll_order!(deadline, |policy| order
            .poll_ready(&policy)
            .await))
        .map_err(|e| match &e {
            // The order's own problem document: a challenge failed validation.
            instant_acme::Error::Api(problem) => Error::challenge(
                ChallengeErrorKind::ValidationFailed,
                format!("validation failed: {}", problem_text(problem)),
            )
            .with_source(e),
            _ => acme_error("the order failed", e),
        })?;
        if status == OrderStatus::Invalid {
            return Err(self.explain_invalid(&mut order).await);
        }

        say("finalizing");
        // An RSA key takes tens to hundreds of milliseconds: not on the runtime's threads.
        let key_type = request.key_type;
        let key = tokio::task::spawn_blocking(move || key_type.generate())
            .await
            .map_err(|e| {
                Error::certificate(
                    CertificateErrorKind::Generation,
                    format!("key generation stopped: {e}"),
                )
                .with_source(e)
            })??;
        let csr = csr::build(&request.domains, &key)?;
        retry_bad_nonce!(order.finalize_csr(&csr).await)
            .map_err(|e| self.ca_error("the CA refused to finalize the order", e))?;
        let chain = retry_bad_nonce!(poll_order!(deadline, |policy| order
            .poll_certificate(&policy)
            .await))
        .map_err(|e| acme_error("cannot download the certificate", e))?;
        let bundle = CertBundle::from_pem(chain, key.serialize_pem())?;
        bundle.validate_for(&request.domains)?;
        say(&format!(
            "issued a certificate for {} in {:.2}s",
            names(&request.domains),
            started.elapsed().as_secs_f64()
        ));
        Ok(bundle)
    }

    /// Builds the error for an invalid order from the failed challenges' problem details.
    async fn explain_invalid(&self, order: &mut instant_acme::Order) -> Error {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let Ok(state) = authz.refresh().await else {
                continue;
            };
            for challenge in &state.challenges {
                if let Some(problem) = &challenge.error {
                    let name = state.identifier().to_string();
                    reasons.push(format!("{name}: {}", problem_text(problem)));
                }
            }
        }
        if reasons.is_empty() {
            Error::challenge(
                ChallengeErrorKind::ValidationFailed,
                "the CA marked the order invalid without saying why",
            )
        } else {
            Error::challenge(
                ChallengeErrorKind::ValidationFailed,
                format!("validation failed: {}", reasons.join("; ")),
            )
        }
    }

    /// Revokes `bundle`'s certificate.
    pub async fn revoke(
        &self,
        bundle: &CertBundle,
        reason: instant_acme::RevocationReason,
    ) -> Result<()> {
        let chain = bundle.chain_der()?;
        let request = instant_acme::RevocationRequest {
            certificate: &chain[0],
            reason: Some(reason),
        };
        retry_bad_nonce!(self.account.revoke(&request).await)
            .map_err(|e| acme_error("the CA refused to revoke", e))
    }
}

/// Fetches the state of every authorization of `order`, repeating fetches the CA refused
/// with `badNonce`. instant-acme caches each fetched state, so later walks over the
/// authorizations need no network.
async fn fetch_authorizations(order: &mut instant_acme::Order) -> Result<()> {
    let mut attempt = 0;
    'walk: loop {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            match authz {
                Ok(_) => {}
                Err(e) if is_bad_nonce(&e) && attempt < BAD_NONCE_RETRIES => {
                    attempt += 1;
                    continue 'walk;
                }
                Err(e) => return Err(acme_error("cannot fetch an authorization", e)),
            }
        }
        return Ok(());
    }
}

fn is_bad_nonce(error: &instant_acme::Error) -> bool {
    matches!(error, instant_acme::Error::Api(problem)
        if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

/// The first poll of an order's state comes this soon: Pebble validates and issues within
/// a few milliseconds, and each poll is one small request.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// Polls double their interval from [`FIRST_POLL`] for about this long (the last
/// one lands at 1.27 s)...
const FAST_POLLING: Duration = Duration::from_millis(2500);
/// ...and then come at this steady interval until the order's deadline, so a slow CA
/// sees one request every few seconds and polling never gives up before the deadline.
const STEADY_POLL: Duration = Duration::from_secs(2);

/// The first stage of polling: soon, then doubling.
fn fast_poll_policy(deadline: Instant) -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(FIRST_POLL)
        .backoff(2.0)
        .timeout(FAST_POLLING.min(deadline.saturating_duration_since(Instant::now())))
}

/// The second stage of polling, if the deadline leaves room for one more poll.
fn steady_poll_policy(deadline: Instant) -> Option<RetryPolicy> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    (remaining > STEADY_POLL).then(|| {
        RetryPolicy::new()
            .initial_delay(STEADY_POLL)
            .backoff(1.0)
            .timeout(remaining)
    })
}

fn names(domains: &[DomainName]) -> String {
    domains
        .iter()
        .map(DomainName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `meta.caaIdentities` of a directory document.
fn caa_identities_of(directory: &serde_json::Value) -> Vec<String> {
    directory
        .get("meta")
        .and_then(|m| m.get("caaIdentities"))
        .and_then(|ids| ids.as_array())
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
