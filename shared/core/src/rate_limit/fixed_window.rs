//! The fixed window counter: `requests` per window `[k * period, (k + 1) * period)`.
//!
//! Windows are aligned on multiples of the period on the host's clock (Unix time in Envoy), so
//! every worker and every key agrees on where a window starts. `burst` is ignored: a window's
//! whole quota may be used at once, and up to `2 * requests` may pass around a boundary.
//!
//! The state is the latest window that holds bookings, its count, and the latest `now` seen.
//! A request delayed into the next window is booked there, so the stored window can be ahead of
//! `now`; a request then conforms no earlier than that window's start. `seen` tells that case
//! apart from a `now` that is merely a little behind another worker's: a request is evaluated
//! at `max(now, seen)`, and is allowed outright if the stored window has started by then.
//!
//! Layout (24 bytes): `start: u64`, `count: u64`, `seen: u64`.

use super::{read_words, window_start, Meter, StateBytes};
use crate::config::Rate;
use crate::time::{Duration, Instant};

/// Encoded size of [`State`].
pub(super) const LEN: usize = 24;

/// A window and what is booked in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct State {
    /// Window start in nanoseconds, a multiple of the period.
    start: u64,
    /// Total cost booked in the window.
    count: u64,
    /// Latest `now` seen, in nanoseconds.
    seen: u64,
}

pub(super) struct FixedWindow {
    requests: u64,
    period: u64,
}

impl FixedWindow {
    pub(super) fn new(rate: &Rate) -> Self {
        FixedWindow {
            requests: rate.requests.max(1),
            period: rate.period.as_nanos().max(1),
        }
    }

    /// The window in force at `t`: the stored one if it is current or ahead, else an empty one.
    fn roll(&self, s: &State, t: u64) -> (u64, u64) {
        let current = window_start(t, self.period);
        if s.start >= current {
            (s.start, s.count)
        } else {
            (current, 0)
        }
    }
}

impl Meter for FixedWindow {
    type State = State;

    fn decode(&self, bytes: &[u8]) -> Option<State> {
        let [start, count, seen] = read_words(bytes)?;
        Some(State { start, count, seen })
    }

    fn encode(&self, s: &State) -> StateBytes {
        StateBytes::words([s.start, s.count, s.seen])
    }

    fn fresh(&self, now: Instant) -> State {
        State {
            start: window_start(now.as_nanos(), self.period),
            count: 0,
            seen: now.as_nanos(),
        }
    }

    fn clock(&self, s: &State, now: Instant) -> Instant {
        Instant::from_nanos(now.as_nanos().max(s.seen))
    }

    fn conform_at(&self, s: &State, now: Instant, cost: u64) -> Option<Instant> {
        if cost > self.requests {
            return None;
        }
        let clock = self.clock(s, now).as_nanos();
        let (start, count) = self.roll(s, clock);
        let at = if count.saturating_add(cost) <= self.requests {
            start.max(clock)
        } else {
            start.saturating_add(self.period)
        };
        Some(Instant::from_nanos(at))
    }

    fn book(&self, s: &State, at: Instant, now: Instant, cost: u64) -> State {
        let (start, count) = self.roll(s, at.as_nanos());
        State {
            start,
            count: count.saturating_add(cost),
            seen: s.seen.max(now.as_nanos()),
        }
    }

    fn remaining(&self, s: &State, now: Instant) -> u64 {
        let clock = self.clock(s, now).as_nanos();
        let (start, count) = self.roll(s, clock);
        if start > clock {
            0
        } else {
            self.requests.saturating_sub(count)
        }
    }

    fn reset(&self, s: &State, now: Instant) -> Duration {
        let (start, _) = self.roll(s, self.clock(s, now).as_nanos());
        Instant::from_nanos(start.saturating_add(self.period)).saturating_since(now)
    }

    fn is_idle(&self, s: &State, now: Instant) -> bool {
        self.roll(s, self.clock(s, now).as_nanos()).1 == 0
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::config::Rate;
    use crate::rate_limit::{Algorithm, Decision, Limiter};
    use crate::time::{Duration, Instant};

    fn limiter(requests: u64) -> Limiter {
        Limiter::new(
            Algorithm::FixedWindow,
            Rate {
                requests,
                period: Duration::from_secs(1),
                burst: 1,
            },
        )
    }

    #[test]
    fn windows_are_aligned_on_the_period_and_burst_is_ignored() {
        let l = limiter(3);
        let now = Instant::from_nanos(7_250_000_000);
        let mut state = None;
        for left in [2, 1, 0] {
            let (s, d) = l.acquire(state.as_deref(), now, 1, Duration::ZERO);
            assert_eq!(
                d,
                Decision::Allow {
                    remaining: left,
                    reset: Duration::from_millis(750)
                }
            );
            state = s;
        }
        let (_, d) = l.acquire(state.as_deref(), now, 1, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_millis(750),
                reset: Duration::from_millis(750)
            }
        );
        // A new window at 8 s has the whole quota.
        let (_, d) = l.acquire(
            state.as_deref(),
            Instant::from_nanos(8_000_000_000),
            3,
            Duration::ZERO,
        );
        assert!(matches!(d, Decision::Allow { remaining: 0, .. }));
    }

    #[test]
    fn a_worker_slightly_behind_is_not_refused_a_window_that_has_started() {
        let l = limiter(3);
        // Worker A at 8.000001 s opens window 8 s; worker B's clock still reads 7.999999 s.
        let (s, _) = l.acquire(None, Instant::from_nanos(8_000_001_000), 1, Duration::ZERO);
        let (_, d) = l.acquire(
            s.as_deref(),
            Instant::from_nanos(7_999_999_000),
            1,
            Duration::ZERO,
        );
        assert!(matches!(d, Decision::Allow { remaining: 1, .. }), "{d:?}");
    }

    #[test]
    fn delayed_requests_are_booked_in_the_next_window() {
        let l = limiter(2);
        let now = Instant::from_nanos(10_600_000_000);
        let max_delay = Duration::from_millis(500);
        let mut state = None;
        let mut decisions = alloc::vec::Vec::new();
        for _ in 0..5 {
            let (s, d) = l.acquire(state.as_deref(), now, 1, max_delay);
            if s.is_some() {
                state = s;
            }
            decisions.push(d);
        }
        let wait = Duration::from_millis(400);
        assert!(matches!(decisions[0], Decision::Allow { .. }));
        assert!(matches!(decisions[1], Decision::Allow { .. }));
        assert!(matches!(decisions[2], Decision::Delay { wait: w, .. } if w == wait));
        assert!(matches!(decisions[3], Decision::Delay { wait: w, .. } if w == wait));
        // The next window is full too, and the one after starts 1.4 s from now.
        assert!(
            matches!(decisions[4], Decision::Deny { retry_after, .. } if retry_after == Duration::from_millis(1400))
        );
        // At 11 s the two delayed requests have used window 11 s.
        let (_, d) = l.acquire(
            state.as_deref(),
            Instant::from_nanos(11_000_000_000),
            1,
            Duration::ZERO,
        );
        assert!(matches!(d, Decision::Deny { .. }));
    }
}
