//! A small HTTP/1.1 upstream on hyper, run as a separate process by the edge's tests.
//!
//! Routes: `/healthz` (200, or 503 after `/sick` until `/well`), `/whoami` (its name), `/headers`
//! (the request's headers, one per line, then `peer: ADDR`), `/page` (100 bytes),
//! `/sse?n=N&gap_ms=M` (N events, M ms apart, each flushed), `/clock?n=N&every_ms=M` (N
//! events M ms apart, each carrying its send time, for delay benchmarks), `/ws` (WebSocket echo),
//! `/status/CODE`, `/slow?ms=M` (and `/slow/in-flight`, how many are sleeping now), `/upload` (the body's length; `/upload/in-flight`, how many are being read now); for the browser test,
//! `/app` (a page that streams over `EventSource` and `WebSocket`), `/tokens?n=N&gap_ms=M`
//! (SSE that resumes after `Last-Event-ID`), `/streams` (open token streams and
//! WebSockets) and `/report` (POST stores a page's report, GET reads them).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// Serves on `addr` as `name` until the process ends.
pub async fn serve(addr: &str, name: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let name: Arc<str> = name.into();
    let sick = Arc::new(AtomicBool::new(false));
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (name, sick) = (name.clone(), sick.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (name, sick) = (name.clone(), sick.clone());
                async move { Ok::<_, Infallible>(respond(req, peer, &name, &sick).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http1_only()
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    name: &str,
    sick: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" if sick.load(Ordering::Relaxed) => status(503, "sick"),
        "/healthz" => status(200, "ok"),
        "/sick" => {
            sick.store(true, Ordering::Relaxed);
            status(200, "now sick")
        }
        "/well" => {
            sick.store(false, Ordering::Relaxed);
            status(200, "well again")
        }
        p if p.ends_with("/whoami") => status(200, name),
        "/headers" => {
            let mut text = String::new();
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            text.push_str(&format!("peer: {peer}\nserved-by: {name}\n"));
            status(200, &text)
        }
        "/page" => Response::new(full(vec![b'x'; 100])),
        "/app" => {
            let mut response = Response::new(full(APP_PAGE));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        "/tokens" => tokens(&req),
        "/clock" => clock(&req),
        "/streams" => status(
            200,
            &format!(
                "{} {}",
                OPEN_TOKEN_STREAMS.load(Ordering::Relaxed),
                OPEN_WEBSOCKETS.load(Ordering::Relaxed)
            ),
        ),
        "/report" if req.method() == http::Method::POST => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            if let Ok(mut reports) = REPORTS.lock() {
                reports.push(String::from_utf8_lossy(&body).into_owned());
            }
            status(200, "thanks")
        }
        "/report" => {
            let reports = REPORTS.lock().map(|r| r.join("\n")).unwrap_or_default();
            status(200, &reports)
        }
        "/upload/in-flight" => status(200, &UPLOADS_IN_FLIGHT.load(Ordering::Relaxed).to_string()),
        "/upload" => {
            let _open = Open::new(&UPLOADS_IN_FLIGHT);
            let length = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            status(200, &length.to_string())
        }
        "/slow/in-flight" => status(200, &SLOW_IN_FLIGHT.load(Ordering::Relaxed).to_string()),
        "/slow" => {
            let _open = Open::new(&SLOW_IN_FLIGHT);
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(1000))).await;
            status(200, name)
        }
        "/sse" => {
            let n = query(&req, "n").unwrap_or(3);
            let gap = Duration::from_millis(query(&req, "gap_ms").unwrap_or(100));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let name = name.to_owned();
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep(gap).await;
                    let event = format!("data: {name} {i}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream_from(rx);
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/event-stream"
                    .parse()
                    .unwrap_or(header::HeaderValue::from_static("text/plain")),
            );
            response
        }
        "/ws" => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                return status(400, "not a websocket request");
            };
            let upgrade = hyper::upgrade::on(&mut req);
            let name = name.to_owned();
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let _open = Open::new(&OPEN_WEBSOCKETS);
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        let reply = match message.into_text() {
                            Ok(text) => format!("{name}: {text}").into(),
                            Err(_) => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("upgrade"),
            );
            headers.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            if let Ok(accept) = derive_accept_key(key.as_bytes()).parse() {
                headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            }
            response
        }
        other => match other
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
        {
            Some(code) => status(code, name),
            None => status(404, "not found"),
        },
    }
}

fn status(code: u16, text: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{text}\n")));
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
}

