//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018).
//!
//! With a balance factor `c ≥ 1`, no endpoint takes more than `ceil(c × average)` requests in
//! flight, where the average counts the request being placed: with `m` requests in flight over
//! endpoints of total weight `W`, an endpoint of weight `w` has room while its in-flight count is
//! under `ceil(c × (m + 1) × w / W)`. Since `c ≥ 1`, some endpoint always has room (if all were
//! at their caps, their counts would sum to at least `c × (m + 1) > m`). A key whose endpoint is
//! full passes on deterministically to the next owner along the ring, or of the next Maglev
//! entry, that has room: the same key and loads always give the same endpoint, and a key moves
//! only while its endpoint is full. HAProxy's `hash-balance-factor` and Envoy's
//! `hash_balance_factor` are the same idea in percent (125 = 1.25).
//!
//! The factor is kept in thousandths and the cap computed in integers, so every worker and
//! process computes the same cap (`core` has no float `ceil`, and floats would round
//! differently at the boundary).
//!
//! In-flight counts must be process-wide for the bound to mean anything, so they live in shared
//! data as an [`InFlight`] table. [`pick_and_acquire`] reads the table, picks with its loads and
//! counts the request in one compare-and-swap, so two workers cannot both take an endpoint's
//! last unit of room; [`release`] counts it out when its stream ends ([`acquire`] counts a
//! request in without picking).
//!
//! # Shared-data layout: `keel/picker/<picker>/in_flight`
//!
//! ```text
//! u32  n                  number of entries
//! n × {
//!   u64  address_hash     xxh64(endpoint address "ip:port", seed 0)
//!   u32  in_flight        requests in flight to that endpoint
//! }                       sorted by address_hash ascending, no duplicates, no zero counts
//! ```
//!
//! All little-endian; the value is exactly `4 + 12 n` bytes, anything else decodes to `None`
//! (treated as no requests in flight). Entries are keyed by address, not by position, so the
//! table survives endpoint set changes; an endpoint that left keeps its entry until its last
//! request ends.

use alloc::vec::Vec;

use super::levels::Picker;
use super::{hash_key, Endpoint, Pick};
use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, UpdateError};

/// The smallest balance factor: every endpoint exactly at the average.
pub const MIN_BALANCE_FACTOR: f64 = 1.0;
/// The largest balance factor accepted (beyond it the bound hardly ever applies).
pub const MAX_BALANCE_FACTOR: f64 = 100.0;

/// A validated balance factor, in thousandths (1.25 is 1250).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceFactor(u32);

impl BalanceFactor {
    /// `Some` for a finite factor in `[1, 100]`, rounded to thousandths.
    pub fn new(factor: f64) -> Option<BalanceFactor> {
        (MIN_BALANCE_FACTOR..=MAX_BALANCE_FACTOR)
            .contains(&factor)
            .then_some(BalanceFactor((factor * 1000.0 + 0.5) as u32))
    }

    /// The factor in thousandths.
    pub fn per_mille(self) -> u32 {
        self.0
    }

    /// The factor.
    pub fn get(self) -> f64 {
        f64::from(self.0) / 1000.0
    }

    /// The in-flight cap of an endpoint of weight `weight`, when `in_flight` requests are in
    /// flight over endpoints of total weight `total_weight`: `ceil(factor × (in_flight + 1) ×
    /// weight / total_weight)`, at least 1.
    pub fn cap(self, in_flight: u64, weight: u32, total_weight: u64) -> u64 {
        let num = u128::from(self.0) * (u128::from(in_flight) + 1) * u128::from(weight.max(1));
        let den = 1000 * u128::from(total_weight.max(1));
        let cap = num.div_ceil(den);
        u64::try_from(cap).unwrap_or(u64::MAX).max(1)
    }
}

/// Process-wide in-flight counts per endpoint address (layout in the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    entries: Vec<(u64, u32)>,
}

impl InFlight {
    /// Decodes the layout; `None` for a value of the wrong shape.
    pub fn decode(bytes: &[u8]) -> Option<InFlight> {
        let mut r = Reader::new(bytes);
        let n = r.u32()? as usize;
        if r.remaining() != n.checked_mul(12)? {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push((r.u64()?, r.u32()?));
        }
        r.end()?;
        let sorted = entries.windows(2).all(|w| match w {
            [a, b] => a.0 < b.0,
            _ => true,
        });
        sorted.then_some(InFlight { entries })
    }

