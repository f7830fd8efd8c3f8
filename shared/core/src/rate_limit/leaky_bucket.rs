//! The leaky bucket as a queue: the shaper, Keel's "queue for later" strategy.
//!
//! Requests leave the bucket at a steady one per `T = period / requests` (rounded down to the
//! nanosecond, at least 1; a request of cost `n` takes `n * T`). The state is `free_at`, the
//! instant the last admitted request has left, which is when the next one may go. An arriving
//! request reserves the departure slot `max(free_at, now)` and waits until then:
//! `wait = free_at - now`. It is admitted when
//!
//! - it fits in the bucket: what is queued ahead of it plus its own cost is at most `burst`
//!   requests (`free_at - now + n * T <= burst * T`), and
//! - its wait is at most the caller's `max_delay`;
//!
//! otherwise it is denied, with `retry_after` the time until the queue is empty (when it would
//! go at once). With `max_delay = 0` only a request that finds the queue empty passes: a strict
//! pacer. With a `max_delay` of at least `(burst - 1) * T` the whole bucket is usable, and the
//! upstream never sees more than one request per `T`, bursts included: that smoothing is what
//! sets it apart from the token bucket with shaping, which lets `burst` through at once.
//!
//! Layout (8 bytes): `free_at: u64`.

use super::{div_ceil_u64, read_words, Meter, StateBytes};
use crate::config::Rate;
use crate::time::{Duration, Instant};

/// Encoded size of the state.
pub(super) const LEN: usize = 8;

pub(super) struct LeakyBucket {
    /// Departure interval in nanoseconds, at least 1.
    t: u64,
    burst: u64,
}

impl LeakyBucket {
    /// The leaky bucket of `rate`, whose emission interval is `t` ns.
    pub(super) fn new(t: u64, rate: &Rate) -> Self {
        LeakyBucket {
            t: t.max(1),
            burst: rate.burst.max(1),
        }
    }
}

impl Meter for LeakyBucket {
    /// The instant the queue is empty, in nanoseconds.
    type State = u64;

    fn decode(&self, bytes: &[u8]) -> Option<u64> {
        let [free_at] = read_words(bytes)?;
        Some(free_at)
    }

    fn encode(&self, free_at: &u64) -> StateBytes {
        StateBytes::words([*free_at])
    }

    fn fresh(&self, _now: Instant) -> u64 {
        0
    }

    fn conform_at(&self, free_at: &u64, now: Instant, cost: u64) -> Option<Instant> {
        if cost > self.burst {
            return None;
        }
        Some(Instant::from_nanos((*free_at).max(now.as_nanos())))
    }

    fn may_wait(&self, free_at: &u64, now: Instant, cost: u64) -> bool {
        let queued = u128::from(free_at.saturating_sub(now.as_nanos()));
        queued + u128::from(cost) * u128::from(self.t)
            <= u128::from(self.burst) * u128::from(self.t)
    }

    fn book(&self, free_at: &u64, at: Instant, _now: Instant, cost: u64) -> u64 {
        (*free_at)
            .max(at.as_nanos())
            .saturating_add(cost.saturating_mul(self.t))
    }

    fn remaining(&self, free_at: &u64, now: Instant) -> u64 {
        let queued = div_ceil_u64(u128::from(free_at.saturating_sub(now.as_nanos())), self.t);
        self.burst.saturating_sub(queued)
    }

    fn reset(&self, free_at: &u64, now: Instant) -> Duration {
        Instant::from_nanos(*free_at).saturating_since(now)
    }

    fn is_idle(&self, free_at: &u64, now: Instant) -> bool {
        *free_at <= now.as_nanos()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use crate::config::Rate;
    use crate::rate_limit::{Algorithm, Decision, Limiter};
    use crate::time::{Duration, Instant};

    fn limiter(burst: u64) -> Limiter {
        Limiter::new(
            Algorithm::LeakyBucket,
            Rate {
                requests: 10,
                period: Duration::from_secs(1),
                burst,
            },
        )
    }

    #[test]
    fn without_a_delay_it_is_a_strict_pacer() {
        let l = limiter(5);
        let now = Instant::from_nanos(1_000_000_000);
        let (s, d) = l.acquire(None, now, 1, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Allow {
                remaining: 4,
                reset: Duration::from_millis(100)
            }
        );
        let (_, d) = l.acquire(s.as_deref(), now, 1, Duration::ZERO);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_millis(100),
                reset: Duration::from_millis(100)
            }
        );
    }

    #[test]
    fn requests_queue_one_per_interval_up_to_the_bucket_size() {
        let l = limiter(4);
        let now = Instant::from_nanos(1_000_000_000);
        let mut state = None;
        let mut waits = alloc::vec::Vec::new();
        for _ in 0..6 {
            let (s, d) = l.acquire(state.as_deref(), now, 1, Duration::from_secs(10));
            if s.is_some() {
                state = s;
            }
            waits.push(d);
        }
        let ms = Duration::from_millis;
        assert!(matches!(waits[0], Decision::Allow { .. }));
        assert_eq!(
            waits[1],
            Decision::Delay {
                wait: ms(100),
                reset: ms(200)
            }
        );
        assert_eq!(
            waits[2],
            Decision::Delay {
                wait: ms(200),
                reset: ms(300)
            }
        );
        assert_eq!(
            waits[3],
            Decision::Delay {
                wait: ms(300),
                reset: ms(400)
            }
        );
        // The bucket holds 4: the 5th does not fit although 400 ms is within max_delay.
        assert_eq!(
            waits[4],
            Decision::Deny {
                retry_after: ms(400),
                reset: ms(400)
            }
        );
        assert_eq!(waits[5], waits[4]);
        // max_delay bounds the queue too.
        let (_, d) = l.acquire(None, now, 1, ms(150));
        assert!(matches!(d, Decision::Allow { .. }));
        let mut state = None;
        let mut admitted = 0;
        for _ in 0..4 {
            let (s, d) = l.acquire(state.as_deref(), now, 1, ms(150));
            if s.is_some() {
                state = s;
            }
            admitted += u32::from(d.is_admitted());
        }
        assert_eq!(admitted, 2);
    }
}
