//! What the request path reads from and rewrites in the heads of requests and
//! responses that cross the edge: the Host, hop-by-hop fields, cookies, the request
//! target. A leaf.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use hyper::body::Incoming;

/// The Host a request is for, without its port: the URI's authority (h2, absolute
/// form) or the Host header.
pub(super) fn request_host(req: &Request<Incoming>) -> Option<String> {
    let authority = req.uri().authority().map(|a| a.host().to_owned());
    authority.or_else(|| {
        let value = req.headers().get(header::HOST)?.to_str().ok()?;
        let authority: http::uri::Authority = value.parse().ok()?;
        Some(authority.host().to_owned())
    })
}

/// Headers that belong to one hop and are not forwarded (RFC 9110 §7.6.1).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
        // Fields the Connection header names, in any of its values; `keep-alive` and
        // `close` (by far the most common) name none that the pass below misses.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in connection.remove_entry_mult().1 {
            for token in value.to_str().unwrap_or_default().split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    // One pass to see whether any other is there (most often none is).
    let is_hop = |name: &HeaderName| {
        name == header::TE
            || name == header::TRAILER
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::PROXY_AUTHORIZATION
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
    };
    if headers.keys().any(is_hop) {
        for name in [
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
            header::PROXY_AUTHORIZATION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
        ] {
            headers.remove(name);
        }
    }
}

/// h2 clients may send one `cookie` field per cookie; an HTTP/1.1 upstream expects one
/// (RFC 9113 §8.2.3).
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if let Ok(value) = HeaderValue::from_str(&joined.join("; ")) {
        headers.insert(header::COOKIE, value);
    }
}

pub(super) fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The origin form (`/path?query`) of a request target; `/` when it has no path.
pub(super) fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(headers[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; lobe=xyz; b=2"),
        );
        assert_eq!(cookie_value(&headers, "lobe").as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }
}
