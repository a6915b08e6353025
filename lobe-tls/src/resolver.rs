//! The certificate resolver a proxy hands to rustls: lock-free reads over an `ArcSwap`
//! snapshot, exact names first, then a one-label wildcard, then an optional default.
//! TLS-ALPN-01 challenge certificates are served to clients that offer only `acme-tls/1`.

mod name_map;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use name_map::NameMap;

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

    /// Exact name, then a one-label wildcard, then the default. `name` is normalised.
    fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        // One label only: `*.example.com` covers `a.example.com`, not `a.b.example.com`
        // and not `example.com`.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return Some(key);
        }
        self.default.as_ref()
    }
}

/// A `ResolvesServerCert` whose certificates can be replaced at any time without
/// blocking or failing a handshake.
///
/// Writers copy the snapshot (sharing every shard of its name maps they leave alone) and
/// swap it in; readers take one atomic load. Cheap to clone: every clone shares the same
/// certificates.
#[derive(Clone, Default)]
pub struct CertResolver {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.snapshot.load();
        f.debug_struct("CertResolver")
            .field("exact", &snap.exact.len())
            .field("wildcard", &snap.wildcard.len())
            .field("default", &snap.default.is_some())
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
        self.snapshot.rcu(|current| {
            let mut next = Snapshot::clone(current);
            change(&mut next);
            next
        });
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
        let snap = self.snapshot.load();
        match server_name {
            Some(name) => snap.find(&normalize(name)).cloned(),
            None => snap.default.clone(),
        }
    }

    /// Whether a TLS-ALPN-01 challenge certificate is installed for `name`.
    pub fn has_challenge(&self, name: &str) -> bool {
        self.snapshot
            .load()
            .challenges
            .get(&normalize(name))
            .is_some()
    }

    /// The number of exact and wildcard names served.
    pub fn len(&self) -> usize {
        let snap = self.snapshot.load();
        snap.exact.len() + snap.wildcard.len()
    }

    /// Whether no name is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut alpn = hello.alpn().into_iter().flatten();
        let acme_only = matches!((alpn.next(), alpn.next()), (Some(ACME_TLS_ALPN), None));
        if acme_only {
            let name = normalize(hello.server_name()?);
            return self.snapshot.load().challenges.get(&name).cloned();
        }
        self.lookup(hello.server_name())
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
