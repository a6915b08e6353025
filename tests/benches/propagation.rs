//! DNS-01 propagation check against a local Knot, through the rfc2136 provider.
//!
//! Two figures, each over many rounds:
//! - `present→validated`: write the record (signed UPDATE) and run the default check
//!   (SOA walk and NS look-up through unbound, then every authoritative server asked
//!   directly) until it passes;
//! - `visible→validated`: the check is already polling when the record appears after a
//!   delay; the figure is the time from the UPDATE's answer to the check passing. The
//!   target is at most 1 s.
//!
//! Run: `cargo bench -p lobe-tls-tests --bench propagation` (needs knotd, unbound, root).

use std::time::{Duration, Instant};

use lobe_tls::challenge::dns01::{DnsProvider, PropagationCheck, RecursiveResolvers};
use lobe_tls_tests::dns::{DnsTestbed, ZONE};

const ROUNDS: usize = 30;

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    let max = samples[samples.len() - 1];
    println!(
        "{label:<34} n={:<3} median {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms",
        samples.len(),
        ms(median),
        ms(p90),
        ms(max)
    );
}

#[tokio::main]
async fn main() {
    let dns = DnsTestbed::start();
    let provider = dns.rfc2136_provider();
    let resolvers = RecursiveResolvers::new(vec![dns.resolver_addr]).expect("resolvers");
    let check = PropagationCheck::authoritative(resolvers, Duration::from_secs(10));

    let mut present_to_valid = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("_acme-challenge.bench{round}.{ZONE}.");
        let started = Instant::now();
        provider.present(&name, "bench").await.expect("present");
        check.wait_for(&name, "bench").await.expect("visible");
        present_to_valid.push(started.elapsed());
        provider.cleanup(&name, "bench").await.expect("cleanup");
    }
    summary("present→validated", present_to_valid);

    // The record appears while the check polls; delays spread over the back-off steps.
    for (label, interval) in [
        ("visible→validated (interval 1 s)", Duration::from_secs(1)),
        (
            "visible→validated (interval 0.25 s)",
            Duration::from_millis(250),
        ),
    ] {
        let check = check.clone().with_interval(interval);
        let mut lags = Vec::new();
        for round in 0..ROUNDS {
            let name = format!("_acme-challenge.late{round}.{ZONE}.");
            // 50 ms to 3 s: early (fast polls) and late (steady interval) appearances.
            let delay = Duration::from_millis(50 + (round as u64 * 199) % 2950);
            let waiter = {
                let (check, name) = (check.clone(), name.clone());
                tokio::spawn(async move {
                    check.wait_for(&name, "late").await.expect("visible");
                    Instant::now()
                })
            };
            tokio::time::sleep(delay).await;
            provider.present(&name, "late").await.expect("present");
            let visible = Instant::now();
            let validated = waiter.await.expect("task");
            lags.push(validated.saturating_duration_since(visible));
            provider.cleanup(&name, "late").await.expect("cleanup");
        }
        summary(label, lags);
    }
}
