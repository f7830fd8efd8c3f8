//! Rate limiting: five algorithms behind one [`Limiter`], a bounded key table and the response
//! headers.
//!
//! A [`Limiter`] is an [`Algorithm`] and a [`Rate`] (`requests` per `period`, bursts of up to
//! `burst`). It keeps no state itself: [`Limiter::acquire`] takes a key's encoded state (the
//! bytes kept in the host's shared data, `None` for a key never seen), the current instant, the
//! request's cost (usually 1) and how long the caller may hold a request (`max_delay`), and
//! returns the state to write back and a [`Decision`]. That keeps each check one
//! compare-and-swap of a few bytes ([`crate::store::update`]), exact across a host's workers.
//! [`Limiter::decide`] is the same check returning the state in a fixed [`StateBytes`] buffer:
//! it allocates nothing, and is what the [`KeyTable`] and the filter run on every request.
//!
//! # Algorithms
//!
//! | algorithm | reference | state | admits |
//! |---|---|---|---|
//! | [`Algorithm::TokenBucket`] | Envoy `local_ratelimit` | 24 bytes | `burst` at once, then `requests` per `period`, refilled continuously |
//! | [`Algorithm::Gcra`] | governor, redis-cell | 8 bytes | the same as the token bucket, as a theoretical arrival time |
//! | [`Algorithm::FixedWindow`] | classic counter | 24 bytes | `requests` per window of `period` aligned on multiples of `period` |
//! | [`Algorithm::SlidingWindow`] | Cloudflare's sliding window counter | 32 bytes | `requests` per sliding `period`, estimated from two counters |
//! | [`Algorithm::LeakyBucket`] | leaky bucket as a queue (shaper) | 8 bytes | one request per `period / requests`, queueing up to `burst` |
//!
//! - **Token bucket.** The bucket starts full with `burst` tokens and gains `requests` tokens
//!   per `period`, continuously, never above `burst`; a request takes `cost` tokens. Refill is
//!   exact rational arithmetic in integer nanoseconds: whole tokens plus a remainder in units of
//!   `1 / period_ns` token, so `100` per `3s` is exactly that, with no float drift.
//! - **GCRA.** The generic cell rate algorithm keeps one theoretical arrival time `tat`. With
//!   emission interval `T = period / requests` and tolerance `tau = T * (burst - 1)`, a request
//!   of cost `n` conforms if `now >= tat + T * (n - 1) - tau` (for `n = 1`: `now >= tat - tau`),
//!   then `tat = max(tat, now) + T * n`. It admits exactly what the token bucket admits, in one
//!   u64; `T` is rounded down to the nanosecond as in governor, so when `period` is not a
//!   whole number of nanoseconds per request its rate is higher by less than one part in
//!   `T_ns` (for 3 per second: one in 333 million).
//! - **Fixed window.** A counter per window `[k * period, (k + 1) * period)`; `requests` per
//!   window. `burst` is ignored (a window admits its whole quota at once). Up to
//!   `2 * requests` can pass around a window boundary: that is the algorithm.
//! - **Sliding window counter.** Cloudflare's estimate of the last `period`: the previous
//!   window's count weighted by how much of it the sliding window still covers plus the current
//!   count. A request conforms when the estimate *including it* stays within `requests`:
//!   `prev * (period - elapsed) / period + current + cost <= requests`, computed exactly in
//!   integers. `burst` is ignored.
//! - **Leaky bucket (shaper).** The "queue for later" strategy: requests leave the bucket at
//!   a steady one per `T = period / requests`; each admitted request reserves the next free
//!   departure slot and waits for it. The bucket holds at most `burst` requests (queued and
//!   departing). A request is admitted when it fits in the bucket *and* its wait is at most
//!   `max_delay`; with `max_delay = 0` only a request that finds the queue empty passes, so the
//!   leaky bucket is then a strict pacer (no bursts at all). Use it with shaping.
//!
//! # Shaping (`max_delay`)
//!
//! Every algorithm computes the earliest instant `t >= now` at which the request would conform
//! if no other request came. `t == now`: [`Decision::Allow`]. `t - now <= max_delay`: the
//! request is admitted now and [`Decision::Delay`]ed by `t - now`; its cost is booked in the
//! state as if it had arrived at `t` (so it *reserves* its place: later requests queue behind
//! it). Otherwise [`Decision::Deny`] with `retry_after = t - now` (for the leaky bucket, whose
//! queue can also be full, `t` is when the queue is empty). What "delay" means per algorithm:
//!
//! - token bucket and GCRA go into debt: the request takes tokens that arrive within
//!   `max_delay`;
//! - fixed and sliding windows delay a request into the instant its window has room (the next
//!   window's start for the fixed window; the instant the estimate has dropped enough for the
//!   sliding window), booking it there;
//! - the leaky bucket is shaping itself: every request behind the first waits for its slot.
//!
//! # Exactness
//!
//! - `Deny { retry_after }` is exact: a request of the same cost at `now + retry_after` is
//!   allowed (if nothing else came), one nanosecond earlier it is not. A request whose cost can
//!   never conform (above `burst` for the buckets and GCRA, above `requests` for the windows)
//!   gets `retry_after = Duration::MAX`.
//! - `Allow { remaining }` is how many more requests of cost 1 the key takes at this instant
//!   (tokens left; quota left in the window; room left in the leaky bucket's queue).
//! - `reset` is the time until the key is back to a fresh state: the bucket full, the window
//!   over, the estimate at zero, the queue empty. Together they give the IETF header
//!   `RateLimit: "name";r=REMAINING;t=RESET_SECONDS` ([`rate_limit`]).
//!
//! # Time
//!
//! A key's clock never runs backwards: the token bucket and the windows remember the latest
//! instant they were updated and evaluate an earlier `now` as that instant, GCRA and the leaky
//! bucket simply see an earlier `now` as less elapsed time. Either way an earlier `now` (clock
//! skew between workers, a clock stepped back) never grants capacity: refill pauses until the
//! clock catches up. A delay is always measured from the caller's `now`. Nothing panics on any
//! instant or state: arithmetic is done in u128 or saturates.
//!
//! # State layouts
//!
//! Little-endian, no padding: consecutive u64 words, the layout [`crate::codec`]'s `Writer`
//! produces (checked by a test), written into a [`StateBytes`] so that a decision allocates
//! nothing. A value of another length decodes as no state (a fresh key). All instants are
//! nanoseconds on the host's clock.
//!
//! | algorithm | bytes | fields, in order |
//! |---|---|---|
//! | token bucket | 24 | `tokens: u64` whole tokens (at most `burst`), `credit: u64` fraction of the next token in units of `1 / period_ns` (`< period_ns`, 0 when full), `updated: u64` instant of `tokens`/`credit` (may be in the future after a delay) |
//! | GCRA | 8 | `tat: u64` theoretical arrival time |
//! | fixed window | 24 | `start: u64` window start (a multiple of `period`; may be the next window after a delay), `count: u64` cost booked in it, `seen: u64` latest `now` seen |
//! | sliding window | 32 | `start: u64` current window start, `previous: u64` count of the window before it, `current: u64` count of this window, `seen: u64` latest `now` seen |
//! | leaky bucket | 8 | `free_at: u64` instant the queue is empty (the next free departure slot) |
//!
//! The [`KeyTable`] stores each slot as the key's fingerprint (`u64`) followed by one of these.
//!
//! # Invariants
//!
//! - Tokens never exceed `burst`; a key never admits more than `burst + rate * span` in any
//!   span (token bucket, GCRA up to its rounding of `T`), counting delayed requests at the
//!   instant they are released.
//! - A fresh key (no or undecodable state) is a full bucket, an empty window, an empty queue.
//! - A denied request changes nothing: `acquire` returns no state to write.

