//! One request's retries: the per-stream state machine of `keel_retry.wasm`.
//!
//! The glue reads what the host says about a stream (its request headers and body, the
//! router's response, a callout's answer, the tick) and hands it to the stream's [`Session`] as
//! an event; the session answers with what to do (hold the response, send an attempt, hand
//! the response on, answer in its place), which the glue carries out with host calls. Host
//! reads that only some paths need (the route's cluster, the retry budget, a host's breaker)
//! are passed in as closures, called only when the path needs them.
//!
//! # Phases
//!
//! ```text
//!   start ──(router)──▶ FirstAttempt ──router_response──▶ PassOn (forget)
//!     │                      │
//!     │(callout)             └──Hold──▶ Waiting ◀──────────────┐
//!     ▼                                  │                      │ Wait
//!   Waiting ──next_attempt: Send──▶ (sent) InFlight ──callout_answer──▶ Finish ──end──▶ Ending
//!     │                                                         ▲
//!     └──next_attempt: Stop / refused / abandon_wait ───────────┘
//! ```
//!
//! # The best answer
//!
//! While it retries, a session keeps the best response so far ([`Last`]), which the client
//! gets when no later attempt brings one: the router's response held in the host, or the
//! latest callout answer. A callout that fails outright (no response) does not replace a
//! response; only when nothing answered at all does the client get the filter's own 503
//! ([`no_response`]). A callout answer too large to hold becomes the filter's 502
//! ([`too_large`]).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::picker::failover::{next_host, NextHost};
use crate::rand::Rng;
use crate::retry::attempt::{callout_failure, handed_on_response_header, replayed_request_header};
use crate::retry::{
    AttemptPlan, FirstAttempt, GiveUpReason, Outcome, Response, RetryDecision, RetryPolicy,
};
use crate::time::{Duration, Instant};

/// The largest answer body the filter holds to hand on to a client.
pub const MAX_ANSWER_BODY: usize = 16 * 1024 * 1024;
/// The response header that lists the host of each attempt, in order, when the picker handed
/// its host list over (beside the attempt header, and only when that is on).
pub const ATTEMPT_HOSTS_HEADER: &str = "x-keel-attempt-hosts";
/// What the attempt header says after its count when no listed host was left to try.
pub const EXHAUSTED: &str = "hosts-exhausted";

/// A header list as (lower-case name, text value).
pub type Headers = Vec<(String, String)>;

/// An attempt's response, kept to be handed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Every header, in order.
    pub headers: Headers,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a callout's answer cannot be handed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// The call failed: no response at all.
    Failed,
    /// The body is larger than [`MAX_ANSWER_BODY`].
    TooLarge,
}

/// The filter's answer in place of a callout answer larger than [`MAX_ANSWER_BODY`]: a 502.
pub fn too_large() -> Answer {
    Answer {
        status: 502,
        headers: alloc::vec![("content-type".into(), "text/plain".into())],
        body: format!("the upstream's answer is larger than {MAX_ANSWER_BODY} bytes\n")
            .into_bytes(),
    }
}

/// The filter's answer when `attempts` attempts were sent and none answered: a 503, with
/// `extra` (the attempt headers) after its content type.
pub fn no_response(attempts: u32, extra: Headers) -> Answer {
    let mut headers = alloc::vec![("content-type".to_string(), "text/plain".to_string())];
    headers.extend(extra);
    Answer {
        status: 503,
        headers,
        body: format!("no response from the upstream after {attempts} attempts\n").into_bytes(),
    }
}

/// The best response so far, what the client gets if no later attempt brings one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Last {
    /// Nothing was sent yet (`first_attempt: "callout"`): the router may still take the request.
    Nothing,
    /// Attempts were sent and none answered (failed callouts).
    Failed,
    /// The router's response, held in the host.
    Held,
    /// A callout's answer.
    Answer(Answer),
}

impl Last {
    /// The best response once a callout came back with `answer`: any response replaces what
    /// was kept (a too large one as the filter's 502); a failed call keeps it, and turns
    /// "nothing sent" into "nothing answered".
    pub fn after(self, answer: Result<Answer, Unusable>) -> Last {
        match answer {
            Ok(answer) => Last::Answer(answer),
            Err(Unusable::TooLarge) => Last::Answer(too_large()),
            Err(Unusable::Failed) => match self {
                Last::Nothing => Last::Failed,
                other => other,
            },
        }
    }
}

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The router's attempt is under way.
    FirstAttempt,
    /// The next attempt goes at `due`.
    Waiting { due: Instant },
    /// An attempt is out as a callout.
    InFlight { sent: Instant, timeout: Duration },
    /// The filter answered (its own reply may still pass through the stream), or an attempt is
    /// being sent.
    Answered,
}

/// A request's failover over the picker's host list (`keel_core::picker::failover`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// The picker's preference list for the request's key.
    hosts: Vec<String>,
    /// The host of each attempt made, in order.
    tried: Vec<String>,
    /// Whether a retry found no listed host left.
    exhausted: bool,
}

impl Failover {
    /// The failover of a request whose first attempt goes to `first`, over `hosts`.
    pub fn new(first: String, hosts: Vec<String>) -> Failover {
        Failover {
            hosts,
            tried: alloc::vec![first],
            exhausted: false,
        }
    }

    /// The next attempt's host: the first listed one not tried that `skip` does not refuse
    /// (`skip`: whether the host's breaker refuses a retry now).
    fn next(&self, skip: impl FnMut(&str) -> bool) -> NextHost<'_> {
        next_host(&self.hosts, &self.tried, skip)
    }
}

