//! The one error type of the crate, with nested kinds for each concern.
//!
//! Each variant is a concern a caller can match on (`Error::Dns { kind:
//! DnsErrorKind::ProviderRefused, .. }`), and keeps the error that caused it as
//! [`std::error::Error::source`]. The message of a variant is already the whole line a
//! user reads, cause included, so that the CLI can print `Display` alone; `source()`
//! gives the same cause as a value, for code.

use std::path::PathBuf;

/// A cause kept as a value: any error that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in lobe-tls.
///
/// Each variant's `Display` is one line that says what failed and, where there is one,
/// what to do about it. The CLI prints it as it is. Build one with the constructors
/// ([`Error::config`], [`Error::store`], [`Error::dns`], ...) and add its cause with
/// [`Error::with_source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A domain name was rejected before anything was sent to the CA.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),

    /// The configuration asks for something that cannot work.
    #[error("{message}")]
    #[non_exhaustive]
    Config {
        /// The flag, variable or file key concerned (`--directory`, `eab_kid`, ...), where
        /// one is.
        key: Option<String>,
        /// The whole line, with what to change.
        message: String,
        /// The error that showed the value to be wrong (a parser's, for one).
        #[source]
        source: Option<BoxError>,
    },

    /// The ACME exchange failed in a way that is neither a problem document of the CA
    /// nor the CA being out of reach: an answer lobe-tls cannot use.
    #[error("{message}")]
    #[non_exhaustive]
    Acme {
        /// The whole line.
        message: String,
        /// The error of the ACME client, if there was one.
        #[source]
        source: Option<BoxError>,
    },

    /// The CA answered a request with an RFC 8555 problem document.
    #[error("{context}: {message}")]
    CaProblem {
        /// What was being done, e.g. "the CA refused the order".
        context: String,
        /// The problem type without its `urn:ietf:params:acme:error:` prefix
        /// (`rateLimited`, `alreadyReplaced`, `serverInternal`, ...), if the CA gave one.
        kind: Option<String>,
        /// The CA's detail and subproblems, one line.
        message: String,
        /// The error as instant-acme reported it: an [`instant_acme::Error`], boxed as a
        /// plain error so that `source()` yields it and it downcasts.
        #[source]
        source: BoxError,
        /// When the CA said to try again (`Retry-After`), if it did.
        retry_after: Option<time::OffsetDateTime>,
    },

    /// The CA could not be reached, did not answer within the request timeout, or failed
    /// on its side: a fault of the CA or of the path to it, not of the request, so a
    /// fallback CA is worth trying.
    #[error("{message}")]
    #[non_exhaustive]
    CaUnavailable {
        /// The whole line.
        message: String,
        /// The transport error.
        #[source]
        source: Option<BoxError>,
    },

    /// A challenge could not be set up or did not validate.
    #[error("{message}")]
    #[non_exhaustive]
    Challenge {
        /// What went wrong.
        kind: ChallengeErrorKind,
        /// The whole line, with the CA's problem detail where there is one.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// A DNS provider, a lookup, the propagation check or a CAA check failed.
    #[error("{message}")]
    #[non_exhaustive]
    Dns {
        /// The DNS provider concerned (`cloudflare`, `rfc2136`, ...), if one was.
        provider: Option<String>,
        /// What went wrong.
        kind: DnsErrorKind,
        /// The whole line.
        message: String,
        /// The underlying error (the HTTP or DNS client's, for instance).
        #[source]
        source: Option<BoxError>,
    },

    /// A certificate or key could not be parsed, made, or does not fit together.
    #[error("{message}")]
    #[non_exhaustive]
    Certificate {
        /// What went wrong.
        kind: CertificateErrorKind,
        /// The whole line.
        message: String,
        /// The parser's or generator's error.
        #[source]
        source: Option<BoxError>,
    },

    /// Reading or writing the store failed.
    #[error("store: {message}")]
    #[non_exhaustive]
    Store {
        /// The store (`"fs"`, `"redis"`, or a custom store's name), where it is known.
        backend: Option<&'static str>,
        /// What went wrong.
        kind: StoreErrorKind,
        /// The line after `store: `.
        message: String,
        /// The backend's error (Redis's, the file system's, a decoder's).
        #[source]
        source: Option<BoxError>,
    },

    /// A TLS configuration could not be built.
    #[error("{message}")]
    #[non_exhaustive]
    Tls {
        /// The whole line.
        message: String,
        /// The error rustls gave.
        #[source]
        source: rustls::Error,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Listen {
        /// The address that was asked for.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The operation did not finish in time.
    #[error("timed out: {message}")]
    #[non_exhaustive]
    Timeout {
        /// What did not finish, after `timed out: `.
        message: String,
        /// The timer's or the client's error, if one was kept.
        #[source]
        source: Option<BoxError>,
    },
}

/// What went wrong with a challenge ([`Error::Challenge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChallengeErrorKind {
    /// The CA offers no challenge of the kind asked for.
    NotOffered,
    /// The authorization is no longer pending (invalid, expired, revoked).
    AuthorizationNotPending,
    /// The CA tried the challenge and it failed.
    ValidationFailed,
    /// The CA sent a token that is unsafe to use.
    BadToken,
    /// The local part of the challenge (a file written, a task run) failed.
    Solver,
}

/// What went wrong with DNS ([`Error::Dns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsErrorKind {
    /// The provider answered and refused: an HTTP or API error, a DNS UPDATE answered
    /// with an error code, a hook that failed.
    ProviderRefused,
    /// The provider could not be reached or did not answer in time.
    ProviderUnreachable,
    /// The provider answered something lobe-tls cannot read.
    ProviderBadAnswer,
    /// The provider's settings cannot be used (a URL or a credential HTTP refuses).
    ProviderSettings,
    /// The TXT record did not show at the authoritative nameservers in time.
    NotPropagated,
    /// A lookup failed: no resolver configured, no nameservers found, a CNAME loop.
    Lookup,
    /// A name is not a valid DNS name.
    BadName,
    /// CAA records forbid the CA to issue for the name.
    CaaForbids,
}

