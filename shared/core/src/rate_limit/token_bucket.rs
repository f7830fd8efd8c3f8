//! The token bucket, after Envoy's `local_ratelimit`: starts full with `burst` tokens, refills
//! `requests` tokens per `period` continuously, never above `burst`.
//!
//! Refill is exact: with `R = requests` and `P = period` in nanoseconds, `e` nanoseconds add
//! `e * R / P` tokens. The state keeps whole `tokens` and the fraction of the next one as
//! `credit` in units of `1 / P` token (`credit < P`), so `e * R` is simply added to `credit`
//! and whole tokens carried out of it, in u128. Nothing is lost to rounding however often the
//! bucket is read.
//!
//! A delayed request is booked at the instant it conforms: the bucket is refilled up to then
//! and `updated` moves into the future. A later request is evaluated at `max(now, updated)`, so
//! it queues behind (debt, in the token-bucket picture). Because `Limiter::new` keeps the rate
//! at most one token per nanosecond, a reservation leaves less than one token at `updated`, so
//! a request of cost >= 1 is never let through ahead of it.
//!
//! The common path takes no u128 arithmetic and usually no division: a refill that fills the
//! bucket is recognised by a multiplication (`elapsed * R + credit >= missing * P`), and when
//! `R` divides `P` the wait for `n` tokens from a whole number of tokens is `n * (P / R)`. Both
//! give exactly what the general formulas give (a test compares them at every magnitude).
//!
//! Layout (24 bytes): `tokens: u64`, `credit: u64`, `updated: u64`.

use super::{div_ceil_u64, div_rem, word, Meter, StateBytes};
use crate::config::Rate;
use crate::time::{Duration, Instant};

/// Encoded size of [`State`].
pub(super) const LEN: usize = 24;

/// A bucket's content at the instant `updated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct State {
    /// Whole tokens, at most `burst`.
    pub(super) tokens: u64,
    /// The fraction of the next token, in units of `1 / period_ns` token; 0 when full.
    pub(super) credit: u64,
    /// The instant of `tokens` and `credit`, in nanoseconds.
    pub(super) updated: u64,
}

pub(super) struct TokenBucket {
    requests: u64,
    period: u64,
    burst: u64,
    /// `period / requests` when `requests` divides `period`.
    interval: Option<u64>,
}

impl TokenBucket {
    /// The bucket of `rate`; `interval` is `period / requests` if that division is exact.
    pub(super) fn new(rate: &Rate, interval: Option<u64>) -> Self {
        TokenBucket {
            requests: rate.requests.max(1),
            period: rate.period.as_nanos().max(1),
            burst: rate.burst.max(1),
            interval,
        }
    }

    /// The bucket at `to`; unchanged when `to` is not after `updated`.
    // Inlined: after `advance`, the other steps of a decision refill to where the bucket
    // already is, and that check should not cost a call.
    #[inline(always)]
    pub(super) fn refill(&self, s: &State, to: u64) -> State {
        if to <= s.updated {
            return *s;
        }
        let (tokens, credit) = self.refill_after(s.tokens, s.credit, to - s.updated);
        State {
            tokens,
            credit,
            updated: to,
        }
    }

    /// `(tokens, credit)` of [`TokenBucket::refill`] by `elapsed > 0` nanoseconds. Plain
    /// values in and out, so that the state stays in registers around the call.
    fn refill_after(&self, tokens: u64, credit: u64, elapsed: u64) -> (u64, u64) {
        let full = (self.burst, 0);
        // Whether enough arrived to fill the bucket is a multiplication: the common case of a
        // key below its rate needs no division at all.
        let missing = self.burst.saturating_sub(tokens);
        // u64 when it fits (the common case: u128 division is a slow library call), else u128,
        // which cannot overflow: (2^64 - 1)^2 + 2^64 - 1 < 2^128.
        let (gained, credit) = match elapsed
            .checked_mul(self.requests)
            .and_then(|c| c.checked_add(credit))
        {
            Some(c) => {
                if missing
                    .checked_mul(self.period)
                    .is_some_and(|need| c >= need)
                {
                    return full;
                }
                // `max(1)`: the period is at least 1 already; said so, the division cannot
                // panic and the compiler leaves the check out.
                let period = self.period.max(1);
                (u128::from(c / period), c % period)
            }
            None => {
                let c = u128::from(credit) + u128::from(elapsed) * u128::from(self.requests);
                if c >= u128::from(missing) * u128::from(self.period) {
                    return full;
                }
                div_rem(c, self.period)
            }
        };
        let tokens = u128::from(tokens) + gained;
        if tokens >= u128::from(self.burst) {
            full
        } else {
            // Below burst, so it fits.
            (tokens as u64, credit)
        }
    }

