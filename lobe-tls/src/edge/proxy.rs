//! The http mode's request path: route by Host and path, apply the rate limit, pick an
//! upstream, rewrite the forwarding headers, send the request over the pool's keep-alive
//! HTTP/1.1 connections (retrying elsewhere when that is safe), and stream the answer
//! back as it arrives. WebSocket upgrades (HTTP/1.1 `Upgrade`, and RFC 8441 extended
//! CONNECT over h2) are answered and their bytes copied both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Incoming};

use super::access_log::{Counted, Pending, Record, TlsFacts, ms};
use super::auth;
use super::body::{BoxBody, boxed};
use super::budget::ConnBudget;
use super::config::secs;
use super::forwarded;
use super::headers::{cookie_value, join_cookies, origin_form, request_host, strip_hop_by_hop};
use super::inflight::{self, InFlightPermit};
use super::metrics::GaugeGuard;
use super::pool::{ConnectTime, PooledBody, SendError};
use super::relay::Relay;
use super::request_body::{BodyTooSlow, Paced, REPLAYABLE_BODY, Replay};
use super::request_id::RequestId;
use super::shared::Shared;
use super::site::Site;
use super::upgrade::{self, Upgrade};
use super::upstream::{Choice, PickContext};
use super::upstream_state::ActiveGuard;

/// The connection a request came on.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub client: SocketAddr,
    pub tracker: Arc<super::hold::RequestTracker>,
    /// The client's address as the forwarding headers write it.
    pub values: forwarded::ClientValues,
    /// What the connection's requests may hold of their bodies for replay.
    pub budget: ConnBudget,
    /// The TLS session, as the access log writes it (empty without an access log).
    pub tls: Arc<TlsFacts>,
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

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Answers one request. It counts as in flight on its connection while it is answered,
/// and a relayed response until its body is done (see [`Relay`]).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Response<BoxBody> {
    let _in_flight = conn.tracker.start();
    // The id goes with the request (an extension, for the later phases) and comes back
    // on every answer, the edge's own included.
    let trusted = forwarded::is_trusted(&shared.config.trusted_proxies, conn.client.ip());
    let id = RequestId::of(req.headers(), trusted);
    // The access log record, filled as the request goes; a response with a body to
    // relay, or an upgrade, takes it along and writes it when done.
    let mut log = shared.access_log.as_ref().map(|log| {
        let record = Record::start(&req, id.as_str(), conn.client, &conn.tls);
        Pending::new(Box::new(record), log.clone())
    });
    req.extensions_mut().insert(id.clone());
    let mut response = answer(&shared, &conn, req, &mut log).await;
    id.stamp(response.headers_mut());
    if let Some(mut pending) = log {
        // The edge's own answer, or one whose body is all in its head.
        pending.record.status = response.status().as_u16();
        pending.record.bytes_out = response.body().size_hint().exact().unwrap_or(0);
        pending.finish();
    }
    response
}

