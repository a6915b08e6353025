//! The http mode's request path: route by Host and path, apply the rate limit, pick an
//! upstream, rewrite the forwarding headers, send the request over the pool's keep-alive
//! HTTP/1.1 connections (retrying elsewhere when that is safe), and stream the answer
//! back as it arrives. WebSocket upgrades (HTTP/1.1 `Upgrade`, and RFC 8441 extended
//! CONNECT over h2) are answered and their bytes copied both ways.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use super::body::{BoxBody, BoxError};
use super::budget::{ConnBudget, Reservation};
use super::config::secs;
use super::forwarded;
use super::inflight::{self, InFlightPermit};
use super::metrics::GaugeGuard;
use super::pool::{PooledBody, SendError};
use super::shared::Shared;
use super::site::Site;
use super::upstream::{Choice, PickContext};
use super::upstream_state::ActiveGuard;

/// Bodies up to this size are read before sending, so the request can be sent again to
/// another upstream if the first cannot take it, when the connection's and the edge's
/// replay budgets (see [`super::budget`]) have room for them; others stream through, once.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// The slowest pace, in bytes a second, at which a request body may arrive once its
/// grace period (the header read timeout) is spent, as Apache's `mod_reqtimeout`
/// (`MinRate=500`): a client that trickles a body (slowloris) is answered 408 and its
/// connection closed, instead of holding it and an upstream connection for as long as
/// it likes.
const MIN_BODY_RATE: u64 = 500;

/// The connection a request came on.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub client: SocketAddr,
    pub tracker: Arc<super::hold::RequestTracker>,
    /// The client's address as the forwarding headers write it.
    pub values: forwarded::ClientValues,
    /// What the connection's requests may hold of their bodies for replay.
    pub budget: ConnBudget,
}

fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A short plain-text answer from the edge itself.
pub(crate) fn plain(status: StatusCode, text: &str) -> Response<BoxBody> {
    let mut response = Response::new(boxed(Full::new(Bytes::from(format!("{text}\n")))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn retry_after(mut response: Response<BoxBody>, wait: Duration) -> Response<BoxBody> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

/// The Host a request is for, without its port: the URI's authority (h2, absolute
/// form) or the Host header.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let authority = req.uri().authority().map(|a| a.host().to_owned());
    authority.or_else(|| {
        let value = req.headers().get(header::HOST)?.to_str().ok()?;
        let authority: http::uri::Authority = value.parse().ok()?;
        Some(authority.host().to_owned())
    })
}

/// Headers that belong to one hop and are not forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
        // Fields the Connection header names, in any of its values; `keep-alive` and
        // `close` (by far the most common) name none that the pass below misses.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in connection.remove_entry_mult().1 {
            for token in value.to_str().unwrap_or_default().split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    // One pass to see whether any other is there (most often none is).
    let is_hop = |name: &HeaderName| {
        name == header::TE
            || name == header::TRAILER
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::PROXY_AUTHORIZATION
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
    };
    if headers.keys().any(is_hop) {
        for name in [
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
            header::PROXY_AUTHORIZATION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
        ] {
            headers.remove(name);
        }
    }
}

/// h2 clients may send one `cookie` field per cookie; an HTTP/1.1 upstream expects one
/// (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if let Ok(value) = HeaderValue::from_str(&joined.join("; ")) {
        headers.insert(header::COOKIE, value);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// What kind of upgrade a request asks for.
enum Upgrade {
    None,
    /// HTTP/1.1 `Upgrade: <protocol>`.
    Http1(HeaderValue),
    /// h2 extended CONNECT with `:protocol websocket`.
    H2WebSocket,
}

fn upgrade_of(req: &Request<Incoming>) -> Upgrade {
    if req.method() == Method::CONNECT {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return if websocket {
            Upgrade::H2WebSocket
        } else {
            Upgrade::None
        };
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    match req.headers().get(header::UPGRADE) {
        Some(protocol) if asks && req.version() == http::Version::HTTP_11 => {
            Upgrade::Http1(protocol.clone())
        }
        _ => Upgrade::None,
    }
}

/// Answers one request. It counts as in flight on its connection while it is answered,
/// and a relayed response until its body is done (see [`Relay`]).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let _in_flight = conn.tracker.start();
    answer(shared, &conn, req).await
}

async fn answer(shared: Arc<Shared>, conn: &ConnInfo, req: Request<Incoming>) -> Response<BoxBody> {
    let started = Instant::now();
    let host = request_host(&req);
    let router = shared.router.load_full();
    let Some(site) = router.site(host.as_deref()).cloned() else {
        shared
            .metrics
            .response("unknown", StatusCode::MISDIRECTED_REQUEST, 0.0);
        return plain(
            StatusCode::MISDIRECTED_REQUEST,
            "lobe-tls: no site is configured for this host",
        );
    };
    if let Err(wait) = shared.limits.check_rate(conn.client.ip()) {
        site.metrics.rate_limited.inc();
        site.metrics.response(StatusCode::TOO_MANY_REQUESTS, 0.0);
        return retry_after(
            plain(
                StatusCode::TOO_MANY_REQUESTS,
                "lobe-tls: too many requests; slow down",
            ),
            wait,
        );
    }
    // The client's place among its requests in flight, held until the response body
    // ends or the upgraded connection closes. Over the cap: refused before any upstream
    // is asked, so neither the upstream's connections nor its standing are touched.
    let Ok(permit) = shared.in_flight.admit(conn.client.ip()) else {
        shared
            .metrics
            .rejected_requests
            .get_or_create(&super::metrics::ReasonLabels {
                reason: inflight::REASON.to_owned(),
            })
            .inc();
        site.metrics.response(StatusCode::TOO_MANY_REQUESTS, 0.0);
        return retry_after(
            plain(
                StatusCode::TOO_MANY_REQUESTS,
                "lobe-tls: too many requests in flight from this client",
            ),
            Duration::from_secs(1),
        );
    };
    let mut response = forward(&shared, &site, conn, host.as_deref(), req, permit).await;
    site.metrics
        .response(response.status(), started.elapsed().as_secs_f64());
    if let Some(max_age) = site.config.hsts {
        response.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_str(&format!("max-age={max_age}"))
                .unwrap_or(HeaderValue::from_static("max-age=0")),
        );
    }
    response
}

