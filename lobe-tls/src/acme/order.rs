//! One order end to end: its profile, the CAA pre-flight, the challenges presented,
//! answered and cleaned up, the polling, the finalization and the download.

use std::sync::Arc;

use instant_acme::{AuthorizationStatus, Identifier, NewOrder, OrderStatus};
use tokio::time::Instant;

use super::retry::{BAD_NONCE_RETRIES, is_bad_nonce, poll_order, retry_bad_nonce};
use super::{AcmeClient, acme_error, caa, csr, problem_text};
use crate::cert::{CertBundle, KeyType};
use crate::challenge::{ChallengeData, Solver};
use crate::domain::DomainName;
use crate::error::{CertificateErrorKind, ChallengeErrorKind, Error, Result};

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

impl AcmeClient {
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

fn names(domains: &[DomainName]) -> String {
    domains
        .iter()
        .map(DomainName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
