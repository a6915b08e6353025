//! The `rfc2136` provider: dynamic DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945),
//! as BIND, Knot, PowerDNS and Windows DNS accept it. Messages are built and signed by
//! hickory.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use hickory_client::client::{Client, ClientHandle};
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm as HickoryTsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, MessageFinalizer, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::tcp::TcpClientStream;
use zeroize::Zeroizing;

use super::lookup::find_zone;
use super::query::{QueryError, fqdn, query};
use super::settings::ProviderSettings;
use super::{DnsProvider, ProviderFailure, provider_error};
use crate::error::{DnsErrorKind, Error, Result};

/// TTL of the records written; short, as they live for one validation.
const RECORD_TTL: u32 = 60;
/// How long one UPDATE exchange may take.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Allowed clock difference with the server for TSIG, in seconds (RFC 8945 recommends 300).
const TSIG_FUDGE: u16 = 300;

/// The TSIG algorithms offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TsigAlgorithm {
    /// `hmac-sha256`: what `tsig-keygen` makes by default.
    HmacSha256,
    /// `hmac-sha384`.
    HmacSha384,
    /// `hmac-sha512`.
    HmacSha512,
}

impl TsigAlgorithm {
    /// The algorithm's name as BIND and Knot write it.
    pub fn as_str(self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha384 => "hmac-sha384",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }

    fn hickory(self) -> HickoryTsigAlgorithm {
        match self {
            TsigAlgorithm::HmacSha256 => HickoryTsigAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha384 => HickoryTsigAlgorithm::HmacSha384,
            TsigAlgorithm::HmacSha512 => HickoryTsigAlgorithm::HmacSha512,
        }
    }
}

impl FromStr for TsigAlgorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => Ok(TsigAlgorithm::HmacSha256),
            "hmac-sha384" => Ok(TsigAlgorithm::HmacSha384),
            "hmac-sha512" => Ok(TsigAlgorithm::HmacSha512),
            _ => Err(Error::config(format!(
                "unsupported TSIG algorithm {s:?}: use hmac-sha256 or hmac-sha512"
            ))),
        }
    }
}

/// A TSIG key: its name, algorithm and secret. The secret never shows in `Debug`.
#[derive(Clone)]
pub struct TsigKey {
    name: Name,
    algorithm: TsigAlgorithm,
    secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name.to_string())
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl TsigKey {
    /// A key named `name` with a base64 `secret`.
    pub fn new(name: &str, algorithm: TsigAlgorithm, secret_base64: &str) -> Result<Self> {
        let name =
            fqdn(name).map_err(|e| Error::config(format!("TSIG key name: {e}")).with_source(e))?;
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret_base64.trim())
            .map_err(|e| {
                Error::config(format!(
                    "the secret of TSIG key {name} is not valid base64 (as tsig-keygen prints it)"
                ))
                .with_source(e)
            })?;
        if secret.is_empty() {
            return Err(Error::config(format!(
                "the secret of TSIG key {name} is empty"
            )));
        }
        Ok(TsigKey {
            name,
            algorithm,
            secret: Zeroizing::new(secret),
        })
    }

    /// Reads a key file in BIND's `tsig-keygen` format:
    /// `key "name" { algorithm hmac-sha256; secret "base64"; };`.
    /// If the file holds several keys, `wanted` picks one by name.
    pub fn from_bind_file(path: &Path, wanted: Option<&str>) -> Result<Self> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
        parse_bind_keys(&text, wanted)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())).with_source(e))
    }

    /// The key's name, fully qualified.
    pub fn name(&self) -> String {
        self.name.to_string()
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> TsigAlgorithm {
        self.algorithm
    }

    fn signer(&self) -> Result<TSigner> {
        TSigner::new(
            self.secret.to_vec(),
            self.algorithm.hickory(),
            self.name.clone(),
            TSIG_FUDGE,
        )
        .map_err(|e| Error::config(format!("TSIG key {}: {e}", self.name)).with_source(e))
    }
}

/// Splits BIND configuration text into tokens: words, quoted strings and `{ } ;`.
fn bind_tokens(text: &str) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '#' => skip_line(&mut chars),
            '/' if chars.peek() == Some(&'/') => skip_line(&mut chars),
            '{' | '}' | ';' => tokens.push(c.to_string()),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => return Err(Error::config("unterminated quoted string")),
                    }
                }
                tokens.push(s);
            }
            c => {
                let mut s = c.to_string();
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || "{};\"".contains(n) {
                        break;
                    }
                    s.push(n);
                    chars.next();
                }
                tokens.push(s);
            }
        }
    }
    Ok(tokens)
}

fn skip_line(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if c == '\n' {
            break;
        }
    }
}

