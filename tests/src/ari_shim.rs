//! A small HTTPS shim in front of Pebble that adds ACME Renewal Information (RFC 9773),
//! which Pebble 2.4.0 lacks.
//!
//! Everything is forwarded to Pebble with the client's `Host` header kept, so Pebble
//! builds its URLs (and checks the JWS `url`) against the shim's address. The shim adds
//! `renewalInfo` to the directory, answers it with the window the test chose for each
//! certificate, and records the `replaces` field of every newOrder request. It can also
//! list ACME profiles in the directory's `meta.profiles` (Pebble 2.4 has none) and
//! records the `profile` field of every newOrder.
//!
//! For fault drills it can also answer every request with an error status, or hold every
//! request for a while before forwarding it (a CA that is slow, not down).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use time::OffsetDateTime;

use crate::Pebble;

const RENEWAL_INFO_PATH: &str = "/renewal-info";

#[derive(Default)]
struct ShimState {
    /// Window per ARI certificate id; others get `default_window`.
    windows: HashMap<String, (OffsetDateTime, OffsetDateTime)>,
    default_window: Option<(OffsetDateTime, OffsetDateTime)>,
    retry_after_secs: u64,
    /// The `replaces` value of each newOrder, `None` when absent.
    new_orders: Vec<Option<String>>,
    /// The certificate ids renewalInfo was asked about, in order.
    queries: Vec<String>,
    /// A fault every request meets, for drills.
    fault: Option<Fault>,
    /// Answer newOrder requests that carry `replaces` with `alreadyReplaced`.
    refuse_replaces: bool,
    /// Profiles listed in the directory's `meta.profiles` (name, description); none when
    /// empty, as Pebble 2.4 lists none.
    profiles: Vec<(String, String)>,
    /// The `profile` field of each newOrder the CA accepted, `None` when absent.
    order_profiles: Vec<Option<String>>,
    /// A problem every newOrder is answered with, for pre-flight drills.
    new_order_problem: Option<NewOrderProblem>,
    /// newOrder requests answered with `new_order_problem`.
    refused_new_orders: usize,
    /// `meta.caaIdentities` added to the directory, when not empty.
    caa_identities: Vec<String>,
}

/// A problem document the shim answers newOrder with (a rate limit, a paused account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrderProblem {
    /// The HTTP status.
    pub status: u16,
    /// The problem type without `urn:ietf:params:acme:error:`.
    pub kind: String,
    /// The problem's detail.
    pub detail: String,
    /// A `Retry-After` header value, if any.
    pub retry_after: Option<String>,
}

/// What every request meets while a drill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answered at once with this status and an ACME `serverInternal` problem.
    Status(u16),
    /// Held this long, then forwarded.
    Delay(std::time::Duration),
}

