//! HTTP-01: one token registry, answered by a standalone listener or by a tower service
//! mounted in an application's own router.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;

use super::{ChallengeData, ChallengeKind, Solver};
use crate::error::Result;
use crate::store::DynStore;

#[cfg(feature = "http01-listener")]
mod listener;
#[cfg(not(feature = "http01-listener"))]
mod no_listener;
mod per_second;
#[cfg(feature = "http01-listener")]
mod places;
mod probe_hint;
mod view;

#[cfg(feature = "http01-listener")]
pub use listener::{Http01Listener, Http01ListenerConfig, Http01Metrics, RefusalLabels, serve};
#[cfg(not(feature = "http01-listener"))]
pub(crate) use no_listener::Http01Listener;
pub(crate) use probe_hint::amend as explain_probe_failure;
use view::SharedTokens;

/// The path prefix ACME validation requests use.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// How long a token published to a shared store lives if cleanup never runs.
const SHARED_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The tokens currently being validated and their key authorizations.
///
/// Cheap to clone; every clone sees the same tokens. With a shared store attached,
/// tokens are published there too, so any instance of a cluster can answer.
///
/// A request for a token not held here is looked up in the shared store only when the
/// store's change feed announced it: the registry keeps an in-memory view of the store's
/// tokens, so a flood of random tokens makes no store round trip. While that view is not
/// in step (no change feed, or the feed is down), such lookups are rate-limited.
#[derive(Clone, Default)]
pub struct Http01Registry {
    tokens: Arc<RwLock<HashMap<String, String>>>,
    shared: Option<Arc<SharedTokens>>,
}

impl std::fmt::Debug for Http01Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.tokens.read().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("Http01Registry")
            .field("tokens", &count)
            .field("shared", &self.shared)
            .finish()
    }
}

impl Http01Registry {
    /// A registry local to this process.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry that also publishes tokens to, and looks them up in, a shared store.
    ///
    /// Inside a tokio runtime it starts following the store's change feed at once (else
    /// at its first lookup); the follower stops when the last clone is dropped.
    ///
    /// Refused when the store keeps no challenge tokens ([`ChallengeStore`]): tokens
    /// published nowhere would leave every other instance answering 404 to the CA.
    ///
    /// [`ChallengeStore`]: crate::store::ChallengeStore
    pub fn with_shared_store(store: DynStore) -> Result<Self> {
        store.challenges_for(view::NEEDED_FOR)?;
        Ok(Http01Registry {
            tokens: Arc::default(),
            shared: Some(Arc::new(SharedTokens::new(store))),
        })
    }

    fn store_key(token: &str) -> String {
        format!("{}{token}", view::PREFIX)
    }

    /// Whether the in-memory view of the shared store's tokens is in step with the store,
    /// so that a token it does not know is answered 404 without asking the store. False
    /// without a shared store.
    pub fn shared_view_in_step(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.in_step())
    }

    /// How many times this registry looked a token up in the shared store.
    pub fn shared_lookups(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.lookups())
    }

    /// Adds a token.
    pub async fn insert(&self, token: &str, key_authorization: &str) -> Result<()> {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.insert(token.to_owned(), key_authorization.to_owned());
        }
        if let Some(shared) = &self.shared {
            shared
                .challenges()?
                .put_challenge(&Self::store_key(token), key_authorization, SHARED_TOKEN_TTL)
                .await?;
        }
        Ok(())
    }

    /// Removes a token.
    pub async fn remove(&self, token: &str) -> Result<()> {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.remove(token);
        }
        if let Some(shared) = &self.shared {
            shared
                .challenges()?
                .delete_challenge(&Self::store_key(token))
                .await?;
        }
        Ok(())
    }

    /// The key authorization for `token`: local memory first, then the shared store if
    /// its change feed announced the token (see [`Http01Registry`]).
    pub async fn lookup(&self, token: &str) -> Option<String> {
        if let Some(found) = self.tokens.read().ok().and_then(|t| t.get(token).cloned()) {
            return Some(found);
        }
        if !view::is_token(token) {
            return None;
        }
        self.shared.as_ref()?.lookup(token).await
    }

    /// The number of tokens held in local memory.
    pub fn len(&self) -> usize {
        self.tokens.read().map(|t| t.len()).unwrap_or(0)
    }

    /// Whether local memory holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers one request: the key authorization for a current token, 404 otherwise.
    pub async fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let token = path.strip_prefix(CHALLENGE_PATH).unwrap_or_default();
        let body = if view::is_token(token) {
            self.lookup(token).await
        } else {
            None
        };
        match body {
            Some(key_authorization) => text_response(StatusCode::OK, key_authorization),
            None => text_response(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// A tower service that answers challenge requests and 404s everything else.
    pub fn service(&self) -> Http01Service {
        Http01Service {
            registry: self.clone(),
            redirect_to_https: false,
        }
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    rsp
}

/// A tower (and hyper) service over an [`Http01Registry`].
#[derive(Clone, Debug)]
pub struct Http01Service {
    registry: Http01Registry,
    redirect_to_https: bool,
}

impl Http01Service {
    /// Redirects every request that is not a challenge to the same URL on `https://`.
    pub fn redirect_others_to_https(mut self) -> Self {
        self.redirect_to_https = true;
        self
    }

    pub(crate) async fn call_inner<B>(self, req: Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path.starts_with(CHALLENGE_PATH) || !self.redirect_to_https {
            return self.registry.respond(path).await;
        }
        // Parsed as an authority rather than cut at the last colon, which would cut an
        // IPv6 literal (`[::1]`) in half and redirect to a URL that does not parse.
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok());
        let host = authority.as_ref().map_or("", |a| a.host());
        if host.is_empty() {
            return text_response(
                StatusCode::BAD_REQUEST,
                "missing or invalid Host header\n".into(),
            );
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut location = format!("https://{host}");
        // The http crate lets bytes outside ASCII through in the path; a Location must be
        // ASCII, so they go out percent-encoded.
        for &b in path_and_query.as_bytes() {
            if b.is_ascii_graphic() {
                location.push(char::from(b));
            } else {
                location.push_str(&format!("%{b:02X}"));
            }
        }
        // The http crate accepts some authorities (`z[::1]`) that do not parse back
        // inside a URL: redirect only to a URL that parses, to the host asked for.
        let parses = location
            .parse::<http::Uri>()
            .is_ok_and(|uri| uri.host() == Some(host));
        let value = header::HeaderValue::from_str(&location).ok();
        let (true, Some(value)) = (parses, value) else {
            return text_response(
                StatusCode::BAD_REQUEST,
                "missing or invalid Host header\n".into(),
            );
        };
        let mut rsp = text_response(StatusCode::MOVED_PERMANENTLY, String::new());
        rsp.headers_mut().insert(header::LOCATION, value);
        rsp
    }
}

impl<B: Send + 'static> tower::Service<Request<B>> for Http01Service {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.call_inner(req).await) })
    }
}

