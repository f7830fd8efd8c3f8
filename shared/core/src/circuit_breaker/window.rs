//! A time-based sliding window of outcome counts, with O(1) totals.
//!
//! Follows Resilience4j's `SlidingTimeWindowMetrics`: time is cut into buckets of a fixed width
//! (`window / buckets`); the window is a ring of the `B` most recent buckets, addressed by the
//! absolute bucket number `now / width` modulo `B`. Running totals are kept beside the ring:
//! adding an outcome adds to its bucket and to the totals, and moving the window forward
//! subtracts each bucket that falls out before zeroing it. Reading the totals is O(1); moving
//! forward costs at most `B` steps however long the window sat idle.
//!
//! The window covers between `(B - 1) * width` and `B * width` of history: the newest bucket is
//! partly filled, the oldest is evicted whole.
//!
//! Invariants (checked on decode and by the property tests):
//! - `totals` equals the sum of the buckets, field by field;
//! - every bucket holds only outcomes whose bucket number lies in `(head - B, head]`;
//! - in every bucket, `failures <= calls` and `slow <= calls`.
//!
//! An outcome stamped before `head` (a worker whose clock read lags another's by a bucket) is
//! counted in the newest bucket rather than dropped: the window never moves backwards.

use alloc::vec;
use alloc::vec::Vec;

use super::outcome::Outcome;

/// The counts of one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Recorded calls.
    pub calls: u32,
    /// Calls that failed.
    pub failures: u32,
    /// Calls that were slow (failed or not).
    pub slow: u32,
}

/// The counts of the whole window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Recorded calls.
    pub calls: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Calls that were slow (failed or not).
    pub slow: u64,
}

impl Totals {
    fn add(&mut self, t: &Tally) {
        self.calls += u64::from(t.calls);
        self.failures += u64::from(t.failures);
        self.slow += u64::from(t.slow);
    }
    fn sub(&mut self, t: &Tally) {
        // The invariant makes these exact; saturation only guards a corrupt input that slipped
        // past decoding.
        self.calls = self.calls.saturating_sub(u64::from(t.calls));
        self.failures = self.failures.saturating_sub(u64::from(t.failures));
        self.slow = self.slow.saturating_sub(u64::from(t.slow));
    }
}

/// A ring of buckets with running totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    head: u64,
    totals: Totals,
    buckets: Vec<Tally>,
}

impl Window {
    /// An empty window of `buckets` buckets (at least one) whose newest bucket is `head`.
    pub fn new(buckets: usize, head: u64) -> Window {
        Window {
            head,
            totals: Totals::default(),
            buckets: vec![Tally::default(); buckets.max(1)],
        }
    }

    /// Rebuilds a window from decoded parts; `None` unless every invariant holds.
    pub(crate) fn from_parts(head: u64, totals: Totals, buckets: Vec<Tally>) -> Option<Window> {
        if buckets.is_empty() {
            return None;
        }
        let mut sum = Totals::default();
        for b in &buckets {
            if b.failures > b.calls || b.slow > b.calls {
                return None;
            }
            sum.add(b);
        }
        (sum == totals).then_some(Window {
            head,
            totals,
            buckets,
        })
    }

    /// The absolute number of the newest bucket.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The counts over the window as of the last update. They include buckets that time has
    /// since pushed out only until the next [`Window::advance`].
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The ring, slot `i` holding bucket numbers `≡ i (mod B)`.
    pub fn buckets(&self) -> &[Tally] {
        &self.buckets
    }

    fn slot(&self, index: u64) -> usize {
        // `len` is at least 1 and the remainder is below it, so both casts are lossless.
        (index % self.buckets.len() as u64) as usize
    }

    /// Moves the window so that bucket `index` is the newest, evicting the buckets that fall
    /// out. An `index` at or before the head changes nothing.
    pub fn advance(&mut self, index: u64) {
        if index <= self.head {
            return;
        }
        let len = self.buckets.len() as u64;
        let steps = (index - self.head).min(len);
        for step in 1..=steps {
            let slot = self.slot(self.head.wrapping_add(step));
            if let Some(bucket) = self.buckets.get_mut(slot) {
                self.totals.sub(bucket);
                *bucket = Tally::default();
            }
        }
        self.head = index;
    }

    /// Counts `outcome` in bucket `index` (or in the newest bucket if `index` is older).
    /// Ignored outcomes count for nothing. A bucket full at `u32::MAX` calls stops counting,
    /// and the totals with it, so that they stay its exact sum.
    pub fn add(&mut self, index: u64, outcome: Outcome) {
        if outcome == Outcome::Ignored {
            return;
        }
        self.advance(index);
        let slot = self.slot(self.head);
        let Some(bucket) = self.buckets.get_mut(slot) else {
            return;
        };
        if bucket.calls == u32::MAX {
            return;
        }
        let delta = Tally {
            calls: 1,
            failures: u32::from(outcome.is_failure()),
            slow: u32::from(outcome.is_slow()),
        };
        bucket.calls += delta.calls;
        bucket.failures += delta.failures;
        bucket.slow += delta.slow;
        self.totals.add(&delta);
    }

