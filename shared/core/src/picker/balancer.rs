//! Balancers for policies without a key: round robin, smooth weighted round robin, and least
//! request by the power of two choices.
//!
//! Each works over the endpoints of one priority level and a predicate saying which of them may
//! be used now (healthy, or all of them in panic), so health changes need no rebuild.
//!
//! - [`RoundRobin`]: the next usable endpoint after the last one picked; over a stable set every
//!   endpoint is picked once per cycle. Per worker, as Envoy's round robin is.
//! - [`SmoothWeighted`]: nginx's smooth weighted round robin. Each pick adds every usable
//!   endpoint's weight to its running credit, takes the endpoint with the most credit and takes
//!   the total weight off it. Over `W` picks (total weight `W`) an endpoint of weight `w` is
//!   picked exactly `w` times, spread out rather than in bursts.
//! - [`least_request`]: two distinct usable endpoints drawn at random (the randomness is
//!   injected), the one with fewer requests in flight relative to its weight wins (Mitzenmacher's
//!   power of two choices, as in Envoy's least request and tower's `p2c`). It avoids the herd
//!   that "always the least loaded" causes when every worker sees the same counts.

use alloc::vec::Vec;

use crate::rand::Rng;

/// Round robin state: where the last pick was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// Picks the next usable endpoint of `len`, or `None` when none is usable.
    pub fn pick(&mut self, len: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
        for step in 0..len {
            let i = (self.next + step) % len;
            if usable(i) {
                self.next = (i + 1) % len;
                return Some(i);
            }
        }
        None
    }
}

/// Smooth weighted round robin state: each endpoint's running credit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmoothWeighted {
    credit: Vec<i64>,
}

impl SmoothWeighted {
    /// Picks among the usable endpoints with weights `weights` (0 counts as 1), or `None` when
    /// none is usable. The credits restart when the number of endpoints changes.
    pub fn pick(&mut self, weights: &[u32], usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.credit.len() != weights.len() {
            self.credit = alloc::vec![0; weights.len()];
        }
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        let mut best_credit = i64::MIN;
        for (i, (&w, credit)) in weights.iter().zip(self.credit.iter_mut()).enumerate() {
            if !usable(i) {
                continue;
            }
            let w = i64::from(w.max(1));
            *credit += w;
            total += w;
            if *credit > best_credit {
                best_credit = *credit;
                best = Some(i);
            }
        }
        let chosen = best?;
        if let Some(c) = self.credit.get_mut(chosen) {
            *c -= total;
        }
        Some(chosen)
    }
}

/// Least request by the power of two choices: of two distinct usable endpoints drawn with
/// `rng`, the one with fewer requests in flight per unit of weight (ties: the first drawn).
/// `in_flight[i]` and `weights[i]` describe endpoint `i`; missing counts are 0.
pub fn least_request(
    rng: &mut impl Rng,
    weights: &[u32],
    in_flight: &[u32],
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let candidates: Vec<usize> = (0..weights.len()).filter(|&i| usable(i)).collect();
    let n = candidates.len() as u64;
    let a = *candidates.get(rng.below(n) as usize)?;
    if n == 1 {
        return Some(a);
    }
    let first = candidates.iter().position(|&c| c == a).unwrap_or(0) as u64;
    let mut second = rng.below(n - 1);
    if second >= first {
        second += 1;
    }
    let b = *candidates.get(second as usize)?;
    let load = |i: usize| u128::from(in_flight.get(i).copied().unwrap_or(0)) + 1;
    let weight = |i: usize| u128::from(weights.get(i).copied().unwrap_or(1).max(1));
    // (load_a + 1) / w_a <= (load_b + 1) / w_b, cross-multiplied to stay in integers. The +1
    // counts the request being placed, so an idle heavy endpoint beats an idle light one.
    Some(if load(a) * weight(b) <= load(b) * weight(a) {
        a
    } else {
        b
    })
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use alloc::vec;

    #[test]
    fn round_robin_cycles_and_skips_unusable() {
        let mut rr = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(3, |_| true).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        let picks: Vec<usize> = (0..4).map(|_| rr.pick(3, |i| i != 1).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(rr.pick(3, |_| false), None);
        assert_eq!(rr.pick(0, |_| true), None);
    }

    #[test]
    fn smooth_weighted_gives_exact_proportions_spread_out() {
        let mut w = SmoothWeighted::default();
        let weights = [5, 1, 1];
        let picks: Vec<usize> = (0..7)
            .map(|_| w.pick(&weights, |_| true).unwrap())
            .collect();
        // nginx's example: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        let mut counts = [0usize; 3];
        for _ in 0..700 {
            counts[w.pick(&weights, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
        let mut counts = [0usize; 3];
        for _ in 0..600 {
            counts[w.pick(&weights, |i| i != 0).unwrap()] += 1;
        }
        assert_eq!(counts, [0, 300, 300]);
        assert_eq!(w.pick(&weights, |_| false), None);
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let mut rng = SeededRng::new(7);
        let weights = [1, 1, 1, 1];
        let in_flight = [10, 0, 10, 10];
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[least_request(&mut rng, &weights, &in_flight, |_| true).unwrap()] += 1;
        }
        // Endpoint 1 wins whenever drawn, in 1 - (3/4 × 2/3) = 1/2 of the picks.
        assert!((1800..=2200).contains(&counts[1]), "{counts:?}");
        // With two endpoints the less loaded always wins.
        for _ in 0..100 {
            assert_eq!(least_request(&mut rng, &[1, 1], &[3, 1], |_| true), Some(1));
        }
        // Weight counts: 4 in flight on weight 4 is lighter than 2 on weight 1.
        for _ in 0..100 {
            assert_eq!(least_request(&mut rng, &[4, 1], &[4, 2], |_| true), Some(0));
        }
        assert_eq!(
            least_request(&mut rng, &[1, 1], &[0, 0], |i| i == 1),
            Some(1)
        );
        assert_eq!(least_request(&mut rng, &[1, 1], &[0, 0], |_| false), None);
    }

    #[test]
    fn p2c_spreads_a_growing_load_evenly() {
        let mut rng = SeededRng::new(11);
        let weights = [1u32; 10];
        let mut in_flight = [0u32; 10];
        for _ in 0..1000 {
            let i = least_request(&mut rng, &weights, &in_flight, |_| true).unwrap();
            in_flight[i] += 1;
        }
        let max = *in_flight.iter().max().unwrap();
        let min = *in_flight.iter().min().unwrap();
        // Two choices keep the gap to O(log log n): far tighter than random placement.
        assert!(max - min <= 6, "{in_flight:?}");
    }
}
