//! Keel's token bucket and GCRA checks beside governor's GCRA, in the same run.
//!
//! Scenarios: `allowed` (every check admits: the clock advances one emission interval per
//! check) and `denied` (the bucket is empty and the clock stands still). Rate: 1000 per second,
//! bursts of 10.
//!
//! What one check does on each side (both compiled with the workspace's release profile, the
//! same opt-level for Keel, governor and this harness):
//!
//! - governor (`governor_gcra`): `RateLimiter::check` on a direct limiter with its
//!   `FakeRelativeClock`: one atomic load of the clock, then its GCRA test-and-update of the
//!   state, one `AtomicU64` load and one (uncontended) compare-and-swap. It returns `Ok` or the
//!   earliest instant to retry; it computes no remaining quota and no reset time.
//! - Keel (`keel_token_bucket`, `keel_gcra`): [`Limiter::decide`] on the key's state bytes kept
//!   in a fixed buffer (as the filter receives them from shared data): decodes the state,
//!   decides, computes what the response headers need (`remaining`, `reset`, or the exact
//!   `retry_after` of a refusal) and encodes the new state into a fixed [`StateBytes`] buffer.
//!   No atomics: in the filter, exactness across workers comes from the host's compare-and-swap
//!   of those bytes, which is the host's cost, not the algorithm's.
//! - `keel_*_vec` (allowed only): [`Limiter::acquire`], the same check returning the new state
//!   as a `Vec`: what one heap allocation per decision costs.
//!
//! What each loop keeps: governor's result goes to `black_box` (a bool, as its `check()` is
//! used); Keel's decision goes to `black_box` by reference, so that it is computed and stored
//! in full without the loop copying the 24-byte value once more (that copy, reading back what
//! the call has just written, costs a store-forwarding stall of the bench loop, not of the
//! check).
//!
//! The clock: each side's loop advances its own clock by one interval per check in the allowed
//! scenario (governor: `FakeRelativeClock::advance`, an atomic add; Keel: adding to the `now`
//! it passes in). Governor's quanta clock would add a hardware clock read that Keel never does
//! (the host passes `now` in).

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::hint::black_box;
    use std::num::NonZeroU32;

    use criterion::{criterion_group, Criterion};
    use governor::clock::FakeRelativeClock;
    use governor::{Quota, RateLimiter};
    use keel_core::config::Rate;
    use keel_core::rate_limit::{Algorithm, Limiter, StateBytes};
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

    /// A key's state after its first request at `now`.
    fn first(limiter: &Limiter, now: u64) -> Option<StateBytes> {
        limiter
            .decide(None, Instant::from_nanos(now), 1, Duration::ZERO)
            .0
    }

    fn allowed(c: &mut Criterion) {
        let mut group = c.benchmark_group("allowed");
        for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra] {
            let limiter = keel(algorithm);
            let mut now = 1_000_000_000_000u64;
            let Some(mut state) = first(&limiter, now) else {
                return;
            };
            group.bench_function(format!("keel_{algorithm}"), |b| {
                b.iter(|| {
                    now += INTERVAL_NS;
                    let (next, decision) =
                        limiter.decide(Some(&state), Instant::from_nanos(now), 1, Duration::ZERO);
                    if let Some(next) = next {
                        state = next;
                    }
                    debug_assert!(decision.is_admitted());
                    black_box(&decision);
                })
            });
        }
        for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra] {
            let limiter = keel(algorithm);
            let mut now = 1_000_000_000_000u64;
            let mut state = limiter
                .acquire(None, Instant::from_nanos(now), 1, Duration::ZERO)
                .0
                .unwrap_or_default();
            group.bench_function(format!("keel_{algorithm}_vec"), |b| {
                b.iter(|| {
                    now += INTERVAL_NS;
                    let (next, decision) =
                        limiter.acquire(Some(&state), Instant::from_nanos(now), 1, Duration::ZERO);
                    if let Some(next) = next {
                        state = next;
                    }
                    debug_assert!(decision.is_admitted());
                    black_box(&decision);
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
            let mut state: Option<StateBytes> = None;
            for _ in 0..BURST {
                state = limiter.decide(state.as_deref(), now, 1, Duration::ZERO).0;
            }
            let Some(state) = state else {
                return;
            };
            let (_, decision) = limiter.decide(Some(&state), now, 1, Duration::ZERO);
            assert!(!decision.is_admitted(), "the denied scenario must deny");
            group.bench_function(format!("keel_{algorithm}"), |b| {
                b.iter(|| {
                    let (next, decision) = limiter.decide(Some(&state), now, 1, Duration::ZERO);
                    debug_assert!(next.is_none());
                    black_box(&decision);
                })
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