/// What went wrong with a certificate or key ([`Error::Certificate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateErrorKind {
    /// PEM or DER that does not parse, or holds nothing usable.
    Malformed,
    /// A key type or format lobe-tls does not take.
    Unsupported,
    /// The private key does not belong to the certificate.
    KeyMismatch,
    /// The certificate does not cover the names asked for.
    NamesNotCovered,
    /// The certificate has expired.
    Expired,
    /// A key, CSR or certificate could not be made.
    Generation,
}

/// What went wrong with the store ([`Error::Store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The backend could not be reached or failed to answer.
    Unavailable,
    /// Stored data cannot be read back (corrupt, or written by something else).
    Corrupt,
    /// A value could not be encoded for storing.
    Encode,
    /// Writing failed.
    Write,
    /// Another process holds the lock.
    Locked,
    /// The store cannot do what was asked.
    Unsupported,
}

impl Error {
    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            key: None,
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error about one key or flag (`--directory`, `eab_kid`, ...).
    pub fn config_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: Some(key.into()),
            message: message.into(),
            source: None,
        }
    }

    /// An ACME exchange that went wrong without a problem document.
    pub fn acme(message: impl Into<String>) -> Self {
        Error::Acme {
            message: message.into(),
            source: None,
        }
    }

    /// A CA that cannot be reached or failed on its side.
    pub fn ca_unavailable(message: impl Into<String>) -> Self {
        Error::CaUnavailable {
            message: message.into(),
            source: None,
        }
    }

    /// A challenge that failed.
    pub fn challenge(kind: ChallengeErrorKind, message: impl Into<String>) -> Self {
        Error::Challenge {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A DNS failure that concerns no provider.
    pub fn dns(kind: DnsErrorKind, message: impl Into<String>) -> Self {
        Error::Dns {
            provider: None,
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A DNS provider's failure.
    pub fn dns_provider(
        provider: impl Into<String>,
        kind: DnsErrorKind,
        message: impl Into<String>,
    ) -> Self {
        Error::Dns {
            provider: Some(provider.into()),
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A certificate or key that is unusable.
    pub fn certificate(kind: CertificateErrorKind, message: impl Into<String>) -> Self {
        Error::Certificate {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A store failure; `backend` names the store (`"fs"`, `"redis"`) where it is known.
    pub fn store(
        backend: impl Into<Option<&'static str>>,
        kind: StoreErrorKind,
        message: impl Into<String>,
    ) -> Self {
        Error::Store {
            backend: backend.into(),
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A TLS configuration that rustls refused.
    pub fn tls(message: impl Into<String>, source: rustls::Error) -> Self {
        Error::Tls {
            message: message.into(),
            source,
        }
    }

    /// An operation that did not finish in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Error::Timeout {
            message: message.into(),
            source: None,
        }
    }

    /// Keeps `source` as the cause of this error, where the variant has room for one
    /// (the others keep theirs already).
    #[must_use]
    pub fn with_source(mut self, cause: impl Into<BoxError>) -> Self {
        match &mut self {
            Error::Config { source, .. }
            | Error::Acme { source, .. }
            | Error::CaUnavailable { source, .. }
            | Error::Challenge { source, .. }
            | Error::Dns { source, .. }
            | Error::Certificate { source, .. }
            | Error::Store { source, .. }
            | Error::Timeout { source, .. } => *source = Some(cause.into()),
            Error::Domain(_)
            | Error::CaProblem { .. }
            | Error::Tls { .. }
            | Error::Io { .. }
            | Error::Listen { .. } => {}
        }
        self
    }

    /// The ACME problem type the CA answered with (`alreadyReplaced`, `rateLimited`,
    /// ...), if this is a [`Error::CaProblem`].
    pub fn ca_problem(&self) -> Option<&str> {
        match self {
            Error::CaProblem { kind, .. } => kind.as_deref(),
            _ => None,
        }
    }

    /// When the CA asked not to be asked again before (`Retry-After` on a problem such
    /// as `rateLimited`), if this is a [`Error::CaProblem`] that carried one.
    pub fn retry_after(&self) -> Option<time::OffsetDateTime> {
        match self {
            Error::CaProblem { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Wraps an I/O error together with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// The error crosses tasks and threads, and boxes into `anyhow`-style holders.
    #[test]
    fn the_error_is_send_sync_and_static() {
        fn check<T: std::error::Error + Send + Sync + 'static>() {}
        check::<Error>();
    }

    #[test]
    fn a_source_added_later_changes_no_word_of_the_line() {
        let parse = "x".parse::<u16>().unwrap_err();
        let err = Error::store(
            "fs",
            StoreErrorKind::Corrupt,
            format!("renewal state of a.example: {parse}"),
        )
        .with_source(parse.clone());
        assert_eq!(
            err.to_string(),
            format!("store: renewal state of a.example: {parse}")
        );
        assert!(
            matches!(
                err,
                Error::Store {
                    backend: Some("fs"),
                    kind: StoreErrorKind::Corrupt,
                    ..
                }
            ),
            "{err:?}"
        );
        let source = err
            .source()
            .and_then(|s| s.downcast_ref::<std::num::ParseIntError>());
        assert_eq!(source, Some(&parse));
    }

    #[test]
    fn a_config_error_names_its_key() {
        let err = crate::acme::resolve_directory("ftp://ca.example").unwrap_err();
        assert!(
            matches!(&err, Error::Config { key: Some(k), .. } if k == "--directory"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("invalid --directory"), "{err}");
    }

    #[test]
    fn every_string_variant_reads_as_its_message() {
        let cases = [
            (Error::config("c"), "c"),
            (Error::acme("a"), "a"),
            (Error::ca_unavailable("u"), "u"),
            (Error::challenge(ChallengeErrorKind::NotOffered, "ch"), "ch"),
            (Error::dns(DnsErrorKind::Lookup, "d"), "d"),
            (
                Error::certificate(CertificateErrorKind::Expired, "ce"),
                "ce",
            ),
            (Error::store(None, StoreErrorKind::Write, "s"), "store: s"),
            (Error::timeout("t"), "timed out: t"),
        ];
        for (err, shown) in cases {
            assert_eq!(err.to_string(), shown, "{err:?}");
            assert!(err.source().is_none(), "{err:?}");
            let err = err.with_source(std::io::Error::other("cause"));
            assert_eq!(err.to_string(), shown, "{err:?}");
            assert_eq!(
                err.source().map(|s| s.to_string()).as_deref(),
                Some("cause")
            );
        }
    }
}
