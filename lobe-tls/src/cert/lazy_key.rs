//! A private key parsed on its first use.
//!
//! Loading a key into aws-lc (for ECDSA, computing and checking its public point) is
//! most of what loading a certificate costs; with 100,000 stored certificates that is
//! seconds of start-up for keys most of which sign nothing for hours. [`LazyKey`] keeps
//! the key's DER bytes (zeroed on drop) and the leaf's public key, answers
//! [`SigningKey::algorithm`] from the certificate, and loads the key the first time a
//! handshake needs a signature.
//!
//! What is checked when: at construction, cheaply, that the key's format and algorithm
//! (and curve, for ECDSA in PKCS#8) are the leaf's. At first use, fully: the key loads
//! and its public key is the leaf's. A key that fails then is logged once (with the
//! leaf's subject key) and the handshake fails; paths that store a new certificate
//! (issue, renew, import) run the full check before it is stored.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::SignatureAlgorithm;
use rustls::SignatureScheme;
use rustls::sign::{Signer, SigningKey};
use rustls_pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use x509_parser::der_parser::parse_der;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::error::{CertificateErrorKind, Error, Result};

/// The container a private key came in; aws-lc is told which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Pkcs1,
    Sec1,
    Pkcs8,
}

/// A key algorithm as both the key and the certificate name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rsa,
    EcP256,
    EcP384,
    /// ECDSA on a curve lobe-tls does not name; aws-lc decides at first use.
    EcOther,
    Ed25519,
}

