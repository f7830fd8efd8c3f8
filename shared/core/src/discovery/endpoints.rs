//! The shared endpoint set: each service's endpoints with their health, versioned.
//!
//! The poller writes it, every worker's picker reads it, and any worker may eject a host
//! (passive health). All writes go through [`update_set`], a compare-and-swap loop over the
//! encoded set, so concurrent writers never lose each other's changes.
//!
//! Invariants:
//! - endpoints are sorted by address text and unique;
//! - `version` changes exactly when something a picker reads changes: membership, an
//!   endpoint's weight, priority or zone, or anybody's health (registry, active checks,
//!   passive ejection). A refresh that brings the same answer, a freshness flag, a new
//!   `refreshed_at` or an ejection multiplier's decay rewrite the bytes but keep the version,
//!   so pickers do not rebuild;
//! - a version is strictly greater than every earlier one and at least the change's time in
//!   nanoseconds, so a set rebuilt from nothing (lost or foreign value) still gets a version
//!   no picker has cached.
//!
//! Merging a registry answer keeps the health state (active verdict, ejection) of hosts still
//! present; a host the registry drops is removed; a host that fails checks stays known with
//! `check_healthy = false` and gets no traffic.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::SocketAddr;

use super::registry::{check_zone, DiscoveredEndpoint};
use super::staleness::Freshness;
use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, UpdateError};
use crate::time::Instant;

/// The first byte of an encoded [`EndpointSet`]; a different value decodes to `None`.
pub const SET_LAYOUT: u8 = 1;
/// The first byte of an encoded version stamp.
pub const VERSION_LAYOUT: u8 = 1;
/// Compare-and-swap attempts for one set update ([`crate::store::ATTEMPTS`]).
pub const UPDATE_ATTEMPTS: u32 = crate::store::ATTEMPTS;
/// The most endpoints a decoded set may hold (above the configuration's own bound).
const MAX_DECODED_ENDPOINTS: usize = 65_536;
/// Bytes of the fixed part of one record: flags, weight, priority, ejected_until, ejections,
/// address length, zone length.
const RECORD_FIXED: usize = 1 + 4 + 1 + 8 + 4 + 1 + 1;
/// Bytes of the set's fixed header.
const HEADER_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1 + 4;

const FLAG_REGISTRY_HEALTHY: u8 = 1;
const FLAG_CHECK_HEALTHY: u8 = 2;

/// The shared-data key of a service's set.
pub fn set_key(service: &str) -> String {
    alloc::format!("keel/discovery/{service}/endpoints")
}

/// The shared-data key of a service's version stamp: 9 bytes a picker reads on each request
/// to learn, without copying the whole set, whether it must rebuild.
pub fn version_key(service: &str) -> String {
    alloc::format!("keel/discovery/{service}/version")
}

/// One endpoint of the shared set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// `ip:port` (`[v6]:port`), canonical text of a socket address.
    pub address: String,
    /// Relative weight, at least 1.
    pub weight: u32,
    /// Priority level, 0 the highest.
    pub priority: u8,
    /// Locality; may be empty.
    pub zone: String,
    /// The registry's verdict (Consul checks; etcd: present).
    pub registry_healthy: bool,
    /// The active checks' verdict; `true` when no checks are configured. A host discovered
    /// while checks are configured starts `false` and needs one passing check (as Envoy).
    pub check_healthy: bool,
    /// Passive ejection: no traffic until this time. Cleared by the poller's
    /// [`EndpointSet::expire_ejections`], which bumps the version.
    pub ejected_until: Option<Instant>,
    /// How many times in a row the host was ejected (the ejection time multiplier); decays
    /// while the host behaves.
    pub ejections: u32,
}

impl EndpointRecord {
    /// Healthy by the registry and the active checks.
    pub fn healthy(&self) -> bool {
        self.registry_healthy && self.check_healthy
    }
    /// Healthy and not ejected: should get traffic (outside panic mode).
    pub fn routable(&self) -> bool {
        self.healthy() && self.ejected_until.is_none()
    }
    /// The fields a picker reads; the version changes when any of them does.
    fn view(&self) -> (&str, u32, u8, &str, bool, bool, Option<Instant>) {
        (
            &self.address,
            self.weight,
            self.priority,
            &self.zone,
            self.registry_healthy,
            self.check_healthy,
            self.ejected_until,
        )
    }
}

