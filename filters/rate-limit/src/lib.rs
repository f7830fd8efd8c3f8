//! `keel_rate_limit.wasm`: token-bucket rate limiting (and GCRA, windows, leaky-bucket shaping)
//! per key and tier, exact across an Envoy process's worker threads.
//!
//! The glue is thin: it reads the route name and the request's key from the host, lets
//! `keel_core::limit` decide against the slot's state in shared data (compare-and-swap), and
//! turns the decision into a continue, a 429, or a request parked until the root context's tick
//! resumes it. Configuration reference: `docs/config/rate-limit.md`.
//!
//! Host capabilities: shared data (required: limits would be per worker without it), ticks and
//! `set_effective_context` (only for `shaping`; without them a parked request would wait forever,
//! so shaping is refused at configuration time on a host that cannot set a tick period).

use std::cell::RefCell;
use std::rc::Rc;

use keel_core::limit::policy::{self, MissingKey, RateLimitPolicy, RateLimitSpec};
use keel_core::limit::{headers, Decision, Limiter};
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::Counter;
use keel_proxy::reply::LocalReply;
use keel_proxy::routes::RouteMatch;
use keel_proxy::store::HostStore;
use keel_proxy::{clock, config, log, request, store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

const FILTER: &str = "rate-limit";
/// How often a root context with parked requests wakes up to resume them.
const TICK: std::time::Duration = std::time::Duration::from_millis(5);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RateLimitRoot::default()) });
}}

/// A policy with what the glue needs beside it.
struct Policy {
    rules: RateLimitPolicy,
    routes: RouteMatch,
    prefix: String,
    allowed: Counter,
    limited: Counter,
    delayed: Counter,
    failed_open: Counter,
}

impl Policy {
    fn new(rules: RateLimitPolicy) -> Policy {
        let metric =
            |what: &str| Counter::define(&format!("keel.rate_limit.{}.{what}", rules.name));
        Policy {
            routes: RouteMatch::new(rules.routes.clone()),
            prefix: rules.key_prefix(),
            allowed: metric("allowed"),
            limited: metric("limited"),
            delayed: metric("delayed"),
            failed_open: metric("failed_open"),
            rules,
        }
    }

    /// Applies one request of `key` in `tier` to this policy's table. `None` when the shared
    /// data could not be updated: the policy fails open and counts it.
    fn acquire(&self, limiter: &Limiter, tier: &str, key: &[u8], now: Instant) -> Option<Decision> {
        // The tier is part of the key: a client that changes plan starts a fresh bucket. The NUL
        // separator cannot appear in a header value.
        let key = [tier.as_bytes(), b"\0", key].concat();
        let rules = &self.rules;
        let decision = rules.table.acquire(
            &HostStore,
            &self.prefix,
            limiter,
            &key,
            now,
            1,
            rules.max_delay,
            store::CAS_ATTEMPTS,
        );
        if decision.is_err() {
            self.failed_open.increment(1);
        }
        decision.ok()
    }
}