    /// Empties every bucket and makes `index` the newest.
    pub fn clear(&mut self, index: u64) {
        self.buckets.fill(Tally::default());
        self.totals = Totals::default();
        self.head = index;
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};

    fn sum(w: &Window) -> Totals {
        let mut t = Totals::default();
        for b in w.buckets() {
            t.add(b);
        }
        t
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let mut w = Window::new(10, 0);
        for _ in 0..5 {
            w.add(3, Outcome::Failure);
        }
        w.add(4, Outcome::Success);
        assert_eq!(w.totals().calls, 6);
        // Bucket 12 is the newest: 3..=12 is ten buckets, so bucket 3 is still in.
        w.advance(12);
        assert_eq!(w.totals().failures, 5);
        w.advance(13);
        assert_eq!(
            w.totals(),
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        // A long idle gap clears everything in at most B steps.
        w.advance(u64::MAX);
        assert_eq!(w.totals(), Totals::default());
        assert_eq!(w.head(), u64::MAX);
    }

    #[test]
    fn late_outcomes_land_in_the_newest_bucket() {
        let mut w = Window::new(4, 10);
        w.add(7, Outcome::SlowFailure);
        assert_eq!(w.head(), 10);
        assert_eq!(w.buckets()[2].slow, 1);
        assert_eq!(w.totals().failures, 1);
    }

    #[test]
    fn ignored_outcomes_count_for_nothing() {
        let mut w = Window::new(2, 0);
        w.add(5, Outcome::Ignored);
        assert_eq!(w.totals(), Totals::default());
        assert_eq!(w.head(), 0);
    }

    #[test]
    fn a_full_bucket_stops_counting_and_totals_stay_exact() {
        let mut buckets = vec![Tally::default(); 2];
        buckets[0].calls = u32::MAX;
        let totals = Totals {
            calls: u64::from(u32::MAX),
            ..Totals::default()
        };
        let mut w = Window::from_parts(0, totals, buckets).unwrap();
        w.add(0, Outcome::Failure);
        assert_eq!(w.totals(), sum(&w));
        assert_eq!(w.totals().failures, 0);
    }

    #[test]
    fn from_parts_refuses_broken_invariants() {
        let b = vec![Tally {
            calls: 1,
            failures: 2,
            slow: 0,
        }];
        let t = Totals {
            calls: 1,
            failures: 2,
            slow: 0,
        };
        assert!(Window::from_parts(0, t, b).is_none());
        let b = vec![Tally {
            calls: 1,
            failures: 0,
            slow: 0,
        }];
        assert!(Window::from_parts(0, Totals::default(), b).is_none());
        assert!(Window::from_parts(0, Totals::default(), Vec::new()).is_none());
    }

    /// Property: over random outcome sequences and clock jumps, the running totals equal both
    /// the sum of the buckets and a brute-force count of the outcomes whose bucket is in the
    /// window.
    #[test]
    fn totals_always_equal_the_in_window_outcomes() {
        for seed in 0..40u64 {
            let mut rng = SeededRng::new(seed);
            let len = 1 + rng.below(12) as usize;
            let mut w = Window::new(len, 0);
            let mut log: Vec<(u64, Outcome)> = Vec::new();
            let mut index = 0u64;
            for _ in 0..400 {
                index += match rng.below(10) {
                    0..=5 => 0,
                    6..=8 => 1,
                    _ => rng.below(2 * len as u64 + 2),
                };
                // Now and then a lagging clock: the outcome is stamped a few buckets back.
                let stamp = index.saturating_sub(if rng.below(8) == 0 { 3 } else { 0 });
                let outcome = match rng.below(5) {
                    0 => Outcome::Success,
                    1 => Outcome::Failure,
                    2 => Outcome::SlowSuccess,
                    3 => Outcome::SlowFailure,
                    _ => Outcome::Ignored,
                };
                w.add(stamp, outcome);
                if outcome != Outcome::Ignored {
                    log.push((stamp.max(w.head()), outcome));
                }
                assert_eq!(w.totals(), sum(&w), "seed {seed}");
                let oldest = w.head().saturating_sub(len as u64 - 1);
                let mut expect = Totals::default();
                for (i, o) in &log {
                    if *i >= oldest && *i <= w.head() {
                        expect.calls += 1;
                        expect.failures += u64::from(o.is_failure());
                        expect.slow += u64::from(o.is_slow());
                    }
                }
                assert_eq!(w.totals(), expect, "seed {seed}");
            }
        }
    }
}
