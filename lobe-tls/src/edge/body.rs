//! The body types that flow through the edge, shared by the request phase and the
//! upstream connection pools. A leaf.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

/// The body type sent to upstreams and back to clients.
pub(crate) type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
/// Errors of bodies in flight.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
