//! The bounded key table: per-key limits in a fixed number of shared-data slots.
//!
//! A limit per API key, user or IP must not let a flood of distinct keys grow the host's shared
//! data without bound. A policy therefore owns `slots` shared-data entries
//! (`<prefix>/<slot>`, see [`slot_key`]). A key is hashed to a 64-bit [`fingerprint`] (xxHash64,
//! as Envoy's ring hash), which gives it two candidate slots ([`KeyTable::candidates`]), as in
//! two-choice hashing. A slot stores the fingerprint of the key that holds it followed by that
//! key's limiter state:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | `holder: u64`, the holder's fingerprint, little-endian |
//! | `Limiter::state_len()` | the holder's limiter state (see the [`limit`](super) layouts) |
//!
//! A value of any other length is an empty slot; [`KeyTable::EMPTY_SLOT`] is the one written to
//! create slots ahead of traffic ([`KeyTable::prepare`]).
//!
//! A key uses the first of its candidates that it holds, that is empty, or whose holder is idle
//! (its state is equivalent to a fresh key: bucket full, window over): an idle slot is taken
//! over and starts fresh. When both candidates are held by active keys, the key shares the
//! bucket of the key that holds its first slot, keeping that holder's fingerprint. Sharing is
//! stricter, never looser: the two keys draw on one bucket, so neither gets more than its own
//! limit. Memory stays at `slots` entries whatever the number of keys.
//!
//! [`KeyTable::steps`] gives the order of the walk that keeps this promise (a key's own slot
//! always wins over taking over an idle one, so a key that moved to its second slot does not
//! get a fresh bucket when its first slot falls idle); [`KeyTable::acquire`] runs it against a
//! [`SharedStore`].

use alloc::string::String;
use alloc::vec::Vec;

use super::{Decision, Limiter};
use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, StoreError, UpdateError};
use crate::time::{Duration, Instant};

/// A key's 64-bit fingerprint: xxHash64 with seed 0.
pub fn fingerprint(key: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(key, 0)
}

/// The shared-data key of `slot` under `prefix`: `keel/rate_limit/api` and 7 give
/// `keel/rate_limit/api/7` (a trailing `/` on the prefix is not doubled).
///
/// Built by hand rather than with `format!`: it runs for every request.
pub fn slot_key(prefix: &str, slot: u32) -> String {
    let prefix = prefix.trim_end_matches('/');
    let mut key = String::with_capacity(prefix.len() + 11);
    key.push_str(prefix);
    key.push('/');
    crate::codec::push_decimal(&mut key, u64::from(slot));
    key
}

/// Runs `f` with [`slot_key`]`(prefix, slot)`, built on the stack when it fits (no allocation
/// per request), else in a `String`: the same text either way.
pub fn with_slot_key<R>(prefix: &str, slot: u32, f: impl FnOnce(&str) -> R) -> R {
    let prefix = prefix.trim_end_matches('/');
    let mut buf = [0u8; 96];
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    let mut rest = slot;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
        start -= 1;
        if rest == 0 {
            break;
        }
    }
    let digits = digits.get(start..).unwrap_or_default();
    let len = prefix.len() + 1 + digits.len();
    if let Some(key) = buf.get_mut(..len) {
        let (p, rest) = key.split_at_mut(prefix.len());
        p.copy_from_slice(prefix.as_bytes());
        if let Some((slash, d)) = rest.split_first_mut() {
            *slash = b'/';
            d.copy_from_slice(digits);
        }
        if let Ok(key) = core::str::from_utf8(key) {
            return f(key);
        }
    }
    f(&slot_key(prefix, slot))
}

/// What happened to a request in one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotOutcome {
    /// The request was applied to this slot's state.
    Applied {
        /// The slot's new value (`None`: unchanged, nothing to write).
        new_value: Option<Vec<u8>>,
        /// The limiter's decision.
        decision: Decision,
    },
    /// Another key holds the slot and is active; try the next candidate.
    Occupied,
}

