//! Which store a `--store`-style value names, opening it, and the name a default
//! certificate from it is served under.
//!
//! A value is a directory, or a URL whose scheme names Redis: `redis://`, `rediss://`
//! (TLS), `redis+sentinel://` or `rediss+sentinel://` (through Sentinel),
//! `redis+cluster://` or `rediss+cluster://` (a Redis Cluster). Any other
//! `scheme://` is refused rather than taken for a directory, so a mistyped URL does not
//! quietly become a new empty store (nor a directory named after a password).
//!
//! A URL can carry a password (`redis://:PASSWORD@host/0`), so a [`StoreSpec`] never
//! shows it: its `Display` and `Debug` use [`redact_url`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "redis")]
use super::RedisStore;
use super::{DynStore, FileStore, Store};
use crate::domain::DomainName;
use crate::error::{Error, Result};

/// The URL schemes that name a Redis store. The Sentinel and cluster ones go to
/// [`RedisStore::connect`] like the others.
pub const REDIS_SCHEMES: [&str; 6] = [
    "redis",
    "rediss",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
];

/// A store named by a `--store`-style value.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreSpec {
    /// A directory store (certbot's layout).
    Dir(PathBuf),
    /// A Redis store, by its URL (which may hold a password).
    Redis(String),
}

impl StoreSpec {
    /// Reads `spec`: a Redis URL (see [`REDIS_SCHEMES`]) or a directory path. Another
    /// `scheme://` is an error that names the supported ones.
    ///
    /// ```
    /// use lobe_tls::store::StoreSpec;
    /// assert!(StoreSpec::parse("redis+sentinel://h1:26379,h2:26379/mymaster").unwrap().is_redis());
    /// assert!(StoreSpec::parse("redis+cluster://h1:7000,h2:7000/").unwrap().is_redis());
    /// assert!(!StoreSpec::parse("/var/lib/lobe-tls").unwrap().is_redis());
    /// assert!(StoreSpec::parse("mysql://db/certs").is_err());
    /// ```
    pub fn parse(spec: &str) -> Result<StoreSpec> {
        match url_scheme(spec) {
            None => Ok(StoreSpec::Dir(PathBuf::from(spec))),
            Some(scheme) if REDIS_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => {
                Ok(StoreSpec::Redis(spec.to_owned()))
            }
            // Only the scheme is echoed: the rest may hold a password.
            Some(scheme) => Err(Error::config(format!(
                "unsupported store URL scheme {scheme}://; give a directory, or a redis://, rediss://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster:// URL"
            ))),
        }
    }

    /// Whether this names a Redis store, shared by a cluster.
    pub fn is_redis(&self) -> bool {
        matches!(self, StoreSpec::Redis(_))
    }

    /// The directory a web server reads for certificate `name`: `<dir>/live/<name>` for a
    /// directory store, `None` for Redis.
    pub fn live_dir(&self, name: &str) -> Option<PathBuf> {
        match self {
            StoreSpec::Dir(dir) => Some(dir.join("live").join(name)),
            StoreSpec::Redis(_) => None,
        }
    }

    /// Opens the store, creating a directory store if it is missing. A Redis store is
    /// checked with a PING, so a wrong address or password fails here.
    pub async fn open(&self) -> Result<DynStore> {
        match self {
            StoreSpec::Dir(dir) => Ok(Arc::new(FileStore::open(dir)?)),
            #[cfg(feature = "redis")]
            StoreSpec::Redis(url) => Ok(Arc::new(RedisStore::connect(url).await?)),
            #[cfg(not(feature = "redis"))]
            StoreSpec::Redis(_) => Err(crate::error::Error::config(
                "this build of lobe-tls has no Redis support (the `redis` feature is off); give a directory as the store",
            )),
        }
    }

    /// Opens a store that must exist already: a directory that is missing is an error
    /// (a mistyped path must not read as an empty store), not a new store.
    pub async fn open_existing(&self) -> Result<DynStore> {
        if let StoreSpec::Dir(dir) = self
            && !dir.is_dir()
        {
            return Err(Error::config(format!(
                "store {} does not exist or is not a directory; check --store (env LOBE_TLS_STORE)",
                dir.display()
            )));
        }
        self.open().await
    }

    /// The directory, for a directory store.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            StoreSpec::Dir(dir) => Some(dir),
            StoreSpec::Redis(_) => None,
        }
    }
}

/// Without the password: safe for messages and logs.
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Dir(dir) => write!(f, "{}", dir.display()),
            StoreSpec::Redis(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Dir(dir) => f.debug_tuple("Dir").field(dir).finish(),
            StoreSpec::Redis(url) => f.debug_tuple("Redis").field(&redact_url(url)).finish(),
        }
    }
}

