//! Request ids through the real binary: made by the edge, or kept from a trusted peer
//! when well formed; the upstream and the client see the same one.
use crate::ip_lists::get_from;
use crate::support::*;

/// The `x-request-id` line the backend's `/headers` saw.
fn upstream_id(answer: &Answer) -> String {
    let ids: Vec<&str> = answer
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .collect();
    assert_eq!(ids.len(), 1, "{answer:?}");
    ids[0].to_owned()
}

fn client_id(answer: &Answer) -> String {
    answer.headers["x-request-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn ids_are_kept_from_trusted_peers_only_and_come_back() {
    let backend = Backend::start("a");
    let edge = Edge::start(
        &[
            "--upstream",
            &backend.addr,
            "--trusted-proxy",
            "127.0.0.2/32",
        ],
        None,
    )
    .await;
    let sent = [("x-request-id", "lb-7:abc.DEF_1")];
    let trusted = get_from(&edge.client, "127.0.0.2", "/headers", &sent).await;
    assert_eq!(upstream_id(&trusted), "lb-7:abc.DEF_1");
    assert_eq!(client_id(&trusted), "lb-7:abc.DEF_1");

    let untrusted = get_from(&edge.client, "127.0.0.3", "/headers", &sent).await;
    let made = upstream_id(&untrusted);
    assert_eq!(made.len(), 32, "{made}");
    assert!(
        made.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(client_id(&untrusted), made);

    // A malformed id from a trusted peer is replaced; none at all gets one.
    let malformed = get_from(
        &edge.client,
        "127.0.0.2",
        "/headers",
        &[("x-request-id", "a b")],
    )
    .await;
    assert_eq!(upstream_id(&malformed).len(), 32);
    let plain = get_from(&edge.client, "127.0.0.3", "/headers", &[]).await;
    assert_ne!(upstream_id(&plain), made);
    assert_eq!(client_id(&plain), upstream_id(&plain));
}

#[tokio::test]
async fn the_edges_own_errors_carry_an_id() {
    // Nothing listens on port 1: the edge answers 502 or 503 itself.
    let edge = Edge::start(&["--upstream", "127.0.0.1:1"], None).await;
    let answer = get_from(&edge.client, "127.0.0.3", "/whoami", &[]).await;
    assert!(answer.status.is_server_error(), "{answer:?}");
    assert_eq!(client_id(&answer).len(), 32, "{answer:?}");
}
