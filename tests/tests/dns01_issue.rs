//! DNS-01 orders end to end: Pebble validates through unbound, which resolves the test
//! zones from Knot, where the rfc2136 provider writes.

use std::io::Write;

use lobe_tls::challenge::DnsProvider;
use lobe_tls::challenge::dns01::Dns01Solver;
use lobe_tls::challenge::{DnsConfig, DnsProviderConfig};
use lobe_tls::{AcmeClient, FileStore, KeyType, OrderRequest, domain};
use lobe_tls_tests::dns::{DELEGATE_ZONE, DnsTestbed, TSIG_KEY, ZONE};
use lobe_tls_tests::http_server::{HttpServer, Request, json_response};
use lobe_tls_tests::{Pebble, PebbleOptions, verify_chain};

/// A `--config` file for the rfc2136 provider, with the secret in a tsig-keygen file.
fn rfc2136_config_file(dns: &DnsTestbed) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        "[rfc2136]\nnameserver = \"{}\"\ntsig_key = \"{TSIG_KEY}\"\ntsig_algorithm = \"hmac-sha256\"\ntsig_file = \"{}\"\n",
        dns.knot_addr,
        dns.write_tsig_file().display()
    )
    .unwrap();
    file
}

async fn issue_wildcard_and_apex(apex: &str) -> (DnsTestbed, String) {
    lobe_tls_tests::init_tracing();
    let dns = DnsTestbed::start();
    let pebble = Pebble::start(PebbleOptions {
        dns_server: Some(dns.resolver_addr),
        ..PebbleOptions::default()
    });
    let config_file = rfc2136_config_file(&dns);
    let mut config = DnsConfig::new(DnsProviderConfig::Rfc2136 {
        config_file: Some(config_file.path().to_path_buf()),
    });
    config.recursive_resolvers = vec![dns.resolver_addr];
    config.propagation_timeout_secs = 10;
    let solver = Dns01Solver::from_config(&config).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let client = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap();
    let wildcard = format!("*.{apex}");
    let request = OrderRequest {
        domains: domain::parse_all(&[apex, wildcard.as_str()]).unwrap(),
        key_type: KeyType::EcdsaP256,
        replaces: None,
    };
    let bundle = client.issue(&request, &solver, None).await.unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(bundle.fullchain_pem(), &root, apex).unwrap();
    verify_chain(bundle.fullchain_pem(), &root, &format!("anything.{apex}")).unwrap();
    (dns, apex.to_owned())
}

#[tokio::test]
async fn rfc2136_issues_wildcard_and_apex_and_removes_its_records() {
    let (dns, apex) = issue_wildcard_and_apex(ZONE).await;
    assert!(
        dns.authoritative_txt(&format!("_acme-challenge.{apex}."))
            .is_empty(),
        "challenge records must be deleted after the order"
    );
}

#[tokio::test]
async fn rfc2136_issues_through_cname_delegation_to_another_zone() {
    let (dns, _) = issue_wildcard_and_apex(&format!("alias.{ZONE}")).await;
    // The CNAME stays; the TXT records were written, and deleted, in the delegated zone.
    assert_eq!(
        dns.dig(
            dns.knot_addr,
            &format!("_acme-challenge.alias.{ZONE}."),
            "CNAME",
            true
        ),
        vec![format!("alias.{DELEGATE_ZONE}.")]
    );
    assert!(
        dns.authoritative_txt(&format!("alias.{DELEGATE_ZONE}."))
            .is_empty()
    );
}

#[tokio::test]
async fn challtestsrv_dns01_wildcard_still_issues_with_the_default_check() {
    // challtestsrv refuses SOA queries: the check falls back to asking it directly.
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions::default());
    let mut config = DnsConfig::new(DnsProviderConfig::Challtestsrv {
        url: pebble.challtestsrv_url.clone(),
    });
    config.recursive_resolvers = vec![pebble.dns_addr];
    config.propagation_timeout_secs = 10;
    let solver = Dns01Solver::from_config(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let client = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap();
    let request = OrderRequest {
        domains: domain::parse_all(&["cts.example.com", "*.cts.example.com"]).unwrap(),
        key_type: KeyType::EcdsaP256,
        replaces: None,
    };
    let bundle = client.issue(&request, &solver, None).await.unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(bundle.fullchain_pem(), &root, "x.cts.example.com").unwrap();
}

#[tokio::test]
async fn httpreq_issues_wildcard_through_a_webhook_that_writes_into_knot() {
    lobe_tls_tests::init_tracing();
    let dns = DnsTestbed::start();
    let pebble = Pebble::start(PebbleOptions {
        dns_server: Some(dns.resolver_addr),
        ..PebbleOptions::default()
    });
    let writer = std::sync::Arc::new(dns.rfc2136_provider());
    let hook = HttpServer::start(move |req: Request| {
        let writer = writer.clone();
        async move {
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let (fqdn, value) = (
                body["fqdn"].as_str().unwrap_or(""),
                body["value"].as_str().unwrap_or(""),
            );
            let result = match req.path_and_query.as_str() {
                "/present" => writer.present(fqdn, value).await,
                "/cleanup" => writer.cleanup(fqdn, value).await,
                _ => return json_response(404, serde_json::json!({})),
            };
            match result {
                Ok(()) => json_response(200, serde_json::json!({})),
                Err(e) => json_response(500, serde_json::json!({"error": e.to_string()})),
            }
        }
    })
    .await;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(file, "[httpreq]\nendpoint = \"{}\"\n", hook.url()).unwrap();
    let mut config = DnsConfig::new(DnsProviderConfig::Httpreq {
        config_file: Some(file.path().to_path_buf()),
    });
    config.recursive_resolvers = vec![dns.resolver_addr];
    let solver = Dns01Solver::from_config(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let client = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap();
    let apex = format!("hook.{ZONE}");
    let wildcard = format!("*.{apex}");
    let request = OrderRequest {
        domains: domain::parse_all(&[wildcard.as_str(), apex.as_str()]).unwrap(),
        key_type: KeyType::EcdsaP256,
        replaces: None,
    };
    let bundle = client.issue(&request, &solver, None).await.unwrap();
    let root = pebble.issuing_root_pem().await;
    verify_chain(bundle.fullchain_pem(), &root, &format!("x.{apex}")).unwrap();
    assert!(
        dns.authoritative_txt(&format!("_acme-challenge.{apex}."))
            .is_empty()
    );
}
