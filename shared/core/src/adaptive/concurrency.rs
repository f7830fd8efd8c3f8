//! Adaptive concurrency limits: how many requests may be in flight to an upstream, found from
//! what the requests measure.
//!
//! One [`LimitState`] per limited scope (a route, a cluster, or everything) lives in the
//! host's shared data, so every worker counts the same in-flight requests against the same
//! limit. A request is admitted by [`LimitState::admit`] (in flight below the limit: count it)
//! and completed by [`LimitState::complete`] with its round-trip time and outcome, which feeds
//! the controller. Both are pure functions of the state, `now` and the sample; the glue runs them
//! inside a compare-and-swap loop ([`crate::store::update`]).
//!
//! Two controllers, chosen per policy ([`Controller`]):
//!
//! - **Gradient** (Envoy's `adaptive_concurrency` gradient controller). Every
//!   `update_interval` the samples of the interval are reduced to one, their
//!   `percentile` (nearest rank), and the limit becomes
//!   `g = clamp(min_rtt * (1 + buffer) / sample, 0.5, 2)`, `l = limit * g`,
//!   `limit = floor(l + sqrt(l))`, within `[min_limit, max_limit]`. Defaults are Envoy's: 50th
//!   percentile, buffer 25 %, minimum 3, maximum 1000, an update every 100 ms (the interval its
//!   documentation uses); a minimum-RTT probe every 10 s (BBR's min-RTT window: the probe here
//!   costs half the limit for one interval, not a pinned limit, so it can come more often than
//!   Envoy's 60 s).
//! - **AIMD** (Netflix concurrency-limits' `AIMDLimit`). Per completed request: a drop (a
//!   `5xx`, a reset, or a round trip longer than `timeout`) multiplies the limit by `backoff`
//!   (0.9); a success while at least half the limit is in use adds one. Defaults are Netflix's:
//!   start 20, minimum 20, maximum 200, timeout 5 s.
//!
//! # The minimum RTT without stopping traffic
//!
//! Envoy measures `min_rtt` in a window during which the limit is *pinned to
//! `min_concurrency`* (3) until `request_count` (50) samples came in: every request beyond 3 is
//! refused for that time, once a minute and at start-up. Here the estimate is the lowest
//! *interval aggregate* (the same percentile the gradient uses, never a single lucky sample, so
//! noise such as CPU queueing on a busy host is in both sides of the ratio):
//!
//! 1. It *falls* at once: an interval whose aggregate is below the estimate replaces it, so no
//!    window is needed at start or when the upstream gets faster (the first interval sets it).
//! 2. It *rises* only through a probe interval, every `min_rtt_window` (and after five updates in
//!    a row at the minimum limit, as Envoy does): for one `update_interval` the limit is
//!    multiplied by `probe_fraction` (default 0.5, after BBR v2's ProbeRTT at half the window
//!    rather than at four packets), never below `min_limit`; that interval's aggregate becomes
//!    the estimate and the limit before the probe is restored. Halving the in-flight requests
//!    lets the upstream's queue drain (a limit that settled at `(1 + buffer)` times its
//!    capacity, or up to twice, falls below it), so the probe sees the unqueued latency while
//!    traffic keeps flowing at half the limit, for one interval (1 % of the time with the
//!    defaults). Probing often matters: the unqueued latency includes the proxy's own, which
//!    grows when the host's CPUs are busy, and an estimate taken before the load came would
//!    hold the limit too low.
//!
//! # Layout in shared data
//!
//! `LimitState`, little-endian: version `u8` (= 1), limit `u32`, in flight `u32`,
//! interval start `u64` (ns), minimum RTT `u64` (ns, 0 = not known), window start `u64` (ns),
//! probe restore-limit `u32` (0 = not probing), updates at the minimum `u8`, samples seen this interval `u32`, then up to `max_samples`
//! samples `u32` (µs). See `docs/shared-data.md`.
//!
//! Invariants: `in_flight` never goes below zero (a completion without an admission is
//! ignored); the limit stays within `[min_limit, max_limit]`; a sample is a successful round
//! trip, so fast failures never lower the minimum RTT.

use alloc::vec::Vec;

