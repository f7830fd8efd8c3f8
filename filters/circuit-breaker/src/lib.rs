//! `keel_circuit_breaker.wasm`: a closed / open / half-open circuit breaker over a sliding
//! window, one state per policy, cluster or host, shared by every worker of the Envoy process,
//! answering locally (or with the last good response) while open.
//!
//! The glue is thin: `keel_core::circuit_breaker` decides everything against the breaker's state in
//! shared data (compare-and-swap); this file reads the route, the scope's key, the status and
//! Envoy's response flags from the host and translates decisions into a continue, a local
//! reply, metrics and one log line per transition. Configuration reference:
//! `docs/config/circuit-breaker.md`.
//!
//! Per request on a closed breaker: at request headers one shared-data read (no write, no
//! clock unless slow calls are tracked); at response headers the status, one clock read, one
//! compare-and-swap of the window (a write with the version the request read: a second read
//! only when another stream wrote in between, see `keel_proxy::store::Remembered`) and one
//! counter. The route name, the cluster, the method and the fallback key are read only when a
//! configured feature needs them; Envoy's response flags only for a `5xx` or a stream without
//! response headers.
//!
//! Host capabilities: shared data (required: without it each worker would have its own
//! breaker, and the filter fails open, counting `store_errors`), `send_http_response`, the
//! `response.flags` property (without it an Envoy-made `503`/`504` counts by its status), the
//! `xds.route_name` / `xds.cluster_name` properties for `routes`, the fallback and
//! `scope: "cluster"`. No ticks and no callouts: half-open begins lazily with the first request
//! after the open period.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use keel_core::circuit_breaker::steer::JUDGED_HOST_PROPERTY;
use keel_core::circuit_breaker::{
    Admission, BreakerPolicy, BreakerState, Breakers, FallbackPolicy, Mode, Outcome, Phase,
    ProbeTicket, Reply, Response, Scope, Transition,
};
use keel_core::config;
use keel_core::routes;
use keel_core::store::SharedStore;
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::{Counter, Family, Gauge};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::update_in as update;
use keel_proxy::store::{HostStore, Primed};
use keel_proxy::{clock, log, request, response, routing, store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "circuit_breaker";

/// Values of the `state` gauges.
const STATE_FORCED_OPEN: u64 = 3;
const STATE_DISABLED: u64 = 4;

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline (root_id `pipeline` in
/// `keel.wasm`).
pub fn stage(_context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(BreakerRoot {
        stage,
        ..BreakerRoot::default()
    })
}

/// The filter as an Envoy filter of its own: what its module `keel_circuit_breaker.wasm`, and `keel.wasm`
/// for root_id `circuit_breaker`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// The metrics of one breaker policy: `keel.circuit_breaker.<name>.<what>`.
struct Metrics {
    state: Gauge,
    open: Gauge,
    calls: Counter,
    failures: Counter,
    slow_calls: Counter,
    rejected: Counter,
    probes: Counter,
    fallback_served: Counter,
    opened: Counter,
    half_opened: Counter,
    closed: Counter,
    would_reject: Counter,
    unguarded: Counter,
    store_errors: Counter,
}

impl Metrics {
    fn new(name: &str) -> Metrics {
        let family = Family::new(FILTER, name);
        let counter = |what: &str| family.counter(what);
        let gauge = |what: &str| family.gauge(what);
        Metrics {
            state: gauge("state"),
            open: gauge("open"),
            calls: counter("calls"),
            failures: counter("failures"),
            slow_calls: counter("slow_calls"),
            rejected: counter("rejected"),
            probes: counter("probes"),
            fallback_served: counter("fallback_served"),
            opened: counter("opened"),
            half_opened: counter("half_opened"),
            closed: counter("closed"),
            would_reject: counter("would_reject"),
            unguarded: counter("unguarded"),
            store_errors: counter("store_errors"),
        }
    }
}

/// A policy with what the glue keeps beside it.
struct Breaker {
    policy: BreakerPolicy,
    metrics: Metrics,
    /// The shared-data key of scope `policy` (computed once: it is the same for every request).
    policy_key: Option<String>,
    /// The cluster or host instances this worker guards, at most `max_instances`.
    instances: RefCell<HashSet<String>>,
    /// `state` gauges of the instances this worker has seen change.
    instance_gauges: RefCell<HashMap<String, Gauge>>,
    /// Whether this worker already said why some requests pass unguarded: instance unknown,
    /// instances full.
    warned_unguarded: [Cell<bool>; 2],
}

/// Why a request passes without a breaker.
enum Unguarded {
    /// The scope's cluster or host is not known at admission.
    Unknown,
    /// The worker already tracks `max_instances` instances.
    Full,
}

impl Breaker {
    fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            metrics: Metrics::new(policy.name()),
            policy_key: policy.state_key(None, None),
            instances: RefCell::new(HashSet::new()),
            instance_gauges: RefCell::new(HashMap::new()),
            warned_unguarded: [Cell::new(false), Cell::new(false)],
            policy,
        }
    }

    /// The instance of this request (its cluster or host, `None` for scope `policy`) and the
    /// shared-data key of its state.
    /// The key is `None` for scope `policy`: it is [`Breaker::policy_key`] (not copied per
    /// request).
    fn instance(&self) -> Result<(Option<String>, Option<String>), Unguarded> {
        let (cluster, host) = match self.policy.scope() {
            Scope::Policy => {
                return match self.policy_key {
                    Some(_) => Ok((None, None)),
                    None => Err(Unguarded::Unknown),
                };
            }
            Scope::Cluster => (routing::cluster_name(), None),
            Scope::Host => (None, routing::original_dst_host()),
        };
        let key = self
            .policy
            .state_key(cluster.as_deref(), host.as_deref())
            .ok_or(Unguarded::Unknown)?;
        let instance = cluster.or(host).ok_or(Unguarded::Unknown)?;
        let mut known = self.instances.borrow_mut();
        if !known.contains(&instance) {
            // Shared data never forgets a key, and a host may come from a request header:
            // state is created for a bounded number of instances only.
            if known.len() >= self.policy.max_instances() as usize {
                return Err(Unguarded::Full);
            }
            known.insert(instance.clone());
        }
        Ok((Some(instance), Some(key)))
    }

    /// The shared-data key of a call's state: its own, or the policy's.
    fn key<'a>(&'a self, own: &'a Option<String>) -> Option<&'a str> {
        own.as_deref().or(self.policy_key.as_deref())
    }

    /// Counts, logs and shows one transition (reported exactly once in the process: by the
    /// worker whose write made it).
    fn report(&self, instance: Option<&str>, t: &Transition) {
        let m = &self.metrics;
        match t.to {
            Phase::Open => m.opened.increment(1),
            Phase::HalfOpen => m.half_opened.increment(1),
            Phase::Closed => m.closed.increment(1),
        }
        match (t.from, t.to) {
            (Phase::Closed, _) => m.open.add(1),
            (_, Phase::Closed) => m.open.add(-1),
            _ => {}
        }
        let code = phase_code(t.to);
        let name = self.policy.name();
        let label = match instance {
            None => {
                m.state.set(code);
                format!("breaker {name}")
            }
            Some(instance) => {
                self.instance_gauge(instance).set(code);
                format!("breaker {name} ({} {instance})", self.policy.scope())
            }
        };
        let line = format!("{label}: {t}");
        if t.to == Phase::Open {
            log::warn(FILTER, &line);
        } else {
            log::info(FILTER, &line);
        }
    }

    /// `keel.circuit_breaker.<name>.<scope>.<instance>.state`, the instance sanitised to
    /// `[A-Za-z0-9_-]` (dots and colons would split Envoy's stat name).
    fn instance_gauge(&self, instance: &str) -> Gauge {
        let mut gauges = self.instance_gauges.borrow_mut();
        if let Some(g) = gauges.get(instance) {
            return *g;
        }
        let clean: String = instance
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let gauge = Family::new(FILTER, self.policy.name())
            .gauge(&format!("{}.{clean}.state", self.policy.scope()));
        gauges.insert(instance.to_string(), gauge);
        gauge
    }

    fn warn_unguarded(&self, reason: Unguarded) {
        self.metrics.unguarded.increment(1);
        let warned = match reason {
            Unguarded::Unknown => &self.warned_unguarded[0],
            Unguarded::Full => &self.warned_unguarded[1],
        };
        if warned.replace(true) {
            return;
        }
        let name = self.policy.name();
        let why = match (reason, self.policy.scope()) {
            (Unguarded::Full, scope) => format!(
                "this worker already guards max_instances ({}) {scope} instances",
                self.policy.max_instances()
            ),
            (Unguarded::Unknown, Scope::Host) => format!(
                "scope \"host\" needs the upstream host before routing (the {} request header, set by Keel's picker placed before the breaker)",
                routing::ORIGINAL_DST_HOST
            ),
            (Unguarded::Unknown, _) => "scope \"cluster\" needs the route's cluster (xds.cluster_name); a route without one (direct_response) has none".to_string(),
        };
        log::warn(
            FILTER,
            &format!("breaker {name}: {why}; such requests pass unguarded (counted in unguarded)"),
        );
    }
}