fn parse_bind_keys(text: &str, wanted: Option<&str>) -> Result<TsigKey> {
    let tokens = bind_tokens(text)?;
    let mut keys = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] != "key" {
            i += 1;
            continue;
        }
        let name = tokens
            .get(i + 1)
            .ok_or_else(|| Error::config("`key` without a name"))?
            .clone();
        if tokens.get(i + 2).map(String::as_str) != Some("{") {
            return Err(Error::config(format!("key {name:?}: expected `{{`")));
        }
        i += 3;
        let (mut algorithm, mut secret) = (None, None);
        while i < tokens.len() && tokens[i] != "}" {
            let value = tokens.get(i + 1).cloned();
            match tokens[i].as_str() {
                "algorithm" => algorithm = value,
                "secret" => secret = value.map(Zeroizing::new),
                ";" => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            i += 2;
        }
        i += 1;
        let algorithm =
            algorithm.ok_or_else(|| Error::config(format!("key {name:?} has no algorithm")))?;
        let secret = secret.ok_or_else(|| Error::config(format!("key {name:?} has no secret")))?;
        keys.push((name, algorithm, secret));
    }
    let wanted = wanted.map(|w| w.trim_end_matches('.'));
    let (name, algorithm, secret) = match wanted {
        Some(w) => keys
            .into_iter()
            .find(|(n, _, _)| n.trim_end_matches('.').eq_ignore_ascii_case(w))
            .ok_or_else(|| Error::config(format!("no key named {w:?}")))?,
        None => {
            if keys.len() > 1 {
                return Err(Error::config(
                    "holds several keys; name one with LOBE_TLS_RFC2136_TSIG_KEY",
                ));
            }
            keys.into_iter()
                .next()
                .ok_or_else(|| Error::config("no `key \"name\" { ... };` found"))?
        }
    };
    let algorithm: TsigAlgorithm = algorithm.parse()?;
    TsigKey::new(&name, algorithm, &secret)
}

/// Writes TXT records through dynamic UPDATE to one primary nameserver.
#[derive(Debug, Clone)]
pub struct Rfc2136Provider {
    nameserver: String,
    zone: Option<Name>,
    key: Option<TsigKey>,
}

impl Rfc2136Provider {
    /// A provider updating `nameserver` (`host:port`, port 53 if left out), signing with
    /// `key`. Without a key, updates go unsigned (for servers that allow updates by address).
    pub fn new(nameserver: &str, key: Option<TsigKey>) -> Self {
        Rfc2136Provider {
            nameserver: nameserver.to_owned(),
            zone: None,
            key,
        }
    }

    /// Updates this zone instead of finding the zone of each record with an SOA walk.
    pub fn with_zone(mut self, zone: &str) -> Result<Self> {
        self.zone =
            Some(fqdn(zone).map_err(|e| {
                Error::config(format!("LOBE_TLS_RFC2136_ZONE: {e}")).with_source(e)
            })?);
        Ok(self)
    }

    /// A provider from the `LOBE_TLS_RFC2136_*` variables or the `[rfc2136]` table.
    pub fn from_settings(settings: &ProviderSettings) -> Result<Self> {
        let nameserver = settings.require("LOBE_TLS_RFC2136_NAMESERVER", "nameserver")?;
        let key_name = settings.get("LOBE_TLS_RFC2136_TSIG_KEY", "tsig_key")?;
        let secret = settings
            .get("LOBE_TLS_RFC2136_TSIG_SECRET", "tsig_secret")?
            .map(Zeroizing::new);
        let key_file = settings.get("LOBE_TLS_RFC2136_TSIG_FILE", "tsig_file")?;
        let algorithm = settings.get("LOBE_TLS_RFC2136_TSIG_ALGORITHM", "tsig_algorithm")?;
        let key = match (secret, key_file) {
            (Some(secret), _) => {
                let name = key_name
                    .ok_or_else(|| settings.missing("LOBE_TLS_RFC2136_TSIG_KEY", "tsig_key"))?;
                let algorithm = match algorithm {
                    Some(a) => a.parse()?,
                    None => TsigAlgorithm::HmacSha256,
                };
                Some(TsigKey::new(&name, algorithm, &secret)?)
            }
            (None, Some(file)) => {
                let key = TsigKey::from_bind_file(Path::new(&file), key_name.as_deref())?;
                if let Some(a) = algorithm
                    && a.parse::<TsigAlgorithm>()? != key.algorithm
                {
                    return Err(Error::config(format!(
                        "LOBE_TLS_RFC2136_TSIG_ALGORITHM says {a}, but {file} says {}",
                        key.algorithm.as_str()
                    )));
                }
                Some(key)
            }
            (None, None) if key_name.is_some() => {
                return Err(Error::config(
                    "rfc2136: TSIG key named but no secret: set LOBE_TLS_RFC2136_TSIG_SECRET or LOBE_TLS_RFC2136_TSIG_FILE",
                ));
            }
            (None, None) => None,
        };
        let provider = Rfc2136Provider::new(&nameserver, key);
        match settings.get("LOBE_TLS_RFC2136_ZONE", "zone")? {
            Some(zone) => provider.with_zone(&zone),
            None => Ok(provider),
        }
    }

