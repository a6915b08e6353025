//! The HTTP client every ACME request goes through: one bound per request, body included.
//!
//! instant-acme sends the directory fetch, nonces, account, order, authorization,
//! challenge, finalize, download, renewalInfo and revoke requests through one
//! [`instant_acme::HttpClient`]. Bounding each call here bounds all of them, also the
//! ones made inside instant-acme's polling loops, where a timeout around the caller would
//! cut the poll schedule instead.
//!
//! A request that times out is dropped with its connection: hyper returns a connection
//! to its pool only once an exchange on it has completed, so a path that went dead (it
//! accepts and never answers) is never reused, and the next request opens a fresh one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use instant_acme::{BodyWrapper, BytesResponse};

tokio::task_local! {
    /// A tighter bound for the requests made by the task it is set on: an order for a
    /// certificate close to expiry must give up on a hung request in time to try again.
    static REQUEST_BOUND: Duration;
}

/// Runs `future` with every ACME request it makes bounded by `bound`, or by the client's
/// own timeout when that is shorter.
pub(crate) async fn with_request_bound<F: Future>(bound: Duration, future: F) -> F::Output {
    REQUEST_BOUND.scope(bound, future).await
}

/// An ACME request that got no complete answer in time. It reaches callers as the source
/// of an [`instant_acme::Error::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTimedOut {
    /// The bound that was exceeded.
    pub after: Duration,
    /// The request's method and path (no query: nothing secret goes in a message).
    pub request: String,
}

impl fmt::Display for RequestTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} got no answer within {:.1}s",
            self.request,
            self.after.as_secs_f64()
        )
    }
}

impl std::error::Error for RequestTimedOut {}

