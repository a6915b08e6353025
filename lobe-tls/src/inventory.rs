//! What is in a store and what state each certificate is in: the facts behind
//! `lobe-tls list` and `lobe-tls check`.

use time::{Duration, OffsetDateTime};

use crate::cert::{CertInfo, KeyType, rfc3339};
use crate::error::Result;
use crate::renewal::{CertStatus, RenewalPolicy};
use crate::store::{RenewalState, Store, StoredCert};

/// The warning window when none is given: 14 days, but never more than a third of the
/// certificate's lifetime, so a freshly issued short-lived certificate is not flagged.
pub const DEFAULT_WARN: Duration = Duration::days(14);

/// One stored certificate as `list` and `check` report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertReport {
    /// The certificate's name in the store.
    pub name: String,
    /// The names on the certificate (empty when it is unreadable).
    pub domains: Vec<String>,
    /// Start of validity, RFC 3339.
    pub not_before: Option<String>,
    /// End of validity, RFC 3339.
    pub not_after: Option<String>,
    /// The serial number, lower-case hex.
    pub serial: Option<String>,
    /// The issuer's distinguished name.
    pub issuer: Option<String>,
    /// The key type, when it is one lobe-tls generates.
    pub key_type: Option<KeyType>,
    /// When the certificate is due for renewal, RFC 3339.
    pub renew_after: Option<String>,
    /// `valid`, `renewal-due`, `expiring`, `revoked`, `expired` or `invalid`.
    pub status: CertStatus,
    /// Why the certificate is invalid, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The ACME profile the certificate is ordered under, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The ACME directory URL of the CA that issued it (a fallback CA's, if one did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
}

impl CertReport {
    /// The report for a certificate that could be loaded.
    ///
    /// `warn` is the warning window ([`DEFAULT_WARN`], capped, when `None`); a renewal
    /// time picked from the CA's ARI window takes precedence over the lifetime ratio.
    pub fn of(
        cert: &StoredCert,
        state: &RenewalState,
        warn: Option<Duration>,
        now: OffsetDateTime,
    ) -> Self {
        // Serving loads keys on first use; `list` and `check` load each one now, so a
        // key that does not match is reported here, not at a client's handshake.
        let info = match cert.bundle.check_key().and_then(|()| cert.bundle.info()) {
            Ok(info) => info,
            Err(e) => return CertReport::invalid(&cert.meta.name, e.to_string()),
        };
        let renew_at = RenewalPolicy::planned_at(&info, state);
        let warn = warn.unwrap_or_else(|| DEFAULT_WARN.min(info.lifetime() / 3));
        let status = CertStatus::of(&info, state, warn, now);
        let CertInfo {
            domains,
            not_before,
            not_after,
            serial,
            issuer,
            key_type,
            ..
        } = info;
        CertReport {
            name: cert.meta.name.clone(),
            domains,
            not_before: Some(rfc3339(not_before)),
            not_after: Some(rfc3339(not_after)),
            serial: Some(serial),
            issuer: Some(issuer),
            key_type,
            renew_after: Some(rfc3339(renew_at)),
            status,
            error: None,
            profile: cert.meta.profile.clone(),
            directory: Some(crate::store::redact_url(&cert.meta.directory)),
        }
    }

    /// The report for a certificate that cannot be read or whose key does not match.
    pub fn invalid(name: &str, error: String) -> Self {
        CertReport {
            name: name.to_owned(),
            domains: Vec::new(),
            not_before: None,
            not_after: None,
            serial: None,
            issuer: None,
            key_type: None,
            renew_after: None,
            status: CertStatus::Invalid,
            error: Some(error),
            profile: None,
            directory: None,
        }
    }
}

/// Reports every certificate in `store`, sorted by name. A certificate that cannot be
/// loaded is reported as invalid with the reason; only failing to list the store at all
/// is an error.
pub async fn inventory(
    store: &dyn Store,
    warn: Option<Duration>,
    now: OffsetDateTime,
) -> Result<Vec<CertReport>> {
    let mut reports = Vec::new();
    for name in store.list_certs().await? {
        reports.push(report_one(store, &name, warn, now).await);
    }
    Ok(reports)
}

/// Reports one certificate by name; unreadable or missing ones are invalid.
pub async fn report_one(
    store: &dyn Store,
    name: &str,
    warn: Option<Duration>,
    now: OffsetDateTime,
) -> CertReport {
    let cert = match store.load_cert(name).await {
        Ok(Some(cert)) => cert,
        Ok(None) => {
            return CertReport::invalid(
                name,
                format!("{name}: the stored certificate is missing (a dangling link?)"),
            );
        }
        Err(e) => return CertReport::invalid(name, e.to_string()),
    };
    // Renewal bookkeeping only refines the renewal time; losing it is not fatal.
    let state = store.load_renewal_state(name).await.unwrap_or_default();
    CertReport::of(&cert, &state, warn, now)
}

