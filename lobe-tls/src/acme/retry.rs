//! How calls to the CA are repeated: while it rejects nonces (`badNonce`), and while
//! an order is polled until it is ready or its deadline passes.

use std::time::Duration;

use instant_acme::RetryPolicy;
use tokio::time::Instant;

/// How many times one step is repeated when the CA keeps rejecting nonces, on top of
/// instant-acme's own three attempts. At a 50% rejection rate a step then fails once in
/// about 10^9 tries, instead of once in eight.
pub(super) const BAD_NONCE_RETRIES: u32 = 8;

/// Polls an order with an instant-acme poll call in two stages: soon and doubling
/// ([`fast_poll_policy`]), then steady ([`steady_poll_policy`]) until `deadline`. A CA's
/// `Retry-After` overrides either schedule (instant-acme honours it).
///
/// Two stages because one geometric schedule either starts slow or, doubling on, stops
/// polling long before the deadline: instant-acme ends a schedule once its next interval
/// would overshoot. A macro rather than a function taking an async closure, whose
/// future the compiler cannot yet prove `Send`.
macro_rules! poll_order {
    ($deadline:expr, |$policy:ident| $call:expr) => {{
        let deadline = $deadline;
        let $policy = $crate::acme::retry::fast_poll_policy(deadline);
        match $call {
            Err(instant_acme::Error::Timeout(None)) => {
                match $crate::acme::retry::steady_poll_policy(deadline) {
                    Some($policy) => $call,
                    None => Err(instant_acme::Error::Timeout(None)),
                }
            }
            outcome => outcome,
        }
    }};
}

/// Runs an instant-acme call again while it fails with `badNonce`. Each run signs a new
/// request with a fresh nonce; a rejected request changed nothing at the CA, so
/// repeating it is safe.
macro_rules! retry_bad_nonce {
    ($call:expr) => {{
        let mut attempt = 0;
        loop {
            match $call {
                Err(e)
                    if $crate::acme::retry::is_bad_nonce(&e)
                        && attempt < $crate::acme::retry::BAD_NONCE_RETRIES =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "badNonce from the CA; retrying");
                }
                outcome => break outcome,
            }
        }
    }};
}

pub(super) use poll_order;
pub(super) use retry_bad_nonce;

pub(super) fn is_bad_nonce(error: &instant_acme::Error) -> bool {
    matches!(error, instant_acme::Error::Api(problem)
        if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

/// The first poll of an order's state comes this soon: Pebble validates and issues within
/// a few milliseconds, and each poll is one small request.
const FIRST_POLL: Duration = Duration::from_millis(10);
/// Polls double their interval from [`FIRST_POLL`] for about this long (the last
/// one lands at 1.27 s)...
const FAST_POLLING: Duration = Duration::from_millis(2500);
/// ...and then come at this steady interval until the order's deadline, so a slow CA
/// sees one request every few seconds and polling never gives up before the deadline.
const STEADY_POLL: Duration = Duration::from_secs(2);

/// The first stage of polling: soon, then doubling.
pub(super) fn fast_poll_policy(deadline: Instant) -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(FIRST_POLL)
        .backoff(2.0)
        .timeout(FAST_POLLING.min(deadline.saturating_duration_since(Instant::now())))
}

/// The second stage of polling, if the deadline leaves room for one more poll.
pub(super) fn steady_poll_policy(deadline: Instant) -> Option<RetryPolicy> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    (remaining > STEADY_POLL).then(|| {
        RetryPolicy::new()
            .initial_delay(STEADY_POLL)
            .backoff(1.0)
            .timeout(remaining)
    })
}
