//! Request ids: every request carries `X-Request-Id` to its upstream and back to the
//! client. An id a client sent is kept only from a `--trusted-proxy` peer (a balancer in
//! front that already named the request), and only when well formed; anyone else gets
//! a new one, so a client cannot forge ids into the upstreams' logs.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// `X-Request-Id`.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id kept from a trusted peer.
const MAX_LEN: usize = 128;

/// A request's id; the request carries it as an extension, for the phases after the
/// exchange (the access log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    /// The id of a request with `headers`: the one it carries when it comes from a
    /// trusted peer and is well formed (exactly one value), else a new one.
    pub(crate) fn of(headers: &HeaderMap, trusted: bool) -> Self {
        if trusted {
            let mut values = headers.get_all(X_REQUEST_ID).iter();
            if let (Some(value), None) = (values.next(), values.next())
                && well_formed(value.as_bytes())
            {
                return RequestId(value.clone());
            }
        }
        RequestId::new()
    }

    /// 128 random bits as 32 lowercase hex digits.
    pub(crate) fn new() -> Self {
        let text = format!("{:032x}", rand::random::<u128>());
        // Hex digits are always a valid header value.
        RequestId(HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0")))
    }

    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    /// Sets `X-Request-Id` in `headers` to this id, replacing any other.
    pub(crate) fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(X_REQUEST_ID, self.0.clone());
    }
}

/// 1 to 128 characters of `[A-Za-z0-9._:-]`.
fn well_formed(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_REQUEST_ID, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn new_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (RequestId::new(), RequestId::new());
        assert_eq!(a.as_str().len(), 32);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_ne!(a, b);
    }

    #[test]
    fn a_trusted_peers_well_formed_id_is_kept() {
        let id = RequestId::of(&with(&["lb-1:abc.DEF_9"]), true);
        assert_eq!(id.as_str(), "lb-1:abc.DEF_9");
    }

    #[test]
    fn an_untrusted_or_malformed_id_is_replaced() {
        for (values, trusted) in [
            (&["lb-1:abc"][..], false),
            (&["has space"][..], true),
            (&["semi;colon"][..], true),
            (&[""][..], true),
            (&["a", "b"][..], true),
        ] {
            let id = RequestId::of(&with(values), trusted);
            assert_eq!(id.as_str().len(), 32, "{values:?} {trusted}");
            assert!(!values.contains(&id.as_str()));
        }
        let long = "a".repeat(129);
        let mut headers = HeaderMap::new();
        headers.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("")),
        );
        assert_ne!(RequestId::of(&headers, true).as_str(), long);
        headers.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&long[..128]).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(RequestId::of(&headers, true).as_str(), &long[..128]);
    }
}
