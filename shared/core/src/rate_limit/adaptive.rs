//! Adaptive rate limits: a policy's rate follows the upstream's recent success rate.
//!
//! The signal is the one the adaptive filter's success-rate throttling already keeps in shared
//! data for its scope ([`crate::adaptive::throttle`]: requests and accepts over a sliding
//! window, `keel/adaptive/<policy>/<scope>`). A limiter policy with `adaptive` reads it and runs
//! at a percentage of its configured rate:
//!
//! ```text
//! percent = clamp(round(100 × (accepts / requests) / target), floor, 100)
//! ```
//!
//! so the full rate while the success rate is at or above `target`, proportionally less below
//! it, never under `floor` percent. With fewer than `min_requests` requests in the window (or
//! no state yet) there is no signal and the policy runs at its full rate. Requests and burst
//! are both scaled (each at least 1); the period stays. The glue reads the signal on its tick
//! (no host call per request) and rebuilds the policy's limiters when the percentage changes;
//! the bucket states in shared data stay valid across the change (their layouts do not depend
//! on the rate).

use alloc::format;
use alloc::string::String;

use crate::adaptive::throttle::ThrottleState;
use crate::config::Rate;

/// The default `floor`: a quarter of the configured rate.
pub const DEFAULT_FLOOR_PERCENT: u8 = 25;
/// The default `target` success rate.
pub const DEFAULT_TARGET: f64 = 0.95;
/// The default `min_requests` in the window for the signal to count.
pub const DEFAULT_MIN_REQUESTS: u64 = 20;

/// A validated `adaptive` setting of a rate-limit policy.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveRate {
    /// The adaptive filter's policy whose success-rate counts are the signal.
    pub policy: String,
    /// That policy's scope (a route or cluster name; empty for a `global` policy).
    pub scope: String,
    /// The lowest percentage of the configured rate, 1 to 100.
    pub floor_percent: u8,
    /// The success rate at and above which the full rate applies, in (0, 1].
    pub target: f64,
    /// The fewest requests in the window for the signal to count.
    pub min_requests: u64,
}

impl AdaptiveRate {
    /// The shared-data key of the signal: the adaptive filter's state of `policy` and `scope`.
    pub fn signal_key(&self) -> String {
        format!("keel/adaptive/{}/{}", self.policy, self.scope)
    }

    /// The percentage of the configured rate in force for the signal's `state` (its
    /// shared-data value; `None` or undecodable: no signal, 100).
    pub fn percent(&self, state: Option<&[u8]>) -> u8 {
        let Some(state) = state.and_then(ThrottleState::decode) else {
            return 100;
        };
        let (requests, accepts) = state.totals();
        if requests == 0 || requests < self.min_requests {
            return 100;
        }
        let success = accepts.min(requests) as f64 / requests as f64;
        let ideal = 100.0 * success / self.target;
        // `ideal` is finite and non-negative (target > 0): the cast saturates at the bounds.
        let rounded = (ideal + 0.5) as u64;
        rounded.clamp(u64::from(self.floor_percent.clamp(1, 100)), 100) as u8
    }
}

/// `rate` at `percent` of its requests and burst (each at least 1), the period unchanged.
pub fn scaled(rate: Rate, percent: u8) -> Rate {
    let percent = u64::from(percent.clamp(1, 100));
    let part = |n: u64| (n.saturating_mul(percent) / 100).max(1);
    Rate {
        requests: part(rate.requests),
        period: rate.period,
        burst: part(rate.burst),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::time::Duration;
    use alloc::vec;

    fn rate() -> AdaptiveRate {
        AdaptiveRate {
            policy: "orders".into(),
            scope: "backend".into(),
            floor_percent: 20,
            target: 0.95,
            min_requests: 20,
        }
    }

    fn state(buckets: &[(u32, u32)]) -> alloc::vec::Vec<u8> {
        ThrottleState {
            epoch: 7,
            buckets: buckets.to_vec(),
        }
        .encode()
    }

    #[test]
    fn the_signal_key_is_the_adaptive_filters_state() {
        assert_eq!(rate().signal_key(), "keel/adaptive/orders/backend");
        let global = AdaptiveRate {
            scope: String::new(),
            ..rate()
        };
        assert_eq!(global.signal_key(), "keel/adaptive/orders/");
    }

    #[test]
    fn full_rate_at_or_above_the_target_and_without_a_signal() {
        let r = rate();
        assert_eq!(r.percent(None), 100);
        assert_eq!(r.percent(Some(b"garbage")), 100);
        assert_eq!(r.percent(Some(&state(&[(50, 50), (50, 50)]))), 100);
        assert_eq!(r.percent(Some(&state(&[(100, 96)]))), 100);
        assert_eq!(r.percent(Some(&state(&[(100, 95)]))), 100);
        // Too few requests to count: full rate, however they went.
        assert_eq!(r.percent(Some(&state(&[(19, 0)]))), 100);
    }

    #[test]
    fn proportional_below_the_target_down_to_the_floor() {
        let r = rate();
        // 40 % success: 100 × 0.40 / 0.95 = 42.1 -> 42.
        assert_eq!(r.percent(Some(&state(&[(60, 24), (40, 16)]))), 42);
        // 76 %: 80.
        assert_eq!(r.percent(Some(&state(&[(100, 76)]))), 80);
        // 10 %: 10.5 -> 11, under the floor of 20.
        assert_eq!(r.percent(Some(&state(&[(100, 10)]))), 20);
        assert_eq!(r.percent(Some(&state(&[(100, 0)]))), 20);
        // More accepts than requests (a torn read) counts as full success.
        assert_eq!(r.percent(Some(&state(&[(30, 40)]))), 100);
    }

    #[test]
    fn scaling_keeps_the_period_and_at_least_one_request() {
        let r = Rate {
            requests: 100,
            period: Duration::from_secs(1),
            burst: 200,
        };
        assert_eq!(
            scaled(r, 42),
            Rate {
                requests: 42,
                period: Duration::from_secs(1),
                burst: 84
            }
        );
        assert_eq!(scaled(r, 100), r);
        let tiny = Rate {
            requests: 1,
            period: Duration::from_secs(60),
            burst: 1,
        };
        assert_eq!(scaled(tiny, 20), tiny);
        assert_eq!(scaled(r, 0).requests, 1, "0 % is read as 1 %");
        let _ = vec![0u8; 0];
    }
}
