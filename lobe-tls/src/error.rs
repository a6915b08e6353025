//! The one error type of the crate, with nested kinds for each concern.

use std::path::PathBuf;

/// Everything that can go wrong in lobe-tls.
///
/// Each variant's `Display` is one line that says what failed and, where there is one,
/// what to do about it. The CLI prints it as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A domain name was rejected before anything was sent to the CA.
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),

    /// The configuration asks for something that cannot work.
    #[error("{0}")]
    Config(String),

    /// The ACME CA could not be reached or answered with an error.
    #[error("{0}")]
    Acme(String),

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
        /// The error as instant-acme reported it.
        #[source]
        source: Box<instant_acme::Error>,
        /// When the CA said to try again (`Retry-After`), if it did.
        retry_after: Option<time::OffsetDateTime>,
    },

    /// The CA could not be reached, did not answer within the request timeout, or failed
    /// on its side: a fault of the CA or of the path to it, not of the request, so a
    /// fallback CA is worth trying.
    #[error("{0}")]
    CaUnavailable(String),

    /// A challenge failed; the message carries the CA's problem detail.
    #[error("{0}")]
    Challenge(String),

    /// A DNS provider or propagation check failed.
    #[error("{0}")]
    Dns(String),

    /// A certificate or key could not be parsed or does not fit together.
    #[error("{0}")]
    Certificate(String),

    /// Reading or writing the store failed.
    #[error("store: {0}")]
    Store(String),

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
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
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
