//! A provider for Pebble's test DNS server (`pebble-challtestsrv`), through its
//! management API: `POST /set-txt` and `POST /clear-txt`.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Mutex;

use super::{DnsProvider, ProviderFailure, provider_error};
use crate::error::{DnsErrorKind, Result};

/// Writes TXT records into challtestsrv.
///
/// challtestsrv's `/clear-txt` removes every value at a name, so this provider remembers
/// the values it presented and puts back the ones still in use after a clear.
#[derive(Clone)]
pub struct ChalltestsrvProvider {
    base_url: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    presented: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl std::fmt::Debug for ChalltestsrvProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChalltestsrvProvider")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ChalltestsrvProvider {
    /// A provider for the management API at `base_url`, e.g. `http://127.0.0.1:8055`.
    pub fn new(base_url: &str) -> Result<Self> {
        Ok(ChalltestsrvProvider {
            base_url: base_url.trim_end_matches('/').to_owned(),
            client: crate::net::http_client(rustls::RootCertStore::empty())?,
            presented: Arc::default(),
        })
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> std::result::Result<(), ProviderFailure> {
        let req = http::Request::post(format!("{}{path}", self.base_url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| {
                ProviderFailure::new(DnsErrorKind::ProviderSettings, e.to_string()).with_source(e)
            })?;
        let rsp = self.client.request(req).await.map_err(|e| {
            ProviderFailure::new(
                DnsErrorKind::ProviderUnreachable,
                format!("challtestsrv at {} unreachable: {e}", self.base_url),
            )
            .with_source(e)
        })?;
        let status = rsp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = rsp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let answer = String::from_utf8_lossy(&body).trim().to_owned();
        Err(ProviderFailure::refused(
            format!("challtestsrv answered {status}: {answer}"),
            Some(status.as_u16()),
            Vec::new(),
            answer,
        ))
    }
}

#[async_trait]
impl DnsProvider for ChalltestsrvProvider {
    async fn present(&self, fqdn: &str, value: &str) -> Result<()> {
        let mut presented = self.presented.lock().await;
        self.post(
            "/set-txt",
            serde_json::json!({"host": fqdn, "value": value}),
        )
        .await
        .map_err(|e| provider_error("challtestsrv", "create", fqdn, e))?;
        presented
            .entry(fqdn.to_owned())
            .or_default()
            .push(value.to_owned());
        Ok(())
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()> {
        let mut presented = self.presented.lock().await;
        let remaining = presented.entry(fqdn.to_owned()).or_default();
        remaining.retain(|v| v != value);
        let fail = |e| provider_error("challtestsrv", "delete", fqdn, e);
        self.post("/clear-txt", serde_json::json!({"host": fqdn}))
            .await
            .map_err(fail)?;
        for other in remaining.iter() {
            self.post(
                "/set-txt",
                serde_json::json!({"host": fqdn, "value": other}),
            )
            .await
            .map_err(fail)?;
        }
        if remaining.is_empty() {
            presented.remove(fqdn);
        }
        Ok(())
    }
}
