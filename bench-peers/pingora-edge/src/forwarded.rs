//! The forwarding headers every peer of the edge bench sets: `X-Forwarded-For` (the
//! client appended), `X-Forwarded-Proto: https`, `X-Forwarded-Host` and RFC 7239
//! `Forwarded: for=..;proto=https;host=..`.

use std::net::IpAddr;

use pingora::http::RequestHeader;
use pingora::Result;

/// Sets the forwarding headers on the request to the upstream, for a client at `client`
/// (`None` when the listener reports no inet address).
pub fn apply(req: &mut RequestHeader, client: Option<IpAddr>) -> Result<()> {
    // Pingora has already written Host from :authority for an h2 client.
    let host = req
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri.authority().map(|a| a.as_str().to_owned()));

    if let Some(ip) = client {
        let xff = match req.headers.get("x-forwarded-for").map(|v| v.to_str()) {
            Some(Ok(previous)) if !previous.trim().is_empty() => format!("{previous}, {ip}"),
            _ => ip.to_string(),
        };
        req.insert_header("X-Forwarded-For", xff)?;
    }
    req.insert_header("X-Forwarded-Proto", "https")?;
    match &host {
        Some(host) => req.insert_header("X-Forwarded-Host", host.as_str())?,
        None => {
            req.remove_header("X-Forwarded-Host");
        }
    }
    req.insert_header("Forwarded", forwarded(client, host.as_deref()))?;
    Ok(())
}

/// One RFC 7239 element: `for=<ip>;proto=https;host=<host>`.
pub fn forwarded(client: Option<IpAddr>, host: Option<&str>) -> String {
    let mut out = String::with_capacity(64);
    match client {
        Some(IpAddr::V4(ip)) => out.push_str(&format!("for={ip};")),
        // An IPv6 node is quoted and bracketed (RFC 7239 section 6).
        Some(IpAddr::V6(ip)) => out.push_str(&format!("for=\"[{ip}]\";")),
        None => out.push_str("for=unknown;"),
    }
    out.push_str("proto=https");
    if let Some(host) = host {
        out.push_str(";host=");
        out.push_str(&value(host));
    }
    out
}

/// A parameter value: as is when it is an RFC 7230 token, else a quoted string.
fn value(text: &str) -> String {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !text.is_empty() && text.chars().all(is_tchar) {
        return text.to_owned();
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(req: &RequestHeader, name: &str) -> Option<String> {
        req.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_owned())
    }

    #[test]
    fn sets_all_four_and_appends_to_xff() {
        let mut req = RequestHeader::build("GET", b"/", None).expect("request");
        req.insert_header("Host", "a.example").expect("host");
        req.insert_header("X-Forwarded-For", "192.0.2.1")
            .expect("xff");
        apply(&mut req, Some("192.0.2.7".parse().expect("ip"))).expect("apply");
        assert_eq!(
            header(&req, "x-forwarded-for").as_deref(),
            Some("192.0.2.1, 192.0.2.7")
        );
        assert_eq!(header(&req, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(
            header(&req, "x-forwarded-host").as_deref(),
            Some("a.example")
        );
        assert_eq!(
            header(&req, "forwarded").as_deref(),
            Some("for=192.0.2.7;proto=https;host=a.example")
        );
    }

    #[test]
    fn quotes_ipv6_and_a_host_with_a_port() {
        assert_eq!(
            forwarded(Some("::1".parse().expect("ip")), Some("localhost:8443")),
            "for=\"[::1]\";proto=https;host=\"localhost:8443\""
        );
        assert_eq!(forwarded(None, None), "for=unknown;proto=https");
    }
}
