//! Copying everything from one store to another (file store ↔ Redis), for
//! `lobe-tls store copy`.

use super::{RenewalState, Store};
use crate::error::Result;

/// What a [`copy`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct CopyReport {
    /// Certificates (with keys and metadata) copied.
    pub certs: usize,
    /// Accounts copied.
    pub accounts: usize,
    /// Non-default renewal states copied.
    pub renewal_states: usize,
}

/// Copies every certificate, account and renewal state from `from` to `to`, replacing
/// what `to` holds under the same names. `from` is only read. Each certificate is written
/// with the target's atomic save, so a reader of `to` never sees a half-copied one.
pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    for key in from.list_accounts().await? {
        if let Some(data) = from.load_account(&key).await? {
            to.save_account(&key, &data).await?;
            report.accounts += 1;
        }
    }
    for name in from.list_certs().await? {
        // A name listed but gone by now was removed meanwhile: nothing to copy.
        if let Some(cert) = from.load_cert(&name).await? {
            to.save_cert(&cert).await?;
            report.certs += 1;
        }
        let state = from.load_renewal_state(&name).await?;
        if state != RenewalState::default() {
            to.save_renewal_state(&name, &state).await?;
            report.renewal_states += 1;
        }
    }
    Ok(report)
}
