//! The `--config` TOML file. The CLI only passes its path on; the library reads it with
//! `ProviderSettings::load` and each DNS provider's `from_settings`, and reads BIND key
//! files (`tsig_file`) with `TsigKey::from_bind_file`. Those are what this drives.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lobe_tls::challenge::dns01::{
    CloudflareProvider, HttpreqProvider, ProviderSettings, Rfc2136Provider, TsigKey,
};

/// The library reads a file, so the input goes through one (one per fuzzing process).
static FILE: LazyLock<PathBuf> = LazyLock::new(|| {
    std::env::temp_dir().join(format!("lobe-tls-fuzz-config-{}", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    std::fs::write(&*FILE, rest).expect("write the fuzz input file");
    if mode % 2 == 1 {
        if let Ok(key) = TsigKey::from_bind_file(&FILE, None) {
            let _ = (key.name(), key.algorithm());
        }
        return;
    }
    for provider in ["rfc2136", "cloudflare", "httpreq"] {
        let Ok(settings) = ProviderSettings::load(provider, Some(&FILE)) else {
            continue;
        };
        let _ = format!("{settings:?}");
        let _ = match provider {
            "rfc2136" => {
                // `tsig_file` names another file to read: the fuzzer must not pick
                // /dev/zero or the like. BIND files are fuzzed in the other mode.
                if settings
                    .get("LOBE_TLS_FUZZ_UNSET", "tsig_file")
                    .ok()
                    .flatten()
                    .is_some()
                {
                    continue;
                }
                Rfc2136Provider::from_settings(&settings).map(|p| format!("{p:?}"))
            }
            "cloudflare" => CloudflareProvider::from_settings(&settings).map(|p| format!("{p:?}")),
            _ => HttpreqProvider::from_settings(&settings).map(|p| format!("{p:?}")),
        };
    }
});
