//! `keel_adaptive.wasm`: adaptive protection. Adaptive concurrency limits (Envoy's gradient
//! controller or AIMD) and success-rate throttling (Google SRE client-side throttling), each
//! exact across an Envoy process's worker threads.
//!
//! Why a filter of its own rather than a policy kind of the rate limiter: both mechanisms
//! measure *every* request's response (its round-trip time from request headers to response
//! headers, its status) and keep counts that a response must give back (requests in flight),
//! where the limiter only decides at the request and never looks at the response. Their state
//! is not a per-key bucket but one shared controller per scope (route, cluster or global). A
//! separate filter keeps both small, lets an operator place it where latency should be
//! measured (after retries, before the router), and lets it change without touching the
//! limiter.
//!
//! The glue is thin: it reads the time, the route or cluster, and later the status, and lets
//! `keel_core::adaptive` decide against the scope's state in shared data (compare-and-swap).
//! Over the limit (or drawn to be throttled) the request gets the policy's refusal, `503` with
//! `retry-after` by default. Configuration reference: `docs/config/adaptive.md`.
//!
//! A response counts for the controller only when it came from an upstream (Envoy's
//! `upstream.address` is set): a local reply of a later filter is neither a latency sample nor a
//! drop. A stream that ends without response headers (reset, timeout) is a drop.
//!
//! Host capabilities: shared data (required: limits would be per worker without it).

use std::cell::RefCell;
use std::rc::Rc;