/// Whether `error` is a [`RequestTimedOut`], or carries one in its source chain.
pub(crate) fn timed_out(error: &instant_acme::Error) -> bool {
    // `Other` is transparent: its own `source` skips the error it wraps.
    let mut next: Option<&(dyn std::error::Error + 'static)> = match error {
        instant_acme::Error::Other(inner) => Some(inner.as_ref()),
        other => Some(other),
    };
    while let Some(e) = next {
        if e.is::<RequestTimedOut>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The ACME HTTP client: hyper with TCP_NODELAY (see [`crate::net::http_client`]), each
/// exchange bounded by `timeout` or the task's tighter bound.
#[derive(Clone)]
pub(crate) struct BoundedClient {
    inner: Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    timeout: Duration,
    /// The `Retry-After` of the last error answer that carried one. instant-acme drops
    /// the header from the problems it returns, so it is kept here for the error message
    /// and for the renewal state.
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl BoundedClient {
    pub(crate) fn new(
        inner: Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
        timeout: Duration,
    ) -> Self {
        BoundedClient {
            inner,
            timeout,
            retry_after: Arc::default(),
        }
    }

    /// The slot where the `Retry-After` of error answers lands.
    pub(crate) fn retry_after_slot(&self) -> Arc<Mutex<Option<SystemTime>>> {
        self.retry_after.clone()
    }

    /// GETs `url` within the client's bound and returns the body of a 2xx answer: for
    /// the directory's `meta`, which instant-acme does not expose.
    pub(crate) async fn get_json(&self, url: &str) -> crate::Result<serde_json::Value> {
        use crate::Error;
        let req = http::Request::get(url)
            .body(BodyWrapper::default())
            .map_err(|e| Error::acme(e.to_string()).with_source(e))?;
        let exchange = async {
            let rsp = self
                .inner
                .request(req)
                .await
                .map_err(|e| Error::ca_unavailable(e.to_string()).with_source(e))?;
            if !rsp.status().is_success() {
                return Err(Error::acme(format!("HTTP {}", rsp.status())));
            }
            let body = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::ca_unavailable(e.to_string()).with_source(e))?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| Error::acme(e.to_string()).with_source(e))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|e| {
                Error::ca_unavailable(format!(
                    "no answer within {:.1}s",
                    self.timeout.as_secs_f64()
                ))
                .with_source(e)
            })?
    }
}

/// Reads a `Retry-After` header: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(secs) => now.checked_add(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// A server error with a body that is not an ACME problem (an HTML page from a load
/// balancer, say) becomes a `serverInternal` problem carrying the status, so that it
/// reads as the CA's failure rather than as a JSON parse error.
fn server_error_problem(status: http::StatusCode, body: &[u8]) -> Option<Bytes> {
    if !status.is_server_error() || serde_json::from_slice::<instant_acme::Problem>(body).is_ok() {
        return None;
    }
    let problem = serde_json::json!({
        "type": "urn:ietf:params:acme:error:serverInternal",
        "detail": format!("the CA answered HTTP {status}"),
        "status": status.as_u16(),
    });
    Some(Bytes::from(problem.to_string()))
}

impl instant_acme::HttpClient for BoundedClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let timeout = self.timeout;
        let retry_slot = self.retry_after.clone();
        let what = format!("{} {}", req.method(), req.uri().path());
        let exchange = self.inner.request(req);
        Box::pin(async move {
            // Read when polled, inside the task's scope, not when the call was built.
            let bound = REQUEST_BOUND
                .try_with(|b| *b)
                .map_or(timeout, |b| b.min(timeout));
            let exchange = async {
                let response = exchange
                    .await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                let (parts, body) = response.into_parts();
                // The whole body inside the bound: a CA that sends headers and then
                // stalls is as hung as one that sends nothing.
                let mut body = body
                    .collect()
                    .await
                    .map_err(instant_acme::Error::Hyper)?
                    .to_bytes();
                if parts.status.is_client_error() || parts.status.is_server_error() {
                    let retry_after = parts
                        .headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    if let Some(at) = retry_after {
                        *retry_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
                    }
                    if let Some(problem) = server_error_problem(parts.status, &body) {
                        body = problem;
                    }
                }
                Ok(BytesResponse {
                    parts,
                    body: Box::new(body),
                })
            };
            match tokio::time::timeout(bound, exchange).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::debug!(request = %what, bound_ms = bound.as_millis() as u64, "ACME request timed out");
                    Err(instant_acme::Error::Other(Box::new(RequestTimedOut {
                        after: bound,
                        request: what,
                    })))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instant_acme::HttpClient;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(now + Duration::from_secs(120))
        );
        let date = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now).unwrap();
        assert_eq!(
            date.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            784_111_777
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn a_server_error_page_becomes_a_server_internal_problem() {
        let body = server_error_problem(http::StatusCode::BAD_GATEWAY, b"<html>").unwrap();
        let problem: instant_acme::Problem = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            problem.r#type.as_deref(),
            Some("urn:ietf:params:acme:error:serverInternal")
        );
        assert_eq!(problem.status, Some(502));
        let real = br#"{"type":"urn:ietf:params:acme:error:serverInternal","detail":"x"}"#;
        assert!(server_error_problem(http::StatusCode::INTERNAL_SERVER_ERROR, real).is_none());
        assert!(server_error_problem(http::StatusCode::NOT_FOUND, b"<html>").is_none());
    }

    /// A listener that accepts and never answers: a dead network path.
    async fn black_hole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        (addr, task)
    }

    fn client(timeout: Duration) -> BoundedClient {
        let inner = crate::net::http_client(rustls::RootCertStore::empty()).unwrap();
        BoundedClient::new(inner, timeout)
    }

    fn get(addr: std::net::SocketAddr) -> http::Request<BodyWrapper<Bytes>> {
        http::Request::get(format!("http://{addr}/directory?secret=1"))
            .body(BodyWrapper::default())
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_to_a_path_that_never_answers_ends_at_the_bound() {
        let (addr, _hole) = black_hole().await;
        let started = std::time::Instant::now();
        let err = client(Duration::from_millis(300))
            .request(get(addr))
            .await
            .err()
            .unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(timed_out(&err), "{err}");
        let text = err.to_string();
        assert!(text.contains("GET /directory"), "{text}");
        assert!(!text.contains("secret"), "no query in messages: {text}");
    }

    #[tokio::test]
    async fn a_task_bound_tightens_but_never_loosens_the_client_timeout() {
        let (addr, _hole) = black_hole().await;
        let client = client(Duration::from_millis(400));
        let started = std::time::Instant::now();
        let tight = with_request_bound(Duration::from_millis(100), client.request(get(addr)));
        assert!(tight.await.is_err());
        assert!(started.elapsed() < Duration::from_millis(350));
        let started = std::time::Instant::now();
        let loose = with_request_bound(Duration::from_secs(30), client.request(get(addr)));
        assert!(loose.await.is_err());
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3));
    }
}
