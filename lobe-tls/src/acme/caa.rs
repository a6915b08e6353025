//! The CAA pre-flight (RFC 8659, with RFC 8657's `accounturi` and `validationmethods`):
//! before an order is placed, each name's relevant CAA record set is looked up the way
//! the CA will look it up, so that a record forbidding the CA is a one-line error naming
//! the record instead of a failed order counted against the rate limits.
//!
//! A look-up that fails (SERVFAIL, no answer) does not block issuance: the CA decides
//! then, and a client that refused on a flaky resolver would stop renewals for nothing.
//! It is logged as a warning, and the whole check is bounded by [`CAA_BUDGET`].

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::rdata::caa::{Property, Value};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::challenge::ChallengeKind;
use crate::challenge::dns01::lookup::RecursiveResolvers;
use crate::domain::DomainName;
use crate::error::{DnsErrorKind, Error, Result};

/// The longest the whole pre-flight may take before the order goes ahead unchecked.
pub const CAA_BUDGET: Duration = Duration::from_secs(10);

/// How the CAA pre-flight runs. The default checks, through the system's resolver, with
/// the CA's identities from its directory (`meta.caaIdentities`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaaCheck {
    /// Skip the check.
    pub disabled: bool,
    /// Recursive resolvers to ask; the system's (`/etc/resolv.conf`) when empty.
    pub resolvers: Vec<SocketAddr>,
    /// The CA's CAA identities (`letsencrypt.org`), instead of the directory's
    /// `meta.caaIdentities`: for a CA whose directory lists none.
    pub identities: Vec<String>,
}

/// What the order needs checked: the CA, the account, and how names are validated.
pub(crate) struct CaaSubject<'a> {
    pub(crate) identities: &'a [String],
    pub(crate) account_uri: &'a str,
    pub(crate) method: ChallengeKind,
}

/// One CAA record of a relevant set, as found at `owner`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CaaRecord {
    pub(crate) owner: String,
    pub(crate) critical: bool,
    pub(crate) tag: Property,
    pub(crate) value: Value,
    pub(crate) raw: String,
}

impl std::fmt::Display for CaaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CAA {} {} \"{}\"",
            self.owner,
            if self.critical { 128 } else { 0 },
            self.tag.as_str(),
            self.raw
        )
    }
}

/// Checks every name of an order; `Err` only for a record that forbids the order.
pub(crate) async fn check(
    config: &CaaCheck,
    domains: &[DomainName],
    subject: &CaaSubject<'_>,
) -> Result<()> {
    if config.disabled {
        return Ok(());
    }
    let resolvers = match RecursiveResolvers::new(config.resolvers.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "CAA not checked before ordering");
            return Ok(());
        }
    };
    let run = async {
        for domain in domains {
            let (name, wildcard) = match domain.as_str().strip_prefix("*.") {
                Some(base) => (base, true),
                None => (domain.as_str(), false),
            };
            match relevant_set(&resolvers, name).await {
                Ok(set) => evaluate(domain.as_str(), wildcard, &set, subject)?,
                Err(e) => {
                    tracing::warn!(domain = %domain, error = %e, "CAA not checked before ordering; the CA will check it");
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(CAA_BUDGET, run).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                "CAA look-ups took longer than {}s; ordering without the pre-flight",
                CAA_BUDGET.as_secs()
            );
            Ok(())
        }
    }
}

/// The relevant record set of `name` (RFC 8659 §3): the CAA records at the name or, when
/// it has none, at the closest ancestor that has some. Empty when no ancestor has any.
async fn relevant_set(resolvers: &RecursiveResolvers, name: &str) -> Result<Vec<CaaRecord>> {
    let mut current =
        Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|e| {
            Error::dns(DnsErrorKind::BadName, format!("bad DNS name {name:?}: {e}")).with_source(e)
        })?;
    loop {
        if current.is_root() {
            return Ok(Vec::new());
        }
        let message = resolvers
            .query(&current, RecordType::CAA)
            .await
            .map_err(|(server, e)| {
                Error::dns(
                    DnsErrorKind::Lookup,
                    format!("resolver {server} {e} for {current} CAA"),
                )
                .with_source(e)
            })?;
        // A resolver follows a CNAME and answers with the target's records: those are
        // the relevant ones (RFC 8659 §3), whatever name owns them.
        let set: Vec<CaaRecord> = message
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::CAA(caa) => Some(CaaRecord {
                    owner: record.name().to_string(),
                    critical: caa.issuer_critical(),
                    tag: caa.tag().clone(),
                    // A malformed issuer value names no CA, so it authorizes none.
                    value: match caa.value_as_issue() {
                        Ok((issuer, params)) => Value::Issuer(issuer, params),
                        Err(_) => Value::Unknown(caa.raw_value().to_vec()),
                    },
                    raw: String::from_utf8_lossy(caa.raw_value()).into_owned(),
                }),
                _ => None,
            })
            .collect();
        if !set.is_empty() {
            return Ok(set);
        }
        current = current.base_name();
    }
}

