//! Store metadata as the file store reads it: `CertMeta` from a UTF-8 file with
//! `serde_json::from_str`, `RenewalState` from raw bytes with `serde_json::from_slice`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lobe_tls::{CertMeta, RenewalState};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(meta) = serde_json::from_str::<CertMeta>(text)
    {
        // Whatever loads must save and load back unchanged: a renewal saves it again.
        let json = serde_json::to_string(&meta).expect("loaded metadata saves");
        let back: CertMeta = serde_json::from_str(&json).expect("saved metadata loads");
        assert_eq!(back, meta);
    }
    if let Ok(state) = serde_json::from_slice::<RenewalState>(data) {
        let json = serde_json::to_vec(&state).expect("loaded state saves");
        let back: RenewalState = serde_json::from_slice(&json).expect("saved state loads");
        assert_eq!(back, state);
        let _ = state.is_revoked("01");
    }
});
