//! The certificate resolver a proxy hands to rustls: lock-free reads over an `ArcSwap`
//! snapshot (see `published`), exact names first, then a
//! one-label wildcard, then an optional default.
//! TLS-ALPN-01 challenge certificates are served to clients that offer only `acme-tls/1`.

mod local_addr;
mod name_map;
mod published;

pub use local_addr::{LocalAddrConfigs, LocalAddrResolver};

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use name_map::NameMap;
use published::Published;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Default, Clone)]
struct Snapshot {
    /// Exact names, lower-case, no trailing dot.
    exact: NameMap,
    /// Wildcards by the name they cover one label under: `*.example.com` is kept as `example.com`.
    wildcard: NameMap,
    /// Served for no SNI and unknown names.
    default: Option<Arc<CertifiedKey>>,
    /// The name whose certificate is served for no SNI and unknown names, ahead of
    /// `default`: looked up at handshake time, so it follows renewals.
    default_name: Option<String>,
    /// TLS-ALPN-01 challenge certificates by name.
    challenges: NameMap,
}

impl Snapshot {
    /// Serves `key` for `name` (already normalised): an exact name or a `*.` wildcard.
    fn insert(&mut self, name: &str, key: &Arc<CertifiedKey>) {
        match name.strip_prefix("*.") {
            Some(base) => self.wildcard.insert(base, key.clone()),
            None => self.exact.insert(name, key.clone()),
        };
    }

    /// What a client asking for `name` (normalised; `None` without SNI) is served.
    fn serve(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        match name {
            Some(name) => self.find(name).cloned(),
            None => self.fallback().cloned(),
        }
    }

    /// Exact name, then a one-label wildcard, then the default. `name` is normalised.
    fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        self.named(name).or_else(|| self.fallback())
    }

    /// Exact name, then a one-label wildcard. `name` is normalised.
    fn named(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        // One label only: `*.example.com` covers `a.example.com`, not `a.b.example.com`
        // and not `example.com`.
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// For no SNI and unknown names: the default name's certificate, else the default.
    fn fallback(&self) -> Option<&Arc<CertifiedKey>> {
        let by_name = self
            .default_name
            .as_deref()
            .and_then(|name| match name.strip_prefix("*.") {
                Some(base) => self.wildcard.get(base),
                None => self.named(name),
            });
        by_name.or(self.default.as_ref())
    }
}

/// A `ResolvesServerCert` whose certificates can be replaced at any time without
/// blocking or failing a handshake.
///
/// Writers copy the snapshot (sharing every shard of its name maps they leave alone) and
/// swap it in; a handshake loads the snapshot now, without a lock. Cheap to clone: every
/// clone shares the same certificates.
#[derive(Clone, Default)]
pub struct CertResolver {
    published: Arc<Published>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.published.load();
        f.debug_struct("CertResolver")
            .field("exact", &snap.exact.len())
            .field("wildcard", &snap.wildcard.len())
            .field("default", &snap.default.is_some())
            .field("default_name", &snap.default_name)
            .field("challenges", &snap.challenges.len())
            .finish()
    }
}

