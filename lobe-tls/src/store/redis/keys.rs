//! Where each piece lives: the store's key names, flat on one Redis (or behind Sentinel),
//! and with hash tags on a Redis Cluster.
//!
//! On one Redis (unchanged since the first release, so existing stores keep working):
//!
//! ```text
//! <prefix>:cert:<name>      <prefix>:state:<name>      <prefix>:lock:<name>
//! <prefix>:certs            set of certificate names
//! <prefix>:account:<key>    <prefix>:accounts (set of account keys)
//! <prefix>:secret:<name>    <prefix>:challenge:<key>   <prefix>:events (channel)
//! ```
//!
//! On a cluster every key of one certificate carries the certificate's name as its hash
//! tag, so the value, its renewal state and its lock share one slot, and a fenced save (a
//! script over the lock and the value) runs on one node. Accounts share one tag, so an
//! account and the account index are written in one transaction; secrets share another.
//! There is no certificate index (it would sit in one slot, apart from every value):
//! listing scans every master.
//!
//! ```text
//! <prefix>:cert:{<name>}    <prefix>:state:{<name>}    <prefix>:lock:{<name>}
//! <prefix>:challenge:{<key>}
//! {<prefix>:accounts}:<key> {<prefix>:accounts}:index
//! {<prefix>:secrets}:<name> <prefix>:events (a sharded channel where the server has them)
//! ```

/// The key names of one store.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
    /// Hash-tagged names, for a cluster.
    tagged: bool,
}

impl Keys {
    pub(super) fn new(prefix: String, tagged: bool) -> Self {
        Keys { prefix, tagged }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn set_prefix(&mut self, prefix: String) {
        self.prefix = prefix;
    }

    /// A per-certificate (or per-challenge) key: `cert`, `state`, `lock`, `challenge`,
    /// `write-probe`.
    fn per_name(&self, kind: &str, name: &str) -> String {
        if self.tagged {
            format!("{}:{kind}:{{{name}}}", self.prefix)
        } else {
            format!("{}:{kind}:{name}", self.prefix)
        }
    }

    pub(super) fn cert(&self, name: &str) -> String {
        self.per_name("cert", name)
    }

    pub(super) fn state(&self, name: &str) -> String {
        self.per_name("state", name)
    }

    pub(super) fn lock(&self, name: &str) -> String {
        self.per_name("lock", name)
    }

    pub(super) fn challenge(&self, key: &str) -> String {
        self.per_name("challenge", key)
    }

    pub(super) fn write_probe(&self, id: &str) -> String {
        self.per_name("write-probe", id)
    }

    /// The set of certificate names; none on a cluster, where listing scans.
    pub(super) fn certs_index(&self) -> Option<String> {
        (!self.tagged).then(|| format!("{}:certs", self.prefix))
    }

    pub(super) fn account(&self, key: &str) -> String {
        if self.tagged {
            format!("{{{}:accounts}}:{key}", self.prefix)
        } else {
            format!("{}:account:{key}", self.prefix)
        }
    }

    pub(super) fn accounts_index(&self) -> String {
        if self.tagged {
            format!("{{{}:accounts}}:index", self.prefix)
        } else {
            format!("{}:accounts", self.prefix)
        }
    }

    pub(super) fn secret(&self, name: &str) -> String {
        if self.tagged {
            format!("{{{}:secrets}}:{name}", self.prefix)
        } else {
            format!("{}:secret:{name}", self.prefix)
        }
    }

    /// The channel that announces changes.
    pub(super) fn channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// A `SCAN MATCH` pattern for the per-name keys of `kind` whose name starts with
    /// `name_prefix` (matched literally), and the part of a found key before the name.
    pub(super) fn scan_pattern(&self, kind: &str, name_prefix: &str) -> (String, String) {
        let head = if self.tagged {
            format!("{}:{kind}:{{", self.prefix)
        } else {
            format!("{}:{kind}:", self.prefix)
        };
        let pattern = format!("{}{}*", escape_glob(&head), escape_glob(name_prefix));
        (pattern, head)
    }

    /// The name in a per-name key that a scan with `head` found.
    pub(super) fn name_in<'k>(&self, key: &'k str, head: &str) -> Option<&'k str> {
        let rest = key.strip_prefix(head)?;
        if self.tagged {
            rest.strip_suffix('}')
        } else {
            Some(rest)
        }
    }
}

/// Escapes Redis glob characters so a string matches literally.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_certificate_shares_one_hash_tag_on_a_cluster() {
        let keys = Keys::new("app".into(), true);
        for key in [
            keys.cert("a.test"),
            keys.state("a.test"),
            keys.lock("a.test"),
        ] {
            assert!(key.ends_with(":{a.test}"), "{key}");
        }
        assert_eq!(keys.certs_index(), None);
        assert_eq!(keys.account("k1"), "{app:accounts}:k1");
        assert_eq!(keys.accounts_index(), "{app:accounts}:index");
        assert_eq!(keys.secret("tickets"), "{app:secrets}:tickets");
        let (pattern, head) = keys.scan_pattern("cert", "");
        assert_eq!(pattern, "app:cert:{*");
        assert_eq!(keys.name_in("app:cert:{a.test}", &head), Some("a.test"));
    }

    #[test]
    fn flat_names_are_those_of_existing_stores() {
        let keys = Keys::new("lobe-tls".into(), false);
        assert_eq!(keys.cert("a.test"), "lobe-tls:cert:a.test");
        assert_eq!(keys.certs_index().as_deref(), Some("lobe-tls:certs"));
        assert_eq!(keys.account("k"), "lobe-tls:account:k");
        assert_eq!(keys.accounts_index(), "lobe-tls:accounts");
        assert_eq!(keys.secret("s"), "lobe-tls:secret:s");
        let (pattern, head) = keys.scan_pattern("challenge", "http-01/a*b");
        assert_eq!(pattern, "lobe-tls:challenge:http-01/a\\*b*");
        assert_eq!(
            keys.name_in("lobe-tls:challenge:http-01/x", &head),
            Some("http-01/x")
        );
    }
}
