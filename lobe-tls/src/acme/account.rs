//! Account management: show an account, roll its key over (RFC 8555 §7.3.5), and
//! deactivate it (§7.3.6), for `lobe-tls account` and embedders.
//!
//! The stored account is instant-acme's credentials JSON. lobe-tls adds two fields of its
//! own, which instant-acme ignores when it reads the credentials back: `contact` (what
//! the account was registered with) and `status` (`deactivated` once deactivated here).

use base64::Engine;
use instant_acme::{Account, AccountCredentials, Key};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{AcmeConfig, acme_error, error_chain, http};
use crate::error::{Error, Result, StoreErrorKind};
use crate::store::Store;

/// What `lobe-tls account show` prints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct AccountInfo {
    /// The CA's directory URL.
    pub directory: String,
    /// The account's key in the store.
    pub store_key: String,
    /// The account URL at the CA (its `kid`).
    pub url: String,
    /// The contacts the account was registered with (`mailto:` URLs).
    pub contacts: Vec<String>,
    /// `valid`, `deactivated`, or what the CA answered instead.
    pub status: String,
    /// The account key's type, e.g. `ecdsa-p256`.
    pub key_type: String,
}

/// The stored account as a JSON object, with instant-acme's credentials inside.
struct Stored {
    store_key: String,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Stored {
    async fn load(config: &AcmeConfig, store: &dyn Store) -> Result<Self> {
        let store_key = config.account_key();
        let bytes = store.load_account(&store_key).await?.ok_or_else(|| {
            Error::config(format!(
                "no account for {} in the store (key {store_key}); an issue registers one, or check --directory and --email",
                config.directory
            ))
        })?;
        let json = serde_json::from_slice(&bytes).map_err(|e| {
            Error::store(
                None,
                StoreErrorKind::Corrupt,
                format!("account {store_key} is unreadable ({e}); move it aside to register anew"),
            )
            .with_source(e)
        })?;
        Ok(Stored { store_key, json })
    }

    fn credentials(&self) -> Result<AccountCredentials> {
        serde_json::from_value(serde_json::Value::Object(self.json.clone())).map_err(|e| {
            Error::store(
                None,
                StoreErrorKind::Corrupt,
                format!(
                    "account {} is unreadable ({e}); move it aside to register anew",
                    self.store_key
                ),
            )
            .with_source(e)
        })
    }

    fn url(&self) -> String {
        self.json
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    fn pkcs8(&self) -> Result<Vec<u8>> {
        let text = self
            .json
            .get("key_pkcs8")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| {
                Error::store(
                    None,
                    StoreErrorKind::Corrupt,
                    format!("account {}: bad key ({e})", self.store_key),
                )
                .with_source(e)
            })
    }

    async fn save(&self, store: &dyn Store) -> Result<()> {
        let bytes = serde_json::to_vec(&self.json).map_err(|e| {
            Error::store(
                None,
                StoreErrorKind::Encode,
                format!("cannot encode account: {e}"),
            )
            .with_source(e)
        })?;
        store.save_account(&self.store_key, &bytes).await
    }
}

/// The contacts an account is registered with, as stored next to its credentials.
pub(crate) fn contacts_for(config: &AcmeConfig) -> Vec<String> {
    config.email.iter().map(|e| format!("mailto:{e}")).collect()
}

/// Adds lobe-tls's own fields to freshly created credentials.
pub(crate) fn with_contacts(
    credentials: &AccountCredentials,
    contacts: &[String],
) -> Result<Vec<u8>> {
    let mut json = serde_json::to_value(credentials).map_err(|e| {
        Error::store(
            None,
            StoreErrorKind::Encode,
            format!("cannot encode account: {e}"),
        )
        .with_source(e)
    })?;
    if let Some(object) = json.as_object_mut() {
        object.insert("contact".into(), serde_json::json!(contacts));
    }
    serde_json::to_vec(&json).map_err(|e| {
        Error::store(
            None,
            StoreErrorKind::Encode,
            format!("cannot encode account: {e}"),
        )
        .with_source(e)
    })
}

fn http_client(config: &AcmeConfig) -> Result<http::BoundedClient> {
    let roots = crate::net::root_store(config.directory_ca.as_deref())?;
    Ok(http::BoundedClient::new(
        crate::net::http_client(roots)?,
        config.request_timeout,
    ))
}

fn unreachable(config: &AcmeConfig, e: instant_acme::Error) -> Error {
    match e {
        instant_acme::Error::Api(_) => acme_error("the CA refused", e),
        e => Error::ca_unavailable(format!(
            "cannot reach the ACME directory {}: {}; check --directory, --directory-ca and that the CA is up",
            config.directory,
            error_chain(&e)
        ))
        .with_source(e),
    }
}

/// The key type of a PKCS#8 key, from its curve's OID.
fn key_type(pkcs8: &[u8]) -> &'static str {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    let has = |oid: &[u8]| pkcs8.windows(oid.len()).any(|w| w == oid);
    if has(P256) {
        "ecdsa-p256"
    } else if has(P384) {
        "ecdsa-p384"
    } else {
        "unknown"
    }
}

