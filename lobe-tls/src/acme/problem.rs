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

pub(super) fn account_problem(problem: &instant_acme::Problem) -> Error {
    let kind = problem.r#type.as_deref().unwrap_or_default();
    if kind.ends_with("externalAccountRequired") {
        return Error::Acme(
            "the CA requires External Account Binding: pass --eab-kid and --eab-hmac-key".into(),
        );
    }
    if kind.ends_with("unauthorized") || kind.ends_with("malformed") {
        return Error::Acme(format!(
            "the CA refused to register the account: {}; check --eab-kid and --eab-hmac-key",
            problem_text(problem)
        ));
    }
    Error::Acme(format!(
        "the CA refused to register the account: {}",
        problem_text(problem)
    ))
}

/// Maps an instant-acme error to one line: the CA's problem detail, or the transport error.
/// A request that got no answer, or no connection, is [`Error::CaUnavailable`].
pub(super) fn acme_error(context: &str, error: instant_acme::Error) -> Error {
    match &error {
        instant_acme::Error::Api(problem) => Error::CaProblem {
            context: context.to_owned(),
            kind: problem.r#type.as_deref().map(|t| {
                t.trim_start_matches("urn:ietf:params:acme:error:")
                    .to_owned()
            }),
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
            Error::Timeout(format!("{context}: the CA did not answer in time"))
        }
        other if http::timed_out(other) => Error::CaUnavailable(format!(
            "timed out: {}; the CA or the network path to it is not answering",
            error_chain(other)
        )),
        instant_acme::Error::Other(_) | instant_acme::Error::Hyper(_) => {
            Error::CaUnavailable(format!("{context}: {}", error_chain(&error)))
        }
        other => Error::Acme(format!("{context}: {}", error_chain(other))),
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
