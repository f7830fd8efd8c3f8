//! A consistent-hash ring with virtual nodes, after Envoy's ring hash (Karger et al.).
//!
//! Each member gets `points_per_weight × weight` points on a 64-bit ring. Point `i` of the
//! member at address `a` sits at `xxh64("a_i", 0)`, Envoy's key format, so the ring depends on
//! nothing but the addresses and weights. The points are sorted; a key hash belongs to the first
//! point at or after it (binary search), wrapping to the first point past the top.
//!
//! **Sizing.** Envoy derives its points per unit of weight from a total ring size and the
//! cluster's total weight, so removing a host gives every other host more points and moves keys
//! between hosts that stayed. Keel fixes the points per unit of weight instead
//! ([`RingParams::points_per_weight`]): removing a member removes exactly its points and moves
//! exactly the keys it held, no others. The price is a ring that grows with the member count;
//! [`RingParams::max_size`] caps it, and only past that cap is the scale shared out by total
//! weight (and then membership changes move a few more keys, as in Envoy).
//!
//! The default of [`DEFAULT_POINTS_PER_WEIGHT`] points per unit of weight keeps the peak-to-mean
//! load of 10 equal members under 1.15: a member's share spreads about `1/sqrt(points)`, and
//! over 200 sets of 10 addresses the exact peak-to-mean was 1.068 on average and 1.138 at worst
//! (256 points: 1.097 and 1.218). Envoy's default 1,024-point ring gives 10 hosts about 100
//! points each, near 1.15 on average.
//!
//! Invariants: `hashes` is sorted ascending and as long as `owners`; every owner is an index
//! into the member list the ring was built from; a member with a weight gets at least one point.

use alloc::vec::Vec;

use xxhash_rust::xxh64::xxh64;

use crate::codec::decimal;

/// Ring points per unit of weight by default: 10 endpoints of weight 1 make a ring of 5,120.
pub const DEFAULT_POINTS_PER_WEIGHT: u32 = 512;
/// The largest accepted points per unit of weight.
pub const MAX_POINTS_PER_WEIGHT: u32 = 65_536;
/// The most points a ring may hold by default: 1 Mi points (12 MiB) per worker.
pub const DEFAULT_MAX_RING_SIZE: u32 = 1 << 20;
/// The most points a ring may ever hold: Envoy's maximum ring size, 8 Mi points.
pub const MAX_RING_SIZE: u32 = 1 << 23;

/// How large a ring is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingParams {
    /// Points (virtual nodes) per unit of weight, at least 1.
    pub points_per_weight: u32,
    /// The most points the ring may hold; when `points_per_weight × total weight` is more, the
    /// points are shared out by weight so that the total stays within it.
    pub max_size: u32,
}

impl Default for RingParams {
    fn default() -> Self {
        RingParams {
            points_per_weight: DEFAULT_POINTS_PER_WEIGHT,
            max_size: DEFAULT_MAX_RING_SIZE,
        }
    }
}

/// A built ring: sorted point hashes and, beside them, the member owning each point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    hashes: Vec<u64>,
    owners: Vec<u32>,
}

impl Ring {
    /// Builds the ring of `members`, given as `(address, weight)`; the owner of a point is the
    /// member's position in `members`. A weight of 0 counts as 1.
    pub fn build(members: &[(&str, u32)], params: RingParams) -> Ring {
        let per_weight = u64::from(params.points_per_weight.max(1));
        let max_size = u64::from(params.max_size.clamp(1, MAX_RING_SIZE));
        let total_weight: u64 = members.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
        let points_of = |weight: u32| -> u64 {
            let weight = u64::from(weight.max(1));
            if total_weight.saturating_mul(per_weight) <= max_size {
                weight * per_weight
            } else {
                // Shared out by weight; u128 so that no product can overflow.
                let share = u128::from(weight) * u128::from(max_size) / u128::from(total_weight);
                u64::try_from(share).unwrap_or(max_size).max(1)
            }
        };
        let total: u64 = members.iter().map(|(_, w)| points_of(*w)).sum();
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut key: Vec<u8> = Vec::new();
        let mut digits = [0u8; 20];
        for (owner, (address, weight)) in members.iter().enumerate() {
            let Ok(owner) = u32::try_from(owner) else {
                break;
            };
            key.clear();
            key.extend_from_slice(address.as_bytes());
            key.push(b'_');
            let prefix = key.len();
            for i in 0..points_of(*weight) {
                key.truncate(prefix);
                key.extend_from_slice(decimal(i, &mut digits).as_bytes());
                points.push((xxh64(&key, 0), owner));
            }
        }
        // Ties (equal hashes) are ordered by owner, so every process builds the same ring.
        points.sort_unstable();
        let (hashes, owners) = points.into_iter().unzip();
        Ring { hashes, owners }
    }

