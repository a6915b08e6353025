//! Values read back from Redis: the certificate record (`<prefix>:cert:<name>`), the
//! renewal state (`<prefix>:state:<name>`), and the announcements of the events channel.
//! Lock values are never decoded (only compared inside Lua scripts), and challenge values
//! are returned to the ACME server as they are, so neither has a decoder to fuzz.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lobe_tls::store::StoreEvent;
use lobe_tls::store::redis::{decode_cert, decode_renewal_state, parse_event};

fuzz_target!(|data: &[u8]| {
    // redis-rs hands the store a String, so the value is UTF-8 by the time it is decoded.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_cert("redis://fuzz", "site", text) {
        Ok(cert) => {
            let _ = cert.bundle.info();
            let _ = format!("{:?}", cert.meta);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg:?}");
            // The key is a secret: no error may quote it.
            if let Ok(serde_json::Value::Object(record)) = serde_json::from_str(text)
                && let Some(serde_json::Value::String(key)) = record.get("key")
                && key.len() >= 12
            {
                assert!(!msg.contains(key.as_str()), "{msg:?}");
            }
        }
    }
    if let Ok(state) = decode_renewal_state("redis://fuzz", "site", text) {
        let _ = state.is_revoked("01");
    }
    match parse_event(text) {
        Some(StoreEvent::CertSaved(name))
        | Some(StoreEvent::ChallengePut(name))
        | Some(StoreEvent::ChallengeDeleted(name)) => {
            assert!(text.ends_with(name.as_str()));
        }
        Some(StoreEvent::Resync) => panic!("the channel never carries a resync"),
        None => {}
        Some(_) => {}
    }
});
