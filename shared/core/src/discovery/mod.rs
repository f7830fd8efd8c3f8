//! Health-aware discovery: a cache of each service's endpoints, read from a registry, checked,
//! and published in shared data for the picker.
//!
//! Keel's discovery filter reads endpoints straight from a registry, with no control plane:
//! etcd v3 through its JSON gateway ([`etcd`], lease-backed keys under a prefix), Consul's
//! health API with blocking queries ([`consul`]), or a static list. It follows Envoy's
//! discovery and health model: a host the registry drops is removed; a host that fails active
//! checks ([`health`]) or is ejected for failing real traffic (outlier detection) stays known
//! but gets no traffic; the last known set keeps serving while the registry is unreachable
//! ([`staleness`], RFC 5861's `stale-if-error`); and only one worker per process polls
//! ([`lease`]).
//!
//! This module is the pure core. The glue (`filters/discovery`) runs it from the root
//! context's tick:
//!
//! 1. [`lease::acquire`] with the VM's id; a worker that is not the poller stops here.
//! 2. Per service, when [`RefreshSchedule::due`]: send the [`RegistryRequest`] from
//!    [`etcd::range_request`] or [`consul::health_request`] (static sources need none), then
//!    on the answer parse it with [`etcd::parse_range_response`] /
//!    [`consul::parse_health_response`], log every [`SkippedEntry`], and publish with
//!    [`update_set`] + [`EndpointSet::merge`]; on any failure [`RefreshSchedule::on_failure`]
//!    and keep the set.
//! 3. [`EndpointSet::expire_ejections`] and [`EndpointSet::set_freshness`] in one
//!    [`update_set`], the data's age ([`RefreshSchedule::age`]) to a gauge.
//! 4. [`ActiveChecks::sync`] with the set, send [`ActiveChecks::due`], feed the results to
//!    [`ActiveChecks::on_result`] and publish flips with [`EndpointSet::set_check_health`].
//!
//! The glue ticks every [`DiscoveryConfig::tick`]; its lease lasts [`POLLER_LEASE_TTL`]. A
//! worker that becomes the poller starts its per-service state afresh and resumes it from the
//! shared set ([`RefreshSchedule::resume`], [`ActiveChecks::sync`]); one that loses the lease
//! drops that state and ignores answers to what it had sent. Hosts that leave the set
//! ([`MergeOutcome::removed`]) have their passive counters reset.
//!
//! At the end of each request of real traffic (`on_log`), any worker classifies the outcome
//! with [`Outcome::from_response`] (status and Envoy's `response.code_details`) for the host in
//! Envoy's `upstream.address` property, if that host is in a service's set, feeds
//! [`PassiveCounter::record`] through `store::update` and, on [`PassiveVerdict::Eject`], calls
//! [`EndpointSet::eject`] through [`update_set`]. The picker reads the version stamp on each
//! request and the set only when the stamp moved (see [`update_set`]). [`report`] gives the
//! counts for the gauges and the JSON an operator reads at the glue's `admin_path`.
//!
//! # Shared data
//!
//! | key | layout | written by |
//! |---|---|---|
//! | `keel/discovery/poller` | [`PollerLease`]: `[1][holder u64][expires_at u64]`, 17 bytes | every worker (CAS) |
//! | `keel/discovery/<service>/endpoints` | [`EndpointSet`], below | poller, ejecting workers (CAS) |
//! | `keel/discovery/<service>/version` | `[1][version u64]`, 9 bytes; only rises | after each set write |
//! | `keel/discovery/<service>/passive/<ip:port>` | [`PassiveCounter`]: `[1][consecutive failures u32]`, 5 bytes | every worker (CAS) |
//!
//! `EndpointSet`, layout 1, little-endian, no padding. Header (38 bytes): layout `u8 = 1`,
//! `version u64` (bytes 1..9), `updated_at u64` ns, `refreshed_at u64` ns (0 = never),
//! `decayed_at u64` ns, freshness `u8` (0 fresh, 1 stale, 2 expired), count `u32`. Then per
//! endpoint, sorted by address: flags `u8` (bit 0 registry healthy, bit 1 check healthy),
//! `weight u32`, `priority u8`, `ejected_until u64` ns (0 = not ejected), `ejections u32`,
//! address length `u8`, zone length `u8`, the address (ASCII `ip:port`, `[v6]:port`), the zone
//! (ASCII). A value of any other length or content decodes to `None`.
//!
//! A record is routable when `flags == 3` and `ejected_until == 0`. The version changes
//! exactly when the membership or a record's weight, priority, zone, flags or ejection
//! changes (not for freshness, `refreshed_at` or the ejection multiplier), and only rises.

