//! Which CA to reach and how: the directory, the account's contact and EAB, the
//! timeouts, the fallbacks and the CAA pre-flight; and the store key of the account.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::CaaCheck;
#[cfg(doc)]
use super::{AcmeClient, CaChain};
use crate::error::{Error, Result};

/// Let's Encrypt's production directory.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory, for trying things out without rate limits.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

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
