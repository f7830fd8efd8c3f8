//! The per-process store: records in a fixed ring of shared-data slots, oldest reused first.
//!
//! Envoy's shared data has no delete (proxy-wasm ABI 0.2.1) and no "set if absent" (a
//! compare-and-swap against version 0 writes unconditionally), so the store lives in a fixed
//! set of keys created before traffic ([`SharedRing::prepare`]) and only ever rewritten in
//! place with versioned compare-and-swaps:
//!
//! | key | value |
//! |---|---|
//! | `<prefix>/cursor` | `u64`: the next sequence number (starts at 1) |
//! | `<prefix>/slot/<i>`, `i` in `0..max_entries` | a [`Record`](super::record) (or the 1-byte empty record) |
//! | `<prefix>/dir/<b>`, `b` in `0..ceil(max_entries / 4)` | the directory bucket: `u16 n`, then `n` × (`u64 key_hash`, `u64 seq`) |
//!
//! **Claims take slots in ring order.** A first request takes the next sequence number `s`
//! from the cursor (one compare-and-swap) and writes its in-flight record into slot
//! `s mod max_entries`. That slot held the record claimed `max_entries` claims ago, the oldest
//! one: it is evicted (counted when it was still live). Eviction is therefore exactly oldest
//! first, whatever the records' states.
//!
//! **The directory finds a key's slot.** The key's hash picks a bucket; the bucket maps the key
//! hash to the sequence number of its record. A reader checks that the slot still holds that
//! sequence number and that key (both hashes), so a stale entry (its slot reused) reads as no
//! record. A claim is published by a compare-and-swap on the bucket, which is also what makes
//! two simultaneous first requests of one key agree: the loser re-reads the bucket, finds the
//! winner's live claim, frees its own slot and answers `409`. Each bucket write drops entries
//! whose slots were reused; a bucket holds at most [`BUCKET_CAPACITY`] entries, and a full one
//! drops its oldest entry (an early eviction, counted).
//!
//! **Bounds.** `max_entries` slots of at most `record_budget` bytes each (a completed answer
//! larger than that is not stored and releases its key), `ceil(max_entries / 4)` buckets of at
//! most `2 + 16 × BUCKET_CAPACITY` bytes, and the 8-byte cursor: [`SharedRing::max_bytes`].
//! However many distinct keys come, the store never has more keys or bytes than that.

use alloc::string::String;
use alloc::vec::Vec;

use super::record::{decide, Decision, Record, ScopedKey, State, StoredResponse, EMPTY};
use crate::codec::push_decimal;
use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, StoreError, UpdateError};
use crate::time::{Duration, Instant};

/// The most entries of one directory bucket.
pub const BUCKET_CAPACITY: usize = 16;
/// Slots per directory bucket, on average.
const SLOTS_PER_BUCKET: u32 = 4;

/// Why the store could not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The host refused a read or a write.
    Host,
    /// Concurrent writers won every attempt.
    Contended,
}

impl From<UpdateError> for RingError {
    fn from(e: UpdateError) -> RingError {
        match e {
            UpdateError::Host => RingError::Host,
            UpdateError::Contended => RingError::Contended,
        }
    }
}

impl From<StoreError> for RingError {
    fn from(e: StoreError) -> RingError {
        match e {
            StoreError::Host => RingError::Host,
            StoreError::CasMismatch => RingError::Contended,
        }
    }
}

/// A claim: the first request holds the key through it until [`SharedRing::complete`] or
/// [`SharedRing::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The claim's sequence number.
    pub seq: u64,
    /// The key.
    pub key: ScopedKey,
}

/// What [`SharedRing::begin`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// A live record decided.
    Decided(Decision),
    /// No live record: the request claimed the key.
    Claimed(Ticket),
}

/// How [`SharedRing::complete`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The answer is stored.
    Stored,
    /// The answer is larger than a record may be: the key is released.
    TooLarge,
    /// The claim's slot was reused before the answer came (the ring went round).
    Evicted,
}

