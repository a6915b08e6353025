//! A small local HTTP/1 server for tests that stand in for a web API or a webhook.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A request as the handler sees it: method, path with query, headers, whole body.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method.
    pub method: http::Method,
    /// Path and query, e.g. `/zones?name=example.com`.
    pub path_and_query: String,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// A server on 127.0.0.1; it stops when dropped.
pub struct HttpServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpServer {
    /// Serves `handler` on a free port of 127.0.0.1.
    pub async fn start<F, Fut>(handler: F) -> HttpServer
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = http::Response<String>> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0", handler).await
    }

    /// Serves `handler` on `addr` (a port a CA validates on, say).
    pub async fn start_on<F, Fut>(addr: &str, handler: F) -> HttpServer
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = http::Response<String>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let request = Request {
                                method: parts.method,
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                            };
                            let response = handler(request).await;
                            Ok::<_, std::convert::Infallible>(
                                response.map(|s| Full::new(Bytes::from(s))),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpServer { addr, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A response with `status` and a JSON body.
pub fn json_response(status: u16, body: serde_json::Value) -> http::Response<String> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .expect("response")
}

/// A static file server for `root`, as a web server serving a webroot would be: GET
/// `/PATH` answers the file `root/PATH`, 404 when there is none. Every path asked for is
/// pushed to `seen`.
pub async fn serve_webroot(
    addr: &str,
    root: std::path::PathBuf,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> HttpServer {
    HttpServer::start_on(addr, move |req: Request| {
        let root = root.clone();
        let seen = seen.clone();
        async move {
            let path = req
                .path_and_query
                .split('?')
                .next()
                .unwrap_or("")
                .to_owned();
            seen.lock().unwrap().push(path.clone());
            let file = (!path.contains(".."))
                .then(|| root.join(path.trim_start_matches('/')))
                .and_then(|f| std::fs::read_to_string(f).ok());
            match file {
                Some(body) => http::Response::new(body),
                None => http::Response::builder()
                    .status(404)
                    .body(String::new())
                    .expect("response"),
            }
        }
    })
    .await
}