/// A service's endpoints as published in shared data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    /// Changes exactly when membership or health changes (see the module invariants).
    pub version: u64,
    /// When `version` last changed.
    pub updated_at: Instant,
    /// When the registry last gave a good answer; `None` before the first.
    pub refreshed_at: Option<Instant>,
    /// When ejection multipliers last decayed.
    pub decayed_at: Instant,
    /// Whether the data is fresh, stale (the last refresh failed) or expired (older than
    /// `max_stale`, still served).
    pub freshness: Freshness,
    /// The endpoints, sorted by address, unique.
    pub endpoints: Vec<EndpointRecord>,
}

/// What a merge changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Whether the version changed.
    pub changed: bool,
    /// How many hosts appeared.
    pub added: usize,
    /// The hosts that left (the glue clears their passive counters).
    pub removed: Vec<String>,
}

impl EndpointSet {
    /// An empty set created at `now`.
    pub fn new(now: Instant) -> Self {
        EndpointSet {
            version: now.as_nanos().max(1),
            updated_at: now,
            refreshed_at: None,
            decayed_at: now,
            freshness: Freshness::Fresh,
            endpoints: Vec::new(),
        }
    }

    /// Marks a change seen by pickers.
    pub(crate) fn bump(&mut self, now: Instant) {
        self.version = self.version.saturating_add(1).max(now.as_nanos());
        self.updated_at = now;
    }

    /// The record of `address`, if known.
    pub fn find(&self, address: &str) -> Option<&EndpointRecord> {
        self.index_of(address).map(|i| &self.endpoints[i])
    }

    pub(crate) fn index_of(&self, address: &str) -> Option<usize> {
        self.endpoints
            .binary_search_by(|r| r.address.as_str().cmp(address))
            .ok()
    }

    /// The endpoints that should get traffic (healthy, not ejected).
    pub fn routable(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.endpoints.iter().filter(|r| r.routable())
    }

    /// Applies a registry answer at `now`. Hosts still present keep their active verdict and
    /// ejection; new hosts start unchecked (`check_healthy = !checks_enabled`); hosts absent
    /// from the answer are removed. Marks the registry refreshed.
    pub fn merge(
        &mut self,
        answer: &[DiscoveredEndpoint],
        now: Instant,
        checks_enabled: bool,
    ) -> MergeOutcome {
        let mut next: Vec<EndpointRecord> = Vec::with_capacity(answer.len());
        let mut added = 0;
        for e in answer {
            let address = e.address_text();
            let record = match self.find(&address) {
                Some(old) => EndpointRecord {
                    address,
                    weight: e.weight,
                    priority: e.priority,
                    zone: e.zone.clone(),
                    registry_healthy: e.registry_healthy,
                    ..old.clone()
                },
                None => {
                    added += 1;
                    EndpointRecord {
                        address,
                        weight: e.weight,
                        priority: e.priority,
                        zone: e.zone.clone(),
                        registry_healthy: e.registry_healthy,
                        check_healthy: !checks_enabled,
                        ejected_until: None,
                        ejections: 0,
                    }
                }
            };
            next.push(record);
        }
        next.sort_by(|a, b| a.address.cmp(&b.address));
        // Parsers deduplicate already; a caller passing duplicates keeps the first of each.
        next.dedup_by(|b, a| a.address == b.address);
        let removed: Vec<String> = self
            .endpoints
            .iter()
            .filter(|old| {
                next.binary_search_by(|r| r.address.cmp(&old.address))
                    .is_err()
            })
            .map(|old| old.address.clone())
            .collect();
        let changed = !self
            .endpoints
            .iter()
            .map(EndpointRecord::view)
            .eq(next.iter().map(EndpointRecord::view));
        self.endpoints = next;
        self.refreshed_at = Some(now);
        if changed {
            self.bump(now);
        }
        MergeOutcome {
            changed,
            added,
            removed,
        }
    }

