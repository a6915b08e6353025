//! ACME account keys from other clients, turned into the credentials lobe-tls stores
//! (instant-acme's `AccountCredentials`: account URL, PKCS#8 key, directory URL).
//!
//! instant-acme signs with ECDSA P-256 only, so an RSA account key cannot be used: the
//! account is reported and a new one is registered at the first renewal.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use super::FoundAccount;
use crate::error::{CertificateErrorKind, Error, Result, StoreErrorKind};

/// Why an RSA account key is not imported.
const RSA_UNSUPPORTED: &str = "the account key is RSA and lobe-tls signs ACME requests with ECDSA P-256 only; a new account is registered at the first renewal";

/// A P-256 key in DER (SEC1 `EC PRIVATE KEY` or PKCS#8) as PKCS#8.
pub(crate) fn p256_pkcs8_from_der(der: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
        .map_err(|_| unsupported_der(der))?;
    pkcs8(&pair)
}

/// A key from PEM (`EC PRIVATE KEY`, `PRIVATE KEY`) as PKCS#8, if it is P-256.
pub(crate) fn p256_pkcs8_from_pem(pem_text: &str) -> Result<Zeroizing<Vec<u8>>> {
    let block = pem::parse(pem_text.as_bytes()).map_err(|e| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            format!("the account key is not PEM: {e}"),
        )
        .with_source(e)
    })?;
    if block.tag() == "RSA PRIVATE KEY" {
        return Err(Error::certificate(
            CertificateErrorKind::Unsupported,
            RSA_UNSUPPORTED,
        ));
    }
    p256_pkcs8_from_der(block.contents())
}

/// A JSON Web Key with its private part (certbot's `private_key.json`) as PKCS#8.
pub(crate) fn p256_pkcs8_from_jwk(jwk: &serde_json::Value) -> Result<Zeroizing<Vec<u8>>> {
    let field = |name: &str| -> Result<Zeroizing<Vec<u8>>> {
        let text = jwk.get(name).and_then(|v| v.as_str()).ok_or_else(|| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("the account key (JWK) has no {name:?}"),
            )
        })?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map(Zeroizing::new)
            .map_err(|_| {
                Error::certificate(
                    CertificateErrorKind::Malformed,
                    format!("the account key's {name:?} is not base64url"),
                )
            })
    };
    match jwk.get("kty").and_then(|v| v.as_str()) {
        Some("EC") => {}
        Some("RSA") => {
            return Err(Error::certificate(
                CertificateErrorKind::Unsupported,
                RSA_UNSUPPORTED,
            ));
        }
        other => {
            return Err(Error::certificate(
                CertificateErrorKind::Unsupported,
                format!("the account key has an unknown kty {other:?}"),
            ));
        }
    }
    if jwk.get("crv").and_then(|v| v.as_str()) != Some("P-256") {
        return Err(Error::certificate(
            CertificateErrorKind::Unsupported,
            "the account key is not on P-256, the only curve lobe-tls signs with",
        ));
    }
    let (d, x, y) = (field("d")?, field("x")?, field("y")?);
    let mut public = Vec::with_capacity(1 + x.len() + y.len());
    public.push(0x04);
    public.extend_from_slice(&x);
    public.extend_from_slice(&y);
    let pair = EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &d,
        &public,
    )
    .map_err(|e| {
        Error::certificate(
            CertificateErrorKind::Malformed,
            format!("the account key (JWK) is unusable: {e}"),
        )
        .with_source(e)
    })?;
    pkcs8(&pair)
}

