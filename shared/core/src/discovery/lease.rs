//! One poller per Envoy process, elected with a lease in shared data.
//!
//! Envoy runs one VM per worker, and every worker's root context ticks. If each polled the
//! registry, the registry's load would grow with the worker count; instead the workers elect
//! one poller with a lease (compare-and-swap with an expiry) and the others only read the
//! shared set. The holder refreshes the lease on its ticks; if its VM stops (or stalls), the
//! lease runs out and the next worker to try takes over. A new holder rebuilds its local
//! state (refresh schedule, active-check counters) from the shared set.
//!
//! Invariant: once the key exists, at most one VM holds an unexpired lease at any instant,
//! since every change goes through one compare-and-swap on one key. The one window is the
//! key's creation: Envoy treats a compare-and-swap against version 0 as unconditional, so two
//! workers creating it at once may both be told they hold it; the overwritten one learns
//! otherwise at its next tick. Polling twice for one tick is harmless (set updates are
//! compare-and-swap merges of the same answer). Holders are VM ids the glue draws at start
//! (64 random bits); workers of one process share the host's clock.
//!
//! Layout of `keel/discovery/poller`, little-endian: `[layout u8 = 1][holder u64]
//! [expires_at u64 ns]`, 17 bytes.

use alloc::vec::Vec;

use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, UpdateError};
use crate::time::{Duration, Instant};

/// The shared-data key of the lease (one for all services: one poller does them all).
pub const LEASE_KEY: &str = "keel/discovery/poller";
/// The first byte of an encoded lease.
pub const LEASE_LAYOUT: u8 = 1;
/// Compare-and-swap attempts for one acquisition ([`crate::store::ATTEMPTS`]).
pub const LEASE_ATTEMPTS: u32 = crate::store::ATTEMPTS;
/// How long the poller's lease lasts without renewal. The holder renews it on its ticks (at
/// most 500 ms apart) once less than half is left, so a live poller keeps it with a margin of
/// several ticks; a VM that stops is replaced after at most this long plus one tick.
pub const POLLER_LEASE_TTL: Duration = Duration::from_secs(3);

/// Who polls, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollerLease {
    /// The holder's VM id.
    pub holder: u64,
    /// When the lease lapses unless refreshed.
    pub expires_at: Instant,
}

impl PollerLease {
    /// Encodes as 17 bytes (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        Writer::with_capacity(17)
            .u8(LEASE_LAYOUT)
            .u64(self.holder)
            .u64(self.expires_at.as_nanos())
            .finish()
    }

    /// Decodes; `None` unless exactly 17 bytes of layout 1.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        (r.u8()? == LEASE_LAYOUT).then_some(())?;
        let holder = r.u64()?;
        let expires_at = Instant::from_nanos(r.u64()?);
        r.end()?;
        Some(PollerLease { holder, expires_at })
    }

    /// Whether the lease is still running at `now`.
    pub fn active_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }
}

/// Tries to take or keep the lease for `me` at `now` for `ttl`. Returns the lease to store
/// and whether `me` holds it. `me` gets it when there is none, when it has run out, or when
/// `me` already holds it. A holder with more than half its `ttl` left keeps the stored lease
/// unchanged (no write on every tick); with less, it is renewed to `now + ttl`.
pub fn try_acquire(
    state: Option<PollerLease>,
    me: u64,
    now: Instant,
    ttl: Duration,
) -> (PollerLease, bool) {
    let fresh = PollerLease {
        holder: me,
        expires_at: now.saturating_add(ttl),
    };
    match state {
        Some(lease) if lease.holder == me && lease.active_at(now) => {
            let left = lease.expires_at.saturating_since(now);
            if left > ttl.div(2) {
                (lease, true)
            } else {
                (fresh, true)
            }
        }
        Some(lease) if lease.active_at(now) => (lease, false),
        _ => (fresh, true),
    }
}

/// Gives the lease up (on VM shutdown) so another worker can take over at once; other holders'
/// leases are returned unchanged.
pub fn release(state: PollerLease, me: u64, now: Instant) -> PollerLease {
    if state.holder == me {
        PollerLease {
            holder: me,
            expires_at: now,
        }
    } else {
        state
    }
}

/// Runs [`try_acquire`] against shared data with compare-and-swap; writes only when the lease
/// changes. `Ok(true)` when `me` is the poller.
pub fn acquire<S: SharedStore + ?Sized>(
    store: &S,
    me: u64,
    now: Instant,
    ttl: Duration,
) -> Result<bool, UpdateError> {
    acquire_key(store, LEASE_KEY, me, now, ttl)
}

/// [`acquire`] for the lease under `key`: one elected VM per process for another job (the
/// rate limiter's refresher uses `keel/rate_limit/refresher`).
pub fn acquire_key<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    me: u64,
    now: Instant,
    ttl: Duration,
) -> Result<bool, UpdateError> {
    update(store, key, LEASE_ATTEMPTS, |old| {
        acquire_bytes(old, me, now, ttl)
    })
}

/// [`try_acquire`] on the stored bytes `old` (a compare-and-swap update's change): the lease
/// to write, only when it changes, and whether `me` holds it.
pub fn acquire_bytes(
    old: Option<&[u8]>,
    me: u64,
    now: Instant,
    ttl: Duration,
) -> (Option<Vec<u8>>, bool) {
    let current = old.and_then(PollerLease::decode);
    let (next, held) = try_acquire(current, me, now, ttl);
    let write = (current != Some(next)).then(|| next.encode());
    (write, held)
}