    /// Nanoseconds after `s.updated` until the bucket holds `target` tokens (target <= burst).
    #[inline(always)]
    fn time_to(&self, s: &State, target: u64) -> u64 {
        if s.tokens >= target {
            return 0;
        }
        let missing = target - s.tokens;
        match self.interval {
            // With P = R * I, ceil(missing * P / R) is exactly missing * I (u64::MAX when that
            // does not fit, as the general formula clamps it).
            Some(interval) if s.credit == 0 => missing.saturating_mul(interval),
            _ => self.time_for(s.credit, missing),
        }
    }

    /// [`TokenBucket::time_to`] for `missing > 0` tokens.
    fn time_for(&self, credit: u64, missing: u64) -> u64 {
        // credit < period, so the need is positive.
        match missing.checked_mul(self.period) {
            Some(need) => (need - credit).div_ceil(self.requests.max(1)),
            None => div_ceil_u64(
                u128::from(missing) * u128::from(self.period) - u128::from(credit),
                self.requests,
            ),
        }
    }

    fn base(&self, s: &State, now: Instant) -> u64 {
        now.as_nanos().max(s.updated)
    }
}

impl Meter for TokenBucket {
    // Every step is inlined into the decision (`run`): at the size-optimising opt-level the
    // state would otherwise go through memory between a dozen small calls per check.
    type State = State;

    #[inline(always)]
    fn decode(&self, bytes: &[u8]) -> Option<State> {
        if bytes.len() != LEN {
            return None;
        }
        let (tokens, credit, updated) = (word(bytes, 0), word(bytes, 1), word(bytes, 2));
        // A state written under a smaller burst or another period is brought into range:
        // clamping can only take capacity away.
        let tokens = tokens.min(self.burst);
        let credit = if tokens == self.burst {
            0
        } else {
            credit.min(self.period - 1)
        };
        Some(State {
            tokens,
            credit,
            updated,
        })
    }

    #[inline(always)]
    fn encode(&self, s: &State) -> StateBytes {
        StateBytes::words([s.tokens, s.credit, s.updated])
    }

    #[inline(always)]
    fn fresh(&self, now: Instant) -> State {
        State {
            tokens: self.burst,
            credit: 0,
            updated: now.as_nanos(),
        }
    }

    #[inline(always)]
    fn clock(&self, s: &State, now: Instant) -> Instant {
        Instant::from_nanos(self.base(s, now))
    }

    /// Refilled up to `clock`: the later steps' refills, to `clock` or beyond, then start there
    /// (refilling in steps gives the same bucket as in one).
    #[inline(always)]
    fn advance(&self, s: State, clock: Instant) -> State {
        self.refill(&s, clock.as_nanos())
    }

    #[inline(always)]
    fn conform_at(&self, s: &State, now: Instant, cost: u64) -> Option<Instant> {
        if cost > self.burst {
            return None;
        }
        let base = self.base(s, now);
        let at = self.refill(s, base);
        Some(Instant::from_nanos(
            base.saturating_add(self.time_to(&at, cost)),
        ))
    }

    #[inline(always)]
    fn book(&self, s: &State, at: Instant, _now: Instant, cost: u64) -> State {
        let mut next = self.refill(s, at.as_nanos());
        next.tokens = next.tokens.saturating_sub(cost);
        next
    }

    #[inline(always)]
    fn remaining(&self, s: &State, now: Instant) -> u64 {
        self.refill(s, self.base(s, now)).tokens
    }

    #[inline(always)]
    fn reset(&self, s: &State, now: Instant) -> Duration {
        let base = self.base(s, now);
        let at = self.refill(s, base);
        let full = base.saturating_add(self.time_to(&at, self.burst));
        Instant::from_nanos(full).saturating_since(now)
    }

    #[inline(always)]
    fn is_idle(&self, s: &State, now: Instant) -> bool {
        self.refill(s, self.base(s, now)).tokens >= self.burst
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};
    use crate::rate_limit::{Algorithm, Decision, Limiter};
    use alloc::vec::Vec;

    fn limiter(requests: u64, period: Duration, burst: u64) -> Limiter {
        Limiter::new(
            Algorithm::TokenBucket,
            Rate {
                requests,
                period,
                burst,
            },
        )
    }

    fn decode(l: &Limiter, bytes: &[u8]) -> State {
        l.token_bucket().decode(bytes).unwrap()
    }

