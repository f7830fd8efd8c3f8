//! The retry filter's per-request costs in the core.
//!
//! - `budget/bytes`: one request's deposit and one retry's withdrawal on the encoded 96-byte
//!   state, each a decode, the update and an encode: what the compare-and-swap closures do.
//! - `budget/store_update`: the same through `store::update` on an in-memory store (one get
//!   with its copy and one versioned set per operation), the path the glue takes.
//! - `backoff/<jitter>`: one delay draw.
//! - `plan/decide_503` and `plan/decide_429_retry_after`: a whole decision for a retried
//!   response, the second parsing `Retry-After` seconds on the way.
//! - `after/http_date`: parsing an IMF-fixdate `Retry-After`.
//!
//! The budget runs at ratio 1.0 so that every withdrawal is allowed (each iteration deposits
//! one request and withdraws one retry), and its clock moves 1 ms per iteration so that slots
//! rotate as in production.

// A bench is test code: a setup that fails must stop it loudly.
#![allow(clippy::unwrap_used)]

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::cell::RefCell;
    use std::hint::black_box;

    use criterion::{criterion_group, Criterion};
    use keel_core::rand::SeededRng;
    use keel_core::retry::after::parse_retry_after;
    use keel_core::retry::{
        AttemptPlan, Backoff, Jitter, Outcome, Response, RetryBudget, RetryConfig, RetryDecision,
    };
    use keel_core::store::{update, SharedStore, StoreError};
    use keel_core::time::{Duration, Instant};

    const KEY: &str = "keel/retry/default/budget";
    const NOW_SECS: u64 = 1_700_000_000;

    /// One key's value and version: the smallest faithful shared-data store.
    #[derive(Default)]
    struct OneKeyStore(RefCell<Option<(Vec<u8>, u32)>>);

    impl SharedStore for OneKeyStore {
        fn get(&self, _key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.0.borrow().clone())
        }
        fn set(&self, _key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut slot = self.0.borrow_mut();
            let version = slot.as_ref().map_or(0, |(_, v)| *v);
            if matches!(cas, Some(c) if c != 0 && c != version) {
                return Err(StoreError::CasMismatch);
            }
            *slot = Some((value.to_vec(), version.wrapping_add(1).max(1)));
            Ok(())
        }
    }

    fn budget() -> RetryBudget {
        RetryBudget::new(1.0, 10, Duration::from_secs(10)).unwrap()
    }

    fn budget_ops(c: &mut Criterion) {
        let mut group = c.benchmark_group("budget");
        let b = budget();
        let mut bytes = b.empty_state(Instant::ZERO).encode();
        let mut now = Instant::ZERO;
        group.bench_function("bytes", |bench| {
            bench.iter(|| {
                now = now.saturating_add(Duration::from_millis(1));
                bytes = b.deposit_bytes(Some(&bytes), now).unwrap();
                let (new, allowed) = b.withdraw_bytes(Some(&bytes), black_box(now));
                bytes = new.unwrap();
                black_box(allowed)
            })
        });
        let store = OneKeyStore::default();
        b.ensure_shared(&store, KEY, Instant::ZERO).unwrap();
        let mut now = Instant::ZERO;
        group.bench_function("store_update", |bench| {
            bench.iter(|| {
                now = now.saturating_add(Duration::from_millis(1));
                b.deposit_shared(&store, KEY, now).unwrap();
                black_box(b.withdraw_shared(&store, KEY, black_box(now)).unwrap())
            })
        });
        // The same closure by hand, to show what `update` itself adds.
        group.bench_function("store_update_closure", |bench| {
            bench.iter(|| {
                now = now.saturating_add(Duration::from_millis(1));
                update(&store, KEY, 16, |old| b.withdraw_bytes(old, black_box(now))).unwrap();
                update(&store, KEY, 16, |old| (b.deposit_bytes(old, now), ())).unwrap();
            })
        });
        group.finish();
    }

    fn backoff_draw(c: &mut Criterion) {
        let mut group = c.benchmark_group("backoff");
        for jitter in [
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
            Jitter::None,
        ] {
            let backoff = Backoff::new(
                Duration::from_millis(25),
                Duration::from_millis(250),
                jitter,
            )
            .unwrap();
            let mut rng = SeededRng::new(1);
            let mut previous = Duration::ZERO;
            let mut retry = 0u32;
            group.bench_function(jitter.name(), |bench| {
                bench.iter(|| {
                    retry = (retry + 1) % 4;
                    previous = backoff.delay(black_box(retry), previous, &mut rng);
                    previous
                })
            });
        }
        group.finish();
    }

    fn plan_decide(c: &mut Criterion) {
        let mut group = c.benchmark_group("plan");
        let config = keel_core::config::load::<RetryConfig>(
            r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3,
                "retry_on": ["5xx", "rate-limited"],
                "backoff": {"base": "25ms", "cap": "250ms", "jitter": "full"},
                "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#
                .as_bytes(),
        )
        .unwrap();
        let policy = config.policies()[0].clone();
        let now = Instant::from_nanos(NOW_SECS * 1_000_000_000);
        let plan = AttemptPlan::new(&policy, policy.eligibility("GET", None, 0), now);
        let mut rng = SeededRng::new(2);
        let cases = [
            ("decide_503", Outcome::Response(Response::status(503))),
            (
                "decide_429_retry_after",
                Outcome::Response(Response {
                    status: 429,
                    retry_after: Some("2"),
                    rate_limit_reset: None,
                }),
            ),
        ];
        for (name, outcome) in cases {
            group.bench_function(name, |bench| {
                bench.iter(|| {
                    let mut fresh = plan;
                    let decision =
                        fresh.decide(&policy, black_box(&outcome), now, &mut rng, || true);
                    debug_assert!(matches!(decision, RetryDecision::RetryAfter(_)));
                    decision
                })
            });
        }
        group.finish();
    }

    fn retry_after_date(c: &mut Criterion) {
        let now = Duration::from_secs(NOW_SECS);
        let max = Duration::from_secs(300);
        c.bench_function("after/http_date", |bench| {
            bench.iter(|| parse_retry_after(black_box("Tue, 14 Nov 2023 22:13:21 GMT"), now, max))
        });
    }

    criterion_group!(
        benches,
        budget_ops,
        backoff_draw,
        plan_decide,
        retry_after_date
    );
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(bench::benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
