//! One copy of each intermediate certificate, however many chains carry it.
//!
//! 100,000 certificates from one CA carry the same one or two intermediates; kept per
//! chain they cost more than the leaves. rustls holds a chain as `CertificateDer`s,
//! which either own their bytes or borrow them for `'static`, so a shared copy is a
//! `'static` one: each distinct intermediate is kept once for the life of the process.
//! Distinct issuers are few (a CA rotates intermediates yearly); past [`MAX_SHARED`],
//! further ones are simply owned by their chain, so a store full of odd issuers cannot
//! grow this table without bound.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use rustls_pki_types::CertificateDer;

/// The most distinct intermediates kept shared.
const MAX_SHARED: usize = 256;

fn table() -> &'static Mutex<HashSet<&'static [u8]>> {
    static TABLE: OnceLock<Mutex<HashSet<&'static [u8]>>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// The shared copy of `der`, made on first sight; `der` itself when the table is full.
pub(super) fn intern(der: CertificateDer<'static>) -> CertificateDer<'static> {
    // The table is only ever inserted into: a holder that panicked left it whole.
    let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = table.get(der.as_ref()) {
        return CertificateDer::from(*shared);
    }
    if table.len() >= MAX_SHARED {
        return der;
    }
    // Kept for the process's life on purpose (see above): bounded by MAX_SHARED.
    let shared: &'static [u8] = Box::leak(der.as_ref().to_vec().into_boxed_slice());
    table.insert(shared);
    CertificateDer::from(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_intermediates_share_one_copy() {
        let a = intern(CertificateDer::from(vec![0x30, 0x01, 0x42]));
        let b = intern(CertificateDer::from(vec![0x30, 0x01, 0x42]));
        assert_eq!(a.as_ref().as_ptr(), b.as_ref().as_ptr());
        let c = intern(CertificateDer::from(vec![0x30, 0x01, 0x43]));
        assert_ne!(a.as_ref().as_ptr(), c.as_ref().as_ptr());
    }
}