/// How far a key may go in claiming a slot at one step of the walk ([`KeyTable::steps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Only its own slot or an empty one.
    OwnOrEmpty,
    /// Also an idle one, taken over with a fresh state.
    OrIdle,
    /// Also an active one, shared with its holder (keeping the holder's fingerprint).
    OrShare,
}

/// A policy's bounded table of `slots` shared-data entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyTable {
    slots: u32,
}

impl KeyTable {
    /// The value that creates an empty slot.
    pub const EMPTY_SLOT: &'static [u8] = &[0];

    /// A table of `slots` entries (at least 1).
    pub fn new(slots: u32) -> KeyTable {
        KeyTable {
            slots: slots.max(1),
        }
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The two candidate slots of fingerprint `fp`, from its low and high 32 bits. They differ
    /// when there are two slots or more, and are both 0 with one slot.
    pub fn candidates(&self, fp: u64) -> [u32; 2] {
        let n = u64::from(self.slots);
        // Multiply-shift maps 32 uniform bits onto 0..n without a division's bias toward low
        // slots.
        let first = ((fp & 0xffff_ffff) * n) >> 32;
        if n == 1 {
            return [0, 0];
        }
        let step = 1 + (((fp >> 32) * (n - 1)) >> 32);
        // n >= 2 here; `max(1)` says so to the compiler (no division-by-zero check).
        let second = (first + step) % n.max(1);
        // Both are below n <= u32::MAX.
        [first as u32, second as u32]
    }

    /// The walk of fingerprint `fp`: the slots to try in order, each with how far the key may
    /// claim it. Apply each with [`KeyTable::claim_slot`] (one compare-and-swap per slot) until
    /// one gives [`SlotOutcome::Applied`]; the last step always does.
    ///
    /// The order is what keeps the table never looser than a key's own limit: the first
    /// candidate if the key holds it or it is empty, then the second if the key holds it or it
    /// is empty or idle, then the first taken over if idle or else shared. Taking over an idle
    /// first slot before looking at the second would hand a fresh bucket to a key whose own,
    /// drained bucket is in the second slot. With one slot the walk is that slot, shared.
    pub fn steps(&self, fp: u64) -> impl Iterator<Item = (u32, Claim)> {
        let [first, second] = self.candidates(fp);
        let (steps, n) = if first == second {
            ([(first, Claim::OrShare); 3], 1)
        } else {
            (
                [
                    (first, Claim::OwnOrEmpty),
                    (second, Claim::OrIdle),
                    (first, Claim::OrShare),
                ],
                3,
            )
        };
        steps.into_iter().take(n)
    }

    /// Applies a request of key `fp` to one slot whose stored value is `slot_value` (`None`:
    /// no value), as far as `claim` allows: [`SlotOutcome::Applied`] when the slot is empty or
    /// undecodable (the key starts fresh) or held by `fp`; with [`Claim::OrIdle`] also when the
    /// holder is idle (taken over, fresh); with [`Claim::OrShare`] in every case (an active
    /// holder's state is shared, keeping its fingerprint). Otherwise
    /// [`SlotOutcome::Occupied`].
    #[allow(clippy::too_many_arguments)] // One request's full context, as `Limiter::acquire` + slot.
    pub fn claim_slot(
        &self,
        limiter: &Limiter,
        slot_value: Option<&[u8]>,
        fp: u64,
        now: Instant,
        cost: u64,
        max_delay: Duration,
        claim: Claim,
    ) -> SlotOutcome {
        claim_slot(limiter, slot_value, fp, now, cost, max_delay, claim)
    }

    /// Applies a request of key `fp` to one slot whose stored value is `slot_value` (`None`:
    /// no value).
    ///
    /// [`SlotOutcome::Applied`] when the slot is empty or undecodable (the key starts fresh),
    /// held by `fp`, idle (taken over, fresh), or when `share` is true (the key shares the
    /// holder's state and keeps the holder's fingerprint); otherwise
    /// [`SlotOutcome::Occupied`]. This is [`KeyTable::claim_slot`] with [`Claim::OrIdle`] or
    /// [`Claim::OrShare`]; walk the slots with [`KeyTable::steps`] or [`KeyTable::acquire`].
    #[allow(clippy::too_many_arguments)] // One request's full context, as `Limiter::acquire` + slot.
    pub fn acquire_in_slot(
        &self,
        limiter: &Limiter,
        slot_value: Option<&[u8]>,
        fp: u64,
        now: Instant,
        cost: u64,
        max_delay: Duration,
        share: bool,
    ) -> SlotOutcome {
        let claim = if share { Claim::OrShare } else { Claim::OrIdle };
        claim_slot(limiter, slot_value, fp, now, cost, max_delay, claim)
    }

    /// Applies a request of the key with [`fingerprint`] `fp` to its slot in `store` under
    /// `prefix`: the walk of [`KeyTable::steps`], each slot updated by compare-and-swap with up
    /// to `attempts` attempts. At most three slot updates, usually one.
    #[allow(clippy::too_many_arguments)] // `claim_slot`'s context plus where the slots are.
    pub fn acquire<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        prefix: &str,
        limiter: &Limiter,
        fp: u64,
        now: Instant,
        cost: u64,
        max_delay: Duration,
        attempts: u32,
    ) -> Result<Decision, UpdateError> {
        let decided = self.walk(fp, |slot, claim| {
            with_slot_key(prefix, slot, |key| {
                update(store, key, attempts, |old| {
                    match claim_slot(limiter, old, fp, now, cost, max_delay, claim) {
                        SlotOutcome::Applied {
                            new_value,
                            decision,
                        } => (new_value, Some(decision)),
                        SlotOutcome::Occupied => (None, None),
                    }
                })
            })
        })?;
        // The walk's last step shares, so it always decides; were it not to, the key would be
        // treated as fresh.
        Ok(decided.unwrap_or_else(|| limiter.decide(None, now, cost, max_delay).1))
    }

