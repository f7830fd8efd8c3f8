//! Behaviour every algorithm shares, checked through the public [`Limiter`] API: capacity,
//! exact `retry_after`, shaping, time going backwards, state encoding, and properties over
//! long seeded arrival sequences.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use alloc::vec::Vec;

use super::*;
use crate::rand::{Rng, SeededRng};
use crate::store::testing::MemoryStore;
use crate::store::update;

const SEC: u64 = 1_000_000_000;

fn rate(requests: u64, period: Duration, burst: u64) -> Rate {
    Rate {
        requests,
        period,
        burst,
    }
}

/// 5 per second, bursts of 8: the buckets admit 8 at once, the windows 5, the leaky bucket 1.
fn limiters() -> [(Limiter, u64); 5] {
    let r = rate(5, Duration::from_secs(1), 8);
    [
        (Limiter::new(Algorithm::TokenBucket, r), 8),
        (Limiter::new(Algorithm::Gcra, r), 8),
        (Limiter::new(Algorithm::FixedWindow, r), 5),
        (Limiter::new(Algorithm::SlidingWindow, r), 5),
        (Limiter::new(Algorithm::LeakyBucket, r), 1),
    ]
}

/// Requests of cost 1 at `now`, max_delay 0: (admitted, final state).
fn burst_at(l: &Limiter, state: Option<Vec<u8>>, now: Instant, n: u32) -> (u32, Option<Vec<u8>>) {
    let mut state = state;
    let mut admitted = 0;
    for _ in 0..n {
        let (s, d) = l.acquire(state.as_deref(), now, 1, Duration::ZERO);
        if let Some(s) = s {
            state = Some(s);
        }
        if let Decision::Allow { .. } = d {
            admitted += 1;
        }
    }
    (admitted, state)
}

fn at(nanos: u64) -> Instant {
    Instant::from_nanos(nanos)
}

#[test]
fn algorithm_names_parse_and_print() {
    let path = FieldPath::root()
        .field("policies")
        .index(0)
        .field("algorithm");
    for a in Algorithm::ALL {
        assert_eq!(Algorithm::parse(&path, a.as_str()), Ok(a));
        assert_eq!(alloc::format!("{a}"), a.as_str());
    }
    assert_eq!(Algorithm::default(), Algorithm::TokenBucket);
    let e = Algorithm::parse(&path, "token-bucket").unwrap_err();
    assert_eq!(e.path, "policies[0].algorithm");
    assert!(e.message.contains("\"token-bucket\""), "{e}");
}

#[test]
fn limiter_brings_a_raw_rate_into_range() {
    let l = Limiter::new(Algorithm::Gcra, rate(0, Duration::ZERO, 0));
    assert_eq!(l.rate(), rate(1, Duration::from_nanos(1), 1));
    let l = Limiter::new(
        Algorithm::TokenBucket,
        rate(1000, Duration::from_nanos(10), 3),
    );
    assert_eq!(l.rate().requests, 10);
    for a in Algorithm::ALL {
        let l = Limiter::new(a, rate(0, Duration::ZERO, 0));
        let (_, d) = l.acquire(None, at(u64::MAX), 1, Duration::MAX);
        assert!(d.is_admitted(), "{a}: {d:?}");
    }
}

#[test]
fn a_fresh_key_admits_exactly_its_capacity_at_one_instant() {
    for (l, capacity) in limiters() {
        let now = at(1_000 * SEC);
        let (admitted, state) = burst_at(&l, None, now, 100);
        assert_eq!(u64::from(admitted), capacity, "{}", l.algorithm());
        let (_, d) = l.acquire(state.as_deref(), now, 1, Duration::ZERO);
        assert!(matches!(d, Decision::Deny { .. }), "{}", l.algorithm());
    }
}

#[test]
fn remaining_counts_down_to_zero_and_reset_is_when_the_key_is_fresh() {
    for (l, capacity) in limiters() {
        let now = at(1_000 * SEC);
        let mut state = None;
        for i in 1..=capacity {
            let (s, d) = l.acquire(state.as_deref(), now, 1, Duration::ZERO);
            state = s;
            let Decision::Allow { remaining, reset } = d else {
                panic!("{}: {d:?}", l.algorithm())
            };
            let expected = match l.algorithm() {
                // The leaky bucket reports room left in its queue of 8.
                Algorithm::LeakyBucket => 7,
                _ => capacity - i,
            };
            assert_eq!(remaining, expected, "{}", l.algorithm());
            // Once reset has passed, the key is fresh.
            let bytes = state.as_deref().unwrap();
            assert!(
                l.is_idle(bytes, now.saturating_add(reset)),
                "{}",
                l.algorithm()
            );
            if !reset.is_zero() {
                let before = now
                    .saturating_add(reset)
                    .saturating_sub(Duration::from_nanos(1));
                assert!(!l.is_idle(bytes, before), "{}", l.algorithm());
            }
        }
    }
}

