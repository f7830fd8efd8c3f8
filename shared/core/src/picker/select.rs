//! Which endpoints a pick may use: health, the panic threshold, and priority failover.
//!
//! This follows Envoy's priority levels and panic threshold, with whole percents as Envoy does:
//!
//! 1. Each priority level's *health* is `min(100, 140 × healthy / total)` percent: the 1.4
//!    overprovisioning factor lets a level lose up to 28.6 % of its endpoints before any
//!    traffic leaves it. Health counts endpoints, not weights (as Envoy's does).
//! 2. The *normalized total* is the sum of the levels' health, capped at 100.
//! 3. The load (percent of picks) goes to the levels in priority order: level `p` takes
//!    `min(remaining, health_p × 100 / normalized_total)`; rounding leftovers go to the first
//!    level with any health. So traffic spills from priority 0 to priority 1 as priority 0 loses
//!    health, gradually, and comes back as it recovers.
//! 4. A level is *in panic* when the normalized total is under 100 (no level can carry the
//!    traffic with healthy endpoints) and its healthy fraction is under the panic threshold
//!    (default 50 %). A level in panic picks among all its endpoints, healthy or not, so that a
//!    few survivors are not crushed by the whole load.
//! 5. When no endpoint of any level is healthy, every level is in panic and the load follows
//!    the levels' endpoint counts (Envoy's total panic). A threshold of 0 turns panic off: then
//!    no endpoint at all is picked.
//!
//! Which level serves a pick is chosen from a number in `0..100`: the key hash modulo 100 for
//! hashing pickers (a key keeps its level while loads are stable), a random number otherwise.
//!
//! Invariants: the loads sum to 100, or are all 0 when nothing may be picked; a level with load
//! has at least one endpoint it may use.

use alloc::vec::Vec;

/// Envoy's overprovisioning factor, in percent.
pub const OVERPROVISIONING_PERCENT: u64 = 140;
/// The default panic threshold: under half of a level's endpoints healthy.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;

/// A validated panic threshold: a healthy fraction in `[0, 1]`; 0 disables panic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanicThreshold(f64);

impl PanicThreshold {
    /// `Some` for a finite fraction in `[0, 1]`.
    pub fn new(fraction: f64) -> Option<PanicThreshold> {
        (0.0..=1.0)
            .contains(&fraction)
            .then_some(PanicThreshold(fraction))
    }

    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether `healthy` of `total` endpoints is under the threshold.
    fn is_below(self, healthy: usize, total: usize) -> bool {
        total > 0 && (healthy as f64) < self.0 * total as f64
    }
}

impl Default for PanicThreshold {
    fn default() -> Self {
        PanicThreshold(DEFAULT_PANIC_THRESHOLD)
    }
}

/// The health of one priority level: how many of its endpoints are healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelHealth {
    /// Healthy endpoints.
    pub healthy: usize,
    /// All endpoints.
    pub total: usize,
}

/// The share of picks each priority level takes, and whether it is in panic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    loads: Vec<u8>,
    panic: Vec<bool>,
}

impl PriorityLoad {
    /// Computes the loads of `levels` (in priority order) under `threshold`.
    pub fn compute(levels: &[LevelHealth], threshold: PanicThreshold) -> PriorityLoad {
        let health: Vec<u64> = levels
            .iter()
            .map(|l| {
                if l.total == 0 {
                    0
                } else {
                    (OVERPROVISIONING_PERCENT * l.healthy as u64 / l.total as u64).min(100)
                }
            })
            .collect();
        let normalized = health.iter().sum::<u64>().min(100);
        if normalized == 0 {
            return Self::total_panic(levels, threshold);
        }
        let mut remaining = 100u64;
        let mut loads: Vec<u8> = health
            .iter()
            .map(|&h| {
                let load = (h * 100 / normalized).min(remaining);
                remaining -= load;
                load as u8
            })
            .collect();
        if let Some(first) = health.iter().position(|&h| h > 0) {
            if let Some(l) = loads.get_mut(first) {
                *l += remaining as u8;
            }
        }
        let panic = levels
            .iter()
            .map(|l| normalized < 100 && threshold.is_below(l.healthy, l.total))
            .collect();
        PriorityLoad { loads, panic }
    }

    /// No endpoint is healthy: with panic on, spread by endpoint counts over all endpoints.
    fn total_panic(levels: &[LevelHealth], threshold: PanicThreshold) -> PriorityLoad {
        let total: u64 = levels.iter().map(|l| l.total as u64).sum();
        if threshold.get() == 0.0 || total == 0 {
            return PriorityLoad {
                loads: levels.iter().map(|_| 0).collect(),
                panic: levels.iter().map(|_| false).collect(),
            };
        }
        let mut remaining = 100u64;
        let mut loads: Vec<u8> = levels
            .iter()
            .map(|l| {
                let load = (l.total as u64 * 100 / total).min(remaining);
                remaining -= load;
                load as u8
            })
            .collect();
        if let Some(first) = levels.iter().position(|l| l.total > 0) {
            if let Some(l) = loads.get_mut(first) {
                *l += remaining as u8;
            }
        }
        PriorityLoad {
            loads,
            panic: levels.iter().map(|_| true).collect(),
        }
    }