pub mod consul;
pub mod endpoints;
pub mod etcd;
pub mod health;
pub mod lease;
pub mod policy;
pub mod registry;
pub mod report;
pub mod staleness;
pub mod wire;

pub use consul::ConsulIndex;
pub use endpoints::{
    read_set, set_key, update_set, version_key, EndpointRecord, EndpointSet, MergeOutcome,
};
pub use health::{
    passive_key, ActiveChecks, CheckRequest, CheckResult, CheckState, Ejection, Outcome,
    PassiveCounter, PassiveVerdict,
};
pub use lease::{acquire, try_acquire, PollerLease, LEASE_KEY, POLLER_LEASE_TTL};
pub use policy::{
    ActiveCheckConfig, ConsulSource, DiscoveryConfig, EtcdSource, PassivePolicy, ServiceConfig,
    Source,
};
pub use registry::{
    DiscoveredEndpoint, ParseError, ParseLimits, RegistryAnswer, RegistryRequest, SkipReason,
    SkippedEntry,
};
pub use report::{status_json, SetCounts};
pub use staleness::{Freshness, RefreshSchedule};
pub use wire::DiscoverySpec;

use crate::time;

impl Source {
    /// The callout that reads the registry (`None` for a static list, which needs none).
    pub fn request(&self, consul_index: ConsulIndex) -> Option<RegistryRequest> {
        match self {
            Source::Etcd(e) => Some(etcd::range_request(e)),
            Source::Consul(c) => Some(consul::health_request(c, consul_index)),
            Source::Static(_) => None,
        }
    }

    /// The answer of a static source.
    pub fn static_answer(&self) -> Option<RegistryAnswer> {
        match self {
            Source::Static(list) => Some(RegistryAnswer {
                endpoints: list.clone(),
                ..RegistryAnswer::default()
            }),
            _ => None,
        }
    }
}

impl ServiceConfig {
    /// Parses a registry's answer (status 200) for this service's source, within
    /// [`ServiceConfig::parse_limits`]. A static source has no answer to parse.
    pub fn parse_answer(&self, body: &[u8]) -> Result<RegistryAnswer, ParseError> {
        let limits = self.parse_limits();
        match &self.source {
            Source::Etcd(e) => etcd::parse_range_response(body, &e.prefix, &limits),
            Source::Consul(_) => consul::parse_health_response(body, &limits),
            Source::Static(_) => Err(ParseError::Shape("a static source has no registry answer")),
        }
    }

