//! Endpoint health beyond the registry's word: active checks and passive ejection.
//!
//! **Active checks** follow Envoy's HTTP health checking: every `interval` the poller GETs
//! `path` on each endpoint through the `keel_health` cluster (an `ORIGINAL_DST` cluster that
//! routes on `x-envoy-original-dst-host: ip:port`), with a `timeout`. [`CheckState`] is the
//! per-endpoint state machine: a healthy host turns unhealthy after `unhealthy_threshold`
//! consecutive failures, an unhealthy one healthy after `healthy_threshold` consecutive
//! successes; a newly discovered host starts unhealthy and a single success makes it healthy
//! (Envoy's rule, so that a fresh host does not wait `healthy_threshold` intervals). A 2xx
//! status passes; any other status, a timeout or a reset fails. [`ActiveChecks`] schedules
//! the checks of one service in the poller's own memory; after a poller takeover it is
//! rebuilt from the shared set (a host's verdict carries over, its counters restart).
//!
//! **Passive ejection** follows Envoy's consecutive-5xx outlier detection: real traffic's
//! outcomes feed a per-host [`PassiveCounter`] in shared data (a 5xx, a reset or a timeout
//! counts; anything else clears the count). When a host reaches `consecutive_failures` the
//! worker calls [`EndpointSet::eject`]: the host gets no traffic for `base_ejection × n`
//! (n = times ejected in a row, so 30 s, 60 s, 90 s, ...) capped at `max_ejection`, unless that
//! would eject more than `max_ejection_percent` of the hosts, except that one host may always
//! be ejected (Envoy: `(ejected + 1) / hosts <= max%` or none ejected yet). The poller's tick
//! calls [`EndpointSet::expire_ejections`] to return hosts whose time is up and to decay the
//! multiplier by one per [`DECAY_INTERVAL`] a host spends un-ejected (Envoy decrements it per
//! 10 s detection interval).
//!
//! Passive counter layout (`keel/discovery/<service>/passive/<ip:port>`), little-endian:
//! `[layout u8 = 1][consecutive failures u32]`, 5 bytes.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::endpoints::EndpointSet;
use super::policy::{ActiveCheckConfig, PassivePolicy};
use crate::codec::{Reader, Writer};
use crate::rand::Rng;
use crate::time::{Duration, Instant};

/// How often an un-ejected host's ejection multiplier decays by one (Envoy's default outlier
/// detection interval).
pub const DECAY_INTERVAL: Duration = Duration::from_secs(10);
/// The first byte of an encoded [`PassiveCounter`].
pub const PASSIVE_LAYOUT: u8 = 1;

/// The outcome of one active check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// 2xx.
    Pass,
    /// Any other status, a timeout, a reset.
    Fail,
}

impl CheckResult {
    /// The result of a check that ended with `status` (`None`: no response: timeout, reset,
    /// connection failure).
    pub fn from_status(status: Option<u16>) -> Self {
        match status {
            Some(200..=299) => CheckResult::Pass,
            _ => CheckResult::Fail,
        }
    }
}

/// One endpoint's active-check state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckState {
    healthy: bool,
    /// Never checked since discovered: one success is enough.
    pending: bool,
    successes: u32,
    failures: u32,
}

impl CheckState {
    /// A newly discovered host: unhealthy until its first passing check.
    pub fn discovered() -> Self {
        CheckState {
            healthy: false,
            pending: true,
            successes: 0,
            failures: 0,
        }
    }

    /// A host whose verdict is known (e.g. from the shared set after a poller takeover).
    pub fn resume(healthy: bool) -> Self {
        CheckState {
            healthy,
            pending: false,
            successes: 0,
            failures: 0,
        }
    }