    /// Encodes the layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut w =
            Writer::with_capacity(4 + 12 * self.entries.len()).u32(self.entries.len() as u32);
        for &(h, n) in &self.entries {
            w = w.u64(h).u32(n);
        }
        w.finish()
    }

    /// Requests in flight to `address`.
    pub fn get(&self, address: &str) -> u32 {
        let h = hash_key(address.as_bytes());
        match self.entries.binary_search_by_key(&h, |e| e.0) {
            Ok(i) => self.entries.get(i).map_or(0, |e| e.1),
            Err(_) => 0,
        }
    }

    /// One more request in flight to `address` (saturating).
    pub fn add(&mut self, address: &str) {
        let h = hash_key(address.as_bytes());
        match self.entries.binary_search_by_key(&h, |e| e.0) {
            Ok(i) => {
                if let Some(e) = self.entries.get_mut(i) {
                    e.1 = e.1.saturating_add(1);
                }
            }
            Err(i) => self.entries.insert(i, (h, 1)),
        }
    }

    /// One request fewer in flight to `address`; the entry goes at zero.
    pub fn remove(&mut self, address: &str) {
        let h = hash_key(address.as_bytes());
        if let Ok(i) = self.entries.binary_search_by_key(&h, |e| e.0) {
            let zero = match self.entries.get_mut(i) {
                Some(e) => {
                    e.1 = e.1.saturating_sub(1);
                    e.1 == 0
                }
                None => false,
            };
            if zero {
                self.entries.remove(i);
            }
        }
    }

    /// The in-flight count of each of `endpoints`, in their order: the `in_flight` argument of
    /// a pick.
    pub fn loads<'a>(&self, endpoints: impl Iterator<Item = &'a Endpoint>) -> Vec<u32> {
        endpoints.map(|e| self.get(&e.address)).collect()
    }
}

/// A pick under bounded loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundedPick {
    /// The endpoint picked; for [`Pick::Host`] one request was counted in flight to it.
    pub pick: Pick,
    /// Whether the key's own endpoint was full and the key passed on to another.
    pub spilled: bool,
}

/// Picks the endpoint of key hash `hash` with the loads of the in-flight table under `key`,
/// and counts the request in flight to it, in one compare-and-swap loop: every worker sees the
/// counts the others acquired. The caller must [`release`] the picked address when the request
/// ends. [`Pick::NoHost`] writes nothing.
pub fn pick_and_acquire<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    picker: &Picker,
    hash: u64,
    attempts: u32,
) -> Result<BoundedPick, UpdateError> {
    let pick = update(store, key, attempts, |old| {
        let mut table = old.and_then(InFlight::decode).unwrap_or_default();
        let loads = table.loads(picker.endpoints().iter());
        let pick = picker.pick_hash(hash, &loads);
        let write = match pick {
            Pick::Host(i) => picker.endpoints().get(i).map(|e| {
                table.add(&e.address);
                table.encode()
            }),
            Pick::NoHost => None,
        };
        (write, pick)
    })?;
    Ok(BoundedPick {
        pick,
        spilled: pick != Pick::NoHost && pick != picker.pick_hash(hash, &[]),
    })
}

/// Counts one more request in flight to `address` in the table under `key`.
pub fn acquire<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    address: &str,
    attempts: u32,
) -> Result<(), UpdateError> {
    update(store, key, attempts, |old| {
        let mut table = old.and_then(InFlight::decode).unwrap_or_default();
        table.add(address);
        (Some(table.encode()), ())
    })
}

