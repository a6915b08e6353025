//! When to renew: the ARI window when the CA offers one, the lifetime ratio otherwise,
//! the retry backoff after failures, and a certificate's status.

use rand::Rng;
use time::{Duration, OffsetDateTime};

use crate::cert::CertInfo;
use crate::store::RenewalState;

/// Certificates shorter-lived than this renew at half their lifetime instead of a third
/// remaining, so a 6-day certificate still has days of slack when renewal starts.
const SHORT_LIFETIME: Duration = Duration::days(10);

/// When a certificate becomes due for renewal without ARI: when 1/3 of its lifetime
/// remains, or 1/2 for lifetimes under 10 days.
pub fn renew_after(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    let remaining = if lifetime < SHORT_LIFETIME {
        lifetime / 2
    } else {
        lifetime / 3
    };
    let due: OffsetDateTime = not_after - remaining;
    // Whole seconds: the ratio leaves nanoseconds that no reader of `list` cares about.
    due.replace_nanosecond(0).unwrap_or(due)
}

/// How long to wait after consecutive failures: the n-th failure waits the n-th entry,
/// the last entry repeats. Retries go on for days, settling at one every six hours.
const BACKOFF: [Duration; 10] = [
    Duration::minutes(1),
    Duration::minutes(2),
    Duration::minutes(5),
    Duration::minutes(10),
    Duration::minutes(20),
    Duration::minutes(30),
    Duration::hours(1),
    Duration::hours(2),
    Duration::hours(3),
    Duration::hours(6),
];

/// The tunables of when to renew and how to retry. The defaults suit public CAs; tests
/// shorten them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RenewalPolicy {
    /// Delays after the 1st, 2nd, ... consecutive failure; the last one repeats.
    pub backoff: Vec<Duration>,
    /// The shortest delay between attempts, even close to expiry.
    pub min_retry: Duration,
    /// How often to ask the CA's renewalInfo when it gives no usable `Retry-After`,
    /// and how often to check again whether a CA without ARI has started offering it.
    pub ari_poll: Duration,
    /// `Retry-After` from renewalInfo is honoured but kept inside these bounds.
    pub ari_min_poll: Duration,
    /// See [`RenewalPolicy::ari_min_poll`].
    pub ari_max_poll: Duration,
    /// Warn ([`CertStatus::Expiring`], the manager's ExpiringSoon event) when this
    /// little of the lifetime is left, capped at [`RenewalPolicy::expiring_cap`].
    pub expiring_fraction: u32,
    /// The longest warning window.
    pub expiring_cap: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            backoff: BACKOFF.to_vec(),
            min_retry: Duration::seconds(1),
            ari_poll: Duration::hours(12),
            ari_min_poll: Duration::minutes(1),
            ari_max_poll: Duration::days(1),
            expiring_fraction: 6,
            expiring_cap: Duration::days(7),
        }
    }
}

impl RenewalPolicy {
    /// Retries after the 1st, 2nd, ... consecutive failure wait these delays; the last
    /// repeats.
    pub fn with_backoff(mut self, backoff: Vec<Duration>) -> Self {
        self.backoff = backoff;
        self
    }

    /// When `info` is to be renewed if nothing fails: at once when it was revoked,
    /// at the time picked inside the CA's ARI window for this very certificate, or
    /// else by its lifetime ([`renew_after`]).
    pub fn planned_at(info: &CertInfo, state: &RenewalState) -> OffsetDateTime {
        if state.is_revoked(&info.serial) {
            return info.not_before;
        }
        match state.ari_renew_at {
            Some(at) if info.ari_id.is_some() && state.ari_cert_id == info.ari_id => at,
            _ => renew_after(info.not_before, info.not_after),
        }
    }

    /// When the certificate `info` is due, given its renewal bookkeeping: the time picked
    /// inside the CA's ARI window if there is one for this very certificate, otherwise the
    /// lifetime ratio of [`renew_after`]; never before a pending retry after a failure.
    pub fn due_at(&self, info: &CertInfo, state: &RenewalState) -> OffsetDateTime {
        let planned = Self::planned_at(info, state);
        match state.next_attempt {
            Some(retry) if state.failures > 0 => planned.max(retry),
            _ => planned,
        }
    }