#[test]
fn capacity_comes_back_with_time() {
    let ms = |n: u64| Duration::from_millis(n);
    let t0 = at(1_000 * SEC);
    // Token bucket and GCRA: 5 per second come back continuously.
    for a in [Algorithm::TokenBucket, Algorithm::Gcra] {
        let l = Limiter::new(a, rate(5, Duration::from_secs(1), 8));
        let (_, drained) = burst_at(&l, None, t0, 8);
        let (n, _) = burst_at(&l, drained.clone(), t0.saturating_add(ms(600)), 100);
        assert_eq!(n, 3, "{a}");
        let (n, _) = burst_at(&l, drained, t0.saturating_add(ms(5_000)), 100);
        assert_eq!(n, 8, "{a}");
    }
    // Fixed window: the whole quota at the next window.
    let l = Limiter::new(Algorithm::FixedWindow, rate(5, Duration::from_secs(1), 8));
    let (_, drained) = burst_at(&l, None, t0.saturating_add(ms(900)), 5);
    assert_eq!(
        burst_at(&l, drained, t0.saturating_add(ms(1_000)), 100).0,
        5
    );
    // Sliding window: half a window later, half the previous window's count has slid out.
    let l = Limiter::new(
        Algorithm::SlidingWindow,
        rate(10, Duration::from_secs(1), 1),
    );
    let (_, drained) = burst_at(&l, None, t0, 10);
    assert_eq!(
        burst_at(&l, drained.clone(), t0.saturating_add(ms(1_500)), 100).0,
        5
    );
    assert_eq!(
        burst_at(&l, drained, t0.saturating_add(ms(2_000)), 100).0,
        10
    );
    // Leaky bucket: one per interval.
    let l = Limiter::new(Algorithm::LeakyBucket, rate(5, Duration::from_secs(1), 8));
    let (_, drained) = burst_at(&l, None, t0, 1);
    assert_eq!(
        burst_at(&l, drained.clone(), t0.saturating_add(ms(199)), 100).0,
        0
    );
    assert_eq!(burst_at(&l, drained, t0.saturating_add(ms(200)), 100).0, 1);
}

/// Random arrivals against every algorithm; whenever a request is refused, a request of the
/// same cost at `now + retry_after` is allowed and one nanosecond earlier it is not; whenever
/// one is delayed, it would have been allowed at `now + wait`.
#[test]
fn retry_after_and_wait_are_exact() {
    let mut rng = SeededRng::new(2024);
    let mut checked = 0;
    for round in 0..60 {
        let a = Algorithm::ALL[round % 5];
        let requests = 1 + rng.below(20);
        let period = Duration::from_nanos(1 + rng.below(3 * SEC));
        let l = Limiter::new(a, rate(requests, period, 1 + rng.below(20)));
        let max_delay = Duration::from_nanos(rng.below(2) * rng.below(SEC));
        let mut now = rng.below(1 << 50);
        let mut state: Option<Vec<u8>> = None;
        for _ in 0..200 {
            now += rng.below(period.as_nanos() / 2 + 1);
            let cost = rng.below(3);
            let before = state.clone();
            let (s, d) = l.acquire(before.as_deref(), at(now), cost, max_delay);
            let later = match d {
                Decision::Deny { retry_after, .. } if retry_after != Duration::MAX => retry_after,
                Decision::Delay { wait, .. } => wait,
                _ => Duration::ZERO,
            };
            if !later.is_zero() {
                let (_, d2) = l.acquire(
                    before.as_deref(),
                    at(now + later.as_nanos()),
                    cost,
                    Duration::ZERO,
                );
                assert!(
                    matches!(d2, Decision::Allow { .. }),
                    "{a} {l:?} at +{later:?}: {d2:?}"
                );
                let (_, d3) = l.acquire(
                    before.as_deref(),
                    at(now + later.as_nanos() - 1),
                    cost,
                    Duration::ZERO,
                );
                assert!(
                    !matches!(d3, Decision::Allow { .. }),
                    "{a} {l:?} at +{later:?}-1: {d3:?}"
                );
                checked += 1;
            }
            if s.is_some() {
                state = s;
            }
        }
    }
    assert!(checked > 1000, "{checked}");
}