/// A running shim; stops when dropped.
pub struct AriShim {
    /// The directory URL to give the ACME client instead of Pebble's.
    pub directory_url: String,
    state: Arc<Mutex<ShimState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AriShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AriShim {
    /// Starts a shim in front of `pebble` on a free loopback port, with Pebble's own
    /// listener certificate (so clients trust it with `pebble.ca_file`).
    pub async fn start(pebble: &Pebble) -> AriShim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind shim");
        let addr = listener.local_addr().expect("shim addr");
        let state = Arc::new(Mutex::new(ShimState {
            retry_after_secs: 3600,
            ..ShimState::default()
        }));

        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(pebble.dir().join("cert.pem"))
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(pebble.dir().join("key.pem"))
            .expect("key");
        let tls = rustls::ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("shim tls");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let roots = lobe_tls::net::root_store(Some(&pebble.ca_file)).expect("roots");
        let client = lobe_tls::net::http_client::<Full<Bytes>>(roots).expect("client");
        let upstream = pebble.directory_url.trim_end_matches("/dir").to_owned();

        let task_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let client = client.clone();
                let upstream = upstream.clone();
                let state = task_state.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let client = client.clone();
                        let upstream = upstream.clone();
                        let state = state.clone();
                        async move {
                            Ok::<_, Infallible>(handle(req, &client, &upstream, addr, &state).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        AriShim {
            directory_url: format!("https://{addr}/dir"),
            state,
            task,
        }
    }

    /// Answers renewalInfo for the certificate `ari_id` with `window`.
    pub fn set_window(&self, ari_id: &str, window: (OffsetDateTime, OffsetDateTime)) {
        self.lock().windows.insert(ari_id.to_owned(), window);
    }

    /// Answers renewalInfo for certificates without a window of their own with `window`.
    pub fn set_default_window(&self, window: (OffsetDateTime, OffsetDateTime)) {
        self.lock().default_window = Some(window);
    }

    /// The `Retry-After` (seconds) sent with renewalInfo answers.
    pub fn set_retry_after(&self, secs: u64) {
        self.lock().retry_after_secs = secs;
    }

    /// The `replaces` field of every newOrder seen, in order (`None`: absent).
    pub fn new_orders(&self) -> Vec<Option<String>> {
        self.lock().new_orders.clone()
    }

    /// The certificate ids renewalInfo was asked about, in order.
    pub fn queries(&self) -> Vec<String> {
        self.lock().queries.clone()
    }

    /// Answers every newOrder that names a certificate in `replaces` with an
    /// `alreadyReplaced` problem (RFC 9773 §5), as a CA does when another order replaced it.
    pub fn refuse_replaces(&self, yes: bool) {
        self.lock().refuse_replaces = yes;
    }

    /// Lists `profiles` (names) in the directory's `meta.profiles`, as a CA with the
    /// ACME profiles extension does. Pebble itself issues the same way for any of them.
    pub fn set_profiles(&self, profiles: &[&str]) {
        self.lock().profiles = profiles
            .iter()
            .map(|p| ((*p).to_owned(), format!("the {p} profile")))
            .collect();
    }

    /// The `profile` field of every newOrder the CA accepted, in order (`None`: absent).
    pub fn order_profiles(&self) -> Vec<Option<String>> {
        self.lock().order_profiles.clone()
    }

    /// Every request from now on meets `fault`; `None` heals.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Every newOrder from now on is answered with `problem`; `None` heals.
    pub fn set_new_order_problem(&self, problem: Option<NewOrderProblem>) {
        self.lock().new_order_problem = problem;
    }

    /// How many newOrder requests were answered with the problem of
    /// [`AriShim::set_new_order_problem`].
    pub fn refused_new_orders(&self) -> usize {
        self.lock().refused_new_orders
    }

    /// Adds `meta.caaIdentities` to the directory (Pebble lists none).
    pub fn set_caa_identities(&self, identities: &[&str]) {
        self.lock().caa_identities = identities.iter().map(|s| s.to_string()).collect();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShimState> {
        self.state.lock().expect("shim state")
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    client: &Client,
    upstream: &str,
    addr: SocketAddr,
    state: &Mutex<ShimState>,
) -> hyper::Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let fault = state.lock().expect("shim state").fault;
    match fault {
        Some(Fault::Status(status)) => {
            let problem = serde_json::json!({
                "type": "urn:ietf:params:acme:error:serverInternal",
                "detail": "the CA is failing (drill)",
            });
            return hyper::Response::builder()
                .status(status)
                .header("content-type", "application/problem+json")
                .body(Full::new(Bytes::from(problem.to_string())))
                .expect("response");
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    if let Some(id) = path.strip_prefix(&format!("{RENEWAL_INFO_PATH}/")) {
        return renewal_info(id, state);
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let new_order = if parts.method == hyper::Method::POST {
        new_order_replaces(&body)
    } else {
        None
    };
    let order_profile = if new_order.is_some() {
        new_order_profile(&body)
    } else {
        None
    };
    if new_order.is_some() {
        let mut state = state.lock().expect("shim state");
        if let Some(problem) = state.new_order_problem.clone() {
            state.refused_new_orders += 1;
            let body = serde_json::json!({
                "type": format!("urn:ietf:params:acme:error:{}", problem.kind),
                "detail": problem.detail,
                "status": problem.status,
            });
            let mut rsp = hyper::Response::builder()
                .status(problem.status)
                .header("content-type", "application/problem+json");
            if let Some(retry_after) = &problem.retry_after {
                rsp = rsp.header("retry-after", retry_after);
            }
            return rsp
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("response");
        }
    }
    if matches!(new_order, Some(Some(_))) && state.lock().expect("shim state").refuse_replaces {
        let problem = serde_json::json!({
            "type": "urn:ietf:params:acme:error:alreadyReplaced",
            "detail": "the certificate named in replaces was already replaced",
        });
        return hyper::Response::builder()
            .status(409)
            .header("content-type", "application/problem+json")
            .body(Full::new(Bytes::from(problem.to_string())))
            .expect("response");
    }
    let mut forward = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST {
            forward = forward.header(name, value);
        }
    }
    // Pebble builds its URLs, and checks the JWS `url`, from the Host header.
    let forward = forward
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(body))
        .expect("request");
    let rsp = match client.request(forward).await {
        Ok(rsp) => rsp,
        Err(e) => {
            return hyper::Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(e.to_string())))
                .expect("response");
        }
    };
    let (parts, body) = rsp.into_parts();
    // Only orders the CA accepted count: a request refused for a stale nonce is retried.
    let mut replaces = None;
    if let Some(sent) = new_order
        && parts.status.is_success()
    {
        let mut state = state.lock().expect("shim state");
        state.new_orders.push(sent.clone());
        state.order_profiles.push(order_profile.clone());
        replaces = sent;
    }
    let mut body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path == "/dir" {
        let mut dir: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "directory {}: {e}: {:?}",
                parts.status,
                String::from_utf8_lossy(&body)
            )
        });
        dir["renewalInfo"] = serde_json::json!(format!("https://{addr}{RENEWAL_INFO_PATH}"));
        let profiles = state.lock().expect("shim state").profiles.clone();
        if !profiles.is_empty() {
            let listed: serde_json::Map<String, serde_json::Value> = profiles
                .into_iter()
                .map(|(name, description)| (name, serde_json::Value::String(description)))
                .collect();
            dir["meta"]["profiles"] = serde_json::Value::Object(listed);
        }
        let caa_identities = state.lock().expect("shim state").caa_identities.clone();
        if !caa_identities.is_empty() {
            dir["meta"]["caaIdentities"] = serde_json::json!(caa_identities);
        }
        body = Bytes::from(dir.to_string());
    }
    // A CA that accepts `replaces` reflects it in the order (RFC 9773 §5); Pebble
    // ignores the field, so the shim adds it back.
    if let Some(replaces) = replaces
        && let Ok(mut order) = serde_json::from_slice::<serde_json::Value>(&body)
        && order.get("status").is_some()
    {
        order["replaces"] = serde_json::json!(replaces);
        body = Bytes::from(order.to_string());
    }
    // Likewise the profile the order was placed under.
    if let Some(profile) = order_profile
        && parts.status.is_success()
        && let Ok(mut order) = serde_json::from_slice::<serde_json::Value>(&body)
        && order.get("status").is_some()
    {
        order["profile"] = serde_json::json!(profile);
        body = Bytes::from(order.to_string());
    }
    let mut out = hyper::Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if name != hyper::header::CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    out.body(Full::new(body)).expect("response")
}

