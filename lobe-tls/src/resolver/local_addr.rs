//! IP address certificates (RFC 8738) for clients that send no SNI.
//!
//! A client that connects to `https://192.0.2.10/` sends no server name (RFC 6066 allows
//! none for a literal address), so the certificate must be chosen by the local address
//! the connection came in on. rustls's `ClientHello` does not carry that address, so the
//! choice is made per connection: [`LocalAddrResolver`] is a view of a resolver that
//! knows its connection's local address, and [`LocalAddrConfigs`] keeps one rustls
//! `ServerConfig` per local address around it, for an accept loop (the terminator's, or
//! any embedder's) to pick from after `accept()`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{ACME_TLS_ALPN, CertResolver};

/// How many local addresses get a cached configuration. Only addresses with an IP
/// certificate are kept, and a host has a handful; past this, configurations are built
/// per connection rather than kept without bound.
const MAX_CACHED_ADDRS: usize = 256;

/// A resolver for the connections that arrive on one local address: a client that sends
/// no server name gets the certificate issued for that address, if there is one; every
/// other handshake is resolved by the base resolver as usual.
pub struct LocalAddrResolver {
    base: Arc<dyn ResolvesServerCert>,
    certs: CertResolver,
    local: IpAddr,
}

impl std::fmt::Debug for LocalAddrResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAddrResolver")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl LocalAddrResolver {
    /// Resolves through `base`, except that a client without SNI gets `certs`'s
    /// certificate for the address `local`, when it holds one.
    pub fn new(base: Arc<dyn ResolvesServerCert>, certs: CertResolver, local: IpAddr) -> Self {
        LocalAddrResolver {
            base,
            certs,
            local: local.to_canonical(),
        }
    }
}

impl ResolvesServerCert for LocalAddrResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_only = hello
            .alpn()
            .is_some_and(|mut alpn| alpn.next() == Some(ACME_TLS_ALPN) && alpn.next().is_none());
        if hello.server_name().is_none()
            && !acme_only
            && let Some(key) = self.certs.ip_cert(self.local)
        {
            return Some(key);
        }
        self.base.resolve(hello)
    }
}

impl CertResolver {
    /// The certificate issued for the IP address `ip` (one whose SANs name it), if any.
    pub fn ip_cert(&self, ip: IpAddr) -> Option<Arc<CertifiedKey>> {
        let name = ip.to_canonical().to_string();
        self.published.read(|snap| snap.exact.get(&name).cloned())
    }

    /// A view of this resolver for connections accepted on the local address `addr`:
    /// clients that send no SNI get the certificate for `addr`, if one is served, and
    /// otherwise what [`CertResolver::lookup`] gives them.
    pub fn for_local_addr(&self, addr: IpAddr) -> Arc<dyn ResolvesServerCert> {
        Arc::new(LocalAddrResolver::new(
            Arc::new(self.clone()),
            self.clone(),
            addr,
        ))
    }
}

/// One rustls `ServerConfig` per local address that has an IP address certificate, each
/// the base configuration with its resolver wrapped in a [`LocalAddrResolver`] for that
/// address. Built on first use and kept (at most 256); other addresses
/// get the base configuration and no entry, since the local address may come from a
/// PROXY header and name anything. Cheap to share behind an `Arc`.
pub struct LocalAddrConfigs {
    base: Arc<ServerConfig>,
    certs: CertResolver,
    by_addr: Mutex<HashMap<IpAddr, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for LocalAddrConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.by_addr.lock().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("LocalAddrConfigs")
            .field("cached", &cached)
            .finish_non_exhaustive()
    }
}

impl LocalAddrConfigs {
    /// Configurations like `base` that also serve `certs`'s IP address certificates to
    /// clients without SNI.
    pub fn new(base: Arc<ServerConfig>, certs: CertResolver) -> Self {
        LocalAddrConfigs {
            base,
            certs,
            by_addr: Mutex::default(),
        }
    }

