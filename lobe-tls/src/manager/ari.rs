//! Asking the CA's renewalInfo (RFC 9773) when it is time to. The window arithmetic is
//! in [`crate::renewal`]; this module owns the network call.

use time::OffsetDateTime;

use crate::cert::{CertInfo, rfc3339};
use crate::error::Error;
use crate::store::RenewalState;

use super::*;

impl Manager {
    /// Asks renewalInfo for `name` if the CA offers ARI and it is time to ask.
    pub(super) async fn poll_ari_if_due(&self, name: &str) {
        let now = OffsetDateTime::now_utc();
        let (info, der, directory, mut state) = {
            let slots = self.inner.slots();
            let Some(slot) = slots.get(name) else { return };
            let Some(current) = &slot.current else { return };
            if slot.managed.is_none() || !ari_poll_due(&current.info, &slot.state, now) {
                return;
            }
            (
                current.info.clone(),
                current.key.cert[0].clone(),
                current.directory.clone(),
                slot.state.clone(),
            )
        };
        // The CA that issued the certificate is the one that knows it: a fallback's
        // certificate is unknown to the primary. One no longer configured is not asked;
        // the certificate renews on its lifetime.
        let Some(ca) = self.inner.chain.of_directory(&directory) else {
            tracing::debug!(cert = %name, %directory, "no ARI poll: the issuing CA is no longer configured");
            return;
        };
        let policy = &self.inner.policy;
        let Ok(_permit) = self.inner.ari_polls.acquire().await else {
            return;
        };
        let bound = request_bound(self.inner.acme.request_timeout, Some(info.not_after));
        let asked = crate::acme::with_request_bound(bound, async {
            let client = ca.connect(self.inner.store.as_ref()).await?;
            Ok::<_, Error>(match instant_acme::CertificateIdentifier::try_from(&der) {
                Ok(id) => Some(client.account().renewal_info(&id).await),
                Err(_) => None,
            })
        })
        .await;
        match asked {
            Ok(answer) => match answer {
                Some(answer) => match answer {
                    Ok((answer, retry_after)) => {
                        let window = (answer.suggested_window.start, answer.suggested_window.end);
                        policy.apply_ari_window(&info, &mut state, window, retry_after, now);
                        tracing::debug!(cert = %name, start = %rfc3339(window.0), end = %rfc3339(window.1), renew_at = ?state.ari_renew_at.map(rfc3339), "ARI window");
                    }
                    Err(instant_acme::Error::Unsupported(_)) => {
                        state.ari_cert_id = None;
                        state.ari_renew_at = None;
                        state.ari_window_start = None;
                        state.ari_window_end = None;
                        state.ari_next_poll = Some(now + policy.ari_poll);
                    }
                    Err(e) => {
                        tracing::warn!(cert = %name, error = %crate::acme::error_chain(&e), "renewalInfo query failed");
                        state.ari_next_poll =
                            Some(now + (policy.ari_poll / 12_i32).max(policy.ari_min_poll));
                    }
                },
                None => {
                    // No authority key identifier: ARI cannot name this certificate.
                    state.ari_next_poll = Some(now + policy.ari_poll);
                }
            },
            Err(e) => {
                tracing::warn!(cert = %name, error = %e, "cannot reach the CA for renewalInfo");
                state.ari_next_poll =
                    Some(now + (policy.ari_poll / 12_i32).max(policy.ari_min_poll));
            }
        }
        // Only the ARI fields are this poll's news. The rest may have changed while the CA
        // was asked, here or in another process sharing the store (a failure recorded, a
        // `lobe-tls revoke`), so the answer goes into what the store holds now.
        let stored = self.inner.store.load_renewal_state(name).await;
        let state = {
            let mut slots = self.inner.slots();
            match slots.get_mut(name) {
                // Only if the certificate was not replaced meanwhile.
                Some(slot)
                    if slot
                        .current
                        .as_ref()
                        .is_some_and(|c| c.info.serial == info.serial) =>
                {
                    let mut merged = stored.unwrap_or_else(|_| slot.state.clone());
                    merged.ari_renew_at = state.ari_renew_at;
                    merged.ari_next_poll = state.ari_next_poll;
                    merged.ari_cert_id = state.ari_cert_id;
                    merged.ari_window_start = state.ari_window_start;
                    merged.ari_window_end = state.ari_window_end;
                    slot.state = merged.clone();
                    merged
                }
                _ => return,
            }
        };
        if let Err(e) = self.inner.store.save_renewal_state(name, &state).await {
            tracing::warn!(cert = %name, error = %e, "cannot save renewal state");
        }
        self.wake();
    }
}

/// Whether it is time to ask renewalInfo about `info`.
pub(super) fn ari_poll_due(info: &CertInfo, state: &RenewalState, now: OffsetDateTime) -> bool {
    if info.ari_id.is_none() {
        return false;
    }
    let answer_is_stale = state.ari_cert_id.is_some() && state.ari_cert_id != info.ari_id;
    answer_is_stale || state.ari_next_poll.is_none_or(|t| t <= now)
}