/// The response headers that tell how many attempts were made (`name`: the policy's attempt
/// header) and, on a picker route, each attempt's host: `x-keel-attempts: 2` (`2;
/// hosts-exhausted` when no listed host was left for a further retry) and
/// `x-keel-attempt-hosts: 127.0.0.1:18091,127.0.0.1:18093`.
pub fn attempt_headers(name: &str, attempts: u32, failover: Option<&Failover>) -> Headers {
    let mut count = attempts.to_string();
    let mut out = Vec::new();
    if let Some(f) = failover {
        if f.exhausted {
            count = format!("{count}; {EXHAUSTED}");
        }
        out.push((ATTEMPT_HOSTS_HEADER.to_string(), f.tried.join(",")));
    }
    out.insert(0, (name.to_string(), count));
    out
}

/// What a request's headers started.
#[derive(Debug)]
// Returned once per request and moved straight into the glue's map: boxing would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Start {
    /// The request cannot be retried: left alone (count it as ineligible).
    Ineligible,
    /// `first_attempt: "callout"` and no cluster to send attempts to: left alone, unretried.
    NoCluster,
    /// The request is looked after.
    Track(Session),
}

/// The router's response to the first attempt, as the glue read it.
#[derive(Clone, Copy, Debug)]
pub struct RouterAnswer<'a> {
    /// The response status (0 if the host gave none).
    pub status: u16,
    /// How the attempt failed, when the host's response was its own reply to a failure
    /// ([`crate::retry::attempt::router_failure`]).
    pub failure: Option<Outcome<'static>>,
    /// `Retry-After`, read when the status asks for pushback ([`reads_pushback`]).
    pub retry_after: Option<&'a str>,
    /// `X-RateLimit-Reset`, likewise.
    pub rate_limit_reset: Option<&'a str>,
}

/// Whether the router's response with `status` may be Envoy's own reply to a failed attempt,
/// whose cause the glue then reads (`response.code_details`, `response.flags`).
pub fn reads_failure(status: u16) -> bool {
    matches!(status, 503 | 504)
}

/// Whether a response with `status` may push back (`Retry-After`, `X-RateLimit-Reset`).
pub fn reads_pushback(status: u16) -> bool {
    matches!(status, 429 | 503)
}

/// What a response arriving on the stream is to the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseRole {
    /// The router's answer to the first attempt: judge it ([`Session::router_response`]).
    Attempt,
    /// The filter's own answer passing through: let it go on.
    Own,
    /// The host answered a request the filter holds (a stream timeout, for instance): that
    /// answer stands, and the session is over.
    Foreign,
}

/// What follows the router's response.
#[derive(Debug, PartialEq, Eq)]
pub enum RouterStep {
    /// Hold the response: the next attempt is due at `due`.
    Hold {
        /// When the next attempt goes.
        due: Instant,
    },
    /// Hand the response on with `headers` set; the session is over.
    PassOn {
        /// Why no retry (count it unless it is `NotRetryable`).
        reason: GiveUpReason,
        /// The attempt headers to set on the response.
        headers: Headers,
        /// A retry was decided but no listed host was left to take it.
        out_of_hosts: bool,
        /// No cluster to retry to: the glue warns.
        no_cluster: bool,
    },
}

/// Why a waiting session sends no further attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The request's deadline left no time for the attempt.
    Deadline,
    /// Every listed host was tried or is refused by its breaker.
    HostsExhausted,
}

/// What a waiting session does when its attempt is due.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The session is not waiting: nothing.
    Idle,
    /// Send the attempt ([`Session::attempt_request`]) as a callout with `timeout`, then call
    /// [`Session::sent`] or [`Session::refused`].
    Send {
        /// The callout's timeout.
        timeout: Duration,
        /// The host a failover retry goes to (the replayed `ORIGINAL_DST` header's new value).
        host: Option<String>,
    },
    /// No attempt: end the session ([`Session::end`]) after `attempts`.
    Stop {
        /// Why.
        why: Stop,
        /// The attempts made.
        attempts: u32,
    },
}

/// What a sent attempt counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The attempt is a retry (not the first attempt).
    pub retry: bool,
    /// The attempt fails over to another listed host.
    pub failover: bool,
}

/// What follows a callout's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum AnswerStep {
    /// No attempt was in flight: the answer is dropped.
    Ignore,
    /// The next attempt is due at `due`.
    Wait {
        /// When the next attempt goes.
        due: Instant,
    },
    /// No further attempt: end the session ([`Session::end`]) after `attempts`.
    Finish {
        /// Why (count it unless it is `NotRetryable`).
        reason: GiveUpReason,
        /// A retry brought a response worth handing on.
        recovered: bool,
        /// The attempts made.
        attempts: u32,
    },
}

/// How a session ends for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// No attempt left the filter: the router takes the request as if the filter were not
    /// there. The session is over.
    Router,
    /// The held response goes on with `headers` set. The session is over.
    Resume {
        /// The attempt headers.
        headers: Headers,
    },
    /// The filter answers with this response; its reply still passes through the stream.
    Reply(Answer),
}

/// What a replayed attempt sends.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Replay {
    headers: Headers,
    body: Vec<u8>,
    complete: bool,
}

/// One eligible request the filter looks after.
#[derive(Debug)]
pub struct Session {
    plan: AttemptPlan,
    replay: Replay,
    cluster: Option<String>,
    phase: Phase,
    best: Last,
    failover: Option<Failover>,
}