    /// The current verdict.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Feeds one result; `Some(verdict)` when the verdict flips.
    pub fn on_result(&mut self, result: CheckResult, config: &ActiveCheckConfig) -> Option<bool> {
        let pending = core::mem::replace(&mut self.pending, false);
        match result {
            CheckResult::Pass => {
                self.failures = 0;
                if self.healthy {
                    return None;
                }
                self.successes = self.successes.saturating_add(1);
                if pending || self.successes >= config.healthy_threshold {
                    self.healthy = true;
                    self.successes = 0;
                    return Some(true);
                }
                None
            }
            CheckResult::Fail => {
                self.successes = 0;
                if !self.healthy {
                    return None;
                }
                self.failures = self.failures.saturating_add(1);
                if self.failures >= config.unhealthy_threshold {
                    self.healthy = false;
                    self.failures = 0;
                    return Some(false);
                }
                None
            }
        }
    }
}

/// A check the glue should send now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    /// The endpoint, `ip:port`.
    pub address: String,
    /// The cluster to call (an `ORIGINAL_DST` cluster).
    pub cluster: String,
    /// Headers, pseudo-headers first. The address was validated as an IP literal, so it is
    /// safe in `x-envoy-original-dst-host`.
    pub headers: Vec<(&'static str, String)>,
    /// The callout's timeout.
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
struct HostCheck {
    state: CheckState,
    next_at: Instant,
    in_flight_since: Option<Instant>,
}

/// The active checks of one service, held by the poller.
#[derive(Clone, Debug)]
pub struct ActiveChecks {
    config: ActiveCheckConfig,
    authority: String,
    hosts: BTreeMap<String, HostCheck>,
}

impl ActiveChecks {
    /// Checks per `config`; `authority` is sent as `:authority` (the service's name).
    pub fn new(config: ActiveCheckConfig, authority: &str) -> Self {
        ActiveChecks {
            config,
            authority: authority.to_owned(),
            hosts: BTreeMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ActiveCheckConfig {
        &self.config
    }

    /// Aligns the tracked hosts with `set`: hosts that left are forgotten; new hosts start
    /// from their verdict in the set (a host never checked is pending and is checked at once;
    /// a known one at a random point of the first interval, to spread the checks).
    pub fn sync(&mut self, set: &EndpointSet, now: Instant, rng: &mut impl Rng) {
        self.hosts.retain(|address, _| set.find(address).is_some());
        for record in &set.endpoints {
            if self.hosts.contains_key(&record.address) {
                continue;
            }
            let (state, next_at) = if record.check_healthy {
                let offset = Duration::from_nanos(rng.below(self.config.interval.as_nanos()));
                (CheckState::resume(true), now.saturating_add(offset))
            } else {
                (CheckState::discovered(), now)
            };
            self.hosts.insert(
                record.address.clone(),
                HostCheck {
                    state,
                    next_at,
                    in_flight_since: None,
                },
            );
        }
    }

    /// The checks due at `now`, marked in flight. A check in flight for longer than twice its
    /// timeout is taken as lost (the host never answered the glue) and sent again.
    pub fn due(&mut self, now: Instant) -> Vec<CheckRequest> {
        let lost_after = self.config.timeout.saturating_mul(2);
        let mut out = Vec::new();
        for (address, host) in self.hosts.iter_mut() {
            let busy = host
                .in_flight_since
                .is_some_and(|since| now.saturating_since(since) < lost_after);
            if busy || now < host.next_at {
                continue;
            }
            host.in_flight_since = Some(now);
            host.next_at = now.saturating_add(self.config.interval);
            out.push(CheckRequest {
                address: address.clone(),
                cluster: self.config.cluster.clone(),
                headers: alloc::vec![
                    (":method", "GET".to_owned()),
                    (":path", self.config.path.clone()),
                    (":authority", self.authority.clone()),
                    ("x-envoy-original-dst-host", address.clone()),
                    ("user-agent", "keel-health-check".to_owned()),
                ],
                timeout: self.config.timeout,
            });
        }
        out
    }

    /// Feeds the result of the check of `address`; `Some(verdict)` when it flips, which the
    /// poller then publishes with [`EndpointSet::set_check_health`]. Results for hosts no
    /// longer tracked are ignored.
    pub fn on_result(&mut self, address: &str, result: CheckResult) -> Option<bool> {
        let host = self.hosts.get_mut(address)?;
        host.in_flight_since = None;
        host.state.on_result(result, &self.config)
    }

    /// The verdict for `address`, if tracked.
    pub fn healthy(&self, address: &str) -> Option<bool> {
        self.hosts.get(address).map(|h| h.state.healthy())
    }

    /// How many hosts are tracked.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no host is tracked.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// The outcome of one real request, for passive ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// A 5xx response.
    ServerError,
    /// The connection was reset or refused.
    Reset,
    /// The upstream did not answer in time.
    Timeout,
}

impl Outcome {
    /// The outcome of a response with `status`.
    pub fn from_status(status: u16) -> Self {
        if status >= 500 {
            Outcome::ServerError
        } else {
            Outcome::Success
        }
    }

    /// The outcome of a finished request as a host reports it: the response code (`None` when
    /// no response was produced) and Envoy's `response.code_details` (`None` on a host without
    /// it). Envoy's router writes `upstream_reset_before_response_started{...}` for resets and
    /// refused connections, `upstream_response_timeout` and `upstream_per_try_timeout` for
    /// timeouts (its own 503 and 504 local replies): those count as [`Outcome::Reset`] and
    /// [`Outcome::Timeout`]. Otherwise the status decides. `None` when there is nothing to
    /// judge (no status and no known detail).
    pub fn from_response(status: Option<u16>, details: Option<&str>) -> Option<Self> {
        if let Some(details) = details {
            if details.starts_with("upstream_reset") {
                return Some(Outcome::Reset);
            }
            if details.starts_with("upstream_response_timeout")
                || details.starts_with("upstream_per_try_timeout")
                || details.starts_with("upstream_per_try_idle_timeout")
            {
                return Some(Outcome::Timeout);
            }
        }
        status.map(Outcome::from_status)
    }

    /// Whether it counts towards ejection.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Success)
    }
}

/// The shared-data key of a host's passive counter.
pub fn passive_key(service: &str, address: &str) -> String {
    format!("keel/discovery/{service}/passive/{address}")
}

/// A host's consecutive failures, shared by the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveCounter {
    /// Consecutive failed outcomes.
    pub consecutive_failures: u32,
}

/// What a recorded outcome asks of the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassiveVerdict {
    /// Nothing to do.
    Counted,
    /// The threshold was reached: call [`EndpointSet::eject`] for the host.
    Eject,
}