async fn forward(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    conn: &ConnInfo,
    host: Option<&str>,
    mut req: Request<Incoming>,
    permit: InFlightPermit,
) -> Response<BoxBody> {
    let pool = site.pool(req.uri().path()).clone();
    let upgrade = upgrade_of(&req);
    let client_upgrade = match upgrade {
        Upgrade::None => None,
        _ => Some(hyper::upgrade::on(&mut req)),
    };
    let (mut parts, body) = req.into_parts();
    // Size limit: a declared length over it is refused at once; a streamed body is cut
    // when it passes it.
    let limit = site.config.max_body_size;
    let declared = body.size_hint().exact().or(body.size_hint().upper());
    let sends_body = !body.is_end_stream() && matches!(upgrade, Upgrade::None);
    if let (Some(limit), Some(length)) = (limit, body.size_hint().exact())
        && length > limit
    {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "lobe-tls: request body too large",
        );
    }
    let trusted = forwarded::is_trusted(&shared.config.trusted_proxies, conn.client.ip());
    forwarded::rewrite(&mut parts.headers, &conn.values, trusted, host);
    let cookie = pool
        .cookie_name()
        .and_then(|name| cookie_value(&parts.headers, name));
    strip_hop_by_hop(&mut parts.headers);
    join_cookies(&mut parts.headers);
    match &upgrade {
        Upgrade::Http1(protocol) => {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        Upgrade::H2WebSocket => {
            // RFC 8441 → RFC 6455 towards the upstream: a GET with a fresh key.
            parts.method = Method::GET;
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let key: [u8; 16] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            if let Ok(key) = HeaderValue::from_str(&key) {
                parts.headers.insert(header::SEC_WEBSOCKET_KEY, key);
            }
            parts
                .headers
                .entry(header::SEC_WEBSOCKET_VERSION)
                .or_insert(HeaderValue::from_static("13"));
        }
        Upgrade::None => {}
    }
    if parts.headers.get(header::HOST).is_none()
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.version = http::Version::HTTP_11;

    // The body: replayable when empty, or small and within the replay budgets; streamed
    // (one attempt) otherwise.
    let mut replayable: Option<Replay> = None;
    let mut streamed: Option<BoxBody> = None;
    if body.is_end_stream() || !matches!(upgrade, Upgrade::None) {
        // An upgrade's bytes follow the exchange (h2: the CONNECT stream itself).
        replayable = Some(Replay::default());
    } else if let Some(length) = declared.filter(|n| *n <= REPLAYABLE_BODY)
        && let Ok(reservation) = conn.budget.reserve(length)
    {
        // The reservation is taken before the first byte is read and given back, on
        // every path, when the last copy of the body is dropped.
        let paced = Paced::new(body, shared.config.header_read_timeout);
        let read = tokio::time::timeout(
            secs(site.config.idle_timeout).min(Duration::from_secs(60)),
            Limited::new(paced, usize::try_from(length).unwrap_or(0)).collect(),
        )
        .await;
        match read {
            Ok(Ok(collected)) => {
                replayable = Some(Replay {
                    bytes: collected.to_bytes(),
                    held: Some(Arc::new(reservation)),
                });
            }
            Ok(Err(e)) => return body_failed(&*e),
            Err(_) => return body_failed(&BodyTooSlow),
        }
    } else {
        let paced = Paced::new(body, shared.config.header_read_timeout);
        streamed = Some(match limit {
            Some(limit) => boxed(Limited::new(
                paced,
                usize::try_from(limit).unwrap_or(usize::MAX),
            )),
            None => boxed(paced),
        });
    }

    let cx = PickContext {
        client_ip: conn.client.ip(),
    };
    let idempotent = is_idempotent(&parts.method);
    let idle = site.config.idle();
    // Upstreams get the origin form; the Host header says the rest.
    parts.uri = origin_form(std::mem::take(&mut parts.uri));
    // The head is copied for a later attempt only when one could follow.
    let more_attempts = pool.members().len() > 1;
    let mut parts = Some(parts);
    let mut unsent: Option<Request<BoxBody>> = None;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = None;
    while let Some(choice) = pool.choose(&cx, cookie.as_deref(), &tried) {
        if !tried.is_empty() {
            site.metrics.retries.inc();
        }
        tried.push(choice.index);
        let upstream = pool.members()[choice.index].upstream.clone();
        let Some(conns) = pool.conns(choice.index) else {
            break;
        };
        let request = match unsent.take() {
            Some(request) => request,
            None => {
                let body = match (&replayable, streamed.take()) {
                    (Some(replay), _) => replay.body(),
                    (None, Some(body)) => body,
                    (None, None) => break,
                };
                let head = if more_attempts && replayable.is_some() {
                    parts.clone()
                } else {
                    parts.take()
                };
                let Some(head) = head else { break };
                Request::from_parts(head, body)
            }
        };
        let guard = upstream.open();
        // Boxed: the exchange's state is large, and would otherwise be copied along with
        // every future that holds this one.
        let sent = tokio::time::timeout(idle, Box::pin(conns.send(request))).await;
        match sent {
            Ok(Ok(response)) => {
                if response.status().is_server_error() {
                    upstream.failed(pool.fall, pool.cooldown);
                } else {
                    upstream.succeeded();
                }
                return respond(
                    shared,
                    site,
                    conn,
                    choice,
                    guard,
                    response,
                    client_upgrade,
                    &upgrade,
                    permit,
                );
            }
            Ok(Err((e, returned))) => {
                let connect = e.is_connect();
                if let SendError::Exchange(failed) = &e
                    && failed.is_user()
                {
                    // The client's body failed (cut, too slow, too large), not the
                    // upstream: the client is answered, the upstream keeps its standing.
                    tracing::debug!(upstream = upstream.addr, error = %e, "request body failed");
                    return body_failed(failed);
                }
                if e.is_local() {
                    // Out of descriptors or ports here: the upstream is not to blame.
                    tracing::warn!(upstream = upstream.addr, error = %e, "cannot open an upstream connection");
                } else if sends_body && hung_up(&e) {
                    // An upstream that answers without reading a body may close (or, with
                    // the body unread, reset) the connection under it: it is alive, and
                    // counting this would let one client take every upstream out with a
                    // few uploads. Connect failures, 5xx answers, timeouts, bodiless
                    // requests and the health checks still judge it.
                    tracing::debug!(upstream = upstream.addr, error = %e, "upstream closed the connection under a request body");
                } else {
                    tracing::debug!(upstream = upstream.addr, error = %e, connect, "upstream request failed");
                    upstream.failed(pool.fall, pool.cooldown);
                }
                last_error = Some(e.to_string());
                // Safe to send again: nothing reached the upstream (the request came
                // back), or the request is idempotent and its body can be sent again.
                match returned {
                    Some(request) => unsent = Some(request),
                    None if idempotent && replayable.is_some() => {}
                    None => break,
                }
            }
            Err(_) => {
                last_error = Some(format!("no answer within {idle:?}"));
                break;
            }
        }
    }
    if let Some(error) = last_error {
        tracing::warn!(site = site.name, error, "no upstream answered");
        return retry_after(
            plain(
                StatusCode::BAD_GATEWAY,
                "lobe-tls: the upstream servers did not answer",
            ),
            Duration::from_secs(1),
        );
    }
    // Every upstream is out: say so at once, with a hint to come back soon.
    retry_after(
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "lobe-tls: no upstream server is available",
        ),
        Duration::from_secs(1),
    )
}

