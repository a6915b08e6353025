//! The admin listener (`--admin-listen`, plain HTTP): `/healthz` (liveness), `/readyz`
//! (readiness, 503 with the reasons as JSON), `/metrics` (the same registry as the
//! metrics listener), and the read-only status page, `/status` (HTML) and
//! `/status.json`.
//!
//! `/healthz`, `/readyz` and `/metrics` carry no secret and need no credential, so that
//! probes and Prometheus reach them on the pod's address. `/status` and `/status.json`
//! do on a non-loopback address: a Bearer token ([`AdminToken`]), compared in constant
//! time. A non-loopback address without a token is refused at start.
//!
//! Like port 80 and the metrics listener, every connection has a header (and keep-alive
//! idle) timeout and a time limit, and the listener caps its connections, in total and
//! per client, so that a flood cannot take the probes' places for long.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::status::{self, Sources};
use crate::client_key::ClientPrefixes;
use crate::conn_limits::ConnLimits;
use crate::error::{Error, Result};
use crate::listen::ListenerTask;
use crate::metrics::Metrics;

/// Connections the admin listener keeps open at once.
const MAX_CONNS: usize = 256;
/// Connections from one client (a probe, Prometheus and an operator need few).
const MAX_CONNS_PER_CLIENT: usize = 32;

/// The Bearer token `/status` and `/status.json` require on a non-loopback address.
/// Never printed: its `Debug` says only that there is one.
#[derive(Clone)]
pub struct AdminToken(Arc<zeroize::Zeroizing<String>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// The token in `text` (surrounding white space dropped). An empty one is an error.
    pub fn new(text: &str) -> Result<Self> {
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::config("the admin token is empty"));
        }
        Ok(AdminToken(Arc::new(zeroize::Zeroizing::new(
            token.to_owned(),
        ))))
    }

    /// Reads the token from the file at `path` (`--admin-token-file`).
    pub fn read_file(path: &Path) -> Result<Self> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "--admin-token-file {}: cannot read it: {e}",
                path.display()
            ))
        })?);
        Self::new(&text).map_err(|_| {
            Error::config(format!(
                "--admin-token-file {}: the file holds no token",
                path.display()
            ))
        })
    }

    /// Whether `header` (an `Authorization` value) is `Bearer <this token>`, compared in
    /// constant time.
    fn admits(&self, header: Option<&http::HeaderValue>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(presented) = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        bool::from(presented.trim().as_bytes().ct_eq(self.0.as_bytes()))
    }
}

/// Refuses an admin address that is not loopback when no token guards the status page.
/// One line, naming both flags.
pub fn check_exposure(addr: SocketAddr, token: bool) -> Result<()> {
    if addr.ip().to_canonical().is_loopback() || token {
        return Ok(());
    }
    Err(Error::config(format!(
        "--admin-listen {addr} is not a loopback address: /status needs a Bearer token there, give --admin-token-file PATH (or listen on 127.0.0.1)"
    )))
}

/// The admin listener; stops when dropped.
#[derive(Debug)]
pub(super) struct AdminListener {
    task: ListenerTask,
}

struct Admin {
    sources: Arc<Sources>,
    metrics: Arc<Metrics>,
    /// `Some` on a non-loopback address: what `/status` requires.
    token: Option<AdminToken>,
}

impl AdminListener {
    /// Binds `addr`; the status page requires `token` unless `addr` is loopback.
    pub(super) async fn bind(
        addr: SocketAddr,
        sources: Arc<Sources>,
        metrics: Arc<Metrics>,
        token: Option<AdminToken>,
    ) -> Result<Self> {
        check_exposure(addr, token.is_some())?;
        let loopback = addr.ip().to_canonical().is_loopback();
        let admin = Arc::new(Admin {
            sources,
            metrics,
            token: token.filter(|_| !loopback),
        });
        let task = ListenerTask::spawn(addr, |listener| accept_loop(listener, admin)).await?;
        Ok(AdminListener { task })
    }

    pub(super) fn local_addr(&self) -> SocketAddr {
        self.task.local_addr()
    }
}

async fn accept_loop(listener: TcpListener, admin: Arc<Admin>) {
    let caps = ConnLimits::new(
        Some(MAX_CONNS),
        Some(MAX_CONNS_PER_CLIENT),
        ClientPrefixes::default(),
        Vec::new(),
    );
    // Dropped with the loop (the listener task aborted): every connection ends with it.
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = caps.admit(peer.ip()) else {
                    tracing::debug!(%peer, "admin connection refused: connection cap");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let admin = admin.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.respond(&req)) }
                    });
                    let _ = tokio::time::timeout(
                        crate::listen::HTTP_CONNECTION_LIMIT,
                        crate::listen::http_builder()
                            .serve_connection(TokioIo::new(stream), service),
                    )
                    .await;
                });
            }
        }
    }
}

impl Admin {
    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let readiness = self.sources.readiness();
                let status = if readiness.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(status, &readiness)
            }
            "/metrics" => reply(
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                self.metrics.render(),
            ),
            "/status" | "/status.json" => {
                if let Some(token) = &self.token
                    && !token.admits(req.headers().get(header::AUTHORIZATION))
                {
                    let mut rsp = text(
                        StatusCode::UNAUTHORIZED,
                        "a Bearer token (--admin-token-file) is required\n",
                    );
                    rsp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer realm=\"lobe-tls admin\""),
                    );
                    return rsp;
                }
                let page = self.sources.status();
                if path == "/status" {
                    reply(
                        StatusCode::OK,
                        "text/html; charset=utf-8",
                        status::render_html(&page),
                    )
                } else {
                    json(StatusCode::OK, &page)
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "admin endpoints: /healthz /readyz /metrics /status /status.json\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.to_owned())
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            reply(status, "application/json", body)
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode\n"),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_goes_without_a_token() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(check_exposure(addr("127.0.0.1:9180"), false).is_ok());
        assert!(check_exposure(addr("127.0.0.2:9180"), false).is_ok());
        assert!(check_exposure(addr("[::1]:9180"), false).is_ok());
        assert!(check_exposure(addr("[::ffff:127.0.0.1]:9180"), false).is_ok());
        assert!(check_exposure(addr("0.0.0.0:9180"), true).is_ok());
        let e = check_exposure(addr("0.0.0.0:9180"), false).unwrap_err();
        assert!(e.to_string().contains("--admin-token-file"), "{e}");
        assert_eq!(e.to_string().lines().count(), 1);
    }

    #[test]
    fn the_token_is_compared_whole_and_never_printed() {
        let token = AdminToken::new("s3cret\n").unwrap();
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert!(token.admits(Some(&v("Bearer s3cret"))));
        assert!(!token.admits(Some(&v("Bearer s3cre"))));
        assert!(!token.admits(Some(&v("Bearer s3cretx"))));
        assert!(!token.admits(Some(&v("Basic s3cret"))));
        assert!(!token.admits(None));
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(AdminToken::new("  \n").is_err());
    }
}
