//! A small JSON-over-HTTPS client shared by the API-based providers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::ProviderFailure;
use crate::error::{DnsErrorKind, Result};

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTPS client with TCP_NODELAY and the public web PKI roots.
#[derive(Clone)]
pub(crate) struct ApiClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A response, read whole.
pub(crate) struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as text for an error message, cut short.
    pub fn body_excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(200) {
            Some((i, _)) => format!("{}...", &text[..i]),
            None => text.to_owned(),
        }
    }
}

impl ApiClient {
    pub fn new() -> Result<Self> {
        Ok(ApiClient {
            client: crate::net::http_client(crate::net::root_store(None)?)?,
        })
    }

    /// Sends one request; `headers` are added as they are, marked sensitive (they carry
    /// the credentials), so that no `Debug` of the request shows them. Errors say in one
    /// line what failed and keep the client's error as their source.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(http::header::HeaderName, String)],
        json: Option<&serde_json::Value>,
    ) -> std::result::Result<ApiResponse, ProviderFailure> {
        let mut builder = http::Request::builder().method(method.clone()).uri(url);
        for (name, value) in headers {
            // The message names the header only: its value is a credential.
            let mut value = http::HeaderValue::from_str(value)
                .map_err(|e| ProviderFailure::new(DnsErrorKind::ProviderSettings, format!("the {name} header for {url} holds characters HTTP does not allow; check the credentials")).with_source(e))?;
            value.set_sensitive(true);
            builder = builder.header(name, value);
        }
        let body = match json {
            Some(value) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(value.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(body).map_err(|e| {
            ProviderFailure::new(
                DnsErrorKind::ProviderSettings,
                format!("bad request for {url}: {e}"),
            )
            .with_source(e)
        })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                ProviderFailure::new(
                    DnsErrorKind::ProviderUnreachable,
                    format!("{method} {url} failed: {}", error_chain(&e)),
                )
                .with_source(e)
            })?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| {
                    ProviderFailure::new(
                        DnsErrorKind::ProviderUnreachable,
                        format!("{method} {url}: reading the answer failed: {e}"),
                    )
                    .with_source(e)
                })?
                .to_bytes();
            Ok(ApiResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|e| {
                ProviderFailure::new(
                    DnsErrorKind::ProviderUnreachable,
                    format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"),
                )
                .with_source(e)
            })?
    }
}

/// An error with its sources, on one line: hyper's outer errors say little alone.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
