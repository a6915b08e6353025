//! The `httpreq` provider, compatible with lego's: `POST <endpoint>/present` and
//! `POST <endpoint>/cleanup` with the JSON body `{"fqdn": ..., "value": ...}`, the fqdn
//! with its trailing dot, and HTTP basic auth when a username and password are set.

use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use http::Method;
use zeroize::Zeroizing;

use super::api::ApiClient;
use super::settings::ProviderSettings;
use super::{DnsProvider, ProviderFailure, provider_error};
use crate::error::{Error, Result};

/// Calls a webhook that creates and deletes the records.
#[derive(Clone)]
pub struct HttpreqProvider {
    endpoint: String,
    credentials: Option<(String, Zeroizing<String>)>,
    client: ApiClient,
}

impl fmt::Debug for HttpreqProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpreqProvider")
            .field("endpoint", &self.endpoint)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl HttpreqProvider {
    /// A provider calling `endpoint` (`http://` or `https://`), with basic auth when
    /// `credentials` (username, password) are given.
    pub fn new(endpoint: &str, credentials: Option<(String, String)>) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        // A password in the URL would show in every message that names the endpoint.
        if let Some((_, rest)) = endpoint.split_once("://")
            && rest.contains('@')
        {
            return Err(Error::config(
                "the httpreq endpoint must not hold a user or password (user:password@): set LOBE_TLS_HTTPREQ_USERNAME and LOBE_TLS_HTTPREQ_PASSWORD instead",
            ));
        }
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(Error::config(format!(
                "httpreq endpoint {endpoint:?} must start with https:// or http://"
            )));
        }
        Ok(HttpreqProvider {
            endpoint,
            credentials: credentials.map(|(u, p)| (u, Zeroizing::new(p))),
            client: ApiClient::new()?,
        })
    }

    /// A provider from the `LOBE_TLS_HTTPREQ_*` variables or the `[httpreq]` table.
    pub fn from_settings(settings: &ProviderSettings) -> Result<Self> {
        let endpoint = settings.require("LOBE_TLS_HTTPREQ_ENDPOINT", "endpoint")?;
        let username = settings.get("LOBE_TLS_HTTPREQ_USERNAME", "username")?;
        let password = settings.get("LOBE_TLS_HTTPREQ_PASSWORD", "password")?;
        let credentials = match (username, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(settings.missing("LOBE_TLS_HTTPREQ_PASSWORD", "password"));
            }
            (None, Some(_)) => {
                return Err(settings.missing("LOBE_TLS_HTTPREQ_USERNAME", "username"));
            }
        };
        HttpreqProvider::new(&endpoint, credentials)
    }

    async fn call(
        &self,
        action: &str,
        fqdn: &str,
        value: &str,
    ) -> std::result::Result<(), ProviderFailure> {
        let url = format!("{}/{action}", self.endpoint);
        let mut headers = Vec::new();
        if let Some((user, password)) = &self.credentials {
            let token = Zeroizing::new(
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", **password)),
            );
            headers.push((http::header::AUTHORIZATION, format!("Basic {}", *token)));
        }
        let body = serde_json::json!({ "fqdn": fqdn, "value": value });
        let response = self
            .client
            .send(Method::POST, &url, &headers, Some(&body))
            .await?;
        if response.status.is_success() {
            return Ok(());
        }
        let hint = match response.status.as_u16() {
            401 | 403 => " (check LOBE_TLS_HTTPREQ_USERNAME and LOBE_TLS_HTTPREQ_PASSWORD)",
            _ => "",
        };
        let answer = response.body_excerpt();
        Err(ProviderFailure::refused(
            format!("{url} answered {}{hint}: {answer}", response.status),
            Some(response.status.as_u16()),
            Vec::new(),
            answer,
        ))
    }
}

#[async_trait]
impl DnsProvider for HttpreqProvider {
    async fn present(&self, fqdn: &str, value: &str) -> Result<()> {
        self.call("present", fqdn, value)
            .await
            .map_err(|e| provider_error("httpreq", "create", fqdn, e))
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()> {
        self.call("cleanup", fqdn, value)
            .await
            .map_err(|e| provider_error("httpreq", "delete", fqdn, e))
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::challenge::dns01::ProviderRefusal;
    use crate::error::DnsErrorKind;

    /// A webhook on a port of its own that reads one request whole and answers it with
    /// `response` (status line, headers and body).
    async fn webhook(response: &'static str) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many body bytes as Content-Length says.
            let wanted = loop {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client hung up mid-request");
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    break end + 4 + length;
                }
            };
            while request.len() < wanted {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client hung up mid-body");
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn a_refusal_is_a_dns_error_of_kind_provider_refused_with_the_http_answer_as_source() {
        let addr = webhook(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied",
        )
        .await;
        let provider = HttpreqProvider::new(&format!("http://{addr}"), None).unwrap();
        let err = provider
            .present("_acme-challenge.a.example.", "token")
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "httpreq: cannot create TXT _acme-challenge.a.example.: http://{addr}/present answered 403 Forbidden (check LOBE_TLS_HTTPREQ_USERNAME and LOBE_TLS_HTTPREQ_PASSWORD): denied"
            )
        );
        assert!(
            matches!(
                &err,
                Error::Dns { provider: Some(p), kind: DnsErrorKind::ProviderRefused, .. } if p == "httpreq"
            ),
            "{err:?}"
        );
        let refusal = err
            .source()
            .and_then(|s| s.downcast_ref::<ProviderRefusal>())
            .unwrap_or_else(|| panic!("no ProviderRefusal source: {err:?}"));
        assert_eq!(refusal.status, Some(403));
        assert_eq!(refusal.answer, "denied");
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_connections_is_unreachable_with_the_client_error_as_source() {
        // Bound but not listening, for the whole test: connections to it are refused.
        let dead = tokio::net::TcpSocket::new_v4().unwrap();
        dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = dead.local_addr().unwrap();
        let provider = HttpreqProvider::new(&format!("http://{addr}"), None).unwrap();
        let err = provider
            .cleanup("_acme-challenge.a.example.", "token")
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Dns {
                    kind: DnsErrorKind::ProviderUnreachable,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("httpreq: cannot delete TXT _acme-challenge.a.example.: POST "),
            "{err}"
        );
        let source = err.source().unwrap_or_else(|| panic!("no source: {err:?}"));
        assert!(
            source
                .downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some_and(|e| e.is_connect()),
            "{source:?}"
        );
    }
}