    /// When to try again after `failures` consecutive failures (1 for the first).
    ///
    /// The backoff grows to hours, but a retry never waits more than a quarter of the time
    /// left before `not_after`: near expiry the attempts come closer together instead of
    /// sleeping past it.
    pub fn next_retry(
        &self,
        failures: u32,
        now: OffsetDateTime,
        not_after: Option<OffsetDateTime>,
    ) -> OffsetDateTime {
        let step = failures.saturating_sub(1) as usize;
        let mut delay = self
            .backoff
            .get(step)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(self.min_retry);
        if let Some(not_after) = not_after {
            delay = delay.min((not_after - now) / 4);
        }
        now + delay.max(self.min_retry)
    }

    /// When to ask renewalInfo again, honouring the CA's `Retry-After` within bounds.
    pub fn next_ari_poll(
        &self,
        retry_after: std::time::Duration,
        now: OffsetDateTime,
    ) -> OffsetDateTime {
        let asked = Duration::try_from(retry_after).unwrap_or(self.ari_max_poll);
        now + asked.clamp(self.ari_min_poll, self.ari_max_poll)
    }

    /// Whether `info` is close enough to expiry to warn about it.
    pub fn expiring_soon(&self, info: &CertInfo, now: OffsetDateTime) -> bool {
        info.not_after - now <= self.warning_window(info)
    }

    /// Whether to warn now about `info` nearing expiry: it is inside its warning window
    /// and `warned`, the serial warned about last, is another certificate's. Records
    /// `info` as warned about, so each certificate is warned about once.
    pub fn warn_expiring_once(
        &self,
        info: &CertInfo,
        warned: &mut Option<String>,
        now: OffsetDateTime,
    ) -> bool {
        if !self.expiring_soon(info, now) || warned.as_deref() == Some(info.serial.as_str()) {
            return false;
        }
        *warned = Some(info.serial.clone());
        true
    }

    /// How long before expiry a certificate counts as expiring.
    pub fn warning_window(&self, info: &CertInfo) -> Duration {
        (info.lifetime() / self.expiring_fraction.max(1)).min(self.expiring_cap)
    }

    /// Records a CA's ARI answer for `info` in `state`: keeps the time already picked if
    /// it still lies inside the window, otherwise picks a new random time inside it.
    pub fn apply_ari_window(
        &self,
        info: &CertInfo,
        state: &mut RenewalState,
        window: (OffsetDateTime, OffsetDateTime),
        retry_after: std::time::Duration,
        now: OffsetDateTime,
    ) {
        // A window that reaches past expiry (a CA's mistake, or a clock apart) is cut at
        // `not_after`: renewing after expiry is never what the CA means.
        let end = window.1.min(info.not_after);
        let start = window.0.min(end);
        let same_cert = state.ari_cert_id.is_some() && state.ari_cert_id == info.ari_id;
        // A window that has already opened (a mass-revocation drill moves it into the
        // past) means now, whatever was picked before.
        let keep = same_cert
            && start > now
            && state
                .ari_renew_at
                .is_some_and(|at| at >= start && at <= end);
        if !keep {
            state.ari_renew_at = Some(pick_in_window(start, end, now));
        }
        state.ari_cert_id = info.ari_id.clone();
        state.ari_window_start = Some(window.0);
        state.ari_window_end = Some(window.1);
        state.ari_next_poll = Some(self.next_ari_poll(retry_after, now));
    }
}

/// A uniformly random time inside an ARI window that lies ahead; `now` for a window that
/// has already opened. RFC 9773 §4.2 picks uniformly over the whole window and renews at
/// once when the pick is in the past; a window that opened before `now` is the CA asking
/// for a renewal now (a mass revocation), so it is acted on at once rather than by
/// chance.
pub fn pick_in_window(
    start: OffsetDateTime,
    end: OffsetDateTime,
    now: OffsetDateTime,
) -> OffsetDateTime {
    if start <= now {
        return now;
    }
    if end <= start {
        return end.max(now);
    }
    let span = (end - start).whole_milliseconds();
    let offset = rand::rng().random_range(0..=span.clamp(0, i64::MAX as i128) as i64);
    start + Duration::milliseconds(offset)
}

