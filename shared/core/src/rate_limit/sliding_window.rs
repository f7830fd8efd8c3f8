//! The sliding window counter, after Cloudflare: two aligned windows estimate the last period.
//!
//! With `P` the period, `start` the current window's start, `elapsed = now - start`, `previous`
//! and `current` the two windows' counts, the number of requests in the sliding period ending
//! at `now` is estimated as `previous * (P - elapsed) / P + current`. A request of `cost`
//! conforms when the estimate including it stays within `requests`:
//! `previous * (P - elapsed) + (current + cost) * P <= requests * P`, in u128, no rounding.
//! `burst` is ignored. Cloudflare measured this estimate on 400 M requests: 0.003 % of them were
//! wrongly allowed or limited.
//!
//! The estimate only falls as time passes (the previous window's weight shrinks, and at a
//! boundary `current` becomes `previous` at full weight), so the earliest conforming instant
//! is found in closed form. A delayed request is booked in the window of that instant, which
//! can be the next one; as for the fixed window, `seen` tells a booking ahead of `now` apart
//! from a worker whose clock is slightly behind.
//!
//! Layout (32 bytes): `start: u64`, `previous: u64`, `current: u64`, `seen: u64`.

use super::{div_rem, read_words, window_start, Meter, StateBytes};
use crate::config::Rate;
use crate::time::{Duration, Instant};

/// Encoded size of [`State`].
pub(super) const LEN: usize = 32;

/// The current window and its predecessor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct State {
    /// Start of the current window in nanoseconds, a multiple of the period.
    start: u64,
    /// Cost booked in the window before `start`.
    previous: u64,
    /// Cost booked in the window from `start`.
    current: u64,
    /// Latest `now` seen, in nanoseconds.
    seen: u64,
}

pub(super) struct SlidingWindow {
    requests: u64,
    period: u64,
}

impl SlidingWindow {
    pub(super) fn new(rate: &Rate) -> Self {
        SlidingWindow {
            requests: rate.requests.max(1),
            period: rate.period.as_nanos().max(1),
        }
    }

    /// The windows in force at `t`: the stored ones moved forward by the windows that ended.
    fn roll(&self, s: &State, t: u64) -> State {
        let current = window_start(t, self.period);
        if s.start >= current {
            *s
        } else if s.start.saturating_add(self.period) == current {
            State {
                start: current,
                previous: s.current,
                current: 0,
                seen: s.seen,
            }
        } else {
            State {
                start: current,
                previous: 0,
                current: 0,
                seen: s.seen,
            }
        }
    }

    /// The earliest offset into a window whose previous window counted `previous`, at which
    /// `previous * (P - e) <= slack` holds; `P` when it holds only from the next window on.
    fn offset_for(&self, previous: u64, slack: u128) -> u64 {
        if previous == 0 {
            return 0;
        }
        let p = u128::from(self.period);
        // previous * (P - e) <= slack  <=>  P - e <= floor(slack / previous).
        let room = div_rem(slack, previous).0.min(p);
        // room <= P, so this fits.
        (p - room) as u64
    }
}

impl Meter for SlidingWindow {
    type State = State;

    fn decode(&self, bytes: &[u8]) -> Option<State> {
        let [start, previous, current, seen] = read_words(bytes)?;
        Some(State {
            start,
            previous,
            current,
            seen,
        })
    }

    fn encode(&self, s: &State) -> StateBytes {
        StateBytes::words([s.start, s.previous, s.current, s.seen])
    }