    /// The level that serves the value `n` (a key hash or a random number), or `None` when
    /// nothing may be picked.
    pub fn choose(&self, n: u64) -> Option<usize> {
        let r = n % 100;
        let mut cumulative = 0u64;
        for (level, &load) in self.loads.iter().enumerate() {
            cumulative += u64::from(load);
            if r < cumulative {
                return Some(level);
            }
        }
        None
    }

    /// The percent of picks level `level` takes.
    pub fn load(&self, level: usize) -> u8 {
        self.loads.get(level).copied().unwrap_or(0)
    }

    /// Whether level `level` picks among all its endpoints, healthy or not.
    pub fn in_panic(&self, level: usize) -> bool {
        self.panic.get(level).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::vec;

    fn loads(levels: &[(usize, usize)], threshold: f64) -> (Vec<u8>, Vec<bool>) {
        let levels: Vec<LevelHealth> = levels
            .iter()
            .map(|&(healthy, total)| LevelHealth { healthy, total })
            .collect();
        let p = PriorityLoad::compute(&levels, PanicThreshold::new(threshold).unwrap());
        (p.loads, p.panic)
    }

    #[test]
    fn healthy_primary_takes_everything() {
        assert_eq!(loads(&[(10, 10), (10, 10)], 0.5).0, vec![100, 0]);
        // 140 % of 8/10 is still over 100: no spill yet.
        assert_eq!(loads(&[(8, 10), (10, 10)], 0.5).0, vec![100, 0]);
    }

    #[test]
    fn traffic_spills_to_the_next_priority_as_health_drops() {
        // 7/10 healthy: 98 % stays, 2 % spills.
        assert_eq!(
            loads(&[(7, 10), (10, 10)], 0.5),
            (vec![98, 2], vec![false, false])
        );
        assert_eq!(loads(&[(5, 10), (10, 10)], 0.5).0, vec![70, 30]);
        assert_eq!(loads(&[(2, 10), (10, 10)], 0.5).0, vec![28, 72]);
        assert_eq!(loads(&[(0, 10), (10, 10)], 0.5).0, vec![0, 100]);
        // Both degraded: the load is scaled to the total (28 + 42 = 70 → 40 % and 60 %), and
        // each level under the threshold is in panic.
        assert_eq!(
            loads(&[(2, 10), (3, 10)], 0.5),
            (vec![40, 60], vec![true, true])
        );
    }

    #[test]
    fn panic_only_when_the_levels_cannot_carry_the_load() {
        // One level, 4/10 healthy: 56 % health, under the 50 % threshold: panic.
        assert_eq!(loads(&[(4, 10)], 0.5), (vec![100], vec![true]));
        // 6/10: 84 % health but 60 % healthy is over the threshold: no panic.
        assert_eq!(loads(&[(6, 10)], 0.5), (vec![100], vec![false]));
        // 4/10 at priority 0 with a healthy priority 1: no panic, the rest spills.
        assert_eq!(
            loads(&[(4, 10), (10, 10)], 0.5),
            (vec![56, 44], vec![false, false])
        );
        // Threshold 0: never panic.
        assert_eq!(loads(&[(1, 10)], 0.0), (vec![100], vec![false]));
    }

    #[test]
    fn nothing_healthy_is_total_panic_unless_disabled() {
        assert_eq!(
            loads(&[(0, 3), (0, 1)], 0.5),
            (vec![75, 25], vec![true, true])
        );
        let (l, _) = loads(&[(0, 3), (0, 1)], 0.0);
        assert_eq!(l, vec![0, 0]);
        let p = PriorityLoad::compute(
            &[LevelHealth {
                healthy: 0,
                total: 3,
            }],
            PanicThreshold::new(0.0).unwrap(),
        );
        assert_eq!(p.choose(5), None);
        assert_eq!(
            PriorityLoad::compute(&[], PanicThreshold::default()).choose(1),
            None
        );
    }

    #[test]
    fn choose_follows_the_cumulative_loads() {
        let p = PriorityLoad::compute(
            &[
                LevelHealth {
                    healthy: 5,
                    total: 10,
                },
                LevelHealth {
                    healthy: 10,
                    total: 10,
                },
            ],
            PanicThreshold::default(),
        );
        assert_eq!(p.choose(0), Some(0));
        assert_eq!(p.choose(69), Some(0));
        assert_eq!(p.choose(70), Some(1));
        assert_eq!(p.choose(199), Some(1));
        assert_eq!(p.load(1), 30);
        assert!(!p.in_panic(5));
    }

    #[test]
    fn thresholds_are_fractions() {
        assert!(PanicThreshold::new(1.5).is_none());
        assert!(PanicThreshold::new(-0.1).is_none());
        assert!(PanicThreshold::new(f64::NAN).is_none());
        assert_eq!(PanicThreshold::default().get(), 0.5);
    }
}