#[derive(Default)]
struct RateLimitRoot {
    policies: Rc<Vec<Policy>>,
    parked: Rc<RefCell<Vec<(u32, Instant)>>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(rules) = config::load(FILTER, |bytes| {
            policy::validate(&config::parse::<RateLimitSpec>(bytes)?)
        }) else {
            return false;
        };
        self.policies = Rc::new(rules.into_iter().map(Policy::new).collect());
        // Create every slot before traffic: Envoy's shared data cannot create a key "only if
        // absent", so only writes to existing slots are exact compare-and-swaps.
        for policy in self.policies.iter() {
            if let Err(e) = policy.rules.table.prepare(&HostStore, &policy.prefix) {
                log::warn(FILTER, &format!("policy {}: could not create its slots in shared data ({e:?}); limits may be approximate", policy.rules.name));
            }
        }
        let names: Vec<&str> = self
            .policies
            .iter()
            .map(|p| p.rules.name.as_str())
            .collect();
        log::info(
            FILTER,
            &format!("configured policies: {}", names.join(", ")),
        );
        true
    }

    fn on_tick(&mut self) {
        let now = clock::now();
        let mut parked = self.parked.borrow_mut();
        parked.retain(|(context, resume_at)| {
            if *resume_at > now {
                return true;
            }
            // A stream that ended while parked is gone: the host refuses to switch to it.
            if proxy_wasm::hostcalls::set_effective_context(*context).is_ok() {
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
            false
        });
        if parked.is_empty() {
            let _ = proxy_wasm::hostcalls::set_tick_period(std::time::Duration::ZERO);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimitStream {
            context_id,
            policies: Rc::clone(&self.policies),
            parked: Rc::clone(&self.parked),
            response_headers: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RateLimitStream {
    context_id: u32,
    policies: Rc<Vec<Policy>>,
    parked: Rc<RefCell<Vec<(u32, Instant)>>>,
    /// `RateLimit-Policy` and `RateLimit` values for the response, one per applied policy.
    response_headers: Vec<(String, String)>,
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let now = clock::now();
        // Reading a property is one of the dearer host calls: only when a policy needs it.
        let route = if self.policies.iter().any(|p| p.rules.routes.is_some()) {
            request::route_name()
        } else {
            None
        };
        let mut delay = Duration::ZERO;
        for policy in self.policies.iter() {
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
                        policy.limited.increment(1);
                        deny(policy, "", None);
                        return Action::Pause;
                    }
                },
            };
            let tier_value = rules.tiers.as_ref().and_then(|t| request::key(&t.selector));
            let (tier, limiter) = rules.limiter_for(tier_value.as_deref());
            let label = label(&rules.name, tier);
            let Some(decision) = policy.acquire(limiter, tier, &key, now) else {
                continue;
            };
            let rate = limiter.rate();
            match decision {
                Decision::Allow { remaining, reset } => {
                    policy.allowed.increment(1);
                    if rules.response_headers {
                        self.response_headers
                            .push(("ratelimit-policy".into(), headers::policy(&label, &rate)));
                        self.response_headers.push((
                            "ratelimit".into(),
                            headers::remaining(&label, remaining, reset),
                        ));
                    }
                }
                Decision::Delay { wait, reset } => {
                    policy.delayed.increment(1);
                    delay = delay.max(wait);
                    if rules.response_headers {
                        self.response_headers
                            .push(("ratelimit-policy".into(), headers::policy(&label, &rate)));
                        self.response_headers
                            .push(("ratelimit".into(), headers::remaining(&label, 0, reset)));
                    }
                }
                Decision::Deny { retry_after, reset } => {
                    policy.limited.increment(1);
                    deny(policy, &label, Some((retry_after, reset, &rate)));
                    return Action::Pause;
                }
            }
        }
        if delay.is_zero() {
            return Action::Continue;
        }
        let mut parked = self.parked.borrow_mut();
        if parked.is_empty() && proxy_wasm::hostcalls::set_tick_period(TICK).is_err() {
            log::warn(
                FILTER,
                "the host cannot set a tick period; not delaying the request",
            );
            return Action::Continue;
        }
        parked.push((self.context_id, now.saturating_add(delay)));
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.response_headers {
            request::add_response_header(name, value);
        }
        Action::Continue
    }
}

/// The name a client sees in the `RateLimit` headers: the policy, and its tier if any.
fn label(policy: &str, tier: &str) -> String {
    if tier.is_empty() {
        policy.to_string()
    } else {
        format!("{policy}.{tier}")
    }
}

/// Sends the policy's refusal. `limit` is absent when the request was refused for having no key.
fn deny(
    policy: &Policy,
    label: &str,
    limit: Option<(Duration, Duration, &keel_core::config::Rate)>,
) {
    let reply = &policy.rules.deny;
    let mut headers_out: Vec<(String, String)> = vec![(
        "content-type".to_string(),
        "text/plain; charset=utf-8".to_string(),
    )];
    if let Some((retry_after, reset, rate)) = limit {
        headers_out.push((
            "retry-after".into(),
            headers::retry_after_secs(retry_after).to_string(),
        ));
        headers_out.push(("ratelimit-policy".into(), headers::policy(label, rate)));
        headers_out.push(("ratelimit".into(), headers::remaining(label, 0, reset)));
    }
    headers_out.extend(reply.headers.iter().cloned());
    LocalReply {
        status: reply.status,
        headers: headers_out,
        body: reply.body.as_bytes().to_vec(),
    }
    .send();
}
