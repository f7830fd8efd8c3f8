//! The circuit breaker's hot path on a closed breaker, decode and encode included: what one
//! request costs a worker besides the shared-data calls themselves.
//!
//! - `admit/closed`: the decision on a closed breaker (`Allow`, nothing to write).
//! - `record/closed`: decode the state, count a success, check both thresholds, encode.
//! - `admit+record/closed`: one request end to end, the clock moving 1 ms per request so that
//!   buckets rotate as in production, 5 % failures (never enough to trip).
//! - `classify`: status and latency to outcome.
//!
//! Each with the default 10 buckets and with the maximum 60, to show what the window's size
//! costs (the state is `92 + 12 × buckets` bytes).

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::hint::black_box;

    use criterion::{criterion_group, Criterion};
    use keel_core::circuit_breaker::{Admission, BreakerPolicy, Breakers, Outcome, Response};
    use keel_core::time::{Duration, Instant};

    fn policy(buckets: u32) -> Option<BreakerPolicy> {
        let json = format!(
            r#"{{"breakers": [{{"name": "orders", "window": "60s", "buckets": {buckets},
                "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3,
                "slow_call": {{"duration": "1s", "rate": 0.8}}}}]}}"#
        );
        let breakers = keel_core::config::load::<Breakers>(json.as_bytes()).ok()?;
        breakers.policies().first().cloned()
    }

    /// One failure in twenty: far below the 50 % threshold.
    fn outcome(i: u32) -> Outcome {
        match i % 20 {
            0 => Outcome::Failure,
            _ => Outcome::Success,
        }
    }

    /// A closed breaker whose window holds 600 outcomes.
    fn warm_state(p: &BreakerPolicy, now: &mut Instant) -> Vec<u8> {
        let mut state: Option<Vec<u8>> = None;
        for i in 0..600u32 {
            *now = now.saturating_add(Duration::from_millis(100));
            let (new, t) = p.record(state.as_deref(), *now, outcome(i), None);
            assert!(t.is_none(), "the bench breaker must stay closed");
            state = new.or(state);
        }
        state.unwrap_or_default()
    }

    fn closed(c: &mut Criterion) {
        for buckets in [10, 60] {
            let Some(p) = policy(buckets) else {
                eprintln!("breaker bench: the policy did not validate");
                return;
            };
            let mut now = Instant::from_nanos(1_700_000_000_000_000_000);
            let state = warm_state(&p, &mut now);

            c.bench_function(&format!("admit/closed/{buckets}"), |b| {
                b.iter(|| {
                    let (new, d) = p.admit(black_box(Some(&state)), black_box(now));
                    debug_assert!(new.is_none() && d.admission == Admission::Allow);
                    black_box((new, d))
                })
            });

            c.bench_function(&format!("record/closed/{buckets}"), |b| {
                b.iter(|| {
                    black_box(p.record(
                        black_box(Some(&state)),
                        black_box(now),
                        Outcome::Success,
                        None,
                    ))
                })
            });

            c.bench_function(&format!("admit+record/closed/{buckets}"), |b| {
                let mut state = state.clone();
                let mut t = now;
                let mut i = 0u32;
                b.iter(|| {
                    t = t.saturating_add(Duration::from_millis(1));
                    i = i.wrapping_add(1);
                    let (new, d) = p.admit(Some(&state), t);
                    if let Some(new) = new {
                        state = new;
                    }
                    let (new, tr) = p.record(Some(&state), t, outcome(i), None);
                    if let Some(new) = new {
                        state = new;
                    }
                    black_box((d, tr))
                })
            });
        }
    }

    fn classify(c: &mut Criterion) {
        let Some(p) = policy(10) else {
            return;
        };
        c.bench_function("classify", |b| {
            b.iter(|| {
                black_box(p.failure().classify(
                    black_box(Response::Status(503)),
                    black_box(Duration::from_millis(40)),
                ))
            })
        });
    }

    criterion_group!(benches, closed, classify);
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(bench::benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
