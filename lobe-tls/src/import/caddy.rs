//! Caddy's file storage (certmagic's layout): certificates under
//! `certificates/<issuer>/<name>/<name>.{crt,key,json}`, ACME accounts under
//! `acme/<issuer>/users/<email>/<user>.{json,key}`. `<issuer>` is the CA's directory URL
//! without its scheme, `/` and `:` turned into `-`; the certificate's `.json` names the
//! directory itself (`issuer_data.ca`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{EntryKind, Found, FoundCert, default_challenge, keys, make_cert, read_small};
use crate::error::{Error, Result};

/// The most issuers, certificates per issuer, or users read.
const MAX_ENTRIES: usize = 10_000;

/// Directories of the CAs Caddy uses by default, by their storage name.
const KNOWN_CAS: [(&str, &str); 3] = [
    (
        "acme-v02.api.letsencrypt.org-directory",
        crate::acme::LETSENCRYPT,
    ),
    (
        "acme-staging-v02.api.letsencrypt.org-directory",
        crate::acme::LETSENCRYPT_STAGING,
    ),
    (
        "acme.zerossl.com-v2-DV90",
        "https://acme.zerossl.com/v2/DV90",
    ),
];

/// certmagic's storage name of a CA directory URL.
fn issuer_key(directory: &str) -> String {
    directory
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .replace(['/', ':'], "-")
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .take(MAX_ENTRIES)
        .collect();
    out.sort();
    out
}

/// Reads Caddy's storage directory `dir` (the one holding `certificates/` and `acme/`,
/// e.g. `~/.local/share/caddy`). Fails only when `dir` has neither.
pub fn read(dir: &Path) -> Result<Found> {
    let certificates = dir.join("certificates");
    let acme = dir.join("acme");
    if !certificates.is_dir() && !acme.is_dir() {
        return Err(Error::config(format!(
            "{}: no certificates/ or acme/ directory; give Caddy's storage directory (e.g. ~/.local/share/caddy or /var/lib/caddy/.local/share/caddy)",
            dir.display()
        )));
    }
    let mut found = Found::default();
    let mut directories: BTreeMap<String, String> = KNOWN_CAS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (issuer, issuer_dir) in subdirs(&certificates) {
        for (name, cert_dir) in subdirs(&issuer_dir) {
            let source = format!("certificates/{issuer}/{name}");
            match read_cert(&cert_dir, &name, &issuer, &directories) {
                Ok(cert) => {
                    directories
                        .entry(issuer_key(&cert.meta.directory))
                        .or_insert_with(|| cert.meta.directory.clone());
                    found.certs.push(FoundCert {
                        source,
                        cert,
                        notes: Vec::new(),
                    });
                }
                Err(e) => found.skip(EntryKind::Certificate, source, e),
            }
        }
    }
    for (issuer, issuer_dir) in subdirs(&acme) {
        for (email, user_dir) in subdirs(&issuer_dir.join("users")) {
            let source = format!("acme/{issuer}/users/{email}");
            let account = match directories.get(&issuer) {
                Some(directory) => read_account(&user_dir, &email, directory, &source),
                None => Err(Error::config(format!(
                    "no certificate of this storage names the directory URL of CA {issuer}"
                ))),
            };
            match account {
                Ok(account) => found.accounts.push(account),
                Err(e) => found.skip(EntryKind::Account, source, e),
            }
        }
    }
    Ok(found)
}

#[derive(serde::Deserialize)]
struct CertJson {
    #[serde(default)]
    sans: Vec<String>,
    #[serde(default)]
    issuer_data: Option<IssuerData>,
}

#[derive(serde::Deserialize)]
struct IssuerData {
    #[serde(default)]
    ca: Option<String>,
}

fn read_cert(
    dir: &Path,
    name: &str,
    issuer: &str,
    directories: &BTreeMap<String, String>,
) -> Result<crate::store::StoredCert> {
    let meta: CertJson = serde_json::from_str(&read_small(&dir.join(format!("{name}.json")))?)
        .map_err(|e| Error::config(format!("{name}.json: {e}")))?;
    let directory = match meta.issuer_data.and_then(|d| d.ca) {
        Some(ca) => ca,
        None => directories.get(issuer).cloned().ok_or_else(|| {
            Error::config(format!(
                "{name}.json names no CA (issuer_data.ca) and {issuer} is not a CA lobe-tls knows"
            ))
        })?,
    };
    let fullchain = read_small(&dir.join(format!("{name}.crt")))?;
    let key = read_small(&dir.join(format!("{name}.key")))?;
    // Caddy answers challenges itself; lobe-tls takes over with HTTP-01 on port 80.
    make_cert(
        fullchain,
        key,
        &meta.sans,
        None,
        None,
        default_challenge(),
        directory,
    )
}

#[derive(serde::Deserialize)]
struct UserJson {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    contact: Vec<String>,
    #[serde(default)]
    location: Option<String>,
}

fn read_account(
    dir: &Path,
    email_dir: &str,
    directory: &str,
    source: &str,
) -> Result<super::FoundAccount> {
    // certmagic names the files after the address's local part (`me.json`, `me.key`).
    let mut jsons: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .take(MAX_ENTRIES)
        .collect();
    jsons.sort();
    let json = jsons
        .first()
        .ok_or_else(|| Error::config("no account .json file"))?;
    let user: UserJson = serde_json::from_str(&read_small(json)?)
        .map_err(|e| Error::config(format!("{}: {e}", json.display())))?;
    if let Some(status) = user.status.as_deref().filter(|s| *s != "valid") {
        return Err(Error::config(format!("the account's status is {status}")));
    }
    let url = user
        .location
        .ok_or_else(|| Error::config("the account has no location (URL)"))?;
    let key = zeroize::Zeroizing::new(read_small(&json.with_extension("key"))?);
    let pkcs8 = keys::p256_pkcs8_from_pem(&key)?;
    let email = user
        .contact
        .iter()
        .find_map(|c| c.strip_prefix("mailto:"))
        .map(str::to_owned)
        .or_else(|| (email_dir.contains('@')).then(|| email_dir.to_owned()));
    keys::account(source.to_owned(), directory.to_owned(), email, url, &pkcs8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_keys_match_caddys_directory_names() {
        assert_eq!(
            issuer_key("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
        assert_eq!(
            issuer_key(crate::acme::LETSENCRYPT),
            "acme-v02.api.letsencrypt.org-directory"
        );
    }
}
