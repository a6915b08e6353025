//! Property tests for every parser that reads untrusted input: they never panic on
//! arbitrary input, and what they accept survives a round trip. The same parsers are
//! fuzzed for longer by the targets in `fuzz/` (see RELIABILITY.md); these keep CI
//! checking them on stable.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use lobe_tls::challenge::dns01::{DnsConfig, DnsProviderConfig, ProviderSettings};
use lobe_tls::challenge::http01::CHALLENGE_PATH;
use lobe_tls::challenge::{ChallengeConfig, ChallengeKind};
use lobe_tls::store::redis::{decode_cert, decode_renewal_state, parse_event};
use lobe_tls::{
    CertBundle, CertInfo, CertMeta, CertResolver, DomainName, Http01Registry, KeyType,
    RenewalState, domain,
};
use proptest::prelude::*;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tower::ServiceExt;

/// A name the domain parser must accept unchanged: lower-case letter-led labels.
fn dns_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z][a-z0-9]{0,8}(-[a-z0-9]{1,8})?", 2..5).prop_map(|l| l.join("."))
}

/// Anything that could be a time in the store: 0000..=9999, any nanosecond, any offset.
fn time() -> impl Strategy<Value = OffsetDateTime> {
    (
        -62_135_596_800i64..253_402_214_400i64,
        0u32..1_000_000_000,
        -86_399i32..86_400,
    )
        .prop_map(|(secs, nanos, offset)| {
            let utc = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::nanoseconds(i64::from(nanos));
            let offset = time::UtcOffset::from_whole_seconds(offset / 60 * 60).unwrap();
            // Stay inside 0000..=9999 in the local time too, which RFC 3339 can write.
            match utc.checked_to_offset(offset) {
                Some(t) if (0..=9999).contains(&t.year()) => t,
                _ => utc,
            }
        })
}

fn renewal_state() -> impl Strategy<Value = RenewalState> {
    (
        any::<u32>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(time()),
        proptest::option::of(time()),
        proptest::option::of(time()),
        proptest::option::of(any::<String>()),
        proptest::option::of("[0-9a-f]{0,40}"),
        proptest::option::of(any::<String>()),
        proptest::option::of((time(), time())),
    )
        .prop_map(
            |(failures, last_error, next, ari, poll, id, revoked, refused, window)| {
                let mut state = RenewalState::default();
                state.failures = failures;
                state.last_error = last_error;
                state.next_attempt = next;
                state.ari_renew_at = ari;
                state.ari_next_poll = poll;
                state.ari_cert_id = id;
                state.revoked_serial = revoked;
                state.replaces_refused = refused;
                state.ari_window_start = window.map(|w| w.0);
                state.ari_window_end = window.map(|w| w.1);
                state
            },
        )
}

fn challenge_config() -> impl Strategy<Value = ChallengeConfig> {
    let provider = prop_oneof![
        any::<String>().prop_map(|program| DnsProviderConfig::Exec { program }),
        any::<String>().prop_map(|url| DnsProviderConfig::Challtestsrv { url }),
        proptest::option::of("[^\u{0}]{0,20}").prop_map(|f| DnsProviderConfig::Rfc2136 {
            config_file: f.map(Into::into)
        }),
        proptest::option::of("[^\u{0}]{0,20}").prop_map(|f| DnsProviderConfig::Httpreq {
            config_file: f.map(Into::into)
        }),
    ];
    let dns = (provider, any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
        |(provider, timeout, interval, check)| {
            let mut dns = DnsConfig::new(provider);
            dns.resolvers = vec!["127.0.0.1:53".parse().unwrap()];
            dns.propagation_timeout_secs = timeout;
            dns.propagation_interval_ms = interval;
            dns.propagation_check = check;
            dns
        },
    );
    (
        prop_oneof![
            Just(ChallengeKind::Http01),
            Just(ChallengeKind::Dns01),
            Just(ChallengeKind::TlsAlpn01)
        ],
        proptest::option::of(any::<String>()),
        proptest::option::of(any::<String>()),
        proptest::option::of(dns),
    )
        .prop_map(|(kind, http_listen, tls_listen, dns)| {
            let mut config = ChallengeConfig::default();
            config.kind = kind;
            config.http_listen = http_listen;
            config.tls_listen = tls_listen;
            config.dns = dns;
            config
        })
}

