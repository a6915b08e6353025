//! The certificate signing request sent to finalize an order.
//!
//! It names every identifier as a SAN (an IP address as an `iPAddress` SAN, RFC 8738
//! §3) and asks for the serverAuth extended key usage only: some CAs now refuse a CSR
//! that asks for clientAuth, and a TLS server certificate never needs it.

use crate::domain::DomainName;
use crate::error::{CertificateErrorKind, Error, Result};

/// The DER CSR for `domains`, signed with `key`, with an empty subject.
pub(super) fn build(domains: &[DomainName], key: &rcgen::KeyPair) -> Result<Vec<u8>> {
    // `CertificateParams::new` makes an `iPAddress` SAN of every name that parses as an
    // address, which is how [`DomainName`] spells IP identifiers.
    let mut params = rcgen::CertificateParams::new(
        domains
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect::<Vec<_>>(),
    )
    .map_err(|e| {
        Error::certificate(
            CertificateErrorKind::Generation,
            format!("cannot build the CSR: {e}"),
        )
        .with_source(e)
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(key).map_err(|e| {
        Error::certificate(
            CertificateErrorKind::Generation,
            format!("cannot sign the CSR: {e}"),
        )
        .with_source(e)
    })?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::KeyType;
    use x509_parser::prelude::*;

    #[test]
    fn the_csr_asks_for_server_auth_only_and_names_addresses_as_ip_sans() {
        let domains =
            crate::domain::parse_all(&["www.example.com", "192.0.2.10", "2001:db8::1"]).unwrap();
        let key = KeyType::EcdsaP256.generate().unwrap();
        let der = build(&domains, &key).unwrap();
        let (rest, csr) = X509CertificationRequest::from_der(&der).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature().unwrap();
        let extensions: Vec<_> = csr
            .requested_extensions()
            .expect("the CSR requests extensions")
            .collect();
        let eku = extensions
            .iter()
            .find_map(|e| match e {
                ParsedExtension::ExtendedKeyUsage(eku) => Some(eku),
                _ => None,
            })
            .expect("an extended key usage");
        assert!(eku.server_auth, "{eku:?}");
        assert!(!eku.client_auth, "{eku:?}");
        assert!(
            !eku.any && eku.other.is_empty() && !eku.code_signing && !eku.email_protection,
            "{eku:?}"
        );
        let san = extensions
            .iter()
            .find_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .expect("a SAN");
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &san.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push(n.to_string()),
                GeneralName::IPAddress(bytes) => ips.push(bytes.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        assert_eq!(dns, ["www.example.com"]);
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(ips, [vec![192, 0, 2, 10], v6.octets().to_vec()]);
    }
}
