use std::time::Duration;

use tokio::time::Instant;

use super::retry::{fast_poll_policy, steady_poll_policy};
use super::*;
use crate::challenge::Solver;

#[test]
fn the_paused_refusal_names_its_unpause_url() {
    let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
        "type": "urn:ietf:params:acme:error:unauthorized",
        "detail": "Your account is temporarily prevented from requesting certificates for a.example.com and possibly others. Please visit: https://portal.letsencrypt.org/sfe/v1/unpause?jwt=abc.def",
        "status": 403,
    }))
    .unwrap();
    let url = unpause_url(&problem).unwrap();
    assert_eq!(
        url,
        "https://portal.letsencrypt.org/sfe/v1/unpause?jwt=abc.def"
    );
    let err = acme_error(
        "the CA refused the order",
        instant_acme::Error::Api(problem),
    );
    let text = err.to_string();
    assert!(
        text.contains("unpause at https://portal.letsencrypt.org/sfe/v1/unpause?jwt=abc.def"),
        "{text}"
    );
    assert!(text.contains("a.example.com"), "{text}");
    assert!(falls_back(&err), "a paused CA is worth a fallback");
    let other: instant_acme::Problem = serde_json::from_value(serde_json::json!({
        "type": "urn:ietf:params:acme:error:unauthorized",
        "detail": "see https://example.com/docs",
    }))
    .unwrap();
    assert!(unpause_url(&other).is_none());
}

#[test]
fn caa_identities_come_from_the_directory_meta() {
    let dir = serde_json::json!({"newOrder": "x", "meta": {"caaIdentities": ["letsencrypt.org"]}});
    assert_eq!(caa_identities_of(&dir), ["letsencrypt.org"]);
    assert!(caa_identities_of(&serde_json::json!({"meta": {}})).is_empty());
}

#[test]
fn named_directories_resolve() {
    assert_eq!(resolve_directory("letsencrypt").unwrap(), LETSENCRYPT);
    assert_eq!(
        resolve_directory("letsencrypt-staging").unwrap(),
        LETSENCRYPT_STAGING
    );
    assert!(resolve_directory("ftp://x").is_err());
}

#[test]
fn account_keys_are_safe_file_names() {
    let mut config = AcmeConfig::new("https://127.0.0.1:14000/dir");
    config.email = Some("ops+tls@example.com".into());
    let key = config.account_key();
    assert_eq!(key, "ops_tls_example.com@127.0.0.1_14000_dir");
}

#[test]
fn eab_debug_hides_the_key() {
    let eab = Eab {
        kid: "kid-1".into(),
        hmac_key_b64: "c2VjcmV0".into(),
    };
    assert!(!format!("{eab:?}").contains("c2VjcmV0"));
}

#[test]
fn issuing_can_run_on_a_spawned_task() {
    // Compiles only if the order's future is `Send`, as `tokio::spawn` needs.
    fn assert_send<T: Send>(_: &T) {}
    let _check = |client: &AcmeClient, request: &OrderRequest, solver: &dyn Solver| {
        assert_send(&client.issue(request, solver, None));
    };
}

#[test]
fn polling_starts_soon_then_continues_steadily_until_the_order_deadline() {
    let deadline = Instant::now() + Duration::from_secs(300);
    let fast = format!("{:?}", fast_poll_policy(deadline));
    assert!(
        fast.contains("delay: 10ms") && fast.contains("timeout: 2.5s"),
        "{fast}"
    );
    let steady = format!("{:?}", steady_poll_policy(deadline));
    assert!(
        steady.contains("delay: 2s") && steady.contains("backoff: 1.0"),
        "{steady}"
    );
    // The steady stage runs to the order's deadline, not a fixed share of it.
    assert!(steady.contains("timeout: 29"), "{steady}");
}

#[test]
fn polling_near_the_deadline_has_no_steady_stage() {
    let deadline = Instant::now() + Duration::from_secs(1);
    assert!(steady_poll_policy(deadline).is_none());
    let fast = format!("{:?}", fast_poll_policy(deadline));
    assert!(!fast.contains("timeout: 2.5s"), "{fast}");
}
