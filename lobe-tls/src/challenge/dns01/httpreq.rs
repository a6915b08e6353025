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
use super::{DnsProvider, provider_error};
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
            return Err(Error::Config(
                "the httpreq endpoint must not hold a user or password (user:password@): set LOBE_TLS_HTTPREQ_USERNAME and LOBE_TLS_HTTPREQ_PASSWORD instead".into(),
            ));
        }
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(Error::Config(format!(
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

    async fn call(&self, action: &str, fqdn: &str, value: &str) -> std::result::Result<(), String> {
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
        Err(format!(
            "{url} answered {}{hint}: {}",
            response.status,
            response.body_excerpt()
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
