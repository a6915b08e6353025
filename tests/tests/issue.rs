//! Issuing and storing certificates against a real Pebble: HTTP-01 and DNS-01, every key
//! type, EAB, heavy nonce rejection, and the error paths a user meets.

use std::path::Path;
use std::time::Duration;

use lobe_tls::challenge::{ChallengeConfig, DnsConfig, DnsProviderConfig};
use lobe_tls::issue::{Issuance, IssueRequest, issue_and_store};
use lobe_tls::{AcmeClient, Eab, Error, FileStore, Http01Registry, KeyType, Store, domain};
use lobe_tls_tests::{EAB_HMAC, EAB_KID, Pebble, PebbleOptions, mode, txt_values, verify_chain};

fn http01(pebble: &Pebble) -> ChallengeConfig {
    ChallengeConfig::http01(Some(pebble.http_listen()))
}

fn dns01(pebble: &Pebble) -> ChallengeConfig {
    let mut dns = DnsConfig::new(DnsProviderConfig::Challtestsrv {
        url: pebble.challtestsrv_url.clone(),
    });
    dns.resolvers = vec![pebble.dns_addr];
    dns.propagation_timeout_secs = 10;
    ChallengeConfig::dns01(dns)
}

fn request(names: &[&str], key_type: KeyType, challenge: ChallengeConfig) -> IssueRequest {
    IssueRequest::new(domain::parse_all(names).unwrap(), key_type, challenge)
}

/// Asserts what a web server relies on: the stored chain verifies against Pebble's root
/// for every name, the key matches, the names are exactly the ordered ones, and the
/// secret files and directories are private.
async fn assert_stored_cert(pebble: &Pebble, store: &FileStore, name: &str, names: &[&str]) {
    let stored = store.load_cert(name).await.unwrap().expect("stored");
    let root = pebble.issuing_root_pem().await;
    for n in names {
        let server_name = n.replace('*', "any");
        verify_chain(stored.bundle.fullchain_pem(), &root, &server_name)
            .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    stored.bundle.certified_key().expect("key matches");
    let mut got = stored.bundle.info().unwrap().domains;
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);

    let live = store.live_dir(name);
    let version_dir = std::fs::canonicalize(&live).unwrap();
    assert_eq!(mode(&live.join("privkey.pem")), 0o600);
    assert_eq!(mode(&version_dir), 0o700);
    assert_eq!(mode(version_dir.parent().unwrap()), 0o700);
    assert_eq!(mode(store.root()), 0o700);
    assert_eq!(mode(&store.root().join("accounts")), 0o700);
    for account in std::fs::read_dir(store.root().join("accounts")).unwrap() {
        assert_eq!(mode(&account.unwrap().path()), 0o600);
    }
    assert_eq!(stored.meta.name, name);
}

async fn connect(pebble: &Pebble, store: &FileStore) -> AcmeClient {
    AcmeClient::connect(&pebble.acme_config(), store)
        .await
        .unwrap()
}

#[tokio::test]
async fn http01_one_name_is_stored_verified_and_private_with_metadata_to_renew() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let req = request(&["one.example.com"], KeyType::EcdsaP256, http01(&pebble));
    let stored = issue_and_store(&client, &store, req.clone(), None, None)
        .await
        .unwrap();
    assert_stored_cert(&pebble, &store, "one.example.com", &["one.example.com"]).await;

    // The metadata repeats the order: same names, key type and challenge settings.
    let loaded = store.load_cert("one.example.com").await.unwrap().unwrap();
    assert_eq!(loaded.meta, stored.meta);
    assert_eq!(IssueRequest::from_meta(&loaded.meta), req);
    assert_eq!(loaded.meta.directory, pebble.directory_url);
}

#[tokio::test]
async fn http01_several_names_share_one_certificate() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let names = ["web.example.com", "www.example.com", "api.example.net"];
    let stored = issue_and_store(
        &client,
        &store,
        request(&names, KeyType::EcdsaP256, http01(&pebble)),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(stored.meta.name, "web.example.com");
    assert_stored_cert(&pebble, &store, "web.example.com", &names).await;
}

