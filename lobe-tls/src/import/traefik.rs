//! Traefik's `acme.json` (v2 and v3): one object per certificate resolver, each with
//! its `Account` (`Email`, `Registration{body,uri}`, `PrivateKey` as base64 DER,
//! `KeyType`) and `Certificates` (`domain{main,sans}`, base64 PEM `certificate` and
//! `key`, `Store`).
//!
//! The file is read as a stream: a file cut short (a crash mid-write) still yields the
//! resolvers and certificates that came before the cut, and a damaged certificate entry
//! skips only itself.

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{EntryKind, Found, FoundCert, default_challenge, keys, make_cert, read_text};
use crate::error::{CertificateErrorKind, Error, Result};

/// The largest `acme.json` read (Traefik keeps every certificate in it).
const MAX_ACME_JSON: u64 = 64 << 20;

/// What the stream gave, entry by entry, until the end or the first syntax error.
#[derive(Default)]
struct Collected {
    /// (resolver, account JSON)
    accounts: Vec<(String, serde_json::Value)>,
    /// (resolver, index, certificate JSON)
    certs: Vec<(String, usize, serde_json::Value)>,
}

struct FileSeed<'a>(&'a mut Collected);
struct ResolverSeed<'a> {
    collected: &'a mut Collected,
    name: String,
}
struct CertsSeed<'a> {
    collected: &'a mut Collected,
    name: String,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of certificate resolvers")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            map.next_value_seed(ResolverSeed {
                collected: self.0,
                name,
            })?;
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for ResolverSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ResolverSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a certificate resolver object")
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "Account" => {
                    let account: serde_json::Value = map.next_value()?;
                    if !account.is_null() {
                        self.collected.accounts.push((self.name.clone(), account));
                    }
                }
                "Certificates" => map.next_value_seed(CertsSeed {
                    collected: self.collected,
                    name: self.name.clone(),
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for CertsSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CertsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of certificates")
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut index = 0;
        while let Some(cert) = seq.next_element::<serde_json::Value>()? {
            self.collected.certs.push((self.name.clone(), index, cert));
            index += 1;
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct CertEntry {
    domain: Domain,
    certificate: String,
    key: String,
}

#[derive(serde::Deserialize)]
struct Domain {
    main: String,
    #[serde(default)]
    sans: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Account {
    #[serde(default)]
    email: Option<String>,
    registration: Option<Registration>,
    private_key: Option<String>,
}

#[derive(serde::Deserialize)]
struct Registration {
    uri: String,
}

/// Reads Traefik's `acme.json`. acme.json does not say which CA its resolvers use (that
/// is in Traefik's own configuration): the certificates and accounts are recorded with
/// `directory`. Fails only when the file cannot be read at all.
pub fn read(file: &Path, directory: &str) -> Result<Found> {
    let text = read_text(file, MAX_ACME_JSON)?;
    let mut collected = Collected::default();
    let mut stream = serde_json::Deserializer::from_str(&text);
    let parsed = FileSeed(&mut collected)
        .deserialize(&mut stream)
        .and_then(|()| stream.end());
    let mut found = Found::default();
    if let Err(e) = parsed {
        found.skip(
            EntryKind::Certificate,
            "acme.json",
            format!(
                "the file is truncated or damaged ({e}); {} certificate entries before that point were read",
                collected.certs.len()
            ),
        );
    }
    for (resolver, index, value) in collected.certs {
        let source = format!("{resolver}/Certificates[{index}]");
        match cert(value, directory) {
            Ok(cert) => found.certs.push(FoundCert {
                source,
                cert,
                notes: Vec::new(),
            }),
            Err(e) => found.skip(EntryKind::Certificate, source, e),
        }
    }
    for (resolver, value) in collected.accounts {
        let source = format!("{resolver}/Account");
        match account(value, directory, &source) {
            Ok(account) => found.accounts.push(account),
            Err(e) => found.skip(EntryKind::Account, source, e),
        }
    }
    Ok(found)
}

fn base64_text(field: &str, value: &str) -> Result<String> {
    let bytes = STANDARD.decode(value.trim()).map_err(|_| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            format!("{field} is not base64"),
        )
    })?;
    String::from_utf8(bytes).map_err(|_| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            format!("{field} is not PEM text"),
        )
    })
}

fn cert(value: serde_json::Value, directory: &str) -> Result<crate::store::StoredCert> {
    let entry: CertEntry = serde_json::from_value(value)
        .map_err(|e| Error::config(format!("not a Traefik certificate entry: {e}")))?;
    let mut names = vec![entry.domain.main];
    names.extend(entry.domain.sans.unwrap_or_default());
    names.dedup();
    let fullchain = base64_text("certificate", &entry.certificate)?;
    let key = zeroize::Zeroizing::new(base64_text("key", &entry.key)?);
    make_cert(
        fullchain,
        key.to_string(),
        &names,
        None,
        None,
        default_challenge(),
        directory.to_owned(),
    )
}

fn account(value: serde_json::Value, directory: &str, source: &str) -> Result<super::FoundAccount> {
    let account: Account = serde_json::from_value(value)
        .map_err(|e| Error::config(format!("not a Traefik account: {e}")))?;
    let url = account
        .registration
        .map(|r| r.uri)
        .ok_or_else(|| Error::config("the account has no Registration.uri"))?;
    let key = account
        .private_key
        .ok_or_else(|| Error::config("the account has no PrivateKey"))?;
    let der = zeroize::Zeroizing::new(STANDARD.decode(key.trim()).map_err(|_| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            "the account's PrivateKey is not base64",
        )
    })?);
    let pkcs8 = keys::p256_pkcs8_from_der(&der)?;
    keys::account(
        source.to_owned(),
        directory.to_owned(),
        account.email.filter(|e| !e.is_empty()),
        url,
        &pkcs8,
    )
}
