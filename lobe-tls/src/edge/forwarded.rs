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

/// Rewrites the forwarding headers of a request from `client` for `host`.
pub(crate) fn rewrite(headers: &mut HeaderMap, client: IpAddr, trusted: bool, host: Option<&str>) {
    use std::fmt::Write as _;
    let client = canonical(client);
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
    let mut xff = String::with_capacity(48);
    for previous in headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        xff.push_str(previous);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{client}");
    set(headers, X_FORWARDED_FOR, xff);
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if let Some(host) = host
        && !headers.contains_key(X_FORWARDED_HOST)
        && let Ok(value) = HeaderValue::from_str(host)
    {
        headers.insert(X_FORWARDED_HOST, value);
    }
    // Forwarded: one element per hop; IPv6 is quoted and bracketed (RFC 7239 §6).
    let mut forwarded = String::with_capacity(64);
    for previous in headers
        .get_all(FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        forwarded.push_str(previous);
        forwarded.push_str(", ");
    }
    let _ = match client {
        IpAddr::V4(v4) => write!(forwarded, "for={v4};proto=https"),
        IpAddr::V6(v6) => write!(forwarded, "for=\"[{v6}]\";proto=https"),
    };
    if let Some(host) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    }) {
        forwarded.push_str(";host=");
        forwarded.push_str(host);
    }
    set(headers, FORWARDED, forwarded);
}

/// Sets a header to a value built here, without copying it again.
fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_values_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        rewrite(
            &mut headers,
            "192.0.2.7".parse().unwrap_or(IpAddr::from([0; 4])),
            false,
            Some("a.example"),
        );
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
        rewrite(&mut headers, v6, true, None);
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
