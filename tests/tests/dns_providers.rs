//! DNS-01 providers against a real Knot authoritative server behind unbound.

use std::time::Duration;

use lobe_tls::challenge::dns01::{DnsProvider, PropagationCheck, RecursiveResolvers};
use lobe_tls_tests::dns::{DnsTestbed, ZONE};

#[tokio::test]
async fn rfc2136_present_is_seen_by_authoritative_check_and_cleanup_removes_only_its_value() {
    let dns = DnsTestbed::start();
    let provider = dns.rfc2136_provider();
    let name = format!("_acme-challenge.www.{ZONE}.");
    provider.present(&name, "value-one").await.unwrap();
    provider.present(&name, "value-two").await.unwrap();
    let check = PropagationCheck::authoritative(
        RecursiveResolvers::new(vec![dns.resolver_addr]).unwrap(),
        Duration::from_secs(10),
    );
    check.wait_for(&name, "value-one").await.unwrap();
    provider.cleanup(&name, "value-one").await.unwrap();
    assert_eq!(dns.authoritative_txt(&name), vec!["value-two".to_owned()]);
}