/// An mpsc receiver as a stream of frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Token streams (`/tokens`) and WebSockets open now, for `/streams`.
static OPEN_TOKEN_STREAMS: AtomicU32 = AtomicU32::new(0);
static OPEN_WEBSOCKETS: AtomicU32 = AtomicU32::new(0);
/// `/slow` requests sleeping now, for `/slow/in-flight`: tests wait on it, not on a guess.
static SLOW_IN_FLIGHT: AtomicU32 = AtomicU32::new(0);
/// `/upload` bodies being read now, for `/upload/in-flight`.
static UPLOADS_IN_FLIGHT: AtomicU32 = AtomicU32::new(0);
/// What pages posted to `/report`.
static REPORTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Counts one open stream in `counter` until dropped.
struct Open(&'static AtomicU32);

impl Open {
    fn new(counter: &'static AtomicU32) -> Open {
        counter.fetch_add(1, Ordering::Relaxed);
        Open(counter)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `/tokens?n=N&gap_ms=M`: an SSE stream of tokens `0..N` with their index as the event id,
/// resumed after `Last-Event-ID` (as a browser's `EventSource` reconnects), then a `done`
/// event. A replica that takes over a stream carries on where the dead one stopped.
fn tokens(req: &Request<Incoming>) -> Response<Body> {
    let n = query(req, "n").unwrap_or(10);
    let gap = Duration::from_millis(query(req, "gap_ms").unwrap_or(50));
    let first = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |last| last + 1);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let _open = Open::new(&OPEN_TOKEN_STREAMS);
        // Reconnect quickly when the stream is cut.
        if tx
            .send(Ok(Frame::data(Bytes::from("retry: 100\n\n"))))
            .await
            .is_err()
        {
            return;
        }
        for i in first..n {
            tokio::time::sleep(gap).await;
            let event = format!("id: {i}\ndata: token-{i}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from(format!(
                "event: done\ndata: {n}\n\n"
            )))))
            .await;
    });
    event_stream(rx)
}

/// A `text/event-stream` response whose frames come from `rx`.
fn event_stream(
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// `/clock?n=N&every_ms=M`: N SSE events on a fixed M ms schedule, each `data: T` with T
/// the time it was handed to hyper, in microseconds since the UNIX epoch. A client on the
/// same machine (same clock) reads the delay through whatever sits between from each one.
fn clock(req: &Request<Incoming>) -> Response<Body> {
    let n = query(req, "n").unwrap_or(10).min(1_000_000);
    let every = Duration::from_millis(query(req, "every_ms").unwrap_or(100).clamp(1, 60_000));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        // A fixed schedule: a late tick does not push the later ones back.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for _ in 0..n {
            ticks.tick().await;
            let micros = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let event = format!("data: {micros}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
    });
    event_stream(rx)
}

/// The page the browser test loads: it streams tokens over `EventSource` and echoes
/// messages over a `WebSocket`, reconnecting either when it is cut, and posts what it saw
/// to `/report` once both are complete.
const APP_PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>lobe-tls streams</title>
<script>
const params = new URLSearchParams(location.search);
const N = Number(params.get("tokens") || 20);
const M = Number(params.get("messages") || 20);
const seen = new Set();
let duplicates = 0, sseOpens = 0, sseDone = false;
const es = new EventSource("/tokens?n=" + N + "&gap_ms=60");
es.onopen = () => { sseOpens++; };
es.onmessage = (e) => {
  if (seen.has(e.lastEventId)) duplicates++;
  seen.add(e.lastEventId);
};
es.addEventListener("done", () => { sseDone = true; es.close(); finish(); });
let echoes = 0, wsOpens = 0, ws;
function openWs() {
  ws = new WebSocket("wss://" + location.host + "/ws");
  ws.onopen = () => { wsOpens++; send(); };
  ws.onmessage = (e) => {
    if (String(e.data).endsWith(": msg-" + echoes)) echoes++;
    setTimeout(send, 60);
  };
  ws.onclose = () => { if (echoes < M) setTimeout(openWs, 100); };
}
function send() {
  if (echoes >= M) { ws.onclose = null; ws.close(); finish(); return; }
  if (ws.readyState === WebSocket.OPEN) ws.send("msg-" + echoes);
}
openWs();
let reported = false;
function finish() {
  if (reported || !sseDone || echoes < M) return;
  reported = true;
  const missing = [];
  for (let i = 0; i < N; i++) if (!seen.has(String(i))) missing.push(i);
  const report = { tokens: seen.size, missing, duplicates, echoes,
                   sse_opens: sseOpens, ws_opens: wsOpens };
  const post = () => fetch("/report", { method: "POST", body: JSON.stringify(report) })
    .then((r) => { if (!r.ok) throw new Error(r.status); })
    .catch(() => setTimeout(post, 200));
  post();
}
</script>
"#;
