//! DNS-01 providers against a real Knot authoritative server behind unbound.

use std::time::Duration;

use hickory_proto::rr::Name;
use lobe_tls::challenge::dns01::{
    ChalltestsrvProvider, DnsProvider, PropagationCheck, RecursiveResolvers, Rfc2136Provider,
    TsigAlgorithm, TsigKey,
};
use lobe_tls_tests::dns::{DELEGATE_ZONE, DnsTestbed, ZONE};
use lobe_tls_tests::{Pebble, PebbleOptions};

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

#[tokio::test]
async fn rfc2136_with_wrong_tsig_secret_fails_naming_the_key() {
    let dns = DnsTestbed::start();
    let wrong = TsigKey::new(
        lobe_tls_tests::dns::TSIG_KEY,
        TsigAlgorithm::HmacSha256,
        "d3Jvbmcgc2VjcmV0IHdyb25nIHNlY3JldCB3cm9uZyE=",
    )
    .unwrap();
    let provider = Rfc2136Provider::new(&dns.knot_addr.to_string(), Some(wrong));
    let name = format!("_acme-challenge.wrong.{ZONE}.");
    let err = provider.present(&name, "v").await.unwrap_err().to_string();
    assert!(
        err.contains("rejected TSIG key acme-update.") && err.contains("check the key name"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(dns.authoritative_txt(&name).is_empty());
}

#[tokio::test]
async fn rfc2136_reads_bind_key_file_and_updates_with_hmac_sha256() {
    let dns = DnsTestbed::start();
    let key = TsigKey::from_bind_file(&dns.write_tsig_file(), None).unwrap();
    let provider = Rfc2136Provider::new(&dns.knot_addr.to_string(), Some(key));
    let name = format!("_acme-challenge.keyfile.{ZONE}.");
    provider.present(&name, "from-key-file").await.unwrap();
    assert_eq!(
        dns.authoritative_txt(&name),
        vec!["from-key-file".to_owned()]
    );
}

#[tokio::test]
async fn rfc2136_updates_with_hmac_sha512_key() {
    let dns = DnsTestbed::start();
    let key = TsigKey::new(
        lobe_tls_tests::dns::TSIG_KEY_512,
        TsigAlgorithm::HmacSha512,
        &dns.tsig_secret_512,
    )
    .unwrap();
    let provider = Rfc2136Provider::new(&dns.knot_addr.to_string(), Some(key));
    let name = format!("_acme-challenge.sha512.{ZONE}.");
    provider.present(&name, "signed-512").await.unwrap();
    assert_eq!(dns.authoritative_txt(&name), vec!["signed-512".to_owned()]);
    provider.cleanup(&name, "signed-512").await.unwrap();
    assert!(dns.authoritative_txt(&name).is_empty());
}

#[tokio::test]
async fn rfc2136_for_a_zone_the_server_does_not_serve_says_to_set_the_zone() {
    let dns = DnsTestbed::start();
    let err = dns
        .rfc2136_provider()
        .present("_acme-challenge.example.org.", "v")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("LOBE_TLS_RFC2136_ZONE"), "{err}");
}

#[tokio::test]
async fn propagation_timeout_names_the_nameservers_lacking_the_record() {
    let dns = DnsTestbed::start();
    let check = PropagationCheck::authoritative(
        RecursiveResolvers::new(vec![dns.resolver_addr]).unwrap(),
        Duration::from_secs(1),
    );
    let started = std::time::Instant::now();
    let err = check
        .wait_for(&format!("_acme-challenge.absent.{ZONE}."), "never")
        .await
        .unwrap_err()
        .to_string();
    let server = format!("ns.{ZONE}. ({})", dns.knot_addr.ip());
    assert!(err.contains(&server), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "gave up late");
}

#[tokio::test]
async fn cname_chain_is_followed_into_the_delegated_zone() {
    let dns = DnsTestbed::start();
    let resolvers = RecursiveResolvers::new(vec![dns.resolver_addr]).unwrap();
    let start = Name::from_ascii(format!("_acme-challenge.alias.{ZONE}.")).unwrap();
    let end = resolvers.follow_cname(&start).await.unwrap();
    assert_eq!(end.to_ascii(), format!("alias.{DELEGATE_ZONE}."));
    let plain = Name::from_ascii(format!("_acme-challenge.www.{ZONE}.")).unwrap();
    assert_eq!(resolvers.follow_cname(&plain).await.unwrap(), plain);
}

#[tokio::test]
async fn cname_loops_and_overlong_chains_are_refused() {
    let dns = DnsTestbed::start();
    let resolvers = RecursiveResolvers::new(vec![dns.resolver_addr]).unwrap();
    let looping = Name::from_ascii(format!("_acme-challenge.loop.{ZONE}.")).unwrap();
    let err = resolvers
        .follow_cname(&looping)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("CNAME loop"), "{err}");
    let long = Name::from_ascii(format!("_acme-challenge.long.{ZONE}.")).unwrap();
    let err = resolvers.follow_cname(&long).await.unwrap_err().to_string();
    assert!(err.contains("longer than 8 links"), "{err}");
}

#[tokio::test]
async fn resolver_refusing_soa_falls_back_to_checking_at_the_resolver() {
    // challtestsrv answers NOTIMP to SOA and NS queries.
    let pebble = Pebble::start(PebbleOptions::default());
    let provider = ChalltestsrvProvider::new(&pebble.challtestsrv_url).unwrap();
    let name = "_acme-challenge.fallback.example.com.";
    provider.present(name, "cts-value").await.unwrap();
    let check = PropagationCheck::authoritative(
        RecursiveResolvers::new(vec![pebble.dns_addr]).unwrap(),
        Duration::from_secs(5),
    );
    check.wait_for(name, "cts-value").await.unwrap();
    let err = check.wait_for(name, "other").await;
    assert!(err.is_err(), "a value that is not there must not pass");
}