impl Kind {
    fn algorithm(self) -> SignatureAlgorithm {
        match self {
            Kind::Rsa => SignatureAlgorithm::RSA,
            Kind::EcP256 | Kind::EcP384 | Kind::EcOther => SignatureAlgorithm::ECDSA,
            Kind::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

/// A [`SigningKey`] that loads its key on first use. See the module documentation.
pub struct LazyKey {
    der: Zeroizing<Vec<u8>>,
    format: Format,
    algorithm: SignatureAlgorithm,
    /// The leaf's SubjectPublicKeyInfo: what the loaded key must match.
    leaf_spki: Box<[u8]>,
    /// `None` once loading failed: the failure is logged once, not per handshake.
    loaded: OnceLock<Option<Arc<dyn SigningKey>>>,
}

impl fmt::Debug for LazyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyKey")
            .field("algorithm", &self.algorithm)
            .field("loaded", &self.loaded.get().map(Option::is_some))
            .finish_non_exhaustive()
    }
}

impl LazyKey {
    /// Takes `key` for the certificate `leaf` (DER) after the cheap checks: the key's
    /// container and algorithm are the leaf's. Nothing is loaded into aws-lc yet.
    pub fn new(key: PrivateKeyDer<'_>, leaf: &[u8]) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("cannot parse certificate: {e}"),
            )
            .with_source(e)
        })?;
        let spki = cert.public_key();
        let cert_kind = kind_of(
            &spki.algorithm.algorithm,
            spki.algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .as_ref(),
        )
        .ok_or_else(|| unsupported("the certificate's public key algorithm is not supported"))?;
        let (format, key_kind) = match &key {
            PrivateKeyDer::Pkcs1(_) => (Format::Pkcs1, Some(Kind::Rsa)),
            // The curve is inside; aws-lc checks it at first use.
            PrivateKeyDer::Sec1(_) => (Format::Sec1, None),
            PrivateKeyDer::Pkcs8(der) => (Format::Pkcs8, Some(pkcs8_kind(der.secret_pkcs8_der())?)),
            _ => return Err(unsupported("unknown private key format")),
        };
        let agrees = match (format, key_kind) {
            (Format::Sec1, _) => matches!(cert_kind, Kind::EcP256 | Kind::EcP384 | Kind::EcOther),
            (_, Some(Kind::EcOther)) => cert_kind.algorithm() == SignatureAlgorithm::ECDSA,
            (_, Some(kind)) => kind == cert_kind,
            (_, None) => false,
        };
        if !agrees {
            return Err(Error::certificate(
                CertificateErrorKind::KeyMismatch,
                "the private key does not match the certificate (another key algorithm or curve)",
            )
            .with_source(rustls::Error::InconsistentKeys(
                rustls::InconsistentKeys::KeyMismatch,
            )));
        }
        Ok(LazyKey {
            der: Zeroizing::new(key.secret_der().to_vec()),
            format,
            algorithm: cert_kind.algorithm(),
            leaf_spki: spki.raw.into(),
            loaded: OnceLock::new(),
        })
    }

    /// Loads the key now, if not yet, and checks it against the certificate. A failure
    /// is the caller's to report (a check before storing or serving says it in its own
    /// words).
    pub fn load(&self) -> Result<Arc<dyn SigningKey>> {
        self.load_logged(false)
    }

    /// As [`LazyKey::load`], for a handshake: nobody else reports a failure there, so it
    /// is logged (once, as the outcome is kept).
    fn load_for_handshake(&self) -> Result<Arc<dyn SigningKey>> {
        self.load_logged(true)
    }

    fn load_logged(&self, log: bool) -> Result<Arc<dyn SigningKey>> {
        if let Some(loaded) = self.loaded.get() {
            return loaded
                .clone()
                .ok_or_else(|| unsupported("the private key failed to load earlier"));
        }
        let result = self.load_checked();
        let kept = self
            .loaded
            .get_or_init(|| match &result {
                Ok(key) => Some(key.clone()),
                Err(error) => {
                    if log {
                        tracing::error!(%error, "a stored private key failed to load at its first handshake; handshakes for its names fail (run lobe-tls check)");
                    }
                    None
                }
            })
            .clone();
        match (kept, result) {
            (Some(key), _) => Ok(key),
            (None, Err(e)) => Err(e),
            // Another thread's load failed first.
            (None, Ok(_)) => Err(unsupported("the private key failed to load")),
        }
    }

    /// Whether the key has been loaded (a handshake or a check needed it).
    pub fn is_loaded(&self) -> bool {
        matches!(self.loaded.get(), Some(Some(_)))
    }

    fn load_checked(&self) -> Result<Arc<dyn SigningKey>> {
        let der: PrivateKeyDer<'_> = match self.format {
            Format::Pkcs1 => PrivateKeyDer::Pkcs1(self.der.as_slice().into()),
            Format::Sec1 => PrivateKeyDer::Sec1(self.der.as_slice().into()),
            Format::Pkcs8 => PrivateKeyDer::Pkcs8(self.der.as_slice().into()),
        };
        let key = super::crypto_provider()
            .key_provider
            .load_private_key(der.clone_key())
            .map_err(|e| {
                Error::certificate(
                    CertificateErrorKind::Unsupported,
                    format!("unusable private key: {e}"),
                )
                .with_source(e)
            })?;
        match key.public_key() {
            Some(spki) if spki.as_ref() == &*self.leaf_spki => Ok(key),
            Some(_) => Err(Error::certificate(
                CertificateErrorKind::KeyMismatch,
                "the private key does not match the certificate",
            )
            .with_source(rustls::Error::InconsistentKeys(
                rustls::InconsistentKeys::KeyMismatch,
            ))),
            None => Err(unsupported("cannot tell the private key's public key")),
        }
    }
}

impl SigningKey for LazyKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        self.load_for_handshake().ok()?.choose_scheme(offered)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        // Only what the loaded key says counts: `keys_match` must compare two facts.
        self.load().ok()?;
        self.loaded
            .get()?
            .as_ref()?
            .public_key()
            .map(|spki| SubjectPublicKeyInfoDer::from(spki.as_ref().to_vec()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }
}

fn unsupported(why: &str) -> Error {
    Error::certificate(CertificateErrorKind::Unsupported, why.to_owned())
}

fn kind_of(
    algorithm: &x509_parser::asn1_rs::Oid<'_>,
    curve: Option<&x509_parser::asn1_rs::Oid<'_>>,
) -> Option<Kind> {
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        Some(Kind::Rsa)
    } else if *algorithm == OID_SIG_ED25519 {
        Some(Kind::Ed25519)
    } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        Some(match curve {
            Some(c) if *c == OID_EC_P256 => Kind::EcP256,
            Some(c) if *c == OID_NIST_EC_P384 => Kind::EcP384,
            _ => Kind::EcOther,
        })
    } else {
        None
    }
}

