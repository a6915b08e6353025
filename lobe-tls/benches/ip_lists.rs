//! IP list lookup: a deny list of 100,000 random networks (IPv4 /24 to /32 and IPv6 /32
//! to /128), asked for addresses inside one of them (hit) and outside all (miss), as
//! each request does. Queries rotate over 1,024 addresses spread across the list, so the
//! table is not measured through one hot cache line.
//!
//! Run: `cargo bench -p lobe-tls --bench ip_lists`
// criterion's macros make undocumented public items; a failed unwrap is a failed bench.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use lobe_tls::edge::IpTable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NETWORKS: usize = 100_000;
const QUERIES: usize = 1_024;

fn random_net(rng: &mut StdRng) -> IpNet {
    if rng.random_ratio(9, 10) {
        let len = rng.random_range(24..=32);
        IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len)
                .unwrap()
                .trunc(),
        )
    } else {
        let len = rng.random_range(32..=128);
        IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from(rng.random::<u128>()), len)
                .unwrap()
                .trunc(),
        )
    }
}

/// An address inside `net`.
fn inside(net: &IpNet, rng: &mut StdRng) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let span = u32::from(n.broadcast()) - u32::from(n.network());
            IpAddr::from(Ipv4Addr::from(
                u32::from(n.network()) + rng.random_range(0..=span),
            ))
        }
        IpNet::V6(n) => {
            let span = u128::from(n.broadcast()) - u128::from(n.network());
            let offset = if span == u128::MAX {
                rng.random()
            } else {
                rng.random_range(0..=span)
            };
            IpAddr::from(Ipv6Addr::from(u128::from(n.network()) + offset))
        }
    }
}

fn lookups(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let nets: Vec<IpNet> = (0..NETWORKS).map(|_| random_net(&mut rng)).collect();
    let table = IpTable::new(&nets);
    let hits: Vec<IpAddr> = (0..QUERIES)
        .map(|i| inside(&nets[i * (NETWORKS / QUERIES)], &mut rng))
        .collect();
    let mut misses = Vec::with_capacity(QUERIES);
    while misses.len() < QUERIES {
        let ip = if misses.len() % 10 == 9 {
            IpAddr::from(Ipv6Addr::from(rng.random::<u128>()))
        } else {
            IpAddr::from(Ipv4Addr::from(rng.random::<u32>()))
        };
        if !table.contains(ip) {
            misses.push(ip);
        }
    }
    assert!(hits.iter().all(|ip| table.contains(*ip)));
    let mut group = c.benchmark_group("ip_lists_100k");
    for (name, queries) in [("hit", &hits), ("miss", &misses)] {
        let mut next = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                next = (next + 1) % QUERIES;
                black_box(table.contains(black_box(queries[next])))
            })
        });
    }
    group.finish();
    c.bench_function("ip_lists_build_100k", |b| {
        b.iter(|| black_box(IpTable::new(black_box(&nets))))
    });
}

criterion_group!(benches, lookups);
criterion_main!(benches);