impl Session {
    /// The session of a request under `policy` whose `headers` came at `now` (the whole
    /// request when `end_of_stream`). `route_cluster` reads the cluster the host routed the
    /// request to; it is called only for `first_attempt: "callout"` without a `cluster`.
    pub fn start(
        policy: &RetryPolicy,
        headers: Vec<(String, Vec<u8>)>,
        end_of_stream: bool,
        now: Instant,
        route_cluster: impl FnOnce() -> Option<String>,
    ) -> Start {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| core::str::from_utf8(v).ok())
        };
        let declared = find("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let eligibility = policy.eligibility(
            find(":method").unwrap_or(""),
            find(policy.idempotency_key_header()),
            declared,
        );
        let replayed = eligibility
            .is_eligible()
            .then(|| replayable(headers))
            .flatten();
        let Some(replayed) = replayed else {
            return Start::Ineligible;
        };
        let callout = policy.first_attempt() == FirstAttempt::Callout;
        // Envoy turns a Pause in `on_http_request_headers` into StopAllIterationAndWatermark: a
        // paused request's body never reaches the filter. So the whole request must be in the
        // headers for the filter to send it itself.
        if callout && !end_of_stream {
            return Start::Ineligible;
        }
        let cluster = policy.cluster().map(str::to_string).or_else(|| {
            if callout {
                route_cluster()
            } else {
                None
            }
        });
        if callout && cluster.is_none() {
            return Start::NoCluster;
        }
        Start::Track(Session {
            plan: AttemptPlan::new(policy, eligibility, now),
            replay: Replay {
                headers: replayed,
                body: Vec::new(),
                complete: end_of_stream,
            },
            cluster,
            // The first attempt of `first_attempt: "callout"` goes at once.
            phase: if callout {
                Phase::Waiting { due: now }
            } else {
                Phase::FirstAttempt
            },
            best: Last::Nothing,
            failover: None,
        })
    }

    /// The value of the replayed request header `name`.
    pub fn replayed_header(&self, name: &str) -> Option<&str> {
        self.replay
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Retries fail over along the picker's host list (`failover`).
    pub fn fail_over(&mut self, failover: Failover) {
        self.failover = Some(failover);
    }

    /// The cluster attempts go to, once known.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// Attempts made so far, the one under way or decided on included.
    pub fn attempts(&self) -> u32 {
        self.plan.attempts()
    }

    /// Whether the request's body is still being copied while the router sends it.
    pub fn copies_body(&self) -> bool {
        self.phase == Phase::FirstAttempt && !self.replay.complete
    }

    /// Copies a chunk of the request's body (the last when `end_of_stream`); `false` when the
    /// body grows beyond `max_body`: the request cannot be replayed, and the session is over
    /// (count it as ineligible).
    pub fn add_body(&mut self, policy: &RetryPolicy, chunk: &[u8], end_of_stream: bool) -> bool {
        let length = self.replay.body.len().saturating_add(chunk.len());
        if u64::try_from(length).unwrap_or(u64::MAX) > policy.max_body() {
            return false;
        }
        self.replay.body.extend_from_slice(chunk);
        self.replay.complete = end_of_stream;
        true
    }

    /// Whether the router's attempt is under way. Request trailers then end the session
    /// (callouts carry no trailers here: a request with trailers is not replayed).
    pub fn first_attempt_under_way(&self) -> bool {
        self.phase == Phase::FirstAttempt
    }

    /// What a response arriving on the stream is.
    pub fn response_role(&self) -> ResponseRole {
        match self.phase {
            Phase::FirstAttempt => ResponseRole::Attempt,
            Phase::Answered => ResponseRole::Own,
            Phase::Waiting { .. } | Phase::InFlight { .. } => ResponseRole::Foreign,
        }
    }

    /// Whether the session holds the stream (waits for or sends a further attempt): the held
    /// response's body and trailers wait with it, and a stream that ends now was abandoned.
    pub fn pending(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. } | Phase::InFlight { .. })
    }

    /// When the next attempt is due, if the session waits for one.
    pub fn due(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { due } => Some(due),
            _ => None,
        }
    }

    /// Whether an attempt is out as a callout (its answer is awaited).
    pub fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::InFlight { .. })
    }

    /// Judges the router's response at `now` ([`ResponseRole::Attempt`] only).
    /// `route_cluster` reads the route's cluster when the session has none and the response
    /// calls for a look at retrying; `withdraw` takes a retry from the budget; `skip` tells
    /// whether a listed host's breaker refuses a retry.
    #[allow(clippy::too_many_arguments)]
    pub fn router_response(
        &mut self,
        policy: &RetryPolicy,
        answer: RouterAnswer<'_>,
        now: Instant,
        rng: &mut impl Rng,
        route_cluster: impl FnOnce() -> Option<String>,
        withdraw: impl FnOnce() -> bool,
        skip: impl FnMut(&str) -> bool,
    ) -> RouterStep {
        let status = answer.status;
        let outcome = answer.failure.unwrap_or(Outcome::Response(Response {
            status,
            retry_after: answer.retry_after,
            rate_limit_reset: answer.rate_limit_reset,
        }));
        if !self.replay.complete {
            self.plan.body_incomplete();
        }
        if self.cluster.is_none() && (answer.failure.is_some() || !(200..400).contains(&status)) {
            self.cluster = route_cluster();
        }
        let no_cluster = self.cluster.is_none();
        let decision = if no_cluster {
            RetryDecision::GiveUp(GiveUpReason::NotRetryable)
        } else {
            self.plan.decide(policy, &outcome, now, rng, withdraw)
        };
        // A retry with no listed host left to go to is not made.
        let out_of_hosts = matches!(decision, RetryDecision::RetryAfter(_))
            && self
                .failover
                .as_mut()
                .filter(|f| f.next(skip) == NextHost::Exhausted)
                .map(|f| f.exhausted = true)
                .is_some();
        match decision {
            RetryDecision::RetryAfter(delay) if !out_of_hosts => {
                self.phase = Phase::Waiting {
                    due: now.saturating_add(delay),
                };
                self.best = Last::Held;
                RouterStep::Hold {
                    due: now.saturating_add(delay),
                }
            }
            decision => {
                let reason = match decision {
                    RetryDecision::GiveUp(reason) => reason,
                    RetryDecision::RetryAfter(_) => GiveUpReason::NotRetryable,
                };
                let headers = policy
                    .attempt_header()
                    .map(|name| attempt_headers(name, 1, self.failover.as_ref()))
                    .unwrap_or_default();
                RouterStep::PassOn {
                    reason,
                    headers,
                    out_of_hosts,
                    no_cluster,
                }
            }
        }
    }

    /// The attempt due now of a waiting session. `skip` tells whether a listed host's breaker
    /// refuses a retry.
    pub fn next_attempt(
        &mut self,
        policy: &RetryPolicy,
        now: Instant,
        skip: impl FnMut(&str) -> bool,
    ) -> Next {
        if !matches!(self.phase, Phase::Waiting { .. }) {
            return Next::Idle;
        }
        self.phase = Phase::Answered;
        let timeout = self.plan.attempt_timeout(policy, now);
        // The plan counted this attempt as made when it decided on it.
        let made_before = self.plan.attempts().saturating_sub(1);
        if timeout.is_zero() {
            return Next::Stop {
                why: Stop::Deadline,
                attempts: made_before,
            };
        }
        // A retry on a picker route goes to the key's next host (the first attempt, a
        // callout of `first_attempt: "callout"`, to the one the picker chose).
        let mut host = None;
        if let Some(failover) = self.failover.as_mut() {
            if self.plan.attempts() > 1 {
                match failover.next(skip) {
                    NextHost::Host(h) => host = Some(h.to_string()),
                    NextHost::Exhausted => {
                        failover.exhausted = true;
                        return Next::Stop {
                            why: Stop::HostsExhausted,
                            attempts: made_before,
                        };
                    }
                }
            }
        }
        Next::Send { timeout, host }
    }

    /// The request of the attempt [`Next::Send`] named: the replayed headers (the
    /// `host_header` set to `host` when failing over) and the body, if any.
    pub fn attempt_request<'a>(
        &'a self,
        host_header: &str,
        host: Option<&'a str>,
    ) -> (Vec<(&'a str, &'a str)>, Option<&'a [u8]>) {
        let headers = self
            .replay
            .headers
            .iter()
            .map(|(k, v)| match host {
                Some(h) if k == host_header => (k.as_str(), h),
                _ => (k.as_str(), v.as_str()),
            })
            .collect();
        let body = (!self.replay.body.is_empty()).then_some(self.replay.body.as_slice());
        (headers, body)
    }

    /// The attempt [`Next::Send`] named went out at `now` with `timeout`, to `host`.
    pub fn sent(&mut self, now: Instant, timeout: Duration, host: Option<String>) -> Sent {
        let retry = self.plan.attempts() > 1;
        let mut failover = false;
        if let (Some(h), Some(f)) = (host, self.failover.as_mut()) {
            failover = true;
            f.tried.push(h);
        }
        self.phase = Phase::InFlight { sent: now, timeout };
        Sent { retry, failover }
    }

    /// The host refused to send the attempt [`Next::Send`] named: the attempts to end the
    /// session after ([`Session::end`]).
    pub fn refused(&self) -> u32 {
        self.plan.attempts().saturating_sub(1)
    }

    /// Ends a waiting session's retries now (no tick would ever send the next attempt): the
    /// attempts to end it after, or `None` if it was not waiting.
    pub fn abandon_wait(&mut self) -> Option<u32> {
        if !matches!(self.phase, Phase::Waiting { .. }) {
            return None;
        }
        self.phase = Phase::Answered;
        Some(self.plan.attempts().saturating_sub(1))
    }

    /// Judges a callout's answer (`Err`: none usable) at `now`. `withdraw` takes a retry from
    /// the budget.
    pub fn callout_answer(
        &mut self,
        policy: &RetryPolicy,
        answer: Result<Answer, Unusable>,
        now: Instant,
        rng: &mut impl Rng,
        withdraw: impl FnOnce() -> bool,
    ) -> AnswerStep {
        let Phase::InFlight { sent, timeout } = self.phase else {
            return AnswerStep::Ignore;
        };
        self.phase = Phase::Answered;
        let decision = match &answer {
            Err(Unusable::TooLarge) => RetryDecision::GiveUp(GiveUpReason::NotRetryable),
            Err(Unusable::Failed) => self
                .plan
                .decide(policy, &Outcome::Reset, now, rng, withdraw),
            Ok(a) => {
                let outcome =
                    callout_failure(a.status, &a.body, now.saturating_since(sent), timeout)
                        .unwrap_or_else(|| {
                            Outcome::Response(Response {
                                status: a.status,
                                retry_after: a.header("retry-after"),
                                rate_limit_reset: a.header("x-ratelimit-reset"),
                            })
                        });
                self.plan.decide(policy, &outcome, now, rng, withdraw)
            }
        };
        self.best = core::mem::replace(&mut self.best, Last::Nothing).after(answer);
        match decision {
            RetryDecision::RetryAfter(delay) => {
                let due = now.saturating_add(delay);
                self.phase = Phase::Waiting { due };
                AnswerStep::Wait { due }
            }
            RetryDecision::GiveUp(reason) => AnswerStep::Finish {
                reason,
                recovered: reason == GiveUpReason::NotRetryable && self.plan.attempts() > 1,
                attempts: self.plan.attempts(),
            },
        }
    }

    /// How the session ends for the client after `attempts` attempts: the best response so
    /// far, with the attempt headers.
    pub fn end(&mut self, policy: &RetryPolicy, attempts: u32) -> Ending {
        let extra: Headers = policy
            .attempt_header()
            .map(|name| attempt_headers(name, attempts, self.failover.as_ref()))
            .unwrap_or_default();
        match core::mem::replace(&mut self.best, Last::Nothing) {
            // Not one attempt left the filter (only the first attempt of `first_attempt:
            // "callout"` can fail so, inside the stream's own request callback, which then
            // returns Continue).
            Last::Nothing => Ending::Router,
            Last::Held => Ending::Resume { headers: extra },
            Last::Answer(answer) => {
                let mut headers: Headers = answer
                    .headers
                    .into_iter()
                    .filter(|(name, _)| handed_on_response_header(name))
                    .collect();
                for (name, value) in extra {
                    headers.retain(|(k, _)| *k != name);
                    headers.push((name, value));
                }
                self.phase = Phase::Answered;
                Ending::Reply(Answer {
                    status: answer.status,
                    headers,
                    body: answer.body,
                })
            }
            Last::Failed => {
                self.phase = Phase::Answered;
                Ending::Reply(no_response(attempts, extra))
            }
        }
    }
}