use super::math::sqrt;
use crate::codec::{Reader, Writer};
use crate::time::{Duration, Instant};

const VERSION: u8 = 1;

/// The gradient controller's parameters (Envoy's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct GradientParams {
    /// How often the limit is recomputed (Envoy: `concurrency_update_interval`).
    pub update_interval: Duration,
    /// Which percentile of an interval's samples stands for it, in `(0, 100]`.
    pub percentile: f64,
    /// Latency above the minimum RTT tolerated before the limit falls, as a fraction.
    pub buffer: f64,
    /// The limit never goes below this (Envoy: `min_concurrency`).
    pub min_limit: u32,
    /// The limit never goes above this (Envoy: `max_concurrency_limit`).
    pub max_limit: u32,
    /// The limit before anything is measured.
    pub initial_limit: u32,
    /// How often the minimum RTT is measured again by a probe interval (BBR: 10 s).
    pub min_rtt_window: Duration,
    /// The limit during a probe interval, as a fraction of the limit.
    pub probe_fraction: f64,
    /// How many samples of an interval are kept (the newest), at most 1024.
    pub max_samples: u32,
}

impl Default for GradientParams {
    fn default() -> Self {
        GradientParams {
            update_interval: Duration::from_millis(100),
            percentile: 50.0,
            buffer: 0.25,
            min_limit: 3,
            max_limit: 1000,
            initial_limit: 3,
            min_rtt_window: Duration::from_secs(10),
            probe_fraction: 0.5,
            max_samples: 64,
        }
    }
}

/// The AIMD controller's parameters (Netflix `AIMDLimit`'s defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct AimdParams {
    /// The limit before anything is measured.
    pub initial_limit: u32,
    /// The limit never goes below this.
    pub min_limit: u32,
    /// The limit never goes above this.
    pub max_limit: u32,
    /// What a drop multiplies the limit by, in `(0, 1)`.
    pub backoff: f64,
    /// A round trip longer than this counts as a drop.
    pub timeout: Duration,
}

impl Default for AimdParams {
    fn default() -> Self {
        AimdParams {
            initial_limit: 20,
            min_limit: 20,
            max_limit: 200,
            backoff: 0.9,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Which controller finds the limit.
#[derive(Clone, Debug, PartialEq)]
pub enum Controller {
    /// Envoy's gradient controller, with a minimum RTT that never stops traffic.
    Gradient(GradientParams),
    /// Additive increase, multiplicative decrease on drops.
    Aimd(AimdParams),
}

impl Controller {
    /// The limit before anything is measured.
    pub fn initial_limit(&self) -> u32 {
        match self {
            Controller::Gradient(p) => p.initial_limit,
            Controller::Aimd(p) => p.initial_limit,
        }
    }
}

/// How a request ended, for the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered well: the round trip is a latency sample.
    Success,
    /// The upstream shed or failed it (`5xx`), or the stream was reset: a drop for AIMD, no
    /// sample for the gradient.
    Dropped,
    /// Neither (e.g. the client went away): only the in-flight count changes.
    Ignored,
}

/// Whether a request may go to the upstream now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Admitted: it counts as in flight until completed.
    Allow {
        /// The limit it was admitted under.
        limit: u32,
    },
    /// Refused: the limit is reached.
    Reject {
        /// The limit that was reached.
        limit: u32,
    },
}

/// The shared state of one limited scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitState {
    /// The current limit.
    pub limit: u32,
    /// Requests admitted and not completed.
    pub in_flight: u32,
    /// Start of the current update interval (gradient).
    pub interval_start: Instant,
    /// The minimum RTT estimate; zero while unknown (gradient).
    pub min_rtt: Duration,
    /// When the minimum RTT was last measured by a probe, or the state created (gradient).
    pub window_start: Instant,
    /// During a probe: the limit to restore after it; zero when not probing (gradient).
    pub probe_restore: u32,
    /// Consecutive updates that ended at the minimum limit (gradient).
    pub at_min: u8,
    /// Samples seen this interval (the ring's write position is this modulo its capacity).
    pub seen: u32,
    /// The newest samples of this interval, in microseconds.
    pub samples: Vec<u32>,
}

