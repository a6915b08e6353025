//! A certificate bundle (PEM chain plus key), the facts parsed from it, and the
//! rustls `CertifiedKey` built from it.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::domain::DomainName;
use crate::error::{CertificateErrorKind, Error, Result};

mod lazy_key;
mod shared_der;

pub use lazy_key::LazyKey;

/// The kind of private key to generate for a certificate.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: small, fast, and accepted everywhere. The default.
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// RSA with a 2048-bit modulus.
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    #[serde(rename = "rsa3072")]
    Rsa3072,
    /// RSA with a 4096-bit modulus.
    #[serde(rename = "rsa4096")]
    Rsa4096,
}

impl KeyType {
    /// Every key type, in the order the CLI lists them.
    pub const ALL: [KeyType; 5] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
            KeyType::Rsa4096 => "rsa4096",
        }
    }

    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<rcgen::KeyPair> {
        use rcgen::{KeyPair, RsaKeySize};
        let generated = match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeyType::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
        };
        generated.map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Generation,
                format!("cannot generate {} key: {e}", self.as_str()),
            )
            .with_source(e)
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown key type {s:?}: use one of ecdsa-p256, ecdsa-p384, rsa2048, rsa3072, rsa4096"
                ))
            })
    }
}

/// A certificate chain and its private key, both as PEM.
///
/// The key is zeroed on drop and never shown by `Debug`.
#[derive(Clone)]
pub struct CertBundle {
    fullchain_pem: String,
    key_pem: Zeroizing<String>,
    /// Built once in [`CertBundle::from_pem`], its key loaded on first use (see
    /// [`LazyKey`]): loading thousands of certificates at start-up parses no key.
    certified: Arc<CertifiedKey>,
    key: Arc<LazyKey>,
}

impl fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertBundle")
            .field(
                "fullchain_pem",
                &format_args!("{} bytes", self.fullchain_pem.len()),
            )
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertBundle {
    /// Takes a full chain (leaf first) and a private key, both PEM, and checks cheaply
    /// that they parse and that the key is of the leaf's algorithm (and curve). The key
    /// itself is loaded, and matched against the leaf, on first use or by
    /// [`CertBundle::check_key`].
    pub fn from_pem(fullchain_pem: impl Into<String>, key_pem: impl Into<String>) -> Result<Self> {
        let fullchain_pem = fullchain_pem.into();
        let key_pem = Zeroizing::new(key_pem.into());
        let (certified, key) = build_certified_key(&fullchain_pem, &key_pem)?;
        Ok(CertBundle {
            fullchain_pem,
            key_pem,
            certified,
            key,
        })
    }

    /// Loads the private key now and checks that it is the leaf's: what a certificate
    /// must pass before it is stored (issue, renew, import).
    pub fn check_key(&self) -> Result<()> {
        self.key.load().map(|_| ())
    }

    /// The leaf certificate followed by its intermediates, as PEM.
    pub fn fullchain_pem(&self) -> &str {
        &self.fullchain_pem
    }

    /// The private key as PKCS#8 PEM. Handle with care: this is the secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The DER certificates of the chain, leaf first.
    pub fn chain_der(&self) -> Result<Vec<CertificateDer<'static>>> {
        Ok(self.certified.cert.clone())
    }

    /// The leaf certificate as PEM.
    pub fn cert_pem(&self) -> Result<String> {
        let chain = self.chain_der()?;
        Ok(der_to_pem(&chain[..1]))
    }

    /// The intermediates (everything after the leaf) as PEM.
    pub fn chain_pem(&self) -> Result<String> {
        let chain = self.chain_der()?;
        Ok(der_to_pem(&chain[1..]))
    }

    /// The rustls `CertifiedKey`, built once when the bundle was made; its key loads on
    /// first use.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>> {
        Ok(self.certified.clone())
    }

    /// Parses the facts of the leaf certificate.
    pub fn info(&self) -> Result<CertInfo> {
        CertInfo::from_der(&self.certified.cert[0])
    }

    /// Checks what must hold before a certificate is stored: the key loads and matches,
    /// it covers every name in `domains`, and it has not expired.
    pub fn validate_for(&self, domains: &[DomainName]) -> Result<CertInfo> {
        self.check_key()?;
        self.validated_key_for(domains).map(|(_, info)| info)
    }

    /// What must hold before a stored certificate is served: it covers every name in
    /// `domains` and has not expired, and its key passed the cheap checks of
    /// [`CertBundle::from_pem`] (it is loaded and matched on first use). Returns the
    /// `CertifiedKey` to serve, so that a caller that swaps it in parses it only once.
    pub fn validated_key_for(
        &self,
        domains: &[DomainName],
    ) -> Result<(Arc<CertifiedKey>, CertInfo)> {
        let key = self.certified_key()?;
        let info = CertInfo::from_der(&key.cert[0])?;
        let missing: Vec<&str> = domains
            .iter()
            .filter(|d| !info.domains.iter().any(|n| n == d.as_str()))
            .map(DomainName::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Error::certificate(
                CertificateErrorKind::NamesNotCovered,
                format!("the certificate does not cover {}", missing.join(", ")),
            ));
        }
        if info.not_after <= OffsetDateTime::now_utc() {
            return Err(Error::certificate(
                CertificateErrorKind::Expired,
                format!("the certificate expired at {}", rfc3339(info.not_after)),
            ));
        }
        Ok((key, info))
    }
}