    /// The configuration for a connection accepted on the local address `local`.
    pub fn config_for(&self, local: IpAddr) -> Arc<ServerConfig> {
        let local = local.to_canonical();
        let mut cache = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = cache.get(&local) {
            return config.clone();
        }
        // No certificate for this address: the base configuration resolves exactly as a
        // wrapped one would, and an address this host does not serve takes no entry.
        if self.certs.ip_cert(local).is_none() {
            return self.base.clone();
        }
        let mut config = (*self.base).clone();
        config.cert_resolver = Arc::new(LocalAddrResolver::new(
            self.base.cert_resolver.clone(),
            self.certs.clone(),
            local,
        ));
        let config = Arc::new(config);
        if cache.len() < MAX_CACHED_ADDRS {
            cache.insert(local, config.clone());
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::key_for;
    use super::*;

    /// What a resolver gives a real rustls ClientHello for `server_name`, which for an
    /// IP address carries no SNI.
    fn resolve_for(
        resolver: &dyn ResolvesServerCert,
        server_name: &str,
    ) -> Option<Arc<CertifiedKey>> {
        let config = rustls::ClientConfig::builder_with_provider(crate::cert::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor.read_tls(&mut &bytes[..]).unwrap();
        let accepted = acceptor.accept().ok().flatten().unwrap();
        assert_eq!(
            accepted.client_hello().server_name().is_none(),
            server_name.parse::<IpAddr>().is_ok()
        );
        resolver.resolve(accepted.client_hello())
    }

    #[test]
    fn a_client_without_sni_gets_the_certificate_of_the_address_it_connected_to() {
        let resolver = CertResolver::new();
        let v4 = key_for("192.0.2.10");
        let v6 = key_for("2001:db8::1");
        let named = key_for("www.example.com");
        let default = key_for("default.example.com");
        resolver.set(&["192.0.2.10"], v4.clone());
        resolver.set(&["2001:db8::1"], v6.clone());
        resolver.set(&["www.example.com"], named.clone());
        resolver.set_default(Some(default.clone()));

        let on_v4 = resolver.for_local_addr("192.0.2.10".parse().unwrap());
        assert!(Arc::ptr_eq(
            &resolve_for(&*on_v4, "192.0.2.10").unwrap(),
            &v4
        ));
        // Names still win with SNI, on any address.
        assert!(Arc::ptr_eq(
            &resolve_for(&*on_v4, "www.example.com").unwrap(),
            &named
        ));
        // A dual-stack socket reports an IPv4 client's local address IPv4-mapped.
        let mapped = resolver.for_local_addr("::ffff:192.0.2.10".parse().unwrap());
        assert!(Arc::ptr_eq(
            &resolve_for(&*mapped, "192.0.2.10").unwrap(),
            &v4
        ));
        let on_v6 = resolver.for_local_addr("2001:db8::1".parse().unwrap());
        assert!(Arc::ptr_eq(
            &resolve_for(&*on_v6, "2001:db8::1").unwrap(),
            &v6
        ));
        // An address without a certificate of its own gets the default.
        let elsewhere = resolver.for_local_addr("198.51.100.1".parse().unwrap());
        assert!(Arc::ptr_eq(
            &resolve_for(&*elsewhere, "198.51.100.1").unwrap(),
            &default
        ));
        // The plain resolver knows no local address: the default.
        assert!(Arc::ptr_eq(
            &resolve_for(&resolver, "192.0.2.10").unwrap(),
            &default
        ));
    }

    fn configs_of(resolver: &CertResolver) -> LocalAddrConfigs {
        let base = rustls::ServerConfig::builder_with_provider(crate::cert::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver.clone()));
        LocalAddrConfigs::new(Arc::new(base), resolver.clone())
    }

    fn cached(configs: &LocalAddrConfigs) -> usize {
        configs
            .by_addr
            .lock()
            .map(|m| m.len())
            .unwrap_or(usize::MAX)
    }

    #[test]
    fn configs_are_kept_per_local_address_and_follow_renewals() {
        let resolver = CertResolver::new();
        let configs = configs_of(&resolver);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let key = key_for("127.0.0.1");
        resolver.set(&["127.0.0.1"], key.clone());
        let first = configs.config_for(ip);
        assert!(Arc::ptr_eq(&first, &configs.config_for(ip)));
        assert_eq!(cached(&configs), 1);
        let served = resolve_for(&*first.cert_resolver, "127.0.0.1").unwrap();
        assert!(Arc::ptr_eq(&served, &key));
        let renewed = key_for("127.0.0.1");
        resolver.set(&["127.0.0.1"], renewed.clone());
        let served = resolve_for(&*first.cert_resolver, "127.0.0.1").unwrap();
        assert!(Arc::ptr_eq(&served, &renewed));
    }

    #[test]
    fn addresses_without_a_certificate_get_the_base_config_and_no_entry() {
        let resolver = CertResolver::new();
        let default = key_for("default.example.com");
        resolver.set_default(Some(default.clone()));
        let configs = configs_of(&resolver);
        // Destinations a PROXY header names: any address at all.
        for i in 0..10_000u32 {
            let named = IpAddr::from(
                (0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + u128::from(i)).to_be_bytes(),
            );
            let config = configs.config_for(named);
            assert!(Arc::ptr_eq(&config, &configs.base));
        }
        assert_eq!(cached(&configs), 0);
        let served = resolve_for(
            &*configs
                .config_for("192.0.2.7".parse().unwrap())
                .cert_resolver,
            "192.0.2.7",
        );
        assert!(served.is_some_and(|key| Arc::ptr_eq(&key, &default)));
        // An address this host serves (it has a certificate) is kept.
        resolver.set(&["192.0.2.7"], key_for("192.0.2.7"));
        let _ = configs.config_for("192.0.2.7".parse().unwrap());
        assert_eq!(cached(&configs), 1);
    }
}
