//! TLS-ALPN-01 (RFC 8737): a self-signed certificate carrying the SHA-256 digest of the
//! key authorization in a critical `acmeIdentifier` extension, served to clients that
//! offer only the ALPN protocol `acme-tls/1`.
//!
//! The solver installs that certificate into a [`CertResolver`], which the proxy already
//! serves on port 443; [`TlsAlpn01Listener`] is a standalone listener for when nothing
//! else holds the port. With a shared store attached, the material is also published
//! under `tls-alpn-01/<domain>` so that another instance of a cluster can install it
//! with [`install_shared`] (the handshake path itself never touches the store).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use super::{ChallengeData, ChallengeKind, Solver};
use crate::cert::KeyType;
use crate::domain::DomainName;
use crate::error::{CertificateErrorKind, Error, Result};
use crate::listen::ListenerTask;
use crate::resolver::{ACME_TLS_ALPN, CertResolver};
use crate::store::DynStore;

/// How long published material lives in a shared store if cleanup never runs.
const SHARED_TTL: Duration = Duration::from_secs(600);
/// How long an order waits after publishing its certificate before the CA validates, so
/// that the other instances' followers install it first. The store's announcements
/// arrive within milliseconds; 250 ms covers a busy instance and costs an order little.
const SHARED_PROPAGATION: Duration = Duration::from_millis(250);

/// What sharing the material needs the store's challenge tokens for, in messages.
const NEEDED_FOR: &str = "TLS-ALPN-01 answered by every instance sharing the store";
/// How long the standalone listener gives one validation handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The store key under which the challenge material for `domain` is published.
pub fn store_key(domain: &str) -> String {
    format!(
        "tls-alpn-01/{}",
        domain.trim_end_matches('.').to_ascii_lowercase()
    )
}

/// A TLS-ALPN-01 challenge certificate and its key, as PEM.
#[derive(Clone)]
pub struct ChallengeCert {
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for ChallengeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeCert").finish_non_exhaustive()
    }
}

impl ChallengeCert {
    /// Builds the challenge certificate for `domain` with the key authorization's
    /// SHA-256 `digest` (RFC 8737 §3), on a fresh P-256 key. For an IP address the
    /// certificate names it in an `iPAddress` SAN (RFC 8738 §6).
    pub fn new(domain: &DomainName, digest: &[u8; 32]) -> Result<Self> {
        let key = KeyType::EcdsaP256.generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec![domain.as_str().to_owned()]).map_err(|e| {
                Error::certificate(
                    CertificateErrorKind::Generation,
                    format!("cannot build challenge certificate: {e}"),
                )
                .with_source(e)
            })?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key).map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Generation,
                format!("cannot sign challenge certificate: {e}"),
            )
            .with_source(e)
        })?;
        Ok(ChallengeCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The key rustls serves.
    ///
    /// Unlike [`crate::CertBundle::certified_key`] this cannot check that the key matches:
    /// webpki refuses to parse a certificate with the critical, unknown-to-it
    /// `acmeIdentifier` extension. The pair is made together in [`ChallengeCert::new`].
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("bad challenge certificate PEM: {e}"),
            )
            .with_source(e)
        })?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                format!("bad challenge key PEM: {e}"),
            )
            .with_source(e)
        })?;
        let signing_key = crate::cert::crypto_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| {
                Error::certificate(
                    CertificateErrorKind::Unsupported,
                    format!("unusable challenge key: {e}"),
                )
                .with_source(e)
            })?;
        Ok(Arc::new(CertifiedKey::new(vec![cert], signing_key)))
    }

    /// The material as one string for a shared store: the certificate PEM, then the key PEM.
    pub fn to_store_value(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem.as_str())
    }

    /// Reads material written by [`ChallengeCert::to_store_value`].
    pub fn from_store_value(value: &str) -> Result<Self> {
        let split = value.find("-----BEGIN PRIVATE KEY-----").ok_or_else(|| {
            Error::certificate(
                CertificateErrorKind::Malformed,
                "shared TLS-ALPN-01 material holds no private key",
            )
        })?;
        let (cert, key) = value.split_at(split);
        let material = ChallengeCert {
            cert_pem: cert.to_owned(),
            key_pem: Zeroizing::new(key.to_owned()),
        };
        material.certified_key()?;
        Ok(material)
    }
}

/// Fetches the challenge material another instance published for `domain` and installs
/// it into `resolver`. Returns whether there was any. Call it when a cluster peer
/// announces a TLS-ALPN-01 challenge (the Redis store's pub/sub, for example).
pub async fn install_shared(
    resolver: &CertResolver,
    store: &DynStore,
    domain: &str,
) -> Result<bool> {
    let challenges = store.challenges_for(NEEDED_FOR)?;
    match challenges.get_challenge(&store_key(domain)).await? {
        Some(value) => {
            let cert = ChallengeCert::from_store_value(&value)?;
            resolver.set_challenge(domain, cert.certified_key()?);
            Ok(true)
        }
        None => {
            resolver.remove_challenge(domain);
            Ok(false)
        }
    }
}