impl LimitState {
    /// A fresh state at `now` for `controller`.
    pub fn new(controller: &Controller, now: Instant) -> LimitState {
        LimitState {
            limit: controller.initial_limit(),
            interval_start: now,
            window_start: now,
            ..LimitState::default()
        }
    }

    /// Admits a request if fewer than `limit` are in flight, counting it.
    pub fn admit(&mut self) -> Admission {
        if self.in_flight < self.limit {
            self.in_flight += 1;
            Admission::Allow { limit: self.limit }
        } else {
            Admission::Reject { limit: self.limit }
        }
    }

    /// Completes an admitted request that took `rtt` and ended as `outcome`, at `now`; feeds the
    /// controller. Returns the limit after it.
    pub fn complete(
        &mut self,
        controller: &Controller,
        now: Instant,
        rtt: Duration,
        outcome: Outcome,
    ) -> u32 {
        let in_flight_before = self.in_flight;
        self.in_flight = self.in_flight.saturating_sub(1);
        match controller {
            Controller::Gradient(p) => self.gradient(p, now, rtt, outcome),
            Controller::Aimd(p) => self.aimd(p, in_flight_before, rtt, outcome),
        }
        self.limit
    }

    fn aimd(&mut self, p: &AimdParams, in_flight: u32, rtt: Duration, outcome: Outcome) {
        let dropped =
            outcome == Outcome::Dropped || (outcome == Outcome::Success && rtt > p.timeout);
        if dropped {
            let backed_off = (f64::from(self.limit) * p.backoff) as u32;
            self.limit = backed_off.max(p.min_limit);
        } else if outcome == Outcome::Success && in_flight.saturating_mul(2) >= self.limit {
            self.limit = self.limit.saturating_add(1).min(p.max_limit);
        }
    }

    fn gradient(&mut self, p: &GradientParams, now: Instant, rtt: Duration, outcome: Outcome) {
        if outcome == Outcome::Success {
            self.push_sample(p, rtt);
        }
        if now.saturating_since(self.interval_start) < p.update_interval {
            return;
        }
        self.interval_start = now;
        if self.samples.is_empty() {
            // An interval without a success changes nothing (a probe that saw none ends).
            if self.probe_restore > 0 {
                self.limit = self.probe_restore;
                self.probe_restore = 0;
                self.window_start = now;
            }
            return;
        }
        let sample_us = percentile(&mut self.samples, p.percentile);
        let sample = Duration::from_micros(u64::from(sample_us));
        self.clear_samples();
        if self.probe_restore > 0 {
            // The probe interval is over: its aggregate is the new estimate, up or down, and
            // the limit from before it comes back.
            self.min_rtt = sample;
            self.limit = self.probe_restore;
            self.probe_restore = 0;
            self.window_start = now;
            return;
        }
        if self.min_rtt.is_zero() || sample < self.min_rtt {
            self.min_rtt = sample;
        }
        self.limit = gradient_limit(p, self.limit, self.min_rtt, sample_us);
        self.at_min = if self.limit <= p.min_limit {
            self.at_min.saturating_add(1)
        } else {
            0
        };
        if now.saturating_since(self.window_start) >= p.min_rtt_window || self.at_min >= 5 {
            self.probe_restore = self.limit;
            self.at_min = 0;
            let probe = (f64::from(self.limit) * p.probe_fraction) as u32;
            self.limit = probe.clamp(p.min_limit.max(1), self.limit.max(1));
        }
    }

    fn push_sample(&mut self, p: &GradientParams, rtt: Duration) {
        let micros = u32::try_from(rtt.as_nanos() / 1_000).unwrap_or(u32::MAX);
        let capacity = p.max_samples.clamp(1, 1024) as usize;
        if self.samples.len() < capacity {
            self.samples.push(micros);
        } else if let Some(slot) = self.samples.get_mut(self.seen as usize % capacity) {
            *slot = micros;
        }
        self.seen = self.seen.wrapping_add(1);
    }

    fn clear_samples(&mut self) {
        self.samples.clear();
        self.seen = 0;
    }