#[test]
fn shaping_delays_within_max_delay_and_refuses_beyond() {
    for (l, capacity) in limiters() {
        let now = at(1_000 * SEC + 100_000_000);
        let (_, full) = burst_at(&l, None, now, capacity as u32);
        let (_, d) = l.acquire(full.as_deref(), now, 1, Duration::ZERO);
        let Decision::Deny { retry_after, .. } = d else {
            panic!("{}: {d:?}", l.algorithm())
        };
        // Just too short a max_delay: refused, nothing to write.
        let short = retry_after.saturating_sub(Duration::from_nanos(1));
        let (s, d) = l.acquire(full.as_deref(), now, 1, short);
        assert_eq!(s, None);
        assert!(matches!(d, Decision::Deny { retry_after: r, .. } if r == retry_after));
        // Long enough: delayed by exactly retry_after, and booked: later requests queue behind
        // it and run out of room.
        let (mut state, d) = l.acquire(full.as_deref(), now, 1, retry_after);
        assert!(
            matches!(d, Decision::Delay { wait, .. } if wait == retry_after),
            "{}: {d:?}",
            l.algorithm()
        );
        let mut delayed = 1;
        loop {
            let (s, d) = l.acquire(state.as_deref(), now, 1, retry_after);
            match d {
                Decision::Delay { wait, .. } => assert_eq!(wait, retry_after),
                Decision::Deny { .. } => break,
                Decision::Allow { .. } => panic!("{}: allowed after a booking", l.algorithm()),
            }
            state = s;
            delayed += 1;
            assert!(delayed <= capacity, "{}", l.algorithm());
        }
    }
}

#[test]
fn time_going_backwards_never_grants_capacity() {
    let mut rng = SeededRng::new(5);
    for (l, _) in limiters() {
        for _ in 0..50 {
            let t1 = 1_000 * SEC + rng.below(10 * SEC);
            let (_, state) = burst_at(&l, None, at(t1), 1 + rng.below(6) as u32);
            let earlier = at(t1 - rng.below(5 * SEC));
            // No more admitted from an earlier instant than from the state's own instant.
            let (n_then, _) = burst_at(&l, state.clone(), at(t1), 20);
            let (n_earlier, _) = burst_at(&l, state.clone(), earlier, 20);
            assert!(
                n_earlier <= n_then,
                "{}: {n_earlier} > {n_then}",
                l.algorithm()
            );
            // And no panic at the ends of time.
            for t in [Instant::ZERO, at(u64::MAX)] {
                let _ = l.acquire(state.as_deref(), t, 1, Duration::MAX);
                let _ = l.is_idle(state.as_deref().unwrap(), t);
            }
        }
    }
}

#[test]
fn a_worker_whose_clock_is_slightly_behind_is_not_refused_spare_capacity() {
    for (l, capacity) in limiters() {
        if capacity < 2 {
            continue;
        }
        let t1 = at(1_000 * SEC + 1_000);
        let (s, _) = l.acquire(None, t1, 1, Duration::ZERO);
        let (_, d) = l.acquire(s.as_deref(), at(1_000 * SEC - 1_000), 1, Duration::ZERO);
        assert!(
            matches!(d, Decision::Allow { .. }),
            "{}: {d:?}",
            l.algorithm()
        );
    }
}

#[test]
fn states_have_their_length_and_wrong_lengths_are_fresh_keys() {
    for (l, _) in limiters() {
        let now = at(77 * SEC);
        let (s, _) = l.acquire(None, now, 1, Duration::ZERO);
        let s = s.unwrap();
        assert_eq!(s.len(), l.state_len(), "{}", l.algorithm());
        let fresh = l.acquire(None, now, 1, Duration::ZERO);
        let mut long = s.clone();
        long.push(0);
        for bad in [&[][..], &s[..s.len() - 1], &long[..]] {
            assert_eq!(
                l.acquire(Some(bad), now, 1, Duration::ZERO),
                fresh,
                "{}",
                l.algorithm()
            );
            assert!(l.is_idle(bad, now));
        }
        // The state round-trips: feeding it back continues where it left off.
        let later = now.saturating_add(Duration::from_secs(10));
        let (again, d) = l.acquire(Some(&s), later, 1, Duration::ZERO);
        assert!(d.is_admitted());
        assert_eq!(again.map(|a| a.len()), Some(l.state_len()));
        let (_, d) = l.acquire(Some(&s), now, 1, Duration::ZERO);
        assert_ne!(d, fresh.1, "{}: the state was ignored", l.algorithm());
    }
}

