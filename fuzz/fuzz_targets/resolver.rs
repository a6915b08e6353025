//! The certificate resolver with arbitrary SNI and ALPN: its lookup functions directly,
//! and through a rustls server fed either a ClientHello built from the fuzzed SNI and
//! ALPN or arbitrary bytes as the client's first flight.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use lobe_tls::resolver::ACME_TLS_ALPN;
use lobe_tls::{CertBundle, CertResolver, KeyType};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;

fn key_for(name: &str) -> Arc<CertifiedKey> {
    let key = KeyType::EcdsaP256.generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    CertBundle::from_pem(cert.pem(), key.serialize_pem())
        .expect("bundle")
        .certified_key()
        .expect("certified key")
}

struct Fixture {
    resolver: CertResolver,
    key: Arc<CertifiedKey>,
    config: Arc<ServerConfig>,
}

/// Serves example.com, *.example.org and an acme-tls/1 certificate for acme.example.net;
/// no default, so unknown names get nothing.
static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let resolver = CertResolver::new();
    let key = key_for("example.com");
    resolver.set(&["example.com", "*.example.org"], key.clone());
    resolver.set_challenge("acme.example.net", key_for("acme.example.net"));
    let config = ServerConfig::builder_with_provider(lobe_tls::cert::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver.clone()));
    Fixture {
        resolver,
        key,
        config: Arc::new(config),
    }
});

/// What the fixture must serve a client naming `name`: the model the resolver is checked
/// against (ASCII case-insensitive, one trailing dot ignored, one-label wildcard).
fn expected(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "example.com"
        || name
            .split_once('.')
            .is_some_and(|(_, parent)| parent == "example.org")
}

/// Feeds `bytes` to a fresh server connection as the client's first flight.
fn handshake(bytes: &[u8]) {
    let Ok(mut conn) = rustls::ServerConnection::new(FIXTURE.config.clone()) else {
        return;
    };
    let mut input = bytes;
    while !input.is_empty() {
        match conn.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if conn.process_new_packets().is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut out).is_err() {
            break;
        }
    }
}

/// A TLS 1.2/1.3 ClientHello record carrying `sni` (as raw bytes) and `alpn`.
fn client_hello(sni: Option<&[u8]>, alpn: &[&[u8]]) -> Vec<u8> {
    fn u16be(v: usize) -> [u8; 2] {
        (v as u16).to_be_bytes()
    }
    fn ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&u16be(body.len()));
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    if let Some(sni) = sni {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&u16be(sni.len()));
        entry.extend_from_slice(sni);
        let mut body = u16be(entry.len()).to_vec();
        body.extend_from_slice(&entry);
        ext(&mut exts, 0x0000, &body);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut body = u16be(list.len()).to_vec();
        body.extend_from_slice(&list);
        ext(&mut exts, 0x0010, &body);
    }
    // supported_groups x25519, secp256r1; ec_point_formats; signature_algorithms;
    // supported_versions 1.3 and 1.2; a key_share for x25519.
    ext(&mut exts, 0x000a, &[0, 4, 0, 0x1d, 0, 0x17]);
    ext(&mut exts, 0x000b, &[1, 0]);
    ext(
        &mut exts,
        0x000d,
        &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    ext(&mut exts, 0x002b, &[4, 3, 4, 3, 3]);
    let mut share = vec![0, 36, 0, 0x1d, 0, 32];
    share.extend_from_slice(&[9u8; 32]);
    ext(&mut exts, 0x0033, &share);

    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0, 6, 0x13, 0x01, 0xc0, 0x2b, 0xc0, 0x2f]);
    hello.extend_from_slice(&[1, 0]); // compression: null
    hello.extend_from_slice(&u16be(exts.len()));
    hello.extend_from_slice(&exts);

    let mut handshake = vec![1];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&u16be(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        // Arbitrary bytes as the client's first flight.
        handshake(rest);
        return;
    }
    // Structured: SNI length, SNI, then length-prefixed ALPN protocols.
    let Some((&sni_len, rest)) = rest.split_first() else {
        return;
    };
    let sni_len = usize::from(sni_len).min(rest.len());
    let (sni, mut rest) = rest.split_at(sni_len);
    let mut alpn: Vec<&[u8]> = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        alpn.push(&tail[..len]);
        rest = &tail[len..];
    }
    let fixture = &*FIXTURE;
    let name = String::from_utf8_lossy(sni);

    let served = fixture.resolver.lookup(Some(&name));
    assert_eq!(served.is_some(), expected(&name), "{name:?}");
    if let Some(key) = served {
        assert!(Arc::ptr_eq(&key, &fixture.key));
    }
    assert!(fixture.resolver.lookup(None).is_none());
    let _ = fixture.resolver.has_challenge(&name);

    // Any name can be set and removed again.
    let scratch = CertResolver::new();
    scratch.set(&[name.as_ref()], fixture.key.clone());
    assert!(
        scratch.lookup(Some(&name)).is_some(),
        "{name:?} was just set"
    );
    scratch.remove(&[name.as_ref()]);
    assert!(
        scratch.lookup(Some(&name)).is_none(),
        "{name:?} was just removed"
    );
    assert!(scratch.is_empty());
    scratch.set_challenge(&name, fixture.key.clone());
    assert!(scratch.has_challenge(&name));
    scratch.remove_challenge(&name);
    assert!(!scratch.has_challenge(&name));

    let sni = (mode & 2 == 0).then_some(sni);
    let _ = ACME_TLS_ALPN;
    handshake(&client_hello(sni, &alpn));
});