async fn answer(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    log: &mut Option<Pending>,
) -> Response<BoxBody> {
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
    if !site.config.access_log {
        *log = None;
    } else if let Some(pending) = log {
        pending.record.site = Some(site.name.clone());
    }
    let route = site.route(req.uri().path());
    // The IP lists, on the address the connection established (PROXY from a trusted
    // peer, else the TCP peer), never on a header the client wrote.
    if !site.admits(req.uri().path(), conn.client.ip()) {
        site.metrics.denied_ip.inc();
        site.metrics.response(route, StatusCode::FORBIDDEN, 0.0);
        tracing::debug!(client = %conn.client.ip(), site = site.name, "request refused by the IP lists");
        return plain(StatusCode::FORBIDDEN, "lobe-tls: forbidden");
    }
    // API keys and basic auth (401), after the IP lists: a refused address costs no hash.
    if let Err(refused) = site.authenticate(&mut req).await {
        site.metrics.response(route, refused.status(), 0.0);
        let answer = plain(refused.status(), refused.text());
        return refused.answer(answer);
    }
    if let Err(wait) = shared.limits.check_rate(conn.client.ip()) {
        site.metrics.rate_limited.inc();
        site.metrics
            .response(route, StatusCode::TOO_MANY_REQUESTS, 0.0);
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
        site.metrics
            .response(route, StatusCode::TOO_MANY_REQUESTS, 0.0);
        return retry_after(
            plain(
                StatusCode::TOO_MANY_REQUESTS,
                "lobe-tls: too many requests in flight from this client",
            ),
            Duration::from_secs(1),
        );
    };
    let mut response = forward(
        shared,
        &site,
        route,
        conn,
        host.as_deref(),
        req,
        permit,
        log,
    )
    .await;
    site.metrics
        .response(route, response.status(), started.elapsed().as_secs_f64());
    if let Some(max_age) = site.config.hsts {
        response.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_str(&format!("max-age={max_age}"))
                .unwrap_or(HeaderValue::from_static("max-age=0")),
        );
    }
    response
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    route: usize,
    conn: &ConnInfo,
    host: Option<&str>,
    mut req: Request<Incoming>,
    permit: InFlightPermit,
    log: &mut Option<Pending>,
) -> Response<BoxBody> {
    let pool = site.pool_of(route).clone();
    let upgrade = upgrade::upgrade_of(&req);
    if let Some(pending) = log {
        pending.record.upgrade = upgrade::log_name(&upgrade);
    }
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
    // After the hop-by-hop headers went: a `Connection: x-request-id` cannot drop it.
    if let Some(id) = parts.extensions.get::<RequestId>() {
        id.stamp(&mut parts.headers);
    }
    // The same for the name the edge vouches for; the credential that admitted the
    // request stays here unless the site passes credentials.
    auth::vouch(
        &mut parts.headers,
        parts.extensions.get::<auth::Authenticated>(),
    );
    join_cookies(&mut parts.headers);
    upgrade::ask_upstream(&upgrade, &mut parts);
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
                let collected = collected.to_bytes();
                if let Some(pending) = log {
                    pending.record.bytes_in = collected.len() as u64;
                }
                replayable = Some(Replay::new(collected, reservation));
            }
            Ok(Err(e)) => return body_failed(&*e),
            Err(_) => return body_failed(&BodyTooSlow),
        }
    } else {
        let paced = Paced::new(body, shared.config.header_read_timeout);
        let paced = match log {
            Some(pending) => {
                let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
                pending.record.bytes_in_counter = Some(count.clone());
                boxed(Counted::new(paced, count))
            }
            None => boxed(paced),
        };
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
        let counted = site
            .upstream_metrics
            .get(route)
            .and_then(|members| members.get(choice.index));
        if let Some(counted) = counted {
            counted.requests.inc();
        }
        if let Some(pending) = log {
            pending.record.attempts += 1;
            pending.record.upstream = Some(upstream.addr.clone());
            pending.record.affinity = choice.affinity;
        }
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
        let sending = Instant::now();
        // Boxed: the exchange's state is large, and would otherwise be copied along with
        // every future that holds this one.
        let sent = tokio::time::timeout(idle, Box::pin(conns.send(request))).await;
        if let (Err(_) | Ok(Err(_)), Some(counted)) = (&sent, counted) {
            counted.errors.inc();
        }
        match sent {
            Ok(Ok(response)) => {
                let waited = sending.elapsed();
                if let Some(counted) = counted {
                    counted.response.observe(waited.as_secs_f64());
                    if response.status().is_server_error() {
                        counted.errors.inc();
                    }
                }
                if response.status().is_server_error() {
                    upstream.failed(pool.fall, pool.cooldown);
                } else {
                    upstream.succeeded();
                }
                if let Some(pending) = log {
                    let connect = response.extensions().get::<ConnectTime>();
                    pending.record.upstream_connect_ms = Some(connect.map_or(0.0, |c| ms(c.0)));
                    pending.record.upstream_ttfb_ms = Some(ms(waited));
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
                    log.take(),
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
    mut log: Option<Pending>,
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
        let (mut parts, _) = response.into_parts();
        upgrade::answer_client(upgrade, &mut parts);
        if let Some(pending) = &mut log {
            pending.record.status = parts.status.as_u16();
        }
        let held = (guard, websockets, in_flight, permit);
        let task = upgrade::splice(client_upgrade, upstream_upgrade, idle, held, log);
        shared.spawn_detached(task);
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
    if let Some(pending) = &mut log {
        pending.record.status = parts.status.as_u16();
        if stream.is_some() {
            pending.record.upgrade = Some("sse");
        }
    }
    let body = Relay::new(body, idle, (guard, stream, in_flight, permit), log);
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
