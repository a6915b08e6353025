//! Provider settings and secrets, read at run time from environment variables or from a
//! TOML file, so that no secret has to sit on a command line (where `ps` shows it) or in
//! the store's metadata.
//!
//! The file has one table per provider:
//!
//! ```toml
//! [rfc2136]
//! nameserver = "ns1.example.com:53"
//! tsig_key = "acme-update"
//! tsig_algorithm = "hmac-sha256"
//! tsig_secret = "base64..."        # or tsig_file = "/etc/lobe-tls/acme-update.key"
//!
//! [cloudflare]
//! api_token = "..."
//!
//! [httpreq]
//! endpoint = "https://dns-hook.internal/acme"
//! username = "lobe"
//! password = "..."
//! ```
//!
//! An environment variable wins over the file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Settings for one provider: a table of the config file plus the environment.
#[derive(Clone)]
pub struct ProviderSettings {
    provider: &'static str,
    file: Option<PathBuf>,
    table: toml::Table,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.table.keys().collect();
        f.debug_struct("ProviderSettings")
            .field("provider", &self.provider)
            .field("file", &self.file)
            .field("keys", &keys)
            .finish()
    }
}

impl ProviderSettings {
    /// Reads the `[provider]` table of `file`, if a file is given.
    pub fn load(provider: &'static str, file: Option<&Path>) -> Result<Self> {
        let table = match file {
            None => toml::Table::new(),
            Some(path) => {
                warn_if_readable_by_others(path);
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                    Error::config(format!(
                        "{}: not valid TOML: {}",
                        path.display(),
                        e.message()
                    ))
                    .with_source(e)
                })?;
                match doc.remove(provider) {
                    None => toml::Table::new(),
                    Some(toml::Value::Table(t)) => t,
                    Some(_) => {
                        return Err(Error::config(format!(
                            "{}: `{provider}` must be a table ([{provider}])",
                            path.display()
                        )));
                    }
                }
            }
        };
        Ok(ProviderSettings {
            provider,
            file: file.map(Path::to_path_buf),
            table,
        })
    }

    /// The setting from env var `env`, else key `key` of the file's table.
    pub fn get(&self, env: &str, key: &str) -> Result<Option<String>> {
        if let Ok(value) = std::env::var(env)
            && !value.is_empty()
        {
            return Ok(Some(value));
        }
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
            Some(_) => Err(Error::config_key(
                key,
                format!(
                    "{}: [{}] {key} must be a string",
                    self.file_name(),
                    self.provider
                ),
            )),
        }
    }

    /// Like [`get`](Self::get), but missing is an error that says where to set it.
    pub fn require(&self, env: &str, key: &str) -> Result<String> {
        self.get(env, key)?.ok_or_else(|| self.missing(env, key))
    }

    /// The error for a missing setting.
    pub fn missing(&self, env: &str, key: &str) -> Error {
        Error::config_key(
            env,
            format!(
                "{} needs {env}, or `{key}` under [{}] in the --config file",
                self.provider, self.provider
            ),
        )
    }

    fn file_name(&self) -> String {
        self.file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config file".into())
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o044 != 0
    {
        tracing::warn!(
            "{} is readable by other users and may hold secrets; chmod 600 it",
            path.display()
        );
    }
}