#[tokio::test]
async fn dns01_wildcard_and_apex_put_two_values_at_one_name_and_clean_up_both() {
    // No authorization reuse, so both challenges are live at the same time.
    let pebble = Pebble::start(PebbleOptions {
        authz_reuse: Some(0),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let names = ["*.wild.example.com", "wild.example.com"];
    let stored = issue_and_store(
        &client,
        &store,
        request(&names, KeyType::EcdsaP256, dns01(&pebble)),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(stored.meta.name, "_.wild.example.com");
    assert_stored_cert(&pebble, &store, "_.wild.example.com", &names).await;
    let left = txt_values(pebble.dns_addr, "_acme-challenge.wild.example.com.").await;
    assert!(left.is_empty(), "TXT records left behind: {left:?}");
}

#[tokio::test]
async fn challtestsrv_cleanup_removes_only_the_value_it_is_given() {
    use lobe_tls::challenge::DnsProvider;
    let pebble = Pebble::start(PebbleOptions::default());
    let provider =
        lobe_tls::challenge::dns01::ChalltestsrvProvider::new(&pebble.challtestsrv_url).unwrap();
    let fqdn = "_acme-challenge.pair.example.com.";
    provider.present(fqdn, "wildcard-value").await.unwrap();
    provider.present(fqdn, "apex-value").await.unwrap();
    assert_eq!(
        txt_values(pebble.dns_addr, fqdn).await,
        ["apex-value", "wildcard-value"]
    );
    provider.cleanup(fqdn, "wildcard-value").await.unwrap();
    assert_eq!(txt_values(pebble.dns_addr, fqdn).await, ["apex-value"]);
    provider.cleanup(fqdn, "apex-value").await.unwrap();
    assert!(txt_values(pebble.dns_addr, fqdn).await.is_empty());
}

#[tokio::test]
async fn every_key_type_is_issued_with_a_fresh_key_of_that_type() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let mut keys = Vec::new();
    for key_type in KeyType::ALL {
        let name = format!("{key_type}.keys.example.com");
        let stored = issue_and_store(
            &client,
            &store,
            request(&[&name], key_type, http01(&pebble)),
            None,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        assert_eq!(stored.bundle.info().unwrap().key_type, Some(key_type));
        assert_eq!(stored.meta.key_type, key_type);
        assert_stored_cert(&pebble, &store, &name, &[&name]).await;
        keys.push(stored.bundle.key_pem().to_owned());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        KeyType::ALL.len(),
        "every issuance has its own key"
    );
}

#[tokio::test]
async fn eab_required_refuses_without_a_key_naming_the_flags_and_works_with_one() {
    let pebble = Pebble::start(PebbleOptions {
        eab_required: true,
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let err = AcmeClient::connect(&pebble.acme_config(), &store)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--eab-kid") && err.contains("--eab-hmac-key"),
        "{err}"
    );
    assert!(store.load_account("x").await.unwrap().is_none());

    let mut config = pebble.acme_config();
    config.eab = Some(Eab {
        kid: EAB_KID.into(),
        hmac_key_b64: EAB_HMAC.into(),
    });
    let client = AcmeClient::connect(&config, &store).await.unwrap();
    issue_and_store(
        &client,
        &store,
        request(&["eab.example.com"], KeyType::EcdsaP256, http01(&pebble)),
        None,
        None,
    )
    .await
    .unwrap();
    assert_stored_cert(&pebble, &store, "eab.example.com", &["eab.example.com"]).await;
}

#[tokio::test]
async fn half_of_all_nonces_rejected_still_issues_http01_and_dns01() {
    lobe_tls_tests::init_tracing();
    let pebble = Pebble::start(PebbleOptions {
        nonce_reject: Some(50),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    for i in 0..3 {
        let name = format!("nonce{i}.example.com");
        issue_and_store(
            &client,
            &store,
            request(&[&name], KeyType::EcdsaP256, http01(&pebble)),
            None,
            None,
        )
        .await
        .unwrap();
        assert_stored_cert(&pebble, &store, &name, &[&name]).await;
    }
    let names = ["*.nonce.example.com", "nonce.example.com"];
    issue_and_store(
        &client,
        &store,
        request(&names, KeyType::EcdsaP256, dns01(&pebble)),
        None,
        None,
    )
    .await
    .unwrap();
    assert_stored_cert(&pebble, &store, "_.nonce.example.com", &names).await;
}

#[tokio::test]
async fn unreachable_ca_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    // Reserved and never listened on: connections are refused.
    let dead = lobe_tls_tests::reserve_port();
    let port = dead.port();
    let config = lobe_tls::AcmeConfig::new(format!("https://127.0.0.1:{port}/dir"));
    let err = AcmeClient::connect(&config, &store)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot reach the ACME directory"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[tokio::test]
async fn a_directory_ca_that_is_not_pem_is_named_in_the_error() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let bad = dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "this is not a certificate\n").unwrap();
    let mut config = pebble.acme_config();
    config.directory_ca = Some(bad.clone());
    let err = AcmeClient::connect(&config, &store)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("PEM"), "{err}");
}

#[tokio::test]
async fn a_failed_challenge_reports_the_problem_and_leaves_the_previous_cert_untouched() {
    let pebble = Pebble::start(PebbleOptions {
        authz_reuse: Some(0),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let req = request(&["keep.example.com"], KeyType::EcdsaP256, http01(&pebble));
    let first = issue_and_store(&client, &store, req.clone(), None, None)
        .await
        .unwrap();
    let live = store.live_dir("keep.example.com");
    let before = snapshot(&live);

    // A registry that no listener serves: Pebble's validation finds nothing on the port.
    // A second account: Pebble reuses a valid authorization of the same account now and
    // then even at PEBBLE_AUTHZREUSE=0, which would let this order succeed.
    let other_dir = tempfile::tempdir().unwrap();
    let other_client = connect(&pebble, &FileStore::open(other_dir.path()).unwrap()).await;
    let err = issue_and_store(
        &other_client,
        &store,
        req,
        Some(Http01Registry::new()),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Challenge {
                kind: lobe_tls::ChallengeErrorKind::ValidationFailed,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("keep.example.com"), "{text}");
    assert!(
        text.contains("connection"),
        "CA problem detail missing: {text}"
    );
    assert!(!text.contains('\n'));

    let loaded = store.load_cert("keep.example.com").await.unwrap().unwrap();
    assert_eq!(
        loaded.bundle.fullchain_pem(),
        first.bundle.fullchain_pem(),
        "the stored certificate changed after a failed issuance"
    );
    assert_eq!(snapshot(&live), before);
}

/// Every file of a live directory with its contents and mode.
fn snapshot(live: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let dir = std::fs::canonicalize(live).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
                mode(&path),
            )
        })
        .collect();
    files.push((dir.display().to_string(), Vec::new(), mode(&dir)));
    files.sort();
    files
}

#[tokio::test]
async fn a_busy_listen_port_fails_before_anything_is_ordered() {
    let pebble = Pebble::start(PebbleOptions::default());
    let _squatter = std::net::TcpListener::bind(pebble.http_listen()).unwrap();
    let req = request(&["busy.example.com"], KeyType::EcdsaP256, http01(&pebble));
    let err = Issuance::prepare(req, None).await.unwrap_err();
    assert!(matches!(err, Error::Listen { .. }), "{err}");
    assert!(err.to_string().contains(&pebble.http_listen()), "{err}");
    assert_eq!(pebble.orders_created(), 0);
}

#[tokio::test]
async fn wildcard_with_http01_and_bad_names_are_refused_before_ordering() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let err = issue_and_store(
        &client,
        &store,
        request(&["*.example.com"], KeyType::EcdsaP256, http01(&pebble)),
        None,
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("dns-01"), "{err}");
    for bad in ["a..example.com", "exa mple.com", "a.*.example.com", ""] {
        let err = domain::parse_all(&[bad]).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
    }
    assert_eq!(pebble.orders_created(), 0);
    assert!(store.list_certs().await.unwrap().is_empty());
}

#[tokio::test]
async fn dns01_record_that_never_shows_up_names_the_missing_record() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let client = connect(&pebble, &store).await;
    let mut challenge = dns01(&pebble);
    if let Some(dns) = challenge.dns.as_mut() {
        // A resolver nobody answers on: the record can never be seen.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        dns.resolvers = vec![silent.local_addr().unwrap()];
        dns.propagation_timeout_secs = 1;
        std::mem::forget(silent);
    }
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        issue_and_store(
            &client,
            &store,
            request(&["late.example.com"], KeyType::EcdsaP256, challenge),
            None,
            None,
        ),
    )
    .await
    .expect("the propagation timeout must end the order")
    .unwrap_err()
    .to_string();
    assert!(err.contains("_acme-challenge.late.example.com."), "{err}");
    assert!(err.contains("--propagation-timeout"), "{err}");
    let left = txt_values(pebble.dns_addr, "_acme-challenge.late.example.com.").await;
    assert!(
        left.is_empty(),
        "cleanup must run after a failure: {left:?}"
    );
    assert!(store.list_certs().await.unwrap().is_empty());
}
