//! `keel_discovery.wasm`: a health-aware cache of service endpoints read from a registry (etcd,
//! Consul or a static list), published in shared data for the picker.
//!
//! The glue is thin; `keel_core::discovery` decides everything. Its module docs give the order
//! of operations this file follows on each tick:
//!
//! - every worker's root context ticks; the worker holding the poller lease in shared data reads
//!   the registries (HTTP callouts to the configured clusters), runs the active health checks
//!   (callouts through the `ORIGINAL_DST` cluster `keel_health`), publishes the sets and sets
//!   the gauges; the others only follow the published version so they know which hosts belong
//!   to which service;
//! - every worker, at the end of each request (`on_log`), feeds the outcome for the host Envoy
//!   used (`upstream.address`) to passive ejection;
//! - a request on the configured `admin_path` is answered with the published sets as JSON.
//!
//! Configuration reference: `docs/config/discovery.md`; layouts: `docs/shared-data.md`.
//!
//! Host capabilities: ticks, HTTP callouts and shared data are required (without ticks nothing
//! is polled; without callouts only static sources work; without shared data nothing is
//! published). `upstream.address`, `response.code` and `response.code_details` properties
//! feed passive ejection; without them it does nothing.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;

use keel_core::circuit_breaker::steer::JUDGED_HOST_PROPERTY;
use keel_core::config::path_only;
use keel_core::discovery::endpoints::decode_version;
use keel_core::discovery::lease;
use keel_core::discovery::report::freshness_name;
use keel_core::discovery::{
    passive_key, read_set, status_json, update_set, version_key, ActiveChecks, CheckResult,
    ConsulIndex, DiscoveryConfig, Ejection, EndpointSet, Freshness, Outcome, PassiveCounter,
    PassiveVerdict, RefreshSchedule, RegistryAnswer, ServiceConfig, Source, LEASE_KEY,
    POLLER_LEASE_TTL,
};
use keel_core::rand::SeededRng;
use keel_core::retry::attempt::{decode_router_attempt, ROUTER_ATTEMPT_PROPERTY};
use keel_core::store::SharedStore;
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::{Counter, Family, Gauge};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::HostStore;
use keel_proxy::{clock, http_call, log, random, request, store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "discovery";
/// At most this many skipped registry entries are logged per answer (the core keeps 32).
const SKIPPED_LOGGED: usize = 8;
/// The `freshness` gauge before the first good answer.
const FRESHNESS_NO_DATA: u64 = 3;

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline (root_id `pipeline` in
/// `keel.wasm`).
pub fn stage(_context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(DiscoveryRoot::new(stage))
}

/// The filter as an Envoy filter of its own: what its module `keel_discovery.wasm`, and `keel.wasm`
/// for root_id `discovery`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// A service's metrics, `keel.discovery.<service>.<what>`.
struct ServiceMetrics {
    known: Gauge,
    healthy: Gauge,
    ejected: Gauge,
    routable: Gauge,
    data_age_ms: Gauge,
    freshness: Gauge,
    refresh_ok: Counter,
    refresh_failed: Counter,
    entries_skipped: Counter,
    checks_passed: Counter,
    checks_failed: Counter,
    ejections: Counter,
    ejections_refused: Counter,
    shared_data_errors: Counter,
}

impl ServiceMetrics {
    fn new(service: &str) -> ServiceMetrics {
        let family = Family::new(FILTER, service);
        let gauge = |what: &str| family.gauge(what);
        let counter = |what: &str| family.counter(what);
        ServiceMetrics {
            known: gauge("endpoints_known"),
            healthy: gauge("endpoints_healthy"),
            ejected: gauge("endpoints_ejected"),
            routable: gauge("endpoints_routable"),
            data_age_ms: gauge("data_age_ms"),
            freshness: gauge("freshness"),
            refresh_ok: counter("refresh_ok"),
            refresh_failed: counter("refresh_failed"),
            entries_skipped: counter("entries_skipped"),
            checks_passed: counter("checks_passed"),
            checks_failed: counter("checks_failed"),
            ejections: counter("ejections"),
            ejections_refused: counter("ejections_refused"),
            shared_data_errors: counter("shared_data_errors"),
        }
    }

    /// The gauges from the published set and the poller's schedule.
    fn publish(&self, set: Option<&EndpointSet>, age: Option<Duration>) {
        let counts = set.map(EndpointSet::counts).unwrap_or_default();
        self.known.set(counts.known as u64);
        self.healthy.set(counts.healthy as u64);
        self.ejected.set(counts.ejected as u64);
        self.routable.set(counts.routable as u64);
        self.data_age_ms.set(age.map_or(0, Duration::as_millis));
        let freshness = match (age, set) {
            (Some(_), Some(set)) => set.freshness as u64,
            _ => FRESHNESS_NO_DATA,
        };
        self.freshness.set(freshness);
    }
}

/// This worker's view of a service's published set: enough to tell whether a host belongs to
/// the service, refreshed on the tick when the version stamp moves.
#[derive(Default)]
struct View {
    version: Option<u64>,
    addresses: BTreeSet<String>,
}

struct Service {
    config: ServiceConfig,
    metrics: ServiceMetrics,
    view: RefCell<View>,
}

impl Service {
    fn update_view(&self, set: &EndpointSet) {
        let mut view = self.view.borrow_mut();
        if view.version != Some(set.version) {
            view.version = Some(set.version);
            view.addresses = set.endpoints.iter().map(|r| r.address.clone()).collect();
        }
    }

    /// Follows the version stamp: reads the set only when the stamp differs from the view.
    fn refresh_view(&self) {
        let stamp = HostStore
            .get(&version_key(&self.config.name))
            .ok()
            .flatten()
            .and_then(|(bytes, _)| decode_version(&bytes));
        if stamp.is_none() || stamp == self.view.borrow().version {
            return;
        }
        if let Some(set) = read_set(&HostStore, &self.config.name) {
            self.update_view(&set);
        }
    }
}

/// What every context of a worker shares.
struct Filter {
    admin_path: Option<String>,
    services: Vec<Service>,
    passive: bool,
    acquired: Counter,
    /// Updates of the poller lease that did not happen (contended or refused).
    lease_errors: Counter,
}

/// A callout in flight.
enum Pending {
    Registry(usize),
    Check(usize, String),
}

/// One service's state in the poller (rebuilt on each takeover).
struct Poll {
    schedule: RefreshSchedule,
    consul_index: ConsulIndex,
    checks: Option<ActiveChecks>,
    /// The last answer's skipped entries, so the same junk is logged once, not every refresh.
    skipped_seen: Vec<String>,
    last_error: Option<String>,
    cluster_error_logged: bool,
}

/// The state of the VM that holds the poller lease.
struct Poller {
    polls: Vec<Poll>,
    /// Callouts in flight, with the time after which an answer is no longer expected (twice
    /// the callout's timeout): a host that never answers cannot make this grow.
    pending: HashMap<u32, (Pending, Instant)>,
}

impl Poller {
    /// Starts polling: per service, the refresh schedule resumes from the published set.
    fn new(filter: &Filter) -> Poller {
        let polls = filter
            .services
            .iter()
            .map(|service| {
                let c = &service.config;
                let mut schedule =
                    RefreshSchedule::new(c.refresh, c.max_stale, c.request_timeout());
                schedule.resume(read_set(&HostStore, &c.name).and_then(|s| s.refreshed_at));
                Poll {
                    schedule,
                    consul_index: ConsulIndex::default(),
                    checks: c
                        .health_check
                        .clone()
                        .map(|h| ActiveChecks::new(h, &c.name)),
                    skipped_seen: Vec::new(),
                    last_error: None,
                    cluster_error_logged: false,
                }
            })
            .collect();
        Poller {
            polls,
            pending: HashMap::new(),
        }
    }

    fn tick(&mut self, filter: &Filter, now: Instant, rng: &mut SeededRng) {
        self.pending.retain(|_, (_, forget_at)| now < *forget_at);
        for (i, service) in filter.services.iter().enumerate() {
            self.refresh(i, service, now, rng);
            let Some(poll) = self.polls.get_mut(i) else {
                continue;
            };
            let name = &service.config.name;
            // Ejections that ran out, the freshness flag, the gauges.
            let set = match poll.schedule.freshness(now) {
                Some(freshness) => match update_set(&HostStore, name, now, |s| {
                    s.expire_ejections(now);
                    s.set_freshness(freshness)
                }) {
                    Ok((set, _)) => Some(set),
                    Err(_) => {
                        service.metrics.shared_data_errors.increment(1);
                        read_set(&HostStore, name)
                    }
                },
                None => read_set(&HostStore, name),
            };
            service
                .metrics
                .publish(set.as_ref(), poll.schedule.age(now));
            if let Some(set) = &set {
                service.update_view(set);
            }
            self.send_checks(i, service, set.as_ref(), now, rng);
        }
    }

    /// Asks the registry when due (a static list is applied at once).
    fn refresh(&mut self, i: usize, service: &Service, now: Instant, rng: &mut SeededRng) {
        let Some(poll) = self.polls.get_mut(i) else {
            return;
        };
        if !poll.schedule.due(now) {
            return;
        }
        let c = &service.config;
        let Some(request) = c.source.request(poll.consul_index) else {
            if let Some(answer) = c.source.static_answer() {
                poll.schedule.on_sent(now);
                apply_answer(poll, service, answer, now, rng);
            }
            return;
        };
        let headers = request.headers();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match http_call::dispatch(
            &request.cluster,
            &headers,
            request.body.as_deref(),
            request.timeout,
        ) {
            Ok(token) => {
                poll.schedule.on_sent(now);
                let forget_at = now.saturating_add(request.timeout.saturating_mul(2));
                self.pending
                    .insert(token, (Pending::Registry(i), forget_at));
            }
            Err(status) => {
                poll.schedule.on_sent(now);
                let message = format!(
                    "the host refused the callout to cluster \"{}\" ({status:?}; is it an Envoy cluster?)",
                    request.cluster
                );
                refresh_failed(poll, service, message, now, rng);
            }
        }
    }

    /// Sends the active checks that are due.
    fn send_checks(
        &mut self,
        i: usize,
        service: &Service,
        set: Option<&EndpointSet>,
        now: Instant,
        rng: &mut SeededRng,
    ) {
        let Some(poll) = self.polls.get_mut(i) else {
            return;
        };
        let (Some(checks), Some(set)) = (poll.checks.as_mut(), set) else {
            return;
        };
        checks.sync(set, now, rng);
        for check in checks.due(now) {
            let headers: Vec<(&str, &str)> = check
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            match http_call::dispatch(&check.cluster, &headers, None, check.timeout) {
                Ok(token) => {
                    let forget_at = now.saturating_add(check.timeout.saturating_mul(2));
                    self.pending
                        .insert(token, (Pending::Check(i, check.address.clone()), forget_at));
                }
                Err(status) => {
                    if !poll.cluster_error_logged {
                        poll.cluster_error_logged = true;
                        log::error(
                            FILTER,
                            &format!(
                                "{}: the host refused the health check callout to cluster \"{}\" ({status:?}); \
                                 define it as an ORIGINAL_DST cluster with use_http_header (see docs/config/discovery.md); \
                                 checks count as failed",
                                service.config.name, check.cluster
                            ),
                        );
                    }
                    check_result(checks, service, &check.address, None, now);
                }
            }
        }
    }

    fn on_answer(
        &mut self,
        filter: &Filter,
        token: u32,
        num_headers: usize,
        body_size: usize,
        now: Instant,
        rng: &mut SeededRng,
    ) {
        let Some((pending, _)) = self.pending.remove(&token) else {
            return;
        };
        match pending {
            Pending::Registry(i) => {
                let (Some(poll), Some(service)) = (self.polls.get_mut(i), filter.services.get(i))
                else {
                    return;
                };
                match read_answer(poll, &service.config, num_headers, body_size) {
                    Ok(answer) => apply_answer(poll, service, answer, now, rng),
                    Err(message) => refresh_failed(poll, service, message, now, rng),
                }
            }
            Pending::Check(i, address) => {
                let (Some(poll), Some(service)) = (self.polls.get_mut(i), filter.services.get(i))
                else {
                    return;
                };
                if let Some(checks) = poll.checks.as_mut() {
                    let status = http_call::status(num_headers);
                    check_result(checks, service, &address, status, now);
                }
            }
        }
    }
}

/// Reads and parses a registry's answer; the error is the log line's reason.
fn read_answer(
    poll: &mut Poll,
    service: &ServiceConfig,
    num_headers: usize,
    body_size: usize,
) -> Result<RegistryAnswer, String> {
    match http_call::status(num_headers) {
        Some(200) => {}
        Some(status) => return Err(format!("the registry answered status {status}")),
        None => return Err(
            "no answer (connection refused or reset, timeout, or no healthy host in the cluster)"
                .to_string(),
        ),
    }
    let limit = service.parse_limits().max_body_bytes;
    let body = http_call::body(body_size, limit).map_err(|size| {
        format!(
            "the answer is {size} bytes, above the limit of {limit} for max_endpoints = {}",
            service.max_endpoints
        )
    })?;
    let answer = service.parse_answer(&body).map_err(|e| e.to_string())?;
    if matches!(service.source, Source::Consul(_)) {
        let index = http_call::header(num_headers, "x-consul-index")
            .and_then(|v| String::from_utf8(v).ok());
        poll.consul_index = poll.consul_index.advance(index.as_deref()).0;
    }
    Ok(answer)
}

/// Publishes a good answer: merge into the shared set, log what was skipped, reset the
/// passive counters of hosts that left.
fn apply_answer(
    poll: &mut Poll,
    service: &Service,
    answer: RegistryAnswer,
    now: Instant,
    rng: &mut SeededRng,
) {
    let name = &service.config.name;
    let skipped: Vec<String> = answer.skipped.iter().map(ToString::to_string).collect();
    let total_skipped = answer.skipped_total();
    service
        .metrics
        .entries_skipped
        .increment(total_skipped as u64);
    if skipped != poll.skipped_seen {
        for line in skipped.iter().take(SKIPPED_LOGGED) {
            log::warn(FILTER, &format!("{name}: {line}"));
        }
        if total_skipped > SKIPPED_LOGGED {
            log::warn(
                FILTER,
                &format!(
                    "{name}: {} more registry entries skipped",
                    total_skipped - SKIPPED_LOGGED
                ),
            );
        }
        poll.skipped_seen = skipped;
    }
    let checks = service.config.health_check.is_some();
    let merged = update_set(&HostStore, name, now, |s| {
        s.merge(&answer.endpoints, now, checks)
    });
    let (set, outcome) = match merged {
        Ok(done) => done,
        Err(e) => {
            service.metrics.shared_data_errors.increment(1);
            let message = format!("could not publish the set in shared data ({e:?})");
            refresh_failed(poll, service, message, now, rng);
            return;
        }
    };
    for address in &outcome.removed {
        // A host that comes back starts with a clean record.
        let _ = HostStore.set(
            &passive_key(name, address),
            &PassiveCounter::default().encode(),
            None,
        );
    }
    if outcome.changed {
        log::info(
            FILTER,
            &format!(
                "{name}: {} endpoints ({} new, {} gone), version {}",
                set.endpoints.len(),
                outcome.added,
                outcome.removed.len(),
                set.version
            ),
        );
    }
    let failures = poll.schedule.failures();
    poll.schedule.on_success(now);
    poll.last_error = None;
    if failures > 0 {
        log::info(
            FILTER,
            &format!("{name}: registry refresh succeeded again after {failures} failures"),
        );
    }
    service.metrics.refresh_ok.increment(1);
    service.update_view(&set);
}

/// A failed refresh: back off, count, and log the first failure of a run and any new reason.
fn refresh_failed(
    poll: &mut Poll,
    service: &Service,
    message: String,
    now: Instant,
    rng: &mut SeededRng,
) {
    let wait = poll.schedule.on_failure(now, rng);
    service.metrics.refresh_failed.increment(1);
    if poll.last_error.as_deref() != Some(message.as_str()) {
        let serving = match read_set(&HostStore, &service.config.name) {
            Some(set) => format!(
                "serving the last known set of {} endpoints ({})",
                set.endpoints.len(),
                freshness_name(match poll.schedule.freshness(now) {
                    Some(f) => f,
                    None => Freshness::Stale,
                })
            ),
            None => "no set published yet".to_string(),
        };
        log::warn(
            FILTER,
            &format!(
                "{}: registry refresh failed: {message}; {serving}; {} failures in a row, next attempt in {} ms",
                service.config.name,
                poll.schedule.failures(),
                wait.as_millis()
            ),
        );
        poll.last_error = Some(message);
    }
}

/// Feeds an active check's result (`status` `None`: no response) and publishes a flip.
fn check_result(
    checks: &mut ActiveChecks,
    service: &Service,
    address: &str,
    status: Option<u16>,
    now: Instant,
) {
    let result = CheckResult::from_status(status);
    match result {
        CheckResult::Pass => service.metrics.checks_passed.increment(1),
        CheckResult::Fail => service.metrics.checks_failed.increment(1),
    }
    let Some(healthy) = checks.on_result(address, result) else {
        return;
    };
    let name = &service.config.name;
    match update_set(&HostStore, name, now, |s| {
        s.set_check_health(address, healthy, now)
    }) {
        Ok((set, _)) => service.update_view(&set),
        Err(_) => service.metrics.shared_data_errors.increment(1),
    }
    let why = match status {
        Some(s) => format!("status {s}"),
        None => "no response".to_string(),
    };
    let verdict = if healthy { "healthy" } else { "unhealthy" };
    log::info(
        FILTER,
        &format!("{name}: {address} is now {verdict} by active checks (last check: {why})"),
    );
}

struct DiscoveryRoot {
    stage: Stage,
    me: u64,
    rng: SeededRng,
    filter: Option<Rc<Filter>>,
    poller: Option<Poller>,
}

impl DiscoveryRoot {
    fn new(stage: Stage) -> DiscoveryRoot {
        // 64 random bits per VM (WASI random through std's hasher keys), so that workers started
        // at the same instant still get distinct lease holder ids.
        let me = random::seed(0);
        DiscoveryRoot {
            stage,
            me,
            rng: SeededRng::new(me),
            filter: None,
            poller: None,
        }
    }
}

impl Context for DiscoveryRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // Answers to calls sent while this worker held the lease; after losing it the pending
        // calls are forgotten and their answers ignored (a newer poller owns the set).
        let (Some(filter), Some(poller)) = (self.filter.as_ref(), self.poller.as_mut()) else {
            return;
        };
        let now = clock::now();
        poller.on_answer(filter, token_id, num_headers, body_size, now, &mut self.rng);
    }

    fn on_done(&mut self) -> bool {
        // Hand the lease over at once rather than after its TTL.
        if self.poller.take().is_some() {
            let now = clock::now();
            let me = self.me;
            if let Some(filter) = self.filter.as_ref() {
                let _ = store::update(LEASE_KEY, &filter.lease_errors, |old| {
                    lease::release_bytes(old, me, now)
                });
            }
        }
        true
    }
}