impl PassiveCounter {
    /// Encodes as `[1][u32]`.
    pub fn encode(&self) -> Vec<u8> {
        Writer::with_capacity(5)
            .u8(PASSIVE_LAYOUT)
            .u32(self.consecutive_failures)
            .finish()
    }

    /// Decodes; `None` unless exactly 5 bytes of layout 1.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        (r.u8()? == PASSIVE_LAYOUT).then_some(())?;
        let consecutive_failures = r.u32()?;
        r.end()?;
        Some(PassiveCounter {
            consecutive_failures,
        })
    }

    /// The change for `store::update`: the bytes to write (`None` when nothing changes, so a
    /// success on a clean host costs no write) and the verdict. Reaching the threshold resets
    /// the count, so the next ejection needs as many new failures.
    pub fn record(
        stored: Option<&[u8]>,
        outcome: Outcome,
        policy: &PassivePolicy,
    ) -> (Option<Vec<u8>>, PassiveVerdict) {
        let old = stored.and_then(PassiveCounter::decode).unwrap_or_default();
        if !outcome.is_failure() {
            let write = (old.consecutive_failures != 0 || stored.is_some_and(|s| s.len() != 5))
                .then(|| PassiveCounter::default().encode());
            return (write, PassiveVerdict::Counted);
        }
        let n = old.consecutive_failures.saturating_add(1);
        if n >= policy.consecutive_failures {
            (
                Some(PassiveCounter::default().encode()),
                PassiveVerdict::Eject,
            )
        } else {
            (
                Some(
                    PassiveCounter {
                        consecutive_failures: n,
                    }
                    .encode(),
                ),
                PassiveVerdict::Counted,
            )
        }
    }
}