/// The ring of one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRing {
    prefix: String,
    entries: u32,
    buckets: u32,
    record_budget: usize,
    attempts: u32,
}

impl SharedRing {
    /// A ring of `entries` slots under `prefix` (`keel/idempotency/<policy>`), whose records
    /// may be `record_budget` bytes long; compare-and-swap loops try `attempts` times.
    pub fn new(prefix: &str, entries: u32, record_budget: u64, attempts: u32) -> SharedRing {
        let entries = entries.max(1);
        SharedRing {
            prefix: String::from(prefix.trim_end_matches('/')),
            entries,
            buckets: entries.div_ceil(SLOTS_PER_BUCKET),
            record_budget: usize::try_from(record_budget).unwrap_or(usize::MAX),
            attempts: attempts.max(1),
        }
    }

    /// The number of slots.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The number of directory buckets.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// How many shared-data keys the store uses: slots, buckets and the cursor.
    pub fn max_keys(&self) -> u64 {
        u64::from(self.entries) + u64::from(self.buckets) + 1
    }

    /// The most bytes the store's values take together.
    pub fn max_bytes(&self) -> u64 {
        u64::from(self.entries) * self.record_budget as u64
            + u64::from(self.buckets) * (2 + 16 * BUCKET_CAPACITY as u64)
            + 8
    }

    /// The cursor's key.
    pub fn cursor_key(&self) -> String {
        let mut k = self.prefix.clone();
        k.push_str("/cursor");
        k
    }

