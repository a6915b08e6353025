//! Moving in from other ACME clients: certbot's configuration directory, Caddy's file
//! storage and Traefik's `acme.json`.
//!
//! Each source module only reads: it turns what it finds into [`Found`] (certificates
//! with the settings a renewal needs, ACME accounts, and the entries it had to skip with
//! a reason). [`apply`] then writes them to any [`Store`], or with
//! [`ImportOptions::dry_run`] only says what it would do. Certificates are stored as
//! they are (same serial, same key); the sources' files are never changed.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::cert::{CertBundle, KeyType};
use crate::challenge::{ChallengeConfig, ChallengeKind, DnsProviderConfig};
use crate::error::{CertificateErrorKind, Error, Result};
use crate::store::{CertMeta, RenewalState, Store, StoredCert};

pub mod caddy;
pub mod certbot;
mod keys;
pub mod traefik;

/// The largest PEM, JSON or configuration file read from a source.
const MAX_FILE: u64 = 1 << 20;

/// What a source holds, as read: nothing has been written yet.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Found {
    /// The certificates that can be imported.
    pub certs: Vec<FoundCert>,
    /// The ACME accounts that can be imported.
    pub accounts: Vec<FoundAccount>,
    /// The entries that cannot, each with its reason.
    pub skipped: Vec<Skipped>,
}

/// A certificate read from a source, with the settings its renewals will use.
#[derive(Debug)]
#[non_exhaustive]
pub struct FoundCert {
    /// Where it came from, e.g. `renewal/example.com.conf`.
    pub source: String,
    /// The certificate and its metadata, ready to store.
    pub cert: StoredCert,
    /// What the user should know, e.g. a DNS provider that needs a setting.
    pub notes: Vec<String>,
}

/// An ACME account read from a source, as the credentials lobe-tls stores.
#[non_exhaustive]
pub struct FoundAccount {
    /// Where it came from.
    pub source: String,
    /// The CA's directory URL.
    pub directory: String,
    /// The account's contact address, if it has one.
    pub email: Option<String>,
    /// The account URL at the CA.
    pub url: String,
    credentials: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for FoundAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FoundAccount")
            .field("source", &self.source)
            .field("directory", &self.directory)
            .field("email", &self.email)
            .field("url", &self.url)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

/// What kind of entry a report line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EntryKind {
    /// A certificate with its key.
    Certificate,
    /// An ACME account.
    Account,
}

/// An entry of a source that cannot be imported.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Skipped {
    /// Where it is.
    pub source: String,
    /// What it is.
    pub kind: EntryKind,
    /// Why it is skipped, one line.
    pub reason: String,
}

impl Found {
    pub(crate) fn skip(
        &mut self,
        kind: EntryKind,
        source: impl Into<String>,
        reason: impl fmt::Display,
    ) {
        let reason = reason
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        self.skipped.push(Skipped {
            source: source.into(),
            kind,
            reason,
        });
    }
}

/// How [`apply`] writes.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Only report what would happen.
    pub dry_run: bool,
    /// Overwrite certificates and accounts already in the store.
    pub replace: bool,
}

impl ImportOptions {
    /// Writes, without replacing anything.
    pub fn new() -> Self {
        ImportOptions::default()
    }

    /// Sets [`ImportOptions::dry_run`].
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets [`ImportOptions::replace`].
    pub fn replace(mut self, replace: bool) -> Self {
        self.replace = replace;
        self
    }
}

/// What happened to one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ImportResult {
    /// Stored; nothing was there.
    Imported,
    /// Stored over what was there (`--replace`).
    Replaced,
    /// Would be stored (dry run).
    WouldImport,
    /// Would be stored over what is there (dry run with `--replace`).
    WouldReplace,
    /// Left alone: the store already has an entry by that name.
    Exists,
    /// Not imported; see the reason.
    Skipped,
}

impl ImportResult {
    /// The word the CLI prints.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportResult::Imported => "imported",
            ImportResult::Replaced => "replaced",
            ImportResult::WouldImport => "would-import",
            ImportResult::WouldReplace => "would-replace",
            ImportResult::Exists => "exists",
            ImportResult::Skipped => "skipped",
        }
    }
}

/// One line of the import report.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct ImportEntry {
    /// Certificate or account.
    pub kind: EntryKind,
    /// Where it came from in the source.
    pub source: String,
    /// What happened.
    pub result: ImportResult,
    /// The name in the store (the certificate's, or the account's store key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The certificate's names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// The certificate's serial, lower-case hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// How renewals will validate, e.g. `http-01 webroot /var/www`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    /// The CA's directory URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Why it was skipped or left alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the user should know.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl ImportEntry {
    fn new(kind: EntryKind, source: &str, result: ImportResult) -> Self {
        ImportEntry {
            kind,
            source: source.to_owned(),
            result,
            name: None,
            domains: Vec::new(),
            serial: None,
            challenge: None,
            directory: None,
            reason: None,
            notes: Vec::new(),
        }
    }
}

