//! A picker that follows the endpoint set the discovery filter publishes for a service.
//!
//! The discovery filter ([`crate::discovery::endpoints`]) keeps each service's endpoints in
//! shared data, `keel/discovery/<service>/endpoints`, with a 9-byte version stamp beside it,
//! `keel/discovery/<service>/version`. A picker configured with `"service": "users"` mirrors
//! that set into its ring or table with the protocol the discovery docs define:
//!
//! 1. on each request, read the stamp (one small shared-data read);
//! 2. if it equals the stamp seen last time, pick: no other work;
//! 3. otherwise read and decode the set, and [`Picker::update`] from it if the set's own
//!    version differs from the one built from; remember both.
//!
//! The set is written before the stamp, so a stamp never announces a set that is not there
//! yet. Versions are compared for equality, not order: a set rebuilt from nothing gets a fresh
//! version, and any difference means "look again".
//!
//! A record becomes an [`Endpoint`] with its address, weight and priority; it is healthy when
//! it is routable (registry and active checks passing, not ejected). Discovery bumps the
//! version when an ejection starts or ends, so health is always current at the stamp.
//!
//! Invariants: [`ServiceMirror::version`] is the version of the set the picker holds, `None`
//! until one was applied; the stamp seen last is remembered whatever the set held, so a set that
//! does not decode (another layout) or a stamp that runs ahead of its set is read once per
//! stamp, not per request. A set that cannot be read leaves the picker as it was: the last
//! known endpoints keep serving.

use alloc::string::String;
use alloc::vec::Vec;

use super::levels::Picker;
use super::Endpoint;
use crate::discovery::endpoints::{decode_version, set_key, version_key, EndpointSet};
use crate::store::SharedStore;

/// The picker's view of a discovery set: `set`'s endpoints with their routable state.
pub fn endpoints_of(set: &EndpointSet) -> Vec<Endpoint> {
    set.endpoints
        .iter()
        .map(|r| Endpoint {
            address: r.address.clone(),
            weight: r.weight,
            priority: r.priority,
            healthy: r.routable(),
        })
        .collect()
}

/// What [`ServiceMirror::sync`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// The stamp matches the version built from: nothing read.
    Current,
    /// A new set was applied; `rebuilt` levels were built afresh (0: only health changed).
    Updated {
        /// The set's version.
        version: u64,
        /// Priority levels whose ring or table was built afresh.
        rebuilt: usize,
    },
    /// The stamp moved but the set's version is the one already built from.
    Unchanged,
    /// Nothing is published for the service yet (no stamp and no set).
    Missing,
    /// Bytes are published but do not decode (another layout version): the picker keeps what
    /// it had, and looks again when the stamp moves.
    Undecodable,
}

/// Keeps a [`Picker`] in step with a service's published endpoint set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMirror {
    service: String,
    stamp_key: String,
    set_key: String,
    seen: Option<u64>,
    version: Option<u64>,
}

impl ServiceMirror {
    /// A mirror of `service`'s set, not yet read.
    pub fn new(service: &str) -> ServiceMirror {
        ServiceMirror {
            service: service.into(),
            stamp_key: version_key(service),
            set_key: set_key(service),
            seen: None,
            version: None,
        }
    }