pub mod adaptive;
mod fixed_window;
pub mod fleet;
mod gcra;
pub mod headers;
mod leaky_bucket;
pub mod policy;
pub mod request;
mod sliding_window;
mod table;
mod token_bucket;
pub mod wire;

use alloc::format;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Deref;

use crate::config::{ConfigError, FieldPath, Rate};
use crate::time::{Duration, Instant};

pub use headers::{rate_limit, rate_limit_policy, retry_after_secs};
pub use table::{fingerprint, slot_key, Claim, KeyTable, SlotOutcome};

/// Which algorithm a [`Limiter`] runs. See the [module docs](self) for each one's semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// A continuously refilled bucket of `burst` tokens (Envoy `local_ratelimit`).
    #[default]
    TokenBucket,
    /// The generic cell rate algorithm (governor, redis-cell): the token bucket in one u64.
    Gcra,
    /// A counter per window aligned on multiples of the period.
    FixedWindow,
    /// Cloudflare's sliding window counter.
    SlidingWindow,
    /// A queue drained at the rate: the shaper ("queue for later").
    LeakyBucket,
}

impl Algorithm {
    /// Every algorithm, in the order of the docs.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::TokenBucket,
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::LeakyBucket,
    ];

    /// The configuration name: `token_bucket`, `gcra`, `fixed_window`, `sliding_window` or
    /// `leaky_bucket`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Gcra => "gcra",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::LeakyBucket => "leaky_bucket",
        }
    }

    /// Parses a configuration name found at `path`.
    pub fn parse(path: &FieldPath, text: &str) -> Result<Algorithm, ConfigError> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or_else(|| {
                path.error(format!(
                    "expected \"token_bucket\", \"gcra\", \"fixed_window\", \"sliding_window\" \
                     or \"leaky_bucket\", got \"{text}\""
                ))
            })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a limiter decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted now.
    Allow {
        /// Requests of cost 1 the key still takes at this instant.
        remaining: u64,
        /// Time until the key is fresh again (bucket full, window over, queue empty).
        reset: Duration,
    },
    /// Admitted, but the request must wait `wait` before going upstream (shaping).
    Delay {
        /// How long to hold the request.
        wait: Duration,
        /// Time until the key is fresh again.
        reset: Duration,
    },
    /// Refused.
    Deny {
        /// Exact time until a request of this cost would be allowed; what `Retry-After` says
        /// (see [`retry_after_secs`]). [`Duration::MAX`] when the cost can never conform.
        retry_after: Duration,
        /// Time until the key is fresh again.
        reset: Duration,
    },
}