    /// Records the active checks' verdict for `address`; `true` when it changed (and so did
    /// the version). Unknown addresses are ignored: the host left meanwhile.
    pub fn set_check_health(&mut self, address: &str, healthy: bool, now: Instant) -> bool {
        let Some(i) = self.index_of(address) else {
            return false;
        };
        if self.endpoints[i].check_healthy == healthy {
            return false;
        }
        self.endpoints[i].check_healthy = healthy;
        self.bump(now);
        true
    }

    /// Records the freshness of the data; `true` when the bytes change. Not a version change:
    /// pickers serve the same endpoints either way.
    pub fn set_freshness(&mut self, freshness: Freshness) -> bool {
        let changed = self.freshness != freshness;
        self.freshness = freshness;
        changed
    }

    /// The encoded set. Layout (little-endian, no padding), layout version 1:
    ///
    /// | bytes | field |
    /// |---|---|
    /// | 1 | layout version = 1 |
    /// | 8 | `version` u64 |
    /// | 8 | `updated_at` u64 ns |
    /// | 8 | `refreshed_at` u64 ns, 0 = never |
    /// | 8 | `decayed_at` u64 ns |
    /// | 1 | freshness: 0 fresh, 1 stale, 2 expired |
    /// | 4 | endpoint count u32 |
    ///
    /// then per endpoint, in address order:
    ///
    /// | bytes | field |
    /// |---|---|
    /// | 1 | flags: bit 0 registry healthy, bit 1 check healthy |
    /// | 4 | weight u32 |
    /// | 1 | priority u8 |
    /// | 8 | `ejected_until` u64 ns, 0 = not ejected |
    /// | 4 | ejections u32 |
    /// | 1 | address length n (at most 64) |
    /// | 1 | zone length m (at most 64) |
    /// | n | address, ASCII `ip:port` |
    /// | m | zone, ASCII |
    pub fn encode(&self) -> Vec<u8> {
        let size = HEADER_LEN
            + self
                .endpoints
                .iter()
                .map(|r| RECORD_FIXED + r.address.len() + r.zone.len())
                .sum::<usize>();
        let count = u32::try_from(self.endpoints.len()).unwrap_or(u32::MAX);
        let mut w = Writer::with_capacity(size)
            .u8(SET_LAYOUT)
            .u64(self.version)
            .u64(self.updated_at.as_nanos())
            .u64(self.refreshed_at.map_or(0, Instant::as_nanos))
            .u64(self.decayed_at.as_nanos())
            .u8(self.freshness as u8)
            .u32(count);
        for r in self.endpoints.iter().take(count as usize) {
            let flags = (u8::from(r.registry_healthy) * FLAG_REGISTRY_HEALTHY)
                | (u8::from(r.check_healthy) * FLAG_CHECK_HEALTHY);
            // Addresses and zones were bounded to 64 bytes when validated.
            let address = truncated(&r.address);
            let zone = truncated(&r.zone);
            w = w
                .u8(flags)
                .u32(r.weight)
                .u8(r.priority)
                .u64(r.ejected_until.map_or(0, Instant::as_nanos))
                .u32(r.ejections)
                .u8(address.len() as u8)
                .u8(zone.len() as u8)
                .bytes(address)
                .bytes(zone);
        }
        w.finish()
    }

