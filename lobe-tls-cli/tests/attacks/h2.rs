//! HTTP/2 attacks with crafted frames (attacks/h2_attack.py): rapid reset, CONTINUATION,
//! SETTINGS and PING floods, a reader that never opens its window.

use std::time::Duration;

use crate::support::{
    Measured, Serve, assert_legit_unharmed, exclusive, measure, p99_bound, run_python, script_args,
};

/// Runs `attack` with `rest` against `serve` within `limit`, prints its row as `row`, and
/// checks what every attack here must leave true: the legitimate client served
/// throughout, and serve's memory grown by less than `rss_mib` MiB.
async fn h2_attack(
    serve: &Serve,
    row: &str,
    attack: &str,
    rest: &[&str],
    limit: Duration,
    rss_mib: u64,
) -> Measured {
    let mut args = vec![attack.to_owned()];
    args.extend(script_args(serve, rest));
    let m = measure(serve, run_python("h2_attack.py", &args, limit)).await;
    m.print(row);
    assert_legit_unharmed(&m);
    assert!(
        m.rss_growth_kib() < rss_mib * 1024,
        "{row}: rss grew {} KiB",
        m.rss_growth_kib()
    );
    m
}

/// Checks that serve spent at most `share` of a core over `elapsed` seconds of attack:
/// the attacker pays more than serve does.
fn assert_cpu_within(m: &Measured, share: f64, elapsed: f64) {
    assert!(
        m.attack_cpu.as_secs_f64() <= share * elapsed,
        "serve spent {:?} of CPU over {elapsed:.1} s",
        m.attack_cpu
    );
}

fn int(m: &Measured, key: &str) -> u64 {
    m.result[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {}", m.result))
}

/// The attack's own time, in seconds, as the script reports it.
fn elapsed(m: &Measured) -> f64 {
    m.result["elapsed"].as_f64().unwrap_or(0.0)
}

/// Whether the attacker's connection was closed or sent away with GOAWAY.
fn sent_away(m: &Measured) -> bool {
    m.result["closed"] == true || !m.result["goaway"].is_null()
}

/// CVE-2023-44487: streams opened and reset at once, on one connection after another for
/// 6 s. Each connection is sent away (GOAWAY) after a bounded number of streams, serve
/// spends a bounded share of a core on it, and a legitimate client's p99 stays within 3x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_sent_away_and_spares_the_legitimate_client() {
    let _cpu = exclusive();
    let serve = Serve::start(&[]).await;
    let m = h2_attack(
        &serve,
        "rapid reset",
        "rapid-reset",
        &["--count", "300000", "--seconds", "6"],
        Duration::from_secs(30),
        32,
    )
    .await;
    let connections = int(&m, "connections");
    assert!(connections > 0, "{}", m.result);
    assert_eq!(
        int(&m, "goaways"),
        connections,
        "every connection gets GOAWAY: {}",
        m.result
    );
    // The server took at most 100 streams of a connection before its GOAWAY.
    assert!(int(&m, "max_last_stream_id") <= 201, "{}", m.result);
    // At most half a core for the attack's time.
    assert_cpu_within(&m, 0.5, elapsed(&m));
    assert!(
        m.during.p99 <= p99_bound(&m.before, 3),
        "legitimate p99 {:?} during, {:?} before",
        m.during.p99,
        m.before.p99
    );
}

/// HEADERS without END_HEADERS, then CONTINUATION frames of new headers without end: the
/// connection is closed once the header list passes its cap (16 KiB), and memory does
/// not grow with what the attacker sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_closed_at_the_header_cap() {
    let serve = Serve::start(&[]).await;
    let m = h2_attack(
        &serve,
        "continuation flood",
        "continuation",
        &["--count", "67108864", "--seconds", "10"],
        Duration::from_secs(30),
        8,
    )
    .await;
    assert!(sent_away(&m), "{}", m.result);
    // Sent before the close was seen: the 16 KiB cap plus what socket buffers hold.
    assert!(int(&m, "header_bytes_sent") <= 1 << 20, "{}", m.result);
}

/// 100,000 SETTINGS frames, then 100,000 PINGs, as fast as the attacker can write them:
/// each is acknowledged (RFC 9113 §6.5.3, §6.7) or the connection is closed; either way
/// memory stays flat, CPU bounded, and the legitimate client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_stay_bounded() {
    let _cpu = exclusive();
    let serve = Serve::start(&[]).await;
    for attack in ["settings", "ping"] {
        // Served throughout; the latency bound is the rapid reset's (a flooder that keeps
        // a core busy on 2 cores moves the p99 of anyone beside it).
        let m = h2_attack(
            &serve,
            &format!("{attack} flood"),
            attack,
            &["--count", "100000", "--seconds", "8"],
            Duration::from_secs(40),
            8,
        )
        .await;
        assert!(
            sent_away(&m) || m.result["served_after"] == true,
            "{}",
            m.result
        );
        assert_cpu_within(&m, 0.6, elapsed(&m).max(1.0));
    }
}

/// A client that asks for 100 large streamed responses with a zero flow-control window
/// and never reads: serve may keep the streams, but buffers a bounded amount for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_reader_holds_bounded_memory() {
    let serve = Serve::start(&[]).await;
    // 100 streams of ~1.1 MB each: holding them all would take 110 MB; 48 MiB at most.
    let m = h2_attack(
        &serve,
        "zero-window reader",
        "zero-window",
        &["--count", "100", "--seconds", "8"],
        Duration::from_secs(30),
        48,
    )
    .await;
    assert_eq!(int(&m, "streams"), 100, "{}", m.result);
}
