//! The `cloudflare` provider: Cloudflare's v4 API with an API token (needs the
//! Zone:DNS:Edit permission). It finds the zone by name, creates the TXT record, and
//! deletes only records it created itself.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::api::{ApiClient, ApiResponse};
use super::settings::ProviderSettings;
use super::{DnsProvider, ProviderFailure, provider_error};
use crate::error::{DnsErrorKind, Result};

/// Cloudflare's API.
pub const DEFAULT_API_URL: &str = "https://api.cloudflare.com/client/v4";
/// Written into the records' comment, so that a record left by an earlier run of
/// lobe-tls can be told from one that someone else made.
const RECORD_COMMENT: &str = "lobe-tls ACME challenge";
/// Cloudflare's error code for "an identical record already exists".
const IDENTICAL_RECORD: u64 = 81058;
/// Tries per request when rate limited (HTTP 429).
const RATE_LIMIT_TRIES: usize = 3;
/// The longest `Retry-After` honoured; beyond it the request fails with a clear message.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// (fqdn, value) → (zone id, record id) of the records a provider created.
type CreatedRecords = HashMap<(String, String), (String, String)>;

/// Creates and deletes TXT records through Cloudflare's API.
#[derive(Clone)]
pub struct CloudflareProvider {
    api_url: String,
    token: Arc<Zeroizing<String>>,
    client: ApiClient,
    created: Arc<Mutex<CreatedRecords>>,
}

impl fmt::Debug for CloudflareProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareProvider")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
    result: Option<T>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct Zone {
    id: String,
    name: String,
}

#[derive(Deserialize)]
struct DnsRecord {
    id: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    comment: Option<String>,
}

/// A failed API call: its Cloudflare error codes and the failure.
struct CallError {
    codes: Vec<u64>,
    failure: ProviderFailure,
}

impl From<ProviderFailure> for CallError {
    fn from(failure: ProviderFailure) -> Self {
        CallError {
            codes: Vec::new(),
            failure,
        }
    }
}

impl CloudflareProvider {
    /// A provider using `token` against `api_url` (normally [`DEFAULT_API_URL`]).
    pub fn new(api_url: &str, token: &str) -> Result<Self> {
        Ok(CloudflareProvider {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token: Arc::new(Zeroizing::new(token.trim().to_owned())),
            client: ApiClient::new()?,
            created: Arc::default(),
        })
    }

    /// A provider from `CLOUDFLARE_API_TOKEN` (and `LOBE_TLS_CLOUDFLARE_API_URL`) or the
    /// `[cloudflare]` table.
    pub fn from_settings(settings: &ProviderSettings) -> Result<Self> {
        let token = Zeroizing::new(settings.require("CLOUDFLARE_API_TOKEN", "api_token")?);
        let api_url = settings
            .get("LOBE_TLS_CLOUDFLARE_API_URL", "api_url")?
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        CloudflareProvider::new(&api_url, &token)
    }

    /// Calls the API, retrying on HTTP 429 as `Retry-After` says, and unwraps the
    /// `{success, errors, result}` envelope.
    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<T, CallError> {
        let url = format!("{}{path}", self.api_url);
        let headers = [(
            http::header::AUTHORIZATION,
            format!("Bearer {}", self.token.as_str()),
        )];
        let mut tries = 0;
        let response = loop {
            tries += 1;
            let response = self
                .client
                .send(method.clone(), &url, &headers, body)
                .await?;
            if response.status != StatusCode::TOO_MANY_REQUESTS {
                break response;
            }
            let wait = retry_after(&response);
            if tries >= RATE_LIMIT_TRIES || wait > MAX_RETRY_AFTER {
                let detail = format!(
                    "Cloudflare rate limit hit (HTTP 429) on {method} {path}, {tries} tries; wait {}s and run again",
                    wait.as_secs().max(1)
                );
                return Err(ProviderFailure::refused(
                    detail,
                    Some(429),
                    Vec::new(),
                    response.body_excerpt(),
                )
                .into());
            }
            tracing::info!(?wait, "Cloudflare rate limit hit (HTTP 429); retrying");
            tokio::time::sleep(wait).await;
        };
        let envelope: Envelope<T> = serde_json::from_slice(&response.body).map_err(|e| {
            ProviderFailure::new(
                DnsErrorKind::ProviderBadAnswer,
                format!(
                    "Cloudflare answered {method} {path} with {} and an unreadable body ({e}): {}",
                    response.status,
                    response.body_excerpt()
                ),
            )
            .with_source(e)
        })?;
        if response.status.is_success()
            && envelope.success
            && let Some(result) = envelope.result
        {
            return Ok(result);
        }
        let codes: Vec<u64> = envelope.errors.iter().map(|e| e.code).collect();
        let details: Vec<String> = envelope
            .errors
            .iter()
            .map(|e| format!("{} (code {})", e.message, e.code))
            .collect();
        let hint = match response.status.as_u16() {
            401 | 403 => "; check CLOUDFLARE_API_TOKEN: it needs Zone:DNS:Edit on this zone",
            _ => "",
        };
        let answer = if details.is_empty() {
            response.body_excerpt()
        } else {
            details.join("; ")
        };
        Err(CallError {
            codes: codes.clone(),
            failure: ProviderFailure::refused(
                format!(
                    "Cloudflare answered {method} {path} with {}: {answer}{hint}",
                    response.status
                ),
                Some(response.status.as_u16()),
                codes,
                answer,
            ),
        })
    }