/// Whether `set` lets this CA issue for `domain` (RFC 8659 §4, RFC 8657 §3-4).
pub(crate) fn evaluate(
    domain: &str,
    wildcard: bool,
    set: &[CaaRecord],
    subject: &CaaSubject<'_>,
) -> Result<()> {
    if set.is_empty() {
        return Ok(());
    }
    // A critical property the CA does not know forbids issuance outright (§4.5).
    if let Some(unknown) = set
        .iter()
        .find(|r| r.critical && matches!(r.tag, Property::Unknown(_)))
    {
        return Err(forbidden(
            domain,
            unknown,
            "has a critical property no CA understands",
        ));
    }
    let issuewild: Vec<&CaaRecord> = set
        .iter()
        .filter(|r| matches!(r.tag, Property::IssueWild))
        .collect();
    let records: Vec<&CaaRecord> = if wildcard && !issuewild.is_empty() {
        issuewild
    } else {
        set.iter()
            .filter(|r| matches!(r.tag, Property::Issue))
            .collect()
    };
    if records.is_empty() {
        return Ok(());
    }
    if subject.identities.is_empty() {
        // Without the CA's identity only a record that forbids every CA can be judged.
        if let Some(all) = records
            .iter()
            .find(|r| matches!(&r.value, Value::Issuer(None, _)))
            && records.len() == 1
        {
            return Err(forbidden(domain, all, "forbids issuance by any CA"));
        }
        tracing::warn!(%domain, "the CA's directory lists no caaIdentities: CAA not checked before ordering");
        return Ok(());
    }
    let method = subject.method.as_str();
    let mut closest: Option<(&CaaRecord, &'static str)> = None;
    for record in &records {
        let Value::Issuer(Some(issuer), params) = &record.value else {
            continue;
        };
        let issuer = issuer.to_ascii();
        let issuer = issuer.trim_end_matches('.');
        if !subject
            .identities
            .iter()
            .any(|id| id.trim_end_matches('.').eq_ignore_ascii_case(issuer))
        {
            continue;
        }
        let mut refused = None;
        for param in params {
            match param.key() {
                "accounturi" if param.value() != subject.account_uri => {
                    refused = Some("names another ACME account (accounturi)");
                }
                "validationmethods"
                    if !param
                        .value()
                        .split(',')
                        .any(|m| m.trim().eq_ignore_ascii_case(method)) =>
                {
                    refused = Some("does not allow this challenge type (validationmethods)");
                }
                _ => {}
            }
        }
        match refused {
            None => return Ok(()),
            Some(why) => closest = closest.or(Some((record, why))),
        }
    }
    Err(match closest {
        Some((record, why)) => forbidden(domain, record, why),
        None => forbidden(
            domain,
            records[0],
            &format!("does not name this CA ({})", subject.identities.join(", ")),
        ),
    })
}

fn forbidden(domain: &str, record: &CaaRecord, why: &str) -> Error {
    Error::dns(
        DnsErrorKind::CaaForbids,
        format!(
            "CAA forbids this certificate for {domain}: the record `{record}` {why}; change the CAA records or use another CA (no order was placed)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::caa::KeyValue;

    fn issue(tag: Property, issuer: Option<&str>, params: &[(&str, &str)]) -> CaaRecord {
        let kv: Vec<KeyValue> = params.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect();
        let mut raw = issuer.unwrap_or("").to_owned();
        for (k, v) in params {
            raw.push_str(&format!("; {k}={v}"));
        }
        CaaRecord {
            owner: "example.com.".into(),
            critical: false,
            tag,
            value: Value::Issuer(issuer.map(|i| Name::from_ascii(i).unwrap()), kv),
            raw,
        }
    }

    fn subject(method: ChallengeKind) -> (Vec<String>, String, ChallengeKind) {
        (
            vec!["letsencrypt.org".into()],
            "https://ca.test/acct/1".into(),
            method,
        )
    }

    fn run(domain: &str, wildcard: bool, set: &[CaaRecord], method: ChallengeKind) -> Result<()> {
        let (ids, uri, method) = subject(method);
        evaluate(
            domain,
            wildcard,
            set,
            &CaaSubject {
                identities: &ids,
                account_uri: &uri,
                method,
            },
        )
    }

    #[test]
    fn no_records_or_a_matching_issuer_allow() {
        assert!(run("a.example.com", false, &[], ChallengeKind::Http01).is_ok());
        let set = [issue(Property::Issue, Some("letsencrypt.org"), &[])];
        assert!(run("a.example.com", false, &set, ChallengeKind::Http01).is_ok());
        let set = [issue(Property::Issue, Some("LetsEncrypt.org."), &[])];
        assert!(run("a.example.com", false, &set, ChallengeKind::Http01).is_ok());
    }

    #[test]
    fn another_issuer_forbids_with_the_record_named() {
        let set = [issue(Property::Issue, Some("pki.goog"), &[])];
        let err = run("a.example.com", false, &set, ChallengeKind::Http01)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("example.com. CAA 0 issue \"pki.goog\""),
            "{err}"
        );
        assert!(err.contains("a.example.com"), "{err}");
        assert!(!err.contains('\n'));
        let set = [issue(Property::Issue, None, &[])];
        assert!(run("a.example.com", false, &set, ChallengeKind::Http01).is_err());
    }

    #[test]
    fn issuewild_governs_wildcards_only() {
        let set = [
            issue(Property::Issue, Some("letsencrypt.org"), &[]),
            issue(Property::IssueWild, None, &[]),
        ];
        assert!(run("a.example.com", false, &set, ChallengeKind::Dns01).is_ok());
        let err = run("*.example.com", true, &set, ChallengeKind::Dns01).unwrap_err();
        assert!(err.to_string().contains("issuewild"), "{err}");
        // Without issuewild, issue governs wildcards too.
        let set = [issue(Property::Issue, Some("pki.goog"), &[])];
        assert!(run("*.example.com", true, &set, ChallengeKind::Dns01).is_err());
    }

    #[test]
    fn accounturi_and_validationmethods_restrict() {
        let set = [issue(
            Property::Issue,
            Some("letsencrypt.org"),
            &[("accounturi", "https://ca.test/acct/2")],
        )];
        let err = run("a.example.com", false, &set, ChallengeKind::Http01).unwrap_err();
        assert!(err.to_string().contains("accounturi"), "{err}");
        let set = [issue(
            Property::Issue,
            Some("letsencrypt.org"),
            &[
                ("accounturi", "https://ca.test/acct/1"),
                ("validationmethods", "dns-01,tls-alpn-01"),
            ],
        )];
        assert!(run("a.example.com", false, &set, ChallengeKind::Dns01).is_ok());
        let err = run("a.example.com", false, &set, ChallengeKind::Http01).unwrap_err();
        assert!(err.to_string().contains("validationmethods"), "{err}");
    }

    #[test]
    fn iodef_alone_and_unknown_identities_do_not_block() {
        let iodef = CaaRecord {
            owner: "example.com.".into(),
            critical: false,
            tag: Property::Iodef,
            value: Value::Unknown(Vec::new()),
            raw: "mailto:x@example.com".into(),
        };
        assert!(run("a.example.com", false, &[iodef], ChallengeKind::Http01).is_ok());
        let set = [issue(Property::Issue, Some("pki.goog"), &[])];
        let check = CaaSubject {
            identities: &[],
            account_uri: "u",
            method: ChallengeKind::Http01,
        };
        assert!(evaluate("a.example.com", false, &set, &check).is_ok());
    }
}