impl Decision {
    /// Whether the request goes upstream (now or after a delay).
    pub const fn is_admitted(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }

    /// Time until the key is fresh again, whatever the decision.
    pub const fn reset(&self) -> Duration {
        match self {
            Decision::Allow { reset, .. }
            | Decision::Delay { reset, .. }
            | Decision::Deny { reset, .. } => *reset,
        }
    }
}

/// A rate limiting algorithm with its rate. Holds no per-key state: see [`Limiter::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limiter {
    algorithm: Algorithm,
    rate: Rate,
    /// `period / requests` in nanoseconds, at least 1 ([`Rate::emission_interval`]), computed
    /// once here rather than divided out on every check.
    interval: u64,
    /// Whether `requests` divides `period` exactly (`interval` is then exact).
    exact: bool,
}

impl Limiter {
    /// A limiter running `algorithm` at `rate`.
    ///
    /// A rate that did not come through [`Rate::from_spec`] is brought into range instead of
    /// being refused: `period` at least 1 ns, `requests` from 1 to one per nanosecond, `burst`
    /// at least 1. [`Limiter::rate`] returns the rate in force.
    pub fn new(algorithm: Algorithm, rate: Rate) -> Limiter {
        let period = Duration::from_nanos(rate.period.as_nanos().max(1));
        let rate = Rate {
            requests: rate.requests.clamp(1, period.as_nanos()),
            period,
            burst: rate.burst.max(1),
        };
        let interval = rate.emission_interval().as_nanos().max(1);
        Limiter {
            algorithm,
            rate,
            interval,
            exact: period.as_nanos().is_multiple_of(rate.requests),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Applies one request of `cost` (usually 1) at `now` to a key's `state` (`None` or
    /// undecodable bytes: a fresh key).
    ///
    /// `max_delay` > 0 enables shaping: a request that does not conform now but would within
    /// `max_delay` is admitted later: it reserves its place in the state and gets
    /// [`Decision::Delay`]. Returns the new state to store (`None`: unchanged, nothing to write)
    /// and the decision. [`Limiter::decide`] does the same without allocating.
    pub fn acquire(
        &self,
        state: Option<&[u8]>,
        now: Instant,
        cost: u64,
        max_delay: Duration,
    ) -> (Option<Vec<u8>>, Decision) {
        let (next, decision) = self.decide(state, now, cost, max_delay);
        (next.map(|s| s.to_vec()), decision)
    }

    /// [`Limiter::acquire`] with the new state in a fixed buffer: no allocation per decision.
    pub fn decide(
        &self,
        state: Option<&[u8]>,
        now: Instant,
        cost: u64,
        max_delay: Duration,
    ) -> (Option<StateBytes>, Decision) {
        match self.algorithm {
            Algorithm::TokenBucket => run(&self.token_bucket(), state, now, cost, max_delay),
            Algorithm::Gcra => run(&self.gcra(), state, now, cost, max_delay),
            Algorithm::FixedWindow => run(
                &fixed_window::FixedWindow::new(&self.rate),
                state,
                now,
                cost,
                max_delay,
            ),
            Algorithm::SlidingWindow => run(
                &sliding_window::SlidingWindow::new(&self.rate),
                state,
                now,
                cost,
                max_delay,
            ),
            Algorithm::LeakyBucket => run(
                &leaky_bucket::LeakyBucket::new(self.interval, &self.rate),
                state,
                now,
                cost,
                max_delay,
            ),
        }
    }

    /// True when `state` is equivalent to a fresh key at `now` (bucket full, window over, queue
    /// empty, or undecodable): its slot can be given to another key.
    pub fn is_idle(&self, state: &[u8], now: Instant) -> bool {
        match self.algorithm {
            Algorithm::TokenBucket => idle(&self.token_bucket(), state, now),
            Algorithm::Gcra => idle(&self.gcra(), state, now),
            Algorithm::FixedWindow => idle(&fixed_window::FixedWindow::new(&self.rate), state, now),
            Algorithm::SlidingWindow => {
                idle(&sliding_window::SlidingWindow::new(&self.rate), state, now)
            }
            Algorithm::LeakyBucket => idle(
                &leaky_bucket::LeakyBucket::new(self.interval, &self.rate),
                state,
                now,
            ),
        }
    }

    fn token_bucket(&self) -> token_bucket::TokenBucket {
        token_bucket::TokenBucket::new(&self.rate, self.exact.then_some(self.interval))
    }

    fn gcra(&self) -> gcra::Gcra {
        gcra::Gcra::new(self.interval, &self.rate)
    }

    /// Size in bytes of this algorithm's state.
    pub fn state_len(&self) -> usize {
        match self.algorithm {
            Algorithm::TokenBucket => token_bucket::LEN,
            Algorithm::Gcra => gcra::LEN,
            Algorithm::FixedWindow => fixed_window::LEN,
            Algorithm::SlidingWindow => sliding_window::LEN,
            Algorithm::LeakyBucket => leaky_bucket::LEN,
        }
    }
}

/// One algorithm, seen by the common decision logic of [`run`].
///
/// Each algorithm answers one question, "when would this request conform?", and knows how to
/// book a request at an instant; `run` turns that into allow / delay / deny the same way for
/// all of them, which is what makes `retry_after` and shaping consistent across algorithms.
trait Meter {
    type State;

    fn decode(&self, bytes: &[u8]) -> Option<Self::State>;
    fn encode(&self, state: &Self::State) -> StateBytes;
    /// The state of a key never seen.
    fn fresh(&self, now: Instant) -> Self::State;
    /// The instant the key is evaluated at for a request at `now`: `now`, or later when the
    /// state has seen a later instant (a key's clock never runs backwards).
    fn clock(&self, _state: &Self::State, now: Instant) -> Instant {
        now
    }
    /// The state brought forward to `clock` (the token bucket's refill), done once per decision
    /// so that the steps below find it already there. It must not change any answer: every
    /// step gives the same result on the advanced state as on the original one.
    fn advance(&self, state: Self::State, _clock: Instant) -> Self::State {
        state
    }
    /// The earliest instant, at or after `clock(state, now)`, at which a request of `cost`
    /// conforms if nothing else comes; `None` when it never can.
    fn conform_at(&self, state: &Self::State, now: Instant, cost: u64) -> Option<Instant>;
    /// Whether a request that conforms only after `wait` may be held (beyond `max_delay`,
    /// which `run` checks). The leaky bucket also needs room in its queue.
    fn may_wait(&self, _state: &Self::State, _now: Instant, _cost: u64) -> bool {
        true
    }
    /// The state after booking a request of `cost` at `at` (a conforming instant), seen at
    /// `now`.
    fn book(&self, state: &Self::State, at: Instant, now: Instant, cost: u64) -> Self::State;
    /// Requests of cost 1 the key takes at `now` without waiting.
    fn remaining(&self, state: &Self::State, now: Instant) -> u64;
    /// Time from `now` until the state is fresh again.
    fn reset(&self, state: &Self::State, now: Instant) -> Duration;
    fn is_idle(&self, state: &Self::State, now: Instant) -> bool;
}

fn run<M: Meter>(
    meter: &M,
    bytes: Option<&[u8]>,
    now: Instant,
    cost: u64,
    max_delay: Duration,
) -> (Option<StateBytes>, Decision) {
    let state = match bytes.and_then(|b| meter.decode(b)) {
        Some(s) => s,
        None => meter.fresh(now),
    };
    let clock = meter.clock(&state, now);
    let state = meter.advance(state, clock);
    let Some(at) = meter.conform_at(&state, now, cost) else {
        return (
            None,
            Decision::Deny {
                retry_after: Duration::MAX,
                reset: meter.reset(&state, now),
            },
        );
    };
    if at <= clock {
        let next = meter.book(&state, clock, now, cost);
        let decision = Decision::Allow {
            remaining: meter.remaining(&next, now),
            reset: meter.reset(&next, now),
        };
        return (Some(meter.encode(&next)), decision);
    }
    let wait = at.saturating_since(now);
    if wait <= max_delay && meter.may_wait(&state, now, cost) {
        let next = meter.book(&state, at, now, cost);
        let decision = Decision::Delay {
            wait,
            reset: meter.reset(&next, now),
        };
        return (Some(meter.encode(&next)), decision);
    }
    (
        None,
        Decision::Deny {
            retry_after: wait,
            reset: meter.reset(&state, now),
        },
    )
}

fn idle<M: Meter>(meter: &M, bytes: &[u8], now: Instant) -> bool {
    match meter.decode(bytes) {
        Some(state) => meter.is_idle(&state, now),
        None => true,
    }
}

/// The largest encoded state of any algorithm (the sliding window's).
pub const MAX_STATE_LEN: usize = 32;

/// A key's encoded state in a fixed buffer, as [`Limiter::decide`] returns it: the bytes to
/// store in shared data, without a heap allocation. Dereferences to those bytes (the layouts of
/// the [module docs](self)).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StateBytes {
    len: u8,
    bytes: [u8; MAX_STATE_LEN],
}

impl StateBytes {
    /// `N` u64 words, little-endian, in order (`N` at most 4: longer input is cut).
    // Always inlined, as `read_words` and `put_word`: at the size-optimising opt-level of the
    // release profile, the generic copy and iterator helpers would each be a call on every
    // decision.
    #[inline(always)]
    fn words<const N: usize>(words: [u64; N]) -> StateBytes {
        let mut bytes = [0; MAX_STATE_LEN];
        // Unrolled by hand (the opt-level does not unroll loops): stores at constant offsets.
        for_each_word(N, |i| {
            if let Some(word) = words.get(i) {
                put_word(&mut bytes, i, *word);
            }
        });
        StateBytes {
            len: (8 * N).min(MAX_STATE_LEN) as u8,
            bytes,
        }
    }

