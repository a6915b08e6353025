//! What the CA's problem documents mean for lobe-tls: which side is at fault, a paused
//! account's unpause link, and one-line errors that keep their source.

use super::*;

pub(super) fn problem_text(problem: &instant_acme::Problem) -> String {
    let mut text = problem.detail.clone().unwrap_or_else(|| "no detail".into());
    if let Some(kind) = &problem.r#type {
        text.push_str(&format!(
            " ({})",
            kind.trim_start_matches("urn:ietf:params:acme:error:")
        ));
    }
    for sub in &problem.subproblems {
        text.push_str(&format!("; {sub}"));
    }
    text.replace('\n', " ")
}

/// A problem that is the CA's failure rather than the request's.
pub(super) fn ca_side(problem: &instant_acme::Problem) -> bool {
    problem.status.is_some_and(|s| s >= 500)
        || problem
            .r#type
            .as_deref()
            .is_some_and(|t| t.ends_with(":rateLimited") || t.ends_with(":serverInternal"))
}

/// The CA's refusal to register an account, with what to change. The caller has
/// checked that `error` is a problem document.
pub(super) fn account_problem(error: instant_acme::Error) -> Error {
    let instant_acme::Error::Api(problem) = &error else {
        return acme_error("the CA refused to register the account", error);
    };
    let kind = problem.r#type.as_deref().unwrap_or_default();
    let (context, message) = if kind.ends_with("externalAccountRequired") {
        (
            "the CA requires External Account Binding",
            "pass --eab-kid and --eab-hmac-key".to_owned(),
        )
    } else if kind.ends_with("unauthorized") || kind.ends_with("malformed") {
        (
            "the CA refused to register the account",
            format!(
                "{}; check --eab-kid and --eab-hmac-key",
                problem_text(problem)
            ),
        )
    } else {
        (
            "the CA refused to register the account",
            problem_text(problem),
        )
    };
    Error::CaProblem {
        context: context.to_owned(),
        kind: problem_kind(problem),
        message,
        source: Box::new(error),
        retry_after: None,
    }
}

/// The problem type without its `urn:ietf:params:acme:error:` prefix.
fn problem_kind(problem: &instant_acme::Problem) -> Option<String> {
    problem.r#type.as_deref().map(|t| {
        t.trim_start_matches("urn:ietf:params:acme:error:")
            .to_owned()
    })
}

/// Maps an instant-acme error to one line: the CA's problem detail, or the transport error.
/// A request that got no answer, or no connection, is [`Error::CaUnavailable`]; the
/// instant-acme error is kept as the source.
pub(super) fn acme_error(context: &str, error: instant_acme::Error) -> Error {
    match &error {
        instant_acme::Error::Api(problem) => Error::CaProblem {
            context: context.to_owned(),
            kind: problem_kind(problem),
            message: match unpause_url(problem) {
                Some(url) => paused_text(problem, &url),
                None if problem
                    .detail
                    .as_deref()
                    .is_some_and(|d| d.contains("deactivated")) =>
                {
                    format!(
                        "{}; the ACME account is deactivated: give another --email to register a new one",
                        problem_text(problem)
                    )
                }
                None => problem_text(problem),
            },
            source: Box::new(error),
            retry_after: None,
        },
        instant_acme::Error::Timeout(_) => {
            Error::timeout(format!("{context}: the CA did not answer in time"))
        }
        other if http::timed_out(other) => Error::ca_unavailable(format!(
            "timed out: {}; the CA or the network path to it is not answering",
            error_chain(other)
        ))
        .with_source(error),
        instant_acme::Error::Other(_) | instant_acme::Error::Hyper(_) => {
            Error::ca_unavailable(format!("{context}: {}", error_chain(&error))).with_source(error)
        }
        other => Error::acme(format!("{context}: {}", error_chain(other))).with_source(error),
    }
}

/// The self-service unpause URL of Let's Encrypt's refusal for a paused account and
/// name pair ("Your account is temporarily prevented from requesting certificates for
/// ... Please visit: https://portal.letsencrypt.org/sfe/v1/unpause?jwt=..."), whatever
/// problem type carries it.
pub(crate) fn unpause_url(problem: &instant_acme::Problem) -> Option<String> {
    let detail = problem.detail.as_deref()?;
    let start = detail.find("https://")?;
    let url: String = detail[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    let url = url.trim_end_matches(['.', ',', ';', ')']).to_owned();
    url.contains("/unpause").then_some(url)
}

pub(super) fn paused_text(problem: &instant_acme::Problem, url: &str) -> String {
    let detail = problem.detail.as_deref().unwrap_or_default();
    let what = detail
        .split("Please visit")
        .next()
        .unwrap_or_default()
        .trim()
        .trim_end_matches('.');
    format!(
        "issuance is paused after repeated failed validations ({what}); fix validation, then unpause at {url}"
    )
    .replace('\n', " ")
}

/// Joins an error and its sources into one line, skipping repeats.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn api_error(kind: &str, detail: &str) -> instant_acme::Error {
        let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
            "type": format!("urn:ietf:params:acme:error:{kind}"),
            "detail": detail,
            "status": 403,
        }))
        .unwrap();
        instant_acme::Error::Api(problem)
    }

    #[test]
    fn an_account_refusal_is_a_matchable_ca_problem_that_keeps_the_ca_answer() {
        let err = account_problem(api_error("externalAccountRequired", "EAB needed"));
        assert_eq!(
            err.to_string(),
            "the CA requires External Account Binding: pass --eab-kid and --eab-hmac-key"
        );
        assert_eq!(err.ca_problem(), Some("externalAccountRequired"));
        let source = err
            .source()
            .and_then(|s| s.downcast_ref::<instant_acme::Error>());
        assert!(
            matches!(source, Some(instant_acme::Error::Api(p)) if p.detail.as_deref() == Some("EAB needed")),
            "{err:?}"
        );

        let err = account_problem(api_error("unauthorized", "bad MAC"));
        assert_eq!(
            err.to_string(),
            "the CA refused to register the account: bad MAC (unauthorized); check --eab-kid and --eab-hmac-key"
        );
        assert_eq!(err.ca_problem(), Some("unauthorized"));
    }

    #[test]
    fn transport_failures_are_unavailable_and_keep_the_client_error() {
        let err = acme_error(
            "the CA refused the order",
            instant_acme::Error::Str("connection reset"),
        );
        assert!(matches!(err, Error::Acme { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the CA refused the order: missing data: connection reset"
        );
        assert!(
            err.source()
                .is_some_and(|s| s.downcast_ref::<instant_acme::Error>().is_some()),
            "{err:?}"
        );
    }
}