/// How a challenge configuration reads in a report.
pub fn describe_challenge(challenge: &ChallengeConfig) -> String {
    match challenge.kind {
        ChallengeKind::Http01 => match (&challenge.http_webroot, &challenge.http_listen) {
            (Some(dir), _) => format!("http-01 webroot {}", dir.display()),
            (None, Some(addr)) => format!("http-01 on {addr}"),
            (None, None) => "http-01".into(),
        },
        ChallengeKind::Dns01 => match challenge.dns.as_ref().map(|d| &d.provider) {
            Some(DnsProviderConfig::Rfc2136 { .. }) => "dns-01 rfc2136".into(),
            Some(DnsProviderConfig::Cloudflare { .. }) => "dns-01 cloudflare".into(),
            Some(DnsProviderConfig::Httpreq { .. }) => "dns-01 httpreq".into(),
            Some(DnsProviderConfig::Exec { .. }) => "dns-01 exec".into(),
            _ => "dns-01".into(),
        },
        other => other.to_string(),
    }
}

/// Stores what `found` holds (or with `dry_run`, says what it would store), entry by
/// entry: one that cannot be stored is reported and the others go on. Certificates are
/// named by the store's rule ([`crate::domain::store_name`]); when two entries of a source
/// get the same name, the one valid longest wins.
pub async fn apply(found: Found, store: &dyn Store, options: ImportOptions) -> Vec<ImportEntry> {
    run(found, Some(store), options).await
}

/// What [`apply`] with [`ImportOptions::dry_run`] would report for a store that does not
/// exist yet (a directory not created), without creating it: every entry is new.
pub async fn preview_into_empty(found: Found) -> Vec<ImportEntry> {
    run(found, None, ImportOptions::new().dry_run(true)).await
}

async fn run(found: Found, store: Option<&dyn Store>, options: ImportOptions) -> Vec<ImportEntry> {
    let mut report = Vec::new();
    let mut certs = found.certs;
    certs.sort_by_key(|c| std::cmp::Reverse(c.cert.bundle.info().map(|i| i.not_after).ok()));
    let mut taken = HashSet::new();
    for found in certs {
        report.push(apply_cert(found, store, options, &mut taken).await);
    }
    for account in found.accounts {
        report.extend(apply_account(account, store, options).await);
    }
    for skipped in found.skipped {
        let mut entry = ImportEntry::new(skipped.kind, &skipped.source, ImportResult::Skipped);
        entry.reason = Some(skipped.reason);
        report.push(entry);
    }
    report
}

async fn apply_cert(
    found: FoundCert,
    store: Option<&dyn Store>,
    options: ImportOptions,
    taken: &mut HashSet<String>,
) -> ImportEntry {
    let FoundCert {
        source,
        cert,
        notes,
    } = found;
    let mut entry = ImportEntry::new(EntryKind::Certificate, &source, ImportResult::Skipped);
    entry.name = Some(cert.meta.name.clone());
    entry.domains = cert.meta.domains.iter().map(|d| d.to_string()).collect();
    entry.serial = cert.bundle.info().ok().map(|i| i.serial);
    entry.challenge = Some(describe_challenge(&cert.meta.challenge));
    entry.directory = Some(cert.meta.directory.clone());
    entry.notes = notes;
    let name = cert.meta.name.clone();
    if let Err(e) = crate::store::fs::check_name(&name) {
        entry.reason = Some(e.to_string());
        return entry;
    }
    if !taken.insert(name.clone()) {
        entry.reason = Some(format!(
            "another entry of this source has the store name {name:?} and is valid longer"
        ));
        return entry;
    }
    let Some(store) = store else {
        entry.result = ImportResult::WouldImport;
        return entry;
    };
    let existing = match store.load_cert(&name).await {
        Ok(existing) => existing.is_some(),
        // Something unreadable is there: it is not overwritten without --replace either.
        Err(_) => true,
    };
    if existing && !options.replace {
        entry.result = ImportResult::Exists;
        entry.reason = Some(format!(
            "the store already has a certificate named {name:?}; --replace overwrites it"
        ));
        return entry;
    }
    if options.dry_run {
        entry.result = if existing {
            ImportResult::WouldReplace
        } else {
            ImportResult::WouldImport
        };
        return entry;
    }
    if let Err(e) = store.save_cert(&cert).await {
        entry.reason = Some(one_line(&e.to_string()));
        return entry;
    }
    // Backoff and ARI answers were about the certificate this one replaces.
    if let Err(e) = store
        .save_renewal_state(&name, &RenewalState::default())
        .await
    {
        tracing::warn!(cert = %name, error = %e, "cannot reset renewal state");
    }
    entry.result = if existing {
        ImportResult::Replaced
    } else {
        ImportResult::Imported
    };
    entry
}

