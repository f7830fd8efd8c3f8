//! Latency-aware balancing: peak-EWMA cost with the power of two choices (Finagle's and
//! Linkerd's `PeakEwma`, tower's `balance::p2c` over `load::PeakEwma`).
//!
//! Each endpoint keeps an exponentially weighted moving average of its round-trip times that
//! jumps to any sample above it (the *peak*: a slow response counts at once, a fast one only
//! pulls the average down over time), decaying with a time constant `decay` (10 s): a sample
//! `dt` after the last one weighs `1 - e^(-dt / decay)`. Reading the estimate decays it towards
//! zero the same way, as if a zero-latency sample came, so an endpoint that got no traffic for a
//! while is tried again. An endpoint's cost is `estimate * (in_flight + 1)`; an endpoint never
//! measured starts at `default_rtt`. Of two distinct usable endpoints drawn at random, the
//! cheaper wins (ties: the first drawn), which avoids the herd that "always the cheapest"
//! causes when several workers see the same costs.
//!
//! # Layout in shared data
//!
//! [`EndpointLatency`], little-endian: version `u8` (= 1), estimate `u64` (ns), stamp `u64` (ns, 0 = never
//! measured), in flight `u32`. One value per endpoint, so that every worker balances on the
//! same latencies: the picker filter keeps it under `keel/picker/<picker>/latency/<ip:port>`
//! ([`super::policy::PickerConfig::latency_key`]), reads the two drawn endpoints' values per pick
//! ([`pick_by`]), counts the request in flight on the picked one, and at the response records
//! the round trip ([`EndpointLatency::observe`]) and counts it out.

use alloc::vec::Vec;

use crate::adaptive::math::exp_neg;
use crate::codec::{Reader, Writer};
use crate::rand::Rng;
use crate::time::{Duration, Instant};

/// Peak-EWMA parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeakEwmaParams {
    /// The decay time constant (Finagle and Linkerd: 10 s).
    pub decay: Duration,
    /// The estimate of an endpoint never measured.
    pub default_rtt: Duration,
}