    /// The state in its shared-data layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(42 + 4 * self.samples.len())
            .u8(VERSION)
            .u32(self.limit)
            .u32(self.in_flight)
            .u64(self.interval_start.as_nanos())
            .u64(self.min_rtt.as_nanos())
            .u64(self.window_start.as_nanos())
            .u32(self.probe_restore)
            .u8(self.at_min)
            .u32(self.seen);
        for s in &self.samples {
            w = w.u32(*s);
        }
        w.finish()
    }

    /// Decodes the layout; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<LimitState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let mut state = LimitState {
            limit: r.u32()?,
            in_flight: r.u32()?,
            interval_start: Instant::from_nanos(r.u64()?),
            min_rtt: Duration::from_nanos(r.u64()?),
            window_start: Instant::from_nanos(r.u64()?),
            probe_restore: r.u32()?,
            at_min: r.u8()?,
            seen: r.u32()?,
            samples: Vec::new(),
        };
        if !r.remaining().is_multiple_of(4) || r.remaining() > 4 * 1024 {
            return None;
        }
        while r.remaining() > 0 {
            state.samples.push(r.u32()?);
        }
        Some(state)
    }
}

/// Envoy's gradient step: `g = clamp(min_rtt * (1 + buffer) / sample, 0.5, 2)`,
/// `l = limit * g`, `floor(l + sqrt(l))` within `[min_limit, max_limit]`. `sample` in µs.
pub fn gradient_limit(p: &GradientParams, limit: u32, min_rtt: Duration, sample_us: u32) -> u32 {
    let min_us = min_rtt.as_nanos() as f64 / 1_000.0;
    let sample = f64::from(sample_us.max(1));
    let g = (min_us * (1.0 + p.buffer) / sample).clamp(0.5, 2.0);
    let l = f64::from(limit) * g;
    let next = l + sqrt(l);
    let next = if next >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        next as u32
    };
    next.clamp(p.min_limit, p.max_limit.max(p.min_limit))
}

