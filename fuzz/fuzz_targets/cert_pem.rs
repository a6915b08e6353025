//! PEM chains and keys as the stores and the certificate watcher read them, and DER
//! certificates as `CertInfo` reads them.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lobe_tls::{CertBundle, CertInfo, KeyType};
use rustls_pki_types::CertificateDer;

/// A real key, so fuzzed chains get as far as the key/leaf match.
static KEY_PEM: LazyLock<String> = LazyLock::new(|| {
    KeyType::EcdsaP256
        .generate()
        .expect("key generation")
        .serialize_pem()
});

fn exercise(bundle: &CertBundle) {
    let chain = bundle.chain_der().expect("chain of a loaded bundle");
    assert!(!chain.is_empty());
    let leaf = bundle.cert_pem().expect("leaf PEM");
    let rest = bundle.chain_pem().expect("chain PEM");
    // What a store writes back (cert.pem + chain.pem) loads again as the same chain.
    let again = CertBundle::from_pem(format!("{leaf}{rest}"), bundle.key_pem())
        .expect("a loaded bundle written back loads again");
    assert_eq!(again.chain_der().expect("chain"), chain);
    if let Ok(info) = bundle.info() {
        let _ = info.lifetime();
        let _ = bundle.validate_for(&[]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // Raw DER, as CertInfo::from_der sees every leaf.
        0 => {
            if let Ok(info) = CertInfo::from_der(&CertificateDer::from(rest)) {
                let _ = info.lifetime();
                let _ = serde_json::to_string(&info);
            }
        }
        // A fuzzed chain with a real key.
        1 => {
            let chain = String::from_utf8_lossy(rest);
            if let Ok(bundle) = CertBundle::from_pem(chain.as_ref(), KEY_PEM.as_str()) {
                exercise(&bundle);
            }
        }
        // Chain and key both fuzzed, split at the first NUL.
        _ => {
            let (chain, key) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let chain = String::from_utf8_lossy(chain);
            let key = String::from_utf8_lossy(key);
            if let Ok(bundle) = CertBundle::from_pem(chain.as_ref(), key.as_ref()) {
                exercise(&bundle);
            }
        }
    }
});