#[test]
fn a_cost_beyond_capacity_never_conforms() {
    for (l, capacity) in limiters() {
        let cap = match l.algorithm() {
            Algorithm::LeakyBucket => 8,
            _ => capacity,
        };
        let (s, d) = l.acquire(None, at(SEC), cap + 1, Duration::from_secs(3600));
        assert_eq!(s, None);
        assert!(
            matches!(
                d,
                Decision::Deny {
                    retry_after: Duration::MAX,
                    ..
                }
            ),
            "{}: {d:?}",
            l.algorithm()
        );
        let (_, d) = l.acquire(None, at(SEC), cap, Duration::from_secs(3600));
        assert!(d.is_admitted(), "{}: {d:?}", l.algorithm());
    }
}

/// Release instants of admitted requests (arrival + wait) over random arrivals.
fn releases(l: &Limiter, rng: &mut SeededRng, max_delay: Duration, n: usize, gap: u64) -> Vec<u64> {
    let mut now = 1_000 * SEC + rng.below(SEC);
    let mut state: Option<Vec<u8>> = None;
    let mut out = Vec::new();
    for _ in 0..n {
        // Bursty: often many at one instant, sometimes a pause.
        now += match rng.below(4) {
            0 => 0,
            1 | 2 => rng.below(gap),
            _ => rng.below(gap * 20),
        };
        let (s, d) = l.acquire(state.as_deref(), at(now), 1, max_delay);
        if s.is_some() {
            state = s;
        }
        match d {
            Decision::Allow { .. } => out.push(now),
            Decision::Delay { wait, .. } => out.push(now + wait.as_nanos()),
            Decision::Deny { .. } => {}
        }
    }
    out.sort_unstable();
    out
}

/// The most releases in any span, against `burst + span * requests / period` (rounded down).
fn assert_within_rate(l: &Limiter, times: &[u64], slack: u64) {
    let r = l.rate();
    for j in 0..times.len() {
        for i in (0..=j).rev() {
            let span = u128::from(times[j] - times[i]);
            let allowed = u128::from(r.burst)
                + span * u128::from(r.requests) / u128::from(r.period.as_nanos())
                + u128::from(slack);
            let count = (j - i + 1) as u128;
            assert!(
                count <= allowed,
                "{}: {count} in {span} ns > {allowed}",
                l.algorithm()
            );
            if span > 3 * u128::from(r.period.as_nanos()) {
                break;
            }
        }
    }
}

#[test]
fn buckets_never_admit_more_than_burst_plus_rate_times_span() {
    let mut rng = SeededRng::new(77);
    for round in 0..12 {
        let a = [Algorithm::TokenBucket, Algorithm::Gcra][round % 2];
        // GCRA rounds T down: keep T exact here; the token bucket is exact for any rate.
        let requests = 1 + rng.below(10);
        let t = 1 + rng.below(SEC / 4);
        let period = if a == Algorithm::TokenBucket {
            t * requests + rng.below(requests)
        } else {
            t * requests
        };
        let l = Limiter::new(
            a,
            rate(requests, Duration::from_nanos(period), 1 + rng.below(10)),
        );
        let max_delay = Duration::from_nanos(rng.below(2) * rng.below(2 * period));
        let times = releases(&l, &mut rng, max_delay, 1500, t);
        assert!(times.len() > 50);
        assert_within_rate(&l, &times, 0);
    }
}

#[test]
fn gcra_and_the_token_bucket_are_the_same_limiter() {
    let mut rng = SeededRng::new(8);
    for _ in 0..30 {
        let requests = 1 + rng.below(10);
        let t = 1 + rng.below(SEC / 8);
        let r = rate(
            requests,
            Duration::from_nanos(t * requests),
            1 + rng.below(10),
        );
        let tb = Limiter::new(Algorithm::TokenBucket, r);
        let gcra = Limiter::new(Algorithm::Gcra, r);
        let max_delay = Duration::from_nanos(rng.below(2) * rng.below(3 * t));
        let mut now = SEC + rng.below(SEC);
        let (mut s1, mut s2): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
        for _ in 0..400 {
            now += rng.below(3) * rng.below(2 * t);
            let cost = 1 + rng.below(2);
            let (n1, d1) = tb.acquire(s1.as_deref(), at(now), cost, max_delay);
            let (n2, d2) = gcra.acquire(s2.as_deref(), at(now), cost, max_delay);
            assert_eq!(d1, d2, "{r:?} at {now}");
            if n1.is_some() {
                s1 = n1;
            }
            if n2.is_some() {
                s2 = n2;
            }
        }
    }
}