    /// The key of slot `i`.
    pub fn slot_key(&self, i: u32) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 16);
        k.push_str(&self.prefix);
        k.push_str("/slot/");
        push_decimal(&mut k, u64::from(i));
        k
    }

    /// The key of directory bucket `b`.
    pub fn bucket_key(&self, b: u32) -> String {
        let mut k = String::with_capacity(self.prefix.len() + 16);
        k.push_str(&self.prefix);
        k.push_str("/dir/");
        push_decimal(&mut k, u64::from(b));
        k
    }

    fn slot_of(&self, seq: u64) -> u32 {
        // Below `entries`, a u32.
        (seq % u64::from(self.entries)) as u32
    }

    fn bucket_of(&self, key: &ScopedKey) -> u32 {
        (((key.hash >> 32) * u64::from(self.buckets)) >> 32) as u32
    }

    /// Creates every key the store uses that does not exist yet, so that every later write is
    /// a versioned compare-and-swap. Safe to run from every worker at once: it writes only
    /// the empty value, and only where there is none.
    pub fn prepare<S: SharedStore + ?Sized>(&self, store: &S) -> Result<(), StoreError> {
        let cursor = self.cursor_key();
        if store.get(&cursor)?.is_none() {
            store.set(&cursor, &1u64.to_le_bytes(), None)?;
        }
        for b in 0..self.buckets {
            let key = self.bucket_key(b);
            if store.get(&key)?.is_none() {
                store.set(&key, &0u16.to_le_bytes(), None)?;
            }
        }
        for i in 0..self.entries {
            let key = self.slot_key(i);
            if store.get(&key)?.is_none() {
                store.set(&key, EMPTY, None)?;
            }
        }
        Ok(())
    }

    /// The live record of `seq` for `key` in its slot, if the slot still holds it.
    fn record_at<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        seq: u64,
        key: ScopedKey,
    ) -> Result<Option<Record>, RingError> {
        let Some((bytes, _)) = store.get(&self.slot_key(self.slot_of(seq)))? else {
            return Ok(None);
        };
        Ok(Record::decode(&bytes).filter(|r| r.seq == seq && r.key == key))
    }

    // One request's full context, as `begin` takes it, plus the bucket and the claim to skip.
    #[allow(clippy::too_many_arguments)]
    /// What the record of `key` in `bucket` decides for a request with `fingerprint`.
    fn decided<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        bucket: &[(u64, u64)],
        key: ScopedKey,
        fingerprint: u64,
        now: Instant,
        retry_after: Duration,
        except: u64,
    ) -> Result<Option<Decision>, RingError> {
        for &(hash, seq) in bucket {
            if hash != key.hash || seq == except {
                continue;
            }
            let record = self.record_at(store, seq, key)?;
            if let Some(d) = decide(record.as_ref(), key, fingerprint, now, retry_after) {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// The request of `key` with `fingerprint` at `now`: the live record's decision, or a
    /// claim (in flight for `in_flight_timeout`). Also returns how many live records the claim
    /// evicted (0, 1 or 2).
    pub fn begin<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        key: ScopedKey,
        fingerprint: u64,
        now: Instant,
        in_flight_timeout: Duration,
        retry_after: Duration,
    ) -> Result<(Begin, u32), RingError> {
        let bucket_key = self.bucket_key(self.bucket_of(&key));
        let (mut bucket, mut version) = read_bucket(store, &bucket_key)?;
        if let Some(d) = self.decided(store, &bucket, key, fingerprint, now, retry_after, 0)? {
            return Ok((Begin::Decided(d), 0));
        }
        // Claim: the next slot of the ring.
        let seq = update(store, &self.cursor_key(), self.attempts, |old| {
            let next = old.and_then(|b| Reader::new(b).u64()).unwrap_or(1).max(1);
            (Some(next.saturating_add(1).to_le_bytes().to_vec()), next)
        })?;
        let slot_key = self.slot_key(self.slot_of(seq));
        let (old, slot_version) = store.get(&slot_key)?.unwrap_or((Vec::new(), 0));
        let mut evicted = u32::from(Record::decode(&old).is_some_and(|r| r.is_live(now)));
        let claim = Record::in_flight(seq, key, now, in_flight_timeout);
        store.set(&slot_key, &claim.encode(), Some(slot_version))?;
        let ticket = Ticket { seq, key };
        for _ in 0..self.attempts {
            // Someone else's claim landed first: theirs stands.
            if let Some(d) =
                self.decided(store, &bucket, key, fingerprint, now, retry_after, seq)?
            {
                self.release(store, ticket)?;
                return Ok((Begin::Decided(d), evicted));
            }
            let entries = u64::from(self.entries);
            let mut next: Vec<(u64, u64)> = bucket
                .iter()
                .copied()
                .filter(|&(h, s)| {
                    h != key.hash
                        && s.saturating_add(entries) > seq
                        && s < seq.saturating_add(entries)
                })
                .collect();
            next.push((key.hash, seq));
            while next.len() > BUCKET_CAPACITY {
                // Drop the oldest entry: its record cannot be found any more.
                if let Some(oldest) = next
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.1)
                    .map(|(i, _)| i)
                {
                    next.remove(oldest);
                    evicted += 1;
                }
            }
            match store.set(&bucket_key, &encode_bucket(&next), Some(version)) {
                Ok(()) => return Ok((Begin::Claimed(ticket), evicted)),
                Err(StoreError::CasMismatch) => {
                    (bucket, version) = read_bucket(store, &bucket_key)?;
                }
                Err(StoreError::Host) => return Err(RingError::Host),
            }
        }
        self.release(store, ticket)?;
        Err(RingError::Contended)
    }

    /// Stores the first request's answer under its claim, kept for `ttl` from `now`. A claim
    /// that timed out or whose slot was reused stores nothing ([`Completion::Evicted`]).
    pub fn complete<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        ticket: Ticket,
        fingerprint: u64,
        response: StoredResponse,
        now: Instant,
        ttl: Duration,
    ) -> Result<Completion, RingError> {
        let slot_key = self.slot_key(self.slot_of(ticket.seq));
        let Some((bytes, version)) = store.get(&slot_key)? else {
            return Ok(Completion::Evicted);
        };
        let Some(claim) = Record::decode(&bytes)
            .filter(|r| r.seq == ticket.seq && r.key == ticket.key && r.state == State::InFlight)
            // A claim past its in-flight timeout lost the key: a repeat may have claimed it.
            .filter(|r| r.is_live(now))
        else {
            return Ok(Completion::Evicted);
        };
        let done = claim.completed(fingerprint, response, now, ttl);
        if done.encoded_len() > self.record_budget {
            store.set(&slot_key, EMPTY, Some(version))?;
            return Ok(Completion::TooLarge);
        }
        match store.set(&slot_key, &done.encode(), Some(version)) {
            Ok(()) => Ok(Completion::Stored),
            // Only a claim that went round the ring writes this slot meanwhile.
            Err(StoreError::CasMismatch) => Ok(Completion::Evicted),
            Err(StoreError::Host) => Err(RingError::Host),
        }
    }

    /// Gives the key up: its next request runs as a first one. Nothing happens when the slot
    /// no longer holds the claim.
    pub fn release<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        ticket: Ticket,
    ) -> Result<(), RingError> {
        let slot_key = self.slot_key(self.slot_of(ticket.seq));
        let Some((bytes, version)) = store.get(&slot_key)? else {
            return Ok(());
        };
        if Record::decode(&bytes).is_some_and(|r| r.seq == ticket.seq && r.key == ticket.key) {
            match store.set(&slot_key, EMPTY, Some(version)) {
                Ok(()) | Err(StoreError::CasMismatch) => {}
                Err(StoreError::Host) => return Err(RingError::Host),
            }
        }
        Ok(())
    }
}

