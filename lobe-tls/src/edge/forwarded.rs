//! The client's identity towards upstreams: `X-Forwarded-For`, `-Proto`, `-Host` and
//! RFC 7239 `Forwarded`. Values a client sent are kept only when it is a trusted proxy;
//! from anyone else they are dropped and replaced.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName, HeaderValue};
use ipnet::IpNet;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether `ip` is inside one of the `--trusted-proxy` networks.
pub(crate) fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 addresses as IPv4, so `10.0.0.0/8` matches `::ffff:10.0.0.1`.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A connection's client, written out once for the forwarding headers of all its
/// requests (a keep-alive connection sends many; formatting an address each time shows
/// in profiles).
#[derive(Debug, Clone)]
pub(crate) struct ClientValues {
    /// The address, for `X-Forwarded-For`.
    ip: HeaderValue,
    /// `for=…;proto=https`, the start of this hop's `Forwarded` element.
    forwarded: HeaderValue,
}

impl ClientValues {
    pub(crate) fn new(client: IpAddr) -> Self {
        let client = canonical(client);
        let ip = client.to_string();
        // IPv6 is quoted and bracketed (RFC 7239 §6).
        let forwarded = match client {
            IpAddr::V4(_) => format!("for={ip};proto=https"),
            IpAddr::V6(_) => format!("for=\"[{ip}]\";proto=https"),
        };
        ClientValues {
            ip: value(ip),
            forwarded: value(forwarded),
        }
    }
}

/// An address written out is always a valid header value.
fn value(text: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).unwrap_or(HeaderValue::from_static(""))
}

/// Rewrites the forwarding headers of a request from `client` for `host`.
pub(crate) fn rewrite(
    headers: &mut HeaderMap,
    client: &ClientValues,
    trusted: bool,
    host: Option<&str>,
) {
    if !trusted {
        // One pass to see whether there is anything to drop (there seldom is).
        let spoofed = headers.keys().any(|name| {
            [
                &X_FORWARDED_FOR,
                &X_FORWARDED_PROTO,
                &X_FORWARDED_HOST,
                &X_REAL_IP,
                &FORWARDED,
            ]
            .contains(&name)
        });
        if spoofed {
            for name in [
                X_FORWARDED_FOR,
                X_FORWARDED_PROTO,
                X_FORWARDED_HOST,
                X_REAL_IP,
                FORWARDED,
            ] {
                headers.remove(name);
            }
        }
    }
    // X-Forwarded-For: the chain so far (from a trusted proxy) plus this client.
    let xff = append(headers, &X_FORWARDED_FOR, &client.ip, None);
    headers.insert(X_FORWARDED_FOR, xff);
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if let Some(host) = host
        && !headers.contains_key(X_FORWARDED_HOST)
        && let Ok(value) = HeaderValue::from_str(host)
    {
        headers.insert(X_FORWARDED_HOST, value);
    }
    // Forwarded: one element per hop.
    let host = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    });
    let forwarded = append(headers, &FORWARDED, &client.forwarded, host);
    headers.insert(FORWARDED, forwarded);
}

/// The values of `name` so far, then `ours`, then `;host=HOST` when a host is given.
/// With no values so far and no host, `ours` itself (no copy).
fn append(
    headers: &HeaderMap,
    name: &HeaderName,
    ours: &HeaderValue,
    host: Option<&str>,
) -> HeaderValue {
    let mut previous = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    if previous.peek().is_none() && host.is_none() {
        return ours.clone();
    }
    let mut text = String::with_capacity(ours.len() + host.map_or(0, str::len) + 16);
    for value in previous {
        text.push_str(value);
        text.push_str(", ");
    }
    text.push_str(ours.to_str().unwrap_or_default());
    if let Some(host) = host {
        text.push_str(";host=");
        text.push_str(host);
    }
    value(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_values_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let client = ClientValues::new("192.0.2.7".parse().unwrap_or(IpAddr::from([0; 4])));
        rewrite(&mut headers, &client, false, Some("a.example"));
        assert_eq!(headers[X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(
            headers[FORWARDED],
            "for=192.0.2.7;proto=https;host=a.example"
        );
        assert_eq!(headers[X_FORWARDED_PROTO], "https");
        assert_eq!(headers[X_FORWARDED_HOST], "a.example");
    }

    #[test]
    fn trusted_chains_are_extended() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        let v6: IpAddr = "2001:db8::1".parse().unwrap_or(IpAddr::from([0; 4]));
        rewrite(&mut headers, &ClientValues::new(v6), true, None);
        assert_eq!(headers[X_FORWARDED_FOR], "198.51.100.1, 2001:db8::1");
        assert_eq!(headers[FORWARDED], "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn mapped_addresses_match_v4_networks() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap_or_else(|_| IpNet::default())];
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or(IpAddr::from([0; 4]));
        assert!(is_trusted(&nets, mapped));
        assert!(!is_trusted(&nets, IpAddr::from([11, 0, 0, 1])));
    }
}
