//! What to say when the CA's HTTP-01 probe found nobody (connection refused) or someone
//! else (404): the port the CA probed and the address this process answers on, since
//! the two disagreeing is the usual cause (Pebble probes its `httpPort`, 5002 in
//! `pebble/`, while a CA on the Internet probes port 80).

use crate::error::{ChallengeErrorKind, Error};

/// `error` with a hint added when it is an HTTP-01 validation that got a 404 or a refused
/// connection; any other error as it is. `http_listen` is where this process answers
/// HTTP-01 (`--http-listen`), if it knows.
pub(crate) fn amend(error: Error, http_listen: Option<&str>) -> Error {
    match error {
        Error::Challenge {
            kind: ChallengeErrorKind::ValidationFailed,
            mut message,
            source,
        } => {
            if let Some(hint) = hint(&message, http_listen) {
                message.push_str("; ");
                message.push_str(&hint);
            }
            Error::Challenge {
                kind: ChallengeErrorKind::ValidationFailed,
                message,
                source,
            }
        }
        other => other,
    }
}

/// The hint for a validation failure `detail` (the CA's words), if it shows a 404 or a
/// refused connection.
fn hint(detail: &str, http_listen: Option<&str>) -> Option<String> {
    let refused = detail.to_ascii_lowercase().contains("connection refused");
    // A word "404" on its own: tokens are base64url, so "-" and "_" belong to words.
    let not_found = detail
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .any(|word| word == "404");
    if !refused && !not_found {
        return None;
    }
    let port = probed_port(detail).unwrap_or(80);
    let what = if refused {
        "found no listener"
    } else {
        "got 404 from whatever answers there"
    };
    Some(match http_listen {
        Some(listen) if listen_port(listen) == Some(port) => format!(
            "the CA probed port {port} and {what}, while this process answers HTTP-01 on --http-listen {listen}: check that the name resolves to this host and that port {port} reaches this process, not another server"
        ),
        Some(listen) => format!(
            "the CA probed port {port} and {what}, while this process answers HTTP-01 on --http-listen {listen}: listen on port {port} (--http-listen 0.0.0.0:{port}) or forward port {port} to {listen}"
        ),
        None => format!(
            "the CA probed port {port} and {what}: port {port} must reach the server that answers HTTP-01"
        ),
    })
}

/// The port of the first `http://` URL in `detail` (80 when it names none).
fn probed_port(detail: &str) -> Option<u16> {
    let at = detail.find("http://")?;
    let url: String = detail[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | ','))
        .collect();
    let url = url.trim_end_matches(':');
    let uri: http::Uri = url.parse().ok()?;
    Some(uri.port_u16().unwrap_or(80))
}

fn listen_port(listen: &str) -> Option<u16> {
    listen
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|addr| addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEBBLE_404: &str = "validation failed: Non-200 status code from HTTP: http://app.example.com:5002/.well-known/acme-challenge/x404y returned 404 (unauthorized)";
    const PEBBLE_REFUSED: &str = "validation failed: Get \"http://app.example.com:5002/.well-known/acme-challenge/abc\": dial tcp 127.0.0.1:5002: connect: connection refused (connection)";
    const BOULDER_REFUSED: &str = "validation failed: 192.0.2.1: Fetching http://app.example.com/.well-known/acme-challenge/abc: Connection refused";

    #[test]
    fn a_404_names_the_probed_port_and_the_listen_address() {
        let hint = hint(PEBBLE_404, Some("127.0.0.1:8080")).unwrap();
        assert!(hint.contains("probed port 5002"), "{hint}");
        assert!(hint.contains("got 404"), "{hint}");
        assert!(hint.contains("--http-listen 127.0.0.1:8080"), "{hint}");
        assert!(hint.contains("--http-listen 0.0.0.0:5002"), "{hint}");
    }

    #[test]
    fn a_refused_probe_without_a_port_in_the_url_was_on_port_80() {
        let hint = hint(BOULDER_REFUSED, Some("0.0.0.0:8080")).unwrap();
        assert!(
            hint.contains("probed port 80 and found no listener"),
            "{hint}"
        );
        let hint = super::hint(PEBBLE_REFUSED, None).unwrap();
        assert!(hint.contains("probed port 5002"), "{hint}");
    }

    #[test]
    fn the_same_port_on_both_sides_points_at_routing() {
        let hint = hint(PEBBLE_404, Some("127.0.0.1:5002")).unwrap();
        assert!(hint.contains("reaches this process"), "{hint}");
    }

    #[test]
    fn other_failures_and_other_errors_are_left_alone() {
        assert_eq!(
            hint(
                "validation failed: the key authorization did not match",
                None
            ),
            None
        );
        let error = amend(Error::config("x404"), Some("127.0.0.1:80"));
        assert_eq!(error.to_string(), "x404");
        let error = amend(
            Error::challenge(ChallengeErrorKind::ValidationFailed, PEBBLE_REFUSED),
            Some("127.0.0.1:80"),
        );
        assert!(error.to_string().starts_with(PEBBLE_REFUSED));
        assert!(error.to_string().contains("probed port 5002"), "{error}");
    }
}
