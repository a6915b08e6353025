//! When to renew: the lifetime-ratio policy, and a certificate's status.

use time::{Duration, OffsetDateTime};

use crate::cert::CertInfo;

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
    not_after - remaining
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
            CertStatus::Expired => "expired",
            CertStatus::Invalid => "invalid",
        }
    }

    /// Classifies a certificate at `now`, given its renewal time and a warning window.
    pub fn of(
        info: &CertInfo,
        renew_at: OffsetDateTime,
        warn: Duration,
        now: OffsetDateTime,
    ) -> Self {
        if now >= info.not_after {
            CertStatus::Expired
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

    #[test]
    fn status_orders_expired_over_due_over_expiring() {
        let info = CertInfo {
            domains: vec![],
            not_before: at(0),
            not_after: at(90),
            serial: String::new(),
            issuer: String::new(),
            key_type: None,
            ari_id: None,
        };
        let renew = at(60);
        let warn = Duration::days(14);
        assert_eq!(
            CertStatus::of(&info, renew, warn, at(10)),
            CertStatus::Valid
        );
        assert_eq!(
            CertStatus::of(&info, renew, Duration::days(85), at(10)),
            CertStatus::Expiring
        );
        assert_eq!(
            CertStatus::of(&info, renew, warn, at(61)),
            CertStatus::RenewalDue
        );
        assert_eq!(
            CertStatus::of(&info, renew, warn, at(90)),
            CertStatus::Expired
        );
    }
}