    /// Runs `step(slot, claim)` over the walk of fingerprint `fp` until one decides.
    fn walk<E>(
        &self,
        fp: u64,
        mut step: impl FnMut(u32, Claim) -> Result<Option<Decision>, E>,
    ) -> Result<Option<Decision>, E> {
        for (slot, claim) in self.steps(fp) {
            if let Some(decision) = step(slot, claim)? {
                return Ok(Some(decision));
            }
        }
        Ok(None)
    }

    /// Creates every slot under `prefix` that has no value yet with [`KeyTable::EMPTY_SLOT`],
    /// so that every later write is a versioned compare-and-swap (a host may treat the write
    /// that creates a key as unconditional). Returns how many slots it created. Costs one read
    /// per slot: call it once per configuration, not per request.
    pub fn prepare<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        prefix: &str,
    ) -> Result<u32, StoreError> {
        let mut created = 0;
        for slot in 0..self.slots {
            if crate::store::ensure(store, &slot_key(prefix, slot), Self::EMPTY_SLOT)? {
                created += 1;
            }
        }
        Ok(created)
    }
}

/// The holder's fingerprint and state of a slot value, if it has this limiter's layout.
fn split_slot(value: &[u8], state_len: usize) -> Option<(u64, &[u8])> {
    let mut r = Reader::new(value);
    let holder = r.u64()?;
    let state = r.bytes(state_len)?;
    r.end()?;
    Some((holder, state))
}