/// The result of an ejection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ejection {
    /// Ejected until the given time (the version changed).
    Ejected {
        /// When the host may get traffic again.
        until: Instant,
    },
    /// Already ejected: nothing changed.
    AlreadyEjected,
    /// Not in the set (it left meanwhile).
    Unknown,
    /// Refused: that would eject more than `max_ejection_percent` of the hosts.
    Refused {
        /// Hosts ejected now.
        ejected: usize,
        /// Hosts in the set.
        hosts: usize,
    },
}

impl PassivePolicy {
    /// The length of the `n`-th ejection in a row: `base × n`, at most `max_ejection`.
    pub fn ejection_time(&self, n: u32) -> Duration {
        self.base_ejection
            .saturating_mul(u64::from(n.max(1)))
            .min(self.max_ejection)
    }

    /// Whether one more host may be ejected when `ejected` of `hosts` already are: the share
    /// after ejecting stays within `max_ejection_percent`, or no host is ejected yet.
    pub fn may_eject(&self, ejected: usize, hosts: usize) -> bool {
        let after = (ejected as u128 + 1) * 100;
        ejected == 0 || after <= u128::from(self.max_ejection_percent) * hosts as u128
    }
}

impl EndpointSet {
    /// Ejects `address` at `now` per `policy` (see the module docs).
    pub fn eject(&mut self, address: &str, now: Instant, policy: &PassivePolicy) -> Ejection {
        // Hosts whose time is up count as back: the poller may not have ticked yet.
        self.expire_ejections(now);
        let Some(i) = self.index_of(address) else {
            return Ejection::Unknown;
        };
        if self.endpoints[i].ejected_until.is_some() {
            return Ejection::AlreadyEjected;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|r| r.ejected_until.is_some())
            .count();
        if !policy.may_eject(ejected, self.endpoints.len()) {
            return Ejection::Refused {
                ejected,
                hosts: self.endpoints.len(),
            };
        }
        let record = &mut self.endpoints[i];
        // The multiplier stops growing once the cap is reached, so that decay brings a host
        // that behaves again back to short ejections in reasonable time.
        if policy
            .base_ejection
            .saturating_mul(u64::from(record.ejections))
            < policy.max_ejection
        {
            record.ejections = record.ejections.saturating_add(1);
        }
        let until = now.saturating_add(policy.ejection_time(record.ejections));
        record.ejected_until = Some(until);
        self.bump(now);
        Ejection::Ejected { until }
    }

    /// Returns hosts whose ejection is over (version bump) and decays the multiplier of
    /// hosts not ejected, by one per [`DECAY_INTERVAL`] (no version bump: pickers do not read
    /// it). Returns whether the version changed. The poller calls it on every tick.
    pub fn expire_ejections(&mut self, now: Instant) -> bool {
        // Decay first: a host that is still marked ejected did not behave for the whole
        // period and keeps its multiplier.
        let periods = now.saturating_since(self.decayed_at).as_nanos() / DECAY_INTERVAL.as_nanos();
        if periods > 0 {
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            for record in &mut self.endpoints {
                if record.ejected_until.is_none() {
                    record.ejections = record.ejections.saturating_sub(periods);
                }
            }
            self.decayed_at = self
                .decayed_at
                .saturating_add(DECAY_INTERVAL.saturating_mul(u64::from(periods)));
        }
        let mut changed = false;
        for record in &mut self.endpoints {
            if record.ejected_until.is_some_and(|until| until <= now) {
                record.ejected_until = None;
                changed = true;
            }
        }
        if changed {
            self.bump(now);
        }
        changed
    }

