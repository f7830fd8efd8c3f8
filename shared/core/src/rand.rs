//! Injected randomness.
//!
//! The core never draws ambient randomness: whatever needs it (jittered backoff, random picks,
//! probabilistic shedding) takes a `&mut impl Rng`. Production glue seeds a [`SeededRng`] from
//! the host's clock; tests seed it with a constant and get the same sequence every run, natively
//! and on wasm32. After tower's injected `Rng` trait.

/// A source of uniformly distributed 64-bit values.
pub trait Rng {
    /// The next value, uniform over all of `u64`.
    fn next_u64(&mut self) -> u64;

    /// A value uniform in `0..bound`; `0` when `bound` is `0`. Uses Lemire's multiply-shift,
    /// whose bias for a bound far below 2^64 is negligible for jitter and picks.
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A float uniform in `[0, 1)`, with 53 bits of precision.
    fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The default generator: `fastrand`'s wyrand, seeded explicitly.
#[derive(Clone, Debug)]
pub struct SeededRng(fastrand::Rng);

impl SeededRng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(fastrand::Rng::with_seed(seed))
    }
}

impl Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = SeededRng::new(7);
        let mut b = SeededRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn below_stays_below_and_covers_the_range() {
        let mut rng = SeededRng::new(1);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let v = rng.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn unit_is_in_zero_one() {
        let mut rng = SeededRng::new(2);
        for _ in 0..10_000 {
            let v = rng.unit_f64();
            assert!((0.0..1.0).contains(&v));
        }
    }
}