/// A certificate's state, as `list` and `check` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertStatus {
    /// Valid, not yet due for renewal, outside the warning window.
    Valid,
    /// Past its renewal time: a renewal should have replaced it.
    RenewalDue,
    /// Inside the warning window but not yet due.
    Expiring,
    /// Revoked through `lobe-tls revoke` and not yet replaced.
    Revoked,
    /// Past its expiry.
    Expired,
    /// Unreadable, or its key does not match.
    Invalid,
}

impl CertStatus {
    /// The name `list` and `check` print.
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Valid => "valid",
            CertStatus::RenewalDue => "renewal-due",
            CertStatus::Expiring => "expiring",
            CertStatus::Revoked => "revoked",
            CertStatus::Expired => "expired",
            CertStatus::Invalid => "invalid",
        }
    }

    /// Classifies a certificate at `now`, given its renewal bookkeeping (which decides its
    /// renewal time, [`RenewalPolicy::planned_at`]) and a warning window.
    pub fn of(info: &CertInfo, state: &RenewalState, warn: Duration, now: OffsetDateTime) -> Self {
        let renew_at = RenewalPolicy::planned_at(info, state);
        if now >= info.not_after {
            CertStatus::Expired
        } else if state.is_revoked(&info.serial) {
            CertStatus::Revoked
        } else if now >= renew_at {
            CertStatus::RenewalDue
        } else if info.not_after - now <= warn {
            CertStatus::Expiring
        } else {
            CertStatus::Valid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::days(days)
    }

    #[test]
    fn ninety_day_certificates_renew_with_a_third_left() {
        assert_eq!(renew_after(at(0), at(90)), at(60));
    }

    #[test]
    fn six_day_certificates_renew_at_half_life() {
        assert_eq!(renew_after(at(0), at(6)), at(3));
    }

    fn info(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertInfo {
        CertInfo {
            domains: vec![],
            not_before,
            not_after,
            serial: "01".into(),
            issuer: String::new(),
            key_type: None,
            ari_id: Some("aki.serial".into()),
        }
    }

    #[test]
    fn backoff_grows_for_days_and_settles_at_six_hours() {
        let policy = RenewalPolicy::default();
        let now = at(0);
        let far = Some(at(60));
        let delays: Vec<Duration> = (1..=20)
            .map(|n| policy.next_retry(n, now, far) - now)
            .collect();
        assert_eq!(delays[0], Duration::minutes(1));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[19], Duration::hours(6));
        let total: Duration = delays.iter().sum();
        assert!(total > Duration::days(3), "twenty retries span {total}");
    }

    #[test]
    fn backoff_never_sleeps_past_expiry() {
        let policy = RenewalPolicy::default();
        let now = at(0);
        // Two hours left: a sixth failure would wait 30 min by the schedule, the
        // twentieth six hours; both are capped at a quarter of what is left.
        let not_after = now + Duration::hours(2);
        for failures in [6, 20] {
            let next = policy.next_retry(failures, now, Some(not_after));
            assert!(next - now <= Duration::minutes(30), "{failures}: {next}");
            assert!(next < not_after);
        }
        // Thirty-second certificates (as in tests) retry within seconds.
        let not_after = now + Duration::seconds(12);
        assert_eq!(
            policy.next_retry(3, now, Some(not_after)) - now,
            Duration::seconds(3)
        );
        // Already expired: retry at the minimum pace, not never.
        assert_eq!(
            policy.next_retry(9, now, Some(now - Duration::hours(1))) - now,
            policy.min_retry
        );
    }

    #[test]
    fn due_time_follows_ari_for_the_same_certificate_only() {
        let policy = RenewalPolicy::default();
        let cert = info(at(0), at(90));
        let mut state = RenewalState::default();
        assert_eq!(policy.due_at(&cert, &state), at(60));
        state.ari_renew_at = Some(at(45));
        state.ari_cert_id = Some("other.cert".into());
        assert_eq!(policy.due_at(&cert, &state), at(60), "stale ARI answer");
        state.ari_cert_id = cert.ari_id.clone();
        assert_eq!(policy.due_at(&cert, &state), at(45));
        state.failures = 2;
        state.next_attempt = Some(at(46));
        assert_eq!(policy.due_at(&cert, &state), at(46));
    }

    #[test]
    fn ari_window_pick_is_inside_the_window_and_kept_while_valid() {
        let policy = RenewalPolicy::default();
        let cert = info(at(0), at(90));
        let now = at(10);
        let retry = std::time::Duration::from_secs(6 * 3600);
        for _ in 0..200 {
            let mut state = RenewalState::default();
            policy.apply_ari_window(&cert, &mut state, (at(50), at(52)), retry, now);
            let picked = state.ari_renew_at.unwrap();
            assert!(picked >= at(50) && picked <= at(52), "{picked}");
            assert_eq!(state.ari_next_poll, Some(now + Duration::hours(6)));
            // The same window again keeps the pick; a moved window replaces it.
            policy.apply_ari_window(&cert, &mut state, (at(50), at(52)), retry, now);
            assert_eq!(state.ari_renew_at, Some(picked));
            policy.apply_ari_window(&cert, &mut state, (at(20), at(21)), retry, now);
            let moved = state.ari_renew_at.unwrap();
            assert!(moved >= at(20) && moved <= at(21), "{moved}");
        }
    }

    #[test]
    fn ari_window_in_the_past_means_now_and_retry_after_is_bounded() {
        let policy = RenewalPolicy::default();
        let now = at(10);
        assert_eq!(pick_in_window(at(1), at(2), now), now);
        let started = pick_in_window(at(5), at(11), now);
        assert!(started >= now && started <= at(11));
        assert_eq!(
            policy.next_ari_poll(std::time::Duration::from_secs(0), now) - now,
            Duration::minutes(1)
        );
        assert_eq!(
            policy.next_ari_poll(std::time::Duration::from_secs(30 * 86400), now) - now,
            Duration::days(1)
        );
    }

    #[test]
    fn warning_window_scales_with_lifetime() {
        let policy = RenewalPolicy::default();
        assert_eq!(
            policy.warning_window(&info(at(0), at(90))),
            Duration::days(7)
        );
        assert_eq!(
            policy.warning_window(&info(at(0), at(6))),
            Duration::days(1)
        );
        assert!(policy.expiring_soon(&info(at(0), at(6)), at(5)));
        assert!(!policy.expiring_soon(&info(at(0), at(6)), at(3)));
    }

    #[test]
    fn status_orders_expired_over_revoked_over_due_over_expiring() {
        let info = CertInfo {
            domains: vec![],
            not_before: at(0),
            not_after: at(90),
            serial: String::new(),
            issuer: String::new(),
            key_type: None,
            ari_id: None,
        };
        // Renewal planned at day 60 by the lifetime ratio.
        let warn = Duration::days(14);
        assert_eq!(
            CertStatus::of(&info, &RenewalState::default(), warn, at(10)),
            CertStatus::Valid
        );
        assert_eq!(
            CertStatus::of(&info, &RenewalState::default(), Duration::days(85), at(10)),
            CertStatus::Expiring
        );
        assert_eq!(
            CertStatus::of(&info, &RenewalState::default(), warn, at(61)),
            CertStatus::RenewalDue
        );
        assert_eq!(
            CertStatus::of(&info, &RenewalState::default(), warn, at(90)),
            CertStatus::Expired
        );
        let revoked = RenewalState {
            revoked_serial: Some(info.serial.clone()),
            ..RenewalState::default()
        };
        assert_eq!(
            CertStatus::of(&info, &revoked, warn, at(10)),
            CertStatus::Revoked
        );
        assert_eq!(
            CertStatus::of(&info, &revoked, warn, at(90)),
            CertStatus::Expired
        );
    }

    #[test]
    fn a_revoked_certificate_is_due_at_once_and_its_replacement_is_not() {
        let policy = RenewalPolicy::default();
        let revoked = info(at(0), at(90));
        let state = RenewalState {
            revoked_serial: Some(revoked.serial.clone()),
            ..RenewalState::default()
        };
        assert_eq!(policy.due_at(&revoked, &state), at(0));
        let replacement = CertInfo {
            serial: "02".into(),
            ..info(at(1), at(91))
        };
        assert_eq!(policy.due_at(&replacement, &state), at(61));
    }

    /// A certificate of any lifetime, fresh from the CA, is not due: it is due after half
    /// its lifetime (under ten days), and its replacement again half a lifetime later, so
    /// renewals come once per half lifetime and never back to back.
    #[test]
    fn short_lived_certificates_renew_by_their_lifetime_never_in_a_loop() {
        let policy = RenewalPolicy::default();
        for lifetime in [
            Duration::days(6),
            Duration::hours(160),
            Duration::seconds(30),
        ] {
            let mut now = at(100);
            let mut cert = CertInfo {
                ari_id: Some("aki.0".into()),
                ..info(now, now + lifetime)
            };
            let mut state = RenewalState::default();
            let mut renewals = 0;
            let end = now + lifetime * 10;
            while now < end {
                let due = policy.due_at(&cert, &state);
                assert!(due > now, "{lifetime}: a fresh certificate is due at once");
                assert_eq!(due - cert.not_before, lifetime / 2, "{lifetime}");
                assert!(due < cert.not_after);
                assert_eq!(
                    CertStatus::of(&cert, &state, policy.warning_window(&cert), now),
                    CertStatus::Valid,
                    "{lifetime}"
                );
                // Renewed when due; the new certificate starts then, with state reset
                // as the manager resets it after an order.
                now = due;
                renewals += 1;
                cert = CertInfo {
                    serial: format!("{renewals:02}"),
                    ari_id: Some(format!("aki.{renewals}")),
                    ..info(now, now + lifetime)
                };
                state = RenewalState::default();
            }
            assert_eq!(renewals, 20, "{lifetime}");
        }
    }

    /// An ARI answer about the replaced certificate (its window open, say) does not make
    /// the replacement due: the answer names the old certificate.
    #[test]
    fn an_ari_window_for_the_replaced_certificate_does_not_make_the_new_one_due() {
        let policy = RenewalPolicy::default();
        let old = info(at(0), at(6));
        let mut state = RenewalState::default();
        policy.apply_ari_window(
            &old,
            &mut state,
            (at(-1), at(1)),
            std::time::Duration::ZERO,
            at(3),
        );
        assert_eq!(policy.due_at(&old, &state), at(3));
        let new = CertInfo {
            serial: "02".into(),
            ari_id: Some("aki.new".into()),
            ..info(at(3), at(9))
        };
        assert_eq!(policy.due_at(&new, &state), at(6));
    }

    /// A mass-revocation drill moves the window into the past: the earlier pick, even if
    /// inside the new window, gives way to now.
    #[test]
    fn a_window_that_opened_already_means_now_over_an_earlier_pick() {
        let policy = RenewalPolicy::default();
        let cert = info(at(0), at(90));
        let retry = std::time::Duration::from_secs(3600);
        let mut state = RenewalState::default();
        policy.apply_ari_window(&cert, &mut state, (at(50), at(52)), retry, at(10));
        let picked = state.ari_renew_at.unwrap();
        assert!(picked >= at(50));
        let now = at(11);
        policy.apply_ari_window(&cert, &mut state, (at(5), at(60)), retry, now);
        assert_eq!(state.ari_renew_at, Some(now));
        assert_eq!(policy.due_at(&cert, &state), now);
        assert_eq!(state.ari_window_for(&cert), Some((at(5), at(60))));
        for _ in 0..100 {
            assert_eq!(pick_in_window(at(10), at(12), at(11)), at(11));
        }
    }

    #[test]
    fn an_ari_window_past_expiry_is_cut_at_not_after() {
        let policy = RenewalPolicy::default();
        let mut cert = info(at(0), at(6));
        cert.ari_id = Some("aki.serial".into());
        let mut state = RenewalState::default();
        let window = (at(5), at(30));
        policy.apply_ari_window(&cert, &mut state, window, std::time::Duration::ZERO, at(1));
        let renew_at = state.ari_renew_at.unwrap();
        assert!(renew_at >= at(5) && renew_at <= at(6), "{renew_at}");
        // A window wholly after expiry means: renew before it expires, now.
        let mut state = RenewalState::default();
        policy.apply_ari_window(
            &cert,
            &mut state,
            (at(10), at(20)),
            std::time::Duration::ZERO,
            at(1),
        );
        assert!(state.ari_renew_at.unwrap() <= at(6));
    }
}
