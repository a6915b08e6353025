//! The HTTP-01 tower service with an arbitrary method, request target and Host header.
#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use lobe_tls::Http01Registry;
use lobe_tls::challenge::http01::CHALLENGE_PATH;
use tower::ServiceExt;

const TOKEN: &str = "tok_EN-123";
const KEY_AUTHORIZATION: &str = "tok_EN-123.thumbprint";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

static REGISTRY: LazyLock<Http01Registry> = LazyLock::new(|| {
    let registry = Http01Registry::new();
    RUNTIME
        .block_on(registry.insert(TOKEN, KEY_AUTHORIZATION))
        .expect("insert");
    registry
});

fuzz_target!(|data: &[u8]| {
    // method NUL target NUL host
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let host = parts.next();
    let mut builder = Request::builder().method(method).uri(target);
    if let Some(host) = host {
        builder = builder.header(header::HOST, host);
    }
    let Ok(req) = builder.body(Full::new(Bytes::new())) else {
        return;
    };
    let path = req.uri().path().to_owned();
    let host_authority = host
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    for redirect in [false, true] {
        let mut service = REGISTRY.service();
        if redirect {
            service = service.redirect_others_to_https();
        }
        let req = clone_request(&req);
        let rsp = RUNTIME.block_on(service.oneshot(req)).expect("infallible");
        let status = rsp.status();
        let location = rsp.headers().get(header::LOCATION).cloned();
        let body = RUNTIME
            .block_on(rsp.into_body().collect())
            .expect("infallible")
            .to_bytes();
        match status {
            StatusCode::OK => {
                // Only the exact challenge path of a current token is answered.
                assert_eq!(path, format!("{CHALLENGE_PATH}{TOKEN}"));
                assert_eq!(body, KEY_AUTHORIZATION.as_bytes());
            }
            StatusCode::NOT_FOUND => {}
            StatusCode::MOVED_PERMANENTLY | StatusCode::BAD_REQUEST => {
                assert!(redirect && !path.starts_with(CHALLENGE_PATH));
                // A well-formed Host is redirected to that same host on https.
                if let Some(authority) = &host_authority
                    && status == StatusCode::MOVED_PERMANENTLY
                {
                    let location = location.expect("a redirect has a Location");
                    let uri: http::Uri = location
                        .to_str()
                        .expect("ASCII Location")
                        .parse()
                        .expect("the Location is a URI");
                    assert_eq!(uri.scheme_str(), Some("https"));
                    assert_eq!(uri.host(), Some(authority.host()), "{location:?}");
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
});

fn clone_request(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut out = Request::new(Full::new(Bytes::new()));
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}