    async fn server_addr(&self) -> std::result::Result<SocketAddr, ProviderFailure> {
        let target = if self.nameserver.parse::<SocketAddr>().is_ok()
            || self
                .nameserver
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
        {
            self.nameserver.clone()
        } else {
            format!("{}:53", self.nameserver)
        };
        tokio::net::lookup_host(&target)
            .await
            .map_err(|e| {
                ProviderFailure::new(
                    DnsErrorKind::ProviderUnreachable,
                    format!("cannot resolve nameserver {target}: {e}"),
                )
                .with_source(e)
            })?
            .next()
            .ok_or_else(|| {
                ProviderFailure::new(
                    DnsErrorKind::ProviderUnreachable,
                    format!("nameserver {target} has no address"),
                )
            })
    }

    /// The zone to update for `name`: the configured one, or found by an SOA walk at
    /// the nameserver itself (the server that takes the update knows its zones).
    async fn zone_for(
        &self,
        server: SocketAddr,
        name: &Name,
    ) -> std::result::Result<Name, ProviderFailure> {
        if let Some(zone) = &self.zone {
            return Ok(zone.clone());
        }
        find_zone(
            |candidate| async move {
                query(server, &candidate, RecordType::SOA, false)
                    .await
                    .map_err(|e| {
                        let (kind, detail) = match &e {
                            QueryError::Rcode(ResponseCode::Refused | ResponseCode::NotAuth) => (
                                DnsErrorKind::ProviderRefused,
                                format!(
                                    "nameserver {server} serves no zone holding {name}; set LOBE_TLS_RFC2136_ZONE"
                                ),
                            ),
                            QueryError::Rcode(_) => (
                                DnsErrorKind::ProviderRefused,
                                format!("cannot find the zone of {name}: nameserver {server} {e}"),
                            ),
                            QueryError::Unreachable(_) => (
                                DnsErrorKind::ProviderUnreachable,
                                format!("cannot find the zone of {name}: nameserver {server} {e}"),
                            ),
                        };
                        ProviderFailure::new(kind, detail).with_source(e)
                    })
            },
            name,
        )
        .await
    }

    async fn update(
        &self,
        action: Action,
        fqdn_str: &str,
        value: &str,
    ) -> std::result::Result<(), ProviderFailure> {
        let server = self.server_addr().await?;
        let name = fqdn(fqdn_str).map_err(|e| {
            ProviderFailure::new(DnsErrorKind::BadName, e.to_string()).with_source(e)
        })?;
        let zone = self.zone_for(server, &name).await?;
        let mut rrset = RecordSet::with_ttl(name.clone(), RecordType::TXT, RECORD_TTL);
        rrset.insert(
            Record::from_rdata(
                name.clone(),
                RECORD_TTL,
                RData::TXT(TXT::new(vec![value.to_owned()])),
            ),
            0,
        );
        let signer = match &self.key {
            Some(key) => {
                let signer = key.signer().map_err(|e| {
                    ProviderFailure::new(DnsErrorKind::ProviderSettings, e.to_string())
                        .with_source(e)
                })?;
                Some(Arc::new(signer) as Arc<dyn MessageFinalizer>)
            }
            None => None,
        };
        let (stream, handle) = TcpClientStream::new(
            server,
            None,
            Some(UPDATE_TIMEOUT),
            TokioRuntimeProvider::new(),
        );
        let (mut client, background) = Client::with_timeout(stream, handle, UPDATE_TIMEOUT, signer)
            .await
            .map_err(|e| {
                ProviderFailure::new(
                    DnsErrorKind::ProviderUnreachable,
                    format!("nameserver {server} unreachable: {e}"),
                )
                .with_source(e)
            })?;
        let task = tokio::spawn(background);
        let result = match action {
            Action::Add => client.append(rrset, zone.clone(), false).await,
            Action::Delete => client.delete_by_rdata(rrset, zone.clone()).await,
        };
        task.abort();
        match result {
            Ok(response) => self.check_rcode(server, &zone, response.into_message()),
            Err(e) => Err(self.explain_failure(server, e)),
        }
    }