    /// Decodes a set; `None` for anything that is not exactly a valid layout-1 set (wrong
    /// length, unknown flags, addresses that are not canonical `ip:port`, unsorted records).
    pub fn decode(bytes: &[u8]) -> Option<EndpointSet> {
        let mut r = Reader::new(bytes);
        if r.u8()? != SET_LAYOUT {
            return None;
        }
        let version = r.u64()?;
        let updated_at = Instant::from_nanos(r.u64()?);
        let refreshed_at = match r.u64()? {
            0 => None,
            n => Some(Instant::from_nanos(n)),
        };
        let decayed_at = Instant::from_nanos(r.u64()?);
        let freshness = Freshness::from_u8(r.u8()?)?;
        let count = usize::try_from(r.u32()?).ok()?;
        // Bound the allocation by what the bytes can hold, so a forged count cannot.
        if count > MAX_DECODED_ENDPOINTS || count > r.remaining() / RECORD_FIXED {
            return None;
        }
        let mut endpoints: Vec<EndpointRecord> = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8()?;
            if flags & !(FLAG_REGISTRY_HEALTHY | FLAG_CHECK_HEALTHY) != 0 {
                return None;
            }
            let weight = r.u32()?;
            let priority = r.u8()?;
            let ejected_until = match r.u64()? {
                0 => None,
                n => Some(Instant::from_nanos(n)),
            };
            let ejections = r.u32()?;
            let address_len = usize::from(r.u8()?);
            let zone_len = usize::from(r.u8()?);
            let address = core::str::from_utf8(r.bytes(address_len)?).ok()?;
            let zone = core::str::from_utf8(r.bytes(zone_len)?).ok()?;
            let canonical = address
                .parse::<SocketAddr>()
                .ok()
                .is_some_and(|a| alloc::format!("{a}") == address);
            if !canonical || check_zone(zone).is_err() {
                return None;
            }
            if endpoints
                .last()
                .is_some_and(|p| p.address.as_str() >= address)
            {
                return None;
            }
            endpoints.push(EndpointRecord {
                address: address.into(),
                weight,
                priority,
                zone: zone.into(),
                registry_healthy: flags & FLAG_REGISTRY_HEALTHY != 0,
                check_healthy: flags & FLAG_CHECK_HEALTHY != 0,
                ejected_until,
                ejections,
            });
        }
        r.end()?;
        Some(EndpointSet {
            version,
            updated_at,
            refreshed_at,
            decayed_at,
            freshness,
            endpoints,
        })
    }

    /// The version of an encoded set without decoding the records (bytes 1 to 8), for a
    /// caller that already holds the bytes. `None` when the layout byte is not 1.
    pub fn peek_version(bytes: &[u8]) -> Option<u64> {
        let mut r = Reader::new(bytes);
        (r.u8()? == SET_LAYOUT).then_some(())?;
        r.u64()
    }
}

fn truncated(text: &str) -> &[u8] {
    let bytes = text.as_bytes();
    bytes.get(..64).unwrap_or(bytes)
}

/// Encodes a version stamp: layout byte 1, then the version as u64 (9 bytes).
pub fn encode_version(version: u64) -> Vec<u8> {
    Writer::with_capacity(9)
        .u8(VERSION_LAYOUT)
        .u64(version)
        .finish()
}

/// Decodes a version stamp; `None` unless exactly 9 bytes of layout 1.
pub fn decode_version(bytes: &[u8]) -> Option<u64> {
    let mut r = Reader::new(bytes);
    (r.u8()? == VERSION_LAYOUT).then_some(())?;
    let v = r.u64()?;
    r.end()?;
    Some(v)
}

/// The new stamp when `version` is above the stored one (`None`: keep what is stored). Stamps
/// only move up, so two writers publishing out of order cannot move a picker's view back.
pub fn raise_version(stored: Option<&[u8]>, version: u64) -> Option<Vec<u8>> {
    match stored.and_then(decode_version) {
        Some(v) if v >= version => None,
        _ => Some(encode_version(version)),
    }
}

/// Applies `change` to the service's set in shared data with compare-and-swap, then raises the
/// version stamp if the version moved. An absent or undecodable set starts empty at `now`.
/// The set is written only when its bytes change. `change` may run several times (conflicts)
/// and must depend only on its input.
///
/// Readers (pickers) follow the mirror protocol: read the stamp on each request; when it
/// differs from the version they built from, read and decode the set and rebuild if the set's
/// own version differs. The set is written before the stamp, so a stamp never announces a set
/// that is not there yet.
///
/// An error from the stamp's update (after the set was written) leaves the stamp behind; any
/// later call raises it, since every call brings the stamp up to the set's version.
pub fn update_set<S, R>(
    store: &S,
    service: &str,
    now: Instant,
    mut change: impl FnMut(&mut EndpointSet) -> R,
) -> Result<(EndpointSet, R), UpdateError>
where
    S: SharedStore + ?Sized,
{
    let (set, result) = update(store, &set_key(service), UPDATE_ATTEMPTS, |old| {
        let mut set = old
            .and_then(EndpointSet::decode)
            .unwrap_or_else(|| EndpointSet::new(now));
        let result = change(&mut set);
        let bytes = set.encode();
        let write = (old != Some(bytes.as_slice())).then_some(bytes);
        (write, (set, result))
    })?;
    let version = set.version;
    update(store, &version_key(service), UPDATE_ATTEMPTS, |stored| {
        (raise_version(stored, version), ())
    })?;
    Ok((set, result))
}