#[allow(clippy::too_many_arguments)]
fn respond(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    conn: &ConnInfo,
    choice: Choice,
    guard: ActiveGuard,
    mut response: Response<PooledBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    upgrade: &Upgrade,
    permit: InFlightPermit,
) -> Response<BoxBody> {
    let idle = site.config.idle();
    // The response counts as in flight on its client connection until its body is
    // done, or for as long as an upgraded connection stays open (an h2 connection
    // carries other requests meanwhile).
    let in_flight = conn.tracker.start();
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let websockets = GaugeGuard::new(site.metrics.websockets.clone());
        let task = async move {
            let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
                (Ok(client), Ok(upstream)) => (client, upstream),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let moved =
                super::tcp::forward(TokioIo::new(client), TokioIo::new(upstream), idle).await;
            tracing::debug!(?moved, "upgraded connection closed");
            drop((guard, websockets, in_flight, permit));
        };
        shared.spawn_detached(task);
        let (mut parts, _) = response.into_parts();
        if matches!(upgrade, Upgrade::H2WebSocket) {
            // The h2 client gets a 200 for its CONNECT; the key exchange was ours.
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
        if let Some(cookie) = choice
            .set_cookie
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
        return Response::from_parts(parts, boxed(Empty::new()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(cookie) = choice
        .set_cookie
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        parts.headers.append(header::SET_COOKIE, cookie);
    }
    let stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
        .then(|| GaugeGuard::new(site.metrics.streams.clone()));
    let body = Relay {
        inner: body,
        idle,
        waiting: false,
        timer: None,
        _guards: (guard, stream, in_flight, permit),
    };
    Response::from_parts(parts, BoxBody::new(body))
}

/// Why the client's body could not be read or sent: too slow (408), past the size limit
/// (413), or cut (400); the answer closes an HTTP/1.1 connection, as its body is not read.
fn body_failed(error: &(dyn std::error::Error + 'static)) -> Response<BoxBody> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<BodyTooSlow>() {
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                "lobe-tls: the request body came too slowly",
            );
        }
        if e.is::<http_body_util::LengthLimitError>() {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "lobe-tls: request body too large",
            );
        }
        cause = e.source();
    }
    plain(
        StatusCode::BAD_REQUEST,
        "lobe-tls: could not read the request body",
    )
}

