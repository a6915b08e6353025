//! Fallback CAs from the `--config` TOML file: one `[[ca]]` table per CA, for what differs
//! from CA to CA (EAB credentials, a trust root).
//!
//! ```toml
//! [[ca]]
//! directory = "https://acme.zerossl.com/v2/DV90"
//! eab_kid = "kid-from-the-ca"
//! eab_hmac_key_env = "ZEROSSL_EAB_HMAC_KEY"  # the variable holding the key; or
//! # eab_hmac_key = "base64url..."          # the key itself (keep the file 0600)
//! # directory_ca = "/etc/lobe-tls/private-ca.pem"
//! # email = "ops@example.com"              # default: --email
//! ```
//!
//! With `--fallback-directory URL` (repeatable), those URLs are the fallbacks, in that
//! order, each taking its settings from the table with the same `directory`, if any.
//! Without it, every `[[ca]]` table is a fallback, in file order.

use std::path::{Path, PathBuf};

use super::{AcmeConfig, Eab, resolve_directory};
use crate::error::{Error, Result};

/// The fallbacks for `primary`: `directories` (resolved, in order) with their `[[ca]]`
/// settings from `file`, or every `[[ca]]` table when `directories` is empty. Each
/// inherits the primary's email, timeouts, CAA settings and trust root unless its table
/// says otherwise; never its EAB, which belongs to one CA.
pub fn fallbacks_from(
    primary: &AcmeConfig,
    directories: &[String],
    file: Option<&Path>,
) -> Result<Vec<AcmeConfig>> {
    let tables = match file {
        Some(path) => read_tables(path)?,
        None => Vec::new(),
    };
    let mut fallbacks = Vec::new();
    if directories.is_empty() {
        for table in &tables {
            fallbacks.push(table.config(primary)?);
        }
    } else {
        for directory in directories {
            let directory = resolve_directory(directory.trim())?;
            let table = tables.iter().find(|t| t.directory == directory);
            fallbacks.push(match table {
                Some(table) => table.config(primary)?,
                None => CaTable::bare(directory).config(primary)?,
            });
        }
    }
    if let Some(same) = fallbacks.iter().find(|f| f.directory == primary.directory) {
        return Err(Error::config(format!(
            "the fallback CA {} is the primary --directory; give another CA",
            same.directory
        )));
    }
    Ok(fallbacks)
}

#[derive(Debug)]
struct CaTable {
    directory: String,
    directory_ca: Option<PathBuf>,
    email: Option<String>,
    eab_kid: Option<String>,
    /// The key itself or the variable it is in; resolved only when used.
    eab_hmac_key: Option<String>,
    eab_hmac_key_env: Option<String>,
    origin: String,
}

impl CaTable {
    fn bare(directory: String) -> Self {
        CaTable {
            origin: format!("--fallback-directory {directory}"),
            directory,
            directory_ca: None,
            email: None,
            eab_kid: None,
            eab_hmac_key: None,
            eab_hmac_key_env: None,
        }
    }

    fn config(&self, primary: &AcmeConfig) -> Result<AcmeConfig> {
        let mut config = primary.clone();
        config.fallbacks.clear();
        config.directory = self.directory.clone();
        if self.directory_ca.is_some() {
            config.directory_ca = self.directory_ca.clone();
        }
        if self.email.is_some() {
            config.email = self.email.clone();
        }
        // The CA's identity is its own: never the primary's override.
        config.caa.identities.clear();
        let hmac = match (&self.eab_hmac_key, &self.eab_hmac_key_env) {
            (Some(key), _) => Some(key.clone()),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                Error::config_key(
                    "eab_hmac_key_env",
                    format!(
                        "{}: eab_hmac_key_env names {var}, which is not set",
                        self.origin
                    ),
                )
            })?),
            (None, None) => None,
        };
        config.eab = match (&self.eab_kid, hmac) {
            (Some(kid), Some(hmac_key_b64)) => Some(Eab {
                kid: kid.clone(),
                hmac_key_b64,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::config(format!(
                    "{}: eab_kid and eab_hmac_key (or eab_hmac_key_env) go together",
                    self.origin
                )));
            }
        };
        Ok(config)
    }
}