#[test]
fn the_leaky_bucket_releases_at_most_one_per_interval() {
    let mut rng = SeededRng::new(9);
    for _ in 0..10 {
        let requests = 1 + rng.below(10);
        let period = 1 + rng.below(SEC);
        let l = Limiter::new(
            Algorithm::LeakyBucket,
            rate(requests, Duration::from_nanos(period), 1 + rng.below(10)),
        );
        let t = l.rate().emission_interval().as_nanos();
        let max_delay = Duration::from_nanos(rng.below(10 * t));
        let times = releases(&l, &mut rng, max_delay, 1000, t);
        assert!(times.windows(2).all(|w| w[1] - w[0] >= t));
    }
}

#[test]
fn windows_never_admit_more_than_their_quota_in_a_window() {
    let mut rng = SeededRng::new(10);
    for round in 0..10 {
        let a = [Algorithm::FixedWindow, Algorithm::SlidingWindow][round % 2];
        let requests = 1 + rng.below(10);
        let period = 1 + rng.below(SEC);
        let l = Limiter::new(a, rate(requests, Duration::from_nanos(period), 1));
        let max_delay = Duration::from_nanos(rng.below(2) * rng.below(2 * period));
        let times = releases(&l, &mut rng, max_delay, 1000, period / requests);
        let mut i = 0;
        while i < times.len() {
            let window = times[i] / period;
            let n = times[i..]
                .iter()
                .take_while(|t| **t / period == window)
                .count();
            assert!(n as u64 <= requests, "{a}: {n} in one window");
            i += n;
        }
        if a == Algorithm::SlidingWindow {
            // The estimate bounds any sliding period loosely: never twice the quota.
            for (j, tj) in times.iter().enumerate() {
                let n = times[..=j]
                    .iter()
                    .rev()
                    .take_while(|ti| tj - **ti < period)
                    .count();
                assert!(n as u64 <= 2 * requests);
            }
        }
    }
}

#[test]
fn through_shared_data_a_thousand_requests_at_one_instant_admit_exactly_the_capacity() {
    for (l, capacity) in limiters() {
        let store = MemoryStore::default();
        let now = at(3_600 * SEC);
        let mut admitted = 0;
        for _ in 0..1000 {
            let d = update(&store, "keel/rate_limit/p/0", 3, |old| {
                l.acquire(old, now, 1, Duration::ZERO)
            })
            .unwrap();
            admitted += u64::from(d.is_admitted());
        }
        assert_eq!(admitted, capacity, "{}", l.algorithm());
    }
}

#[test]
fn decide_writes_the_codec_layout_that_acquire_returns() {
    use crate::codec::Writer;
    let words = StateBytes::words([1, u64::MAX, 0x0102_0304_0506_0708]);
    let codec = Writer::default()
        .u64(1)
        .u64(u64::MAX)
        .u64(0x0102_0304_0506_0708)
        .finish();
    assert_eq!(&*words, codec.as_slice());
    assert_eq!(
        read_words::<3>(&codec),
        Some([1, u64::MAX, 0x0102_0304_0506_0708])
    );
    assert_eq!(read_words::<3>(&codec[1..]), None);
    let mut rng = SeededRng::new(8);
    for (l, _) in limiters() {
        let mut state: Option<Vec<u8>> = None;
        for i in 0..200u64 {
            let now = at(1_000 * SEC + i * rng.below(SEC / 2));
            let max_delay = Duration::from_millis(rng.below(2) * 500);
            let (fixed, d1) = l.decide(state.as_deref(), now, 1, max_delay);
            let (vec, d2) = l.acquire(state.as_deref(), now, 1, max_delay);
            assert_eq!(d1, d2, "{}", l.algorithm());
            assert_eq!(fixed.as_deref(), vec.as_deref(), "{}", l.algorithm());
            if vec.is_some() {
                state = vec;
            }
        }
    }
}

#[test]
fn u128_division_by_a_u64_matches_the_library() {
    let mut rng = SeededRng::new(128);
    for _ in 0..20_000 {
        let n = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())) >> rng.below(128);
        let d = (rng.next_u64() >> rng.below(64)).max(1);
        let (q, r) = div_rem(n, d);
        assert_eq!(
            (q, u128::from(r)),
            (n / u128::from(d), n % u128::from(d)),
            "{n} / {d}"
        );
        let ceil = u64::try_from(n.div_ceil(u128::from(d))).unwrap_or(u64::MAX);
        assert_eq!(div_ceil_u64(n, d), ceil, "{n} / {d}");
    }
    assert_eq!(
        div_rem(u128::MAX, u64::MAX),
        (u128::MAX / u128::from(u64::MAX), 0)
    );
    assert_eq!(div_rem(u128::MAX, 1), (u128::MAX, 0));
    assert_eq!(div_rem(7, 0), (7, 0));
}