fn pkcs8(pair: &EcdsaKeyPair) -> Result<Zeroizing<Vec<u8>>> {
    let doc = pair.to_pkcs8v1().map_err(|_| {
        Error::certificate(
            CertificateErrorKind::Generation,
            "cannot encode the account key as PKCS#8",
        )
    })?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

/// Tells an RSA key (which lobe-tls cannot sign with) from a broken one.
fn unsupported_der(der: &[u8]) -> Error {
    let rsa = aws_lc_rs::rsa::KeyPair::from_der(der).is_ok()
        || aws_lc_rs::rsa::KeyPair::from_pkcs8(der).is_ok();
    if rsa {
        Error::certificate(CertificateErrorKind::Unsupported, RSA_UNSUPPORTED)
    } else {
        Error::certificate(
            CertificateErrorKind::Unsupported,
            "the account key is neither a P-256 nor an RSA private key",
        )
    }
}

/// The account as lobe-tls stores it, checked by parsing it back as instant-acme will.
pub(crate) fn account(
    source: String,
    directory: String,
    email: Option<String>,
    url: String,
    pkcs8: &[u8],
) -> Result<FoundAccount> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(Error::config(format!(
            "the account URL {url:?} is not an http(s) URL"
        )));
    }
    let key = Zeroizing::new(URL_SAFE_NO_PAD.encode(pkcs8));
    let json = serde_json::json!({
        "id": url,
        "key_pkcs8": key.as_str(),
        "directory": directory,
    });
    let credentials = Zeroizing::new(serde_json::to_vec(&json).map_err(|e| {
        Error::store(
            None,
            StoreErrorKind::Encode,
            format!("cannot encode the account: {e}"),
        )
        .with_source(e)
    })?);
    let _checked: instant_acme::AccountCredentials =
        serde_json::from_slice(&credentials).map_err(|e| {
            Error::store(
                None,
                StoreErrorKind::Corrupt,
                format!("cannot build the account credentials: {e}"),
            )
            .with_source(e)
        })?;
    Ok(FoundAccount {
        source,
        directory,
        email,
        url,
        credentials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::{AsBigEndian, AsDer};

    #[test]
    fn sec1_pkcs8_and_jwk_give_the_same_key() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = pair.serialize_der();
        let from_pkcs8 = p256_pkcs8_from_der(&pkcs8).unwrap();
        let parsed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &from_pkcs8).unwrap();
        let sec1 = parsed.private_key().as_der().unwrap();
        let from_sec1 = p256_pkcs8_from_der(sec1.as_ref()).unwrap();
        use aws_lc_rs::signature::KeyPair;
        let public = parsed.public_key().as_ref().to_vec();
        let again = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &from_sec1).unwrap();
        assert_eq!(again.public_key().as_ref(), &public[..]);

        let d = parsed.private_key().as_be_bytes().unwrap();
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "d": URL_SAFE_NO_PAD.encode(d.as_ref()),
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&public[33..]),
        });
        let from_jwk = p256_pkcs8_from_jwk(&jwk).unwrap();
        let again = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &from_jwk).unwrap();
        assert_eq!(again.public_key().as_ref(), &public[..]);

        let found = account(
            "s".into(),
            "https://ca.test/dir".into(),
            None,
            "https://ca.test/acct/1".into(),
            &from_jwk,
        )
        .unwrap();
        assert!(!format!("{found:?}").contains(&URL_SAFE_NO_PAD.encode(&*from_jwk)));
    }

    #[test]
    fn rsa_keys_are_named_as_such() {
        let rsa = crate::cert::KeyType::Rsa2048.generate().unwrap();
        let err = p256_pkcs8_from_der(&rsa.serialize_der()).unwrap_err();
        assert!(err.to_string().contains("RSA"), "{err}");
        let err = p256_pkcs8_from_pem(&rsa.serialize_pem()).unwrap_err();
        assert!(err.to_string().contains("RSA"), "{err}");
        let err = p256_pkcs8_from_jwk(&serde_json::json!({"kty": "RSA", "n": "AQ", "e": "AQAB"}))
            .unwrap_err();
        assert!(err.to_string().contains("RSA"), "{err}");
        let err = p256_pkcs8_from_der(b"not a key").unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
    }
}