impl CertResolver {
    /// An empty resolver: it refuses every handshake until a certificate is added.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, change: impl Fn(&mut Snapshot)) {
        self.published.update(change);
    }

    /// Serves `key` for each of `names` (exact names and `*.` wildcards), replacing
    /// whatever those names had.
    pub fn set<S: AsRef<str>>(&self, names: &[S], key: Arc<CertifiedKey>) {
        let names: Vec<String> = names
            .iter()
            .map(|n| normalize(n.as_ref()).into_owned())
            .collect();
        self.update(|snap| {
            for name in &names {
                snap.insert(name, &key);
            }
        });
    }

    /// Serves many certificates with one swap: each entry is a set of names and the key
    /// served for them. Loading thousands of certificates this way costs one snapshot
    /// copy instead of one per certificate.
    pub fn set_many<S: AsRef<str>>(&self, entries: &[(Vec<S>, Arc<CertifiedKey>)]) {
        let entries: Vec<(Vec<String>, &Arc<CertifiedKey>)> = entries
            .iter()
            .map(|(names, key)| {
                let names = names
                    .iter()
                    .map(|n| normalize(n.as_ref()).into_owned())
                    .collect();
                (names, key)
            })
            .collect();
        self.update(|snap| {
            for (names, key) in &entries {
                for name in names {
                    snap.insert(name, key);
                }
            }
        });
    }

    /// Stops serving `names`.
    pub fn remove<S: AsRef<str>>(&self, names: &[S]) {
        let names: Vec<String> = names
            .iter()
            .map(|n| normalize(n.as_ref()).into_owned())
            .collect();
        self.update(|snap| {
            for name in &names {
                match name.strip_prefix("*.") {
                    Some(base) => snap.wildcard.remove(base),
                    None => snap.exact.remove(name),
                };
            }
        });
    }

    /// Sets the certificate for clients that send no SNI or an unknown name. Without
    /// one, such handshakes are refused.
    pub fn set_default(&self, key: Option<Arc<CertifiedKey>>) {
        self.update(|snap| snap.default = key.clone());
    }

    /// Serves the certificate of DNS name `name` (an exact name or a `*.` wildcard) to
    /// clients that send no SNI or an unknown name. The name is looked up at handshake
    /// time, so the default follows every later change of that name's certificate (a
    /// renewal, a reload). While `name` has no certificate, the one from
    /// [`set_default`](Self::set_default) is served, if any. `None` turns it off.
    pub fn set_default_name(&self, name: Option<&str>) {
        let name = name.map(|n| normalize(n).into_owned());
        self.update(|snap| snap.default_name = name.clone());
    }

    /// Serves a TLS-ALPN-01 challenge certificate for `name` to `acme-tls/1` clients.
    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalize(name);
        self.update(|snap| {
            snap.challenges.insert(&name, key.clone());
        });
    }

    /// Removes the TLS-ALPN-01 challenge certificate for `name`.
    pub fn remove_challenge(&self, name: &str) {
        let name = normalize(name);
        self.update(|snap| {
            snap.challenges.remove(&name);
        });
    }

    /// The certificate a client asking for `server_name` gets, by the same rules as a handshake.
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = server_name.map(normalize);
        self.published.read(|snap| snap.serve(name.as_deref()))
    }

    /// Whether `name` has a certificate of its own (an exact name or a one-label
    /// wildcard), not counting the default: what on-demand issuance asks before it
    /// orders.
    pub fn covers(&self, name: &str) -> bool {
        let name = normalize(name);
        self.published.read(|snap| snap.named(&name).is_some())
    }

    /// Whether a TLS-ALPN-01 challenge certificate is installed for `name`.
    pub fn has_challenge(&self, name: &str) -> bool {
        self.published
            .load()
            .challenges
            .get(&normalize(name))
            .is_some()
    }

    /// The number of exact and wildcard names served.
    pub fn len(&self) -> usize {
        let snap = self.published.load();
        snap.exact.len() + snap.wildcard.len()
    }

    /// Whether no name is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls lower-cases the SNI before a resolver sees it; only a trailing dot can
        // be left, so the byte scan of `normalize` is not needed here.
        let name = hello
            .server_name()
            .map(|name| name.strip_suffix('.').unwrap_or(name));
        let mut alpn = hello.alpn().into_iter().flatten();
        let acme_only = matches!((alpn.next(), alpn.next()), (Some(ACME_TLS_ALPN), None));
        self.published.read(|snap| {
            if acme_only {
                return snap.challenges.get(name?).cloned();
            }
            snap.serve(name)
        })
    }
}