    fn fresh(&self, now: Instant) -> State {
        State {
            start: window_start(now.as_nanos(), self.period),
            previous: 0,
            current: 0,
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
        let w = self.roll(s, clock);
        let p = u128::from(self.period);
        let at = if w.current.saturating_add(cost) <= self.requests {
            let slack = u128::from(self.requests - w.current - cost) * p;
            let offset = self.offset_for(w.previous, slack);
            if offset < self.period {
                w.start.saturating_add(offset).max(clock)
            } else {
                // At the next window's start `current` weighs fully as the previous window,
                // and current + cost <= requests: it conforms there.
                w.start.saturating_add(self.period)
            }
        } else {
            // This window is over quota; in the next one, `current` is the previous window.
            // current + cost > requests >= cost, so current > 0.
            let slack = u128::from(self.requests - cost) * p;
            w.start
                .saturating_add(self.period)
                .saturating_add(self.offset_for(w.current, slack))
        };
        Some(Instant::from_nanos(at))
    }

    fn book(&self, s: &State, at: Instant, now: Instant, cost: u64) -> State {
        let mut w = self.roll(s, at.as_nanos());
        w.current = w.current.saturating_add(cost);
        w.seen = s.seen.max(now.as_nanos());
        w
    }

    fn remaining(&self, s: &State, now: Instant) -> u64 {
        let clock = self.clock(s, now).as_nanos();
        let w = self.roll(s, clock);
        if w.start > clock {
            return 0;
        }
        let p = u128::from(self.period);
        let weight = p - u128::from(clock - w.start).min(p);
        let used = u128::from(w.previous) * weight + u128::from(w.current) * p;
        let quota = u128::from(self.requests) * p;
        u64::try_from(div_rem(quota.saturating_sub(used), self.period).0).unwrap_or(u64::MAX)
    }

    fn reset(&self, s: &State, now: Instant) -> Duration {
        let w = self.roll(s, self.clock(s, now).as_nanos());
        // The estimate is zero once neither window is weighed any more.
        let clear = if w.current > 0 {
            w.start.saturating_add(self.period.saturating_mul(2))
        } else if w.previous > 0 {
            w.start.saturating_add(self.period)
        } else {
            return Duration::ZERO;
        };
        Instant::from_nanos(clear).saturating_since(now)
    }

    fn is_idle(&self, s: &State, now: Instant) -> bool {
        let w = self.roll(s, self.clock(s, now).as_nanos());
        w.previous == 0 && w.current == 0
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rate_limit::{Algorithm, Decision, Limiter};
    use alloc::vec::Vec;

    fn limiter(requests: u64, period: Duration) -> Limiter {
        Limiter::new(
            Algorithm::SlidingWindow,
            Rate {
                requests,
                period,
                burst: 1,
            },
        )
    }

    fn state(start: u64, previous: u64, current: u64) -> Vec<u8> {
        SlidingWindow::new(&Rate {
            requests: 1,
            period: Duration::from_secs(1),
            burst: 1,
        })
        .encode(&State {
            start,
            previous,
            current,
            seen: start,
        })
        .to_vec()
    }

    #[test]
    fn cloudflare_example() {
        // 50 per minute; 42 in the previous minute, 18 so far, 15 s into this minute:
        // 42 * 45/60 + 18 = 49.5, so one more request (50.5) would exceed the quota.
        let l = limiter(50, Duration::from_secs(60));
        let minute = 60_000_000_000;
        let s = SlidingWindow::new(&l.rate()).encode(&State {
            start: minute,
            previous: 42,
            current: 18,
            seen: minute,
        });
        let now = Instant::from_nanos(minute + 15_000_000_000);
        let (_, d) = l.acquire(Some(&s), now, 1, Duration::ZERO);
        // It conforms when 42 * (60 - e)/60 <= 31, at e = 60 - 31*60/42 = 15.714... s.
        let Decision::Deny { retry_after, .. } = d else {
            panic!("{d:?}")
        };
        let conform = 60_000_000_000u64 - (31u128 * 60_000_000_000 / 42) as u64;
        assert_eq!(retry_after.as_nanos(), conform - 15_000_000_000);
    }

    #[test]
    fn the_previous_window_weighs_less_as_time_passes() {
        let l = limiter(10, Duration::from_secs(1));
        let s = state(1_000_000_000, 10, 0);
        for (offset_ms, remaining) in [(0, 0), (100, 1), (500, 5), (999, 9)] {
            let now = Instant::from_nanos(1_000_000_000 + offset_ms * 1_000_000);
            let (_, d) = l.acquire(Some(&s), now, 1, Duration::ZERO);
            match d {
                Decision::Allow { remaining: r, .. } => assert_eq!(r + 1, remaining, "{offset_ms}"),
                Decision::Deny { .. } => assert_eq!(remaining, 0, "{offset_ms}"),
                Decision::Delay { .. } => panic!("no shaping"),
            }
        }
    }

    #[test]
    fn an_over_quota_window_waits_for_the_next_one() {
        let l = limiter(4, Duration::from_secs(1));
        // 4 already this window: the next window starts with previous = 4 at full weight, and
        // one request fits once 4 * (1 - e) <= 3, at e = 0.25 s.
        let s = state(2_000_000_000, 0, 4);
        let now = Instant::from_nanos(2_500_000_000);
        let (_, d) = l.acquire(Some(&s), now, 1, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_millis(750),
                reset: Duration::from_millis(1500)
            }
        );
    }

    /// Cloudflare's rule written directly: the windows at `t`, and the estimate with the request.
    fn conforms(requests: u64, period: u64, s: &State, t: u64, cost: u64) -> bool {
        let w = t / period * period;
        let (previous, current) = if w == s.start {
            (s.previous, s.current)
        } else if w == s.start + period {
            (s.current, 0)
        } else {
            (0, 0)
        };
        let p = u128::from(period);
        u128::from(previous) * (p - u128::from(t - w)) + u128::from(current + cost) * p
            <= u128::from(requests) * p
    }

    #[test]
    fn the_closed_form_matches_the_rule_to_the_nanosecond() {
        use crate::rand::{Rng, SeededRng};
        let mut rng = SeededRng::new(12);
        for _ in 0..3000 {
            let requests = 1 + rng.below(30);
            let period = 1 + rng.below(2_000_000_000);
            let l = limiter(requests, Duration::from_nanos(period));
            let start = (1 + rng.below(1000)) * period;
            let s = State {
                start,
                previous: rng.below(2 * requests),
                current: rng.below(requests + 2),
                seen: start,
            };
            let bytes = SlidingWindow::new(&l.rate()).encode(&s);
            let now = start + rng.below(2 * period);
            let cost = 1 + rng.below(3);
            let (_, d) = l.acquire(Some(&bytes), Instant::from_nanos(now), cost, Duration::ZERO);
            match d {
                Decision::Allow { .. } => assert!(conforms(requests, period, &s, now, cost)),
                Decision::Deny { retry_after, .. } if retry_after == Duration::MAX => {
                    assert!(cost > requests)
                }
                Decision::Deny { retry_after, .. } => {
                    let t = now + retry_after.as_nanos();
                    assert!(conforms(requests, period, &s, t, cost), "{s:?} at {t}");
                    assert!(
                        !conforms(requests, period, &s, t - 1, cost),
                        "{s:?} at {t} - 1"
                    );
                }
                Decision::Delay { .. } => panic!("no shaping"),
            }
        }
    }
}
