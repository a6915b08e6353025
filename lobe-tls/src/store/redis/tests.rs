use super::codec::{CertRecord, SERIAL_HEAD, serial_from_head};
use super::*;
use crate::store::{CertMeta, StoreEvent};

#[test]
fn prefix_is_taken_out_of_the_url() {
    assert_eq!(
        split_prefix("redis://h:1/0?prefix=app1"),
        ("redis://h:1/0".to_owned(), Some("app1".to_owned()))
    );
    assert_eq!(
        split_prefix("rediss://h/?protocol=resp3&prefix=x#insecure"),
        (
            "rediss://h/?protocol=resp3#insecure".to_owned(),
            Some("x".to_owned())
        )
    );
    assert_eq!(split_prefix("redis://h"), ("redis://h".to_owned(), None));
}

#[test]
fn passwords_never_reach_messages() {
    assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://***@h:6379/0");
    assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    assert_eq!(redact("redis://:a/b?c@h:6379/0"), "redis://***@h:6379/0");
    assert_eq!(
        redact("redis+sentinel://:pw@h1:1,h2:2/svc/0"),
        "redis+sentinel://***@h1:1,h2:2/svc/0"
    );
}

#[test]
fn the_serial_is_read_from_the_head_of_a_certificate_value() {
    let record = CertRecord {
        serial: Some("0a1b2c".into()),
        fullchain: "chain".into(),
        key: "key".into(),
        meta: CertMeta {
            name: "site".into(),
            domains: Vec::new(),
            key_type: crate::cert::KeyType::EcdsaP256,
            challenge: Default::default(),
            directory: "https://ca.test/dir".into(),
            issued_at: time::OffsetDateTime::UNIX_EPOCH,
            profile: None,
        },
    };
    let value = serde_json::to_string(&record).unwrap();
    let head = &value[..(SERIAL_HEAD as usize + 1).min(value.len())];
    assert_eq!(serial_from_head(head), Some("0a1b2c"));
    // Values from before the serial, cut-off heads and junk tell nothing.
    assert_eq!(serial_from_head(r#"{"fullchain":"-----BEGIN"#), None);
    assert_eq!(serial_from_head(r#"{"serial":"0a1b"#), None);
    assert_eq!(serial_from_head(r#"{"serial":null,"fullchain""#), None);
    assert_eq!(serial_from_head(r#"{"serial":"zz","#), None);
    assert_eq!(serial_from_head(""), None);
}

/// Found by the `redis_values` fuzz target: with key material in the wrong field,
/// the error quoted it, over several lines.
#[test]
fn unreadable_records_never_quote_their_values() {
    let secret = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49\nAwEHBG0wawIBAQQg";
    let record = serde_json::json!({
        "fullchain": "x",
        "key": "y",
        "meta": {"name": "site", "key_type": secret},
    });
    let err = decode_cert("redis://h", "site", &record.to_string())
        .err()
        .unwrap()
        .to_string();
    assert!(
        !err.contains("MIGHAgEAMBMG") && !err.contains('\n'),
        "{err}"
    );
    assert!(err.contains("certificate site is unreadable"), "{err}");
    let err = decode_cert("redis://h", "site", "{")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not valid JSON at line 1"), "{err}");
}

#[test]
fn announcements_parse_into_events() {
    assert_eq!(
        parse_event("cert site"),
        Some(StoreEvent::CertSaved("site".into()))
    );
    assert_eq!(
        parse_event("challenge-put tls-alpn-01/a.example"),
        Some(StoreEvent::ChallengePut("tls-alpn-01/a.example".into()))
    );
    assert_eq!(parse_event("bogus"), None);
}
