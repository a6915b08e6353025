//! Handshake rate while certificates swap continuously, against the same resolver left
//! alone.
//!
//! Full TLS 1.3 handshakes (no resumption) run in memory between a rustls client that
//! verifies the chain and a rustls server using `CertResolver`, which holds 1,000
//! certificates. In the swapping rounds a second thread replaces the handshake name's
//! certificate 1,000 times, evenly spread over the round, alternating between two valid
//! certificates; every handshake must complete and verify. Rounds rotate static, ticking
//! (a thread on the same schedule that only looks the name up, to separate the cost of
//! a second waking thread from the cost of swapping) and swapping; the medians of their
//! rates and of the per-round ratios are printed.
//!
//! Run: `cargo bench -p lobe-tls --bench handshakes` (`BENCH_ROUNDS=N` for N rounds of
//! each kind instead of 15)
// A failed unwrap is a failed bench.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lobe_tls::{CertBundle, CertResolver, KeyType};
use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

const NAME: &str = "bench.example.com";
const FILLER: usize = 999;
const SWAPS: usize = 1_000;
/// Rounds of each kind; `BENCH_ROUNDS` overrides it for steadier medians.
const ROUNDS: usize = 15;
const HANDSHAKES_PER_ROUND: usize = 1_500;

struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    roots: RootCertStore,
}

fn pki() -> Pki {
    let ca_key = KeyType::EcdsaP256.generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    Pki {
        issuer: rcgen::Issuer::new(params, ca_key),
        roots,
    }
}

fn leaf(pki: &Pki, name: &str) -> Arc<CertifiedKey> {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &pki.issuer)
        .unwrap();
    CertBundle::from_pem(cert.pem(), key.serialize_pem())
        .unwrap()
        .certified_key()
        .unwrap()
}

/// One full handshake in memory. Returns whether it completed with a verified chain.
fn handshake(client_config: &Arc<ClientConfig>, server_config: &Arc<ServerConfig>) -> bool {
    let name = ServerName::try_from(NAME).unwrap();
    let mut client = ClientConnection::new(client_config.clone(), name).unwrap();
    let mut server = ServerConnection::new(server_config.clone()).unwrap();
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return client.peer_certificates().is_some();
        }
        buf.clear();
        if client.write_tls(&mut buf).is_err() {
            return false;
        }
        if server.read_tls(&mut &buf[..]).is_err() || server.process_new_packets().is_err() {
            return false;
        }
        buf.clear();
        if server.write_tls(&mut buf).is_err() {
            return false;
        }
        if client.read_tls(&mut &buf[..]).is_err() || client.process_new_packets().is_err() {
            return false;
        }
    }
    false
}

struct Round {
    rate: f64,
    failed: usize,
    swaps: usize,
}

/// What runs beside the handshakes during a round.
#[derive(Clone, Copy)]
enum Beside {
    /// Nothing: the static configuration.
    Nothing,
    /// A thread that wakes on the swap schedule and only looks the name up: the cost of
    /// a second busy thread on the same cores, without any swap.
    Ticker,
    /// A thread that swaps the certificate on that schedule.
    Swapper,
}

fn run_round(
    client_config: &Arc<ClientConfig>,
    server_config: &Arc<ServerConfig>,
    resolver: &CertResolver,
    keys: &[Arc<CertifiedKey>; 2],
    beside: Beside,
    swap_every: Duration,
) -> Round {
    let stop = Arc::new(AtomicBool::new(false));
    let helper = match beside {
        Beside::Nothing => None,
        Beside::Ticker | Beside::Swapper => {
            let resolver = resolver.clone();
            let stop = stop.clone();
            let keys = keys.clone();
            Some(std::thread::spawn(move || {
                let started = Instant::now();
                let mut ticks = 0;
                while ticks < SWAPS && !stop.load(Ordering::Relaxed) {
                    match beside {
                        Beside::Swapper => resolver.set(&[NAME], keys[ticks % 2].clone()),
                        _ => assert!(resolver.lookup(Some(NAME)).is_some()),
                    }
                    ticks += 1;
                    // Evenly spread, without drifting.
                    let next = started + swap_every * ticks as u32;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                ticks
            }))
        }
    };
    let started = Instant::now();
    let mut done = 0;
    let mut failed = 0;
    while done < HANDSHAKES_PER_ROUND {
        if !handshake(client_config, server_config) {
            failed += 1;
        }
        done += 1;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let ticks = helper.map(|t| t.join().unwrap()).unwrap_or(0);
    Round {
        rate: done as f64 / elapsed.as_secs_f64(),
        failed,
        swaps: if matches!(beside, Beside::Swapper) {
            ticks
        } else {
            0
        },
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and `cargo test --benches` probe harness-less benches.
        return;
    }
    let pki = pki();
    let resolver = CertResolver::new();
    let filler = leaf(&pki, "filler.example.com");
    let names: Vec<String> = (0..FILLER)
        .map(|i| format!("site-{i}.example.com"))
        .collect();
    resolver.set(&names, filler);
    let keys = [leaf(&pki, NAME), leaf(&pki, NAME)];
    resolver.set(&[NAME], keys[0].clone());

    let provider = lobe_tls::cert::crypto_provider();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver.clone()));
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let server = Arc::new(server);
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    client.resumption = Resumption::disabled();
    let client = Arc::new(client);

    // Warm up and size the swap interval so 1,000 swaps span a round.
    let warm = run_round(
        &client,
        &server,
        &resolver,
        &keys,
        Beside::Nothing,
        Duration::ZERO,
    );
    let round_time = Duration::from_secs_f64(HANDSHAKES_PER_ROUND as f64 / warm.rate);
    let swap_every = round_time / SWAPS as u32;

    let mut static_rates = Vec::new();
    let mut ticking_rates = Vec::new();
    let mut swapping_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut ticking_ratios = Vec::new();
    let mut failed = warm.failed;
    let mut swaps = 0;
    let mut handshakes = HANDSHAKES_PER_ROUND;
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let run = |beside| run_round(&client, &server, &resolver, &keys, beside, swap_every);
        let still = run(Beside::Nothing);
        let ticking = run(Beside::Ticker);
        let swapping = run(Beside::Swapper);
        let round_failed = still.failed + ticking.failed + swapping.failed;
        println!(
            "round {round}: static {:.0}/s, ticking {:.0}/s, swapping {:.0}/s \
             ({} swaps, {round_failed} failed)",
            still.rate, ticking.rate, swapping.rate, swapping.swaps,
        );
        failed += round_failed;
        swaps += swapping.swaps;
        handshakes += 3 * HANDSHAKES_PER_ROUND;
        ratios.push(swapping.rate / still.rate);
        ticking_ratios.push(swapping.rate / ticking.rate);
        static_rates.push(still.rate);
        ticking_rates.push(ticking.rate);
        swapping_rates.push(swapping.rate);
    }
    println!(
        "handshakes: static median {:.0}/s, ticking median {:.0}/s, swapping median {:.0}/s; \
         median ratio swapping/static {:.3}, swapping/ticking {:.3}; \
         {swaps} swaps, {handshakes} handshakes, {failed} failed",
        median(static_rates),
        median(ticking_rates),
        median(swapping_rates),
        median(ratios),
        median(ticking_ratios),
    );
    assert_eq!(failed, 0, "a handshake failed");
}
