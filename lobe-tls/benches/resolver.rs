//! Resolver lookup with 1, 1,000 and 100,000 certificates, exact and wildcard names, side
//! by side with rustls's `ResolvesServerCertUsingSni`.
//!
//! Both resolvers are asked through `ResolvesServerCert::resolve` with the same real
//! `ClientHello`s: each one is produced by a rustls client, parsed by rustls's `Acceptor`,
//! and kept, so an iteration measures the resolve call and nothing of the handshake.
//! Queries rotate over 1,024 names spread across the whole set, so a large map is not
//! measured through one hot cache line.
//!
//! `resolver_swap` measures the writer's side: one `CertResolver::set` as the number of
//! names served grows.
//!
//! Run: `cargo bench -p lobe-tls --bench resolver`
// criterion's macros make undocumented public items; a failed unwrap is a failed bench.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lobe_tls::{CertBundle, CertResolver, KeyType};
use rustls::server::{Accepted, Acceptor, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;

const COUNTS: [usize; 3] = [1, 1_000, 100_000];
const QUERIES: usize = 1_024;

/// One certificate for `*.example.com` (so rustls's resolver accepts it for every
/// `host-N.example.com`) and one for `*.wN.example.com` style names.
fn wildcard_key(name: &str) -> CertifiedKey {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let bundle = CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap();
    Arc::unwrap_or_clone(bundle.certified_key().unwrap())
}

/// A real ClientHello for `name`, parsed by rustls.
fn accepted_hello(name: &str) -> Accepted {
    let provider = lobe_tls::cert::crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut client = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(name.to_owned()).unwrap(),
    )
    .unwrap();
    let mut bytes = Vec::new();
    client.write_tls(&mut bytes).unwrap();
    let mut acceptor = Acceptor::default();
    acceptor.read_tls(&mut &bytes[..]).unwrap();
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted,
        _ => panic!("the ClientHello did not parse"),
    }
}

/// `QUERIES` indexes spread over `0..count`.
fn spread(count: usize) -> Vec<usize> {
    (0..QUERIES).map(|i| i * count / QUERIES).collect()
}

fn lookups(c: &mut Criterion) {
    let exact_key = wildcard_key("*.example.com");
    let shared = Arc::new(exact_key.clone());
    let mut group = c.benchmark_group("resolver_exact");
    for count in COUNTS {
        let names: Vec<String> = (0..count)
            .map(|i| format!("host-{i}.example.com"))
            .collect();
        let ours = CertResolver::new();
        ours.set(&names, shared.clone());
        let mut theirs = ResolvesServerCertUsingSni::new();
        for name in &names {
            theirs.add(name, exact_key.clone()).unwrap();
        }
        let hellos: Vec<Accepted> = spread(count)
            .into_iter()
            .map(|i| accepted_hello(&names[i]))
            .collect();
        let query_names: Vec<&str> = spread(count)
            .into_iter()
            .map(|i| names[i].as_str())
            .collect();

        let mut i = 0;
        group.bench_function(BenchmarkId::new("rustls_sni_resolve", count), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(theirs.resolve(hellos[i].client_hello()))
            })
        });
        let mut i = 0;
        group.bench_function(BenchmarkId::new("lobe_tls_resolve", count), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(ours.resolve(hellos[i].client_hello()))
            })
        });
        let mut i = 0;
        group.bench_function(BenchmarkId::new("lobe_tls_lookup", count), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(ours.lookup(Some(black_box(query_names[i]))))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("resolver_wildcard");
    let wild = Arc::new(wildcard_key("*.w0.example.com"));
    for count in COUNTS {
        let patterns: Vec<String> = (0..count).map(|i| format!("*.w{i}.example.com")).collect();
        let ours = CertResolver::new();
        ours.set(&patterns, wild.clone());
        let hellos: Vec<Accepted> = spread(count)
            .into_iter()
            .map(|i| accepted_hello(&format!("app.w{i}.example.com")))
            .collect();
        let mut i = 0;
        group.bench_function(BenchmarkId::new("lobe_tls_resolve", count), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                black_box(ours.resolve(hellos[i].client_hello()))
            })
        });
    }
    group.finish();
}

/// What one certificate swap costs the writer (the copy of the snapshot, the swap, and
/// dropping the old snapshot), as the number of names served grows.
fn swaps(c: &mut Criterion) {
    let keys = [
        Arc::new(wildcard_key("*.example.com")),
        Arc::new(wildcard_key("*.example.com")),
    ];
    let mut group = c.benchmark_group("resolver_swap");
    for count in COUNTS {
        let names: Vec<String> = (0..count)
            .map(|i| format!("host-{i}.example.com"))
            .collect();
        let ours = CertResolver::new();
        ours.set(&names, keys[0].clone());
        let mut i = 0;
        group.bench_function(BenchmarkId::new("lobe_tls_set", count), |b| {
            b.iter(|| {
                i += 1;
                ours.set(&[names[i % count].as_str()], keys[i % 2].clone());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups, swaps);
criterion_main!(benches);