fn renewal_info(id: &str, state: &Mutex<ShimState>) -> hyper::Response<Full<Bytes>> {
    let mut state = state.lock().expect("shim state");
    state.queries.push(id.to_owned());
    let window = state.windows.get(id).copied().or(state.default_window);
    let Some((start, end)) = window else {
        return hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"unknown certificate")))
            .expect("response");
    };
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("rfc3339")
    };
    let body = serde_json::json!({
        "suggestedWindow": { "start": fmt(start), "end": fmt(end) }
    });
    hyper::Response::builder()
        .header("content-type", "application/json")
        .header("retry-after", state.retry_after_secs.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// The `profile` field of the newOrder JWS `body`, if it has one.
fn new_order_profile(body: &[u8]) -> Option<String> {
    let jws = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(jws["payload"].as_str()?)
        .ok()?;
    let payload = serde_json::from_slice::<serde_json::Value>(&payload).ok()?;
    payload["profile"].as_str().map(str::to_owned)
}

/// If `body` is a JWS whose payload is a newOrder: `Some(replaces)`.
fn new_order_replaces(body: &[u8]) -> Option<Option<String>> {
    let jws = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let payload = jws["payload"].as_str()?;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let payload = serde_json::from_slice::<serde_json::Value>(&payload).ok()?;
    payload.get("identifiers")?;
    Some(payload["replaces"].as_str().map(str::to_owned))
}
