//! Slowloris (attacks/slow_attack.py): 50 connections each trickling one byte a second
//! of a request head, of a request body, or of a TLS ClientHello. Each is cut within its
//! timeout, and a legitimate client beside them is served throughout. These rows mostly
//! wait, so they run beside the others.

use std::time::Duration;

use crate::support::{Measured, Serve, assert_legit_unharmed, measure, run_python, script_args};

async fn slowloris(serve: &Serve, attack: &str, seconds: u32) -> Measured {
    let mut args = vec![attack.to_owned()];
    let seconds = seconds.to_string();
    args.extend(script_args(
        serve,
        &["--conns", "50", "--gap", "1", "--seconds", &seconds],
    ));
    let limit = Duration::from_secs(60);
    let m = measure(serve, run_python("slow_attack.py", &args, limit)).await;
    m.print(&format!("slowloris {attack}"));
    m
}

/// Every connection was cut, the last within `within` of its opening. Most must have
/// opened (a loaded machine may time a few handshakes out), or the attack tested nothing.
fn assert_all_cut(m: &Measured, within: Duration) {
    assert_eq!(m.result["held"], 0, "connections still open: {}", m.result);
    let cut = m.result["cut"].as_u64().unwrap_or(0);
    assert!(
        cut >= 40,
        "only {cut} of 50 connections opened: {}",
        m.result
    );
    let last = m.result["last_cut"].as_f64().unwrap_or(f64::MAX);
    assert!(
        last <= within.as_secs_f64(),
        "last connection cut after {last:.1} s: {}",
        m.result
    );
}

/// A request head a byte a second: cut by the header read timeout (10 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_head_is_cut_at_the_header_timeout() {
    let serve = Serve::start(&[]).await;
    let m = slowloris(&serve, "slow-headers", 25).await;
    assert_all_cut(&m, Duration::from_secs(13));
    assert_legit_unharmed(&m);
}

/// A ClientHello a byte a second: cut by the handshake timeout (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshake_is_cut_at_the_handshake_timeout() {
    let serve = Serve::start(&[]).await;
    let m = slowloris(&serve, "slow-handshake", 25).await;
    assert_all_cut(&m, Duration::from_secs(13));
    assert_legit_unharmed(&m);
}

/// A full head announcing 1 MB, then its body a byte a second: each byte resets an idle
/// timer, so only a bound on the body's pace cuts it. Cut within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_body_is_cut() {
    let serve = Serve::start(&[]).await;
    let m = slowloris(&serve, "slow-body", 35).await;
    assert_all_cut(&m, Duration::from_secs(30));
    assert_legit_unharmed(&m);
}