/// The `pct`-th percentile of `samples` by nearest rank (sorts them); 0 when empty.
pub fn percentile(samples: &mut [u32], pct: f64) -> u32 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let n = samples.len();
    let rank = ((pct / 100.0) * n as f64 + 0.999_999_999) as usize;
    let index = rank.clamp(1, n) - 1;
    samples.get(index).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn at(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000)
    }

    #[test]
    fn gradient_step_is_envoys_formula() {
        let p = GradientParams::default();
        // g = 10 * 1.25 / 10 = 1.25: l = 3.75, 3.75 + 1.936 = 5.69 -> 5.
        assert_eq!(gradient_limit(&p, 3, ms(10), 10_000), 5);
        // g clamps at 2: l = 10, 10 + 3.16 -> 13.
        assert_eq!(gradient_limit(&p, 5, ms(10), 1_000), 13);
        // g = 12.5 / 20 = 0.625: l = 25, 25 + 5 = 30.
        assert_eq!(gradient_limit(&p, 40, ms(10), 20_000), 30);
        // g clamps at 0.5: l = 50, 50 + 7.07 -> 57.
        assert_eq!(gradient_limit(&p, 100, ms(10), 100_000), 57);
        // Never below the minimum nor above the maximum.
        assert_eq!(gradient_limit(&p, 1, ms(10), 100_000), 3);
        assert_eq!(gradient_limit(&p, 900, ms(10), 1_000), 1000);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        assert_eq!(percentile(&mut [5, 1, 4, 2, 3], 50.0), 3);
        assert_eq!(percentile(&mut [1, 2, 3, 4], 50.0), 2);
        assert_eq!(percentile(&mut [1, 2, 3, 4], 90.0), 4);
        assert_eq!(percentile(&mut [7], 1.0), 7);
        assert_eq!(percentile(&mut [], 50.0), 0);
    }

    /// Runs `n` requests of `rtt` each, admitted and completed at `now` (the in-flight count
    /// returns to where it was).
    fn requests(state: &mut LimitState, c: &Controller, now: Instant, rtt: Duration, n: u32) {
        for _ in 0..n {
            assert!(matches!(state.admit(), Admission::Allow { .. }));
            state.complete(c, now, rtt, Outcome::Success);
        }
    }

    #[test]
    fn gradient_limits_follow_a_scripted_latency_sequence() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(0));
        assert_eq!(s.limit, 3);
        // Interval 1: 10 ms round trips.
        requests(&mut s, &c, at(50), ms(10), 3);
        assert_eq!(
            s.min_rtt,
            Duration::ZERO,
            "learnt from the interval's aggregate"
        );
        assert_eq!(s.limit, 3, "no update inside the interval");
        // The first completion after 100 ms updates: the p50 is 10 ms, the first aggregate is
        // the minimum RTT, g = 1.25 -> 5.
        requests(&mut s, &c, at(100), ms(10), 1);
        assert_eq!((s.min_rtt, s.limit), (ms(10), 5));
        // Faster than the minimum: the minimum falls at once to 8 ms, the p50 of [8] is 8:
        // g = 1.25 -> 6.25 + 2.5 = 8.
        requests(&mut s, &c, at(200), ms(8), 1);
        assert_eq!((s.min_rtt, s.limit), (ms(8), 8));
        // Latency doubles (the upstream queues): p50 of [16, 16, 16] = 16 ms, g = 10/16 =
        // 0.625: l = 5, 5 + 2.236 -> 7.
        requests(&mut s, &c, at(250), ms(16), 2);
        requests(&mut s, &c, at(300), ms(16), 1);
        assert_eq!(s.limit, 7);
        // Far worse: g clamps at 0.5: l = 3.5 + 1.87 -> 5.
        requests(&mut s, &c, at(400), ms(100), 1);
        assert_eq!(s.limit, 5);
        // l = 2.5 + 1.58 -> 4; then the minimum limit (l = 2 + 1.41 -> 3), and below it never.
        requests(&mut s, &c, at(500), ms(100), 1);
        assert_eq!(s.limit, 4);
        requests(&mut s, &c, at(600), ms(100), 1);
        assert_eq!(s.limit, 3);
        requests(&mut s, &c, at(700), ms(100), 1);
        assert_eq!(s.limit, 3);
    }

    #[test]
    fn an_interval_is_reduced_to_its_percentile() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(0));
        s.limit = 20;
        s.min_rtt = ms(10);
        // p50 of [10, 10, 12, 30, 40] (five samples) = 12 ms: g = 12.5 / 12 = 1.0417:
        // l = 20.83, + 4.56 -> 25.
        for rtt in [30, 10, 40, 12] {
            s.admit();
            s.complete(&c, at(10), ms(rtt), Outcome::Success);
        }
        s.admit();
        s.complete(&c, at(100), ms(10), Outcome::Success);
        assert_eq!(s.limit, 25);
        assert!(s.samples.is_empty());
    }

    #[test]
    fn failures_give_no_samples_and_do_not_lower_the_minimum() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(0));
        s.admit();
        s.complete(&c, at(10), ms(1), Outcome::Dropped);
        assert_eq!(s.min_rtt, Duration::ZERO);
        assert!(s.samples.is_empty());
        assert_eq!(s.in_flight, 0);
    }

    #[test]
    fn admission_counts_in_flight_up_to_the_limit() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(0));
        assert_eq!(s.admit(), Admission::Allow { limit: 3 });
        assert_eq!(s.admit(), Admission::Allow { limit: 3 });
        assert_eq!(s.admit(), Admission::Allow { limit: 3 });
        assert_eq!(s.admit(), Admission::Reject { limit: 3 });
        assert_eq!(s.in_flight, 3);
        s.complete(&c, at(1), ms(5), Outcome::Ignored);
        assert_eq!(s.in_flight, 2);
        // A completion without an admission never underflows.
        let mut empty = LimitState::new(&c, at(0));
        empty.complete(&c, at(1), ms(5), Outcome::Ignored);
        assert_eq!(empty.in_flight, 0);
    }

    #[test]
    fn the_minimum_rtt_rises_through_a_probe_that_halves_the_limit() {
        let p = GradientParams {
            min_rtt_window: Duration::from_secs(1),
            ..GradientParams::default()
        };
        let c = Controller::Gradient(p);
        let mut s = LimitState::new(&c, at(0));
        s.limit = 30;
        s.min_rtt = ms(10);
        // The upstream is now slower for good: 20 ms. At 1 s the update (p50 20 ms, g = 0.625:
        // l = 18.75 + 4.33 -> 23) starts a probe at half: 11.
        requests(&mut s, &c, at(1000), ms(20), 1);
        assert_eq!((s.limit, s.probe_restore), (11, 23));
        // The probe's samples: the unqueued latency is now 20 ms (p50 of [21, 20, 20]).
        requests(&mut s, &c, at(1050), ms(21), 1);
        requests(&mut s, &c, at(1060), ms(20), 1);
        assert_eq!(
            s.min_rtt,
            ms(10),
            "the estimate only rises when the probe ends"
        );
        // The probe ends after one interval: minimum 20 ms, the limit is restored.
        requests(&mut s, &c, at(1100), ms(20), 1);
        assert_eq!((s.min_rtt, s.limit, s.probe_restore), (ms(20), 23, 0));
        assert_eq!(s.window_start, at(1100));
        // And the next update uses it: g = 25 / 20 = 1.25: l = 28.75 + 5.36 -> 34.
        requests(&mut s, &c, at(1200), ms(20), 1);
        assert_eq!(s.limit, 34);
    }

    #[test]
    fn five_updates_at_the_minimum_start_a_probe() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(0));
        s.min_rtt = ms(10);
        for i in 1..=4 {
            requests(&mut s, &c, at(100 * i), ms(100), 1);
            assert_eq!((s.limit, s.probe_restore), (3, 0));
        }
        requests(&mut s, &c, at(500), ms(100), 1);
        // The probe runs at the minimum (half of 3 is below it) and measures 100 ms.
        assert_eq!((s.limit, s.probe_restore), (3, 3));
        requests(&mut s, &c, at(600), ms(100), 1);
        assert_eq!((s.min_rtt, s.probe_restore), (ms(100), 0));
    }

    #[test]
    fn aimd_follows_netflix_rules() {
        let c = Controller::Aimd(AimdParams {
            min_limit: 5,
            ..AimdParams::default()
        });
        let mut s = LimitState::new(&c, at(0));
        assert_eq!(s.limit, 20);
        // Ten in flight (half the limit): a success adds one.
        for _ in 0..10 {
            s.admit();
        }
        assert_eq!(s.complete(&c, at(1), ms(10), Outcome::Success), 21);
        // Nine in flight of 21: below half, no change.
        assert_eq!(s.complete(&c, at(1), ms(10), Outcome::Success), 21);
        // A drop: 21 * 0.9 = 18.9 -> 18.
        assert_eq!(s.complete(&c, at(1), ms(10), Outcome::Dropped), 18);
        // A success slower than the timeout is a drop: 16.2 -> 16.
        assert_eq!(
            s.complete(&c, at(1), Duration::from_secs(6), Outcome::Success),
            16
        );
        // Drops stop at the minimum.
        for _ in 0..20 {
            s.complete(&c, at(1), ms(1), Outcome::Dropped);
        }
        assert_eq!(s.limit, 5);
        // And growth at the maximum.
        s.limit = 200;
        s.in_flight = 150;
        assert_eq!(s.complete(&c, at(1), ms(1), Outcome::Success), 200);
    }

    #[test]
    fn the_ring_keeps_the_newest_samples() {
        let p = GradientParams {
            max_samples: 3,
            ..GradientParams::default()
        };
        let c = Controller::Gradient(p);
        let mut s = LimitState::new(&c, at(0));
        for rtt in [1, 2, 3, 4, 5] {
            s.admit();
            s.complete(&c, at(1), ms(rtt), Outcome::Success);
        }
        let mut kept = s.samples.clone();
        kept.sort_unstable();
        assert_eq!(kept, vec![3_000, 4_000, 5_000]);
    }

    #[test]
    fn layout_round_trips_and_refuses_others() {
        let c = Controller::Gradient(GradientParams::default());
        let mut s = LimitState::new(&c, at(7));
        s.admit();
        s.complete(&c, at(8), ms(3), Outcome::Success);
        s.admit();
        s.probe_restore = 9;
        let bytes = s.encode();
        assert_eq!(bytes.len(), 42 + 4);
        assert_eq!(LimitState::decode(&bytes), Some(s));
        assert_eq!(LimitState::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(LimitState::decode(&[2]), None);
    }
}