    #[test]
    fn refill_is_exact_for_periods_that_do_not_divide() {
        // 3 per second: 333_333_333.33 ns per token. After exactly 1 s, exactly 3 tokens.
        let l = limiter(3, Duration::from_secs(1), 3);
        let t0 = Instant::from_nanos(1_000);
        let mut state = None;
        for _ in 0..3 {
            let (s, d) = l.acquire(state.as_deref(), t0, 1, Duration::ZERO);
            assert!(matches!(d, Decision::Allow { .. }));
            state = s;
        }
        let tb = l.token_bucket();
        let s = decode(&l, state.as_deref().unwrap());
        let later = tb.refill(&s, t0.as_nanos() + 1_000_000_000);
        assert_eq!((later.tokens, later.credit), (3, 0));
        // Reading it in many small steps gives the same bucket as one step.
        let mut stepped = s;
        for i in 1..=1000u64 {
            stepped = tb.refill(&stepped, t0.as_nanos() + i * 999_999);
        }
        let one_step = tb.refill(&s, t0.as_nanos() + 1000 * 999_999);
        assert_eq!(stepped, one_step);
    }

    #[test]
    fn the_u64_fast_path_matches_u128_arithmetic_at_every_magnitude() {
        let mut rng = SeededRng::new(21);
        for _ in 0..5000 {
            let bits = |rng: &mut SeededRng| rng.next_u64() >> rng.below(64);
            // Half the rates have a period that is a multiple of the requests, and half the
            // states a whole number of tokens: the shortcuts of `time_to`.
            let requests = bits(&mut rng).max(1);
            let period = if rng.below(2) == 0 {
                requests.saturating_mul(1 + (rng.next_u64() >> rng.below(64)) % (1 << 40))
            } else {
                bits(&mut rng).max(1)
            };
            let rate = Rate {
                requests,
                period: Duration::from_nanos(period),
                burst: bits(&mut rng).max(1),
            };
            let tb = Limiter::new(Algorithm::TokenBucket, rate).token_bucket();
            let credit = match rng.below(2) {
                0 => 0,
                _ => rng.below(tb.period),
            };
            let s = State {
                tokens: rng.below(tb.burst),
                credit,
                updated: bits(&mut rng),
            };
            let to = s.updated.saturating_add(bits(&mut rng));
            // The reference: everything in u128.
            let credit =
                u128::from(s.credit) + u128::from(to - s.updated) * u128::from(tb.requests);
            let p = u128::from(tb.period);
            let tokens = u128::from(s.tokens) + credit / p;
            let expected = if tokens >= u128::from(tb.burst) {
                (tb.burst, 0)
            } else {
                (tokens as u64, (credit % p) as u64)
            };
            let got = tb.refill(&s, to);
            assert_eq!((got.tokens, got.credit), expected, "{rate:?} {s:?} to {to}");
            let need = u128::from(tb.burst - s.tokens) * p - u128::from(s.credit);
            let r = u128::from(tb.requests);
            let wait = u64::try_from(need.div_ceil(r)).unwrap_or(u64::MAX);
            assert_eq!(tb.time_to(&s, tb.burst), wait, "{rate:?} {s:?}");
        }
    }

    #[test]
    fn one_token_comes_back_after_ceil_period_over_requests() {
        let l = limiter(3, Duration::from_secs(1), 3);
        let t0 = Instant::from_nanos(0);
        let mut state = None;
        for _ in 0..3 {
            state = l.acquire(state.as_deref(), t0, 1, Duration::ZERO).0;
        }
        let (_, d) = l.acquire(state.as_deref(), t0, 1, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_nanos(333_333_334),
                reset: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn clamps_states_written_under_a_larger_burst() {
        let big = limiter(10, Duration::from_secs(1), 100);
        let small = limiter(10, Duration::from_secs(1), 5);
        let (s, _) = big.acquire(None, Instant::ZERO, 1, Duration::ZERO);
        let (_, d) = small.acquire(s.as_deref(), Instant::ZERO, 1, Duration::ZERO);
        assert!(matches!(d, Decision::Allow { remaining: 4, .. }), "{d:?}");
    }

    #[test]
    fn tokens_never_exceed_burst() {
        let mut rng = SeededRng::new(11);
        for round in 0..20 {
            let burst = 1 + rng.below(20);
            let l = limiter(
                1 + rng.below(50),
                Duration::from_millis(1 + rng.below(2000)),
                burst,
            );
            let max_delay = Duration::from_millis(rng.below(3) * 100);
            let mut now = rng.below(1 << 40);
            let mut state: Option<Vec<u8>> = None;
            for _ in 0..300 {
                now += rng.below(50_000_000);
                let cost = rng.below(3);
                let (s, _) = l.acquire(state.as_deref(), Instant::from_nanos(now), cost, max_delay);
                if s.is_some() {
                    state = s;
                }
                if let Some(bytes) = &state {
                    let st = decode(&l, bytes);
                    assert!(st.tokens <= burst, "round {round}: {st:?}");
                    assert!(st.credit < l.rate().period.as_nanos());
                    assert!(st.tokens < burst || st.credit == 0);
                }
            }
        }
    }
}