fn read_tables(path: &Path) -> Result<Vec<CaTable>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::config(format!(
            "{}: not valid TOML: {}",
            path.display(),
            e.message()
        ))
        .with_source(e)
    })?;
    let Some(cas) = doc.get("ca") else {
        return Ok(Vec::new());
    };
    let cas = cas.as_array().ok_or_else(|| {
        Error::config(format!(
            "{}: `ca` must be an array of tables ([[ca]])",
            path.display()
        ))
    })?;
    let mut tables = Vec::new();
    for (index, ca) in cas.iter().enumerate() {
        let origin = format!("{}: [[ca]] number {}", path.display(), index + 1);
        let table = ca
            .as_table()
            .ok_or_else(|| Error::config(format!("{origin} is not a table")))?;
        for key in table.keys() {
            if ![
                "directory",
                "directory_ca",
                "email",
                "eab_kid",
                "eab_hmac_key",
                "eab_hmac_key_env",
            ]
            .contains(&key.as_str())
            {
                return Err(Error::config_key(
                    key.as_str(),
                    format!("{origin}: unknown key `{key}`"),
                ));
            }
        }
        // Values are never echoed: one of them is a secret.
        let get = |key: &str| -> Result<Option<String>> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::config_key(
                    key,
                    format!("{origin}: `{key}` must be a string"),
                )),
            }
        };
        let directory = get("directory")?
            .ok_or_else(|| Error::config_key("directory", format!("{origin} needs `directory`")))?;
        tables.push(CaTable {
            directory: resolve_directory(&directory)?,
            directory_ca: get("directory_ca")?.map(PathBuf::from),
            email: get("email")?,
            eab_kid: get("eab_kid")?,
            eab_hmac_key: get("eab_hmac_key")?,
            eab_hmac_key_env: get("eab_hmac_key_env")?,
            origin,
        });
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn flags_pick_the_order_and_tables_give_the_settings() {
        let file = write(
            "[[ca]]\ndirectory = \"https://b.test/dir\"\neab_kid = \"kid\"\neab_hmac_key = \"c2VjcmV0\"\ndirectory_ca = \"/b.pem\"\n\n[[ca]]\ndirectory = \"https://c.test/dir\"\n",
        );
        let mut primary = AcmeConfig::new("https://a.test/dir");
        primary.email = Some("ops@example.com".into());
        primary.directory_ca = Some("/a.pem".into());
        let flags = [
            "https://c.test/dir".to_owned(),
            "https://b.test/dir".to_owned(),
        ];
        let fallbacks = fallbacks_from(&primary, &flags, Some(file.path())).unwrap();
        assert_eq!(fallbacks.len(), 2);
        assert_eq!(fallbacks[0].directory, "https://c.test/dir");
        assert_eq!(
            fallbacks[0].directory_ca.as_deref(),
            Some(Path::new("/a.pem"))
        );
        assert!(fallbacks[0].eab.is_none());
        assert_eq!(fallbacks[1].eab.as_ref().unwrap().kid, "kid");
        assert_eq!(
            fallbacks[1].directory_ca.as_deref(),
            Some(Path::new("/b.pem"))
        );
        assert_eq!(fallbacks[1].email.as_deref(), Some("ops@example.com"));
        // Without flags, every table in file order.
        let all = fallbacks_from(&primary, &[], Some(file.path())).unwrap();
        assert_eq!(all[0].directory, "https://b.test/dir");
    }

    #[test]
    fn errors_name_the_table_but_never_the_secret() {
        let file =
            write("[[ca]]\ndirectory = \"https://b.test/dir\"\neab_hmac_key = \"c2VjcmV0\"\n");
        let err = fallbacks_from(
            &AcmeConfig::new("https://a.test/dir"),
            &[],
            Some(file.path()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[[ca]] number 1") && err.contains("eab_kid"),
            "{err}"
        );
        assert!(!err.contains("c2VjcmV0"), "{err}");
        let file = write(
            "[[ca]]\ndirectory = \"https://b.test/dir\"\neab_kid = \"k\"\neab_hmac_key_env = \"LOBE_TLS_TEST_UNSET_VAR\"\n",
        );
        let err = fallbacks_from(
            &AcmeConfig::new("https://a.test/dir"),
            &[],
            Some(file.path()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("LOBE_TLS_TEST_UNSET_VAR"), "{err}");
        let same = ["https://a.test/dir".to_owned()];
        assert!(fallbacks_from(&AcmeConfig::new("https://a.test/dir"), &same, None).is_err());
    }
}
