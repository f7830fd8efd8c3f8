//! `keel_retry.wasm`: bounded retries with jittered exponential backoff, a retry budget shared by
//! every worker, and idempotency safety. The filter retries by itself, so it works on any
//! proxy-wasm host with HTTP callouts and ticks.
//!
//! The glue is thin: `keel_core::retry` decides (eligibility, outcome, attempt plan, backoff,
//! budget), and each tracked stream's `keel_core::retry::Session` is the state machine that
//! keeps the replay, the phase and the best answer so far and says what to do next; this file
//! reads what the host says, hands it to the session, and carries out its steps: holds the
//! response that asked for a retry, sends the next attempts as callouts when the root context's
//! tick says they are due, and answers with the session's answer. Configuration reference:
//! `docs/config/retry.md`.
//!
//! # One request's way
//!
//! - Request headers: the first policy for the route applies. An ineligible request (a method
//!   that is not idempotent without an `Idempotency-Key`, a body over `max_body`, header values
//!   that are not text) is left alone. An eligible one deposits in the budget and its headers
//!   (minus hop-by-hop ones) and body are copied while the router sends the first attempt.
//! - Response headers: `AttemptPlan::decide`. No retry: the response goes on with the attempt
//!   header. A retry: the response (and its body) is held (`Pause`), the stream is handed to the
//!   root-side `Retrier`, which sends the next attempt as a callout when its delay has passed,
//!   and finally either answers in place of the held response (`send_http_response`) or lets
//!   the held response go on (`resume_http_response`) when the last attempt brought nothing
//!   better.
//! - `first_attempt: "callout"` (hosts that cannot replace a held response): a request without
//!   a body is held at its headers and every attempt is a callout. A request with a body passes
//!   unretried: Envoy turns a Pause in the request headers into StopAllIterationAndWatermark,
//!   so the body of a request held there never reaches the filter.
//! - The held response's body: a Pause in the response headers is StopAllIterationAndWatermark
//!   too, so the host buffers the body (with flow control) until the filter resumes or replaces
//!   the response.
//!
//! The streams' state lives in one `Retrier` per root context (per worker), shared with the
//! stream contexts, because callout answers and ticks come to the root. A stream that ends
//! (`on_done`) is forgotten; answers for it are dropped.
//!
//! Host capabilities: HTTP callouts, ticks, `set_effective_context` and sending a response from
//! the root context (all needed for retries; without callouts a retry gives up and the client
//! gets the first response), shared data (the budget is per worker without it).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use keel_core::circuit_breaker::steer::{host_state_key, steering, Steering};
use keel_core::config;
use keel_core::picker::failover::{decode_hosts, HOSTS_PROPERTY};
use keel_core::rand::SeededRng;
use keel_core::retry::attempt::{encode_router_attempt, router_failure, ROUTER_ATTEMPT_PROPERTY};
use keel_core::retry::session::{
    reads_failure, reads_pushback, Answer, AnswerStep, Ending, Failover, Next, ResponseRole,
    RouterAnswer, RouterStep, Start, Stop, Unusable, MAX_ANSWER_BODY,
};
use keel_core::retry::{GiveUpReason, RetryConfig, RetryPolicy, Session};
use keel_core::routes;
use keel_core::store::SharedStore;
use keel_core::time::Instant;
use keel_proxy::metrics::{Counter, Family};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::{self, HostStore};
use keel_proxy::{clock, http_call, log, random, request, response, routing, stream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "retry";

/// The filter's root context for the root context `context_id`, run by `stage`: an Envoy
/// filter of its own (see [`root`]) or a stage of Keel's pipeline (root_id `pipeline` in
/// `keel.wasm`).
pub fn stage(context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(RetryRoot {
        retrier: Rc::new(RefCell::new(Retrier::new(context_id, stage))),
    })
}

/// The filter as an Envoy filter of its own: what its module `keel_retry.wasm`, and `keel.wasm`
/// for root_id `retry`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// A policy's counters, `keel.retry.<policy>.<what>`.
struct Metrics {
    requests: Counter,
    ineligible: Counter,
    retries: Counter,
    budget_exhausted: Counter,
    max_attempts: Counter,
    deadline: Counter,
    retry_after_too_long: Counter,
    recovered: Counter,
    abandoned: Counter,
    callout_refused: Counter,
    store_errors: Counter,
    failovers: Counter,
    hosts_exhausted: Counter,
    attempts: [Counter; 5],
}

impl Metrics {
    fn define(policy: &str) -> Metrics {
        let family = Family::new(FILTER, policy);
        let metric = |what: &str| family.counter(what);
        Metrics {
            requests: metric("requests"),
            ineligible: metric("ineligible"),
            retries: metric("retries"),
            budget_exhausted: metric("budget_exhausted"),
            max_attempts: metric("max_attempts"),
            deadline: metric("deadline"),
            retry_after_too_long: metric("retry_after_too_long"),
            recovered: metric("recovered"),
            abandoned: metric("abandoned"),
            callout_refused: metric("callout_refused"),
            store_errors: metric("store_errors"),
            failovers: metric("failovers"),
            hosts_exhausted: metric("hosts_exhausted"),
            attempts: [1, 2, 3, 4, 5].map(|n| metric(&format!("attempts_{n}"))),
        }
    }

    /// Counts why a request that could have been retried was not.
    fn gave_up(&self, reason: GiveUpReason) {
        let counter = match reason {
            GiveUpReason::NotRetryable => return,
            GiveUpReason::NotEligible(_) => &self.ineligible,
            GiveUpReason::MaxAttempts => &self.max_attempts,
            GiveUpReason::Deadline => &self.deadline,
            GiveUpReason::RetryAfterTooLong => &self.retry_after_too_long,
            GiveUpReason::BudgetExhausted => &self.budget_exhausted,
        };
        counter.increment(1);
    }

    /// Counts a finished request's attempts.
    fn finished(&self, attempts: u32) {
        let index = usize::try_from(attempts.clamp(1, 5) - 1).unwrap_or(0);
        if let Some(counter) = self.attempts.get(index) {
            counter.increment(1);
        }
    }
}

/// A validated policy with what the glue needs beside it.
struct Policy {
    rules: RetryPolicy,
    budget_key: String,
    metrics: Metrics,
}

impl Policy {
    /// Takes a retry from the budget at `now`; an error refuses it (fail closed: contention on
    /// the budget is a sign of a storm).
    fn withdraw(&self, now: Instant) -> bool {
        let budget = self.rules.budget();
        store::update(&self.budget_key, &self.metrics.store_errors, |old| {
            budget.withdraw_bytes(old, now)
        })
        .unwrap_or(false)
    }

    /// Whether the host `host`'s breaker (if the policy names one) refuses a retry at `now`.
    fn skips(&self, host: &str, now: Instant) -> bool {
        let Some(name) = self.rules.breaker() else {
            return false;
        };
        let state = HostStore
            .get(&host_state_key(name, host))
            .ok()
            .flatten()
            .map(|(bytes, _)| bytes);
        // Retries bypass the breaker filter: only a closed breaker's host takes one.
        steering(state.as_deref(), now, u16::MAX) != Steering::Closed
    }
}

/// An eligible request the filter looks after.
struct Tracked {
    policy: usize,
    session: Session,
}

/// The retry state of one worker: the policies, and every eligible stream still under way.
struct Retrier {
    root_id: u32,
    /// What runs the filter: the tick, resuming a held response.
    stage: Stage,
    policies: Vec<Policy>,
    rng: SeededRng,
    streams: BTreeMap<u32, Tracked>,
    /// Callout token to stream.
    tokens: BTreeMap<u32, u32>,
    /// The tick period set, in milliseconds.
    tick_ms: Option<u64>,
    warned: bool,
}

impl Retrier {
    fn new(root_id: u32, stage: Stage) -> Retrier {
        Retrier {
            root_id,
            stage,
            policies: Vec::new(),
            rng: SeededRng::new(u64::from(root_id)),
            streams: BTreeMap::new(),
            tokens: BTreeMap::new(),
            tick_ms: None,
            warned: false,
        }
    }

    fn configure(&mut self) -> bool {
        let Some(retry) = self.stage.load(FILTER, config::load::<RetryConfig>) else {
            return false;
        };
        let now = clock::now();
        // Jitter must differ between workers and restarts, or their retries would line up.
        self.rng = SeededRng::new(random::seed(u64::from(self.root_id)));
        self.policies = retry
            .policies()
            .iter()
            .map(|rules| Policy {
                budget_key: rules.budget_key(),
                metrics: Metrics::define(rules.name()),
                rules: rules.clone(),
            })
            .collect();
        // Create each budget before traffic (or replace one of another shape): the host writes
        // a key that does not exist yet unconditionally, so only writes to an existing key are
        // exact compare-and-swaps.
        for policy in &self.policies {
            let budget = policy.rules.budget();
            let made = store::update(&policy.budget_key, &policy.metrics.store_errors, |old| {
                (budget.ensure_bytes(old, now), ())
            });
            if let Err(e) = made {
                log::warn(
                    FILTER,
                    &format!(
                        "policy {}: could not create its budget in shared data ({e:?})",
                        policy.rules.name()
                    ),
                );
            }
        }
        let names: Vec<String> = self
            .policies
            .iter()
            .map(|p| {
                let rules = &p.rules;
                format!(
                    "{} (cluster {}, {} attempts, first attempt via {})",
                    rules.name(),
                    rules.cluster().unwrap_or("of the route"),
                    rules.max_attempts(),
                    rules.first_attempt().name()
                )
            })
            .collect();
        log::info(
            FILTER,
            &format!("configured policies: {}", names.join(", ")),
        );
        true
    }

    // ----- the stream's own callbacks -----

    fn on_request_headers(&mut self, context_id: u32, end_of_stream: bool) -> Action {
        let now = clock::now();
        let route = routing::route_name();
        let Some((index, policy)) = routes::first(&self.policies, route.as_deref(), |p| &p.rules)
        else {
            return Action::Continue;
        };
        let rules = &policy.rules;
        policy.metrics.requests.increment(1);
        let start = Session::start(
            rules,
            stream::request_headers(),
            end_of_stream,
            now,
            routing::cluster_name,
        );
        let mut session = match start {
            Start::Track(session) => session,
            Start::Ineligible => {
                policy.metrics.ineligible.increment(1);
                return Action::Continue;
            }
            Start::NoCluster => {
                self.warn_once(
                    "no cluster to send attempts to (set \"cluster\"); requests go through the router unretried",
                );
                return Action::Continue;
            }
        };
        let budget = rules.budget();
        let _ = store::update(&policy.budget_key, &policy.metrics.store_errors, |old| {
            (budget.deposit_bytes(old, now), ())
        });
        // A request the picker routed by `ORIGINAL_DST_HOST` fails over along its host list.
        if let Some(first) = session.replayed_header(routing::ORIGINAL_DST_HOST) {
            let first = first.to_string();
            if let Some(hosts) =
                request::property_str(&[HOSTS_PROPERTY]).and_then(|t| decode_hosts(&t))
            {
                session.fail_over(Failover::new(first, hosts));
            }
        }
        let callout_first = session.due().is_some();
        self.streams.insert(
            context_id,
            Tracked {
                policy: index,
                session,
            },
        );
        if !callout_first {
            return Action::Continue;
        }
        self.send(context_id, now);
        // Held while the filter has it; a first attempt that could not be sent goes on to the
        // router.
        if self.streams.contains_key(&context_id) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_request_body(&mut self, context_id: u32, size: usize, end_of_stream: bool) -> Action {
        let Some(tracked) = self.streams.get_mut(&context_id) else {
            return Action::Continue;
        };
        let Some(policy) = self.policies.get(tracked.policy) else {
            return Action::Continue;
        };
        if !tracked.session.copies_body() {
            return Action::Continue;
        }
        // The router streams the body on; each call lends the current chunk.
        let chunk = stream::request_body(size);
        if !tracked
            .session
            .add_body(&policy.rules, &chunk, end_of_stream)
        {
            policy.metrics.ineligible.increment(1);
            self.streams.remove(&context_id);
        }
        Action::Continue
    }

    fn on_request_trailers(&mut self, context_id: u32) -> Action {
        // Callouts carry no trailers here: a request with trailers is not replayed.
        let copying = self
            .streams
            .get(&context_id)
            .is_some_and(|t| t.session.first_attempt_under_way());
        if copying {
            if let Some(tracked) = self.streams.remove(&context_id) {
                if let Some(policy) = self.policies.get(tracked.policy) {
                    policy.metrics.ineligible.increment(1);
                }
            }
        }
        Action::Continue
    }

    fn on_response_headers(&mut self, context_id: u32) -> Action {
        let Some(tracked) = self.streams.get_mut(&context_id) else {
            return Action::Continue;
        };
        match tracked.session.response_role() {
            ResponseRole::Attempt => {}
            ResponseRole::Own => return Action::Continue,
            ResponseRole::Foreign => {
                self.streams.remove(&context_id);
                return Action::Continue;
            }
        }
        let Some(policy) = self.policies.get(tracked.policy) else {
            self.streams.remove(&context_id);
            return Action::Continue;
        };
        let now = clock::now();
        let status = response::status().unwrap_or(0);
        // Envoy's own replies to a failed upstream attempt are 503s and 504s.
        let mut router_details = None;
        let failure = if reads_failure(status) {
            let details = response_code_details();
            router_details.clone_from(&details);
            let flags = response::flags();
            let failure = router_failure(details.as_deref(), flags);
            log::debug(
                FILTER,
                &format!("first attempt: {status}, code details {details:?}, flags {flags:?}: {failure:?}"),
            );
            failure
        } else {
            None
        };
        let (retry_after, reset) = if reads_pushback(status) {
            (text_header("retry-after"), text_header("x-ratelimit-reset"))
        } else {
            (None, None)
        };
        let answer = RouterAnswer {
            status,
            failure,
            retry_after: retry_after.as_deref(),
            rate_limit_reset: reset.as_deref(),
        };
        let step = tracked.session.router_response(
            &policy.rules,
            answer,
            now,
            &mut self.rng,
            routing::cluster_name,
            || policy.withdraw(now),
            |host| policy.skips(host, now),
        );
        match step {
            RouterStep::Hold { .. } => {
                // Whatever the client gets in the end, passive ejection judges the router's
                // host by this (docs/operations.md).
                let attempt = encode_router_attempt(status, router_details.as_deref());
                request::set_property(&[ROUTER_ATTEMPT_PROPERTY], attempt.as_bytes());
                if self.rearm(now) {
                    return Action::Pause;
                }
                // No tick would ever end the wait: the response goes on unretried.
                if let Some(tracked) = self.streams.remove(&context_id) {
                    if let Some(policy) = self.policies.get(tracked.policy) {
                        policy.metrics.finished(1);
                    }
                }
                Action::Continue
            }
            RouterStep::PassOn {
                reason,
                headers,
                out_of_hosts,
                no_cluster,
            } => {
                if no_cluster && !self.warned {
                    self.warned = true;
                    log::warn(
                        FILTER,
                        &format!("policy {}: no cluster to retry to (set \"cluster\"); failures are handed on", policy.rules.name()),
                    );
                }
                policy.metrics.gave_up(reason);
                policy.metrics.finished(1);
                for (name, value) in &headers {
                    stream::set_response_header(name, value);
                }
                if out_of_hosts {
                    policy.metrics.hosts_exhausted.increment(1);
                }
                self.streams.remove(&context_id);
                Action::Continue
            }
        }
    }

    /// The held response's body and trailers wait with it.
    fn response_action(&self, context_id: u32) -> Action {
        if self
            .streams
            .get(&context_id)
            .is_some_and(|t| t.session.pending())
        {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_done(&mut self, context_id: u32) {
        let Some(tracked) = self.streams.remove(&context_id) else {
            return;
        };
        if tracked.session.pending() {
            if let Some(policy) = self.policies.get(tracked.policy) {
                policy.metrics.abandoned.increment(1);
            }
        }
        self.tokens.retain(|_, stream| *stream != context_id);
    }

    // ----- the root's callbacks -----

    fn on_tick(&mut self) {
        let now = clock::now();
        let due: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, t)| t.session.due().is_some_and(|due| due <= now))
            .map(|(id, _)| *id)
            .collect();
        for context_id in due {
            self.send(context_id, now);
        }
        self.rearm(now);
        stream::switch_to(self.root_id);
    }

    /// A callout came back: decide on it like on the router's response.
    fn on_answer(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let Some(context_id) = self.tokens.remove(&token) else {
            return;
        };
        let Some(tracked) = self.streams.get_mut(&context_id) else {
            return;
        };
        let Some(policy) = self.policies.get(tracked.policy) else {
            return;
        };
        if !tracked.session.in_flight() {
            return;
        }
        let now = clock::now();
        let answer = read_answer(num_headers, body_size);
        let step =
            tracked
                .session
                .callout_answer(&policy.rules, answer, now, &mut self.rng, || {
                    policy.withdraw(now)
                });
        match step {
            AnswerStep::Ignore => {}
            AnswerStep::Wait { .. } => {
                if !self.rearm(now) {
                    // No tick would ever end the wait: the client gets the last answer.
                    self.finish_waiting(context_id);
                }
            }
            AnswerStep::Finish {
                reason,
                recovered,
                attempts,
            } => {
                policy.metrics.gave_up(reason);
                if recovered {
                    policy.metrics.recovered.increment(1);
                }
                self.finish(context_id, attempts);
                self.rearm(now);
            }
        }
        stream::switch_to(self.root_id);
    }

    // ----- attempts -----

    /// Sends the next attempt of a waiting stream as a callout.
    fn send(&mut self, context_id: u32, now: Instant) {
        let Some(tracked) = self.streams.get_mut(&context_id) else {
            return;
        };
        let Some(policy) = self.policies.get(tracked.policy) else {
            return;
        };
        if tracked.session.due().is_none() {
            return;
        }
        // Acting for the stream makes the callout the stream's (a host may cancel it with the
        // stream), and tells whether the client is still there.
        if !stream::switch_to(context_id) {
            policy.metrics.abandoned.increment(1);
            self.streams.remove(&context_id);
            return;
        }
        let session = &mut tracked.session;
        let (timeout, host) =
            match session.next_attempt(&policy.rules, now, |host| policy.skips(host, now)) {
                Next::Idle => return,
                Next::Send { timeout, host } => (timeout, host),
                Next::Stop { why, attempts } => {
                    match why {
                        Stop::Deadline => policy.metrics.deadline.increment(1),
                        Stop::HostsExhausted => policy.metrics.hosts_exhausted.increment(1),
                    }
                    self.finish(context_id, attempts);
                    return;
                }
            };
        let cluster = session.cluster().unwrap_or("");
        let (headers, body) = session.attempt_request(routing::ORIGINAL_DST_HOST, host.as_deref());
        match http_call::dispatch(cluster, &headers, body, timeout) {
            Ok(token) => {
                let sent = session.sent(now, timeout, host);
                if sent.retry {
                    policy.metrics.retries.increment(1);
                }
                if sent.failover {
                    policy.metrics.failovers.increment(1);
                }
                self.tokens.insert(token, context_id);
            }
            Err(status) => {
                policy.metrics.callout_refused.increment(1);
                let message = format!(
                    "the host refused a callout to cluster \"{cluster}\" ({status:?}); the client gets the last response"
                );
                let attempts = session.refused();
                self.warn_once(&message);
                self.finish(context_id, attempts);
            }
        }
    }

    /// Ends the retries of a stream (the effective context or not) after `attempts` attempts:
    /// the client gets the best response so far.
    fn finish(&mut self, context_id: u32, attempts: u32) {
        let Some(tracked) = self.streams.get_mut(&context_id) else {
            return;
        };
        let Some(policy) = self.policies.get(tracked.policy) else {
            return;
        };
        if !stream::switch_to(context_id) {
            policy.metrics.abandoned.increment(1);
            self.streams.remove(&context_id);
            return;
        }
        match tracked.session.end(&policy.rules, attempts) {
            Ending::Router => {
                self.streams.remove(&context_id);
                return;
            }
            Ending::Resume { headers } => {
                for (name, value) in &headers {
                    stream::set_response_header(name, value);
                }
                self.streams.remove(&context_id);
                // In a pipeline the stages before this one see the response first.
                self.stage.resume_response(context_id);
            }
            Ending::Reply(answer) => {
                LocalReply {
                    status: u32::from(answer.status),
                    headers: answer.headers,
                    body: answer.body,
                }
                .send();
            }
        }
        policy.metrics.finished(attempts);
    }

    /// Ends a waiting stream's retries now: the client gets the last answer.
    fn finish_waiting(&mut self, context_id: u32) {
        let attempts = self
            .streams
            .get_mut(&context_id)
            .and_then(|t| t.session.abandon_wait());
        if let Some(attempts) = attempts {
            self.finish(context_id, attempts);
        }
    }

    /// Sets the tick so that it fires when the earliest waiting attempt is due (in whole
    /// milliseconds, rounded up), or stops it when nothing waits. `false` when something waits
    /// and no tick is set (the host refused the period).
    fn rearm(&mut self, now: Instant) -> bool {
        let next = self.streams.values().filter_map(|t| t.session.due()).min();
        let want = next.map(|due| {
            due.saturating_since(now)
                .as_nanos()
                .div_ceil(1_000_000)
                .max(1)
        });
        if want != self.tick_ms {
            let period = std::time::Duration::from_millis(want.unwrap_or(0));
            if self.stage.set_tick_period(period) {
                self.tick_ms = want;
            }
        }
        want.is_none() || self.tick_ms.is_some()
    }

    fn warn_once(&mut self, message: &str) {
        if !self.warned {
            self.warned = true;
            log::warn(FILTER, message);
        }
    }
}

/// Why Envoy ended the stream's upstream attempt (`response.code_details`).
fn response_code_details() -> Option<String> {
    request::property_str(&["response", "code_details"])
}

/// A response header as text.
fn text_header(name: &str) -> Option<String> {
    response::header(name).and_then(|v| String::from_utf8(v).ok())
}

/// Reads a callout's answer during `on_http_call_response`.
fn read_answer(num_headers: usize, body_size: usize) -> Result<Answer, Unusable> {
    let Some(status) = http_call::status(num_headers) else {
        return Err(Unusable::Failed);
    };
    let body = http_call::body(body_size, MAX_ANSWER_BODY).map_err(|_| Unusable::TooLarge)?;
    let headers = stream::call_response_headers(num_headers)
        .into_iter()
        // A value that is not text cannot be handed on through the SDK; it is left out.
        .filter_map(|(name, value)| String::from_utf8(value).ok().map(|v| (name, v)))
        .collect();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

struct RetryRoot {
    retrier: Rc<RefCell<Retrier>>,
}

impl Context for RetryRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Ok(mut retrier) = self.retrier.try_borrow_mut() {
            retrier.on_answer(token_id, num_headers, body_size);
        }
    }
}

impl RootContext for RetryRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.retrier
            .try_borrow_mut()
            .is_ok_and(|mut retrier| retrier.configure())
    }

    fn on_tick(&mut self) {
        if let Ok(mut retrier) = self.retrier.try_borrow_mut() {
            retrier.on_tick();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RetryStream {
            context_id,
            retrier: Rc::clone(&self.retrier),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A stream context: hands each callback to the worker's [`Retrier`].
struct RetryStream {
    context_id: u32,
    retrier: Rc<RefCell<Retrier>>,
}

impl RetryStream {
    /// Runs `f` on the retrier; `Continue` if it is busy (a host calling back into the module
    /// from inside another callback), so a stream is never stuck because of the filter.
    fn with(&self, f: impl FnOnce(&mut Retrier, u32) -> Action) -> Action {
        match self.retrier.try_borrow_mut() {
            Ok(mut retrier) => f(&mut retrier, self.context_id),
            Err(_) => Action::Continue,
        }
    }
}

impl Context for RetryStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // Callouts sent from this stream's own callbacks (`first_attempt: "callout"`).
        if let Ok(mut retrier) = self.retrier.try_borrow_mut() {
            retrier.on_answer(token_id, num_headers, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Ok(mut retrier) = self.retrier.try_borrow_mut() {
            retrier.on_done(self.context_id);
        }
        true
    }
}

impl HttpContext for RetryStream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.with(|r, id| r.on_request_headers(id, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with(|r, id| r.on_request_body(id, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.with(|r, id| r.on_request_trailers(id))
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.with(|r, id| r.on_response_headers(id))
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        self.with(|r, id| r.response_action(id))
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.with(|r, id| r.response_action(id))
    }
}