    /// The encoded bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl Deref for StateBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for StateBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for StateBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

/// The `N` little-endian u64 words of `bytes`, if it is exactly `8 * N` bytes long: the
/// decoding of [`StateBytes::words`].
#[inline(always)]
fn read_words<const N: usize>(bytes: &[u8]) -> Option<[u64; N]> {
    if bytes.len() != 8 * N {
        return None;
    }
    let mut words = [0; N];
    for_each_word(N, |i| {
        if let Some(w) = words.get_mut(i) {
            *w = word(bytes, i);
        }
    });
    Some(words)
}

/// The little-endian u64 at bytes `8 * i..8 * i + 8` of `bytes` (0 past the end).
#[inline(always)]
fn word(bytes: &[u8], i: usize) -> u64 {
    match bytes.get(8 * i..8 * i + 8) {
        Some(&[b0, b1, b2, b3, b4, b5, b6, b7]) => {
            u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7])
        }
        _ => 0,
    }
}

/// Calls `f(i)` for each `i < n.min(4)`, unrolled: every call has a constant `i` once inlined.
#[inline(always)]
fn for_each_word(n: usize, mut f: impl FnMut(usize)) {
    if n > 0 {
        f(0);
    }
    if n > 1 {
        f(1);
    }
    if n > 2 {
        f(2);
    }
    if n > 3 {
        f(3);
    }
}

