//! Keel's token bucket and GCRA checks beside governor's GCRA, in the same run.
//!
//! Scenarios: `allowed` (every check admits: the clock advances one emission interval per
//! check) and `denied` (the bucket is empty and the clock stands still). Rate: 1000 per second,
//! bursts of 10.
//!
//! Clock choice: governor runs on its `FakeRelativeClock`, advanced by hand exactly like the
//! instant handed to Keel, so both sides measure the pure check (governor: one atomic load of
//! the clock and one compare-and-swap of its `AtomicU64` state; Keel: decoding the state bytes,
//! deciding and encoding the new state into a `Vec`, which is what the filter writes to shared
//! data). Governor's quanta clock would add a hardware clock read that Keel never does (the
//! host passes `now` in).

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::hint::black_box;
    use std::num::NonZeroU32;

    use criterion::{criterion_group, Criterion};
    use governor::clock::FakeRelativeClock;
    use governor::{Quota, RateLimiter};
    use keel_core::config::Rate;
    use keel_core::limit::{Algorithm, Limiter};
    use keel_core::time::{Duration, Instant};

    const REQUESTS: u32 = 1000;
    const BURST: u32 = 10;
    const INTERVAL_NS: u64 = 1_000_000;

    fn keel(algorithm: Algorithm) -> Limiter {
        Limiter::new(
            algorithm,
            Rate {
                requests: u64::from(REQUESTS),
                period: Duration::from_secs(1),
                burst: u64::from(BURST),
            },
        )
    }

    fn quota() -> Quota {
        let per_second = NonZeroU32::new(REQUESTS).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(BURST).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(per_second).allow_burst(burst)
    }

    fn allowed(c: &mut Criterion) {
        let mut group = c.benchmark_group("allowed");
        for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra] {
            let limiter = keel(algorithm);
            let mut now = 1_000_000_000_000u64;
            let mut state = limiter
                .acquire(None, Instant::from_nanos(now), 1, Duration::ZERO)
                .0
                .unwrap_or_default();
            group.bench_function(format!("keel_{algorithm}"), |b| {
                b.iter(|| {
                    now += INTERVAL_NS;
                    let (next, decision) =
                        limiter.acquire(Some(&state), Instant::from_nanos(now), 1, Duration::ZERO);
                    if let Some(next) = next {
                        state = next;
                    }
                    debug_assert!(decision.is_admitted());
                    black_box(decision)
                })
            });
        }
        let clock = FakeRelativeClock::default();
        let governor = RateLimiter::direct_with_clock(quota(), clock.clone());
        let step = std::time::Duration::from_nanos(INTERVAL_NS);
        group.bench_function("governor_gcra", |b| {
            b.iter(|| {
                clock.advance(step);
                black_box(governor.check().is_ok())
            })
        });
        group.finish();
    }

    fn denied(c: &mut Criterion) {
        let mut group = c.benchmark_group("denied");
        for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra] {
            let limiter = keel(algorithm);
            let now = Instant::from_nanos(1_000_000_000_000);
            let mut state: Option<Vec<u8>> = None;
            for _ in 0..BURST {
                state = limiter.acquire(state.as_deref(), now, 1, Duration::ZERO).0;
            }
            let state = state.unwrap_or_default();
            let (_, decision) = limiter.acquire(Some(&state), now, 1, Duration::ZERO);
            assert!(!decision.is_admitted(), "the denied scenario must deny");
            group.bench_function(format!("keel_{algorithm}"), |b| {
                b.iter(|| black_box(limiter.acquire(Some(&state), now, 1, Duration::ZERO)))
            });
        }
        let clock = FakeRelativeClock::default();
        let governor = RateLimiter::direct_with_clock(quota(), clock);
        for _ in 0..BURST {
            let _ = governor.check();
        }
        assert!(governor.check().is_err(), "the denied scenario must deny");
        group.bench_function("governor_gcra", |b| {
            b.iter(|| black_box(governor.check().is_err()))
        });
        group.finish();
    }

    criterion_group!(benches, allowed, denied);
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(bench::benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
