//! Fallback to a second CA: the CAs of an [`AcmeConfig`] (the primary, then its
//! `fallbacks`) are tried in order, each with its own account, when the one before fails
//! for reasons of its own.
//!
//! Reasons of the CA's own ([`falls_back`]): it cannot be reached, a request gets no
//! answer within the request timeout, it answers 5xx, `rateLimited`, or that issuance
//! is paused. Faults of the request (a bad name, a CAA refusal, a failed validation,
//! `unauthorized`) would fail at the next CA too, and are returned at once.
//!
//! Every order starts at the primary again, so a certificate that came from a fallback
//! goes back to the primary at its next renewal. A CA that asked not to be asked again
//! before some time (`Retry-After`) is skipped until then.

use std::sync::Mutex;

use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{AcmeClient, AcmeConfig, ProgressFn};
use crate::cert::rfc3339;
use crate::error::{Error, Result};
use crate::issue::Issuance;
use crate::store::{Store, StoreLock, StoredCert};

/// Whether `error` is the CA's own failure, for which the next CA is tried.
pub fn falls_back(error: &Error) -> bool {
    match error {
        Error::CaUnavailable { .. } => true,
        Error::CaProblem { kind, source, .. } => {
            let problem = match source.downcast_ref::<instant_acme::Error>() {
                Some(instant_acme::Error::Api(problem)) => Some(problem),
                _ => None,
            };
            matches!(kind.as_deref(), Some("rateLimited" | "serverInternal"))
                || problem.and_then(|p| p.status).is_some_and(|s| s >= 500)
                || problem.and_then(super::unpause_url).is_some()
        }
        _ => false,
    }
}

/// The CAs to order from, in order, each connected (its account loaded or registered)
/// on first use and kept connected.
pub struct CaChain {
    cas: Vec<Ca>,
}

/// One CA of a chain.
pub(crate) struct Ca {
    config: AcmeConfig,
    client: OnceCell<AcmeClient>,
    /// Not to be asked before this time, as it said with `Retry-After`.
    not_before: Mutex<Option<(OffsetDateTime, String)>>,
}

impl std::fmt::Debug for CaChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.directories()).finish()
    }
}

impl CaChain {
    /// `config` first, then each of its `fallbacks`.
    pub fn new(config: &AcmeConfig) -> Self {
        let mut primary = config.clone();
        let fallbacks = std::mem::take(&mut primary.fallbacks);
        let cas = std::iter::once(primary)
            .chain(fallbacks.into_iter().map(|mut f| {
                f.fallbacks.clear();
                f
            }))
            .map(|config| Ca {
                config,
                client: OnceCell::new(),
                not_before: Mutex::new(None),
            })
            .collect();
        CaChain { cas }
    }

    /// The directory URLs, primary first.
    pub fn directories(&self) -> impl Iterator<Item = &str> {
        self.cas.iter().map(|ca| ca.config.directory.as_str())
    }

    /// Whether `directory` is one of the chain's CAs.
    pub fn contains(&self, directory: &str) -> bool {
        self.directories().any(|d| d == directory)
    }

    /// The primary CA's client, connected on first use.
    pub async fn primary(&self, store: &dyn Store) -> Result<&AcmeClient> {
        self.cas[0].connect(store).await
    }

    /// The CA whose directory is `directory`, if the chain has it (still).
    pub(crate) fn of_directory(&self, directory: &str) -> Option<&Ca> {
        self.cas.iter().find(|ca| ca.config.directory == directory)
    }

