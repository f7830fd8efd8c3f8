//! `keel_retry.wasm`: bounded retries with jittered exponential backoff, a retry budget shared by
//! every worker, and idempotency safety. The filter retries by itself, so it works on any
//! proxy-wasm host with HTTP callouts and ticks.
//!
//! The glue is thin: `keel_core::retry` decides (eligibility, outcome, attempt plan, backoff,
//! budget); this file copies what a replay needs, holds the response that asked for a retry,
//! sends the next attempts as callouts when the root context's tick says they are due, and
//! answers with the last one. Configuration reference: `docs/config/retry.md`.
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

use keel_core::config::ConfigError;
use keel_core::rand::SeededRng;
use keel_core::retry::attempt::{
    callout_failure, handed_on_response_header, replayed_request_header, router_failure,
};
use keel_core::retry::{
    AttemptPlan, FirstAttempt, GiveUpReason, Outcome, Response, RetryConfig, RetryDecision,
    RetryPolicy,
};
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::Counter;
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::HostStore;
use keel_proxy::{clock, http_call, log, request, response, routing, stream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "retry";
/// The largest answer body the filter holds to hand on to a client.
const MAX_ANSWER_BODY: usize = 16 * 1024 * 1024;

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
    attempts: [Counter; 5],
}

impl Metrics {
    fn define(policy: &str) -> Metrics {
        let metric = |what: &str| Counter::define(&format!("keel.retry.{policy}.{what}"));
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

/// An attempt's response, kept to be handed on.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The best response so far, what the client gets if no later attempt brings one.
enum Last {
    /// Nothing was sent yet (`first_attempt: "callout"`): the router may still take the request.
    Nothing,
    /// Attempts were sent and none answered (failed callouts).
    Failed,
    /// The router's response, held in the host.
    Held,
    /// A callout's answer.
    Answer(Answer),
}

/// Where a tracked stream stands.
enum Phase {
    /// The router's attempt is under way.
    FirstAttempt,
    /// The next attempt goes at `due`.
    Waiting { due: Instant, last: Last },
    /// An attempt is out as a callout.
    InFlight {
        sent: Instant,
        timeout: Duration,
        last: Last,
    },
    /// The filter answered; its own reply may still pass through the stream.
    Answered,
}

/// What a replayed attempt sends.
struct Replay {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    complete: bool,
}

/// An eligible request the filter looks after.
struct Tracked {
    policy: usize,
    plan: AttemptPlan,
    replay: Replay,
    cluster: Option<String>,
    phase: Phase,
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
        let Some(retry) = self.stage.load(FILTER, |bytes| {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| ConfigError::new("", "the plugin configuration is not UTF-8"))?;
            RetryConfig::from_json(text)
        }) else {
            return false;
        };
        let now = clock::now();
        // Jitter must differ between workers and restarts, or their retries would line up.
        self.rng = SeededRng::new(
            now.as_nanos() ^ u64::from(self.root_id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.policies = retry
            .policies()
            .iter()
            .map(|rules| Policy {
                budget_key: rules.budget_key(),
                metrics: Metrics::define(rules.name()),
                rules: rules.clone(),
            })
            .collect();
        // Create each budget before traffic: the host writes a key that does not exist yet
        // unconditionally, so only writes to an existing key are exact compare-and-swaps.
        for policy in &self.policies {
            let budget = policy.rules.budget();
            if let Err(e) = budget.ensure_shared(&HostStore, &policy.budget_key, now) {
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
        let Some((index, policy)) = self
            .policies
            .iter()
            .enumerate()
            .find(|(_, p)| p.rules.applies_to(route.as_deref()))
        else {
            return Action::Continue;
        };
        let rules = &policy.rules;
        policy.metrics.requests.increment(1);
        let headers = stream::request_headers();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let declared = find("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let eligibility = rules.eligibility(
            find(":method").unwrap_or(""),
            find(rules.idempotency_key_header()),
            declared,
        );
        let replayed = eligibility
            .is_eligible()
            .then(|| replayable(headers))
            .flatten();
        let Some(replayed) = replayed else {
            policy.metrics.ineligible.increment(1);
            return Action::Continue;
        };
        let callout = rules.first_attempt() == FirstAttempt::Callout;
        // Envoy turns a Pause in `on_http_request_headers` into StopAllIterationAndWatermark: a
        // paused request's body never reaches the filter. So the whole request must be in the
        // headers for the filter to send it itself.
        if callout && !end_of_stream {
            policy.metrics.ineligible.increment(1);
            return Action::Continue;
        }
        let cluster = rules.cluster().map(str::to_string).or_else(|| {
            if callout {
                route_cluster()
            } else {
                None
            }
        });
        if callout && cluster.is_none() {
            self.warn_once(
                "no cluster to send attempts to (set \"cluster\"); requests go through the router unretried",
            );
            return Action::Continue;
        }
        if rules
            .budget()
            .deposit_shared(&HostStore, &policy.budget_key, now)
            .is_err()
        {
            policy.metrics.store_errors.increment(1);
        }
        let mut tracked = Tracked {
            policy: index,
            plan: AttemptPlan::new(rules, eligibility, now),
            replay: Replay {
                headers: replayed,
                body: Vec::new(),
                complete: end_of_stream,
            },
            cluster,
            phase: Phase::FirstAttempt,
        };
        if !callout {
            self.streams.insert(context_id, tracked);
            return Action::Continue;
        }
        tracked.phase = Phase::Waiting {
            due: now,
            last: Last::Nothing,
        };
        self.streams.insert(context_id, tracked);
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
        if !matches!(tracked.phase, Phase::FirstAttempt) || tracked.replay.complete {
            return Action::Continue;
        }
        // The router streams the body on; each call lends the current chunk.
        let chunk = stream::request_body(size);
        let length = tracked.replay.body.len().saturating_add(chunk.len());
        if u64::try_from(length).unwrap_or(u64::MAX) > policy.rules.max_body() {
            policy.metrics.ineligible.increment(1);
            self.streams.remove(&context_id);
            return Action::Continue;
        }
        tracked.replay.body.extend_from_slice(&chunk);
        tracked.replay.complete = end_of_stream;
        Action::Continue
    }

    fn on_request_trailers(&mut self, context_id: u32) -> Action {
        // Callouts carry no trailers here: a request with trailers is not replayed.
        let copying = matches!(
            self.streams.get(&context_id).map(|t| &t.phase),
            Some(Phase::FirstAttempt)
        );
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
        match tracked.phase {
            Phase::FirstAttempt => {}
            Phase::Answered => return Action::Continue,
            // The host answered a request the filter holds (a stream timeout, for instance):
            // that answer stands.
            _ => {
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
        let failure = if matches!(status, 503 | 504) {
            let details = response_code_details();
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
        let (retry_after, reset) = if matches!(status, 429 | 503) {
            (text_header("retry-after"), text_header("x-ratelimit-reset"))
        } else {
            (None, None)
        };
        let outcome = failure.unwrap_or(Outcome::Response(Response {
            status,
            retry_after: retry_after.as_deref(),
            rate_limit_reset: reset.as_deref(),
        }));
        if !tracked.replay.complete {
            tracked.plan.body_incomplete();
        }
        if tracked.cluster.is_none() && (failure.is_some() || !(200..400).contains(&status)) {
            tracked.cluster = route_cluster();
        }
        let decision = if tracked.cluster.is_none() {
            if !self.warned {
                self.warned = true;
                log::warn(
                    FILTER,
                    &format!("policy {}: no cluster to retry to (set \"cluster\"); failures are handed on", policy.rules.name()),
                );
            }
            RetryDecision::GiveUp(GiveUpReason::NotRetryable)
        } else {
            decide(&mut tracked.plan, policy, &outcome, now, &mut self.rng)
        };
        match decision {
            RetryDecision::RetryAfter(delay) => {
                tracked.phase = Phase::Waiting {
                    due: now.saturating_add(delay),
                    last: Last::Held,
                };
                self.rearm(now);
                Action::Pause
            }
            RetryDecision::GiveUp(reason) => {
                policy.metrics.gave_up(reason);
                policy.metrics.finished(1);
                if let Some(name) = policy.rules.attempt_header() {
                    stream::set_response_header(name, "1");
                }
                self.streams.remove(&context_id);
                Action::Continue
            }
        }
    }

    /// The held response's body and trailers wait with it.
    fn response_action(&self, context_id: u32) -> Action {
        match self.streams.get(&context_id).map(|t| &t.phase) {
            Some(Phase::Waiting { .. } | Phase::InFlight { .. }) => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_done(&mut self, context_id: u32) {
        let Some(tracked) = self.streams.remove(&context_id) else {
            return;
        };
        if matches!(
            tracked.phase,
            Phase::Waiting { .. } | Phase::InFlight { .. }
        ) {
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
            .filter(|(_, t)| matches!(t.phase, Phase::Waiting { due, .. } if due <= now))
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
        let Phase::InFlight {
            sent,
            timeout,
            last,
        } = std::mem::replace(&mut tracked.phase, Phase::Answered)
        else {
            return;
        };
        let now = clock::now();
        let answer = read_answer(num_headers, body_size);
        let decision = match &answer {
            Err(Unusable::TooLarge) => RetryDecision::GiveUp(GiveUpReason::NotRetryable),
            Err(Unusable::Failed) | Ok(_) => {
                let outcome = match &answer {
                    Ok(a) => {
                        callout_failure(a.status, &a.body, now.saturating_since(sent), timeout)
                            .unwrap_or_else(|| {
                                let header = |name: &str| {
                                    a.headers
                                        .iter()
                                        .find(|(k, _)| k == name)
                                        .map(|(_, v)| v.as_str())
                                };
                                Outcome::Response(Response {
                                    status: a.status,
                                    retry_after: header("retry-after"),
                                    rate_limit_reset: header("x-ratelimit-reset"),
                                })
                            })
                    }
                    Err(_) => Outcome::Reset,
                };
                decide(&mut tracked.plan, policy, &outcome, now, &mut self.rng)
            }
        };
        let last = match answer {
            Ok(answer) => Last::Answer(answer),
            Err(Unusable::TooLarge) => Last::Answer(Answer {
                status: 502,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: format!("the upstream's answer is larger than {MAX_ANSWER_BODY} bytes\n")
                    .into_bytes(),
            }),
            Err(Unusable::Failed) => match last {
                Last::Nothing => Last::Failed,
                other => other,
            },
        };
        match decision {
            RetryDecision::RetryAfter(delay) => {
                tracked.phase = Phase::Waiting {
                    due: now.saturating_add(delay),
                    last,
                };
                self.rearm(now);
            }
            RetryDecision::GiveUp(reason) => {
                policy.metrics.gave_up(reason);
                if reason == GiveUpReason::NotRetryable && tracked.plan.attempts() > 1 {
                    policy.metrics.recovered.increment(1);
                }
                let made = tracked.plan.attempts();
                self.finish(context_id, last, made);
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
        let Phase::Waiting { last, .. } = std::mem::replace(&mut tracked.phase, Phase::Answered)
        else {
            return;
        };
        // Acting for the stream makes the callout the stream's (a host may cancel it with the
        // stream), and tells whether the client is still there.
        if !stream::switch_to(context_id) {
            policy.metrics.abandoned.increment(1);
            self.streams.remove(&context_id);
            return;
        }
        let timeout = tracked.plan.attempt_timeout(&policy.rules, now);
        let cluster = tracked.cluster.as_deref().unwrap_or("");
        // The plan counted this attempt as made when it decided on it.
        let made_before = tracked.plan.attempts().saturating_sub(1);
        if timeout.is_zero() {
            policy.metrics.deadline.increment(1);
            self.finish(context_id, last, made_before);
            return;
        }
        let headers: Vec<(&str, &str)> = tracked
            .replay
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = (!tracked.replay.body.is_empty()).then_some(tracked.replay.body.as_slice());
        match http_call::dispatch(cluster, &headers, body, timeout) {
            Ok(token) => {
                if tracked.plan.attempts() > 1 {
                    policy.metrics.retries.increment(1);
                }
                self.tokens.insert(token, context_id);
                tracked.phase = Phase::InFlight {
                    sent: now,
                    timeout,
                    last,
                };
            }
            Err(status) => {
                policy.metrics.callout_refused.increment(1);
                let message = format!(
                    "the host refused a callout to cluster \"{cluster}\" ({status:?}); the client gets the last response"
                );
                self.warn_once(&message);
                self.finish(context_id, last, made_before);
            }
        }
    }

    /// Ends the retries of a stream (the effective context or not) after `attempts` attempts:
    /// the client gets `last`.
    fn finish(&mut self, context_id: u32, last: Last, attempts: u32) {
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
        let header = policy
            .rules
            .attempt_header()
            .map(|name| (name.to_string(), attempts.to_string()));
        match last {
            Last::Nothing => {
                // Not one attempt left the filter (only the first attempt of `first_attempt:
                // "callout"` can fail so, inside the stream's own request callback, which then
                // returns Continue): the router takes the request as if the filter were not
                // there.
                self.streams.remove(&context_id);
                return;
            }
            Last::Held => {
                if let Some((name, value)) = &header {
                    stream::set_response_header(name, value);
                }
                self.streams.remove(&context_id);
                // In a pipeline the stages before this one see the response first.
                self.stage.resume_response(context_id);
            }
            Last::Answer(answer) => {
                let mut headers: Vec<(String, String)> = answer
                    .headers
                    .into_iter()
                    .filter(|(name, _)| handed_on_response_header(name))
                    .collect();
                if let Some((name, value)) = header {
                    headers.retain(|(k, _)| *k != name);
                    headers.push((name, value));
                }
                LocalReply {
                    status: u32::from(answer.status),
                    headers,
                    body: answer.body,
                }
                .send();
                tracked.phase = Phase::Answered;
            }
            Last::Failed => {
                let mut headers = vec![("content-type".to_string(), "text/plain".to_string())];
                headers.extend(header);
                LocalReply {
                    status: 503,
                    headers,
                    body: format!("no response from the upstream after {attempts} attempts\n")
                        .into_bytes(),
                }
                .send();
                tracked.phase = Phase::Answered;
            }
        }
        policy.metrics.finished(attempts);
    }

    /// Sets the tick so that it fires when the earliest waiting attempt is due (in whole
    /// milliseconds, rounded up), or stops it when nothing waits.
    fn rearm(&mut self, now: Instant) {
        let next = self
            .streams
            .values()
            .filter_map(|t| match t.phase {
                Phase::Waiting { due, .. } => Some(due),
                _ => None,
            })
            .min();
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
    }

    fn warn_once(&mut self, message: &str) {
        if !self.warned {
            self.warned = true;
            log::warn(FILTER, message);
        }
    }
}

/// Asks the plan what follows `outcome`. A retry withdraws from the shared budget; an error
/// there refuses it (fail closed: contention on the budget is a sign of a storm).
fn decide(
    plan: &mut AttemptPlan,
    policy: &Policy,
    outcome: &Outcome<'_>,
    now: Instant,
    rng: &mut SeededRng,
) -> RetryDecision {
    let rules = &policy.rules;
    plan.decide(rules, outcome, now, rng, || {
        rules
            .budget()
            .withdraw_shared(&HostStore, &policy.budget_key, now)
            .unwrap_or_else(|_| {
                policy.metrics.store_errors.increment(1);
                false
            })
    })
}

/// The request headers to replay, as text: `None` when a value is not UTF-8 (a callout takes
/// text, and a replay must not alter the request).
fn replayable(headers: Vec<(String, Vec<u8>)>) -> Option<Vec<(String, String)>> {
    headers
        .into_iter()
        .filter(|(name, _)| replayed_request_header(name))
        .map(|(name, value)| String::from_utf8(value).ok().map(|v| (name, v)))
        .collect()
}

/// The cluster the host routed the request to (Envoy 1.40: `xds.cluster_name`, readable from
/// the request headers on).
fn route_cluster() -> Option<String> {
    routing::cluster_name()
}

/// Why Envoy ended the stream's upstream attempt (`response.code_details`).
fn response_code_details() -> Option<String> {
    request::property_str(&["response", "code_details"])
}

/// A response header as text.
fn text_header(name: &str) -> Option<String> {
    response::header(name).and_then(|v| String::from_utf8(v).ok())
}

/// Why a callout's answer cannot be handed on.
enum Unusable {
    /// The call failed: no response at all.
    Failed,
    /// The body is larger than [`MAX_ANSWER_BODY`].
    TooLarge,
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