/// The algorithm a PKCS#8 `PrivateKeyInfo` names (RFC 5208: version, algorithm
/// identifier, key). The curve of an ECDSA key is the identifier's parameter; when it
/// is absent (the curve only inside the key) aws-lc decides at first use.
fn pkcs8_kind(der: &[u8]) -> Result<Kind> {
    let malformed = || {
        Error::certificate(
            CertificateErrorKind::Malformed,
            "bad private key: not a PKCS#8 PrivateKeyInfo",
        )
    };
    let (_, info) = parse_der(der).map_err(|_| malformed())?;
    let fields = info.as_sequence().map_err(|_| malformed())?;
    let algorithm = fields
        .get(1)
        .and_then(|a| a.as_sequence().ok())
        .ok_or_else(malformed)?;
    let oid = algorithm
        .first()
        .and_then(|o| o.as_oid().ok())
        .ok_or_else(malformed)?;
    let curve = algorithm.get(1).and_then(|p| p.as_oid().ok());
    kind_of(oid, curve).ok_or_else(|| unsupported("the private key's algorithm is not supported"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::KeyType;
    use rustls_pki_types::pem::PemObject;

    fn pair(key_type: KeyType) -> (Vec<u8>, rcgen::KeyPair) {
        let key = key_type.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example.com".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.der().to_vec(), key)
    }

    fn der_of(key: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap()
    }

    #[test]
    fn the_algorithm_is_known_before_the_key_is_loaded_and_loading_waits_for_first_use() {
        for (kt, want) in [
            (KeyType::EcdsaP256, SignatureAlgorithm::ECDSA),
            (KeyType::EcdsaP384, SignatureAlgorithm::ECDSA),
            (KeyType::Rsa2048, SignatureAlgorithm::RSA),
        ] {
            let (leaf, key) = pair(kt);
            let lazy = LazyKey::new(der_of(&key), &leaf).unwrap();
            assert_eq!(lazy.algorithm(), want, "{kt}");
            assert!(!lazy.is_loaded(), "{kt}: nothing loaded at construction");
            let offered = [
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SignatureScheme::RSA_PSS_SHA256,
            ];
            let signer = lazy.choose_scheme(&offered).expect("a scheme is chosen");
            assert!(!signer.sign(b"hello").unwrap().is_empty());
            assert!(lazy.is_loaded(), "{kt}: loaded by its first signature");
            let spki = lazy.public_key().unwrap();
            let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
            assert_eq!(spki.as_ref(), cert.public_key().raw);
        }
    }

    #[test]
    fn a_key_of_another_algorithm_or_curve_is_refused_at_construction() {
        let (leaf, _) = pair(KeyType::EcdsaP256);
        for other in [KeyType::EcdsaP384, KeyType::Rsa2048] {
            let (_, key) = pair(other);
            let err = LazyKey::new(der_of(&key), &leaf).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Certificate {
                        kind: CertificateErrorKind::KeyMismatch,
                        ..
                    }
                ),
                "{other}: {err:?}"
            );
        }
    }

    #[test]
    fn a_key_of_the_same_curve_that_does_not_match_fails_at_first_use_and_stays_failed() {
        let (leaf, _) = pair(KeyType::EcdsaP256);
        let (_, other) = pair(KeyType::EcdsaP256);
        let lazy = LazyKey::new(der_of(&other), &leaf).unwrap();
        let err = lazy.load().map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(
            lazy.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
                .is_none(),
            "no signature with a key that is not the certificate's"
        );
        assert!(!lazy.is_loaded());
        assert!(lazy.public_key().is_none());
    }

    #[test]
    fn garbage_in_a_pkcs8_container_is_refused_at_construction() {
        let (leaf, _) = pair(KeyType::EcdsaP256);
        let err = LazyKey::new(
            PrivateKeyDer::Pkcs8(vec![0x30, 0x03, 1, 2, 3].into()),
            &leaf,
        )
        .unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let (leaf, key) = pair(KeyType::EcdsaP256);
        let lazy = LazyKey::new(der_of(&key), &leaf).unwrap();
        let shown = format!("{lazy:?}");
        assert!(shown.contains("ECDSA"), "{shown}");
        assert!(!shown.contains("der"), "{shown}");
    }
}