/// Stores the account under the key a renewal without `--email` looks up, and with its
/// contact address under the key `--email ADDRESS` looks up.
async fn apply_account(
    account: FoundAccount,
    store: Option<&dyn Store>,
    options: ImportOptions,
) -> Vec<ImportEntry> {
    let mut keys = vec![crate::acme::account_key(&account.directory, None)];
    if let Some(email) = &account.email {
        keys.push(crate::acme::account_key(&account.directory, Some(email)));
    }
    let mut out = Vec::new();
    for key in keys {
        let mut entry =
            ImportEntry::new(EntryKind::Account, &account.source, ImportResult::Skipped);
        entry.name = Some(key.clone());
        entry.directory = Some(account.directory.clone());
        let Some(store) = store else {
            entry.result = ImportResult::WouldImport;
            out.push(entry);
            continue;
        };
        let existing = match store.load_account(&key).await {
            Ok(existing) => existing.is_some(),
            Err(_) => true,
        };
        entry.result = match (existing, options.replace, options.dry_run) {
            (true, false, _) => {
                entry.reason = Some(format!(
                    "the store already has the account {key}; --replace overwrites it"
                ));
                ImportResult::Exists
            }
            (true, true, true) => ImportResult::WouldReplace,
            (false, _, true) => ImportResult::WouldImport,
            (existing, _, false) => match store.save_account(&key, &account.credentials).await {
                Ok(()) if existing => ImportResult::Replaced,
                Ok(()) => ImportResult::Imported,
                Err(e) => {
                    entry.reason = Some(one_line(&e.to_string()));
                    ImportResult::Skipped
                }
            },
        };
        out.push(entry);
    }
    out
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Builds the certificate to store from a source's PEM chain and key. The key must
/// match; the names are the certificate's DNS names, `required` (which the source lists)
/// first and in their order, then `first_hint` if the certificate has it.
pub(crate) fn make_cert(
    fullchain_pem: String,
    key_pem: String,
    required: &[String],
    first_hint: Option<&str>,
    key_type: Option<KeyType>,
    challenge: ChallengeConfig,
    directory: String,
) -> Result<StoredCert> {
    let bundle = CertBundle::from_pem(fullchain_pem, key_pem)?;
    bundle.check_key()?;
    let info = bundle.info()?;
    let mut names: Vec<String> = Vec::new();
    for name in required {
        let name = name.to_ascii_lowercase();
        if !info.domains.contains(&name) {
            return Err(Error::certificate(
                CertificateErrorKind::NamesNotCovered,
                format!("the certificate does not cover {name}, which the source lists"),
            ));
        }
        names.push(name);
    }
    if let Some(hint) = first_hint.map(str::to_ascii_lowercase)
        && names.is_empty()
        && info.domains.contains(&hint)
    {
        names.push(hint);
    }
    for name in &info.domains {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        return Err(Error::certificate(
            CertificateErrorKind::NamesNotCovered,
            "the certificate has no DNS name in its subject alternative names",
        ));
    }
    let domains = crate::domain::parse_all(&names)?;
    let meta = CertMeta {
        name: crate::domain::store_name(&domains),
        key_type: key_type.or(info.key_type).unwrap_or_default(),
        domains,
        challenge,
        directory,
        profile: None,
        issued_at: time::OffsetDateTime::now_utc(),
    };
    Ok(StoredCert { bundle, meta })
}

/// Reads a source file of at most `max` bytes as UTF-8.
pub(crate) fn read_text(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > max {
        return Err(Error::config(format!(
            "{}: larger than {max} bytes; not a file lobe-tls imports",
            path.display()
        )));
    }
    Ok(text)
}

/// [`read_text`] for PEM, JSON and configuration files.
pub(crate) fn read_small(path: &Path) -> Result<String> {
    read_text(path, MAX_FILE)
}

/// The default challenge of an imported certificate whose source says nothing lobe-tls
/// can use: HTTP-01 on port 80, as `lobe-tls issue` does by default.
pub(crate) fn default_challenge() -> ChallengeConfig {
    ChallengeConfig::http01(Some("0.0.0.0:80".into()))
}