impl Default for PeakEwmaParams {
    fn default() -> Self {
        PeakEwmaParams {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

/// One endpoint's latency estimate and load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EndpointLatency {
    /// The estimate at `stamp`, in nanoseconds.
    pub estimate_ns: f64,
    /// When the estimate was last updated; `None` before the first sample.
    pub stamp: Option<Instant>,
    /// Requests sent to it and not answered yet.
    pub in_flight: u32,
}

impl EndpointLatency {
    /// The estimate decayed to `now` (the default before any sample).
    pub fn estimate(&self, p: &PeakEwmaParams, now: Instant) -> f64 {
        match self.stamp {
            None => p.default_rtt.as_nanos() as f64,
            Some(stamp) => self.estimate_ns * weight(p, now.saturating_since(stamp)),
        }
    }

    /// The cost of sending one more request now: `estimate * (in_flight + 1)`.
    pub fn cost(&self, p: &PeakEwmaParams, now: Instant) -> f64 {
        self.estimate(p, now) * (f64::from(self.in_flight) + 1.0)
    }

    /// Records a round trip of `rtt` that ended at `now`.
    pub fn observe(&mut self, p: &PeakEwmaParams, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let previous = match self.stamp {
            None => p.default_rtt.as_nanos() as f64,
            Some(_) => self.estimate_ns,
        };
        let w = match self.stamp {
            None => 0.0,
            Some(stamp) => weight(p, now.saturating_since(stamp)),
        };
        self.estimate_ns = if rtt > previous {
            rtt
        } else {
            previous * w + rtt * (1.0 - w)
        };
        self.stamp = Some(now);
    }

    /// The layout in shared data.
    pub fn encode(&self) -> Vec<u8> {
        Writer::with_capacity(21)
            .u8(1)
            .u64(self.estimate_ns as u64)
            .u64(self.stamp.map_or(0, Instant::as_nanos))
            .u32(self.in_flight)
            .finish()
    }

    /// Decodes the layout; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<EndpointLatency> {
        let mut r = Reader::new(bytes);
        if r.u8()? != 1 {
            return None;
        }
        let estimate = r.u64()?;
        let stamp = r.u64()?;
        let in_flight = r.u32()?;
        r.end()?;
        Some(EndpointLatency {
            estimate_ns: estimate as f64,
            stamp: (stamp != 0).then_some(Instant::from_nanos(stamp)),
            in_flight,
        })
    }
}

/// `e^(-dt / decay)`: the weight the old estimate keeps after `dt`.
fn weight(p: &PeakEwmaParams, dt: Duration) -> f64 {
    if p.decay.is_zero() {
        return 0.0;
    }
    exp_neg(dt.as_nanos() as f64 / p.decay.as_nanos() as f64)
}

/// Peak-EWMA power of two choices: of two distinct usable endpoints drawn with `rng`, the one
/// with the lower [`EndpointLatency::cost`] (ties: the first drawn); `None` when none is usable.
pub fn pick(
    rng: &mut impl Rng,
    p: &PeakEwmaParams,
    now: Instant,
    endpoints: &[EndpointLatency],
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    pick_by(rng, p, now, endpoints.len(), usable, |i| {
        endpoints.get(i).copied().unwrap_or_default()
    })
}

/// [`pick`] over `len` endpoints whose latencies `latency` gives on demand: it is asked for
/// the two drawn endpoints only (none when one endpoint is usable), so a caller that keeps each
/// endpoint's [`EndpointLatency`] under its own shared-data key reads two values per pick, not
/// all of them.
pub fn pick_by(
    rng: &mut impl Rng,
    p: &PeakEwmaParams,
    now: Instant,
    len: usize,
    usable: impl Fn(usize) -> bool,
    mut latency: impl FnMut(usize) -> EndpointLatency,
) -> Option<usize> {
    let candidates: Vec<usize> = (0..len).filter(|&i| usable(i)).collect();
    let n = candidates.len() as u64;
    let first = rng.below(n) as usize;
    let a = *candidates.get(first)?;
    if n == 1 {
        return Some(a);
    }
    let mut second = rng.below(n - 1) as usize;
    if second >= first {
        second += 1;
    }
    let b = *candidates.get(second)?;
    let cost_a = latency(a).cost(p, now);
    let cost_b = latency(b).cost(p, now);
    Some(if cost_a <= cost_b { a } else { b })
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use alloc::vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_estimate_jumps_to_peaks_and_decays_slowly() {
        let p = PeakEwmaParams::default();
        let mut e = EndpointLatency::default();
        let t0 = Instant::from_nanos(1_000_000_000);
        assert_eq!(e.estimate(&p, t0), 30e6, "the default before any sample");
        e.observe(&p, t0, ms(10));
        // Below the default: weight 0 for the first sample, so it is the sample.
        assert_eq!(e.estimate_ns, 10e6);
        e.observe(&p, t0.saturating_add(ms(1)), ms(60));
        assert_eq!(e.estimate_ns, 60e6, "a peak counts at once");
        // A fast sample 10 s later pulls it down by 1 - 1/e: 60 e^-1 + 10 (1 - e^-1).
        let t = t0.saturating_add(ms(10_001));
        e.observe(&p, t, ms(10));
        let want = 60e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        assert!((e.estimate_ns - want).abs() < 1.0, "{}", e.estimate_ns);
        // Reading decays it towards zero: another 10 s on, e^-1 of it.
        let later = t.saturating_add(ms(10_000));
        assert!((e.estimate(&p, later) - want * (-1f64).exp()).abs() < 1.0);
        // The cost counts the requests in flight plus the one being placed.
        e.in_flight = 2;
        assert!((e.cost(&p, t) - 3.0 * want).abs() < 3.0);
    }

    /// Three endpoints at 10, 10 and 60 ms, served one request at a time: at least 90 % of
    /// the requests avoid the slow one; when the slowness moves to another endpoint, the
    /// traffic follows within 5 s.
    #[test]
    fn traffic_avoids_the_slow_endpoint_and_follows_when_it_moves() {
        let p = PeakEwmaParams::default();
        let mut rng = SeededRng::new(3);
        let mut endpoints = vec![EndpointLatency::default(); 3];
        let mut now = Instant::from_nanos(1);
        let mut latency = [10u64, 10, 60];
        // 4 workers' worth of concurrency: four requests in flight, each completing in turn.
        let mut counts = [0u32; 3];
        let mut run = |endpoints: &mut Vec<EndpointLatency>,
                       latency: &[u64; 3],
                       now: &mut Instant,
                       seconds: u64,
                       counts: &mut [u32; 3]| {
            let end = now.saturating_add(Duration::from_secs(seconds));
            while *now < end {
                let i = pick(&mut rng, &p, *now, endpoints, |_| true).unwrap();
                counts[i] += 1;
                let rtt = ms(latency[i]);
                endpoints[i].observe(&p, now.saturating_add(rtt), rtt);
                // 200 requests a second.
                *now = now.saturating_add(ms(5));
            }
        };
        run(&mut endpoints, &latency, &mut now, 20, &mut counts);
        let total: u32 = counts.iter().sum();
        assert!(counts[2] * 10 <= total, "slow endpoint got {counts:?}");
        // The slowness moves to endpoint 0: within 5 s most traffic has left it.
        latency = [60, 10, 10];
        let mut first = [0u32; 3];
        run(&mut endpoints, &latency, &mut now, 5, &mut first);
        let mut next = [0u32; 3];
        run(&mut endpoints, &latency, &mut now, 5, &mut next);
        let total: u32 = next.iter().sum();
        assert!(next[0] * 10 <= total, "after the move: {next:?}");
    }

    #[test]
    fn the_lower_cost_wins_and_only_usable_endpoints_are_picked() {
        let p = PeakEwmaParams::default();
        let now = Instant::from_nanos(5);
        let fast = EndpointLatency {
            estimate_ns: 1e6,
            stamp: Some(now),
            in_flight: 0,
        };
        let busy = EndpointLatency {
            in_flight: 5,
            ..fast
        };
        let mut rng = SeededRng::new(1);
        for _ in 0..50 {
            assert_eq!(pick(&mut rng, &p, now, &[busy, fast], |_| true), Some(1));
            assert_eq!(pick(&mut rng, &p, now, &[busy, fast], |i| i == 0), Some(0));
        }
        assert_eq!(pick(&mut rng, &p, now, &[busy], |_| false), None);
    }

    #[test]
    fn pick_by_asks_only_for_the_two_drawn_endpoints() {
        let p = PeakEwmaParams::default();
        let now = Instant::from_nanos(1_000);
        let slow = EndpointLatency {
            estimate_ns: 50e6,
            stamp: Some(now),
            in_flight: 0,
        };
        let mut rng = SeededRng::new(4);
        for _ in 0..100 {
            let mut asked = alloc::vec::Vec::new();
            let got = pick_by(
                &mut rng,
                &p,
                now,
                5,
                |i| i != 4,
                |i| {
                    asked.push(i);
                    if i == 0 {
                        slow
                    } else {
                        EndpointLatency::default()
                    }
                },
            )
            .unwrap();
            assert_eq!(asked.len(), 2, "{asked:?}");
            assert_ne!(asked[0], asked[1]);
            assert!(!asked.contains(&4), "an unusable endpoint was read");
            assert!(asked.contains(&got));
            assert_ne!(got, 0, "the slow endpoint lost to a 30 ms default");
        }
        // One usable endpoint: picked without reading anything.
        let mut asked = 0;
        let one = pick_by(
            &mut rng,
            &p,
            now,
            3,
            |i| i == 2,
            |_| {
                asked += 1;
                slow
            },
        );
        assert_eq!((one, asked), (Some(2), 0));
    }

    #[test]
    fn layout_round_trips() {
        let e = EndpointLatency {
            estimate_ns: 12_345_678.0,
            stamp: Some(Instant::from_nanos(99)),
            in_flight: 3,
        };
        assert_eq!(EndpointLatency::decode(&e.encode()), Some(e));
        assert_eq!(EndpointLatency::decode(&[0; 21]), None);
        assert_eq!(EndpointLatency::decode(&e.encode()[..20]), None);
    }
}