    /// The number of points.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the ring has no points (it was built from no members).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The position of the point that `hash` belongs to: the first point at or after it,
    /// wrapping to 0. `None` for an empty ring.
    pub fn position(&self, hash: u64) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let p = self.hashes.partition_point(|&h| h < hash);
        Some(if p == self.hashes.len() { 0 } else { p })
    }

    /// The member owning the point of `hash`.
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        self.position(hash)
            .and_then(|p| self.owners.get(p).copied())
    }

    /// The owners of the points from `hash`'s point onwards, once around the ring: where an
    /// unusable member passes its keys on. Consecutive points of one member repeat it.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = u32> + '_ {
        let start = self.position(hash).unwrap_or(0);
        let (head, tail) = self.owners.split_at(start.min(self.owners.len()));
        tail.iter().chain(head.iter()).copied()
    }

    /// How many points each of `members` members owns (a measure of the build, for tests and
    /// metrics).
    pub fn points_per_member(&self, members: usize) -> Vec<usize> {
        let mut counts = alloc::vec![0usize; members];
        for &o in &self.owners {
            if let Some(c) = counts.get_mut(o as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// The exact share of the 64-bit key space each member owns (arc lengths summed), as
    /// fractions of the ring. For measuring balance without sampling noise.
    pub fn shares(&self, members: usize) -> Vec<f64> {
        let mut arcs = alloc::vec![0u128; members];
        let n = self.hashes.len();
        for (i, (&h, &o)) in self.hashes.iter().zip(&self.owners).enumerate() {
            // Point i owns the keys in (previous point, h]; the first one also owns the wrap.
            let prev = if i == 0 {
                self.hashes.get(n - 1).copied().unwrap_or(0)
            } else {
                self.hashes.get(i - 1).copied().unwrap_or(0)
            };
            let arc = u128::from(h.wrapping_sub(prev));
            let arc = if n == 1 { 1u128 << 64 } else { arc };
            if let Some(a) = arcs.get_mut(o as usize) {
                *a += arc;
            }
        }
        let full = (1u128 << 64) as f64;
        arcs.into_iter().map(|a| a as f64 / full).collect()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::picker::testing::{addresses, keys, peak_to_mean};
    use alloc::string::String;
    use alloc::vec;

    fn ring_of(addrs: &[String], params: RingParams) -> Ring {
        let members: Vec<(&str, u32)> = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        Ring::build(&members, params)
    }

    #[test]
    fn points_follow_envoy_key_format_and_are_sorted() {
        let ring = Ring::build(
            &[("10.0.0.1:80", 1)],
            RingParams {
                points_per_weight: 3,
                max_size: 100,
            },
        );
        let mut expected: Vec<u64> = (0..3)
            .map(|i| xxh64(alloc::format!("10.0.0.1:80_{i}").as_bytes(), 0))
            .collect();
        expected.sort_unstable();
        assert_eq!(ring.hashes, expected);
        assert_eq!(ring.owners, vec![0, 0, 0]);
    }

    #[test]
    fn lookup_takes_the_first_point_at_or_after_and_wraps() {
        let ring = Ring {
            hashes: vec![10, 20, 30],
            owners: vec![0, 1, 2],
        };
        assert_eq!(ring.lookup(5), Some(0));
        assert_eq!(ring.lookup(10), Some(0));
        assert_eq!(ring.lookup(11), Some(1));
        assert_eq!(ring.lookup(30), Some(2));
        assert_eq!(ring.lookup(31), Some(0));
        assert_eq!(ring.walk(25).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(Ring::default().lookup(1), None);
        assert_eq!(Ring::default().walk(1).count(), 0);
    }

    #[test]
    fn size_is_points_times_weight_until_the_cap() {
        let ring = Ring::build(
            &[("a:1", 1), ("b:1", 3)],
            RingParams {
                points_per_weight: 10,
                max_size: 1000,
            },
        );
        assert_eq!(ring.points_per_member(2), vec![10, 30]);
        let capped = Ring::build(
            &[("a:1", 1), ("b:1", 3)],
            RingParams {
                points_per_weight: 10,
                max_size: 20,
            },
        );
        assert_eq!(capped.points_per_member(2), vec![5, 15]);
        // A tiny weight still gets a point.
        let tiny = Ring::build(
            &[("a:1", 1), ("b:1", 1000)],
            RingParams {
                points_per_weight: 1,
                max_size: 10,
            },
        );
        assert_eq!(tiny.points_per_member(2), vec![1, 9]);
    }

    /// The owners of `sorted` key hashes by one merge pass over the points: the same as
    /// [`Ring::lookup`] per key (checked on a sample), far quicker in debug builds.
    fn owners_of_sorted(ring: &Ring, sorted: &[u64]) -> Vec<u32> {
        let mut p = 0;
        let owners: Vec<u32> = sorted
            .iter()
            .map(|&k| {
                while p < ring.hashes.len() && ring.hashes[p] < k {
                    p += 1;
                }
                ring.owners[if p == ring.hashes.len() { 0 } else { p }]
            })
            .collect();
        for (&k, &o) in sorted.iter().zip(&owners).step_by(97) {
            assert_eq!(ring.lookup(k), Some(o));
        }
        owners
    }

    #[test]
    fn removing_a_member_moves_only_its_keys_about_one_nth() {
        let n = 10;
        let addrs = addresses(n);
        let mut keys = keys();
        keys.sort_unstable();
        let full = ring_of(&addrs, RingParams::default());
        let before = owners_of_sorted(&full, &keys);
        let mut moved_total = 0usize;
        for removed in 0..n {
            let rest: Vec<String> = addrs
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, a)| a.clone())
                .collect();
            let after = owners_of_sorted(&ring_of(&rest, RingParams::default()), &keys);
            let mut moved = 0;
            for (&now, &was) in after.iter().zip(&before) {
                // Map the smaller list's index back to the full list.
                let now = if now as usize >= removed {
                    now + 1
                } else {
                    now
                };
                if now != was {
                    assert_eq!(was as usize, removed, "a key of a member that stayed moved");
                    moved += 1;
                }
            }
            assert_eq!(
                moved,
                before.iter().filter(|&&w| w as usize == removed).count()
            );
            moved_total += moved;
        }
        let average = moved_total as f64 / n as f64 / keys.len() as f64;
        let ideal = 1.0 / n as f64;
        assert!(
            (average - ideal).abs() <= 0.1 * ideal,
            "moved {average:.4} of keys on average, ideal {ideal:.4}"
        );
    }

    #[test]
    fn default_size_keeps_ten_members_within_1_15_of_the_mean() {
        let addrs = addresses(10);
        let ring = ring_of(&addrs, RingParams::default());
        let mut counts = vec![0usize; 10];
        for k in keys() {
            counts[ring.lookup(k).unwrap() as usize] += 1;
        }
        let ratio = peak_to_mean(&counts);
        assert!(ratio <= 1.15, "peak-to-mean {ratio:.4} over keys");
        let shares = ring.shares(10);
        let exact = shares.iter().cloned().fold(0.0, f64::max) * 10.0;
        assert!(exact <= 1.15, "peak-to-mean {exact:.4} of the exact shares");
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn weight_two_takes_about_twice_the_keys() {
        let addrs = addresses(10);
        let members: Vec<(&str, u32)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), if i == 0 { 2 } else { 1 }))
            .collect();
        let ring = Ring::build(&members, RingParams::default());
        let mut counts = [0usize; 10];
        for k in keys() {
            counts[ring.lookup(k).unwrap() as usize] += 1;
        }
        // Expected 2/11 and 1/11 of the keys. The weight-2 member's 1,024 points give its share
        // a relative spread of about 1/sqrt(1024) = 3.1 %; the mean of the nine others (512
        // points each) spreads about 4.4 % / 3 = 1.5 %; sampling 100,000 keys adds under 1 %.
        // The ratio thus spreads about 3.6 %: a 15 % tolerance is over 4 sigma, and still
        // tells weight 2 from weight 1.75 or 2.25.
        let others = counts[1..].iter().sum::<usize>() as f64 / 9.0;
        let ratio = counts[0] as f64 / others;
        assert!(
            (ratio - 2.0).abs() <= 0.3,
            "weight 2 got {ratio:.3}x the keys of weight 1"
        );
        let shares = ring.shares(10);
        let exact = shares[0] / (shares[1..].iter().sum::<f64>() / 9.0);
        assert!(
            (exact - 2.0).abs() <= 0.3,
            "weight 2 owns {exact:.3}x the ring of weight 1"
        );
    }
}