fn cert_meta() -> impl Strategy<Value = CertMeta> {
    (
        any::<String>(),
        prop::collection::vec(dns_name(), 1..4),
        prop_oneof![
            Just(KeyType::EcdsaP256),
            Just(KeyType::EcdsaP384),
            Just(KeyType::Rsa2048)
        ],
        challenge_config(),
        any::<String>(),
        time(),
    )
        .prop_map(
            |(name, domains, key_type, challenge, directory, issued_at)| {
                CertMeta::new(name, domain::parse_all(&domains).unwrap(), directory)
                    .with_key_type(key_type)
                    .with_challenge(challenge)
                    .with_issued_at(issued_at)
            },
        )
}

/// One key and certificate for example.com, made once: key generation is the slow part.
static PAIR: LazyLock<(String, String, Arc<CertifiedKey>)> = LazyLock::new(|| {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let bundle = CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
    (
        cert.pem(),
        key.serialize_pem(),
        bundle.certified_key().unwrap(),
    )
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
});

proptest! {
    #[test]
    fn domain_parse_never_panics_and_is_idempotent(input in any::<String>()) {
        if let Ok(name) = DomainName::parse(&input) {
            prop_assert_eq!(DomainName::parse(name.as_str()), Ok(name.clone()));
            prop_assert!(name.as_str().is_ascii() && name.as_str().len() <= 253);
        }
    }

    #[test]
    fn domain_parse_is_idempotent_on_name_like_input(
        input in "[a-zA-Z0-9.*\u{e0}-\u{ff}\u{ff10}-\u{ff19}\u{3002}\u{ff0e}-]{0,40}"
    ) {
        if let Ok(name) = DomainName::parse(&input) {
            prop_assert_eq!(DomainName::parse(name.as_str()), Ok(name.clone()));
        }
    }

    #[test]
    fn host_names_parse_to_themselves(name in dns_name(), upper in any::<bool>(), dot in any::<bool>()) {
        let mut input = if upper { name.to_ascii_uppercase() } else { name.clone() };
        if dot {
            input.push('.');
        }
        prop_assert_eq!(DomainName::parse(&input).unwrap().to_string(), name.clone());
        let wildcard = format!("*.{input}");
        prop_assert_eq!(DomainName::parse(&wildcard).unwrap().to_string(), format!("*.{name}"));
    }

    #[test]
    fn parse_all_never_panics_and_deduplicates(inputs in prop::collection::vec(any::<String>(), 0..6)) {
        if let Ok(names) = domain::parse_all(&inputs) {
            prop_assert!(!names.is_empty() && names.len() <= inputs.len());
            for (i, n) in names.iter().enumerate() {
                prop_assert!(!names[..i].contains(n));
            }
        }
    }

    #[test]
    fn metadata_and_state_never_panic_on_arbitrary_json(input in any::<Vec<u8>>(), text in any::<String>()) {
        let _ = serde_json::from_slice::<RenewalState>(&input);
        let _ = serde_json::from_slice::<CertMeta>(&input);
        let _ = serde_json::from_str::<CertMeta>(&text);
        let _ = serde_json::from_str::<RenewalState>(&text);
    }

    #[test]
    fn renewal_state_round_trips(state in renewal_state()) {
        let json = serde_json::to_vec(&state).unwrap();
        prop_assert_eq!(serde_json::from_slice::<RenewalState>(&json).unwrap(), state);
    }

    #[test]
    fn cert_meta_round_trips(meta in cert_meta()) {
        let json = serde_json::to_string(&meta).unwrap();
        prop_assert_eq!(serde_json::from_str::<CertMeta>(&json).unwrap(), meta);
    }

    #[test]
    fn pem_and_der_parsing_never_panics(chain in any::<String>(), key in any::<String>(), der in any::<Vec<u8>>()) {
        prop_assert!(CertBundle::from_pem(chain.clone(), key).is_err());
        let _ = CertBundle::from_pem(chain, PAIR.1.clone());
        let _ = CertInfo::from_der(&CertificateDer::from(der));
    }

    #[test]
    fn pem_with_garbage_around_it_still_loads(before in "[^-]{0,40}", after in "[^-]{0,40}") {
        // Text outside the PEM armour is ignored, as in certbot's files.
        let chain = format!("{before}\n{}\n{after}", PAIR.0);
        let bundle = CertBundle::from_pem(chain, PAIR.1.clone()).unwrap();
        prop_assert_eq!(bundle.info().unwrap().domains, vec!["example.com".to_owned()]);
    }

    #[test]
    fn config_toml_never_panics(text in any::<String>(), table in "\\[(rfc2136|cloudflare|httpreq)\\]\n([a-z_]{1,12} = (\"[^\"\\\\]{0,12}\"|[0-9]{1,4}|true)\n){0,4}") {
        let dir = tempfile::tempdir().unwrap();
        for input in [&text, &table] {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, input).unwrap();
            for provider in ["rfc2136", "cloudflare", "httpreq"] {
                if let Ok(settings) = ProviderSettings::load(provider, Some(&path)) {
                    for key in ["nameserver", "api_token", "endpoint", "zone"] {
                        let _ = settings.get("LOBE_TLS_PROPERTY_TEST_UNSET", key);
                    }
                }
            }
        }
    }

    #[test]
    fn http01_answers_only_current_tokens_and_redirects_to_the_host(
        method in "[A-Z]{1,8}",
        path in "/[!-~\u{e9}\u{fc}]{0,40}",
        host in proptest::option::of("[a-z0-9.:\\[\\]-]{0,30}"),
    ) {
        let registry = Http01Registry::new();
        RUNTIME.block_on(registry.insert("tok", "tok.thumb")).unwrap();
        let mut builder = Request::builder().method(method.as_str()).uri(path.as_str());
        if let Some(host) = &host {
            builder = builder.header(header::HOST, host.as_str());
        }
        let Ok(req) = builder.body(Full::new(Bytes::new())) else {
            return Ok(());
        };
        let uri_path = req.uri().path().to_owned();
        let rsp = RUNTIME
            .block_on(registry.service().redirect_others_to_https().oneshot(req))
            .unwrap();
        match rsp.status() {
            StatusCode::OK => {
                prop_assert_eq!(uri_path, format!("{CHALLENGE_PATH}tok"));
                let body = RUNTIME.block_on(rsp.into_body().collect()).unwrap().to_bytes();
                prop_assert_eq!(&body[..], b"tok.thumb");
            }
            StatusCode::NOT_FOUND => prop_assert!(uri_path.starts_with(CHALLENGE_PATH)),
            StatusCode::BAD_REQUEST => {}
            StatusCode::MOVED_PERMANENTLY => {
                let authority: Option<http::uri::Authority> =
                    host.as_deref().and_then(|h| h.parse().ok());
                if let Some(authority) = authority {
                    let location: http::Uri = rsp.headers()[header::LOCATION]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    prop_assert_eq!(location.host(), Some(authority.host()));
                }
            }
            other => prop_assert!(false, "unexpected status {}", other),
        }
    }

    #[test]
    fn sni_lookup_never_panics_and_follows_the_rules(name in any::<String>(), near in "[a-zA-Z.]{0,8}(example\\.(com|org)|EXAMPLE\\.ORG)\\.?") {
        let resolver = CertResolver::new();
        resolver.set(&["example.com", "*.example.org"], PAIR.2.clone());
        for name in [name, near] {
            let lower = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
            let expected = lower == "example.com"
                || lower.split_once('.').is_some_and(|(_, parent)| parent == "example.org");
            prop_assert_eq!(resolver.lookup(Some(&name)).is_some(), expected, "{:?}", name);
            let _ = resolver.has_challenge(&name);
            let scratch = CertResolver::new();
            scratch.set(&[name.as_str()], PAIR.2.clone());
            prop_assert!(scratch.lookup(Some(&name)).is_some());
            scratch.remove(&[name.as_str()]);
            prop_assert!(scratch.lookup(Some(&name)).is_none());
        }
    }

    #[test]
    fn redis_values_never_panic(raw in any::<String>(), name in dns_name(), secret in "[A-Za-z0-9]{16,24}") {
        if let Err(e) = decode_cert("redis://h", "site", &raw) {
            prop_assert!(!e.to_string().contains('\n'), "{}", e);
        }
        let _ = decode_renewal_state("redis://h", "site", &raw);
        let _ = parse_event(&raw);
        // A record whose key is bad never quotes the key in the error.
        let record = serde_json::json!({"fullchain": PAIR.0, "key": secret, "meta": {}});
        let err = decode_cert("redis://h", &name, &record.to_string()).err().unwrap();
        prop_assert!(!err.to_string().contains(&secret));
    }

    #[test]
    fn redis_records_round_trip(meta in cert_meta(), state in renewal_state()) {
        let record = serde_json::json!({"fullchain": PAIR.0, "key": PAIR.1, "meta": meta});
        let cert = decode_cert("redis://h", "site", &record.to_string()).unwrap();
        prop_assert_eq!(&cert.meta, &meta);
        prop_assert_eq!(cert.bundle.fullchain_pem(), PAIR.0.as_str());
        let json = serde_json::to_string(&state).unwrap();
        prop_assert_eq!(decode_renewal_state("redis://h", "site", &json).unwrap(), state);
        let event = format!("cert {}", cert.meta.name);
        prop_assert_eq!(parse_event(&event), Some(lobe_tls::store::StoreEvent::CertSaved(cert.meta.name.clone())));
    }
}