/// Lower-case without a trailing dot; borrows when the name already is (the common case),
/// so a handshake allocates nothing here.
fn normalize(name: &str) -> Cow<'_, str> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{CertBundle, KeyType};

    /// A self-signed certificate for `name`, ready to serve.
    pub(super) fn key_for(name: &str) -> Arc<CertifiedKey> {
        let key = KeyType::EcdsaP256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        CertBundle::from_pem(cert.pem(), key.serialize_pem())
            .unwrap()
            .certified_key()
            .unwrap()
    }

    /// What `resolve` gets for a real ClientHello a rustls client writes for `server_name`
    /// with `alpn`, parsed by rustls's server side.
    fn resolve_hello(
        resolver: &CertResolver,
        server_name: &str,
        alpn: &[&[u8]],
    ) -> Option<Arc<CertifiedKey>> {
        let mut config =
            rustls::ClientConfig::builder_with_provider(crate::cert::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        client.write_tls(&mut bytes).unwrap();
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor.read_tls(&mut &bytes[..]).unwrap();
        let accepted = acceptor.accept().ok().flatten().unwrap();
        resolver.resolve(accepted.client_hello())
    }

    #[test]
    fn handshakes_match_any_case_and_only_acme_tls_alone_gets_the_challenge() {
        let resolver = CertResolver::new();
        let key = key_for("a.example.com");
        let challenge = key_for("a.example.com");
        resolver.set(&["a.example.com"], key.clone());
        resolver.set_challenge("a.example.com", challenge.clone());
        // `resolve` relies on rustls lower-casing the SNI: this pins that it does.
        let served = resolve_hello(&resolver, "A.Example.COM", &[b"http/1.1"]).unwrap();
        assert!(Arc::ptr_eq(&served, &key));
        let served = resolve_hello(&resolver, "a.example.com", &[ACME_TLS_ALPN]).unwrap();
        assert!(Arc::ptr_eq(&served, &challenge));
        let served = resolve_hello(&resolver, "a.example.com", &[ACME_TLS_ALPN, b"h2"]).unwrap();
        assert!(
            Arc::ptr_eq(&served, &key),
            "acme-tls/1 among others is not a validation"
        );
        assert!(resolve_hello(&resolver, "b.example.com", &[ACME_TLS_ALPN]).is_none());
    }

    #[test]
    fn a_swap_on_one_thread_is_seen_by_a_thread_that_read_before() {
        let resolver = CertResolver::new();
        let old = key_for("a.example.com");
        let new = key_for("a.example.com");
        resolver.set(&["a.example.com"], old.clone());
        let (to_reader, reader_rx) = std::sync::mpsc::channel::<()>();
        let (to_writer, writer_rx) = std::sync::mpsc::channel::<Arc<CertifiedKey>>();
        let reader = {
            let resolver = resolver.clone();
            std::thread::spawn(move || {
                // Reads before the swap, then after it.
                to_writer
                    .send(resolver.lookup(Some("a.example.com")).unwrap())
                    .unwrap();
                reader_rx.recv().unwrap();
                to_writer
                    .send(resolver.lookup(Some("a.example.com")).unwrap())
                    .unwrap();
            })
        };
        assert!(Arc::ptr_eq(&writer_rx.recv().unwrap(), &old));
        resolver.set(&["a.example.com"], new.clone());
        to_reader.send(()).unwrap();
        assert!(Arc::ptr_eq(&writer_rx.recv().unwrap(), &new));
        reader.join().unwrap();
    }

    #[test]
    fn a_dropped_resolver_is_not_kept_alive_by_a_thread_that_read_from_it() {
        let key = key_for("a.example.com");
        for _ in 0..20 {
            let resolver = CertResolver::new();
            resolver.set(&["a.example.com"], key.clone());
            assert!(resolver.lookup(Some("a.example.com")).is_some());
        }
        assert_eq!(Arc::strong_count(&key), 1);
    }

    #[test]
    fn a_rotated_key_is_not_kept_alive_by_an_idle_thread_that_served_it() {
        let resolver = CertResolver::new();
        let old = key_for("a.example.com");
        resolver.set(&["a.example.com"], old.clone());
        let (read, has_read) = std::sync::mpsc::channel();
        let reader = {
            let resolver = resolver.clone();
            std::thread::spawn(move || {
                assert!(resolver.lookup(Some("a.example.com")).is_some());
                read.send(()).unwrap();
                // Stays alive, idle, past the rotation.
                std::thread::park();
            })
        };
        has_read.recv().unwrap();
        resolver.set(&["a.example.com"], key_for("a.example.com"));
        // Only this test holds the rotated key (and its private key) now.
        assert_eq!(Arc::strong_count(&old), 1);
        reader.thread().unpark();
        reader.join().unwrap();
    }

    #[test]
    fn exact_beats_wildcard_and_wildcard_covers_one_label() {
        let resolver = CertResolver::new();
        let exact = key_for("a.example.com");
        let wild = key_for("*.example.com");
        resolver.set(&["a.example.com"], exact.clone());
        resolver.set(&["*.example.com"], wild.clone());
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("a.example.com")).unwrap(),
            &exact
        ));
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("b.example.com")).unwrap(),
            &wild
        ));
        assert!(resolver.lookup(Some("x.b.example.com")).is_none());
        assert!(resolver.lookup(Some("example.com")).is_none());
    }

    #[test]
    fn matching_ignores_case_and_trailing_dot() {
        let resolver = CertResolver::new();
        let key = key_for("a.example.com");
        resolver.set(&["A.Example.com."], key.clone());
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("A.EXAMPLE.COM.")).unwrap(),
            &key
        ));
    }

    #[test]
    fn default_serves_no_sni_and_unknown_names_only_when_set() {
        let resolver = CertResolver::new();
        assert!(resolver.lookup(None).is_none());
        assert!(resolver.lookup(Some("unknown.example")).is_none());
        let fallback = key_for("fallback.example");
        resolver.set_default(Some(fallback.clone()));
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &fallback));
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("unknown.example")).unwrap(),
            &fallback
        ));
    }

    #[test]
    fn default_name_follows_its_certificate_and_yields_to_nothing_else() {
        let resolver = CertResolver::new();
        let fallback = key_for("fallback.example");
        resolver.set_default(Some(fallback.clone()));
        resolver.set_default_name(Some("App.Example."));
        // No certificate for the name yet: the plain default still answers.
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &fallback));

        let first = key_for("app.example");
        resolver.set(&["app.example"], first.clone());
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &first));
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("unknown.example")).unwrap(),
            &first
        ));
        // A renewal swaps the name's key; the default follows without being told.
        let renewed = key_for("app.example");
        resolver.set(&["app.example"], renewed.clone());
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &renewed));

        // A wildcard default name is looked up as the wildcard, not as a host under it.
        let wildcard = key_for("*.wild.example");
        resolver.set(&["*.wild.example"], wildcard.clone());
        resolver.set_default_name(Some("*.wild.example"));
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &wildcard));

        resolver.set_default_name(None);
        assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &fallback));
        resolver.set_default(None);
        assert!(resolver.lookup(None).is_none());
    }

    #[test]
    fn set_many_serves_every_entry() {
        let resolver = CertResolver::new();
        let a = key_for("a.example.com");
        let wild = key_for("*.b.example.com");
        resolver.set_many(&[
            (vec!["a.example.com"], a.clone()),
            (vec!["*.b.example.com", "b.example.com"], wild.clone()),
        ]);
        assert_eq!(resolver.len(), 3);
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("a.example.com")).unwrap(),
            &a
        ));
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("x.b.example.com")).unwrap(),
            &wild
        ));
    }

    #[test]
    fn set_replaces_and_remove_forgets() {
        let resolver = CertResolver::new();
        let old = key_for("a.example.com");
        let new = key_for("a.example.com");
        resolver.set(&["a.example.com"], old);
        resolver.set(&["a.example.com"], new.clone());
        assert!(Arc::ptr_eq(
            &resolver.lookup(Some("a.example.com")).unwrap(),
            &new
        ));
        assert_eq!(resolver.len(), 1);
        resolver.remove(&["a.example.com"]);
        assert!(resolver.is_empty());
    }
}
