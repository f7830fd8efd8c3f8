//! `keel_picker.wasm`: consistent-hash upstream picking (ring with virtual nodes, Maglev,
//! bounded loads) and plain balancers, with health, panic threshold and priority failover.
//!
//! The glue is thin; `keel_core::picker` decides. Per request it reads the route name (only when
//! a picker lists routes), the key's selectors, and for a `service` source the 9-byte version
//! stamp of the endpoint set the discovery filter publishes; it picks, and sets the request
//! header Envoy routes on (`x-envoy-original-dst-host` for an `ORIGINAL_DST` cluster, which
//! also tells the filters after this one which host was picked; in `cluster_header` mode a
//! cluster name, plus `x-keel-endpoint` with the address). Rings and tables are built at
//! configuration (static endpoints) or when the published set's version changes, never per
//! request. Picks per endpoint are counted in the VM and added to the host's counters on a
//! one-second tick, so a request makes no metric call.
//!
//! Client-sent copies of the headers a picker sets are replaced on routes it covers and
//! removed on the others, so a client can never choose the host.
//!
//! Configuration reference: `docs/config/picker.md`.
//!
//! Host capabilities: request header maps (required). Shared data for a `service` source
//! (without it nothing is published: every request gets 503) and for bounded loads and
//! `least_request` (without it the pick ignores loads and counts `shared_data_errors`), and for
//! `peak_ewma` (each endpoint's latency estimate and load; without it the pick is a plain
//! power of two choices and counts `shared_data_errors`).
//! Response headers for the sticky cookie; `on_log` to count a bounded-load request out.
//! Ticks to publish the pick counters (without them each pick is counted at once).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use keel_core::circuit_breaker::steer::{host_state_key, steering};
use keel_core::config;
use keel_core::picker::bounded::{self, BoundedPick};
use keel_core::picker::failover::{encode_hosts, HOSTS_PROPERTY, MAX_HOSTS};
use keel_core::picker::peak_ewma::{EndpointLatency, PeakEwmaParams};
use keel_core::picker::policy::{EndpointSource, FilterConfig, PickerConfig};
use keel_core::picker::{Algorithm, InFlight, MirrorOutcome, Pick, Picker, ServiceMirror};
use keel_core::rand::{Rng, SeededRng};
use keel_core::routes;
use keel_core::store::SharedStore;
use keel_core::time::Instant;
use keel_proxy::metrics::{Counter, Family, Gauge, Tally};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::{HostStore, CAS_ATTEMPTS};
use keel_proxy::{clock, log, random, request, routing, store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "picker";
/// Per-endpoint pick counters a VM defines at most: each definition is kept by the host for
/// the VM's life, so endpoint churn must not grow them without bound.
const MAX_ENDPOINT_COUNTERS: usize = 4096;
/// How often the picks counted in the VM are added to the host's counters.
const FLUSH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline (root_id `pipeline` in
/// `keel.wasm`).
pub fn stage(_context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(PickerRoot::new(stage))
}

/// The filter as an Envoy filter of its own: what its module `keel_picker.wasm`, and `keel.wasm`
/// for root_id `picker`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// A picker's metrics, `keel.picker.<picker>.<what>`.
struct Metrics {
    family: Family,
    /// Per endpoint address, defined on first sight.
    picks: RefCell<HashMap<String, Counter>>,
    rebuilds: Counter,
    set_updates: Counter,
    panic_entered: Counter,
    panic_picks: Counter,
    spills: Counter,
    no_host: Counter,
    keyless: Counter,
    cookies_set: Counter,
    shared_data_errors: Counter,
    /// Picks made while the breaker of at least one host was open.
    breaker_avoided: Counter,
    endpoints: Gauge,
    healthy: Gauge,
}

impl Metrics {
    fn new(picker: &str) -> Metrics {
        let family = Family::new(FILTER, picker);
        let counter = |what: &str| family.counter(what);
        Metrics {
            picks: RefCell::new(HashMap::new()),
            rebuilds: counter("rebuilds"),
            set_updates: counter("set_updates"),
            panic_entered: counter("panic_entered"),
            panic_picks: counter("panic_picks"),
            spills: counter("spills"),
            no_host: counter("no_host"),
            keyless: counter("keyless"),
            cookies_set: counter("cookies_set"),
            shared_data_errors: counter("shared_data_errors"),
            breaker_avoided: counter("breaker_avoided"),
            endpoints: family.gauge("endpoints"),
            healthy: family.gauge("healthy_endpoints"),
            family,
        }
    }

    /// The pick counters of `picker`'s endpoints, in its order.
    fn pick_counters(&self, picker: &Picker) -> Vec<Counter> {
        let mut known = self.picks.borrow_mut();
        picker
            .endpoints()
            .iter()
            .map(|e| {
                if let Some(c) = known.get(&e.address) {
                    return *c;
                }
                if known.len() >= MAX_ENDPOINT_COUNTERS {
                    return Counter::default();
                }
                let c = self.family.counter(&format!("picks.{}", e.address));
                known.insert(e.address.clone(), c);
                c
            })
            .collect()
    }
}

/// A picker's mutable state in one worker.
struct Table {
    picker: Picker,
    mirror: Option<ServiceMirror>,
    /// Aligned with `picker.endpoints()`; tallied in the VM unless the host cannot tick.
    picks: Vec<Tally>,
    /// The shared-data key of each endpoint's breaker state (aligned likewise), when the
    /// picker follows a per-host breaker.
    breaker_keys: Vec<String>,
    /// The shared-data key of each endpoint's latency estimate (aligned likewise), for
    /// `peak_ewma`.
    latency_keys: Vec<String>,
    in_panic: bool,
    /// Whether "nothing published" was logged since the last good set.
    missing_logged: bool,
}

/// One configured picker with what the glue needs beside it.
struct Slot {
    config: PickerConfig,
    in_flight_key: String,
    /// Whether the pick reads and counts in-flight requests (bounded loads, least request).
    tracks_in_flight: bool,
    /// The parameters of `peak_ewma`: the pick reads the endpoints' latencies, the response
    /// records its round trip.
    peak_ewma: Option<PeakEwmaParams>,
    /// Headers of other pickers that this one does not set: removed when it applies.
    strip: Vec<String>,
    table: RefCell<Table>,
    metrics: Metrics,
}

impl Slot {
    fn new(config: PickerConfig, all_headers: &[String]) -> Slot {
        let metrics = Metrics::new(&config.name);
        let (picker, mirror) = match &config.source {
            EndpointSource::Static(endpoints) => (config.picker(endpoints), None),
            EndpointSource::Service(service) => {
                (config.picker(&[]), Some(ServiceMirror::new(service)))
            }
        };
        let own = [
            Some(config.target.header()),
            config.endpoint_header.as_deref(),
            config.hosts_header.as_deref(),
        ];
        let strip = all_headers
            .iter()
            .filter(|h| !own.contains(&Some(h.as_str())))
            .cloned()
            .collect();
        let mut table = Table {
            picks: Vec::new(),
            breaker_keys: Vec::new(),
            latency_keys: Vec::new(),
            in_panic: false,
            missing_logged: false,
            picker,
            mirror,
        };
        if table.mirror.is_none() {
            metrics.rebuilds.increment(1);
        }
        refresh_view(&metrics, &mut table, &config);
        Slot {
            in_flight_key: config.in_flight_key(),
            tracks_in_flight: config.options.balance_factor.is_some()
                || config.algorithm == Algorithm::LeastRequest,
            peak_ewma: match config.algorithm {
                Algorithm::PeakEwma(params) => Some(params),
                _ => None,
            },
            strip,
            table: RefCell::new(table),
            metrics,
            config,
        }
    }

    /// The endpoints (indexes of the picker's list) whose breaker refuses calls now: closed
    /// and probe-free half-open ones are not among them. One shared-data read per endpoint.
    fn breaker_open(&self, table: &Table) -> Vec<usize> {
        let Some(link) = &self.config.breaker else {
            return Vec::new();
        };
        let mut now = None;
        let mut open = Vec::new();
        for (i, key) in table.breaker_keys.iter().enumerate() {
            let state = match HostStore.get(key) {
                Ok(found) => found.map(|(bytes, _)| bytes),
                Err(_) => {
                    self.metrics.shared_data_errors.increment(1);
                    None
                }
            };
            let Some(state) = state else {
                continue;
            };
            let now = *now.get_or_insert_with(clock::now);
            if !steering(Some(&state), now, link.half_open_probes).pickable() {
                open.push(i);
            }
        }
        open
    }

    /// For a `service` source, applies a newly published set. Never rebuilds per request: one
    /// read of the version stamp when nothing changed.
    fn sync(&self, table: &mut Table) {
        let Table { picker, mirror, .. } = table;
        let Some(mirror) = mirror.as_mut() else {
            return;
        };
        match mirror.sync(&HostStore, picker) {
            MirrorOutcome::Current | MirrorOutcome::Unchanged => {}
            MirrorOutcome::Updated { version, rebuilt } => {
                let m = &self.metrics;
                m.set_updates.increment(1);
                m.rebuilds.increment(rebuilt as u64);
                table.missing_logged = false;
                refresh_view(m, table, &self.config);
                log::debug(
                    FILTER,
                    &format!(
                        "{}: endpoint set version {version} applied ({rebuilt} level(s) rebuilt)",
                        self.config.name
                    ),
                );
            }
            MirrorOutcome::Missing => {
                if !table.missing_logged {
                    table.missing_logged = true;
                    log::warn(
                        FILTER,
                        &format!(
                            "{}: no endpoint set published for service \"{}\" yet; answering 503 \
                             (is the discovery filter configured for it, with vm_id \"{}\"?)",
                            self.config.name,
                            mirror.service(),
                            keel_proxy::VM_ID
                        ),
                    );
                }
            }
            MirrorOutcome::Undecodable => log::warn(
                FILTER,
                &format!(
                    "{}: the endpoint set published for service \"{}\" does not decode (another \
                     layout version?); keeping the last endpoints",
                    self.config.name,
                    mirror.service()
                ),
            ),
        }
    }
}

/// Adds the picks counted in the VM to the host's counters.
fn flush_picks(table: &mut Table) {
    for tally in &table.picks {
        tally.flush();
    }
}

/// After the endpoints changed: per-endpoint counters, breaker keys, latency keys (created
/// before the endpoints' first requests), gauges, panic entry.
fn refresh_view(metrics: &Metrics, table: &mut Table, config: &PickerConfig) {
    let breaker = config.breaker.as_ref().map(|b| b.name.as_str());
    flush_picks(table);
    table.picks = metrics
        .pick_counters(&table.picker)
        .into_iter()
        .map(Tally::new)
        .collect();
    table.breaker_keys = match breaker {
        Some(name) => table
            .picker
            .endpoints()
            .iter()
            .map(|e| host_state_key(name, &e.address))
            .collect(),
        None => Vec::new(),
    };
    table.latency_keys = match config.algorithm {
        Algorithm::PeakEwma(_) => table
            .picker
            .endpoints()
            .iter()
            .map(|e| config.latency_key(&e.address))
            .collect(),
        _ => Vec::new(),
    };
    prepare_latencies(config, metrics, &table.latency_keys);
    let endpoints = table.picker.endpoints();
    metrics.endpoints.set(endpoints.len() as u64);
    metrics
        .healthy
        .set(endpoints.iter().filter(|e| e.healthy).count() as u64);
    let in_panic = table.picker.any_in_panic();
    if in_panic && !table.in_panic {
        metrics.panic_entered.increment(1);
    }
    table.in_panic = in_panic;
}

struct Filter {
    slots: Vec<Slot>,
    /// Whether any picker lists routes (else the route name is never read).
    reads_routes: bool,
    /// Every header some picker sets: removed on routes no picker covers.
    headers: Vec<String>,
    /// Whether picks are counted in the VM and flushed on the tick.
    batch_picks: bool,
}

struct PickerRoot {
    stage: Stage,
    rng: Rc<RefCell<SeededRng>>,
    filter: Option<Rc<Filter>>,
}

impl PickerRoot {
    fn new(stage: Stage) -> PickerRoot {
        // WASI randomness through std's hasher keys, mixed with the clock: sticky cookie values
        // and keyless picks differ between workers and restarts.
        PickerRoot {
            stage,
            rng: Rc::new(RefCell::new(SeededRng::new(random::seed(0)))),
            filter: None,
        }
    }
}

impl Context for PickerRoot {}

impl RootContext for PickerRoot {
    fn on_tick(&mut self) {
        if let Some(filter) = &self.filter {
            for slot in &filter.slots {
                flush_picks(&mut slot.table.borrow_mut());
            }
        }
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.stage.load(FILTER, config::load::<FilterConfig>) else {
            return false;
        };
        let mut headers: Vec<String> = Vec::new();
        for p in &config.pickers {
            for h in [
                Some(p.target.header()),
                p.endpoint_header.as_deref(),
                p.hosts_header.as_deref(),
            ]
            .into_iter()
            .flatten()
            {
                if !headers.iter().any(|known| known == h) {
                    headers.push(h.to_string());
                }
            }
        }
        let slots: Vec<Slot> = config
            .pickers
            .into_iter()
            .map(|p| Slot::new(p, &headers))
            .collect();
        for slot in &slots {
            if slot.tracks_in_flight {
                prepare_in_flight(slot);
            }
            if slot.table.borrow().mirror.is_some() {
                check_vm_id(&slot.config.name);
            }
        }
        let described: Vec<String> = slots.iter().map(describe).collect();
        log::info(
            FILTER,
            &format!("configured pickers: {}", described.join(", ")),
        );
        let batch_picks = self.stage.set_tick_period(FLUSH_PERIOD);
        self.filter = Some(Rc::new(Filter {
            reads_routes: routes::any_listed(&slots, |s| &s.config),
            slots,
            headers,
            batch_picks,
        }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let filter = self.filter.as_ref()?;
        Some(Box::new(PickerStream {
            filter: Rc::clone(filter),
            rng: Rc::clone(&self.rng),
            set_cookie: None,
            in_flight: None,
            round_trip: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// `users (ring, 3 static endpoints)`.
fn describe(slot: &Slot) -> String {
    let algorithm = match slot.config.algorithm {
        Algorithm::Ring(_) => "ring",
        Algorithm::Maglev(_) => "maglev",
        Algorithm::RoundRobin => "round_robin",
        Algorithm::Weighted => "weighted",
        Algorithm::LeastRequest => "least_request",
        Algorithm::PeakEwma(_) => "peak_ewma",
    };
    let source = match &slot.config.source {
        EndpointSource::Static(list) => format!("{} static endpoints", list.len()),
        EndpointSource::Service(s) => format!("service {s}"),
    };
    format!("{} ({algorithm}, {source})", slot.config.name)
}

/// Creates the in-flight table before traffic: Envoy's shared data cannot create a key "only
/// if absent", so only writes to an existing key are exact compare-and-swaps.
fn prepare_in_flight(slot: &Slot) {
    if store::ensure(&slot.in_flight_key, &InFlight::default().encode()).is_err() {
        log::warn(
            FILTER,
            &format!(
                "{}: could not create its in-flight table in shared data; loads are ignored \
                 until it can",
                slot.config.name
            ),
        );
    }
}

/// Creates each endpoint's latency value before its traffic (as [`prepare_in_flight`]); a key
/// that already exists (another worker's, or an endpoint that left and came back) is kept.
fn prepare_latencies(config: &PickerConfig, metrics: &Metrics, keys: &[String]) {
    let fresh = EndpointLatency::default().encode();
    let failed = keys
        .iter()
        .filter(|key| store::ensure(key, &fresh).is_err())
        .count();
    if failed > 0 {
        metrics.shared_data_errors.increment(failed as u64);
        log::warn(
            FILTER,
            &format!(
                "{}: could not create {failed} latency value(s) in shared data; those endpoints \
                 count as never measured until it can",
                config.name
            ),
        );
    }
}

/// Warns when the filter's `vm_id` is not the suite's: the discovery filter's sets would be
/// invisible. Hosts without the `plugin_vm_id` property are not checked.
fn check_vm_id(picker: &str) {
    if let Some(vm_id) = request::property_str(&["plugin_vm_id"]) {
        if vm_id != keel_proxy::VM_ID {
            log::warn(
                FILTER,
                &format!(
                    "{picker}: vm_id is \"{vm_id}\"; the discovery filter's endpoint sets are \
                     shared only between filters with the same vm_id (\"{}\")",
                    keel_proxy::VM_ID
                ),
            );
        }
    }
}

fn remove_request_header(name: &str) {
    request::remove_header(name);
}

struct PickerStream {
    filter: Rc<Filter>,
    rng: Rc<RefCell<SeededRng>>,
    /// A generated sticky cookie to set on the response.
    set_cookie: Option<String>,
    /// `(slot index, address)` counted in flight, to count out when the stream ends.
    in_flight: Option<(usize, String)>,
    /// A `peak_ewma` pick whose round trip is recorded at the response headers (or the
    /// stream's end, if no response came).
    round_trip: Option<RoundTrip>,
}

/// What a `peak_ewma` pick leaves for its response.
struct RoundTrip {
    slot: usize,
    /// The picked endpoint's latency key.
    key: String,
    /// When the pick was made: the round trip runs from here to the response headers.
    start: Instant,
    /// Whether the request was counted in flight (the update may have failed).
    counted: bool,
}

impl Context for PickerStream {}

impl HttpContext for PickerStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let filter = Rc::clone(&self.filter);
        let route = if filter.reads_routes {
            routing::route_name()
        } else {
            None
        };
        let Some((index, slot)) = routes::first(&filter.slots, route.as_deref(), |s| &s.config)
        else {
            // No picker here: a client must not route itself through the headers we set.
            for h in &filter.headers {
                remove_request_header(h);
            }
            return Action::Continue;
        };
        for h in &slot.strip {
            remove_request_header(h);
        }
        let mut table = slot.table.borrow_mut();
        slot.sync(&mut table);
        let rng = Rc::clone(&self.rng);
        let mut rng = rng.borrow_mut();
        let key = slot.config.request_key(request::key, &mut *rng);
        if key.hash.is_none() && !slot.config.key.is_empty() {
            slot.metrics.keyless.increment(1);
        }
        if key.set_cookie.is_some() {
            slot.metrics.cookies_set.increment(1);
        }
        self.set_cookie = key.set_cookie;
        let open = slot.breaker_open(&table);
        if !open.is_empty() {
            slot.metrics.breaker_avoided.increment(1);
        }
        let blocked = table.picker.block(&open);
        let pick = self.pick(index, slot, &mut table, key.hash, &mut rng);
        // The failover order for the retry filter, with the same hosts blocked (only when it
        // is handed on).
        let hand_off = slot.config.hosts_property || slot.config.hosts_header.is_some();
        let preference = match pick {
            Pick::Host(i) if hand_off => table.picker.preference(i, key.hash, MAX_HOSTS),
            _ => Vec::new(),
        };
        table.picker.unblock(blocked);
        let picked = match pick {
            Pick::Host(i) => table.picker.endpoints().get(i).map(|e| (i, e)),
            Pick::NoHost => None,
        };
        let Some((i, endpoint)) = picked else {
            slot.metrics.no_host.increment(1);
            // The request would otherwise reach the ORIGINAL_DST cluster with no (or the
            // client's) destination: answer as Envoy does when a cluster has no host.
            self.set_cookie = None;
            LocalReply {
                status: 503,
                headers: vec![
                    ("content-type".into(), "text/plain; charset=utf-8".into()),
                    ("x-keel-picker".into(), "no-host".into()),
                ],
                body: b"no healthy upstream\n".to_vec(),
            }
            .send();
            return Action::Pause;
        };
        request::set_header(
            slot.config.target.header(),
            slot.config.target.value(endpoint),
        );
        if hand_off {
            let endpoints = table.picker.endpoints();
            let hosts = encode_hosts(
                preference
                    .iter()
                    .filter_map(|&j| endpoints.get(j))
                    .map(|e| e.address.as_str()),
            );
            // The retry filter's hand-off (docs/config/picker.md): the stream's filter state,
            // unless configured off (no keel.retry follows the picker).
            if slot.config.hosts_property {
                request::set_property(&[HOSTS_PROPERTY], hosts.as_bytes());
            }
            // Envoy's override_host policy reads the same list from a request header.
            if let Some(h) = &slot.config.hosts_header {
                request::set_header(h, &hosts);
            }
        }
        if let Some(h) = &slot.config.endpoint_header {
            request::set_header(h, &endpoint.address);
        }
        if let Some(tally) = table.picks.get(i) {
            tally.count(1, filter.batch_picks);
        }
        if table.in_panic && table.picker.in_panic_at(i) {
            slot.metrics.panic_picks.increment(1);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(cookie) = self.set_cookie.take() {
            request::add_response_header("set-cookie", &cookie);
        }
        self.record_round_trip();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.record_round_trip();
        let Some((index, address)) = self.in_flight.take() else {
            return;
        };
        let Some(slot) = self.filter.slots.get(index) else {
            return;
        };
        if bounded::release(&HostStore, &slot.in_flight_key, &address, CAS_ATTEMPTS).is_err() {
            slot.metrics.shared_data_errors.increment(1);
        }
    }
}

impl PickerStream {
    /// Picks for this request; counts it in flight when the picker tracks loads.
    fn pick(
        &mut self,
        index: usize,
        slot: &Slot,
        table: &mut Table,
        hash: Option<u64>,
        rng: &mut SeededRng,
    ) -> Pick {
        if slot.peak_ewma.is_some() {
            return self.pick_by_latency(index, slot, table, rng);
        }
        if !slot.tracks_in_flight {
            return table.picker.pick(hash, &[], rng);
        }
        let picker = &mut table.picker;
        let (pick, acquired) = if slot.config.options.balance_factor.is_some() {
            // Bounded loads: read, pick and count in one compare-and-swap.
            let h = hash.unwrap_or_else(|| rng.next_u64());
            match bounded::pick_and_acquire(
                &HostStore,
                &slot.in_flight_key,
                picker,
                h,
                CAS_ATTEMPTS,
            ) {
                Ok(BoundedPick { pick, spilled }) => {
                    if spilled {
                        slot.metrics.spills.increment(1);
                    }
                    (pick, true)
                }
                Err(_) => {
                    slot.metrics.shared_data_errors.increment(1);
                    (picker.pick_hash(h, &[]), false)
                }
            }
        } else {
            // Least request: two choices by the loads read now; exactness is not needed.
            let loads = match HostStore.get(&slot.in_flight_key) {
                Ok(Some((bytes, _))) => InFlight::decode(&bytes)
                    .unwrap_or_default()
                    .loads(picker.endpoints().iter()),
                _ => Vec::new(),
            };
            let pick = picker.pick(hash, &loads, rng);
            let acquired = match pick {
                Pick::Host(i) => picker.endpoints().get(i).is_some_and(|e| {
                    bounded::acquire(&HostStore, &slot.in_flight_key, &e.address, CAS_ATTEMPTS)
                        .is_ok()
                }),
                Pick::NoHost => true,
            };
            if !acquired {
                slot.metrics.shared_data_errors.increment(1);
            }
            (pick, acquired)
        };
        if let (Pick::Host(i), true) = (pick, acquired) {
            if let Some(e) = picker.endpoints().get(i) {
                self.in_flight = Some((index, e.address.clone()));
            }
        }
        pick
    }

    /// Peak EWMA: the two drawn endpoints' latencies read from shared data (one read each; a
    /// failed read counts the endpoint as never measured, so the pick degrades to plain two
    /// choices), then the picked one counted in flight in one update.
    fn pick_by_latency(
        &mut self,
        index: usize,
        slot: &Slot,
        table: &mut Table,
        rng: &mut SeededRng,
    ) -> Pick {
        let now = clock::now();
        let keys = &table.latency_keys;
        let errors = &slot.metrics.shared_data_errors;
        let pick = table.picker.pick_by_latency(now, rng, |i| {
            let Some(key) = keys.get(i) else {
                return EndpointLatency::default();
            };
            match HostStore.get(key) {
                Ok(found) => found
                    .and_then(|(bytes, _)| EndpointLatency::decode(&bytes))
                    .unwrap_or_default(),
                Err(_) => {
                    errors.increment(1);
                    EndpointLatency::default()
                }
            }
        });
        if let Some(key) = match pick {
            Pick::Host(i) => keys.get(i),
            Pick::NoHost => None,
        } {
            let counted = store::update(key, errors, |old| {
                let mut e = old.and_then(EndpointLatency::decode).unwrap_or_default();
                e.in_flight = e.in_flight.saturating_add(1);
                (Some(e.encode()), ())
            })
            .is_ok();
            self.round_trip = Some(RoundTrip {
                slot: index,
                key: key.clone(),
                start: now,
                counted,
            });
        }
        pick
    }

    /// Records the round trip of a `peak_ewma` pick into its endpoint's estimate and counts
    /// it out of flight, once: at the response headers, or at the stream's end when no
    /// response came (a reset or timeout then counts with the time it took).
    fn record_round_trip(&mut self) {
        let Some(trip) = self.round_trip.take() else {
            return;
        };
        let Some(slot) = self.filter.slots.get(trip.slot) else {
            return;
        };
        let Some(params) = slot.peak_ewma else {
            return;
        };
        let now = clock::now();
        let rtt = now.saturating_since(trip.start);
        let errors = &slot.metrics.shared_data_errors;
        // A failed update was counted in `shared_data_errors`; the sample is lost.
        let _ = store::update(&trip.key, errors, |old| {
            let mut e = old.and_then(EndpointLatency::decode).unwrap_or_default();
            e.observe(&params, now, rtt);
            if trip.counted {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
            (Some(e.encode()), ())
        });
    }
}