/// [`release`] on the stored bytes `old` (a compare-and-swap update's change): the lease to
/// write, only when `me` held it.
pub fn release_bytes(old: Option<&[u8]>, me: u64, now: Instant) -> (Option<Vec<u8>>, ()) {
    match old.and_then(PollerLease::decode) {
        Some(held) => {
            let next = release(held, me, now);
            ((next != held).then(|| next.encode()), ())
        }
        None => (None, ()),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::store::testing::MemoryStore;

    const TTL: Duration = Duration::from_secs(3);

    fn ms(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000)
    }

    #[test]
    fn layout_round_trips_and_refuses_wrong_lengths() {
        let lease = PollerLease {
            holder: 0xdead_beef_0000_0001,
            expires_at: ms(1234),
        };
        let bytes = lease.encode();
        assert_eq!(bytes.len(), 17);
        assert_eq!(PollerLease::decode(&bytes), Some(lease));
        for len in 0..bytes.len() {
            assert_eq!(PollerLease::decode(&bytes[..len]), None);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(PollerLease::decode(&longer), None);
    }

    #[test]
    fn pure_election_rules() {
        let (lease, held) = try_acquire(None, 1, ms(0), TTL);
        assert!(held);
        assert_eq!(lease.expires_at, ms(3000));
        assert_eq!(try_acquire(Some(lease), 2, ms(2999), TTL), (lease, false));
        // The holder keeps its lease as is while more than half the TTL is left ...
        assert_eq!(try_acquire(Some(lease), 1, ms(1000), TTL), (lease, true));
        // ... and renews it after.
        let (renewed, held) = try_acquire(Some(lease), 1, ms(2000), TTL);
        assert!(held);
        assert_eq!(renewed.expires_at, ms(5000));
        // Expired: anyone takes over.
        let (taken, held) = try_acquire(Some(lease), 2, ms(3000), TTL);
        assert!(held);
        assert_eq!(taken.holder, 2);
        let released = release(taken, 2, ms(3100));
        assert!(try_acquire(Some(released), 1, ms(3100), TTL).1);
        assert_eq!(release(taken, 1, ms(3100)), taken);
    }

    #[test]
    fn two_workers_elect_one_poller_and_take_over_after_expiry() {
        let store = MemoryStore::default();
        let (a, b) = (0xaaaa, 0xbbbb);
        assert_eq!(acquire(&store, a, ms(0), TTL), Ok(true));
        assert_eq!(acquire(&store, b, ms(0), TTL), Ok(false));
        // Both tick every 500 ms; a keeps refreshing, b never gets it.
        let mut now = 0;
        while now < 20_000 {
            now += 500;
            assert_eq!(acquire(&store, a, ms(now), TTL), Ok(true), "a at {now}");
            assert_eq!(acquire(&store, b, ms(now), TTL), Ok(false), "b at {now}");
        }
        // a's VM stops. b takes over once the lease has run out, not before.
        let expires = PollerLease::decode(&store.get(LEASE_KEY).unwrap().unwrap().0)
            .unwrap()
            .expires_at;
        let mut took_over_at = None;
        while took_over_at.is_none() {
            now += 500;
            if acquire(&store, b, ms(now), TTL) == Ok(true) {
                took_over_at = Some(ms(now));
            }
        }
        assert!(took_over_at.unwrap() >= expires);
        assert!(took_over_at.unwrap().saturating_since(expires) <= Duration::from_millis(500));
        // a comes back: it is not the poller any more.
        assert_eq!(acquire(&store, a, ms(now), TTL), Ok(false));
    }

    #[test]
    fn racing_workers_never_both_hold() {
        // An expired lease is there (a former poller's). Interleave the read-compute-write of
        // two workers: the second write fails its compare-and-swap, retries, and sees the
        // first holder.
        let store = MemoryStore::default();
        store
            .set(
                LEASE_KEY,
                &PollerLease {
                    holder: 9,
                    expires_at: ms(0),
                }
                .encode(),
                None,
            )
            .unwrap();
        let mut b_result = None;
        let a_result = update(&store, LEASE_KEY, LEASE_ATTEMPTS, |old| {
            if b_result.is_none() {
                b_result = Some(acquire(&store, 2, ms(10), TTL));
            }
            let (next, held) = try_acquire(old.and_then(PollerLease::decode), 1, ms(10), TTL);
            (Some(next.encode()), held)
        });
        assert_eq!(b_result, Some(Ok(true)));
        assert_eq!(a_result, Ok(false));
        let lease = PollerLease::decode(&store.get(LEASE_KEY).unwrap().unwrap().0).unwrap();
        assert_eq!(lease.holder, 2);
    }

    #[test]
    fn the_creation_window_closes_at_the_next_tick() {
        // Envoy's compare-and-swap with version 0 is unconditional, so two workers creating
        // the key at once may both be told they hold it. The one whose write was overwritten
        // learns it at its next tick.
        let store = MemoryStore::default();
        let mut b_result = None;
        let a_result = update(&store, LEASE_KEY, LEASE_ATTEMPTS, |old| {
            if b_result.is_none() {
                b_result = Some(acquire(&store, 2, ms(0), TTL));
            }
            let (next, held) = try_acquire(old.and_then(PollerLease::decode), 1, ms(0), TTL);
            (Some(next.encode()), held)
        });
        assert_eq!((a_result, b_result), (Ok(true), Some(Ok(true))));
        let a_next = acquire(&store, 1, ms(500), TTL).unwrap();
        let b_next = acquire(&store, 2, ms(500), TTL).unwrap();
        assert!(a_next != b_next, "exactly one holds after one tick");
    }
}
