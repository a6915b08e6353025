//! The ask endpoint: `GET URL?domain=NAME`, any 2xx allows the name.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::error::{Error, Result};

/// A client for one ask URL.
#[derive(Clone)]
pub(super) struct Ask {
    url: http::Uri,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a token in its query or user part: only the host is shown.
        f.debug_struct("Ask")
            .field("host", &self.url.host())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What the ask endpoint said about a name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It answered 2xx.
    Allowed,
    /// It answered something else; why, in words.
    Refused(String),
}

impl Ask {
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Self> {
        let bad = |why: &str| {
            Error::config(format!(
                "the on-demand ask URL {why}: give an http:// or https:// URL such as https://app.internal/check"
            ))
        };
        let parsed: http::Uri = url.parse().map_err(|_| bad("cannot be parsed"))?;
        match parsed.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("has no http or https scheme")),
        }
        if parsed.host().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        Ok(Ask {
            url: parsed,
            client: crate::net::http_client(crate::net::root_store(None)?)?,
            timeout,
        })
    }

    /// The URL asked for `name` (a validated DNS name: letters, digits, `-` and `.`
    /// only, so it needs no escaping).
    fn url_for(&self, name: &str) -> Result<http::Uri> {
        let base = self.url.to_string();
        let sep = if self.url.query().is_some() { '&' } else { '?' };
        format!("{base}{sep}domain={name}").parse().map_err(|e| {
            Error::config(format!("cannot build the ask URL for {name}")).with_source(e)
        })
    }

    /// Whether the endpoint allows `name`: `Ok(Verdict::Refused(why))` when it said no,
    /// `Err` when it could not be asked (unreachable, too slow).
    pub(super) async fn allows(&self, name: &str) -> Result<Verdict> {
        let url = self.url_for(name)?;
        let host = self.url.host().unwrap_or_default().to_owned();
        let response = tokio::time::timeout(self.timeout, self.client.get(url))
            .await
            .map_err(|_| {
                Error::timeout(format!(
                    "the on-demand ask endpoint {host} did not answer within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| {
                Error::config(format!(
                    "cannot reach the on-demand ask endpoint {host}: {e}"
                ))
                .with_source(e)
            })?;
        let status = response.status();
        // The body is not needed; dropping it closes or returns the connection.
        drop(response);
        if status.is_success() {
            Ok(Verdict::Allowed)
        } else {
            Ok(Verdict::Refused(format!(
                "the ask endpoint answered {status}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_get_the_domain_appended_and_bad_urls_are_refused() {
        let ask = Ask::new("http://127.0.0.1:9/check", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = ask
            .url_for("a.example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url.to_string(),
            "http://127.0.0.1:9/check?domain=a.example.com"
        );
        let ask = Ask::new("https://h.example/check?token=x", Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = ask
            .url_for("a.example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url.to_string(),
            "https://h.example/check?token=x&domain=a.example.com"
        );
        assert!(!format!("{ask:?}").contains("token"));
        for bad in ["ftp://h/x", "/check", "not a url", "http:///x"] {
            assert!(Ask::new(bad, Duration::from_secs(1)).is_err(), "{bad}");
        }
    }
}