/// Whether the upstream closed or reset the connection during the exchange (before its
/// answer came back whole): no answer, a broken pipe, a reset.
fn hung_up(error: &SendError) -> bool {
    let SendError::Exchange(failed) = error else {
        return false;
    };
    if failed.is_incomplete_message() {
        return true;
    }
    let mut cause = std::error::Error::source(failed);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        cause = e.source();
    }
    false
}

/// A client's request body came slower than [`MIN_BODY_RATE`].
#[derive(Debug, thiserror::Error)]
#[error("the request body came slower than {MIN_BODY_RATE} bytes a second")]
struct BodyTooSlow;

/// A client's request body that must keep up [`MIN_BODY_RATE`] after a grace period.
/// Only the time spent waiting for the client counts (not the time the upstream takes to
/// read what came), so a slow upstream never gets a client cut.
struct Paced<B> {
    inner: B,
    grace: Duration,
    received: u64,
    /// Time spent waiting for the client in the waits that ended.
    waited: Duration,
    /// When the wait in progress began.
    waiting_since: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Paced<B> {
    fn new(inner: B, grace: Duration) -> Self {
        Paced {
            inner,
            grace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(since) = this.waiting_since.take() {
                this.waited += since.elapsed();
            }
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                this.received += data.map_or(0, |d| d.len() as u64);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.waiting_since.is_none() {
            // A new wait: its deadline is what the bytes so far have earned, less the
            // waits before it.
            let now = tokio::time::Instant::now();
            this.waiting_since = Some(now);
            let earned = this.grace
                + Duration::from_millis(this.received.saturating_mul(1000) / MIN_BODY_RATE);
            let deadline = now + earned.saturating_sub(this.waited);
            match this.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(BodyTooSlow.into()))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read whole, to send again if an attempt fails, with its place in the
/// replay budgets.
#[derive(Debug, Clone, Default)]
struct Replay {
    bytes: Bytes,
    held: Option<Arc<Reservation>>,
}

impl Replay {
    /// The body for one attempt; it keeps the reservation until it is dropped too, as
    /// the upstream connection may hold it past the attempt.
    fn body(&self) -> BoxBody {
        boxed(Replayed {
            bytes: (!self.bytes.is_empty()).then(|| self.bytes.clone()),
            _held: self.held.clone(),
        })
    }
}

/// One attempt's copy of a [`Replay`]: its bytes in one frame.
struct Replayed {
    bytes: Option<Bytes>,
    _held: Option<Arc<Reservation>>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.bytes.take().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// The origin form (`/path?query`) of a request target; `/` when it has no path.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// An upstream response body passed on frame by frame as it arrives (nothing is
/// gathered), cut when no frame comes for the site's idle timeout. It holds the
/// upstream's open count, the stream gauge and the request's place in flight (on its
/// client connection and in its client's cap) until it ends.
///
/// The idle timer is armed only while the body waits, so a body that is all there
/// (most pages) never touches the timer wheel.
struct Relay {
    inner: PooledBody,
    idle: Duration,
    /// Waiting since the last frame (the timer is armed for this wait).
    waiting: bool,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    _guards: (
        ActiveGuard,
        Option<GaugeGuard>,
        super::hold::RequestGuard,
        InFlightPermit,
    ),
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + self.idle;
            match self.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            // An error, not an end: the client must not take a cut body for a whole one.
            Some(Poll::Ready(())) => Poll::Ready(Some(Err("idle timeout".into()))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(headers[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; lobe=xyz; b=2"),
        );
        assert_eq!(cookie_value(&headers, "lobe").as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }
}