/// The address in an `iPAddress` SAN: 4 or 16 bytes; anything else is no address.
fn ip_from_san(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Parses a PEM chain and key and builds the `CertifiedKey` around a [`LazyKey`],
/// refusing a key of another algorithm than the leaf's. Intermediates are shared
/// between the certificates that carry the same one.
fn build_certified_key(
    fullchain_pem: &str,
    key_pem: &str,
) -> Result<(Arc<CertifiedKey>, Arc<LazyKey>)> {
    let chain = CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("bad certificate PEM: {e}"),
            )
            .with_source(e)
        })?;
    if chain.is_empty() {
        return Err(Error::certificate(
            CertificateErrorKind::Malformed,
            "no certificate found in the PEM data (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    let chain: Vec<CertificateDer<'static>> = chain
        .into_iter()
        .enumerate()
        .map(|(at, der)| {
            if at == 0 {
                der
            } else {
                shared_der::intern(der)
            }
        })
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            "bad private key PEM: no PKCS#8, PKCS#1 or SEC1 key found",
        )
    })?;
    let lazy = Arc::new(LazyKey::new(key, chain[0].as_ref())?);
    let certified = CertifiedKey::new(chain, lazy.clone());
    Ok((Arc::new(certified), lazy))
}

/// The facts of a leaf certificate that lobe-tls reports and decides on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// The DNS names in the subject alternative name extension, lower-case.
    pub domains: Vec<String>,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The serial number as lower-case hex.
    pub serial: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The key type of the certificate's public key, when it is one lobe-tls generates.
    pub key_type: Option<KeyType>,
    /// The ARI certificate identifier (`base64url(AKI).base64url(serial)`), when the
    /// certificate carries an authority key identifier.
    pub ari_id: Option<String>,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("cannot parse certificate: {e}"),
            )
            .with_source(e)
        })?;
        let mut domains = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        domains.push(dns.to_ascii_lowercase());
                    }
                    // IP address SANs in the form `DomainName` keeps them in (RFC 8738).
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_san(bytes) {
                            domains.push(ip.to_canonical().to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let key_type = key_type_of(cert.public_key());
        let ari_id = instant_acme::CertificateIdentifier::try_from(der)
            .ok()
            .map(|id| id.to_string());
        Ok(CertInfo {
            domains,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
            issuer: cert.issuer().to_string(),
            key_type,
            ari_id,
        })
    }

    /// The certificate's whole lifetime.
    pub fn lifetime(&self) -> time::Duration {
        self.not_after - self.not_before
    }
}

fn key_type_of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<KeyType> {
    use x509_parser::public_key::PublicKey;
    match spki.parsed().ok()? {
        PublicKey::EC(point) => match point.key_size() {
            256 => Some(KeyType::EcdsaP256),
            384 => Some(KeyType::EcdsaP384),
            _ => None,
        },
        PublicKey::RSA(rsa) => match rsa.key_size() {
            2048 => Some(KeyType::Rsa2048),
            3072 => Some(KeyType::Rsa3072),
            4096 => Some(KeyType::Rsa4096),
            _ => None,
        },
        _ => None,
    }
}

/// The crypto provider lobe-tls builds every rustls object with: aws-lc-rs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Formats a timestamp as RFC 3339 (UTC).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn der_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()))
        .collect();
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str], key_type: KeyType) -> CertBundle {
        let key = key_type.generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap()
    }

    #[test]
    fn facts_are_parsed_for_every_key_type() {
        for kt in KeyType::ALL {
            let bundle = self_signed(&["a.example.com", "*.example.com"], kt);
            let info = bundle.info().unwrap();
            assert_eq!(info.domains, ["a.example.com", "*.example.com"]);
            assert_eq!(info.key_type, Some(kt));
            assert!(!info.serial.is_empty());
        }
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = self_signed(&["a.example.com"], KeyType::EcdsaP256);
        let b = self_signed(&["b.example.com"], KeyType::EcdsaP256);
        // Same algorithm and curve: caught when the key is loaded, which storing requires.
        let bundle = CertBundle::from_pem(a.fullchain_pem(), b.key_pem()).unwrap();
        let err = bundle.validate_for(&[]).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(
            matches!(
                err,
                Error::Certificate {
                    kind: CertificateErrorKind::KeyMismatch,
                    ..
                }
            ),
            "{err:?}"
        );
        let source = std::error::Error::source(&err);
        assert!(
            source.is_some_and(|s| s.downcast_ref::<rustls::Error>().is_some()),
            "the rustls error is kept: {err:?}"
        );
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let err = CertBundle::from_pem("garbage", "garbage").unwrap_err();
        assert!(err.to_string().contains("no certificate found"), "{err}");
        assert!(
            matches!(
                err,
                Error::Certificate {
                    kind: CertificateErrorKind::Malformed,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let bundle = self_signed(&["a.example.com"], KeyType::EcdsaP256);
        let shown = format!("{bundle:?}");
        assert!(!shown.contains("PRIVATE KEY"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn validate_names_missing_domain() {
        let bundle = self_signed(&["a.example.com"], KeyType::EcdsaP256);
        let want = [DomainName::parse("b.example.com").unwrap()];
        let err = bundle.validate_for(&want).unwrap_err();
        assert!(err.to_string().contains("b.example.com"), "{err}");
        assert!(
            matches!(
                err,
                Error::Certificate {
                    kind: CertificateErrorKind::NamesNotCovered,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn cert_and_chain_split() {
        let bundle = self_signed(&["a.example.com"], KeyType::EcdsaP256);
        assert_eq!(
            bundle
                .cert_pem()
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count(),
            1
        );
        assert_eq!(bundle.chain_pem().unwrap(), "");
    }
}