impl RootContext for DiscoveryRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self
            .stage
            .load(FILTER, keel_core::config::load::<DiscoveryConfig>)
        else {
            return false;
        };
        let tick = config.tick();
        let passive = config.services.iter().any(|s| s.passive.is_some());
        let DiscoveryConfig {
            services,
            admin_path,
        } = config;
        let services: Vec<Service> = services
            .into_iter()
            .map(|config| Service {
                metrics: ServiceMetrics::new(&config.name),
                config,
                view: RefCell::new(View::default()),
            })
            .collect();
        let names: Vec<&str> = services.iter().map(|s| s.config.name.as_str()).collect();
        log::info(
            FILTER,
            &format!("configured services: {} (tick {tick})", names.join(", ")),
        );
        let poller = Family::new(FILTER, "poller");
        self.filter = Some(Rc::new(Filter {
            admin_path,
            services,
            passive,
            acquired: poller.counter("acquired"),
            lease_errors: poller.counter("store_errors"),
        }));
        self.poller = None;
        // Create the poller lease before the first tick: the first write of an absent key is
        // unconditional on Envoy, so two workers taking a missing lease at once would both
        // poll (for one tick) and both count an acquisition. An empty value is a free lease.
        if let Err(e) = store::ensure(LEASE_KEY, &[]) {
            log::warn(
                FILTER,
                &format!("could not create the poller lease in shared data ({e:?}); two VMs may poll at first"),
            );
        }
        if !self
            .stage
            .set_tick_period(std::time::Duration::from_nanos(tick.as_nanos()))
        {
            log::error(
                FILTER,
                "the host cannot set a tick period: nothing will be polled or published",
            );
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(filter) = self.filter.clone() else {
            return;
        };
        let now = clock::now();
        let holding = self.poller.is_some();
        // On a contended or refused lease update this worker keeps its role for this tick.
        let me = self.me;
        let held = store::update(LEASE_KEY, &filter.lease_errors, |old| {
            lease::acquire_bytes(old, me, now, POLLER_LEASE_TTL)
        })
        .unwrap_or(holding);
        if held && !holding {
            filter.acquired.increment(1);
            log::info(
                FILTER,
                &format!("this VM ({:016x}) now polls the registries", self.me),
            );
            self.poller = Some(Poller::new(&filter));
        } else if !held && holding {
            log::info(
                FILTER,
                &format!(
                    "this VM ({:016x}) lost the poller lease; another VM polls",
                    self.me
                ),
            );
            self.poller = None;
        }
        match self.poller.as_mut() {
            Some(poller) => poller.tick(&filter, now, &mut self.rng),
            None => filter.services.iter().for_each(Service::refresh_view),
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let filter = self.filter.clone()?;
        Some(Box::new(DiscoveryStream { filter }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct DiscoveryStream {
    filter: Rc<Filter>,
}

impl Context for DiscoveryStream {}

impl HttpContext for DiscoveryStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(admin_path) = &self.filter.admin_path else {
            return Action::Continue;
        };
        let Some(path) = request::header_str(":path") else {
            return Action::Continue;
        };
        if path_only(&path) != admin_path {
            return Action::Continue;
        }
        let sets: Vec<(&str, Option<EndpointSet>)> = self
            .filter
            .services
            .iter()
            .map(|s| (s.config.name.as_str(), read_set(&HostStore, &s.config.name)))
            .collect();
        let refs: Vec<(&str, Option<&EndpointSet>)> = sets
            .iter()
            .map(|(name, set)| (*name, set.as_ref()))
            .collect();
        LocalReply {
            status: 200,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("cache-control".to_string(), "no-store".to_string()),
            ],
            body: status_json(&refs, clock::now()).into_bytes(),
        }
        .send();
        Action::Pause
    }

    fn on_log(&mut self) {
        if !self.filter.passive {
            return;
        }
        // The host Envoy actually used (the last attempt's, with retries), canonicalised to
        // the set's `ip:port` text.
        let Some(address) = request::property_str(&["upstream", "address"])
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.to_string())
        else {
            return;
        };
        // A per-host breaker judged this call: it is its failure to count, not ours.
        if request::property_str(&[JUDGED_HOST_PROPERTY]).as_deref() == Some(address.as_str()) {
            return;
        }
        // When the retry filter replaced the router's answer, that answer (which it left on
        // the stream) is the host's outcome, not what the client finally got.
        let router_attempt = request::property_str(&[ROUTER_ATTEMPT_PROPERTY]);
        let (status, details) = match router_attempt.as_deref().and_then(decode_router_attempt) {
            Some((status, details)) => (Some(status), details.map(str::to_string)),
            None => (
                request::property_i64(&["response", "code"]).and_then(|c| u16::try_from(c).ok()),
                request::property_str(&["response", "code_details"]),
            ),
        };
        let Some(outcome) = Outcome::from_response(status, details.as_deref()) else {
            return;
        };
        let now = clock::now();
        for service in &self.filter.services {
            let Some(policy) = service.config.passive else {
                continue;
            };
            if !service.view.borrow().addresses.contains(&address) {
                continue;
            }
            let name = &service.config.name;
            let verdict = store::update(
                &passive_key(name, &address),
                &service.metrics.shared_data_errors,
                |old| PassiveCounter::record(old, outcome, &policy),
            );
            if verdict != Ok(PassiveVerdict::Eject) {
                continue;
            }
            match update_set(&HostStore, name, now, |s| s.eject(&address, now, &policy)) {
                Ok((set, Ejection::Ejected { until })) => {
                    service.metrics.ejections.increment(1);
                    let times = set.find(&address).map_or(1, |r| r.ejections);
                    log::warn(
                        FILTER,
                        &format!(
                            "{name}: {address} ejected for {} after {} consecutive failures (ejection {times} in a row)",
                            until.saturating_since(now),
                            policy.consecutive_failures
                        ),
                    );
                    service.update_view(&set);
                }
                Ok((_, Ejection::Refused { ejected, hosts })) => {
                    service.metrics.ejections_refused.increment(1);
                    log::info(
                        FILTER,
                        &format!(
                            "{name}: {address} not ejected: {ejected} of {hosts} hosts already are (max_ejection_percent {})",
                            policy.max_ejection_percent
                        ),
                    );
                }
                Ok(_) => {}
                Err(_) => service.metrics.shared_data_errors.increment(1),
            }
        }
    }
}
