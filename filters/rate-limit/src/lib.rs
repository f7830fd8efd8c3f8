//! `keel_rate_limit.wasm`: token-bucket rate limiting (and GCRA, windows, leaky-bucket shaping)
//! per key and tier, exact across an Envoy process's worker threads.
//!
//! The glue is thin: it reads the route name and the request's key from the host, lets
//! `keel_core::limit` decide against the slot's state in shared data (compare-and-swap), and
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

use keel_core::limit::headers::{self, push_decimal};
use keel_core::limit::policy::{self, MissingKey, RateLimitPolicy, RateLimitSpec};
use keel_core::limit::{fingerprint, Decision, Limiter};
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::Counter;
use keel_proxy::reply::LocalReply;
use keel_proxy::routes::RouteMatch;
use keel_proxy::stage::Stage;
use keel_proxy::store::HostStore;
use keel_proxy::{clock, config, log, request, store, stream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "rate-limit";
/// How often a root context with parked requests wakes up to resume them.
const TICK: std::time::Duration = std::time::Duration::from_millis(5);
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
enum Count {
    Allowed = 0,
    Limited = 1,
    Delayed = 2,
    FailedOpen = 3,
}

/// The metric names of [`Count`], in its order.
const COUNTS: [&str; 4] = ["allowed", "limited", "delayed", "failed_open"];

/// How a policy names one of its limiters to a client, computed once.
struct Label {
    /// `policy` or `policy.tier`: the name in the `RateLimit` headers.
    name: String,
    /// The `RateLimit-Policy` value.
    policy: String,
}

/// A policy with what the glue needs beside it.
struct Policy {
    rules: RateLimitPolicy,
    routes: RouteMatch,
    prefix: String,
    /// One per limiter, by `RateLimitPolicy::limiter_index`.
    labels: Vec<Label>,
    counters: [Counter; 4],
    /// Counts not yet added to `counters`.
    pending: [Cell<u64>; 4],
}

impl Policy {
    fn new(rules: RateLimitPolicy) -> Policy {
        let metric = |what: &str| {
            let mut name = String::with_capacity(24 + rules.name.len());
            name.push_str("keel.rate_limit.");
            name.push_str(&rules.name);
            name.push('.');
            name.push_str(what);
            Counter::define(&name)
        };
        let labels = (0..rules.limiter_count())
            .map(|i| {
                let (tier, limiter) = rules.limiter_at(i);
                let mut name = rules.name.clone();
                if !tier.is_empty() {
                    name.push('.');
                    name.push_str(tier);
                }
                Label {
                    policy: headers::policy(&name, &limiter.rate()),
                    name,
                }
            })
            .collect();
        Policy {
            routes: RouteMatch::new(rules.routes.clone()),
            prefix: rules.key_prefix(),
            labels,
            counters: COUNTS.map(metric),
            pending: Default::default(),
            rules,
        }
    }

    /// Applies one request of `key` with the limiter at `index` to this policy's table. `None`
    /// when the shared data could not be updated: the policy fails open and counts it.
    fn acquire(
        &self,
        index: usize,
        key: &[u8],
        now: Instant,
        ticker: &Ticker,
    ) -> Option<(Decision, &Limiter)> {
        let (tier, limiter) = self.rules.limiter_at(index);
        // The tier is part of the key: a client that changes plan starts a fresh bucket. The NUL
        // separator cannot appear in a header value.
        let mut joined = Vec::with_capacity(tier.len() + 1 + key.len());
        joined.extend_from_slice(tier.as_bytes());
        joined.push(0);
        joined.extend_from_slice(key);
        let fp = fingerprint(&joined);
        let decision = self.rules.table.acquire_fingerprint(
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
            Ok(decision) => Some((decision, limiter)),
            Err(_) => {
                self.count(Count::FailedOpen, ticker);
                None
            }
        }
    }

    /// Counts one `what`, to be added to the host's counter by the next tick (at once on a
    /// host without ticks).
    fn count(&self, what: Count, ticker: &Ticker) {
        let cell = &self.pending[what as usize];
        cell.set(cell.get().saturating_add(1));
        if !ticker.flush_soon() {
            self.flush();
        }
    }

    /// Adds the pending counts to the host's counters; whether there were any.
    fn flush(&self) -> bool {
        let mut any = false;
        for (cell, counter) in self.pending.iter().zip(&self.counters) {
            let n = cell.take();
            if n > 0 {
                counter.increment(n);
                any = true;
            }
        }
        any
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
    /// The host refused a tick period.
    Unavailable,
}

/// The root context's tick and the requests waiting for it, shared with its streams. It
/// outlives a reconfiguration: requests parked under the old policies are still resumed.
#[derive(Default)]
struct Ticker {
    /// What runs the filter: it sets the tick and resumes parked requests.
    stage: Stage,
    period: Cell<Period>,
    parked: RefCell<Vec<(u32, Instant)>>,
}

impl Ticker {
    /// Makes sure a tick comes to flush counts; false when the host has no ticks.
    fn flush_soon(&self) -> bool {
        match self.period.get() {
            Period::Flush | Period::Park => true,
            Period::Unavailable => false,
            Period::Off => self.set(Period::Flush),
        }
    }

    /// Sets the tick `period`; false (and `Unavailable`) when the host refuses.
    fn set(&self, period: Period) -> bool {
        let every = match period {
            Period::Flush => FLUSH,
            Period::Park => TICK,
            Period::Off | Period::Unavailable => std::time::Duration::ZERO,
        };
        let set = self.stage.set_tick_period(every);
        self.period
            .set(if set { period } else { Period::Unavailable });
        set
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
struct Policies {
    list: Vec<Policy>,
    /// Whether any policy lists routes: only then is the route name read.
    by_route: bool,
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
}

impl Context for RateLimitRoot {
    fn on_done(&mut self) -> bool {
        self.policies.flush();
        true
    }
}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(rules) = self.stage.load(FILTER, |bytes| {
            policy::validate(&config::parse::<RateLimitSpec>(bytes)?)
        }) else {
            return false;
        };
        let list: Vec<Policy> = rules.into_iter().map(Policy::new).collect();
        let by_route = list.iter().any(|p| p.rules.routes.is_some());
        let replaced = std::mem::replace(&mut self.policies, Rc::new(Policies { list, by_route }));
        replaced.flush();
        if Rc::strong_count(&replaced) > 1 {
            self.retired.push(replaced);
        }
        // Create every slot before traffic: Envoy's shared data cannot create a key "only if
        // absent", so only writes to existing slots are exact compare-and-swaps.
        let mut names = String::new();
        for policy in &self.policies.list {
            let name = &policy.rules.name;
            if let Err(e) = policy.rules.table.prepare(&HostStore, &policy.prefix) {
                log::warn(FILTER, &format!("policy {name}: could not create its slots in shared data ({e:?}); limits may be approximate"));
            }
            if !names.is_empty() {
                names.push_str(", ");
            }
            names.push_str(name);
        }
        names.insert_str(0, "configured policies: ");
        log::info(FILTER, &names);
        true
    }

    fn on_tick(&mut self) {
        let mut flushed = self.policies.flush();
        self.retired.retain(|old| {
            flushed |= old.flush();
            Rc::strong_count(old) > 1
        });
        let ticker = &self.ticker;
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
            if stream::switch_to(context) {
                ticker.stage.resume_request(context);
            }
        }
        // Tick while there is something to do: parked requests, or counts coming in (a tick
        // that found none stops the ticks until the next count).
        let next = if waiting {
            Period::Park
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
            context_id,
            policies: Rc::clone(&self.policies),
            ticker: Rc::clone(&self.ticker),
            response_headers: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The `RateLimit` headers one policy owes the response, formatted only when it comes.
struct Owed {
    policy: usize,
    label: usize,
    remaining: u64,
    reset: Duration,
}

struct RateLimitStream {
    context_id: u32,
    policies: Rc<Policies>,
    ticker: Rc<Ticker>,
    /// One per applied policy that sends `RateLimit` headers.
    response_headers: Vec<Owed>,
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let now = clock::now();
        let policies = Rc::clone(&self.policies);
        let ticker = &*self.ticker;
        // Reading a property is one of the dearer host calls: only when a policy needs it.
        let route = if policies.by_route {
            request::route_name()
        } else {
            None
        };
        let mut delay = Duration::ZERO;
        for (at, policy) in policies.list.iter().enumerate() {
            if !policy.routes.matches(route.as_deref()) {
                continue;
            }
            let rules = &policy.rules;
            let key = match request::key(&rules.key) {
                Some(key) => key,
                None => match rules.missing_key {
                    MissingKey::Allow => continue,
                    // One shared bucket for every keyless request; the NUL cannot come from a
                    // header value, so no client can name this bucket.
                    MissingKey::Shared => b"\0missing".to_vec(),
                    MissingKey::Deny => {
                        policy.count(Count::Limited, ticker);
                        deny(policy, None);
                        return Action::Pause;
                    }
                },
            };
            let index = match &rules.tiers {
                Some(tiers) => rules.limiter_index(request::key(&tiers.selector).as_deref()),
                None => 0,
            };
            let Some((decision, limiter)) = policy.acquire(index, &key, now, ticker) else {
                continue;
            };
            let (remaining, reset) = match decision {
                Decision::Allow { remaining, reset } => {
                    policy.count(Count::Allowed, ticker);
                    (remaining, reset)
                }
                Decision::Delay { wait, reset } => {
                    policy.count(Count::Delayed, ticker);
                    delay = delay.max(wait);
                    (0, reset)
                }
                Decision::Deny { retry_after, reset } => {
                    policy.count(Count::Limited, ticker);
                    let label = policy.label(index);
                    deny(policy, Some((label, limiter, retry_after, reset)));
                    return Action::Pause;
                }
            };
            if rules.response_headers {
                self.response_headers.push(Owed {
                    policy: at,
                    label: index,
                    remaining,
                    reset,
                });
            }
        }
        if delay.is_zero() {
            return Action::Continue;
        }
        if !ticker.park(self.context_id, now.saturating_add(delay)) {
            log::warn(
                FILTER,
                "the host cannot set a tick period; not delaying the request",
            );
            return Action::Continue;
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        for owed in &self.response_headers {
            let Some(label) = self
                .policies
                .list
                .get(owed.policy)
                .and_then(|p| p.label(owed.label))
            else {
                continue;
            };
            request::add_response_header("ratelimit-policy", &label.policy);
            request::add_response_header(
                "ratelimit",
                &rate_limit(&label.name, owed.remaining, owed.reset),
            );
        }
        Action::Continue
    }
}

/// The `RateLimit` value of `label`: [`headers::remaining`].
fn rate_limit(label: &str, remaining: u64, reset: Duration) -> String {
    headers::remaining(label, remaining, reset)
}

/// Sends the policy's refusal. `limit` is absent when the request was refused for having no key.
fn deny(policy: &Policy, limit: Option<(Option<&Label>, &Limiter, Duration, Duration)>) {
    let reply = &policy.rules.deny;
    let mut headers_out: Vec<(String, String)> = Vec::with_capacity(4 + reply.headers.len());
    headers_out.push((
        "content-type".to_string(),
        "text/plain; charset=utf-8".to_string(),
    ));
    if let Some((label, limiter, retry_after, reset)) = limit {
        let mut seconds = String::new();
        push_decimal(&mut seconds, headers::retry_after_secs(retry_after));
        headers_out.push(("retry-after".into(), seconds));
        let (name, policy_value) = match label {
            Some(label) => (label.name.as_str(), label.policy.clone()),
            None => (
                policy.rules.name.as_str(),
                headers::policy(&policy.rules.name, &limiter.rate()),
            ),
        };
        headers_out.push(("ratelimit-policy".into(), policy_value));
        headers_out.push(("ratelimit".into(), rate_limit(name, 0, reset)));
    }
    headers_out.extend(reply.headers.iter().cloned());
    LocalReply {
        status: reply.status,
        headers: headers_out,
        body: reply.body.as_bytes().to_vec(),
    }
    .send();
}
