//! Success-rate throttling: Google SRE's client-side adaptive throttling (the SRE book,
//! "Handling Overload"), as Envoy's `admission_control` filter applies it in a proxy.
//!
//! Over a sliding window the client counts `requests` (every request it was asked to send,
//! including those it refused itself) and `accepts` (those the upstream answered well), and
//! refuses a new request with probability
//! `p = min(max_probability, max(0, (requests - K * accepts) / (requests + 1)))`.
//! While the upstream accepts more than `1 / K` of what it gets, `p` stays 0; when it fails more,
//! the client sheds locally, and the upstream's attempts fall to about `K * accepts` (when its
//! failures come from overload) or to `1 - max_probability` of the requests (when they do not
//! depend on load: a 60 % failing upstream accepts too little for any `p < 1` to satisfy the
//! formula, so `p` sits at its cap). When the upstream heals, `p` returns to 0 in about a window
//! (the buckets from the failing time must leave it).
//!
//! Defaults: `K = 2` (the SRE book), a window of 30 s in 10 buckets and a cap of 0.8 (Envoy's
//! `admission_control`: `sampling_window` 30 s, `max_rejection_probability` 80 %).
//!
//! # Layout in shared data
//!
//! `ThrottleState`, little-endian: version `u8` (= 1), bucket epoch `u64` (the index of the
//! newest bucket: `now / bucket length`), bucket count `u8`, then per bucket (oldest to newest)
//! requests `u32`, accepts `u32`.
//!
//! Invariants: buckets older than the window are forgotten (counts never grow without bound);
//! `accepts <= requests` is not assumed (a response can come after its request's bucket left the
//! window); `p` is within `[0, max_probability]`.

use alloc::vec;
use alloc::vec::Vec;

use crate::codec::{Reader, Writer};
use crate::time::{Duration, Instant};

const VERSION: u8 = 1;

/// Success-rate throttling parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ThrottleParams {
    /// The sliding window.
    pub window: Duration,
    /// Buckets the window is kept in (1..=60).
    pub buckets: u8,
    /// `K`: how many requests per accept are let through before shedding starts.
    pub k: f64,
    /// The highest refusal probability, in `[0, 1]`.
    pub max_probability: f64,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            window: Duration::from_secs(30),
            buckets: 10,
            k: 2.0,
            max_probability: 0.8,
        }
    }
}

impl ThrottleParams {
    fn bucket_len(&self) -> u64 {
        (self.window.as_nanos() / u64::from(self.buckets.max(1))).max(1)
    }
}

/// The shared counts of one throttled scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThrottleState {
    /// The index of the newest bucket.
    pub epoch: u64,
    /// `(requests, accepts)` per bucket, oldest first.
    pub buckets: Vec<(u32, u32)>,
}

impl ThrottleState {
    /// Moves the window to `now`: buckets that left it are dropped, new ones start at zero.
    pub fn advance(&mut self, p: &ThrottleParams, now: Instant) {
        let n = usize::from(p.buckets.clamp(1, 60));
        let epoch = now.as_nanos() / p.bucket_len();
        if self.buckets.len() != n || epoch >= self.epoch.saturating_add(n as u64) {
            self.buckets = vec![(0, 0); n];
        } else if epoch > self.epoch {
            let shift = (epoch - self.epoch) as usize;
            self.buckets.drain(..shift.min(n));
            self.buckets.resize(n, (0, 0));
        }
        // A clock that went backwards keeps counting into the newest bucket.
        self.epoch = self.epoch.max(epoch);
    }

    /// `(requests, accepts)` in the window.
    pub fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(r, a), (br, ba)| {
            (r + u64::from(*br), a + u64::from(*ba))
        })
    }

    /// The refusal probability now (call [`advance`](Self::advance) first).
    pub fn probability(&self, p: &ThrottleParams) -> f64 {
        let (requests, accepts) = self.totals();
        rejection_probability(p, requests, accepts)
    }

    /// Counts a request at `now` and decides it with `draw`, uniform in `[0, 1)`: `true` when it
    /// is refused. Returns the decision and the probability it was decided with.
    pub fn request(&mut self, p: &ThrottleParams, now: Instant, draw: f64) -> (bool, f64) {
        self.advance(p, now);
        let probability = self.probability(p);
        if let Some(last) = self.buckets.last_mut() {
            last.0 = last.0.saturating_add(1);
        }
        (draw < probability, probability)
    }

    /// Counts an accept (the upstream answered well) at `now`.
    pub fn accept(&mut self, p: &ThrottleParams, now: Instant) {
        self.advance(p, now);
        if let Some(last) = self.buckets.last_mut() {
            last.1 = last.1.saturating_add(1);
        }
    }

    /// The state in its shared-data layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(10 + 8 * self.buckets.len())
            .u8(VERSION)
            .u64(self.epoch)
            .u8(u8::try_from(self.buckets.len()).unwrap_or(u8::MAX));
        for (r, a) in &self.buckets {
            w = w.u32(*r).u32(*a);
        }
        w.finish()
    }

    /// Decodes the layout; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<ThrottleState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let epoch = r.u64()?;
        let n = r.u8()?;
        let mut buckets = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            buckets.push((r.u32()?, r.u32()?));
        }
        r.end()?;
        Some(ThrottleState { epoch, buckets })
    }
}

