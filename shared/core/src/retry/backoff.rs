//! Backoff schedules: how long to wait before retry `n`.
//!
//! Follows the AWS architecture study "Exponential Backoff and Jitter". With `v(n) = min(cap,
//! base * 2^n)` for the retry numbered `n` from 0:
//!
//! | jitter | delay of retry `n` |
//! |---|---|
//! | [`Jitter::Full`] (default) | uniform in `[0, v(n))` |
//! | [`Jitter::Equal`] | `v(n)/2` plus uniform in `[0, v(n) - v(n)/2)`: within `[v(n)/2, v(n)]` |
//! | [`Jitter::Decorrelated`] | `min(cap, uniform in [base, 3 * prev])`, `prev` the previous delay (`base` at first) |
//! | [`Jitter::None`] | exactly `v(n)` |
//!
//! The study found full jitter does the least total work and finishes soonest under
//! contention; plain exponential backoff keeps clients synchronised. Envoy's router uses full
//! jitter with a 25 ms base, which is Keel's default too.
//!
//! Invariants: `0 < base <= cap` (checked by [`Backoff::new`]); no delay ever exceeds `cap`;
//! `2^n` saturates instead of overflowing, for any `n`.

use core::fmt;

use crate::rand::Rng;
use crate::time::Duration;

/// How a delay is randomised within its exponential ceiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Uniform in `[0, v)`: the least work under contention (AWS study). The default.
    #[default]
    Full,
    /// Half fixed, half random: within `[v/2, v]`.
    Equal,
    /// Grows from the previous delay: `min(cap, uniform in [base, 3 * prev])`.
    Decorrelated,
    /// No randomness: exactly `v`. Synchronised clients retry in lockstep; for tests and demos.
    None,
}

impl Jitter {
    /// The configuration name: `full`, `equal`, `decorrelated`, `none`.
    pub fn name(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
            Jitter::None => "none",
        }
    }

    /// The jitter named `name`, if any.
    pub fn from_name(name: &str) -> Option<Jitter> {
        match name {
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            "decorrelated" => Some(Jitter::Decorrelated),
            "none" => Some(Jitter::None),
            _ => None,
        }
    }
}

/// Why [`Backoff::new`] refused its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidBackoff {
    /// `base` is zero: every delay would be zero.
    ZeroBase,
    /// `cap` is below `base`.
    CapBelowBase,
}

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvalidBackoff::ZeroBase => "base must be more than zero",
            InvalidBackoff::CapBelowBase => "cap must be at least base",
        })
    }
}