    /// Connects to the CAs in order until one answers, and returns its position: what
    /// [`CaChain::issue_from`] starts from. Nothing is ordered.
    pub async fn warm(&self, store: &dyn Store) -> Result<usize> {
        let mut failed = Vec::new();
        for (index, ca) in self.cas.iter().enumerate() {
            let last = index + 1 == self.cas.len();
            if let Some(error) = ca.waiting(last) {
                match error {
                    Some(error) => return Err(with_earlier(error, &failed)),
                    None => continue,
                }
            }
            match ca.connect(store).await {
                Ok(_) => return Ok(index),
                Err(e) if falls_back(&e) && !last => {
                    tracing::warn!(directory = %ca.config.directory, error = %e, "the CA failed; trying the next one");
                    self.note(index, &e);
                    failed.push((ca.config.directory.clone(), e.to_string()));
                }
                Err(e) => return Err(with_earlier(e, &failed)),
            }
        }
        Err(Error::config("no CA configured"))
    }

    /// Orders `issuance` from the primary CA, then from each fallback in turn while the
    /// one before fails for reasons of its own, and stores the result (under `lock`
    /// when given, see [`Issuance::run_locked`]). The stored metadata names the CA
    /// that issued it.
    pub async fn issue(
        &self,
        issuance: &Issuance,
        store: &dyn Store,
        lock: Option<&dyn StoreLock>,
        progress: Option<ProgressFn>,
    ) -> Result<StoredCert> {
        self.issue_from(0, issuance, store, lock, progress).await
    }