    /// The zone holding `name`: the longest of its suffixes that Cloudflare knows.
    async fn find_zone(&self, name: &str) -> std::result::Result<Zone, ProviderFailure> {
        let labels: Vec<&str> = name.split('.').collect();
        for start in 0..labels.len().saturating_sub(1) {
            let candidate = labels[start..].join(".");
            let zones: Vec<Zone> = self
                .call(Method::GET, &format!("/zones?name={candidate}"), None)
                .await
                .map_err(|e| e.failure)?;
            if let Some(zone) = zones
                .into_iter()
                .find(|z| z.name.eq_ignore_ascii_case(&candidate))
            {
                return Ok(zone);
            }
        }
        Err(ProviderFailure::new(
            DnsErrorKind::ProviderRefused,
            format!(
                "no Cloudflare zone holds {name}; is the domain on this account and the token allowed to read it?"
            ),
        ))
    }

    async fn create(&self, fqdn: &str, value: &str) -> std::result::Result<(), ProviderFailure> {
        let name = fqdn.trim_end_matches('.');
        let zone = self.find_zone(name).await?;
        let body = serde_json::json!({
            "type": "TXT",
            "name": name,
            "content": value,
            "ttl": 120,
            "comment": RECORD_COMMENT,
        });
        let path = format!("/zones/{}/dns_records", zone.id);
        let record_id = match self
            .call::<DnsRecord>(Method::POST, &path, Some(&body))
            .await
        {
            Ok(record) => Some(record.id),
            Err(e) if e.codes.contains(&IDENTICAL_RECORD) => {
                self.adopt_leftover(&zone, name, value).await?
            }
            Err(e) => return Err(e.failure),
        };
        if let Some(record_id) = record_id {
            self.created
                .lock()
                .await
                .insert((fqdn.to_owned(), value.to_owned()), (zone.id, record_id));
        }
        Ok(())
    }

    /// The record already exists. If an earlier run of lobe-tls left it (our comment),
    /// take it over so that cleanup removes it; otherwise use it but leave it alone.
    async fn adopt_leftover(
        &self,
        zone: &Zone,
        name: &str,
        value: &str,
    ) -> std::result::Result<Option<String>, ProviderFailure> {
        let path = format!("/zones/{}/dns_records?type=TXT&name={name}", zone.id);
        let records: Vec<DnsRecord> = self
            .call(Method::GET, &path, None)
            .await
            .map_err(|e| e.failure)?;
        let existing = records
            .into_iter()
            .find(|r| r.content.trim_matches('"') == value);
        Ok(match existing {
            Some(r) if r.comment.as_deref() == Some(RECORD_COMMENT) => Some(r.id),
            _ => {
                tracing::info!(%name, "the TXT record already exists and was not made by lobe-tls; it will be left in place");
                None
            }
        })
    }

    async fn delete(&self, fqdn: &str, value: &str) -> std::result::Result<(), ProviderFailure> {
        let key = (fqdn.to_owned(), value.to_owned());
        let Some((zone_id, record_id)) = self.created.lock().await.get(&key).cloned() else {
            tracing::debug!(%fqdn, "no record created by this provider; nothing to delete");
            return Ok(());
        };
        let path = format!("/zones/{zone_id}/dns_records/{record_id}");
        #[derive(Deserialize)]
        struct Deleted {}
        match self.call::<Deleted>(Method::DELETE, &path, None).await {
            Ok(_) => {}
            // Already gone (code 81044: record not found) is what we wanted.
            Err(e) if e.codes.contains(&81044) => {}
            Err(e) => return Err(e.failure),
        }
        self.created.lock().await.remove(&key);
        Ok(())
    }
}

fn retry_after(response: &ApiResponse) -> Duration {
    response
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1))
}

#[async_trait]
impl DnsProvider for CloudflareProvider {
    async fn present(&self, fqdn: &str, value: &str) -> Result<()> {
        self.create(fqdn, value)
            .await
            .map_err(|e| provider_error("cloudflare", "create", fqdn, e))
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()> {
        self.delete(fqdn, value)
            .await
            .map_err(|e| provider_error("cloudflare", "delete", fqdn, e))
    }
}