/// `min(max_probability, max(0, (requests - K * accepts) / (requests + 1)))`.
pub fn rejection_probability(p: &ThrottleParams, requests: u64, accepts: u64) -> f64 {
    let requests = requests as f64;
    let raw = (requests - p.k * accepts as f64) / (requests + 1.0);
    raw.clamp(0.0, p.max_probability.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};

    fn secs(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000_000)
    }

    #[test]
    fn the_formula_with_its_floor_and_cap() {
        let p = ThrottleParams::default();
        assert_eq!(rejection_probability(&p, 100, 50), 0.0);
        assert_eq!(rejection_probability(&p, 100, 60), 0.0);
        // (100 - 2 * 40) / 101
        assert!((rejection_probability(&p, 100, 40) - 20.0 / 101.0).abs() < 1e-12);
        assert_eq!(rejection_probability(&p, 100, 0), 0.8);
        let uncapped = ThrottleParams {
            max_probability: 1.0,
            ..p
        };
        assert!((rejection_probability(&uncapped, 100, 0) - 100.0 / 101.0).abs() < 1e-12);
    }

    #[test]
    fn the_window_slides_and_forgets() {
        let p = ThrottleParams::default(); // 10 buckets of 3 s
        let mut s = ThrottleState::default();
        for _ in 0..10 {
            s.request(&p, secs(1), 0.99);
        }
        s.accept(&p, secs(4));
        assert_eq!(s.totals(), (10, 1));
        // 29 s later the first bucket (0..3 s) is still in the window; at 30 s it is gone.
        s.advance(&p, secs(29));
        assert_eq!(s.totals(), (10, 1));
        s.advance(&p, secs(30));
        assert_eq!(s.totals(), (0, 1));
        s.advance(&p, secs(100));
        assert_eq!(s.totals(), (0, 0));
    }

    /// An upstream that fails 60 % of what reaches it, whatever the load: the probability climbs
    /// to its cap and the attempts fall to `1 - cap` of the requests; when it heals they return.
    #[test]
    fn a_sixty_percent_failing_upstream_gets_one_in_five_requests() {
        let p = ThrottleParams::default();
        let mut s = ThrottleState::default();
        let mut rng = SeededRng::new(42);
        let mut upstream = SeededRng::new(7);
        let (mut sent, mut attempts) = (0u32, 0u32);
        // 100 requests a second for 60 s; the last 30 s are counted.
        for i in 0..6000u64 {
            let now = Instant::from_nanos(i * 10_000_000);
            let (refused, _) = s.request(&p, now, rng.unit_f64());
            let counted = i >= 3000;
            sent += u32::from(counted);
            if refused {
                continue;
            }
            attempts += u32::from(counted);
            if upstream.unit_f64() >= 0.6 {
                s.accept(&p, now);
            }
        }
        let share = f64::from(attempts) / f64::from(sent);
        assert!(
            (share - 0.2).abs() < 0.03,
            "attempts {attempts} of {sent}: {share}"
        );
        // Healed: the probability falls back to 0 within two windows, and stays there.
        let mut zero_since = None;
        for i in 6000..12_000u64 {
            let now = Instant::from_nanos(i * 10_000_000);
            let (refused, probability) = s.request(&p, now, rng.unit_f64());
            if !refused {
                s.accept(&p, now);
            }
            match (probability == 0.0, zero_since) {
                (true, None) => zero_since = Some(i),
                (false, _) => zero_since = None,
                _ => {}
            }
        }
        let healed_after = (zero_since.unwrap() - 6000) as f64 / 100.0;
        std::eprintln!("probability 0 for good {healed_after} s after the upstream healed");
        assert!(healed_after <= 60.0, "{healed_after} s");
    }

    #[test]
    fn layout_round_trips() {
        let p = ThrottleParams::default();
        let mut s = ThrottleState::default();
        s.request(&p, secs(5), 0.5);
        s.accept(&p, secs(8));
        let bytes = s.encode();
        assert_eq!(bytes.len(), 10 + 80);
        assert_eq!(ThrottleState::decode(&bytes), Some(s));
        assert_eq!(ThrottleState::decode(&bytes[1..]), None);
    }
}