/// The stored account for `config`'s directory and email, with its status at the CA.
///
/// The status comes from asking the CA for the account by its key (`onlyReturnExisting`):
/// `valid` when it answers with the account, `deactivated` when it was deactivated here
/// or the CA refuses the key, otherwise what the CA said.
pub async fn show(config: &AcmeConfig, store: &dyn Store) -> Result<AccountInfo> {
    let stored = Stored::load(config, store).await?;
    let pkcs8 = stored.pkcs8()?;
    let contacts = match stored.json.get("contact").and_then(|c| c.as_array()) {
        Some(list) => list
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect(),
        None => contacts_for(config),
    };
    let status = if stored.json.get("status").and_then(|s| s.as_str()) == Some("deactivated") {
        "deactivated".to_owned()
    } else {
        status_at_ca(config, &pkcs8).await?
    };
    Ok(AccountInfo {
        directory: config.directory.clone(),
        store_key: stored.store_key.clone(),
        url: stored.url(),
        contacts,
        status,
        key_type: key_type(&pkcs8).to_owned(),
    })
}

async fn status_at_ca(config: &AcmeConfig, pkcs8: &[u8]) -> Result<String> {
    let der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    let key = Key::from_pkcs8_der(der.clone_key()).map_err(|e| {
        Error::store(
            None,
            StoreErrorKind::Corrupt,
            format!("the account key is unusable: {e}"),
        )
        .with_source(e)
    })?;
    let found = Account::builder_with_http(Box::new(http_client(config)?))
        .from_key((key, PrivateKeyDer::Pkcs8(der)), config.directory.clone())
        .await;
    Ok(match found {
        Ok(_) => "valid".to_owned(),
        Err(instant_acme::Error::Api(problem)) => {
            let kind = problem.r#type.as_deref().unwrap_or_default();
            if kind.ends_with(":unauthorized") {
                "deactivated".to_owned()
            } else if kind.ends_with(":accountDoesNotExist") {
                "unknown to the CA".to_owned()
            } else {
                format!("refused: {}", super::problem_text(&problem))
            }
        }
        Err(e) => return Err(unreachable(config, e)),
    })
}

/// Replaces the account's key with a new one at the CA (`keyChange`) and stores it.
///
/// The new credentials are written the moment the CA accepts the change, in one atomic
/// write (file store: a private temporary file renamed over the old one, 0600; Redis: one
/// SET), so the stored key is always one the CA knows, except for a crash in the instant
/// between the CA's answer and that write.
pub async fn rollover(config: &AcmeConfig, store: &dyn Store) -> Result<AccountInfo> {
    let mut stored = Stored::load(config, store).await?;
    let credentials = stored.credentials()?;
    let mut account = Account::builder_with_http(Box::new(http_client(config)?))
        .from_credentials(credentials)
        .await
        .map_err(|e| unreachable(config, e))?;
    let fresh = account
        .update_key()
        .await
        .map_err(|e| acme_error("the CA refused the key change", e))?;
    let fresh = serde_json::to_value(&fresh).map_err(|e| {
        Error::store(
            None,
            StoreErrorKind::Encode,
            format!("cannot encode account: {e}"),
        )
        .with_source(e)
    })?;
    if let serde_json::Value::Object(fields) = fresh {
        for (name, value) in fields {
            stored.json.insert(name, value);
        }
    }
    stored.save(store).await.map_err(|e| {
        Error::store(None, StoreErrorKind::Write, format!(
            "the CA switched the account to a new key but storing it failed ({e}); the account is lost, register a new one"
        )).with_source(e)
    })?;
    tracing::info!(directory = %config.directory, "rolled the account key over");
    show(config, store).await
}

/// Deactivates the account at the CA. The CA refuses every later request signed with
/// its key; the stored account is kept, marked `deactivated`, for the record.
pub async fn deactivate(config: &AcmeConfig, store: &dyn Store) -> Result<AccountInfo> {
    let mut stored = Stored::load(config, store).await?;
    let credentials = stored.credentials()?;
    let account = Account::builder_with_http(Box::new(http_client(config)?))
        .from_credentials(credentials)
        .await
        .map_err(|e| unreachable(config, e))?;
    account
        .deactivate()
        .await
        .map_err(|e| acme_error("the CA refused to deactivate the account", e))?;
    stored
        .json
        .insert("status".into(), serde_json::json!("deactivated"));
    stored.save(store).await?;
    tracing::info!(directory = %config.directory, "deactivated the account");
    let pkcs8 = stored.pkcs8()?;
    Ok(AccountInfo {
        directory: config.directory.clone(),
        store_key: stored.store_key.clone(),
        url: stored.url(),
        contacts: contacts_for(config),
        status: "deactivated".into(),
        key_type: key_type(&pkcs8).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_come_from_the_curve() {
        let (_, der) = Key::generate_pkcs8().unwrap();
        assert_eq!(key_type(der.secret_pkcs8_der()), "ecdsa-p256");
        assert_eq!(key_type(b"nothing"), "unknown");
    }
}