    /// The longest a registry request of this service may run (the callout's timeout), for
    /// [`RefreshSchedule::new`]: etcd's request timeout, or a Consul blocking query's.
    pub fn request_timeout(&self) -> time::Duration {
        match &self.source {
            Source::Consul(c) => consul::health_request(c, ConsulIndex(1)).timeout,
            _ => etcd::REQUEST_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use crate::store::testing::MemoryStore;
    use crate::store::{update, SharedStore};
    use crate::time::{Duration, Instant};
    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    const CONFIG: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s", "health_check": {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}}]}"#;

    fn etcd_body(hosts: &[u8]) -> Vec<u8> {
        let kvs: Vec<String> = hosts
            .iter()
            .map(|h| {
                format!(
                    r#"{{"key":"{}","create_revision":"5","mod_revision":"5","version":"1","value":"{}","lease":"694d7a1b2c3d4e5f"}}"#,
                    STANDARD.encode(format!("/services/users/{h}")),
                    STANDARD.encode(format!(r#"{{"address":"127.0.0.{h}","port":18091}}"#)),
                )
            })
            .collect();
        format!(
            r#"{{"header":{{"cluster_id":"1","member_id":"2","revision":"9","raft_term":"2"}},"kvs":[{}],"count":"{}"}}"#,
            kvs.join(","),
            hosts.len()
        )
        .into_bytes()
    }

    fn ms(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000)
    }

    fn stamp(store: &MemoryStore) -> Option<u64> {
        let (bytes, _) = store.get(&version_key("users")).ok()??;
        endpoints::decode_version(&bytes)
    }

    /// The glue's tick, played by hand: lease, poll, merge, checks, ejection, outage.
    #[test]
    fn a_poller_keeps_the_shared_set_current() {
        let config = crate::config::load::<DiscoveryConfig>(CONFIG.as_bytes()).unwrap();
        let service = &config.services[0];
        let checks_config = service.health_check.clone().unwrap();
        let store = MemoryStore::default();
        let mut rng = SeededRng::new(42);
        let mut schedule =
            RefreshSchedule::new(service.refresh, service.max_stale, etcd::REQUEST_TIMEOUT);
        let mut checks = ActiveChecks::new(checks_config, &service.name);

        // Tick 1: worker 7 becomes the poller and reads etcd.
        let now = ms(0);
        assert_eq!(acquire(&store, 7, now, Duration::from_secs(3)), Ok(true));
        assert_eq!(acquire(&store, 8, now, Duration::from_secs(3)), Ok(false));
        assert!(schedule.due(now));
        let request = service.source.request(ConsulIndex::default()).unwrap();
        assert_eq!(request.path, "/v3/kv/range");
        schedule.on_sent(now);
        let answer = etcd::parse_range_response(
            &etcd_body(&[1, 2, 3]),
            "/services/users/",
            &service.parse_limits(),
        )
        .unwrap();
        schedule.on_success(ms(5));
        let (set, merged) = update_set(&store, "users", ms(5), |s| {
            s.merge(&answer.endpoints, ms(5), true)
        })
        .unwrap();
        assert_eq!(merged.added, 3);
        // Known, unchecked: no traffic yet, but panic mode spreads over all of them.
        assert_eq!(set.routable().count(), 0);
        assert_eq!(set.traffic_targets(50).0.len(), 3);
        let v1 = stamp(&store).unwrap();
        assert_eq!(v1, set.version);

        // Checks: hosts 1 and 2 pass, host 3 fails.
        checks.sync(&set, ms(5), &mut rng);
        let due = checks.due(ms(5));
        assert_eq!(due.len(), 3);
        for req in &due {
            let status = if req.address == "127.0.0.3:18091" {
                503
            } else {
                200
            };
            if let Some(verdict) =
                checks.on_result(&req.address, CheckResult::from_status(Some(status)))
            {
                update_set(&store, "users", ms(10), |s| {
                    s.set_check_health(&req.address, verdict, ms(10))
                })
                .unwrap();
            }
        }
        let set = read_set(&store, "users").unwrap();
        assert_eq!(set.routable().count(), 2);
        let v2 = stamp(&store).unwrap();
        assert!(v2 > v1);

        // Tick 2: the same answer changes nothing a picker reads.
        let now = ms(1000);
        assert!(schedule.due(now));
        schedule.on_sent(now);
        schedule.on_success(now);
        update_set(&store, "users", now, |s| {
            s.merge(&answer.endpoints, now, true)
        })
        .unwrap();
        assert_eq!(stamp(&store), Some(v2));

        // Real traffic: five 5xx in a row from host 1, seen by two workers.
        let policy = service.passive.unwrap();
        let key = passive_key("users", "127.0.0.1:18091");
        let mut verdict = PassiveVerdict::Counted;
        for _ in 0..5 {
            verdict = update(&store, &key, 4, |old| {
                PassiveCounter::record(old, Outcome::from_status(502), &policy)
            })
            .unwrap();
        }
        assert_eq!(verdict, PassiveVerdict::Eject);
        let (set, ejection) = update_set(&store, "users", ms(1100), |s| {
            s.eject("127.0.0.1:18091", ms(1100), &policy)
        })
        .unwrap();
        assert!(matches!(ejection, Ejection::Ejected { .. }));
        assert_eq!(set.routable().count(), 1);
        assert!(stamp(&store).unwrap() > v2);

        // The registry breaks: the set keeps serving, flagged stale, then expired.
        let mut now = ms(2000);
        let mut last_version = stamp(&store).unwrap();
        while now < Instant::from_nanos(400_000_000_000) {
            if schedule.due(now) {
                schedule.on_sent(now);
                let refused = etcd::parse_range_response(
                    b"{\"header\":",
                    "/services/users/",
                    &service.parse_limits(),
                );
                assert!(refused.is_err());
                schedule.on_failure(now, &mut rng);
            }
            let freshness = schedule.freshness(now).unwrap();
            let (set, _) = update_set(&store, "users", now, |s| {
                s.expire_ejections(now);
                s.set_freshness(freshness)
            })
            .unwrap();
            assert_eq!(set.endpoints.len(), 3);
            // The version moves once, when host 1's ejection ends at 31.1 s.
            if set.version != last_version {
                assert!(set.find("127.0.0.1:18091").unwrap().ejected_until.is_none());
                last_version = set.version;
            }
            now = now.saturating_add(Duration::from_millis(500));
        }
        let set = read_set(&store, "users").unwrap();
        assert_eq!(set.freshness, Freshness::Expired);
        assert_eq!(set.routable().count(), 2);
        assert!(schedule.age(now).unwrap() > service.max_stale);

        // Worker 7 dies; worker 8 takes over after the lease and resumes the data's age.
        assert_eq!(acquire(&store, 8, now, Duration::from_secs(3)), Ok(true));
        let mut resumed =
            RefreshSchedule::new(service.refresh, service.max_stale, etcd::REQUEST_TIMEOUT);
        resumed.resume(set.refreshed_at);
        assert_eq!(resumed.age(now), schedule.age(now));
    }

    #[test]
    fn answers_are_parsed_by_source() {
        let config = crate::config::load::<DiscoveryConfig>(CONFIG.as_bytes()).unwrap();
        let users = &config.services[0];
        let answer = users.parse_answer(&etcd_body(&[1, 2])).unwrap();
        assert_eq!(answer.endpoints.len(), 2);
        assert!(users.parse_answer(b"[]").is_err());
        assert_eq!(users.request_timeout(), etcd::REQUEST_TIMEOUT);
        let consul = r#"{"services": [{"name": "c", "source": {"consul": {"cluster": "consul", "service": "users", "wait": "30s"}}}]}"#;
        let config = crate::config::load::<DiscoveryConfig>(consul.as_bytes()).unwrap();
        let c = &config.services[0];
        assert_eq!(c.parse_answer(b"[]").unwrap().endpoints.len(), 0);
        assert!(c.request_timeout() > Duration::from_secs(30));
        let stat = r#"{"services": [{"name": "s", "source": {"static": [{"address": "127.0.0.1", "port": 1}]}}]}"#;
        let config = crate::config::load::<DiscoveryConfig>(stat.as_bytes()).unwrap();
        assert!(config.services[0].parse_answer(b"[]").is_err());
    }

    #[test]
    fn static_sources_answer_without_a_request() {
        let json = r#"{"services": [{"name": "local", "source": {"static": [{"address": "127.0.0.1", "port": 18091, "weight": 1}]}}]}"#;
        let config = crate::config::load::<DiscoveryConfig>(json.as_bytes()).unwrap();
        let source = &config.services[0].source;
        assert_eq!(source.request(ConsulIndex::default()), None);
        let answer = source.static_answer().unwrap();
        let mut set = EndpointSet::new(ms(0));
        set.merge(&answer.endpoints, ms(0), false);
        assert_eq!(
            set.routable()
                .map(|r| r.address.as_str())
                .collect::<Vec<_>>(),
            ["127.0.0.1:18091"]
        );
    }
}
