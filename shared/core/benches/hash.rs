//! Lookup and build times of Keel's ring and Maglev table beside the `hashring` crate.
//!
//! `hashring` (crates.io, jeromefroe/hashring-rs) is the most used plain consistent-hash ring in
//! Rust: a sorted vector of `(u64, node)` with binary search and SipHash, no virtual nodes of its
//! own. It is given the same points as Keel's ring (512 virtual nodes `(address, i)` per
//! endpoint), so the lookup comparison is ring against ring, hash included on both sides
//! (Keel: xxHash64 then search; hashring: SipHash then search). Maglev has no well-kept crate
//! (`maglev` 0.2 is from 2019 and builds `skeptic` at compile time), so Keel's table is measured
//! against the two rings instead.
//!
//! Run: `cargo bench -p keel-core --bench hash -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hashring::HashRing;
use keel_core::picker::ring::DEFAULT_POINTS_PER_WEIGHT;
use keel_core::picker::{
    hash_key, Algorithm, Endpoint, MaglevTable, Picker, PickerOptions, Ring, RingParams, TableSize,
};

const SIZES: [usize; 3] = [10, 100, 1000];

fn addresses(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8080", i / 62_500, (i / 250) % 250, i % 250 + 1))
        .collect()
}

fn keys() -> Vec<String> {
    (0..1024).map(|i| format!("user-{i}")).collect()
}

/// A virtual node of the reference ring: the endpoint's address and its point number.
#[derive(Hash, Clone, Copy, Debug, PartialEq)]
struct VNode<'a> {
    address: &'a str,
    point: u32,
}

fn reference_ring(addrs: &[String]) -> HashRing<VNode<'_>> {
    let mut ring = HashRing::new();
    ring.batch_add(
        addrs
            .iter()
            .flat_map(|a| {
                (0..DEFAULT_POINTS_PER_WEIGHT).map(move |point| VNode { address: a, point })
            })
            .collect(),
    );
    ring
}

fn members(addrs: &[String]) -> Vec<(&str, u32)> {
    addrs.iter().map(|a| (a.as_str(), 1)).collect()
}

fn lookup(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("lookup");
    for n in SIZES {
        let addrs = addresses(n);
        let ring = Ring::build(&members(&addrs), RingParams::default());
        let table = MaglevTable::build(&members(&addrs), TableSize::default());
        let reference = reference_ring(&addrs);
        let endpoints: Vec<Endpoint> = addrs.iter().map(|a| Endpoint::new(a.clone())).collect();
        let picker = Picker::new(
            Algorithm::Maglev(TableSize::default()),
            PickerOptions::default(),
            &endpoints,
        );
        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 1023;
            keys[i].as_bytes()
        };
        group.bench_function(BenchmarkId::new("keel_ring", n), |b| {
            b.iter(|| ring.lookup(hash_key(black_box(next()))))
        });
        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 1023;
            keys[i].as_bytes()
        };
        group.bench_function(BenchmarkId::new("keel_maglev", n), |b| {
            b.iter(|| table.lookup(hash_key(black_box(next()))))
        });
        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 1023;
            keys[i].as_bytes()
        };
        group.bench_function(BenchmarkId::new("keel_picker_maglev", n), |b| {
            b.iter(|| picker.pick_hash(hash_key(black_box(next())), &[]))
        });
        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 1023;
            keys[i].as_bytes()
        };
        group.bench_function(BenchmarkId::new("hashring", n), |b| {
            b.iter(|| reference.get(&black_box(next())).map(|v| v.point))
        });
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    for n in SIZES {
        let addrs = addresses(n);
        let m = members(&addrs);
        group.bench_function(BenchmarkId::new("keel_ring", n), |b| {
            b.iter(|| Ring::build(black_box(&m), RingParams::default()).len())
        });
        group.bench_function(BenchmarkId::new("keel_maglev", n), |b| {
            b.iter(|| MaglevTable::build(black_box(&m), TableSize::default()).len())
        });
        group.bench_function(BenchmarkId::new("hashring", n), |b| {
            b.iter(|| reference_ring(black_box(&addrs)).len())
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