/// The DNS name whose certificate a server hands to clients that send no SNI or an
/// unknown name, for `name` as a user gives it (`serve --default-name`), for
/// [`CertResolver::set_default_name`](crate::CertResolver::set_default_name):
///
/// - the first domain of the certificate stored under `name` in `store`;
/// - else `name` itself, when it is a DNS name (or a `*.` wildcard);
/// - else, for a store name such as `_.example.com` not stored yet, the wildcard
///   `*.example.com` it stands for (see [`crate::domain::store_name`]).
///
/// `None` when `name` is none of these. A stored certificate that cannot be read counts
/// as not stored: the name rules still apply.
pub async fn default_server_name(store: &dyn Store, name: &str) -> Option<String> {
    if !name.contains('*') {
        match store.load_cert(name).await {
            Ok(Some(stored)) => {
                if let Some(first) = stored.meta.domains.first() {
                    return Some(first.as_str().to_owned());
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(name, error = %e, "default certificate not readable from the store; using the name as given");
            }
        }
    }
    if let Ok(domain) = DomainName::parse(name) {
        return Some(domain.as_str().to_owned());
    }
    let wildcard = format!("*.{}", name.strip_prefix("_.")?);
    DomainName::parse(&wildcard)
        .ok()
        .map(|d| d.as_str().to_owned())
}

/// The scheme of `spec` if it starts with `scheme://` (RFC 3986 scheme characters).
fn url_scheme(spec: &str) -> Option<&str> {
    let (scheme, _) = spec.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// `url` with its user information (`user:password@`) and any `pass=`/`password=` query
/// value replaced by `***`, for messages and logs.
///
/// Errs on the side of hiding: everything up to the last `@` after `://` is user
/// information, so a password holding `/`, `?` or `#` is hidden too.
///
/// ```
/// use lobe_tls::store::redact_url;
/// assert_eq!(redact_url("redis://:s3cret@h:6379/0"), "redis://***@h:6379/0");
/// assert_eq!(redact_url("redis+sentinel://u:p@a:1,b:2/svc"), "redis+sentinel://***@a:1,b:2/svc");
/// assert_eq!(redact_url("redis://h:6379/0?pass=x&prefix=p"), "redis://h:6379/0?pass=***&prefix=p");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match rest.rfind('@') {
        Some(at) => format!("***@{}", &rest[at + 1..]),
        None => rest.to_owned(),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return format!("{scheme}://{rest}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password") =>
            {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{base}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_schemes_are_redis_and_paths_are_directories() {
        for spec in [
            "redis://h/0",
            "rediss://:p@h:6380/1",
            "redis+sentinel://h1:26379,h2:26379/mymaster",
            "rediss+sentinel://:p@h:26379/svc/2?prefix=x",
            "REDIS://h",
        ] {
            assert!(StoreSpec::parse(spec).unwrap().is_redis(), "{spec}");
        }
        for spec in ["/var/lib/lobe-tls", "store", "./a:b", "C:/x"] {
            let parsed = StoreSpec::parse(spec).unwrap();
            assert_eq!(parsed, StoreSpec::Dir(PathBuf::from(spec)));
            assert_eq!(
                parsed.live_dir("n"),
                Some(PathBuf::from(spec).join("live/n"))
            );
        }
        assert_eq!(StoreSpec::parse("redis://h").unwrap().live_dir("n"), None);
    }

    #[test]
    fn an_unknown_scheme_is_refused_without_echoing_the_rest() {
        let err = StoreSpec::parse("redsi://:hunter2@h/0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redsi://") && err.contains("redis://"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn display_and_debug_hide_the_password() {
        let spec = StoreSpec::parse("redis://user:hunter2@h:6379/0").unwrap();
        assert_eq!(spec.to_string(), "redis://***@h:6379/0");
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn redaction_hides_awkward_passwords_too() {
        for url in [
            "redis://:hun/ter2@h/0",
            "redis://:hun?ter2@h/0",
            "redis://:hun#ter2@h/0",
            "redis://:hun@ter2@h/0",
            "redis://h/0?password=hunter2",
            "redis://h/0?a=b&PASS=hunter2",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("ter2"), "{url} -> {shown}");
        }
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("/var/lib/x"), "/var/lib/x");
    }

    #[tokio::test]
    async fn default_server_name_prefers_the_stored_certificate_then_the_name_rules() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let key = crate::KeyType::EcdsaP256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.example.com".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        store
            .save_cert(&crate::StoredCert {
                bundle: crate::CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap(),
                meta: crate::CertMeta {
                    name: "site".into(),
                    domains: vec![DomainName::parse("app.example.com").unwrap()],
                    key_type: crate::KeyType::EcdsaP256,
                    challenge: Default::default(),
                    directory: "https://ca.test/dir".into(),
                    issued_at: time::OffsetDateTime::now_utc(),
                    profile: None,
                },
            })
            .await
            .unwrap();
        let name = |n: &'static str| default_server_name(&store, n);
        assert_eq!(name("site").await.as_deref(), Some("app.example.com"));
        assert_eq!(
            name("Other.Example.com").await.as_deref(),
            Some("other.example.com")
        );
        assert_eq!(
            name("*.example.com").await.as_deref(),
            Some("*.example.com")
        );
        assert_eq!(
            name("_.example.com").await.as_deref(),
            Some("*.example.com")
        );
        assert_eq!(name("nothing").await, None);
    }

    #[tokio::test]
    async fn open_existing_refuses_a_missing_directory_and_does_not_create_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let spec = StoreSpec::parse(missing.to_str().unwrap()).unwrap();
        let err = spec.open_existing().await.unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!missing.exists());
        spec.open().await.unwrap();
        assert!(missing.is_dir());
        spec.open_existing().await.unwrap();
    }
}