fn claim_slot(
    limiter: &Limiter,
    slot_value: Option<&[u8]>,
    fp: u64,
    now: Instant,
    cost: u64,
    max_delay: Duration,
    claim: Claim,
) -> SlotOutcome {
    let apply = |state: Option<&[u8]>, owner: u64| {
        let (new_state, decision) = limiter.decide(state, now, cost, max_delay);
        // One allocation per decision: the value `store::update` writes.
        let new_value = new_state.map(|s| {
            Writer::with_capacity(8 + s.len())
                .u64(owner)
                .bytes(&s)
                .finish()
        });
        SlotOutcome::Applied {
            new_value,
            decision,
        }
    };
    match slot_value.and_then(|v| split_slot(v, limiter.state_len())) {
        None => apply(None, fp),
        Some((holder, state)) if holder == fp => apply(Some(state), fp),
        Some(_) if claim == Claim::OwnOrEmpty => SlotOutcome::Occupied,
        Some((_, state)) if limiter.is_idle(state, now) => apply(None, fp),
        Some((holder, state)) if claim == Claim::OrShare => apply(Some(state), holder),
        Some(_) => SlotOutcome::Occupied,
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::config::Rate;
    use crate::rand::{Rng, SeededRng};
    use crate::rate_limit::Algorithm;
    use crate::store::testing::MemoryStore;

    const PREFIX: &str = "keel/rate_limit/api/";

    fn bucket(burst: u64) -> Limiter {
        Limiter::new(
            Algorithm::TokenBucket,
            Rate {
                requests: 1,
                period: Duration::from_secs(1),
                burst,
            },
        )
    }

    fn holder(store: &MemoryStore, slot: u32) -> Option<u64> {
        let map = store.map.borrow();
        let (value, _) = map.get(&slot_key(PREFIX, slot))?;
        split_slot(value, 24).map(|(h, _)| h)
    }

    fn acquire(
        table: &KeyTable,
        store: &MemoryStore,
        l: &Limiter,
        key: &str,
        now: Instant,
    ) -> Decision {
        table
            .acquire(
                store,
                PREFIX,
                l,
                fingerprint(key.as_bytes()),
                now,
                1,
                Duration::ZERO,
                4,
            )
            .unwrap()
    }

    #[test]
    fn slot_keys_name_the_policy_and_slot() {
        assert_eq!(slot_key("keel/rate_limit/api/", 7), "keel/rate_limit/api/7");
        assert_eq!(slot_key("keel/rate_limit/api", 0), "keel/rate_limit/api/0");
        for slot in [9, 10, 99, 100, 16_383, 1_048_575, 1_234_567_890, u32::MAX] {
            assert_eq!(slot_key("p//", slot), alloc::format!("p/{slot}"));
        }
    }

    #[test]
    fn slot_keys_built_on_the_stack_are_the_same_text() {
        let long = "k".repeat(120);
        for prefix in [
            "keel/rate_limit/api/",
            "p//",
            "",
            "/",
            long.as_str(),
            &long[..84],
            &long[..85],
        ] {
            for slot in [
                0,
                7,
                9,
                10,
                99,
                100,
                16_383,
                1_048_575,
                1_234_567_890,
                u32::MAX,
            ] {
                let built = with_slot_key(prefix, slot, alloc::string::ToString::to_string);
                assert_eq!(built, slot_key(prefix, slot), "{prefix:?} {slot}");
            }
        }
    }

    #[test]
    fn candidates_are_in_range_distinct_and_stable() {
        let mut rng = SeededRng::new(3);
        for slots in [1u32, 2, 3, 1000, u32::MAX] {
            let t = KeyTable::new(slots);
            for _ in 0..2000 {
                let fp = rng.next_u64();
                let [a, b] = t.candidates(fp);
                assert!(a < slots && b < slots);
                assert_eq!(a == b, slots == 1);
                assert_eq!(t.candidates(fp), [a, b]);
            }
        }
        assert_eq!(KeyTable::new(0).slots(), 1);
        assert_eq!(fingerprint(b"user-1"), fingerprint(b"user-1"));
        assert_ne!(fingerprint(b"user-1"), fingerprint(b"user-2"));
    }

    #[test]
    fn the_walk_tries_its_own_slots_before_taking_over_or_sharing() {
        let t = KeyTable::new(100);
        let fp = fingerprint(b"k");
        let [a, b] = t.candidates(fp);
        let steps: Vec<_> = t.steps(fp).collect();
        assert_eq!(
            steps,
            [
                (a, Claim::OwnOrEmpty),
                (b, Claim::OrIdle),
                (a, Claim::OrShare)
            ]
        );
        let one: Vec<_> = KeyTable::new(1).steps(fp).collect();
        assert_eq!(one, [(0, Claim::OrShare)]);
    }

    #[test]
    fn the_same_key_uses_the_same_slot() {
        let table = KeyTable::new(64);
        let store = MemoryStore::default();
        let l = bucket(3);
        let now = Instant::from_nanos(1_000_000_000);
        for left in [2, 1, 0] {
            let d = acquire(&table, &store, &l, "alice", now);
            assert!(matches!(d, Decision::Allow { remaining, .. } if remaining == left));
        }
        assert!(!acquire(&table, &store, &l, "alice", now).is_admitted());
        assert_eq!(store.map.borrow().len(), 1);
        let [first, _] = table.candidates(fingerprint(b"alice"));
        assert_eq!(holder(&store, first), Some(fingerprint(b"alice")));
    }

    #[test]
    fn keys_beyond_the_bound_share_their_first_slot_and_are_stricter() {
        let table = KeyTable::new(2);
        let store = MemoryStore::default();
        let l = bucket(3);
        let now = Instant::from_nanos(1_000_000_000);
        // a drains its bucket, b takes one token: both slots are held by active keys.
        for _ in 0..3 {
            acquire(&table, &store, &l, "a", now);
        }
        acquire(&table, &store, &l, "b", now);
        let slot_a = (0..2)
            .find(|s| holder(&store, *s) == Some(fingerprint(b"a")))
            .unwrap();
        let slot_b = 1 - slot_a;
        assert_eq!(holder(&store, slot_b), Some(fingerprint(b"b")));
        // A third key whose first candidate is a's slot shares a's empty bucket: refused.
        let c = (0..)
            .map(|i| alloc::format!("c{i}"))
            .find(|k| table.candidates(fingerprint(k.as_bytes()))[0] == slot_a)
            .unwrap();
        assert!(!acquire(&table, &store, &l, &c, now).is_admitted());
        // One whose first candidate is b's slot draws on b's bucket (2 left), keeping b's
        // fingerprint: the two together get b's limit, not more.
        let d = (0..)
            .map(|i| alloc::format!("d{i}"))
            .find(|k| table.candidates(fingerprint(k.as_bytes()))[0] == slot_b)
            .unwrap();
        assert!(matches!(
            acquire(&table, &store, &l, &d, now),
            Decision::Allow { remaining: 1, .. }
        ));
        assert_eq!(holder(&store, slot_b), Some(fingerprint(b"b")));
        assert!(matches!(
            acquire(&table, &store, &l, "b", now),
            Decision::Allow { remaining: 0, .. }
        ));
        assert!(!acquire(&table, &store, &l, &d, now).is_admitted());
    }

    #[test]
    fn an_idle_slot_is_taken_over_fresh() {
        let table = KeyTable::new(1);
        let store = MemoryStore::default();
        let l = bucket(2);
        let t0 = Instant::from_nanos(1_000_000_000);
        acquire(&table, &store, &l, "old", t0);
        acquire(&table, &store, &l, "old", t0);
        // While "old" is active, "new" shares its empty bucket.
        assert!(!acquire(&table, &store, &l, "new", t0).is_admitted());
        // Two seconds later "old"'s bucket is full again: "new" takes the slot with a fresh one.
        let t2 = t0.saturating_add(Duration::from_secs(2));
        assert!(matches!(
            acquire(&table, &store, &l, "new", t2),
            Decision::Allow { remaining: 1, .. }
        ));
        assert_eq!(holder(&store, 0), Some(fingerprint(b"new")));
    }

    #[test]
    fn a_key_in_its_second_slot_keeps_its_bucket_when_the_first_falls_idle() {
        let table = KeyTable::new(2);
        let store = MemoryStore::default();
        let l = bucket(3);
        let t0 = Instant::from_nanos(1_000_000_000);
        let [first, _] = table.candidates(fingerprint(b"k"));
        // Another key takes k's first slot (one token), then k drains its bucket in the second.
        let other = (0..)
            .map(|i| alloc::format!("o{i}"))
            .find(|o| table.candidates(fingerprint(o.as_bytes()))[0] == first)
            .unwrap();
        acquire(&table, &store, &l, &other, t0);
        let t1 = t0.saturating_add(Duration::from_millis(500));
        for _ in 0..3 {
            assert!(acquire(&table, &store, &l, "k", t1).is_admitted());
        }
        // At t0 + 1 s the other key's bucket is full (idle), k's holds half a token: refused.
        let t2 = t0.saturating_add(Duration::from_secs(1));
        assert!(l.is_idle(&store.map.borrow()[&slot_key(PREFIX, first)].0[8..], t2));
        assert!(!acquire(&table, &store, &l, "k", t2).is_admitted());
    }

    #[test]
    fn undecodable_or_foreign_values_are_empty_slots() {
        let table = KeyTable::new(8);
        let l = bucket(2);
        let now = Instant::ZERO;
        for value in [&[][..], KeyTable::EMPTY_SLOT, &[1u8; 31], &[1u8; 33]] {
            let out = table.acquire_in_slot(&l, Some(value), 42, now, 1, Duration::ZERO, false);
            let SlotOutcome::Applied {
                new_value: Some(v),
                decision,
            } = out
            else {
                panic!("{out:?}")
            };
            assert!(matches!(decision, Decision::Allow { remaining: 1, .. }));
            assert_eq!(split_slot(&v, 24).unwrap().0, 42);
        }
        // Held by an active key: occupied unless sharing.
        let SlotOutcome::Applied {
            new_value: Some(held),
            ..
        } = table.acquire_in_slot(&l, None, 7, now, 1, Duration::ZERO, false)
        else {
            panic!()
        };
        assert_eq!(
            table.acquire_in_slot(&l, Some(&held), 42, now, 1, Duration::ZERO, false),
            SlotOutcome::Occupied
        );
        let shared = table.acquire_in_slot(&l, Some(&held), 42, now, 1, Duration::ZERO, true);
        let SlotOutcome::Applied {
            new_value: Some(v), ..
        } = shared
        else {
            panic!("{shared:?}")
        };
        assert_eq!(split_slot(&v, 24).unwrap().0, 7);
    }

    #[test]
    fn a_thousand_requests_at_one_instant_admit_exactly_the_burst() {
        for prepared in [false, true] {
            let table = KeyTable::new(16);
            let store = MemoryStore::default();
            if prepared {
                assert_eq!(table.prepare(&store, PREFIX), Ok(16));
                assert_eq!(table.prepare(&store, PREFIX), Ok(0));
            }
            let l = bucket(37);
            let now = Instant::from_nanos(5_000_000_000);
            let admitted = (0..1000)
                .filter(|_| acquire(&table, &store, &l, "hot", now).is_admitted())
                .count();
            assert_eq!(admitted, 37);
        }
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_slots() {
        // The same walk as `KeyTable::acquire`, over slots in a Vec instead of a store, to keep
        // 100_000 keys fast.
        let table = KeyTable::new(1000);
        let mut slots: Vec<Option<Vec<u8>>> = alloc::vec![None; 1000];
        let l = bucket(5);
        let now = Instant::from_nanos(1_000_000_000);
        let mut rng = SeededRng::new(99);
        let mut admitted = 0u64;
        let mut touched = alloc::vec![false; 1000];
        for _ in 0..100_000 {
            let fp = fingerprint(&rng.next_u64().to_le_bytes());
            let decided = table.walk(fp, |slot, claim| {
                let cell = &mut slots[slot as usize];
                touched[slot as usize] = true;
                let outcome = claim_slot(&l, cell.as_deref(), fp, now, 1, Duration::ZERO, claim);
                Ok::<_, ()>(match outcome {
                    SlotOutcome::Applied {
                        new_value,
                        decision,
                    } => {
                        if new_value.is_some() {
                            *cell = new_value;
                        }
                        Some(decision)
                    }
                    SlotOutcome::Occupied => None,
                })
            });
            admitted += u64::from(decided.unwrap().unwrap().is_admitted());
        }
        // Candidates never leave the table, and the keys spread over nearly all of it.
        assert!(touched.iter().filter(|t| **t).count() > 990);
        // Every slot is one bucket: no more than slots * burst at one instant.
        assert!(admitted <= 1000 * 5, "{admitted}");
        assert!(admitted >= 990 * 5, "{admitted}");
    }
}
