//! `keel_rate_limit.wasm`: token-bucket rate limiting (and GCRA, windows, leaky-bucket shaping)
//! per key and tier, exact across an Envoy process's worker threads.
//!
//! The glue is thin: it reads the route name and the request's key from the host, lets
//! `keel_core::rate_limit` decide against the slot's state in shared data (compare-and-swap), and
//! turns the decision into a continue, a 429, or a request parked until the root context's tick
//! resumes it. Configuration reference: `docs/config/rate-limit.md`.
//!
//! Host calls are what a request costs in Envoy (each crosses the VM boundary), so an admitted
//! request makes only the ones its decision needs: the time, the key's header (the route name
//! only when a policy lists routes), the slot's read and compare-and-swap write, and the two
//! `RateLimit` response headers when they are on. Counters are not written per request: each
//! policy tallies them in the VM and the root context's tick adds the tallies to the host's
//! counters every [`FLUSH`] (the tick runs only while there is something to flush or a request
//! to resume). Everything a policy's headers and metrics need is computed when the
//! configuration loads.
//!
//! Host capabilities: shared data (required: limits would be per worker without it), ticks and
//! `set_effective_context` (for `shaping`; without them a parked request would wait forever,
//! so the request is let through with a warning on a host that cannot set a tick period).
//! Without ticks, counters are written to the host per request instead.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

mod fleet;

