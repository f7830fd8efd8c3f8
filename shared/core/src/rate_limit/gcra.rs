//! GCRA, the generic cell rate algorithm, as in governor and redis-cell.
//!
//! One theoretical arrival time `tat` per key. With emission interval `T = period / requests`
//! (rounded down to the nanosecond, at least 1) and `limit = burst * T` (that is `tau + T` with
//! `tau = T * (burst - 1)`), a request of cost `n` conforms at `now` when
//! `max(tat, now) + n * T - now <= limit`, which for `n = 1` is the classic `now >= tat - tau`;
//! then `tat = max(tat, now) + n * T`. The bucket is full when `tat <= now`. It is the token
//! bucket written as a time: the same arrivals get the same decisions, in one u64, which fits a
//! single compare-and-swap.
//!
//! `T` and `limit` are computed once per [`super::Limiter`]; a check is then a few additions
//! and comparisons, and `remaining` divides only when the key is more than one interval ahead.
//!
//! Layout (8 bytes): `tat: u64`.

use super::{read_words, Meter, StateBytes};
use crate::config::Rate;
use crate::time::{Duration, Instant};

/// Encoded size of the state.
pub(super) const LEN: usize = 8;

pub(super) struct Gcra {
    /// Emission interval in nanoseconds, at least 1.
    t: u64,
    /// `burst * t`: how far `tat` may run ahead of `now`.
    limit: u64,
    burst: u64,
    /// Whether `limit` is exactly `burst * t` (it saturates at u64::MAX otherwise).
    exact: bool,
}

impl Gcra {
    /// The GCRA of `rate`, whose emission interval (`rate.emission_interval()`) is `t` ns.
    pub(super) fn new(t: u64, rate: &Rate) -> Self {
        let t = t.max(1);
        let burst = rate.burst.max(1);
        let (limit, exact) = match t.checked_mul(burst) {
            Some(limit) => (limit, true),
            None => (u64::MAX, false),
        };
        Gcra {
            t,
            limit,
            burst,
            exact,
        }
    }
}

impl Meter for Gcra {
    // Every step is inlined into the decision (`run`): at the size-optimising opt-level the
    // state would otherwise go through memory between a dozen small calls per check.
    /// The theoretical arrival time, in nanoseconds.
    type State = u64;

    #[inline(always)]
    fn decode(&self, bytes: &[u8]) -> Option<u64> {
        let [tat] = read_words(bytes)?;
        Some(tat)
    }

    #[inline(always)]
    fn encode(&self, tat: &u64) -> StateBytes {
        StateBytes::words([*tat])
    }

    #[inline(always)]
    fn fresh(&self, _now: Instant) -> u64 {
        0
    }

    #[inline(always)]
    fn conform_at(&self, tat: &u64, now: Instant, cost: u64) -> Option<Instant> {
        if cost > self.burst {
            return None;
        }
        // Earliest s >= now with max(tat, s) + cost * T - s <= limit. For s >= tat that holds
        // (cost <= burst); below tat it needs s >= tat + cost * T - limit, which is <= tat.
        let earliest = tat
            .saturating_add(cost.saturating_mul(self.t))
            .saturating_sub(self.limit);
        Some(Instant::from_nanos(earliest.max(now.as_nanos())))
    }

    #[inline(always)]
    fn book(&self, tat: &u64, at: Instant, _now: Instant, cost: u64) -> u64 {
        (*tat)
            .max(at.as_nanos())
            .saturating_add(cost.saturating_mul(self.t))
    }

    #[inline(always)]
    fn remaining(&self, tat: &u64, now: Instant) -> u64 {
        let ahead = tat.saturating_sub(now.as_nanos());
        if !self.exact {
            return (self.limit.saturating_sub(ahead) / self.t.max(1)).min(self.burst);
        }
        // floor((burst * T - ahead) / T) = burst - ceil(ahead / T), and ceil(ahead / T) is 0
        // or 1 without dividing when ahead <= T (a key used at about its rate).
        let used = match ahead {
            0 => 0,
            a if a <= self.t => 1,
            // `max(1)`: `t` is at least 1 already; said so, no division-by-zero check.
            a => a.div_ceil(self.t.max(1)),
        };
        self.burst.saturating_sub(used)
    }

    #[inline(always)]
    fn reset(&self, tat: &u64, now: Instant) -> Duration {
        Instant::from_nanos(*tat).saturating_since(now)
    }

    #[inline(always)]
    fn is_idle(&self, tat: &u64, now: Instant) -> bool {
        *tat <= now.as_nanos()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::config::Rate;
    use crate::rate_limit::{Algorithm, Decision, Limiter};
    use crate::time::{Duration, Instant};

    fn limiter(requests: u64, period: Duration, burst: u64) -> Limiter {
        Limiter::new(
            Algorithm::Gcra,
            Rate {
                requests,
                period,
                burst,
            },
        )
    }

    #[test]
    fn one_u64_of_state_that_is_the_theoretical_arrival_time() {
        let l = limiter(10, Duration::from_secs(1), 5);
        assert_eq!(l.state_len(), 8);
        let now = Instant::from_nanos(5_000_000_000);
        let (s, _) = l.acquire(None, now, 1, Duration::ZERO);
        let tat = u64::from_le_bytes(s.unwrap().try_into().unwrap());
        assert_eq!(tat, 5_000_000_000 + 100_000_000);
    }

    #[test]
    fn a_cost_of_n_conforms_only_when_all_n_cells_do() {
        // governor's check_n: 5 cells of burst 5 fit a full bucket, 6 never do.
        let l = limiter(10, Duration::from_secs(1), 5);
        let (s, d) = l.acquire(None, Instant::ZERO, 5, Duration::ZERO);
        assert!(matches!(d, Decision::Allow { remaining: 0, .. }));
        let (_, d) = l.acquire(s.as_deref(), Instant::ZERO, 2, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_millis(200),
                reset: Duration::from_millis(500)
            }
        );
        let (_, d) = l.acquire(None, Instant::ZERO, 6, Duration::from_secs(60));
        assert!(matches!(
            d,
            Decision::Deny {
                retry_after: Duration::MAX,
                ..
            }
        ));
    }
}