    /// [`CaChain::issue`], starting at the CA at position `start` (from
    /// [`CaChain::warm`]).
    pub async fn issue_from(
        &self,
        start: usize,
        issuance: &Issuance,
        store: &dyn Store,
        lock: Option<&dyn StoreLock>,
        progress: Option<ProgressFn>,
    ) -> Result<StoredCert> {
        let mut failed = Vec::new();
        for (index, ca) in self.cas.iter().enumerate().skip(start) {
            let last = index + 1 == self.cas.len();
            if let Some(error) = ca.waiting(last) {
                match error {
                    Some(error) => return Err(with_earlier(error, &failed)),
                    None => continue,
                }
            }
            if index > 0
                && let Some(say) = &progress
            {
                say(&format!("trying the fallback CA {}", ca.config.directory));
            }
            let result = match ca.connect(store).await {
                Ok(client) => {
                    issuance
                        .run_inner(client, store, lock, progress.clone())
                        .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(stored) => {
                    if index > 0 {
                        tracing::warn!(directory = %ca.config.directory, cert = %stored.meta.name, "issued by a fallback CA; the next renewal tries the primary first");
                    }
                    return Ok(stored);
                }
                Err(e) if falls_back(&e) && !last => {
                    tracing::warn!(directory = %ca.config.directory, error = %e, "the CA failed; trying the next one");
                    self.note(index, &e);
                    failed.push((ca.config.directory.clone(), e.to_string()));
                }
                Err(e) => {
                    self.note(index, &e);
                    return Err(with_earlier(e, &failed));
                }
            }
        }
        Err(Error::config(format!(
            "every CA is waiting out a Retry-After: {}",
            failed
                .iter()
                .map(|(d, e)| format!("{d}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        )))
    }

    /// Remembers a `Retry-After` the CA at `index` sent with `error`.
    fn note(&self, index: usize, error: &Error) {
        if let Some(at) = error.retry_after() {
            *self.cas[index]
                .not_before
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((at, error.to_string()));
        }
    }
}

impl Ca {
    /// Its client, connected on first use.
    pub(crate) async fn connect(&self, store: &dyn Store) -> Result<&AcmeClient> {
        self.client
            .get_or_try_init(|| AcmeClient::connect(&self.config, store))
            .await
    }

    /// `None` when the CA may be asked now. Otherwise `Some(None)` to skip it for the
    /// next one, or, for the `last` CA, `Some(Some(error))` saying until when it waits.
    fn waiting(&self, last: bool) -> Option<Option<Error>> {
        let mut slot = self.not_before.lock().unwrap_or_else(|e| e.into_inner());
        let (at, message) = slot.as_ref()?;
        if *at <= OffsetDateTime::now_utc() {
            *slot = None;
            return None;
        }
        tracing::debug!(directory = %self.config.directory, not_before = %rfc3339(*at), "skipping a CA until its Retry-After");
        if !last {
            return Some(None);
        }
        Some(Some(Error::CaProblem {
            context: format!(
                "not asking {} again before {} as it asked",
                self.config.directory,
                rfc3339(*at)
            ),
            kind: Some("rateLimited".into()),
            message: message.clone(),
            source: Box::new(instant_acme::Error::Str("Retry-After not yet passed")),
            retry_after: Some(*at),
        }))
    }
}

/// The last CA's error, with the earlier CAs' failures added to its line.
fn with_earlier(error: Error, failed: &[(String, String)]) -> Error {
    if failed.is_empty() {
        return error;
    }
    let earlier = failed
        .iter()
        .map(|(d, e)| format!("{d}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    match error {
        Error::CaProblem {
            context,
            kind,
            message,
            source,
            retry_after,
        } => Error::CaProblem {
            context,
            kind,
            message: format!("{message} (after earlier CAs failed: {earlier})"),
            source,
            retry_after,
        },
        Error::CaUnavailable { message, source } => Error::CaUnavailable {
            message: format!("{message} (after earlier CAs failed: {earlier})"),
            source,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str, status: u16) -> Error {
        let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": format!("urn:ietf:params:acme:error:{kind}"),
            "detail": "x",
            "status": status,
        }))
        .unwrap();
        super::super::acme_error(
            "the CA refused the order",
            instant_acme::Error::Api(problem),
        )
    }

    #[test]
    fn only_the_cas_own_failures_fall_back() {
        assert!(falls_back(&Error::ca_unavailable("connection refused")));
        assert!(falls_back(&problem("rateLimited", 429)));
        assert!(falls_back(&problem("serverInternal", 500)));
        assert!(falls_back(&problem("badCSR", 503)));
        assert!(!falls_back(&problem("unauthorized", 403)));
        assert!(!falls_back(&problem("rejectedIdentifier", 400)));
        assert!(!falls_back(&problem("caa", 403)));
        assert!(!falls_back(&Error::challenge(
            crate::ChallengeErrorKind::ValidationFailed,
            "validation failed"
        )));
        assert!(!falls_back(&Error::dns(
            crate::DnsErrorKind::CaaForbids,
            "CAA forbids"
        )));
        assert!(!falls_back(&Error::timeout("the order did not finish")));
    }

    #[test]
    fn the_chain_is_the_primary_then_the_fallbacks_in_order() {
        let config = AcmeConfig::new("https://a.test/dir")
            .with_fallback(AcmeConfig::new("https://b.test/dir"))
            .with_fallback(AcmeConfig::new("https://c.test/dir"));
        let chain = CaChain::new(&config);
        assert_eq!(
            chain.directories().collect::<Vec<_>>(),
            [
                "https://a.test/dir",
                "https://b.test/dir",
                "https://c.test/dir"
            ]
        );
        assert!(chain.contains("https://c.test/dir"));
        assert!(!chain.contains("https://d.test/dir"));
    }

    #[test]
    fn a_retry_after_skips_a_ca_until_it_passes() {
        let config = AcmeConfig::new("https://a.test/dir")
            .with_fallback(AcmeConfig::new("https://b.test/dir"));
        let chain = CaChain::new(&config);
        let at = OffsetDateTime::now_utc() + time::Duration::hours(1);
        *chain.cas[0].not_before.lock().unwrap() = Some((at, "slow down".into()));
        assert!(matches!(chain.cas[0].waiting(false), Some(None)));
        *chain.cas[1].not_before.lock().unwrap() = Some((at, "slow down".into()));
        let err = chain.cas[1].waiting(true).unwrap().unwrap();
        assert_eq!(err.retry_after(), Some(at));
        assert!(
            err.to_string()
                .contains("not asking https://b.test/dir again"),
            "{err}"
        );
        *chain.cas[0].not_before.lock().unwrap() = Some((
            OffsetDateTime::now_utc() - time::Duration::seconds(1),
            "x".into(),
        ));
        assert!(chain.cas[0].waiting(false).is_none());
    }
}
