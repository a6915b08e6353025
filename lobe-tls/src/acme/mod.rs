//! ACME on instant-acme: account load-or-create (with EAB), one order end to end, and
//! revocation.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};

use crate::cert::CertBundle;
use crate::error::{Error, Result, StoreErrorKind};
use crate::store::Store;

pub mod account;
mod ca_file;
pub mod caa;
mod config;
mod csr;
pub mod fallback;
mod http;
mod order;
mod problem;
mod retry;

use problem::*;
pub(crate) use problem::{error_chain, unpause_url};
use retry::retry_bad_nonce;

pub use ca_file::fallbacks_from;
pub use caa::CaaCheck;
pub(crate) use config::account_key;
pub use config::{
    AcmeConfig, DEFAULT_ORDER_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Eab, LETSENCRYPT,
    LETSENCRYPT_STAGING, resolve_directory,
};
pub use fallback::{CaChain, falls_back};
pub use http::RequestTimedOut;
pub(crate) use http::with_request_bound;
pub use instant_acme::RevocationReason;
pub use order::{OrderRequest, ProgressFn, SHORTLIVED_PROFILE};

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