fn read_bucket<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
) -> Result<(Vec<(u64, u64)>, u32), RingError> {
    let Some((bytes, version)) = store.get(key)? else {
        return Ok((Vec::new(), 0));
    };
    Ok((decode_bucket(&bytes).unwrap_or_default(), version))
}

fn decode_bucket(bytes: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut r = Reader::new(bytes);
    let n = usize::from(r.u16()?);
    let mut out = Vec::with_capacity(n.min(BUCKET_CAPACITY));
    for _ in 0..n {
        out.push((r.u64()?, r.u64()?));
    }
    r.end()?;
    Some(out)
}

fn encode_bucket(entries: &[(u64, u64)]) -> Vec<u8> {
    let mut w = Writer::with_capacity(2 + 16 * entries.len()).u16(entries.len() as u16);
    for &(h, s) in entries {
        w = w.u64(h).u64(s);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::testing::MemoryStore;
    use alloc::format;
    use alloc::vec;

    const T: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);
    const RA: Duration = Duration::from_secs(1);

    fn ring(entries: u32) -> (SharedRing, MemoryStore) {
        let ring = SharedRing::new("keel/idempotency/p", entries, 4096, 8);
        let store = MemoryStore::default();
        ring.prepare(&store).unwrap();
        (ring, store)
    }

    fn key(i: u64) -> ScopedKey {
        ScopedKey::new("p", b"r", b"c", format!("key-{i}").as_bytes())
    }

    fn answer(n: u8) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("x-n".into(), vec![n])],
            body: vec![n; 10],
        }
    }

    fn at(s: u64) -> Instant {
        Instant::from_nanos(s * 1_000_000_000 + 1)
    }

    fn claim(ring: &SharedRing, store: &MemoryStore, k: ScopedKey, now: Instant) -> Ticket {
        match ring.begin(store, k, 7, now, T, RA).unwrap().0 {
            Begin::Claimed(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_conflict_replay_mismatch_expiry() {
        let (ring, store) = ring(16);
        let t = claim(&ring, &store, key(1), at(0));
        assert_eq!(
            ring.begin(&store, key(1), 7, at(1), T, RA).unwrap().0,
            Begin::Decided(Decision::Conflict { retry_after: RA })
        );
        assert_eq!(
            ring.complete(&store, t, 7, answer(1), at(2), TTL),
            Ok(Completion::Stored)
        );
        assert_eq!(
            ring.begin(&store, key(1), 7, at(3), T, RA).unwrap().0,
            Begin::Decided(Decision::Replay(answer(1)))
        );
        assert_eq!(
            ring.begin(&store, key(1), 8, at(3), T, RA).unwrap().0,
            Begin::Decided(Decision::Mismatch)
        );
        // Another key is untouched.
        claim(&ring, &store, key(2), at(3));
        // After the ttl the key runs again.
        claim(&ring, &store, key(1), at(2 + 3600));
    }

    #[test]
    fn an_unfinished_claim_times_out() {
        let (ring, store) = ring(16);
        let first = claim(&ring, &store, key(1), at(0));
        assert!(matches!(
            ring.begin(&store, key(1), 7, at(29), T, RA).unwrap().0,
            Begin::Decided(Decision::Conflict { .. })
        ));
        let second = claim(&ring, &store, key(1), at(30));
        // The first request's late answer is not stored over the new claim.
        assert_eq!(
            ring.complete(&store, first, 7, answer(1), at(31), TTL),
            Ok(Completion::Evicted)
        );
        assert_eq!(
            ring.complete(&store, second, 7, answer(2), at(31), TTL),
            Ok(Completion::Stored)
        );
        assert_eq!(
            ring.begin(&store, key(1), 7, at(32), T, RA).unwrap().0,
            Begin::Decided(Decision::Replay(answer(2)))
        );
    }

    #[test]
    fn release_frees_the_key_and_large_answers_are_not_kept() {
        let (ring, store) = ring(16);
        let t = claim(&ring, &store, key(1), at(0));
        ring.release(&store, t).unwrap();
        let t = claim(&ring, &store, key(1), at(0));
        let big = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: vec![0; 5000],
        };
        assert_eq!(
            ring.complete(&store, t, 7, big, at(1), TTL),
            Ok(Completion::TooLarge)
        );
        claim(&ring, &store, key(1), at(1));
    }

    #[test]
    fn the_oldest_record_is_evicted_first() {
        let (ring, store) = ring(8);
        for i in 0..8 {
            let t = claim(&ring, &store, key(i), at(0));
            ring.complete(&store, t, 7, answer(i as u8), at(0), TTL)
                .unwrap();
        }
        // A ninth key reuses the first key's slot: key 0 is gone, keys 1..8 replay.
        let (begin, evicted) = ring.begin(&store, key(100), 7, at(1), T, RA).unwrap();
        assert!(matches!(begin, Begin::Claimed(_)));
        assert_eq!(evicted, 1);
        for i in 1..8 {
            assert_eq!(
                ring.begin(&store, key(i), 7, at(1), T, RA).unwrap().0,
                Begin::Decided(Decision::Replay(answer(i as u8))),
                "key {i}"
            );
        }
        assert!(matches!(
            ring.begin(&store, key(0), 7, at(1), T, RA).unwrap().0,
            Begin::Claimed(_)
        ));
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_bounds() {
        let (ring, store) = ring(64);
        let before = store.map.borrow().len();
        assert_eq!(before as u64, ring.max_keys());
        for i in 0..20_000u64 {
            let k = key(i);
            if let Begin::Claimed(t) = ring.begin(&store, k, 7, at(i), T, RA).unwrap().0 {
                ring.complete(&store, t, 7, answer(1), at(i), TTL).unwrap();
            }
        }
        let map = store.map.borrow();
        assert_eq!(map.len() as u64, ring.max_keys());
        let bytes: u64 = map.values().map(|(v, _)| v.len() as u64).sum();
        assert!(bytes <= ring.max_bytes(), "{bytes} > {}", ring.max_bytes());
        // The newest records are all still there.
        drop(map);
        for i in 19_990..20_000u64 {
            assert!(matches!(
                ring.begin(&store, key(i), 7, at(20_000), T, RA).unwrap().0,
                Begin::Decided(Decision::Replay(_))
            ));
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    /// Shared data with Envoy's semantics and a version counter: [`MemoryStore`] computes each
    /// version from every value, too slow for a million keys.
    #[derive(Default)]
    struct CountingStore {
        map: core::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
        last: core::cell::Cell<u32>,
    }

    #[cfg(not(target_arch = "wasm32"))]
    impl SharedStore for CountingStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.map.borrow().get(key).cloned())
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut map = self.map.borrow_mut();
            if let (Some(cas), Some((_, version))) = (cas, map.get(key)) {
                if cas != 0 && cas != *version {
                    return Err(StoreError::CasMismatch);
                }
            }
            self.last.set(self.last.get().wrapping_add(1).max(1));
            map.insert(key.into(), (value.to_vec(), self.last.get()));
            Ok(())
        }
    }

    /// The issue's flood: a million distinct keys (natively only: about a minute in debug
    /// under Node.js would be too long for `make test-wasm32`).
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn a_million_distinct_keys_stay_within_the_bounds() {
        let ring = SharedRing::new("keel/idempotency/flood", 256, 1024, 8);
        let store = CountingStore::default();
        ring.prepare(&store).unwrap();
        let keys = store.map.borrow().len() as u64;
        assert_eq!(keys, ring.max_keys());
        let mut evicted = 0;
        for i in 0..1_000_000u64 {
            let (begin, e) = ring.begin(&store, key(i), 7, at(i), T, RA).unwrap();
            evicted += u64::from(e);
            let Begin::Claimed(t) = begin else {
                panic!("key {i}: {begin:?}")
            };
            assert_eq!(
                ring.complete(&store, t, 7, answer(1), at(i), TTL),
                Ok(Completion::Stored)
            );
            if i % 250_000 == 0 || i == 999_999 {
                let map = store.map.borrow();
                assert_eq!(map.len() as u64, keys, "after {i} keys");
                let bytes: u64 = map.values().map(|(v, _)| v.len() as u64).sum();
                assert!(
                    bytes <= ring.max_bytes(),
                    "{bytes} > {} after {i}",
                    ring.max_bytes()
                );
            }
        }
        // Every claim after the first 256 reused the oldest live record; a few more records
        // left early from a full directory bucket (17 live keys in one of 64 buckets).
        let early = evicted - (1_000_000 - 256);
        assert!(early < 64, "{early} early evictions");
        let replayed = (999_744..1_000_000u64)
            .filter(|i| {
                matches!(
                    ring.begin(&store, key(*i), 7, at(1_000_000), T, RA)
                        .unwrap()
                        .0,
                    Begin::Decided(Decision::Replay(_))
                )
            })
            .count() as u64;
        assert!(
            replayed >= 256 - early,
            "{replayed} of the newest 256 replayed"
        );
    }

    #[test]
    fn a_concurrent_claim_loses_to_the_one_published_first() {
        let (ring, store) = ring(16);
        // Worker B reads the empty bucket; worker A claims and publishes meanwhile. B's bucket
        // write then fails its compare-and-swap, and B finds A's claim.
        let bucket_key = ring.bucket_key(ring.bucket_of(&key(1)));
        let (bucket, version) = read_bucket(&store, &bucket_key).unwrap();
        let a = claim(&ring, &store, key(1), at(0));
        assert_ne!(read_bucket(&store, &bucket_key).unwrap().1, version);
        assert!(bucket.is_empty());
        // B, from the start, sees A's claim.
        assert!(matches!(
            ring.begin(&store, key(1), 7, at(0), T, RA).unwrap().0,
            Begin::Decided(Decision::Conflict { .. })
        ));
        ring.complete(&store, a, 7, answer(1), at(0), TTL).unwrap();
    }
}