/// A validated backoff schedule: `base`, `cap` and a [`Jitter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Default for Backoff {
    /// Envoy's router defaults: 25 ms base, capped at ten times that, full jitter.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(25),
            cap: Duration::from_millis(250),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// A schedule starting at `base` and never above `cap`.
    pub fn new(base: Duration, cap: Duration, jitter: Jitter) -> Result<Backoff, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        if cap < base {
            return Err(InvalidBackoff::CapBelowBase);
        }
        Ok(Backoff { base, cap, jitter })
    }

    /// The first delay's scale.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// `min(cap, base * 2^retry)`, saturating: the ceiling of retry `retry` (numbered from 0).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let base = self.base.as_nanos();
        // `checked_shl` only refuses shifts of 64 or more; bits shifted out must be caught too.
        let scaled = if retry >= 64 || base > (u64::MAX >> retry) {
            u64::MAX
        } else {
            base << retry
        };
        Duration::from_nanos(scaled).min(self.cap)
    }

    /// The delay before retry `retry` (numbered from 0). `previous` is the delay drawn for the
    /// retry before it, used by [`Jitter::Decorrelated`] only (pass [`Duration::ZERO`] for the
    /// first retry: it counts as `base`).
    pub fn delay(&self, retry: u32, previous: Duration, rng: &mut impl Rng) -> Duration {
        match self.jitter {
            Jitter::Full => Duration::from_nanos(rng.below(self.ceiling(retry).as_nanos())),
            Jitter::Equal => {
                let v = self.ceiling(retry).as_nanos();
                let half = v / 2;
                Duration::from_nanos(half + rng.below(v - half))
            }
            Jitter::Decorrelated => {
                let base = self.base.as_nanos();
                let upper = previous.as_nanos().max(base).saturating_mul(3);
                // `upper - base + 1` cannot overflow: `upper >= 3 * base > base` unless it
                // saturated at u64::MAX, where the +1 is dropped by saturation.
                let span = (upper - base).saturating_add(1);
                Duration::from_nanos(base + rng.below(span)).min(self.cap)
            }
            Jitter::None => self.ceiling(retry),
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use alloc::vec::Vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn schedule(jitter: Jitter) -> Backoff {
        Backoff::new(ms(25), ms(250), jitter).unwrap()
    }

    /// Draws `n` delays in order, feeding each back as `previous`.
    fn draws(backoff: &Backoff, rng: &mut SeededRng, n: u32) -> Vec<Duration> {
        let mut previous = Duration::ZERO;
        (0..n)
            .map(|retry| {
                previous = backoff.delay(retry, previous, rng);
                previous
            })
            .collect()
    }

    #[test]
    fn refuses_a_zero_base_and_a_cap_below_base() {
        assert_eq!(
            Backoff::new(Duration::ZERO, ms(1), Jitter::Full),
            Err(InvalidBackoff::ZeroBase)
        );
        assert_eq!(
            Backoff::new(ms(10), ms(5), Jitter::Full),
            Err(InvalidBackoff::CapBelowBase)
        );
        assert!(Backoff::new(ms(10), ms(10), Jitter::None).is_ok());
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = schedule(Jitter::None);
        let ceilings: Vec<u64> = (0..6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 250, 250]);
    }

    #[test]
    fn full_jitter_stays_in_zero_to_ceiling() {
        for seed in 0..20 {
            let mut rng = SeededRng::new(seed);
            let b = schedule(Jitter::Full);
            for retry in 0..40 {
                let d = b.delay(retry, Duration::ZERO, &mut rng);
                assert!(d < b.ceiling(retry), "seed {seed} retry {retry}: {d}");
            }
        }
    }

    #[test]
    fn equal_jitter_stays_in_half_to_ceiling() {
        for seed in 0..20 {
            let mut rng = SeededRng::new(seed);
            let b = schedule(Jitter::Equal);
            for retry in 0..40 {
                let v = b.ceiling(retry);
                let d = b.delay(retry, Duration::ZERO, &mut rng);
                assert!(d >= v.div(2) && d <= v, "seed {seed} retry {retry}: {d}");
            }
        }
    }

    #[test]
    fn decorrelated_jitter_stays_in_base_to_three_times_previous() {
        for seed in 0..20 {
            let mut rng = SeededRng::new(seed);
            let b = schedule(Jitter::Decorrelated);
            let mut previous = Duration::ZERO;
            for retry in 0..40 {
                let d = b.delay(retry, previous, &mut rng);
                let upper = b.cap().min(previous.max(b.base()).saturating_mul(3));
                assert!(
                    d >= b.base() && d <= upper,
                    "seed {seed} retry {retry}: {d}"
                );
                previous = d;
            }
        }
    }

    #[test]
    fn no_jitter_is_exactly_the_ceiling() {
        let mut rng = SeededRng::new(3);
        let b = schedule(Jitter::None);
        for retry in 0..40 {
            assert_eq!(b.delay(retry, Duration::ZERO, &mut rng), b.ceiling(retry));
        }
    }

    #[test]
    fn huge_exponents_and_durations_never_overflow() {
        let mut rng = SeededRng::new(4);
        for jitter in [
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
            Jitter::None,
        ] {
            for (base, cap) in [
                (Duration::from_nanos(1), Duration::MAX),
                (Duration::MAX, Duration::MAX),
                (ms(25), ms(250)),
                (Duration::from_secs(3), Duration::from_secs(1 << 40)),
            ] {
                let b = Backoff::new(base, cap, jitter).unwrap();
                let mut previous = Duration::MAX;
                for retry in (0..=1000).chain([u32::MAX - 1, u32::MAX]) {
                    let d = b.delay(retry, previous, &mut rng);
                    assert!(d <= cap);
                    assert_eq!(b.ceiling(retry).min(cap), b.ceiling(retry));
                    previous = d;
                }
            }
        }
        let b = Backoff::new(Duration::from_nanos(1), Duration::MAX, Jitter::None).unwrap();
        assert_eq!(b.ceiling(63), Duration::from_nanos(1 << 63));
        assert_eq!(b.ceiling(64), Duration::MAX);
    }

    #[test]
    fn a_seed_fixes_the_schedule() {
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let b = schedule(jitter);
            let one = draws(&b, &mut SeededRng::new(42), 10);
            let two = draws(&b, &mut SeededRng::new(42), 10);
            let other = draws(&b, &mut SeededRng::new(43), 10);
            assert_eq!(one, two, "{jitter:?}");
            assert_ne!(one, other, "{jitter:?}");
        }
    }

    #[test]
    fn full_jitter_covers_its_range() {
        // Not a statistical test: only that draws are spread, not stuck at an end.
        let b = schedule(Jitter::Full);
        let mut rng = SeededRng::new(5);
        let ceiling = b.ceiling(3).as_nanos();
        let (mut low, mut high) = (false, false);
        for _ in 0..1000 {
            let d = b.delay(3, Duration::ZERO, &mut rng).as_nanos();
            low |= d < ceiling / 10;
            high |= d > ceiling / 10 * 9;
        }
        assert!(low && high);
    }

    #[test]
    fn names_round_trip() {
        for jitter in [
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
            Jitter::None,
        ] {
            assert_eq!(Jitter::from_name(jitter.name()), Some(jitter));
        }
        assert_eq!(Jitter::from_name("Full"), None);
        assert_eq!(Jitter::default(), Jitter::Full);
    }
}