/// The exit status of `lobe-tls check` for a set of reports: 0 when all are fine, 1 when
/// one is inside the warning window, 2 when one is expired, invalid or past its renewal
/// time.
pub fn check_exit_code(reports: &[CertReport]) -> u8 {
    reports
        .iter()
        .map(|r| match r.status {
            CertStatus::Valid => 0,
            CertStatus::Expiring => 1,
            CertStatus::RenewalDue
            | CertStatus::Revoked
            | CertStatus::Expired
            | CertStatus::Invalid => 2,
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertBundle;
    use crate::challenge::ChallengeConfig;
    use crate::domain::DomainName;
    use crate::store::{CertMeta, FileStore};

    fn cert(name: &str, days: i64) -> StoredCert {
        cert_made(name, days, false)
    }

    /// A certificate that names its issuer's key, as a CA's do, so it has an ARI identifier.
    fn cert_with_aki(name: &str, days: i64) -> StoredCert {
        cert_made(name, days, true)
    }

    fn cert_made(name: &str, days: i64, aki: bool) -> StoredCert {
        let key = KeyType::EcdsaP256.generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".to_owned()]).unwrap();
        params.use_authority_key_identifier_extension = aki;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        StoredCert {
            bundle: CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap(),
            meta: CertMeta {
                name: name.into(),
                domains: vec![DomainName::parse("a.example.com").unwrap()],
                key_type: KeyType::EcdsaP256,
                challenge: ChallengeConfig::default(),
                directory: "https://ca.test/dir".into(),
                issued_at: now,
                profile: None,
            },
        }
    }

    #[test]
    fn fresh_ninety_day_certificate_is_valid_with_renewal_at_two_thirds() {
        let report = CertReport::of(
            &cert("a", 90),
            &RenewalState::default(),
            None,
            OffsetDateTime::now_utc(),
        );
        assert_eq!(report.status, CertStatus::Valid);
        assert_eq!(report.domains, ["a.example.com"]);
        assert_eq!(report.key_type, Some(KeyType::EcdsaP256));
        assert_eq!(check_exit_code(&[report]), 0);
    }

    #[test]
    fn fresh_short_lived_certificate_is_not_flagged_by_the_default_window() {
        let report = CertReport::of(
            &cert("a", 6),
            &RenewalState::default(),
            None,
            OffsetDateTime::now_utc(),
        );
        assert_eq!(report.status, CertStatus::Valid);
    }

    #[test]
    fn a_wide_warning_window_makes_it_expiring_and_exit_one() {
        let report = CertReport::of(
            &cert("a", 90),
            &RenewalState::default(),
            Some(Duration::days(100)),
            OffsetDateTime::now_utc(),
        );
        assert_eq!(report.status, CertStatus::Expiring);
        assert_eq!(check_exit_code(&[report]), 1);
    }

    #[test]
    fn an_ari_renewal_time_for_this_certificate_takes_precedence() {
        let now = OffsetDateTime::now_utc();
        let cert = cert_with_aki("a", 90);
        let ari_id = cert.bundle.info().unwrap().ari_id;
        assert!(
            ari_id.is_some(),
            "the test certificate needs an ARI identifier"
        );
        let state = RenewalState {
            ari_renew_at: Some(now - Duration::minutes(1)),
            ari_cert_id: ari_id,
            ..RenewalState::default()
        };
        let report = CertReport::of(&cert, &state, None, now);
        assert_eq!(report.status, CertStatus::RenewalDue);
        assert_eq!(check_exit_code(&[report]), 2);

        // An answer about the certificate this one replaced no longer counts, as in the
        // manager.
        let stale = RenewalState {
            ari_cert_id: Some("another.certificate".into()),
            ..state
        };
        let report = CertReport::of(&cert, &stale, None, now);
        assert_eq!(report.status, CertStatus::Valid);
    }

    #[test]
    fn a_revoked_certificate_is_reported_and_fails_the_check() {
        let now = OffsetDateTime::now_utc();
        let cert = cert("a", 90);
        let state = RenewalState {
            revoked_serial: Some(cert.bundle.info().unwrap().serial),
            ..RenewalState::default()
        };
        let report = CertReport::of(&cert, &state, None, now);
        assert_eq!(report.status, CertStatus::Revoked);
        assert_eq!(check_exit_code(&[report]), 2);
    }

    #[tokio::test]
    async fn unreadable_certificate_is_reported_invalid_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.save_cert(&cert("good", 90)).await.unwrap();
        store.save_cert(&cert("bad", 90)).await.unwrap();
        std::fs::write(store.live_dir("bad").join("fullchain.pem"), "garbage").unwrap();
        let reports = inventory(&store, None, OffsetDateTime::now_utc())
            .await
            .unwrap();
        let names: Vec<_> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["bad", "good"]);
        assert_eq!(reports[0].status, CertStatus::Invalid);
        assert!(reports[0].error.as_deref().unwrap().contains("bad"));
        assert_eq!(reports[1].status, CertStatus::Valid);
        assert_eq!(check_exit_code(&reports), 2);
    }
}