    /// The service followed.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The version of the set the picker was last updated from.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Brings `picker` up to the published set: reads the stamp, and the set only when the
    /// stamp moved since the last call (or there is none). Host errors count as "nothing
    /// published".
    pub fn sync<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        picker: &mut Picker,
    ) -> MirrorOutcome {
        let stamp = store
            .get(&self.stamp_key)
            .ok()
            .flatten()
            .and_then(|(bytes, _)| decode_version(&bytes));
        if stamp.is_some() && stamp == self.seen {
            return MirrorOutcome::Current;
        }
        let Some((bytes, _)) = store.get(&self.set_key).ok().flatten() else {
            return MirrorOutcome::Missing;
        };
        // Without a stamp (its write failed after the set's) nothing is remembered: the set is
        // read again until a stamp appears.
        self.seen = stamp;
        let Some(set) = EndpointSet::decode(&bytes) else {
            return MirrorOutcome::Undecodable;
        };
        if self.version == Some(set.version) {
            return MirrorOutcome::Unchanged;
        }
        let rebuilt = picker.update(&endpoints_of(&set));
        self.version = Some(set.version);
        MirrorOutcome::Updated {
            version: set.version,
            rebuilt,
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::discovery::endpoints::{encode_version, update_set};
    use crate::discovery::DiscoveredEndpoint;
    use crate::picker::{hash_key, Algorithm, Pick, PickerOptions, RingParams};
    use crate::store::testing::MemoryStore;
    use crate::time::Instant;
    use alloc::vec;
    use core::net::{IpAddr, SocketAddr};

    fn ep(last: u8, priority: u8) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            address: SocketAddr::new(IpAddr::from([10, 0, 0, last]), 8080),
            weight: 1,
            priority,
            zone: String::new(),
            registry_healthy: true,
            meta: Vec::new(),
            tags: Vec::new(),
        }
    }

    fn t(secs: u64) -> Instant {
        Instant::from_nanos(secs * 1_000_000_000)
    }

    fn empty_picker() -> Picker {
        Picker::new(
            Algorithm::Ring(RingParams::default()),
            PickerOptions::default(),
            &[],
        )
    }

    fn publish(store: &MemoryStore, answer: &[DiscoveredEndpoint], now: Instant) -> u64 {
        update_set(store, "users", now, |s| s.merge(answer, now, false))
            .unwrap()
            .0
            .version
    }

    #[test]
    fn records_become_endpoints_healthy_when_routable() {
        let mut set = EndpointSet::new(t(1));
        let mut sick = ep(2, 0);
        sick.registry_healthy = false;
        set.merge(&[ep(1, 0), sick, ep(3, 1), ep(4, 0)], t(1), false);
        set.endpoints[3].ejected_until = Some(t(60));
        set.endpoints[0].weight = 3;
        let eps = endpoints_of(&set);
        assert_eq!(
            eps.iter()
                .map(|e| (e.address.as_str(), e.weight, e.priority, e.healthy))
                .collect::<Vec<_>>(),
            vec![
                ("10.0.0.1:8080", 3, 0, true),
                ("10.0.0.2:8080", 1, 0, false),
                ("10.0.0.3:8080", 1, 1, true),
                ("10.0.0.4:8080", 1, 0, false),
            ]
        );
    }

    #[test]
    fn the_set_is_read_only_when_the_stamp_moves() {
        let store = MemoryStore::default();
        let mut mirror = ServiceMirror::new("users");
        let mut picker = empty_picker();
        assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Missing);
        assert_eq!(mirror.version(), None);

        let v1 = publish(&store, &[ep(1, 0), ep(2, 0), ep(3, 0)], t(1));
        assert_eq!(
            mirror.sync(&store, &mut picker),
            MirrorOutcome::Updated {
                version: v1,
                rebuilt: 1
            }
        );
        assert_eq!(picker.endpoints().len(), 3);
        // Requests that follow read the stamp only: the set could be garbage, it is not read.
        store
            .map
            .borrow_mut()
            .insert(set_key("users"), (b"garbage".to_vec(), 99));
        for _ in 0..100 {
            assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Current);
        }
        store.map.borrow_mut().remove(&set_key("users"));

        // A health flip: a new version, no table built.
        let mut sick = ep(2, 0);
        sick.registry_healthy = false;
        let v2 = publish(&store, &[ep(1, 0), sick, ep(3, 0)], t(2));
        assert_eq!(
            mirror.sync(&store, &mut picker),
            MirrorOutcome::Updated {
                version: v2,
                rebuilt: 0
            }
        );
        assert!(!picker.endpoints()[1].healthy);
        for i in 0..1000 {
            let h = hash_key(alloc::format!("k{i}").as_bytes());
            assert_ne!(picker.pick_hash(h, &[]), Pick::Host(1));
        }
        // A stamp that ran ahead of the set with the same set: no update, and the set is not
        // read again for that stamp.
        store
            .map
            .borrow_mut()
            .insert(version_key("users"), (encode_version(v2 + 7), 100));
        assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Unchanged);
        assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Current);
        assert_eq!(mirror.version(), Some(v2));
        // A member joins: the level is rebuilt.
        let v3 = publish(&store, &[ep(1, 0), ep(2, 0), ep(3, 0), ep(4, 0)], t(3));
        store
            .map
            .borrow_mut()
            .insert(version_key("users"), (encode_version(v3), 101));
        assert_eq!(
            mirror.sync(&store, &mut picker),
            MirrorOutcome::Updated {
                version: v3,
                rebuilt: 1
            }
        );
        assert_eq!(picker.endpoints().len(), 4);
    }

    #[test]
    fn a_foreign_layout_keeps_the_last_endpoints_and_is_read_once_per_stamp() {
        let store = MemoryStore::default();
        let mut mirror = ServiceMirror::new("users");
        let mut picker = empty_picker();
        let v1 = publish(&store, &[ep(1, 0), ep(2, 1)], t(1));
        mirror.sync(&store, &mut picker);
        store
            .map
            .borrow_mut()
            .insert(set_key("users"), (vec![2, 0, 0], 50));
        store
            .map
            .borrow_mut()
            .insert(version_key("users"), (encode_version(v1 + 1), 51));
        assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Undecodable);
        assert_eq!(mirror.version(), Some(v1));
        assert_eq!(mirror.sync(&store, &mut picker), MirrorOutcome::Current);
        assert_eq!(picker.endpoints().len(), 2, "the last set keeps serving");
        // No stamp at all but a set: read it (the stamp's write failed after the set's).
        let fresh = MemoryStore::default();
        publish(&fresh, &[ep(5, 0)], t(9));
        fresh.map.borrow_mut().remove(&version_key("users"));
        let mut other = ServiceMirror::new("users");
        assert!(matches!(
            other.sync(&fresh, &mut picker),
            MirrorOutcome::Updated { .. }
        ));
        assert_eq!(picker.endpoints().len(), 1);
        assert_eq!(other.sync(&fresh, &mut picker), MirrorOutcome::Unchanged);
    }
}