/// Counts one request fewer in flight to `address` in the table under `key`.
pub fn release<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    address: &str,
    attempts: u32,
) -> Result<(), UpdateError> {
    update(store, key, attempts, |old| {
        let mut table = old.and_then(InFlight::decode).unwrap_or_default();
        table.remove(address);
        (Some(table.encode()), ())
    })
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::testing::MemoryStore;
    use alloc::vec;

    #[test]
    fn factors_are_validated_and_kept_in_thousandths() {
        assert_eq!(
            BalanceFactor::new(1.25).map(BalanceFactor::per_mille),
            Some(1250)
        );
        assert_eq!(
            BalanceFactor::new(1.0).map(BalanceFactor::per_mille),
            Some(1000)
        );
        assert!(BalanceFactor::new(0.99).is_none());
        assert!(BalanceFactor::new(f64::NAN).is_none());
        assert!(BalanceFactor::new(f64::INFINITY).is_none());
        assert_eq!(BalanceFactor::new(2.5).unwrap().get(), 2.5);
    }

    #[test]
    fn cap_is_the_ceiling_of_factor_times_average() {
        let f = BalanceFactor::new(1.25).unwrap();
        // 9 in flight + this one over 10 equal endpoints: average 1, cap ceil(1.25) = 2.
        assert_eq!(f.cap(9, 1, 10), 2);
        // 39 + 1 over 10: average 4, cap 5.
        assert_eq!(f.cap(39, 1, 10), 5);
        // Weight 2 of total 11 with 43 + 1: 1.25 × 44 × 2 / 11 = 10.
        assert_eq!(f.cap(43, 2, 11), 10);
        assert_eq!(BalanceFactor::new(1.0).unwrap().cap(0, 1, 10), 1);
    }

    #[test]
    fn in_flight_round_trips_and_refuses_bad_layouts() {
        let mut t = InFlight::default();
        t.add("10.0.0.1:80");
        t.add("10.0.0.1:80");
        t.add("10.0.0.2:80");
        let bytes = t.encode();
        assert_eq!(bytes.len(), 4 + 2 * 12);
        let back = InFlight::decode(&bytes).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.get("10.0.0.1:80"), 2);
        assert_eq!(back.get("10.0.0.3:80"), 0);
        assert_eq!(InFlight::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(InFlight::decode(&[1, 0, 0, 0]), None);
        assert_eq!(InFlight::decode(&[0, 0, 0, 0]), Some(InFlight::default()));
        // Unsorted entries are not the layout.
        let unsorted = Writer::default()
            .u32(2)
            .u64(5)
            .u32(1)
            .u64(3)
            .u32(1)
            .finish();
        assert_eq!(InFlight::decode(&unsorted), None);
        t.remove("10.0.0.2:80");
        t.remove("10.0.0.2:80");
        assert_eq!(t.entries.len(), 1);
        let eps = [Endpoint::new("10.0.0.1:80"), Endpoint::new("10.0.0.2:80")];
        assert_eq!(t.loads(eps.iter()), vec![2, 0]);
    }

    #[test]
    fn pick_and_acquire_counts_the_pick_and_spills_from_a_full_endpoint() {
        use crate::picker::{Algorithm, PickerOptions, RingParams};
        let store = MemoryStore::default();
        let key = "keel/picker/users/in_flight";
        let eps: Vec<Endpoint> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .into_iter()
            .map(Endpoint::new)
            .collect();
        let options = PickerOptions {
            balance_factor: BalanceFactor::new(1.0),
            ..PickerOptions::default()
        };
        let picker = Picker::new(Algorithm::Ring(RingParams::default()), options, &eps);
        let hot = hash_key(b"hot");
        let Pick::Host(home) = picker.pick_hash(hot, &[]) else {
            panic!("no host");
        };
        // Factor 1.0 over 3 endpoints: the home takes the first request, then it is full
        // (1 of ceil(2/3) = 1) and the next two go elsewhere, one each.
        let first = pick_and_acquire(&store, key, &picker, hot, 4).unwrap();
        assert_eq!(
            first,
            BoundedPick {
                pick: Pick::Host(home),
                spilled: false
            }
        );
        let mut others = Vec::new();
        for _ in 0..2 {
            let next = pick_and_acquire(&store, key, &picker, hot, 4).unwrap();
            assert!(next.spilled);
            let Pick::Host(i) = next.pick else {
                panic!("no host");
            };
            others.push(i);
        }
        others.sort_unstable();
        others.dedup();
        assert_eq!(others.len(), 2, "each spill found an endpoint with room");
        let (bytes, _) = store.get(key).unwrap().unwrap();
        let table = InFlight::decode(&bytes).unwrap();
        assert_eq!(table.loads(eps.iter()), vec![1, 1, 1]);
        // Released, the key is back home.
        for e in &eps {
            release(&store, key, &e.address, 4).unwrap();
        }
        let again = pick_and_acquire(&store, key, &picker, hot, 4).unwrap();
        assert_eq!(again.pick, Pick::Host(home));
        // Nothing to pick: nothing written.
        let empty = Picker::new(Algorithm::Ring(RingParams::default()), options, &[]);
        let before = store.get(key).unwrap();
        let none = pick_and_acquire(&store, key, &empty, hot, 4).unwrap();
        assert_eq!(
            none,
            BoundedPick {
                pick: Pick::NoHost,
                spilled: false
            }
        );
        assert_eq!(store.get(key).unwrap(), before);
    }

    #[test]
    fn acquire_and_release_go_through_shared_data() {
        let store = MemoryStore::default();
        let key = "keel/picker/users/in_flight";
        acquire(&store, key, "10.0.0.1:80", 4).unwrap();
        acquire(&store, key, "10.0.0.1:80", 4).unwrap();
        release(&store, key, "10.0.0.1:80", 4).unwrap();
        let (bytes, _) = store.get(key).unwrap().unwrap();
        assert_eq!(InFlight::decode(&bytes).unwrap().get("10.0.0.1:80"), 1);
    }
}
