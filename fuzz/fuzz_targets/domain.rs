//! Domain names as users, config files and stored metadata give them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lobe_tls::domain::{self, DomainName};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match DomainName::parse(text) {
        Ok(name) => {
            let s = name.as_str();
            assert!(s.is_ascii() && s.len() <= 253, "{s:?}");
            assert!(!s.bytes().any(|b| b.is_ascii_uppercase()), "{s:?}");
            // A DNS name has two labels at least; an IP address is in its canonical form.
            match name.ip() {
                Some(ip) => assert_eq!(ip.to_string(), s),
                None => assert!(!s.ends_with('.') && s.contains('.'), "{s:?}"),
            }
            assert_eq!(name.is_wildcard(), s.starts_with("*."));
            assert!(!name.base().contains('*'), "{s:?}");
            let _ = name.acme_challenge_fqdn();
            // A parsed name is already canonical: parsing it again changes nothing.
            let again = DomainName::parse(s);
            assert_eq!(again.as_ref(), Ok(&name), "{text:?} -> {s:?}");
            // As stored in metadata JSON.
            let json = serde_json::to_string(&name).expect("a name serialises");
            let back: DomainName = serde_json::from_str(&json).expect("a stored name loads");
            assert_eq!(back, name);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // One name per line, as a list of -d flags would give them.
    let lines: Vec<&str> = text.split('\n').collect();
    if let Ok(names) = domain::parse_all(&lines) {
        assert!(!names.is_empty() && names.len() <= lines.len());
        for (i, n) in names.iter().enumerate() {
            assert!(!names[..i].contains(n), "duplicate {n:?}");
        }
    }
});
