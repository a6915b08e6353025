//! The body types that flow through the edge, shared by the request phase and the
//! upstream connection pools. A leaf.

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Body;

/// The body type sent to upstreams and back to clients.
pub(crate) type BoxBody = UnsyncBoxBody<Bytes, BoxError>;
/// Errors of bodies in flight.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `body` as a [`BoxBody`].
pub(crate) fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
