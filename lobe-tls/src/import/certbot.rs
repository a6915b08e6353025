//! certbot's configuration directory (`/etc/letsencrypt`): one certificate per
//! `renewal/<name>.conf`, its account under `accounts/<server>/<id>/`.
//!
//! A renewal conf is configobj text: `key = value` lines, `[renewalparams]` and
//! `[[webroot_map]]` sections, `#` comments. Only those lines are read; the files it
//! names are read as they are, through certbot's `live/` links.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{EntryKind, Found, FoundCert, default_challenge, keys, make_cert, read_small};
use crate::cert::KeyType;
use crate::challenge::{ChallengeConfig, DnsConfig, DnsProviderConfig};
use crate::error::{Error, Result};

/// The most renewal confs read from one directory.
const MAX_CONFS: usize = 10_000;

/// certbot's default server.
const DEFAULT_SERVER: &str = crate::acme::LETSENCRYPT;

/// A renewal conf, by section: "" for the top, then `renewalparams`, `webroot_map`.
#[derive(Debug, Default)]
struct Conf {
    sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Conf {
    fn parse(text: &str) -> Result<Conf> {
        let mut conf = Conf::default();
        let mut section = String::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                let name = line.trim_matches(|c| c == '[' || c == ']').trim();
                if name.is_empty() || !line.ends_with(']') {
                    return Err(Error::config(format!(
                        "line {}: unreadable section header",
                        number + 1
                    )));
                }
                section = name.to_owned();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(Error::config(format!(
                    "line {}: expected `key = value`",
                    number + 1
                )));
            };
            let value = value.trim().trim_matches('"');
            conf.sections
                .entry(section.clone())
                .or_default()
                .push((key.trim().to_owned(), value.to_owned()));
        }
        Ok(conf)
    }

    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .get(section)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty() && *v != "None")
    }

    fn section(&self, section: &str) -> &[(String, String)] {
        self.sections.get(section).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Reads certbot's configuration directory `dir`. Fails only when `dir` is not one;
/// a conf or account that cannot be used is in [`Found::skipped`].
pub fn read(dir: &Path) -> Result<Found> {
    let renewal = dir.join("renewal");
    let entries = std::fs::read_dir(&renewal).map_err(|e| {
        Error::config(format!(
            "{}: {e}; give certbot's configuration directory (default /etc/letsencrypt)",
            renewal.display()
        ))
    })?;
    let mut confs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .take(MAX_CONFS)
        .collect();
    confs.sort();
    let mut found = Found::default();
    let mut accounts = BTreeSet::new();
    for path in confs {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let source = format!("renewal/{stem}.conf");
        match read_conf(&path, &stem) {
            Ok((cert, account)) => {
                found.certs.push(FoundCert {
                    source,
                    cert: cert.0,
                    notes: cert.1,
                });
                if let Some(account) = account {
                    accounts.insert(account);
                }
            }
            Err(e) => found.skip(EntryKind::Certificate, source, e),
        }
    }
    for (server, id) in accounts {
        let account_dir = dir.join("accounts").join(account_path(&server)).join(&id);
        let source = format!("accounts/{}/{id}", account_path(&server));
        match read_account(&account_dir, &server, &source) {
            Ok(account) => found.accounts.push(account),
            Err(e) => found.skip(EntryKind::Account, source, e),
        }
    }
    Ok(found)
}

/// certbot keeps accounts under the server URL without its scheme.
fn account_path(server: &str) -> String {
    server
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

type CertWithNotes = (crate::store::StoredCert, Vec<String>);

fn read_conf(path: &Path, lineage: &str) -> Result<(CertWithNotes, Option<(String, String)>)> {
    let conf = Conf::parse(&read_small(path)?)?;
    let file = |key: &str| -> Result<String> {
        let named = conf
            .get("", key)
            .ok_or_else(|| Error::config(format!("names no {key} file")))?;
        read_small(Path::new(named)).map_err(|e| Error::config(format!("{key} {e}")))
    };
    let fullchain = file("fullchain")?;
    let privkey = file("privkey")?;
    let server = conf
        .get("renewalparams", "server")
        .unwrap_or(DEFAULT_SERVER)
        .to_owned();
    let mut notes = Vec::new();
    let challenge = challenge(&conf, &mut notes)?;
    let key_type = key_type(&conf);
    // certbot names a lineage after its first domain (`example.com`, or
    // `example.com-0001` for a second one): keep that name first when it is one.
    let cert = make_cert(
        fullchain,
        privkey,
        &[],
        Some(lineage),
        key_type,
        challenge,
        server.clone(),
    )?;
    let account = conf
        .get("renewalparams", "account")
        .map(|id| (server, id.to_owned()));
    Ok(((cert, notes), account))
}

fn key_type(conf: &Conf) -> Option<KeyType> {
    match conf.get("renewalparams", "key_type")? {
        "ecdsa" => match conf
            .get("renewalparams", "elliptic_curve")
            .unwrap_or("secp256r1")
        {
            "secp256r1" => Some(KeyType::EcdsaP256),
            "secp384r1" => Some(KeyType::EcdsaP384),
            _ => None,
        },
        "rsa" => match conf.get("renewalparams", "rsa_key_size").unwrap_or("2048") {
            "2048" => Some(KeyType::Rsa2048),
            "3072" => Some(KeyType::Rsa3072),
            "4096" => Some(KeyType::Rsa4096),
            _ => None,
        },
        _ => None,
    }
}

/// certbot's authenticator as the nearest lobe-tls challenge.
fn challenge(conf: &Conf, notes: &mut Vec<String>) -> Result<ChallengeConfig> {
    let authenticator = conf
        .get("renewalparams", "authenticator")
        .unwrap_or("standalone");
    let credentials = |plugin: &str| {
        conf.get(
            "renewalparams",
            &format!("{}_credentials", plugin.replace('-', "_")),
        )
        .map(|file| format!(" (certbot's credentials file {file} is not read)"))
        .unwrap_or_default()
    };
    Ok(match authenticator {
        "webroot" => {
            let mut roots: Vec<&str> = conf
                .section("webroot_map")
                .iter()
                .map(|(_, v)| v.as_str())
                .collect();
            if roots.is_empty() {
                roots = conf
                    .get("renewalparams", "webroot_path")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .collect();
            }
            let Some(first) = roots.first() else {
                return Err(Error::config(
                    "authenticator webroot without webroot_path or webroot_map",
                ));
            };
            if roots.iter().any(|r| r != first) {
                notes.push(format!(
                    "certbot used several webroots; lobe-tls uses one per certificate: {first}"
                ));
            }
            ChallengeConfig::http01_webroot(*first)
        }
        "standalone" => {
            let address = conf
                .get("renewalparams", "http01_address")
                .unwrap_or("0.0.0.0");
            let port = conf.get("renewalparams", "http01_port").unwrap_or("80");
            let port: u16 = port
                .parse()
                .map_err(|_| Error::config(format!("http01_port {port:?} is not a port")))?;
            let listen = if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            };
            ChallengeConfig::http01(Some(listen))
        }
        "dns-cloudflare" => {
            notes.push(format!(
                "dns-01 through Cloudflare needs CLOUDFLARE_API_TOKEN or --config{}",
                credentials(authenticator)
            ));
            ChallengeConfig::dns01(DnsConfig::new(DnsProviderConfig::Cloudflare {
                config_file: None,
            }))
        }
        "dns-rfc2136" => {
            notes.push(format!(
                "dns-01 through RFC 2136 needs the LOBE_TLS_RFC2136_* settings or --config{}",
                credentials(authenticator)
            ));
            ChallengeConfig::dns01(DnsConfig::new(DnsProviderConfig::Rfc2136 {
                config_file: None,
            }))
        }
        other => {
            notes.push(format!(
                "needs a setting: certbot's {other} authenticator has no lobe-tls equivalent; renewals use http-01 on 0.0.0.0:80 until you renew with --http-webroot DIR or issue again with the challenge you want"
            ));
            default_challenge()
        }
    })
}

fn read_account(dir: &Path, server: &str, source: &str) -> Result<super::FoundAccount> {
    let regr: serde_json::Value = serde_json::from_str(&read_small(&dir.join("regr.json"))?)
        .map_err(|e| Error::config(format!("regr.json: {e}")))?;
    let url = regr
        .get("uri")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::config("regr.json has no account uri"))?
        .to_owned();
    let email = regr
        .pointer("/body/contact")
        .and_then(|v| v.as_array())
        .and_then(|c| {
            c.iter()
                .filter_map(|v| v.as_str())
                .find_map(|c| c.strip_prefix("mailto:"))
        })
        .map(str::to_owned);
    let jwk = zeroize::Zeroizing::new(read_small(&dir.join("private_key.json"))?);
    let jwk: serde_json::Value =
        serde_json::from_str(&jwk).map_err(|_| Error::config("private_key.json is not JSON"))?;
    let pkcs8 = keys::p256_pkcs8_from_jwk(&jwk)?;
    keys::account(source.to_owned(), server.to_owned(), email, url, &pkcs8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_conf_sections_and_values() {
        let conf = Conf::parse(
            "# comment\nversion = 2.1.0\nfullchain = /x/fullchain.pem\n\n[renewalparams]\nauthenticator = webroot\nwebroot_path = /a, /b,\nserver = https://ca/dir\n[[webroot_map]]\nexample.com = /a\nwww.example.com = /b\n",
        )
        .unwrap();
        assert_eq!(conf.get("", "fullchain"), Some("/x/fullchain.pem"));
        assert_eq!(conf.get("renewalparams", "server"), Some("https://ca/dir"));
        let mut notes = Vec::new();
        let challenge = challenge(&conf, &mut notes).unwrap();
        assert_eq!(challenge.http_webroot.as_deref(), Some(Path::new("/a")));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(Conf::parse("[renewalparams\n").is_err());
        assert!(Conf::parse("no equals sign\n").is_err());
    }

    #[test]
    fn standalone_and_dns_plugins() {
        let conf = Conf::parse(
            "[renewalparams]\nauthenticator = standalone\nhttp01_port = 8080\nhttp01_address = ::1\n",
        )
        .unwrap();
        let c = challenge(&conf, &mut Vec::new()).unwrap();
        assert_eq!(c.http_listen.as_deref(), Some("[::1]:8080"));
        let conf = Conf::parse(
            "[renewalparams]\nauthenticator = dns-cloudflare\ndns_cloudflare_credentials = /root/cf.ini\n",
        )
        .unwrap();
        let mut notes = Vec::new();
        let c = challenge(&conf, &mut notes).unwrap();
        assert_eq!(c.kind, crate::challenge::ChallengeKind::Dns01);
        assert!(notes[0].contains("/root/cf.ini"), "{notes:?}");
        let conf = Conf::parse("[renewalparams]\nauthenticator = dns-route53\n").unwrap();
        let mut notes = Vec::new();
        challenge(&conf, &mut notes).unwrap();
        assert!(notes[0].starts_with("needs a setting"), "{notes:?}");
    }
}