    /// The endpoints a picker should build its table from, with Envoy's panic mode in a
    /// simplified form: take the highest priority (lowest number) that has a routable host;
    /// if its routable share is below `panic_percent`, or no host is routable anywhere, return
    /// every host of that level (traffic to all beats no traffic) and flag panic.
    pub fn traffic_targets(&self, panic_percent: u8) -> (Vec<&super::EndpointRecord>, bool) {
        let level = self
            .routable()
            .map(|r| r.priority)
            .min()
            .or_else(|| self.endpoints.iter().map(|r| r.priority).min());
        let Some(level) = level else {
            return (Vec::new(), false);
        };
        let at_level: Vec<&super::EndpointRecord> = self
            .endpoints
            .iter()
            .filter(|r| r.priority == level)
            .collect();
        let routable: Vec<&super::EndpointRecord> =
            at_level.iter().copied().filter(|r| r.routable()).collect();
        let panic = routable.len() * 100 < usize::from(panic_percent) * at_level.len();
        if panic || routable.is_empty() {
            (at_level, true)
        } else {
            (routable, false)
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::discovery::registry::DiscoveredEndpoint;
    use crate::discovery::update_set;
    use crate::rand::SeededRng;
    use crate::store::testing::MemoryStore;
    use crate::store::{update, SharedStore};
    use core::net::{IpAddr, SocketAddr};

    fn t(secs: u64) -> Instant {
        Instant::from_nanos(secs * 1_000_000_000)
    }

    fn config(unhealthy: u32, healthy: u32) -> ActiveCheckConfig {
        ActiveCheckConfig {
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
            interval: Duration::from_secs(1),
            ..ActiveCheckConfig::with_path("/healthz")
        }
    }

    fn hosts(n: u8) -> Vec<DiscoveredEndpoint> {
        (1..=n)
            .map(|i| DiscoveredEndpoint {
                address: SocketAddr::new(IpAddr::from([10, 0, 0, i]), 80),
                weight: 1,
                priority: 0,
                zone: String::new(),
                registry_healthy: true,
                meta: Vec::new(),
                tags: Vec::new(),
            })
            .collect()
    }

    fn set_of(n: u8) -> EndpointSet {
        let mut set = EndpointSet::new(t(1));
        set.merge(&hosts(n), t(1), false);
        set
    }

    use CheckResult::{Fail, Pass};

    #[test]
    fn thresholds_both_ways() {
        let c = config(3, 2);
        let mut s = CheckState::resume(true);
        assert_eq!(s.on_result(Fail, &c), None);
        assert_eq!(s.on_result(Fail, &c), None);
        // A success in between restarts the count.
        assert_eq!(s.on_result(Pass, &c), None);
        assert_eq!(s.on_result(Fail, &c), None);
        assert_eq!(s.on_result(Fail, &c), None);
        assert_eq!(s.on_result(Fail, &c), Some(false));
        assert!(!s.healthy());
        assert_eq!(s.on_result(Fail, &c), None);
        assert_eq!(s.on_result(Pass, &c), None);
        assert_eq!(s.on_result(Fail, &c), None);
        assert_eq!(s.on_result(Pass, &c), None);
        assert_eq!(s.on_result(Pass, &c), Some(true));
        assert!(s.healthy());
        assert_eq!(s.on_result(Pass, &c), None);
    }

    #[test]
    fn a_new_host_needs_one_success_then_the_thresholds_apply() {
        let c = config(2, 3);
        let mut s = CheckState::discovered();
        assert!(!s.healthy());
        assert_eq!(s.on_result(Pass, &c), Some(true));
        let mut s = CheckState::discovered();
        assert_eq!(s.on_result(Fail, &c), None);
        // No longer pending: the healthy threshold applies.
        assert_eq!(s.on_result(Pass, &c), None);
        assert_eq!(s.on_result(Pass, &c), None);
        assert_eq!(s.on_result(Pass, &c), Some(true));
        assert_eq!(CheckResult::from_status(Some(204)), Pass);
        assert_eq!(CheckResult::from_status(Some(503)), Fail);
        assert_eq!(CheckResult::from_status(Some(301)), Fail);
        assert_eq!(CheckResult::from_status(None), Fail);
    }

    #[test]
    fn schedules_checks_per_host() {
        let mut set = EndpointSet::new(t(0));
        set.merge(&hosts(3), t(0), true);
        set.set_check_health("10.0.0.2:80", true, t(0));
        let mut checks = ActiveChecks::new(config(2, 1), "users");
        let mut rng = SeededRng::new(3);
        checks.sync(&set, t(0), &mut rng);
        assert_eq!(checks.len(), 3);
        // Pending hosts at once; the healthy one somewhere in the first interval.
        let first = checks.due(t(0));
        let addrs: Vec<&str> = first.iter().map(|c| c.address.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1:80", "10.0.0.3:80"]);
        let req = &first[0];
        assert_eq!(req.cluster, "keel_health");
        assert!(req
            .headers
            .contains(&("x-envoy-original-dst-host", "10.0.0.1:80".into())));
        assert!(req.headers.contains(&(":path", "/healthz".into())));
        // In flight: not sent again.
        let later: Vec<String> = checks
            .due(Instant::from_nanos(999_999_999))
            .into_iter()
            .map(|c| c.address)
            .collect();
        assert_eq!(later, ["10.0.0.2:80"]);
        assert_eq!(checks.on_result("10.0.0.1:80", Pass), Some(true));
        assert!(set.set_check_health("10.0.0.1:80", true, t(0)));
        assert_eq!(checks.on_result("10.0.0.3:80", Fail), None);
        // One interval after their checks were sent, hosts 1 and 3 are due again.
        assert_eq!(checks.due(t(1)).len(), 2);
        // A check lost for longer than twice the timeout is sent again.
        assert_eq!(checks.due(t(3)).len(), 3);
        // A host that leaves is forgotten; its late result is ignored.
        set.merge(&hosts(2), t(4), true);
        checks.sync(&set, t(4), &mut rng);
        assert_eq!(checks.len(), 2);
        assert_eq!(checks.on_result("10.0.0.3:80", Pass), None);
    }

    #[test]
    fn ejection_grows_with_each_ejection_and_is_capped() {
        let policy = PassivePolicy::default();
        let mut set = set_of(10);
        let a = "10.0.0.1:80";
        let mut now = t(100);
        let mut lengths = Vec::new();
        for _ in 0..12 {
            let Ejection::Ejected { until } = set.eject(a, now, &policy) else {
                panic!("not ejected");
            };
            lengths.push(until.saturating_since(now).as_secs());
            now = until;
            assert!(set.expire_ejections(now));
        }
        assert_eq!(
            lengths,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
        assert_eq!(set.find(a).unwrap().ejections, 10);
        assert_eq!(policy.ejection_time(0), Duration::from_secs(30));
        assert_eq!(policy.ejection_time(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn the_multiplier_decays_while_the_host_behaves() {
        let policy = PassivePolicy::default();
        let mut set = set_of(10);
        let a = "10.0.0.1:80";
        set.eject(a, t(0), &policy);
        set.expire_ejections(t(30));
        set.eject(a, t(30), &policy);
        set.expire_ejections(t(90));
        assert_eq!(set.find(a).unwrap().ejections, 2);
        // 10 s later: one step down; the version does not move for it.
        let v = set.version;
        assert!(!set.expire_ejections(t(100)));
        assert_eq!(set.version, v);
        assert_eq!(set.find(a).unwrap().ejections, 1);
        assert!(!set.expire_ejections(t(200)));
        assert_eq!(set.find(a).unwrap().ejections, 0);
        let Ejection::Ejected { until } = set.eject(a, t(200), &policy) else {
            panic!();
        };
        assert_eq!(until, t(230));
    }

    #[test]
    fn at_most_a_share_of_hosts_is_ejected_but_always_one() {
        let policy = PassivePolicy::default();
        // 10 hosts at 10 %: one.
        let mut set = set_of(10);
        assert!(matches!(
            set.eject("10.0.0.1:80", t(1), &policy),
            Ejection::Ejected { .. }
        ));
        assert_eq!(
            set.eject("10.0.0.2:80", t(1), &policy),
            Ejection::Refused {
                ejected: 1,
                hosts: 10
            }
        );
        assert_eq!(
            set.eject("10.0.0.1:80", t(1), &policy),
            Ejection::AlreadyEjected
        );
        assert_eq!(set.eject("10.9.9.9:80", t(1), &policy), Ejection::Unknown);
        // 3 hosts at 10 %: still one (the at-least-one rule), even at 0 %.
        let mut small = set_of(3);
        assert!(matches!(
            small.eject("10.0.0.1:80", t(1), &policy),
            Ejection::Ejected { .. }
        ));
        assert!(matches!(
            small.eject("10.0.0.2:80", t(1), &policy),
            Ejection::Refused { .. }
        ));
        let zero = PassivePolicy {
            max_ejection_percent: 0,
            ..policy
        };
        let mut one = set_of(1);
        assert!(matches!(
            one.eject("10.0.0.1:80", t(1), &zero),
            Ejection::Ejected { .. }
        ));
        // 20 hosts at 10 %: two.
        let mut big = set_of(20);
        assert!(matches!(
            big.eject("10.0.0.1:80", t(1), &policy),
            Ejection::Ejected { .. }
        ));
        assert!(matches!(
            big.eject("10.0.0.2:80", t(1), &policy),
            Ejection::Ejected { .. }
        ));
        assert!(matches!(
            big.eject("10.0.0.3:80", t(1), &policy),
            Ejection::Refused { .. }
        ));
        // Once the first is back, another may go.
        assert!(matches!(
            big.eject("10.0.0.3:80", t(31), &policy),
            Ejection::Ejected { .. }
        ));
        // 100 %: every host.
        let all = PassivePolicy {
            max_ejection_percent: 100,
            ..policy
        };
        let mut set = set_of(4);
        for i in 1..=4 {
            let a = format!("10.0.0.{i}:80");
            assert!(matches!(
                set.eject(&a, t(1), &all),
                Ejection::Ejected { .. }
            ));
        }
        assert_eq!(set.routable().count(), 0);
    }

    #[test]
    fn ejection_and_its_end_change_the_version() {
        let policy = PassivePolicy::default();
        let mut set = set_of(5);
        let v0 = set.version;
        set.eject("10.0.0.1:80", t(10), &policy);
        let v1 = set.version;
        assert!(v1 > v0);
        assert!(!set.find("10.0.0.1:80").unwrap().routable());
        assert!(!set.expire_ejections(t(39)));
        assert_eq!(set.version, v1);
        assert!(set.expire_ejections(t(40)));
        assert!(set.version > v1);
        assert!(set.find("10.0.0.1:80").unwrap().routable());
    }

    #[test]
    fn outcomes_from_status_and_envoy_details() {
        let reset = "upstream_reset_before_response_started{connection_failure}";
        assert_eq!(
            Outcome::from_response(Some(503), Some(reset)),
            Some(Outcome::Reset)
        );
        assert_eq!(
            Outcome::from_response(Some(504), Some("upstream_response_timeout")),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            Outcome::from_response(Some(504), Some("upstream_per_try_timeout")),
            Some(Outcome::Timeout)
        );
        assert_eq!(
            Outcome::from_response(Some(503), Some("via_upstream")),
            Some(Outcome::ServerError)
        );
        assert_eq!(
            Outcome::from_response(Some(404), Some("via_upstream")),
            Some(Outcome::Success)
        );
        assert_eq!(
            Outcome::from_response(Some(200), None),
            Some(Outcome::Success)
        );
        assert_eq!(Outcome::from_response(None, None), None);
        assert_eq!(Outcome::from_response(None, Some("other")), None);
        assert!(Outcome::Reset.is_failure() && Outcome::Timeout.is_failure());
    }

    #[test]
    fn passive_counter_counts_consecutive_failures_across_workers() {
        let policy = PassivePolicy::default();
        let store = MemoryStore::default();
        let key = passive_key("users", "10.0.0.1:80");
        let record = |o| {
            update(&store, &key, 4, |old| {
                PassiveCounter::record(old, o, &policy)
            })
            .unwrap()
        };
        // A success on a clean host writes nothing.
        assert_eq!(record(Outcome::Success), PassiveVerdict::Counted);
        assert!(store.get(&key).unwrap().is_none());
        for _ in 0..4 {
            assert_eq!(record(Outcome::from_status(503)), PassiveVerdict::Counted);
        }
        // A success clears the run.
        assert_eq!(record(Outcome::from_status(404)), PassiveVerdict::Counted);
        for _ in 0..4 {
            assert_eq!(record(Outcome::Reset), PassiveVerdict::Counted);
        }
        assert_eq!(record(Outcome::Timeout), PassiveVerdict::Eject);
        // The count starts over after an ejection.
        assert_eq!(record(Outcome::ServerError), PassiveVerdict::Counted);
        let stored = store.get(&key).unwrap().unwrap().0;
        assert_eq!(
            PassiveCounter::decode(&stored)
                .unwrap()
                .consecutive_failures,
            1
        );
        assert_eq!(PassiveCounter::decode(&stored[..4]), None);
        assert_eq!(PassiveCounter::decode(b"\x01\0\0\0\0\0"), None);
    }

    #[test]
    fn a_worker_ejects_through_the_shared_set() {
        let policy = PassivePolicy::default();
        let store = MemoryStore::default();
        update_set(&store, "users", t(1), |s| s.merge(&hosts(10), t(1), false)).unwrap();
        let (set, outcome) = update_set(&store, "users", t(2), |s| {
            s.eject("10.0.0.4:80", t(2), &policy)
        })
        .unwrap();
        assert_eq!(outcome, Ejection::Ejected { until: t(32) });
        assert_eq!(set.routable().count(), 9);
        // Another worker's attempt on a second host is refused by the shared count.
        let (_, second) = update_set(&store, "users", t(3), |s| {
            s.eject("10.0.0.5:80", t(3), &policy)
        })
        .unwrap();
        assert!(matches!(second, Ejection::Refused { .. }));
    }

    #[test]
    fn traffic_targets_fall_back_to_panic_mode() {
        let mut set = set_of(4);
        let (targets, panic) = set.traffic_targets(50);
        assert_eq!((targets.len(), panic), (4, false));
        set.set_check_health("10.0.0.1:80", false, t(2));
        set.set_check_health("10.0.0.2:80", false, t(2));
        let (targets, panic) = set.traffic_targets(50);
        assert_eq!((targets.len(), panic), (2, false));
        set.set_check_health("10.0.0.3:80", false, t(2));
        // 1 of 4 healthy is below 50 %: spread over all four.
        let (targets, panic) = set.traffic_targets(50);
        assert_eq!((targets.len(), panic), (4, true));
        // A routable host at a lower priority level is not used while level 0 has one.
        let mut backup = hosts(5).pop().unwrap();
        backup.priority = 1;
        let mut answer = hosts(4);
        answer.push(backup);
        set.merge(&answer, t(3), false);
        let (targets, _) = set.traffic_targets(0);
        assert!(targets.iter().all(|r| r.priority == 0));
        assert_eq!(
            EndpointSet::new(t(0)).traffic_targets(50),
            (Vec::new(), false)
        );
    }
}