/// The HTTP-01 solver: puts tokens into a registry that a listener or service answers from.
#[derive(Debug, Clone)]
pub struct Http01Solver {
    registry: Http01Registry,
}

impl Http01Solver {
    /// A solver over `registry`.
    pub fn new(registry: Http01Registry) -> Self {
        Http01Solver { registry }
    }

    /// The registry this solver fills.
    pub fn registry(&self) -> &Http01Registry {
        &self.registry
    }
}

#[async_trait]
impl Solver for Http01Solver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Http01
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        self.registry
            .insert(&challenge.token, &challenge.key_authorization)
            .await
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        self.registry.remove(&challenge.token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(rsp: Response<Full<Bytes>>) -> String {
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn answers_current_tokens_only() {
        let registry = Http01Registry::new();
        registry.insert("tok_1", "tok_1.thumb").await.unwrap();
        let ok = registry.respond("/.well-known/acme-challenge/tok_1").await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(body_of(ok).await, "tok_1.thumb");
        for path in [
            "/.well-known/acme-challenge/other",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/../tok_1",
            "/index.html",
        ] {
            assert_eq!(
                registry.respond(path).await.status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
        registry.remove("tok_1").await.unwrap();
        let gone = registry.respond("/.well-known/acme-challenge/tok_1").await;
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn redirects_other_requests_to_https_when_asked() {
        use tower::ServiceExt;
        let service = Http01Registry::new().service().redirect_others_to_https();
        let req = Request::builder()
            .uri("/chat?room=1")
            .header("host", "chat.example.com:80")
            .body(())
            .unwrap();
        let rsp = service.oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            rsp.headers()[header::LOCATION],
            "https://chat.example.com/chat?room=1"
        );
    }

    /// Found by the property tests: a Host of `[::1]` was cut at its last colon and
    /// redirected to `https://[:/`. Hosts that cannot make a valid URL get a 400.
    #[tokio::test]
    async fn redirects_keep_ipv6_hosts_whole_and_refuse_bad_ones() {
        use tower::ServiceExt;
        let service = Http01Registry::new().service().redirect_others_to_https();
        for (host, location) in [
            ("[::1]", "https://[::1]/a?b"),
            ("[::1]:8080", "https://[::1]/a?b"),
            ("example.com", "https://example.com/a?b"),
        ] {
            let req = Request::builder()
                .uri("/a?b")
                .header("host", host)
                .body(())
                .unwrap();
            let rsp = service.clone().oneshot(req).await.unwrap();
            assert_eq!(rsp.status(), StatusCode::MOVED_PERMANENTLY, "{host}");
            assert_eq!(rsp.headers()[header::LOCATION], location, "{host}");
        }
        // `z[::1]` was found by the `http01` fuzz target: the http crate takes it as an
        // authority, but not inside a URL.
        // Found by the `http01` fuzz target: a path with bytes outside ASCII went into
        // the Location as they were.
        let req = Request::builder()
            .uri("/caf\u{e9}?q=\u{e9}")
            .header("host", "example.com")
            .body(())
            .unwrap();
        let rsp = service.clone().oneshot(req).await.unwrap();
        assert_eq!(
            rsp.headers()[header::LOCATION],
            "https://example.com/caf%C3%A9?q=%C3%A9"
        );
        for host in ["", "a b", "example.com/evil", ":80", "z[::1]"] {
            let req = Request::builder()
                .uri("/a")
                .header("host", host)
                .body(())
                .unwrap();
            let rsp = service.clone().oneshot(req).await.unwrap();
            assert_eq!(rsp.status(), StatusCode::BAD_REQUEST, "{host:?}");
        }
    }

    #[cfg(feature = "http01-listener")]
    #[tokio::test]
    async fn busy_port_is_a_clear_error() {
        let first = Http01Listener::bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            Http01Registry::new().service(),
        )
        .await
        .unwrap();
        let err = Http01Listener::bind(first.local_addr(), Http01Registry::new().service())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot listen on"), "{err}");
    }
}