    fn check_rcode(
        &self,
        server: SocketAddr,
        zone: &Name,
        response: Message,
    ) -> std::result::Result<(), ProviderFailure> {
        let key = self.key_label();
        let code = response.response_code();
        let detail = match code {
            ResponseCode::NoError => return Ok(()),
            ResponseCode::NotAuth => format!(
                "nameserver {server} rejected TSIG key {key} (NOTAUTH): check the key name, algorithm and secret"
            ),
            ResponseCode::Refused => format!(
                "nameserver {server} refused the update of zone {zone} by {key}: allow it in the server's update ACL"
            ),
            ResponseCode::NotZone => {
                format!("nameserver {server} does not serve zone {zone}; set LOBE_TLS_RFC2136_ZONE")
            }
            code => format!("nameserver {server} answered {code} to the update of zone {zone}"),
        };
        Err(ProviderFailure::refused(
            detail,
            None,
            vec![u64::from(u16::from(code))],
            code.to_string(),
        ))
    }

    /// A server that does not know the key, or computes another MAC, answers NOTAUTH
    /// without a valid signature; hickory reports that as a failed verification.
    fn explain_failure(
        &self,
        server: SocketAddr,
        error: hickory_client::ClientError,
    ) -> ProviderFailure {
        use hickory_client::ClientErrorKind;
        use hickory_proto::ProtoErrorKind;
        let proto_kind = match error.kind() {
            ClientErrorKind::Proto(e) => Some(e.kind()),
            _ => None,
        };
        let (kind, detail) = match (error.kind(), proto_kind) {
            (_, Some(ProtoErrorKind::Timeout)) => (
                DnsErrorKind::ProviderUnreachable,
                format!("nameserver {server} did not answer within {UPDATE_TIMEOUT:?}"),
            ),
            (ClientErrorKind::Io(e), _) => (
                DnsErrorKind::ProviderUnreachable,
                format!("nameserver {server} unreachable: {e}"),
            ),
            (_, Some(ProtoErrorKind::Io(e))) => (
                DnsErrorKind::ProviderUnreachable,
                format!("nameserver {server} unreachable: {e}"),
            ),
            _ if self.key.is_some() => (
                DnsErrorKind::ProviderRefused,
                format!(
                    "nameserver {server} rejected TSIG key {} (its answer has no valid signature): check the key name, algorithm and secret",
                    self.key_label()
                ),
            ),
            _ => (
                DnsErrorKind::ProviderRefused,
                format!("update to nameserver {server} failed: {error}"),
            ),
        };
        ProviderFailure::new(kind, detail).with_source(error)
    }

    fn key_label(&self) -> String {
        match &self.key {
            Some(key) => format!("{} ({})", key.name, key.algorithm.as_str()),
            None => "an unsigned request".into(),
        }
    }
}

#[derive(Clone, Copy)]
enum Action {
    Add,
    Delete,
}

#[async_trait]
impl DnsProvider for Rfc2136Provider {
    async fn present(&self, fqdn: &str, value: &str) -> Result<()> {
        self.update(Action::Add, fqdn, value)
            .await
            .map_err(|e| provider_error("rfc2136", "create", fqdn, e))
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()> {
        self.update(Action::Delete, fqdn, value)
            .await
            .map_err(|e| provider_error("rfc2136", "delete", fqdn, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tsig_keygen_output() {
        let text = "key \"acme-update\" {\n\talgorithm hmac-sha512;\n\tsecret \"c2VjcmV0LXNlY3JldA==\";\n};\n";
        let key = parse_bind_keys(text, None).unwrap();
        assert_eq!(key.name(), "acme-update.");
        assert_eq!(key.algorithm(), TsigAlgorithm::HmacSha512);
        assert_eq!(key.secret.as_slice(), b"secret-secret");
        assert!(
            !format!("{key:?}").contains("c2VjcmV0"),
            "secret must not show in Debug"
        );
    }

    #[test]
    fn picks_the_named_key_among_several_and_ignores_comments() {
        let text = "# made by tsig-keygen\nkey a { algorithm hmac-sha256; secret \"YQ==\"; };\n// second\nkey \"b.\" { secret \"Yg==\"; algorithm \"hmac-sha256\"; };";
        assert_eq!(
            parse_bind_keys(text, Some("b")).unwrap().secret.as_slice(),
            b"b"
        );
        assert!(
            parse_bind_keys(text, None)
                .unwrap_err()
                .to_string()
                .contains("several keys")
        );
        assert!(
            parse_bind_keys(text, Some("c"))
                .unwrap_err()
                .to_string()
                .contains("no key named")
        );
    }

    #[test]
    fn rejects_unsupported_algorithms_and_bad_secrets() {
        let err =
            parse_bind_keys("key k { algorithm hmac-md5; secret \"YQ==\"; };", None).unwrap_err();
        assert!(err.to_string().contains("hmac-md5"), "{err}");
        let err = TsigKey::new("k", TsigAlgorithm::HmacSha256, "not base64!").unwrap_err();
        assert!(err.to_string().contains("not valid base64"), "{err}");
    }
}