/// The TLS-ALPN-01 solver: installs challenge certificates into a resolver.
#[derive(Debug, Clone)]
pub struct TlsAlpn01Solver {
    resolver: CertResolver,
    shared: Option<DynStore>,
}

impl TlsAlpn01Solver {
    /// A solver over `resolver`, which must be what answers port 443 (the proxy's own
    /// resolver, or a [`TlsAlpn01Listener`]'s).
    pub fn new(resolver: CertResolver) -> Self {
        TlsAlpn01Solver {
            resolver,
            shared: None,
        }
    }

    /// Also publishes the material to `store` for other instances of a cluster.
    /// Refused when the store keeps no challenge tokens ([`ChallengeStore`]).
    ///
    /// [`ChallengeStore`]: crate::store::ChallengeStore
    pub fn with_shared_store(resolver: CertResolver, store: DynStore) -> Result<Self> {
        store.challenges_for(NEEDED_FOR)?;
        Ok(TlsAlpn01Solver {
            resolver,
            shared: Some(store),
        })
    }

    /// The resolver the challenge certificates go into.
    pub fn resolver(&self) -> &CertResolver {
        &self.resolver
    }
}

#[async_trait]
impl Solver for TlsAlpn01Solver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::TlsAlpn01
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        let cert = ChallengeCert::new(&challenge.domain, &challenge.digest)?;
        // The name the CA's validation handshake sends: for an IP address its
        // reverse-DNS name (RFC 8738 §6).
        let server_name = challenge.domain.tls_alpn_server_name();
        self.resolver
            .set_challenge(&server_name, cert.certified_key()?);
        if let Some(store) = &self.shared {
            store
                .challenges_for(NEEDED_FOR)?
                .put_challenge(&store_key(&server_name), &cert.to_store_value(), SHARED_TTL)
                .await?;
            // Other instances install the certificate when the store's announcement
            // reaches them, and a handshake cannot wait for it (resolving is
            // synchronous): give the announcement a moment before the CA is told to
            // validate, which it may do at once, on any instance.
            tokio::time::sleep(SHARED_PROPAGATION).await;
        }
        Ok(())
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        let server_name = challenge.domain.tls_alpn_server_name();
        self.resolver.remove_challenge(&server_name);
        if let Some(store) = &self.shared {
            store
                .challenges_for(NEEDED_FOR)?
                .delete_challenge(&store_key(&server_name))
                .await?;
        }
        Ok(())
    }
}

/// A standalone TLS listener that completes `acme-tls/1` handshakes with the challenge
/// certificates in its resolver, then closes. Stops when dropped.
#[derive(Debug)]
pub struct TlsAlpn01Listener {
    task: ListenerTask,
}

impl TlsAlpn01Listener {
    /// Binds `addr` and answers validation handshakes from `resolver`'s challenge certificates.
    pub async fn bind(addr: SocketAddr, resolver: CertResolver) -> Result<Self> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(crate::cert::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
                .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let task = ListenerTask::spawn(addr, |listener| answer(listener, acceptor)).await?;
        Ok(TlsAlpn01Listener { task })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.task.local_addr()
    }
}

/// Completes every validation handshake `listener` accepts, then closes the connection.
async fn answer(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "TLS-ALPN-01 listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(mut tls)) => {
                    let _ = tls.shutdown().await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS-ALPN-01 handshake failed"),
                Err(_) => tracing::debug!("TLS-ALPN-01 handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_certificate_carries_the_critical_acme_identifier() {
        use x509_parser::prelude::*;
        let domain = DomainName::parse("alpn.example.com").unwrap();
        let digest = [7u8; 32];
        let cert = ChallengeCert::new(&domain, &digest).unwrap();
        let key = cert.certified_key().unwrap();
        let (_, parsed) = X509Certificate::from_der(key.cert[0].as_ref()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of 32 bytes: tag 0x04, length 0x20, then the digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            [GeneralName::DNSName("alpn.example.com")]
        );
    }

    #[test]
    fn store_value_round_trips() {
        let domain = DomainName::parse("alpn.example.com").unwrap();
        let cert = ChallengeCert::new(&domain, &[1u8; 32]).unwrap();
        let back = ChallengeCert::from_store_value(&cert.to_store_value()).unwrap();
        assert_eq!(
            back.certified_key().unwrap().cert,
            cert.certified_key().unwrap().cert
        );
        assert!(ChallengeCert::from_store_value("junk").is_err());
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }
}