/// Reads the service's set; `None` when absent or undecodable.
pub fn read_set<S: SharedStore + ?Sized>(store: &S, service: &str) -> Option<EndpointSet> {
    let (bytes, _) = store.get(&set_key(service)).ok()??;
    EndpointSet::decode(&bytes)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};
    use crate::store::testing::MemoryStore;
    use alloc::vec;
    use core::net::IpAddr;

    fn ep(last: u8, weight: u32) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            address: SocketAddr::new(IpAddr::from([10, 0, 0, last]), 8080),
            weight,
            priority: 0,
            zone: "eu-1a".into(),
            registry_healthy: true,
            meta: Vec::new(),
            tags: Vec::new(),
        }
    }

    fn t(secs: u64) -> Instant {
        Instant::from_nanos(secs * 1_000_000_000)
    }

    fn sample_set() -> EndpointSet {
        let mut set = EndpointSet::new(t(1));
        let mut v6 = ep(9, 2);
        v6.address = "[fd00::9]:80".parse().unwrap();
        v6.zone = String::new();
        set.merge(&[ep(1, 1), ep(2, 3), v6], t(2), true);
        set.set_check_health("10.0.0.1:8080", true, t(3));
        set.endpoints[1].ejected_until = Some(t(40));
        set.endpoints[1].ejections = 2;
        set.freshness = Freshness::Stale;
        set
    }

    #[test]
    fn layout_round_trips() {
        let set = sample_set();
        let bytes = set.encode();
        assert_eq!(EndpointSet::decode(&bytes), Some(set.clone()));
        assert_eq!(EndpointSet::peek_version(&bytes), Some(set.version));
        assert_eq!(bytes[0], SET_LAYOUT);
        assert_eq!(&bytes[1..9], &set.version.to_le_bytes());
        let empty = EndpointSet::new(t(5));
        assert_eq!(EndpointSet::decode(&empty.encode()), Some(empty));
        assert_eq!(decode_version(&encode_version(77)), Some(77));
    }

    #[test]
    fn wrong_lengths_and_foreign_bytes_decode_to_none() {
        let bytes = sample_set().encode();
        for len in 0..bytes.len() {
            assert_eq!(EndpointSet::decode(&bytes[..len]), None, "length {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(EndpointSet::decode(&longer), None);
        let mut other_layout = bytes.clone();
        other_layout[0] = 2;
        assert_eq!(EndpointSet::decode(&other_layout), None);
        assert_eq!(EndpointSet::peek_version(&other_layout), None);
        for len in [0, 1, 8, 10] {
            assert_eq!(decode_version(&vec![1; len]), None);
        }
        // A forged count cannot make the decoder allocate for it.
        let mut forged = EndpointSet::new(t(1)).encode();
        let n = forged.len();
        forged[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(EndpointSet::decode(&forged), None);
        // Random bytes never panic.
        let mut rng = SeededRng::new(11);
        for _ in 0..2000 {
            let mut noisy = bytes.clone();
            let i = rng.below(noisy.len() as u64) as usize;
            noisy[i] = rng.next_u64() as u8;
            if let Some(set) = EndpointSet::decode(&noisy) {
                assert_eq!(EndpointSet::decode(&set.encode()), Some(set));
            }
        }
    }

    #[test]
    fn version_changes_exactly_when_membership_or_health_changes() {
        let mut set = EndpointSet::new(t(1));
        let v0 = set.version;
        assert!(set.merge(&[ep(1, 1), ep(2, 1)], t(2), false).changed);
        let v1 = set.version;
        assert!(v1 > v0);
        // The same answer again, in another order: no change.
        let same = set.merge(&[ep(2, 1), ep(1, 1)], t(3), false);
        assert!(!same.changed && same.added == 0 && same.removed.is_empty());
        assert_eq!(set.version, v1);
        assert_eq!(set.refreshed_at, Some(t(3)));
        // Freshness flags do not move the version.
        assert!(set.set_freshness(Freshness::Stale));
        assert_eq!(set.version, v1);
        // Membership: a host joins, a host leaves.
        let out = set.merge(&[ep(1, 1), ep(3, 1)], t(4), false);
        assert!(out.changed);
        assert_eq!(
            (out.added, out.removed.as_slice()),
            (1, &["10.0.0.2:8080".into()][..])
        );
        let v2 = set.version;
        assert!(v2 > v1);
        // A weight change is seen by pickers.
        assert!(set.merge(&[ep(1, 5), ep(3, 1)], t(5), false).changed);
        let v3 = set.version;
        // Registry health.
        let mut sick = ep(3, 1);
        sick.registry_healthy = false;
        assert!(set.merge(&[ep(1, 5), sick], t(6), false).changed);
        let v4 = set.version;
        assert!(v4 > v3);
        // Active-check health: only a real flip counts.
        assert!(!set.set_check_health("10.0.0.1:8080", true, t(7)));
        assert_eq!(set.version, v4);
        assert!(set.set_check_health("10.0.0.1:8080", false, t(7)));
        assert!(set.version > v4);
        assert!(!set.set_check_health("10.9.9.9:1", false, t(7)));
    }

    #[test]
    fn versions_rise_even_when_the_clock_does_not() {
        let mut set = EndpointSet::new(t(100));
        let v = set.version;
        set.merge(&[ep(1, 1)], t(50), false);
        assert_eq!(set.version, v + 1);
        // A set rebuilt from nothing later starts above anything counted before.
        assert!(EndpointSet::new(t(101)).version > set.version);
    }

    #[test]
    fn merge_keeps_health_of_hosts_still_present() {
        let mut set = EndpointSet::new(t(1));
        set.merge(&[ep(1, 1), ep(2, 1)], t(1), true);
        assert!(set.endpoints.iter().all(|r| !r.check_healthy));
        set.set_check_health("10.0.0.1:8080", true, t(2));
        set.endpoints[1].ejected_until = Some(t(60));
        set.endpoints[1].ejections = 3;
        set.merge(&[ep(2, 4), ep(1, 1), ep(3, 1)], t(3), true);
        let one = set.find("10.0.0.1:8080").unwrap();
        assert!(one.check_healthy && one.routable());
        let two = set.find("10.0.0.2:8080").unwrap();
        assert_eq!(
            (two.ejected_until, two.ejections, two.weight),
            (Some(t(60)), 3, 4)
        );
        // A new host is known but unchecked: no traffic until a check passes.
        let three = set.find("10.0.0.3:8080").unwrap();
        assert!(!three.check_healthy && !three.routable());
        assert_eq!(set.routable().count(), 1);
    }

    #[test]
    fn update_set_writes_the_set_then_raises_the_stamp() {
        let store = MemoryStore::default();
        let (set, out) =
            update_set(&store, "users", t(1), |s| s.merge(&[ep(1, 1)], t(1), false)).unwrap();
        assert!(out.changed);
        assert_eq!(read_set(&store, "users"), Some(set.clone()));
        let stamp = store.get(&version_key("users")).unwrap().unwrap().0;
        assert_eq!(decode_version(&stamp), Some(set.version));
        // No change: nothing written (the store's versions do not move).
        let before = store.get(&set_key("users")).unwrap().unwrap().1;
        update_set(&store, "users", t(1), |s| s.set_freshness(Freshness::Fresh)).unwrap();
        assert_eq!(store.get(&set_key("users")).unwrap().unwrap().1, before);
        // A stamp never goes down.
        assert_eq!(raise_version(Some(&encode_version(9)), 5), None);
        assert_eq!(
            raise_version(Some(&encode_version(5)), 9),
            Some(encode_version(9))
        );
        assert_eq!(raise_version(Some(b"junk"), 1), Some(encode_version(1)));
        // A foreign value under the key is replaced by a fresh set.
        store
            .map
            .borrow_mut()
            .insert(set_key("x"), (b"garbage".to_vec(), 1));
        let (fresh, _) = update_set(&store, "x", t(2), |_| ()).unwrap();
        assert!(fresh.endpoints.is_empty());
        assert_eq!(read_set(&store, "x"), Some(fresh));
    }
}