/// The `state` gauge's value of a phase: 0 closed, 1 open, 2 half-open.
fn phase_code(phase: Phase) -> u64 {
    match phase {
        Phase::Closed => 0,
        Phase::Open => 1,
        Phase::HalfOpen => 2,
    }
}

#[derive(Default)]
struct BreakerRoot {
    stage: Stage,
    breakers: Rc<Vec<Breaker>>,
    /// Whether a request's route name must be read: some breaker lists routes or keeps
    /// fallbacks (keyed by route).
    needs_route: bool,
}

impl Context for BreakerRoot {}

impl RootContext for BreakerRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(breakers) = self.stage.load(FILTER, config::load::<Breakers>) else {
            return false;
        };
        let now = clock::now();
        let breakers: Vec<Breaker> = breakers
            .policies()
            .iter()
            .cloned()
            .map(Breaker::new)
            .collect();
        for b in &breakers {
            prepare(b, now);
        }
        self.needs_route = routes::any_listed(&breakers, |b| &b.policy)
            || breakers.iter().any(|b| b.policy.fallback().is_some());
        let names: Vec<&str> = breakers.iter().map(|b| b.policy.name()).collect();
        log::info(
            FILTER,
            &format!("configured breakers: {}", names.join(", ")),
        );
        self.breakers = Rc::new(breakers);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BreakerStream {
            breakers: Rc::clone(&self.breakers),
            needs_route: self.needs_route,
            call: None,
            rejected: false,
            keep: None,
            capture: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Creates a scope-`policy` breaker's state before traffic (Envoy's shared data has no "create
/// if absent": only writes over an existing value are exact compare-and-swaps), and shows the
/// current state in the gauges.
fn prepare(b: &Breaker, now: Instant) {
    let m = &b.metrics;
    match b.policy.mode() {
        Mode::ForcedOpen => return m.state.set(STATE_FORCED_OPEN),
        Mode::Disabled => return m.state.set(STATE_DISABLED),
        Mode::Normal | Mode::MetricsOnly => {}
    }
    // Only scope `policy` has one key known in advance.
    let Some(key) = &b.policy_key else {
        return;
    };
    match HostStore.get(key) {
        Ok(Some((bytes, _))) => {
            let phase = BreakerState::decode(&bytes).map_or(Phase::Closed, |s| s.phase());
            m.state.set(phase_code(phase));
            m.open.set(u64::from(phase != Phase::Closed));
        }
        Ok(None) => {
            if store::ensure(key, &b.policy.initial_state(now)).is_err() {
                log::warn(
                    FILTER,
                    &format!("breaker {}: could not create its state in shared data; the breaker fails open", b.policy.name()),
                );
            }
            m.state.set(0);
            m.open.set(0);
        }
        Err(_) => log::warn(
            FILTER,
            &format!(
                "breaker {}: the host's shared data is unavailable; the breaker fails open",
                b.policy.name()
            ),
        ),
    }
}

/// A call the breaker admitted.
struct Call {
    breaker: usize,
    instance: Option<String>,
    /// The state's key, `None` for the policy's ([`Breaker::key`]).
    key: Option<String>,
    ticket: Option<ProbeTicket>,
    /// When it was admitted; read only when slow calls are tracked (else zero).
    started: Instant,
    /// Its outcome is in the window (or was dropped): nothing more to record.
    recorded: bool,
    /// The state as admission read it (with its version), when admission wrote nothing: the
    /// outcome's update starts from it instead of reading the state again ([`keel_proxy::store::Primed`]).
    read: Option<(Vec<u8>, u32)>,
}

/// Admission of one request against the state at `key`: the decision, and the state as read
/// (with its version) when admission wrote nothing, for the outcome's update to start from
/// ([`Primed`]). `None` when the state could not be read or updated (counted in
/// `store_errors`): the breaker fails open.
///
/// The common case (a closed breaker) is one read and no write. A decision that writes (a
/// transition, a probe permit) goes through the compare-and-swap loop, whose first attempt
/// starts from the state just read: the same decision the loop would have made from it.
/// The breaker's state as read from shared data, with its version.
type StateRead = Option<(Vec<u8>, u32)>;

fn admit(
    b: &Breaker,
    key: &str,
    clock_read: &mut Option<Instant>,
) -> Option<(keel_core::circuit_breaker::Decision, StateRead)> {
    let policy = &b.policy;
    let first = match HostStore.get(key) {
        Ok(first) => first,
        Err(_) => {
            b.metrics.store_errors.increment(1);
            return None;
        }
    };
    let (write, decision) = policy.admit_with(first.as_ref().map(|(v, _)| v.as_slice()), || {
        *clock_read.get_or_insert_with(clock::now)
    });
    if write.is_none() {
        return Some((decision, first));
    }
    let primed = Primed::new(first);
    update(&primed, key, &b.metrics.store_errors, |s| {
        policy.admit_with(s, || *clock_read.get_or_insert_with(clock::now))
    })
    .ok()
    .map(|decision| (decision, None))
}

/// Where a good `GET` response would be kept: its route and key.
struct Keep {
    route: String,
    key: String,
}

/// A good response being copied for the fallback cache.
struct Capture {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct BreakerStream {
    breakers: Rc<Vec<Breaker>>,
    needs_route: bool,
    call: Option<Call>,
    /// The breaker answered this request itself; its own reply is not an outcome.
    rejected: bool,
    keep: Option<Keep>,
    capture: Option<Capture>,
}

impl Context for BreakerStream {}

impl HttpContext for BreakerStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let route = if self.needs_route {
            routing::route_name()
        } else {
            None
        };
        let breakers = Rc::clone(&self.breakers);
        let Some((index, b)) = routes::first(&breakers, route.as_deref(), |b| &b.policy) else {
            return Action::Continue;
        };
        let route = route.as_deref().unwrap_or("");
        if b.policy.mode() == Mode::Disabled {
            return Action::Continue;
        }
        let (instance, key) = match b.instance() {
            Ok(found) => found,
            Err(reason) => {
                b.warn_unguarded(reason);
                return Action::Continue;
            }
        };
        let policy = &b.policy;
        let Some(state_key) = b.key(&key) else {
            return Action::Continue;
        };
        // A closed breaker admits without the time: one host call fewer per request.
        let mut clock_read = None;
        let Some((decision, read)) = admit(b, state_key, &mut clock_read) else {
            // Failing open: a breaker that cannot read its state must not take the route down.
            return Action::Continue;
        };
        if let Some(t) = &decision.transition {
            b.report(instance.as_deref(), t);
        }
        if decision.would_reject {
            b.metrics.would_reject.increment(1);
        }
        let ticket = match decision.admission {
            Admission::Allow => None,
            Admission::Probe(ticket) => {
                b.metrics.probes.increment(1);
                Some(ticket)
            }
            Admission::Reject { retry_after } => {
                b.metrics.rejected.increment(1);
                self.rejected = true;
                // A rejection of `forced_open` did not need the time; the fallback's age does.
                let now = clock_read.unwrap_or_else(clock::now);
                reject(b, route, retry_after, now);
                return Action::Pause;
            }
        };
        if policy.scope() == Scope::Host {
            if let Some(host) = &instance {
                // This breaker judges the host by this call: discovery's passive ejection
                // leaves it out, so one failure is counted once (docs/operations.md).
                request::set_property(&[JUDGED_HOST_PROPERTY], host.as_bytes());
            }
        }
        // The start time matters only to tell slow calls.
        let started = match clock_read {
            Some(now) => now,
            None if policy.failure().slow_after().is_some() => clock::now(),
            None => Instant::ZERO,
        };
        self.call = Some(Call {
            breaker: index,
            instance,
            key,
            ticket,
            started,
            recorded: false,
            read,
        });
        if let Some(fallback) = policy.fallback() {
            self.keep = fallback_key(fallback).map(|key| Keep {
                route: route.to_string(),
                key,
            });
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.rejected || self.call.is_none() {
            return Action::Continue;
        }
        let status = response::status();
        // Envoy's own answers for an upstream that gave none are 503 and 504: the flags are
        // read only for server errors, so a good response costs no property read.
        let flags = if status.is_none_or(|s| s >= 500) {
            response::flags().unwrap_or(0)
        } else {
            0
        };
        self.record(Response::from_envoy(status, flags));
        if let Some(status) = status {
            self.start_capture(status, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let max = self.fallback().map_or(0, |f| f.max_body_bytes() as usize);
        let Some(capture) = &mut self.capture else {
            return Action::Continue;
        };
        if capture.body.len().saturating_add(body_size) > max {
            // Over the cap: not kept, and nothing more is copied.
            self.capture = None;
            return Action::Continue;
        }
        let chunk = response::body(body_size);
        if chunk.len() != body_size {
            // The host did not lend the whole chunk: a partial body must never be replayed.
            self.capture = None;
            return Action::Continue;
        }
        capture.body.extend_from_slice(&chunk);
        if end_of_stream {
            self.store_capture();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.store_capture();
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream ended without response headers: the upstream gave no answer, or the
        // client left first (flag `DC`: a probe then gives its permit back).
        if self.call.as_ref().is_some_and(|c| !c.recorded) {
            self.record(Response::from_envoy(None, response::flags().unwrap_or(0)));
        }
    }
}

impl BreakerStream {
    fn breaker(&self) -> Option<&Breaker> {
        self.breakers.get(self.call.as_ref()?.breaker)
    }

    fn fallback(&self) -> Option<&FallbackPolicy> {
        self.breaker()?.policy.fallback()
    }

    /// Classifies and records the outcome of the admitted call, once.
    fn record(&mut self, response: Response) {
        let Some(call) = self.call.as_mut().filter(|c| !c.recorded) else {
            return;
        };
        call.recorded = true;
        let Some(b) = self.breakers.get(call.breaker) else {
            return;
        };
        let now = clock::now();
        let policy = &b.policy;
        let outcome = policy
            .failure()
            .classify(response, now.saturating_since(call.started));
        if outcome != Outcome::Ignored {
            b.metrics.calls.increment(1);
            if outcome.is_failure() {
                b.metrics.failures.increment(1);
            }
            if outcome.is_slow() {
                b.metrics.slow_calls.increment(1);
            }
        }
        let ticket = call.ticket;
        let Some(key) = b.key(&call.key) else {
            return;
        };
        let primed = Primed::new(call.read.take());
        let recorded = update(&primed, key, &b.metrics.store_errors, |s| {
            policy.record(s, now, outcome, ticket)
        });
        if let Ok(Some(t)) = recorded {
            b.report(call.instance.as_deref(), &t);
        }
    }

    /// Starts copying a response worth keeping for the fallback (a good `GET` within the cap).
    fn start_capture(&mut self, status: u16, end_of_stream: bool) {
        if self.keep.is_none() {
            return;
        }
        let Some(fallback) = self.fallback() else {
            return;
        };
        if !fallback.keeps("GET", status, response::content_length()) {
            return;
        }
        // A header that is not UTF-8 cannot be replayed from the cache's text layout.
        let headers = response::headers()
            .into_iter()
            .filter_map(|(name, value)| String::from_utf8(value).ok().map(|v| (name, v)))
            .collect();
        self.capture = Some(Capture {
            status,
            headers,
            body: Vec::new(),
        });
        if end_of_stream {
            self.store_capture();
        }
    }

    /// Writes the copied response to its fallback slot (last writer wins: it is a cache).
    fn store_capture(&mut self) {
        let Some(capture) = self.capture.take() else {
            return;
        };
        let (Some(keep), Some(b)) = (&self.keep, self.breaker()) else {
            return;
        };
        let Some(fallback) = b.policy.fallback() else {
            return;
        };
        let Some(entry) = fallback.entry(
            &keep.route,
            &keep.key,
            capture.status,
            capture.headers,
            &capture.body,
            clock::now(),
        ) else {
            return;
        };
        let slot = fallback.slot_key(b.policy.name(), &keep.route, &keep.key);
        if HostStore.set(&slot, &entry.encode(), None).is_err() {
            b.metrics.store_errors.increment(1);
        }
    }
}

/// The fallback key of the current request: `None` unless it is a `GET` that carries the key
/// (UTF-8, as the cache stores it).
fn fallback_key(fallback: &FallbackPolicy) -> Option<String> {
    let method = request::header(":method")?;
    if !fallback.serves(std::str::from_utf8(&method).ok()?) {
        return None;
    }
    String::from_utf8(request::key(fallback.key())?).ok()
}

/// Answers a refused request: the last good response for its route and key when the fallback
/// has a fresh one, else the open reply. The upstream receives nothing.
fn reject(b: &Breaker, route: &str, retry_after: Option<Duration>, now: Instant) {
    let reply = match fallback_reply(b, route, now) {
        Some(reply) => {
            b.metrics.fallback_served.increment(1);
            reply
        }
        None => b.policy.open_reply(retry_after),
    };
    LocalReply {
        status: u32::from(reply.status),
        headers: reply.headers,
        body: reply.body,
    }
    .send();
}

fn fallback_reply(b: &Breaker, route: &str, now: Instant) -> Option<Reply> {
    let fallback = b.policy.fallback()?;
    let key = fallback_key(fallback)?;
    let slot = fallback.slot_key(b.policy.name(), route, &key);
    let (stored, _) = HostStore.get(&slot).ok().flatten()?;
    let entry = fallback.lookup(&stored, route, &key, now)?;
    Some(b.policy.fallback_reply(&entry, now))
}