use keel_core::adaptive::policy::{AdaptivePolicy, Kind, Scope};
use keel_core::adaptive::{Admission, LimitState, Outcome, ThrottleState};
use keel_core::rand::{Rng, SeededRng};
use keel_core::routes::Routed;
use keel_core::time::Instant;
use keel_proxy::metrics::{Counter, Family, Gauge};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::{clock, log, response, routing, store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "adaptive";

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline.
pub fn stage(context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(AdaptiveRoot {
        context_id,
        stage,
        policies: Rc::new(Vec::new()),
        rng: Rc::new(RefCell::new(SeededRng::new(u64::from(context_id)))),
    })
}

/// The filter as an Envoy filter of its own: what `keel_adaptive.wasm`, and `keel.wasm` for
/// root_id `adaptive`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// A policy with its metrics.
struct Policy {
    rules: AdaptivePolicy,
    /// `keel/adaptive/<policy>/`.
    prefix: String,
    allowed: Counter,
    rejected: Counter,
    failed_open: Counter,
    /// The concurrency limit, or the throttling probability in thousandths.
    level: Gauge,
    /// Requests in flight (concurrency), as last seen.
    in_flight: Gauge,
    /// The minimum RTT estimate in µs (gradient).
    min_rtt: Gauge,
}

impl Policy {
    fn new(rules: AdaptivePolicy) -> Policy {
        let family = Family::new(FILTER, &rules.name);
        let level = match rules.kind {
            Kind::Concurrency(_) => "limit",
            Kind::Throttle(_) => "rejection_permille",
        };
        Policy {
            prefix: format!("keel/adaptive/{}/", rules.name),
            allowed: family.counter("allowed"),
            rejected: family.counter("rejected"),
            failed_open: family.counter("failed_open"),
            level: family.gauge(level),
            in_flight: family.gauge("in_flight"),
            min_rtt: family.gauge("min_rtt_us"),
            rules,
        }
    }

    /// Sets the gauges to the shared state's values.
    fn report(&self, level: u64, in_flight: u64, min_rtt_us: u64) {
        self.level.set(level);
        if matches!(self.rules.kind, Kind::Concurrency(_)) {
            self.in_flight.set(in_flight);
            self.min_rtt.set(min_rtt_us);
        }
    }

    fn report_limit(&self, state: &LimitState) {
        self.report(
            u64::from(state.limit),
            u64::from(state.in_flight),
            state.min_rtt.as_nanos() / 1_000,
        );
    }

    /// After a completion: the in-flight count always (the last completion leaves the true
    /// count, whichever worker made it); the limit and the minimum RTT when this completion
    /// changed them (the worker that changes a value writes it, so the gauge follows the
    /// shared state without a host call per request on every worker).
    fn report_completion(&self, before: &LimitState, after: &LimitState) {
        self.in_flight.set(u64::from(after.in_flight));
        if before.limit != after.limit {
            self.level.set(u64::from(after.limit));
        }
        if before.min_rtt != after.min_rtt {
            self.min_rtt.set(after.min_rtt.as_nanos() / 1_000);
        }
    }
}

struct AdaptiveRoot {
    context_id: u32,
    stage: Stage,
    policies: Rc<Vec<Policy>>,
    rng: Rc<RefCell<SeededRng>>,
}

impl Context for AdaptiveRoot {}

impl RootContext for AdaptiveRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(rules) = self
            .stage
            .load(FILTER, keel_core::config::load::<Vec<AdaptivePolicy>>)
        else {
            return false;
        };
        // Each worker draws its own sequence: seeded by the time and the root context.
        let seed = clock::now().as_nanos() ^ (u64::from(self.context_id) << 48);
        self.rng = Rc::new(RefCell::new(SeededRng::new(seed)));
        let names: Vec<&str> = rules.iter().map(|p| p.name.as_str()).collect();
        log::info(
            FILTER,
            &format!("configured policies: {}", names.join(", ")),
        );
        self.policies = Rc::new(rules.into_iter().map(Policy::new).collect());
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AdaptiveStream {
            policies: Rc::clone(&self.policies),
            rng: Rc::clone(&self.rng),
            admitted: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A request this stream holds a place for: the policy, its shared-data key, when it started.
struct Held {
    policy: usize,
    key: String,
    start: Instant,
}

struct AdaptiveStream {
    policies: Rc<Vec<Policy>>,
    rng: Rc<RefCell<SeededRng>>,
    admitted: Vec<Held>,
}

impl Context for AdaptiveStream {}

/// The scope's value of the current request.
fn scope_value(scope: Scope, route: &Option<String>) -> String {
    match scope {
        Scope::Route => route.clone().unwrap_or_default(),
        Scope::Cluster => routing::cluster_name().unwrap_or_default(),
        Scope::Global => String::new(),
    }
}

impl AdaptiveStream {
    /// Completes every held request with `outcome` at `now`.
    fn complete_all(&mut self, now: Instant, outcome: impl Fn() -> Outcome) {
        let held = std::mem::take(&mut self.admitted);
        if held.is_empty() {
            return;
        }
        let outcome = outcome();
        for h in held {
            let Some(policy) = self.policies.get(h.policy) else {
                continue;
            };
            let rtt = now.saturating_since(h.start);
            match &policy.rules.kind {
                Kind::Concurrency(controller) => {
                    let done = store::update(&h.key, &policy.failed_open, |old| {
                        let before = old
                            .and_then(LimitState::decode)
                            .unwrap_or_else(|| LimitState::new(controller, now));
                        let mut after = before.clone();
                        after.complete(controller, now, rtt, outcome);
                        (Some(after.encode()), (before, after))
                    });
                    if let Ok((before, after)) = done {
                        policy.report_completion(&before, &after);
                    }
                }
                Kind::Throttle(params) => {
                    if outcome == Outcome::Success {
                        let _ = store::update(&h.key, &policy.failed_open, |old| {
                            let mut state = old.and_then(ThrottleState::decode).unwrap_or_default();
                            state.accept(params, now);
                            (Some(state.encode()), ())
                        });
                    }
                }
            }
        }
    }
}

impl HttpContext for AdaptiveStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let policies = Rc::clone(&self.policies);
        let needs_route = policies
            .iter()
            .any(|p| p.rules.routes.is_some() || p.rules.scope == Scope::Route);
        let route = if needs_route {
            routing::route_name()
        } else {
            None
        };
        let now = clock::now();
        for (at, policy) in policies.iter().enumerate() {
            if !policy.rules.applies_to(route.as_deref()) {
                continue;
            }
            let mut key = policy.prefix.clone();
            key.push_str(&scope_value(policy.rules.scope, &route));
            let refused = match &policy.rules.kind {
                Kind::Concurrency(controller) => {
                    let decided = store::update(&key, &policy.failed_open, |old| {
                        let created = old.is_none();
                        let mut state = old
                            .and_then(LimitState::decode)
                            .unwrap_or_else(|| LimitState::new(controller, now));
                        match state.admit() {
                            // A refusal changes nothing: no write (half the host calls).
                            Admission::Reject { .. } => (None, (true, created, state)),
                            Admission::Allow { .. } => {
                                (Some(state.encode()), (false, created, state))
                            }
                        }
                    });
                    match decided {
                        Ok((refused, created, state)) => {
                            if created {
                                policy.report_limit(&state);
                            }
                            refused
                        }
                        // Contended or refused by the host: fail open, counted.
                        Err(_) => continue,
                    }
                }
                Kind::Throttle(params) => {
                    let draw = match self.rng.try_borrow_mut() {
                        Ok(mut rng) => rng.unit_f64(),
                        Err(_) => 1.0,
                    };
                    let decided = store::update(&key, &policy.failed_open, |old| {
                        let mut state = old.and_then(ThrottleState::decode).unwrap_or_default();
                        let decision = state.request(params, now, draw);
                        (Some(state.encode()), decision)
                    });
                    match decided {
                        Ok((refused, probability)) => {
                            policy.report((probability * 1000.0) as u64, 0, 0);
                            refused
                        }
                        Err(_) => continue,
                    }
                }
            };
            if refused {
                policy.rejected.increment(1);
                // Places taken by earlier policies of this request are given back unused.
                self.complete_all(now, || Outcome::Ignored);
                deny(policy);
                return Action::Pause;
            }
            policy.allowed.increment(1);
            self.admitted.push(Held {
                policy: at,
                key,
                start: now,
            });
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.admitted.is_empty() {
            return Action::Continue;
        }
        let now = clock::now();
        self.complete_all(now, || {
            // A local reply of a later filter has no upstream: it says nothing of the upstream.
            if routing::upstream_address().is_none() {
                return Outcome::Ignored;
            }
            match response::status() {
                Some(status) if status < 500 => Outcome::Success,
                _ => Outcome::Dropped,
            }
        });
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream ended without response headers: reset, timeout, or the client left.
        if !self.admitted.is_empty() {
            self.complete_all(clock::now(), || Outcome::Dropped);
        }
    }
}

/// Sends the policy's refusal.
fn deny(policy: &Policy) {
    let retry_after = policy.rules.retry_after.as_secs_ceil().max(1).to_string();
    let what = match policy.rules.kind {
        Kind::Concurrency(_) => "concurrency limit reached",
        Kind::Throttle(_) => "throttled: upstream success rate too low",
    };
    LocalReply {
        status: policy.rules.deny_status,
        headers: vec![
            ("retry-after".to_string(), retry_after),
            (
                "content-type".to_string(),
                "text/plain; charset=utf-8".to_string(),
            ),
            ("x-keel-adaptive".to_string(), policy.rules.name.clone()),
        ],
        body: format!("{what}\n").into_bytes(),
    }
    .send();
}