/// Writes `word` little-endian at bytes `8 * i..8 * i + 8` of `bytes` (nothing past the end).
#[inline(always)]
fn put_word(bytes: &mut [u8], i: usize, word: u64) {
    let [l0, l1, l2, l3, l4, l5, l6, l7] = word.to_le_bytes();
    if let Some([b0, b1, b2, b3, b4, b5, b6, b7]) = bytes.get_mut(8 * i..8 * i + 8) {
        (*b0, *b1, *b2, *b3, *b4, *b5, *b6, *b7) = (l0, l1, l2, l3, l4, l5, l6, l7);
    }
}

/// `ceil(a / b)` for `b > 0` (1 for 0), clamped to u64.
fn div_ceil_u64(a: u128, b: u64) -> u64 {
    let (q, r) = div_rem(a, b);
    let q = q + u128::from(r > 0);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// `(n / d, n % d)` for `d > 0` (1 for 0). Every divisor in this module is a u64, so this
/// stands in for the library's general u128 division (a slow call, and a kilobyte of every
/// module): one u64 division when `n` fits in u64, which is the common case; otherwise the
/// high half by a u64 division and the low half bit by bit.
fn div_rem(n: u128, d: u64) -> (u128, u64) {
    let d = d.max(1);
    let (hi, lo) = ((n >> 64) as u64, n as u64);
    if hi == 0 {
        return (u128::from(lo / d), lo % d);
    }
    let (q_hi, mut rem) = (hi / d, hi % d);
    let mut q_lo = 0u64;
    for i in (0..64).rev() {
        // rem < d, so rem * 2 + 1 < 2 * d: one subtraction keeps it below d. The bit shifted
        // out of rem is the 2^64 the wrapping subtraction takes back.
        let carry = rem >> 63;
        rem = (rem << 1) | ((lo >> i) & 1);
        q_lo <<= 1;
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            q_lo |= 1;
        }
    }
    ((u128::from(q_hi) << 64) | u128::from(q_lo), rem)
}

/// The start of the window of length `period` (> 0) that holds `t`.
fn window_start(t: u64, period: u64) -> u64 {
    t - t % period.max(1)
}

impl crate::routes::Routed for policy::RateLimitPolicy {
    fn routes(&self) -> Option<&[alloc::string::String]> {
        self.routes.as_deref()
    }
}

#[cfg(test)]
mod tests;