use keel_core::config;
use keel_core::rate_limit::policy::RateLimitPolicy;
use keel_core::rate_limit::request::{
    bucket_key, refusal, tier_fingerprint, BucketKey, Label, Refused,
};
use keel_core::rate_limit::{Decision, Limiter};
use keel_core::routes::{self, Routed};
use keel_core::store::SharedStore;
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::{Family, Gauge, Tally};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::HostStore;
use keel_proxy::{clock, log, request, store, stream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

pub(crate) const FILTER: &str = "rate_limit";
/// How often a root context with parked requests wakes up to resume them.
pub(crate) const TICK: std::time::Duration = std::time::Duration::from_millis(5);
/// How long a counted request may wait before its count reaches the host's counters.
const FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline (root_id `pipeline` in
/// `keel.wasm`).
pub fn stage(_context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(RateLimitRoot {
        ticker: Rc::new(Ticker {
            stage: stage.clone(),
            ..Ticker::default()
        }),
        stage,
        ..RateLimitRoot::default()
    })
}

/// The filter as an Envoy filter of its own: what its module `keel_rate_limit.wasm`, and `keel.wasm`
/// for root_id `rate_limit`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// What a policy counts: `keel.rate_limit.<policy>.<what>`.
#[derive(Clone, Copy)]
pub(crate) enum Count {
    Allowed = 0,
    Limited = 1,
    Delayed = 2,
    FailedOpen = 3,
}

/// The metric names of [`Count`], in its order.
const COUNTS: [&str; 4] = ["allowed", "limited", "delayed", "failed_open"];

/// A policy with what the glue needs beside it.
pub(crate) struct Policy {
    pub(crate) rules: RateLimitPolicy,
    pub(crate) prefix: String,
    /// A fleet-wide policy's glue.
    pub(crate) fleet: Option<fleet::FleetGlue>,
    /// One per limiter, by `RateLimitPolicy::limiter_index`.
    labels: Vec<Label>,
    /// Tallied in the VM, added to the host's counters on the tick.
    counts: [Tally; 4],
}

impl Policy {
    fn new(rules: RateLimitPolicy) -> Policy {
        let family = Family::new(FILTER, &rules.name);
        let metric = |what: &str| Tally::new(family.counter(what));
        let labels = Label::all(&rules);
        let fleet = rules.fleet.clone().map(|limit| {
            let limiters: Vec<&Limiter> = (0..rules.limiter_count())
                .map(|i| rules.limiter_at(i).1)
                .collect();
            fleet::FleetGlue::new(limit, &limiters, &rules.name)
        });
        Policy {
            prefix: rules.key_prefix(),
            fleet,
            labels,
            counts: COUNTS.map(metric),
            rules,
        }
    }

    /// The fingerprint of `key`'s bucket under the limiter at `index`.
    fn fingerprint(&self, index: usize, key: &[u8]) -> u64 {
        let (tier, _) = self.rules.limiter_at(index);
        tier_fingerprint(tier, key)
    }

    /// Applies one request of `key` with the limiter at `index` to this policy's table. `None`
    /// when the shared data could not be updated: the policy fails open and counts it.
    fn acquire(&self, index: usize, key: &[u8], now: Instant, ticker: &Ticker) -> Option<Decision> {
        let (_, limiter) = self.rules.limiter_at(index);
        let fp = self.fingerprint(index, key);
        let decision = self.rules.table.acquire(
            &HostStore,
            &self.prefix,
            limiter,
            fp,
            now,
            1,
            self.rules.max_delay,
            store::CAS_ATTEMPTS,
        );
        match decision {
            Ok(decision) => Some(decision),
            Err(_) => {
                self.count(Count::FailedOpen, ticker);
                None
            }
        }
    }

    /// Counts one `what`, to be added to the host's counter by the next tick (at once on a
    /// host without ticks).
    pub(crate) fn count(&self, what: Count, ticker: &Ticker) {
        self.counts[what as usize].add(1);
        if !ticker.flush_soon() {
            self.flush();
        }
    }

    /// Adds the pending counts to the host's counters; whether there were any.
    fn flush(&self) -> bool {
        self.counts
            .iter()
            .fold(false, |any, tally| tally.flush() | any)
    }

    /// The label of the limiter at `index`.
    fn label(&self, index: usize) -> Option<&Label> {
        self.labels.get(index)
    }
}

/// What the root context's tick is set to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Period {
    /// No tick.
    #[default]
    Off,
    /// Every [`FLUSH`]: counts to flush.
    Flush,
    /// Every [`TICK`]: requests parked.
    Park,
    /// Every refill period of the fleet-wide policies: the refresher's tick.
    Fleet,
    /// The host refused a tick period.
    Unavailable,
}

/// The root context's tick and the requests waiting for it, shared with its streams. It
/// outlives a reconfiguration: requests parked under the old policies are still resumed.
#[derive(Default)]
pub(crate) struct Ticker {
    /// What runs the filter: it sets the tick and resumes parked requests.
    pub(crate) stage: Stage,
    period: Cell<Period>,
    parked: RefCell<Vec<(u32, Instant)>>,
    /// The refill period of the fleet-wide policies, if any.
    fleet_every: Cell<Option<Duration>>,
    /// This VM's calls to the fleet store and the requests waiting for them.
    pub(crate) fleet: fleet::FleetVm,
}

impl Ticker {
    /// Makes sure a tick comes to flush counts; false when the host has no ticks.
    fn flush_soon(&self) -> bool {
        match self.period.get() {
            Period::Flush | Period::Park | Period::Fleet => true,
            Period::Unavailable => false,
            Period::Off => self.set(Period::Flush),
        }
    }

    /// Sets the tick `period`; false (and `Unavailable`) when the host refuses.
    fn set(&self, period: Period) -> bool {
        let every = match period {
            Period::Flush => FLUSH,
            Period::Park => TICK,
            Period::Fleet => self
                .fleet_every
                .get()
                .map(|d| std::time::Duration::from_nanos(d.as_nanos()))
                .unwrap_or(FLUSH),
            Period::Off | Period::Unavailable => std::time::Duration::ZERO,
        };
        let set = self.stage.set_tick_period(every);
        self.period
            .set(if set { period } else { Period::Unavailable });
        set
    }

    /// Makes the tick run every [`TICK`] (requests wait); false when the host has no ticks.
    pub(crate) fn wake(&self) -> bool {
        self.period.get() == Period::Park || self.set(Period::Park)
    }

    /// Parks stream `context` until `until`; false when the host cannot tick to resume it.
    fn park(&self, context: u32, until: Instant) -> bool {
        if self.period.get() != Period::Park && !self.set(Period::Park) {
            return false;
        }
        match self.parked.try_borrow_mut() {
            Ok(mut parked) => {
                parked.push((context, until));
                true
            }
            Err(_) => false,
        }
    }
}

/// The validated configuration with what the glue computed from it.
#[derive(Default)]
pub(crate) struct Policies {
    pub(crate) list: Vec<Policy>,
    /// Whether any policy lists routes: only then is the route name read.
    by_route: bool,
    /// The shortest refill period of the lease-mode fleet-wide policies.
    pub(crate) fleet_refill: Option<Duration>,
}

impl Policies {
    fn flush(&self) -> bool {
        self.list.iter().fold(false, |any, p| p.flush() | any)
    }
}

#[derive(Default)]
struct RateLimitRoot {
    stage: Stage,
    policies: Rc<Policies>,
    /// Configurations replaced while streams still hold them: their late counts are flushed
    /// too, until the last of those streams is gone.
    retired: Vec<Rc<Policies>>,
    ticker: Rc<Ticker>,
    /// The policies as configured, with the percentage of its rate each runs at (100 but for
    /// adaptive policies) and an adaptive policy's `rate_percent` gauge.
    configured: Vec<(RateLimitPolicy, u8, Option<Gauge>)>,
}

impl RateLimitRoot {
    /// Puts `rules` in force: the streams that hold the replaced policies keep them (their late
    /// counts are flushed while they last). Returns the fleet refill period, if any.
    fn install(&mut self, rules: Vec<RateLimitPolicy>) -> Option<Duration> {
        let list: Vec<Policy> = rules.into_iter().map(Policy::new).collect();
        let by_route = routes::any_listed(&list, |p| &p.rules);
        let fleet_refill = list
            .iter()
            .filter_map(|p| p.fleet.as_ref())
            .filter(|f| f.limit.mode == keel_core::rate_limit::fleet::FleetMode::Lease)
            .map(|f| f.limit.refill)
            .min();
        let replaced = std::mem::replace(
            &mut self.policies,
            Rc::new(Policies {
                list,
                by_route,
                fleet_refill,
            }),
        );
        replaced.flush();
        if Rc::strong_count(&replaced) > 1 {
            self.retired.push(replaced);
        }
        fleet_refill
    }

    /// Reads each adaptive policy's signal (the adaptive filter's success-rate counts in shared
    /// data) and, when a policy's percentage changed, puts the policies back in force at their
    /// new rates. No signal, or a read the host refuses, is the full rate.
    fn adapt(&mut self) {
        let mut changed = false;
        for (rules, percent, gauge) in self.configured.iter_mut() {
            let Some(adaptive) = &rules.adaptive else {
                continue;
            };
            let signal = HostStore.get(&adaptive.signal_key()).ok().flatten();
            let now = adaptive.percent(signal.as_ref().map(|(bytes, _)| bytes.as_slice()));
            if now == *percent {
                continue;
            }
            if (now == 100) != (*percent == 100) {
                let line = if now == 100 {
                    format!("policy {}: back at its configured rate", rules.name)
                } else {
                    format!(
                        "policy {}: at {now}% of its configured rate (success rate of adaptive policy {} below {})",
                        rules.name, adaptive.policy, adaptive.target
                    )
                };
                log::info(FILTER, &line);
            }
            *percent = now;
            if let Some(gauge) = gauge {
                gauge.set(u64::from(now));
            }
            changed = true;
        }
        if changed {
            let rules = self
                .configured
                .iter()
                .map(|(rules, percent, _)| rules.at_percent(*percent))
                .collect();
            self.install(rules);
        }
    }
}

impl Context for RateLimitRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        fleet::answer(&self.ticker, token_id, num_headers, body_size);
    }

    fn on_done(&mut self) -> bool {
        self.policies.flush();
        true
    }
}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(rules) = self
            .stage
            .load(FILTER, config::load::<Vec<RateLimitPolicy>>)
        else {
            return false;
        };
        self.configured = rules
            .iter()
            .map(|r| {
                let gauge = r.adaptive.as_ref().map(|_| {
                    let gauge = Family::new(FILTER, &r.name).gauge("rate_percent");
                    gauge.set(100);
                    gauge
                });
                (r.clone(), 100, gauge)
            })
            .collect();
        let fleet_refill = self.install(rules);
        self.adapt();
        // Create every slot before traffic: Envoy's shared data cannot create a key "only if
        // absent", so only writes to existing slots are exact compare-and-swaps.
        let mut names = String::new();
        for policy in &self.policies.list {
            let name = &policy.rules.name;
            if let Err(e) = policy.rules.table.prepare(&HostStore, &policy.prefix) {
                log::warn(FILTER, &format!("policy {name}: could not create its slots in shared data ({e:?}); limits may be approximate"));
            }
            if policy.fleet.is_some() {
                let table = &policy.rules.table;
                if let Err(e) = keel_core::rate_limit::fleet::process::prepare(
                    &HostStore,
                    &policy.prefix,
                    table,
                ) {
                    log::warn(FILTER, &format!("policy {name}: could not create its lease slots in shared data ({e:?}); limits may be approximate"));
                }
            }
            if !names.is_empty() {
                names.push_str(", ");
            }
            names.push_str(name);
        }
        names.insert_str(0, "configured policies: ");
        log::info(FILTER, &names);
        if fleet_refill.is_some() {
            // The refresher's election, created before the first tick (as discovery's poller
            // lease): two VMs taking an absent key at once would both win it.
            if let Err(e) = store::ensure(fleet::REFRESHER_KEY, &[]) {
                log::warn(FILTER, &format!("could not create the refresher's lease in shared data ({e:?}); two VMs may refresh at first"));
            }
        }
        self.ticker.fleet_every.set(fleet_refill);
        if fleet_refill.is_some() && self.ticker.period.get() != Period::Park {
            self.ticker.set(Period::Fleet);
        }
        true
    }

    fn on_tick(&mut self) {
        self.adapt();
        let mut flushed = self.policies.flush();
        self.retired.retain(|old| {
            flushed |= old.flush();
            Rc::strong_count(old) > 1
        });
        let ticker = &self.ticker;
        if ticker.fleet_every.get().is_some() || ticker.fleet.has_waiters() {
            fleet::tick(ticker, &self.policies, clock::now());
        }
        // Never borrowed elsewhere during a tick; were it, the parked requests wait a tick.
        let Ok(mut parked) = ticker.parked.try_borrow_mut() else {
            return;
        };
        let mut due = Vec::new();
        if !parked.is_empty() {
            let now = clock::now();
            parked.retain(|(context, resume_at)| {
                if *resume_at > now {
                    return true;
                }
                due.push(*context);
                false
            });
        }
        let waiting = !parked.is_empty();
        drop(parked);
        // Resumed once the list is let go: in a pipeline, resuming runs the later stages.
        for context in due {
            // A stream that ended while parked is gone: the host refuses to switch to it.
            ticker.stage.resume_request(context);
        }
        // Tick while there is something to do: parked requests, or counts coming in (a tick
        // that found none stops the ticks until the next count).
        let next = if waiting || ticker.fleet.has_waiters() {
            Period::Park
        } else if ticker.fleet_every.get().is_some() {
            Period::Fleet
        } else if flushed {
            Period::Flush
        } else {
            Period::Off
        };
        if next != ticker.period.get() {
            ticker.set(next);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimitStream {
            flow: Rc::new(Flow {
                context_id,
                policies: Rc::clone(&self.policies),
                response_headers: Cell::new(None),
                more_response_headers: RefCell::new(Vec::new()),
                delay: Cell::new(Duration::ZERO),
            }),
            ticker: Rc::clone(&self.ticker),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The `RateLimit` headers one policy owes the response, formatted only when it comes.
#[derive(Clone, Copy)]
struct Owed {
    policy: usize,
    label: usize,
    remaining: u64,
    reset: Duration,
}

/// One request's way through the policies, shared by its stream and, while it waits for the
/// fleet store, the root context's tick and the store's answer.
pub(crate) struct Flow {
    context_id: u32,
    pub(crate) policies: Rc<Policies>,
    /// One per applied policy that sends `RateLimit` headers: the first in place (no
    /// allocation for the usual one policy), the others after it.
    response_headers: Cell<Option<Owed>>,
    more_response_headers: RefCell<Vec<Owed>>,
    /// The longest shaping delay owed so far.
    delay: Cell<Duration>,
}

impl Flow {
    fn owe(&self, at: usize, index: usize, remaining: u64, reset: Duration) {
        let sends = self
            .policies
            .list
            .get(at)
            .is_some_and(|p| p.rules.response_headers);
        if !sends {
            return;
        }
        let owed = Owed {
            policy: at,
            label: index,
            remaining,
            reset,
        };
        if self.response_headers.get().is_none() {
            self.response_headers.set(Some(owed));
        } else if let Ok(mut more) = self.more_response_headers.try_borrow_mut() {
            more.push(owed);
        }
    }
}

/// Where a request stands after the policies from some index on.
pub(crate) enum Step {
    /// Every policy let it through: go on.
    Continue,
    /// Refused (the reply is sent), held by shaping, or waiting for the fleet store.
    Pause,
}

/// Applies the policies from `from` on to the request of `flow` (the effective context).
fn run(flow: &Rc<Flow>, ticker: &Ticker, from: usize) -> Step {
    let now = clock::now();
    let policies = Rc::clone(&flow.policies);
    // Reading a property is one of the dearer host calls: only when a policy needs it.
    let route = if policies.by_route {
        request::route_name()
    } else {
        None
    };
    for (at, policy) in policies.list.iter().enumerate().skip(from) {
        if !policy.rules.applies_to(route.as_deref()) {
            continue;
        }
        let rules = &policy.rules;
        let key = match bucket_key(request::key(&rules.key), rules.missing_key) {
            BucketKey::Key(key) => key,
            BucketKey::Skip => continue,
            BucketKey::Refuse => {
                policy.count(Count::Limited, ticker);
                deny(policy, None);
                return Step::Pause;
            }
        };
        let index = match &rules.tiers {
            Some(tiers) => rules.limiter_index(request::key(&tiers.selector).as_deref()),
            None => 0,
        };
        if policy.fleet.is_some() {
            let fp = policy.fingerprint(index, &key);
            match fleet::decide(&policies, at, index, fp, flow, ticker, now) {
                fleet::FleetStep::Wait => return Step::Pause,
                step => {
                    if settle(flow, ticker, at, index, step) {
                        continue;
                    }
                    return Step::Pause;
                }
            }
        }
        let Some(decision) = policy.acquire(index, &key, now, ticker) else {
            continue;
        };
        let (remaining, reset) = match decision {
            Decision::Allow { remaining, reset } => {
                policy.count(Count::Allowed, ticker);
                (remaining, reset)
            }
            Decision::Delay { wait, reset } => {
                policy.count(Count::Delayed, ticker);
                flow.delay.set(flow.delay.get().max(wait));
                (0, reset)
            }
            Decision::Deny { retry_after, reset } => {
                policy.count(Count::Limited, ticker);
                deny_at(policy, index, retry_after, reset);
                return Step::Pause;
            }
        };
        flow.owe(at, index, remaining, reset);
    }
    let delay = flow.delay.replace(Duration::ZERO);
    if delay.is_zero() {
        return Step::Continue;
    }
    if !ticker.park(flow.context_id, now.saturating_add(delay)) {
        log::warn(
            FILTER,
            "the host cannot set a tick period; not delaying the request",
        );
        return Step::Continue;
    }
    Step::Pause
}

/// Counts a fleet-wide policy's decision and owes its headers or sends its refusal; whether
/// the request goes on.
fn settle(flow: &Flow, ticker: &Ticker, at: usize, index: usize, step: fleet::FleetStep) -> bool {
    let Some(policy) = flow.policies.list.get(at) else {
        return true;
    };
    match step {
        fleet::FleetStep::Admit { remaining, reset } => {
            policy.count(Count::Allowed, ticker);
            flow.owe(at, index, remaining, reset);
            true
        }
        fleet::FleetStep::Deny { retry_after, reset } => {
            policy.count(Count::Limited, ticker);
            deny_at(policy, index, retry_after, reset);
            false
        }
        fleet::FleetStep::Wait => false,
    }
}

/// A request that waited for the fleet store got its answer (`step`) for the policy at `at`:
/// the policies after it run, and the request goes on if they all let it.
pub(crate) fn resolve(
    flow: &Rc<Flow>,
    ticker: &Ticker,
    at: usize,
    index: usize,
    step: fleet::FleetStep,
) {
    // A stream that ended while waiting is gone: the host refuses to switch to it.
    if !stream::switch_to(flow.context_id) {
        return;
    }
    if !settle(flow, ticker, at, index, step) {
        return;
    }
    if let Step::Continue = run(flow, ticker, at + 1) {
        ticker.stage.resume_request(flow.context_id);
    }
}

struct RateLimitStream {
    flow: Rc<Flow>,
    ticker: Rc<Ticker>,
}

impl Context for RateLimitStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        fleet::answer(&self.ticker, token_id, num_headers, body_size);
    }
}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match run(&self.flow, &self.ticker, 0) {
            Step::Continue => Action::Continue,
            Step::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(first) = self.flow.response_headers.get() else {
            return Action::Continue;
        };
        // Empty (no allocation) unless several policies owe headers.
        let more = self
            .flow
            .more_response_headers
            .try_borrow()
            .map(|more| more.clone())
            .unwrap_or_default();
        for owed in std::iter::once(first).chain(more) {
            let Some(label) = self
                .flow
                .policies
                .list
                .get(owed.policy)
                .and_then(|p| p.label(owed.label))
            else {
                continue;
            };
            for (name, value) in label.response_headers(owed.remaining, owed.reset) {
                request::add_response_header(name, &value);
            }
        }
        Action::Continue
    }
}

/// Sends the refusal of the limiter at `index` of `policy`.
fn deny_at(policy: &Policy, index: usize, retry_after: Duration, reset: Duration) {
    let computed;
    let label = match policy.label(index) {
        Some(label) => label,
        None => {
            computed = Label::of(&policy.rules, index);
            &computed
        }
    };
    deny(
        policy,
        Some(Refused {
            label,
            retry_after,
            reset,
        }),
    );
}

/// Sends the policy's refusal. `limit` is absent when the request was refused for having no key.
fn deny(policy: &Policy, limit: Option<Refused<'_>>) {
    let reply = refusal(&policy.rules.deny, limit);
    LocalReply {
        status: u32::from(reply.status),
        headers: reply.headers,
        body: reply.body,
    }
    .send();
}