/// The request headers to replay, as text: `None` when a value is not UTF-8 (a callout takes
/// text, and a replay must not alter the request).
fn replayable(headers: Vec<(String, Vec<u8>)>) -> Option<Headers> {
    headers
        .into_iter()
        .filter(|(name, _)| replayed_request_header(name))
        .map(|(name, value)| String::from_utf8(value).ok().map(|v| (name, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;
    use crate::retry::{Eligibility, RetryConfig};
    use alloc::vec;

    const HOST_HEADER: &str = "x-envoy-original-dst-host";

    /// One policy; `extra` (JSON object members) adds or replaces fields. No jitter: delays
    /// are the backoff's base, doubled each retry.
    fn policy(extra: &str) -> RetryPolicy {
        let mut spec: serde_json::Value = serde_json::from_str(
            r#"{"name": "p", "cluster": "backend", "max_attempts": 3,
                "backoff": {"base": "10ms", "cap": "100ms", "jitter": "none"},
                "per_try_timeout": "1s", "deadline": "5s",
                "attempt_header": "x-keel-attempts"}"#,
        )
        .unwrap();
        let extra: serde_json::Value =
            serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let json = serde_json::json!({ "policies": [spec] }).to_string();
        let config: RetryConfig = crate::config::load(json.as_bytes()).unwrap();
        config.policies()[0].clone()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(n: u64) -> Instant {
        Instant::ZERO.saturating_add(ms(n))
    }

    fn get(method: &str) -> Vec<(String, Vec<u8>)> {
        vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), b"/x".to_vec()),
            ("connection".into(), b"keep-alive".to_vec()),
        ]
    }

    fn track(start: Start) -> Session {
        match start {
            Start::Track(s) => s,
            other => panic!("not tracked: {other:?}"),
        }
    }

    fn response(status: u16) -> RouterAnswer<'static> {
        RouterAnswer {
            status,
            failure: None,
            retry_after: None,
            rate_limit_reset: None,
        }
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                ("content-length".into(), "2".into()),
                ("x-keel-attempts".into(), "upstream's".into()),
            ],
            body: body.as_bytes().to_vec(),
        }
    }

    fn no_cluster() -> Option<String> {
        panic!("the route's cluster is not needed here")
    }

    /// A session whose router response (a 500) was held for a retry at 10 ms.
    fn held(p: &RetryPolicy) -> Session {
        let mut s = track(Session::start(p, get("GET"), true, at(0), no_cluster));
        let mut rng = SeededRng::new(1);
        let step = s.router_response(
            p,
            response(500),
            at(0),
            &mut rng,
            no_cluster,
            || true,
            |_| false,
        );
        assert_eq!(step, RouterStep::Hold { due: at(10) });
        s
    }

    /// Sends the due attempt of `s` at `now`.
    fn send(s: &mut Session, p: &RetryPolicy, now: Instant) {
        match s.next_attempt(p, now, |_| false) {
            Next::Send { timeout, host } => {
                s.sent(now, timeout, host);
            }
            other => panic!("no attempt sent: {other:?}"),
        }
    }

    #[test]
    fn start_leaves_ineligible_requests_alone_and_copies_the_rest() {
        let p = policy("");
        assert!(matches!(
            Session::start(&p, get("POST"), true, at(0), no_cluster),
            Start::Ineligible
        ));
        let mut headers = get("GET");
        headers.push(("x-binary".into(), vec![0xff]));
        assert!(matches!(
            Session::start(&p, headers, true, at(0), no_cluster),
            Start::Ineligible
        ));
        let mut post = get("POST");
        post.push(("idempotency-key".into(), b"k1".to_vec()));
        let s = track(Session::start(&p, post, false, at(0), no_cluster));
        assert!(s.first_attempt_under_way());
        assert!(s.copies_body());
        assert_eq!(s.response_role(), ResponseRole::Attempt);
        assert_eq!(s.cluster(), Some("backend"));
        assert_eq!(s.replayed_header(":path"), Some("/x"));
        // Hop-by-hop headers are not replayed.
        assert_eq!(s.replayed_header("connection"), None);
        assert!(!s.pending());
    }

    #[test]
    fn a_callout_first_attempt_needs_the_whole_request_and_a_cluster() {
        let p = policy(r#", "first_attempt": "callout""#);
        assert!(matches!(
            Session::start(&p, get("GET"), false, at(0), no_cluster),
            Start::Ineligible
        ));
        let s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        assert_eq!(s.due(), Some(at(0)), "the first callout goes at once");
        let routed = policy(r#", "first_attempt": "callout", "cluster": null"#);
        let s = track(Session::start(&routed, get("GET"), true, at(0), || {
            Some("route".into())
        }));
        assert_eq!(s.cluster(), Some("route"));
        assert!(matches!(
            Session::start(&routed, get("GET"), true, at(0), || None),
            Start::NoCluster
        ));
    }

    #[test]
    fn a_body_is_copied_up_to_max_body() {
        let p = policy(r#", "max_body": 4"#);
        let mut s = track(Session::start(&p, get("GET"), false, at(0), no_cluster));
        assert!(s.add_body(&p, b"ab", false));
        assert!(s.copies_body());
        assert!(s.add_body(&p, b"cd", true));
        assert!(!s.copies_body());
        let (_, body) = s.attempt_request(HOST_HEADER, None);
        assert_eq!(body, Some(&b"abcd"[..]));
        let mut s = track(Session::start(&p, get("GET"), false, at(0), no_cluster));
        assert!(s.add_body(&p, b"abc", false));
        assert!(!s.add_body(&p, b"de", true), "5 bytes are over max_body");
    }

    #[test]
    fn a_good_router_response_is_handed_on_with_the_attempt_header() {
        let p = policy("");
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let mut rng = SeededRng::new(1);
        let step = s.router_response(
            &p,
            response(200),
            at(1),
            &mut rng,
            no_cluster,
            || panic!("a 200 takes nothing from the budget"),
            |_| false,
        );
        assert_eq!(
            step,
            RouterStep::PassOn {
                reason: GiveUpReason::NotRetryable,
                headers: vec![("x-keel-attempts".into(), "1".into())],
                out_of_hosts: false,
                no_cluster: false,
            }
        );
    }

    #[test]
    fn a_refused_budget_and_an_incomplete_body_hand_the_response_on() {
        let p = policy("");
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let mut rng = SeededRng::new(1);
        let step = s.router_response(
            &p,
            response(503),
            at(1),
            &mut rng,
            no_cluster,
            || false,
            |_| false,
        );
        assert!(matches!(
            step,
            RouterStep::PassOn {
                reason: GiveUpReason::BudgetExhausted,
                ..
            }
        ));
        let mut s = track(Session::start(&p, get("GET"), false, at(0), no_cluster));
        let step = s.router_response(
            &p,
            response(503),
            at(1),
            &mut rng,
            no_cluster,
            || true,
            |_| false,
        );
        assert!(matches!(
            step,
            RouterStep::PassOn {
                reason: GiveUpReason::NotEligible(Eligibility::BodyIncomplete),
                ..
            }
        ));
    }

    #[test]
    fn without_a_cluster_failures_are_handed_on() {
        let p = policy(r#", "cluster": null"#);
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let mut rng = SeededRng::new(1);
        let mut asked = false;
        let step = s.router_response(
            &p,
            response(502),
            at(1),
            &mut rng,
            || {
                asked = true;
                None
            },
            || panic!("no budget without a cluster"),
            |_| false,
        );
        assert!(asked, "a failure looks for the route's cluster");
        assert!(matches!(
            step,
            RouterStep::PassOn {
                reason: GiveUpReason::NotRetryable,
                no_cluster: true,
                ..
            }
        ));
        // With the route's cluster the failure is retried.
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let step = s.router_response(
            &p,
            response(502),
            at(1),
            &mut rng,
            || Some("c".into()),
            || true,
            |_| false,
        );
        assert_eq!(step, RouterStep::Hold { due: at(11) });
        assert_eq!(s.cluster(), Some("c"));
    }

    #[test]
    fn a_held_response_waits_then_its_retry_goes_out() {
        let p = policy("");
        let mut s = held(&p);
        assert_eq!(s.response_role(), ResponseRole::Foreign);
        assert!(s.pending());
        assert_eq!(s.due(), Some(at(10)));
        assert_eq!(s.attempts(), 2, "the decided retry counts");
        let next = s.next_attempt(&p, at(10), |_| false);
        assert_eq!(
            next,
            Next::Send {
                timeout: Duration::from_secs(1),
                host: None
            }
        );
        assert_eq!(s.response_role(), ResponseRole::Own);
        assert_eq!(s.next_attempt(&p, at(10), |_| false), Next::Idle);
        let sent = s.sent(at(10), Duration::from_secs(1), None);
        assert_eq!(
            sent,
            Sent {
                retry: true,
                failover: false
            }
        );
        assert!(s.in_flight());
        let (headers, body) = s.attempt_request(HOST_HEADER, None);
        assert_eq!(headers, vec![(":method", "GET"), (":path", "/x")]);
        assert_eq!(body, None);
    }

    #[test]
    fn a_good_retry_answer_replaces_the_held_response() {
        let p = policy("");
        let mut s = held(&p);
        send(&mut s, &p, at(10));
        let mut rng = SeededRng::new(1);
        let step = s.callout_answer(&p, Ok(answer(200, "ok")), at(20), &mut rng, || panic!());
        assert_eq!(
            step,
            AnswerStep::Finish {
                reason: GiveUpReason::NotRetryable,
                recovered: true,
                attempts: 2
            }
        );
        // The answer's framing and its own attempt header give way to the filter's.
        assert_eq!(
            s.end(&p, 2),
            Ending::Reply(Answer {
                status: 200,
                headers: vec![
                    ("content-type".into(), "text/plain".into()),
                    ("x-keel-attempts".into(), "2".into()),
                ],
                body: b"ok".to_vec(),
            })
        );
        assert_eq!(s.response_role(), ResponseRole::Own);
    }

    #[test]
    fn a_failed_callout_keeps_the_held_response() {
        let p = policy("");
        let mut s = held(&p);
        send(&mut s, &p, at(10));
        let mut rng = SeededRng::new(1);
        // A reset is retried (attempt 3 of 3), 20 ms later.
        let step = s.callout_answer(&p, Err(Unusable::Failed), at(15), &mut rng, || true);
        assert_eq!(step, AnswerStep::Wait { due: at(35) });
        send(&mut s, &p, at(35));
        let step = s.callout_answer(&p, Err(Unusable::Failed), at(40), &mut rng, || true);
        assert_eq!(
            step,
            AnswerStep::Finish {
                reason: GiveUpReason::MaxAttempts,
                recovered: false,
                attempts: 3
            }
        );
        assert_eq!(
            s.end(&p, 3),
            Ending::Resume {
                headers: vec![("x-keel-attempts".into(), "3".into())]
            }
        );
    }

    #[test]
    fn the_best_answer_rule() {
        let a = answer(500, "a");
        assert_eq!(Last::Nothing.after(Err(Unusable::Failed)), Last::Failed);
        assert_eq!(Last::Failed.after(Err(Unusable::Failed)), Last::Failed);
        assert_eq!(Last::Held.after(Err(Unusable::Failed)), Last::Held);
        assert_eq!(
            Last::Answer(a.clone()).after(Err(Unusable::Failed)),
            Last::Answer(a.clone())
        );
        let b = answer(503, "b");
        assert_eq!(
            Last::Answer(a).after(Ok(b.clone())),
            Last::Answer(b.clone())
        );
        assert_eq!(Last::Held.after(Ok(b.clone())), Last::Answer(b));
        assert_eq!(
            Last::Held.after(Err(Unusable::TooLarge)),
            Last::Answer(too_large())
        );
    }

    #[test]
    fn the_synthesized_answers() {
        let big = too_large();
        assert_eq!(big.status, 502);
        assert_eq!(
            big.body,
            b"the upstream's answer is larger than 16777216 bytes\n"
        );
        let none = no_response(3, vec![("x-keel-attempts".into(), "3".into())]);
        assert_eq!(none.status, 503);
        assert_eq!(
            none.headers,
            vec![
                ("content-type".into(), "text/plain".into()),
                ("x-keel-attempts".into(), "3".into())
            ]
        );
        assert_eq!(
            none.body,
            b"no response from the upstream after 3 attempts\n"
        );
    }

    #[test]
    fn callout_first_attempts_that_never_answer_end_in_the_filters_503() {
        let p = policy(r#", "first_attempt": "callout", "max_attempts": 2"#);
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        send(&mut s, &p, at(0));
        let mut rng = SeededRng::new(1);
        let step = s.callout_answer(&p, Err(Unusable::Failed), at(1), &mut rng, || true);
        assert_eq!(step, AnswerStep::Wait { due: at(11) });
        send(&mut s, &p, at(11));
        let step = s.callout_answer(&p, Err(Unusable::Failed), at(12), &mut rng, || true);
        assert!(matches!(
            step,
            AnswerStep::Finish {
                reason: GiveUpReason::MaxAttempts,
                attempts: 2,
                ..
            }
        ));
        match s.end(&p, 2) {
            Ending::Reply(a) => {
                assert_eq!(a.status, 503);
                assert_eq!(a.body, b"no response from the upstream after 2 attempts\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_callout_first_attempt_that_could_not_go_leaves_the_request_to_the_router() {
        let p = policy(r#", "first_attempt": "callout""#);
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        assert!(matches!(
            s.next_attempt(&p, at(0), |_| false),
            Next::Send { .. }
        ));
        assert_eq!(s.refused(), 0);
        assert_eq!(s.end(&p, 0), Ending::Router);
    }

    #[test]
    fn a_too_large_answer_is_not_retried_and_becomes_a_502() {
        let p = policy("");
        let mut s = held(&p);
        send(&mut s, &p, at(10));
        let mut rng = SeededRng::new(1);
        let step = s.callout_answer(&p, Err(Unusable::TooLarge), at(11), &mut rng, || {
            panic!("not retried")
        });
        assert!(matches!(
            step,
            AnswerStep::Finish {
                reason: GiveUpReason::NotRetryable,
                attempts: 2,
                ..
            }
        ));
        match s.end(&p, 2) {
            Ending::Reply(a) => assert_eq!(a.status, 502),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_callouts_timeout_reply_counts_as_a_timeout() {
        let p = policy(r#", "retry_on": ["reset"]"#);
        let reset = RouterAnswer {
            failure: Some(Outcome::Reset),
            ..response(503)
        };
        let mut rng = SeededRng::new(1);
        let retried = |s: &mut Session, rng: &mut SeededRng, answer: Answer, now: Instant| {
            assert!(matches!(
                s.router_response(&p, reset, at(0), rng, no_cluster, || true, |_| false),
                RouterStep::Hold { .. }
            ));
            send(s, &p, at(10));
            s.callout_answer(&p, Ok(answer), now, rng, || true)
        };
        // A 504 once the callout's timeout passed is the timeout, which `reset` retries...
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let step = retried(&mut s, &mut rng, answer(504, ""), at(1010));
        assert!(matches!(step, AnswerStep::Wait { .. }), "{step:?}");
        // ...and so is Envoy's timeout reply at any time; the upstream's own quick 504 is not.
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let step = retried(
            &mut s,
            &mut rng,
            answer(504, "upstream request timeout"),
            at(20),
        );
        assert!(matches!(step, AnswerStep::Wait { .. }), "{step:?}");
        let mut s = track(Session::start(&p, get("GET"), true, at(0), no_cluster));
        let step = retried(&mut s, &mut rng, answer(504, "gateway"), at(20));
        assert!(
            matches!(
                step,
                AnswerStep::Finish {
                    reason: GiveUpReason::NotRetryable,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn retries_stop_at_the_deadline() {
        let p = policy(r#", "deadline": "15ms", "per_try_timeout": "15ms""#);
        let mut s = held(&p);
        assert_eq!(
            s.next_attempt(&p, at(15), |_| false),
            Next::Stop {
                why: Stop::Deadline,
                attempts: 1
            }
        );
        assert_eq!(
            s.end(&p, 1),
            Ending::Resume {
                headers: vec![("x-keel-attempts".into(), "1".into())]
            }
        );
    }

    #[test]
    fn a_wait_no_tick_ends_is_abandoned_with_the_attempts_made() {
        let p = policy("");
        let mut s = held(&p);
        assert_eq!(s.abandon_wait(), Some(1));
        assert_eq!(s.abandon_wait(), None);
        assert!(!s.pending());
    }

    fn failing_over(p: &RetryPolicy) -> Session {
        let mut headers = get("GET");
        headers.push((HOST_HEADER.into(), b"a".to_vec()));
        let mut s = track(Session::start(p, headers, true, at(0), no_cluster));
        let first = s.replayed_header(HOST_HEADER).unwrap().to_string();
        s.fail_over(Failover::new(
            first,
            vec!["a".into(), "b".into(), "c".into()],
        ));
        s
    }

    #[test]
    fn retries_fail_over_along_the_host_list_skipping_open_breakers() {
        let p = policy("");
        let mut s = failing_over(&p);
        let mut rng = SeededRng::new(1);
        let step = s.router_response(
            &p,
            response(500),
            at(0),
            &mut rng,
            no_cluster,
            || true,
            |h| h == "b",
        );
        assert_eq!(step, RouterStep::Hold { due: at(10) });
        let Next::Send { timeout, host } = s.next_attempt(&p, at(10), |h| h == "b") else {
            panic!("no attempt");
        };
        assert_eq!(host.as_deref(), Some("c"));
        let (headers, _) = s.attempt_request(HOST_HEADER, host.as_deref());
        assert!(headers.contains(&(HOST_HEADER, "c")));
        assert_eq!(
            s.sent(at(10), timeout, host),
            Sent {
                retry: true,
                failover: true
            }
        );
        let step = s.callout_answer(&p, Ok(answer(500, "c")), at(11), &mut rng, || true);
        assert_eq!(step, AnswerStep::Wait { due: at(31) });
        // Only the skipped host is left, and its breaker still refuses.
        assert_eq!(
            s.next_attempt(&p, at(31), |h| h == "b"),
            Next::Stop {
                why: Stop::HostsExhausted,
                attempts: 2
            }
        );
        match s.end(&p, 2) {
            Ending::Reply(a) => assert_eq!(
                a.headers[1..],
                [
                    (
                        "x-keel-attempts".to_string(),
                        "2; hosts-exhausted".to_string()
                    ),
                    (ATTEMPT_HOSTS_HEADER.to_string(), "a,c".to_string()),
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retry_with_no_host_left_is_not_made() {
        let p = policy("");
        let mut s = failing_over(&p);
        let mut rng = SeededRng::new(1);
        let step = s.router_response(
            &p,
            response(500),
            at(0),
            &mut rng,
            no_cluster,
            || true,
            |_| true,
        );
        assert_eq!(
            step,
            RouterStep::PassOn {
                reason: GiveUpReason::NotRetryable,
                headers: vec![
                    ("x-keel-attempts".into(), "1; hosts-exhausted".into()),
                    (ATTEMPT_HOSTS_HEADER.into(), "a".into()),
                ],
                out_of_hosts: true,
                no_cluster: false,
            }
        );
    }

    #[test]
    fn attempt_headers_without_failover_name_only_the_count() {
        assert_eq!(
            attempt_headers("x-a", 4, None),
            vec![("x-a".to_string(), "4".to_string())]
        );
    }
}
