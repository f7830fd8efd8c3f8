//! `keel_idempotency.wasm`: idempotency keys at the proxy. A request with an `Idempotency-Key`
//! runs upstream once; its answer is stored and replayed to repeats; a repeat while the first
//! is in flight gets `409`, the same key with another request `422`, a missing key where one is
//! required `400` (IETF draft-ietf-httpapi-idempotency-key-header-07, Stripe's API).
//!
//! The glue is thin: it reads the key, the client identity, the route and the request (method,
//! path, fingerprint headers, body) from the host, asks `keel_core::idempotency` for the
//! decision against the store, and turns it into a continue or a local reply. The first
//! request's response is copied as it passes (headers, then each body chunk, up to `max_body`)
//! and stored before its last chunk goes on to the client. Configuration reference:
//! `docs/config/idempotency.md`.
//!
//! A keyed request with a body is decided when its body is complete (the fingerprint hashes
//! it). Envoy's proxy-wasm host turns a filter's Pause of the request headers into "stop
//! everything", so the filter cannot hold the headers and read the body: it lets the headers
//! go on and buffers the body (Pause on each chunk), and Envoy's buffer filter
//! (`envoy.filters.http.buffer`) placed right after it keeps the router from starting the
//! upstream request before the decision. Without it the upstream would see the headers of a
//! repeat (then a reset): `docs/config/idempotency.md` says so.
//!
//! With `"store": {"redis": ...}` the records live in Redis, reached through Webdis in an Envoy
//! cluster (`keel_proxy::fleet`): the request is paused while the store answers (one callout
//! timeout in all, `keel_core::idempotency::redis::RedisBegin` says which command comes next),
//! and the last piece of the first request's answer is held until its record is written, so
//! that a repeat on any proxy of the fleet finds it.
//!
//! Host capabilities: shared data (the per-process store), HTTP callouts (the Redis store),
//! `send_http_response` (replays and refusals), request body buffering, and the
//! `response.flags` property (an answer Envoy made up for a reset or a timeout is not stored).

use std::rc::Rc;

use keel_core::circuit_breaker::Response as Outcome;
use keel_core::fleet::{Command, RedisStore, StoreError};
use keel_core::idempotency::policy::MAX_STORED_HEADER_BYTES;
use keel_core::idempotency::redis::{self as redis_store, RedisBegin, Step};
use keel_core::idempotency::{
    problem, Begin, Completion, Decision, FailureMode, Fingerprint, IdempotencyPolicy, Record,
    ScopedKey, SharedRing, Store, StoredResponse, Ticket,
};
use keel_core::routes;
use keel_core::time::Duration;
use keel_proxy::metrics::{Counter, Family};
use keel_proxy::reply::LocalReply;
use keel_proxy::stage::Stage;
use keel_proxy::store::{HostStore, CAS_ATTEMPTS};
use keel_proxy::{clock, fleet, log, request, response, routing, stream};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

const FILTER: &str = "idempotency";

/// The filter's root context, run by `stage` (an Envoy filter of its own, or a pipeline stage).
pub fn stage(_context_id: u32, stage: Stage) -> Box<dyn RootContext> {
    Box::new(IdempotencyRoot {
        stage,
        policies: Rc::new(Vec::new()),
    })
}

/// The filter as an Envoy filter of its own: what `keel_idempotency.wasm`, and `keel.wasm` for
/// root_id `idempotency`, install with `set_root_context`.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    stage(context_id, Stage::alone())
}

/// `keel.idempotency.<policy>.<what>`.
struct Metrics {
    stored: Counter,
    replayed: Counter,
    conflicts: Counter,
    mismatches: Counter,
    evictions: Counter,
    store_errors: Counter,
    missing_key: Counter,
    released: Counter,
}

impl Metrics {
    fn new(policy: &str) -> Metrics {
        let family = Family::new(FILTER, policy);
        let m = |what: &str| family.counter(what);
        Metrics {
            stored: m("stored"),
            replayed: m("replayed"),
            conflicts: m("conflicts"),
            mismatches: m("mismatches"),
            evictions: m("evictions"),
            store_errors: m("store_errors"),
            missing_key: m("missing_key"),
            released: m("released"),
        }
    }
}

/// Where a policy's records live.
enum Backend {
    /// This Envoy process's shared data.
    Ring(SharedRing),
    /// Redis through Webdis, fleet-wide.
    Redis(RedisStore),
}

struct Policy {
    rules: IdempotencyPolicy,
    backend: Backend,
    metrics: Metrics,
}

struct IdempotencyRoot {
    stage: Stage,
    policies: Rc<Vec<Policy>>,
}

/// Reads and validates the configuration through the core's one entry point.
fn load(bytes: &[u8]) -> Result<Vec<IdempotencyPolicy>, keel_core::config::ConfigError> {
    keel_core::config::load(bytes)
}

impl Context for IdempotencyRoot {}

impl RootContext for IdempotencyRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(rules) = self.stage.load(FILTER, load) else {
            return false;
        };
        let mut described = Vec::with_capacity(rules.len());
        let mut list = Vec::with_capacity(rules.len());
        for rules in rules {
            let backend = match &rules.store {
                Store::SharedData { max_entries, .. } => {
                    let ring = SharedRing::new(
                        &rules.prefix(),
                        *max_entries,
                        rules.record_budget(),
                        CAS_ATTEMPTS,
                    );
                    // Every key of the store exists before traffic, so that every write is a
                    // versioned compare-and-swap (Envoy's shared data has no "set if absent").
                    if let Err(e) = ring.prepare(&HostStore) {
                        log::warn(
                            FILTER,
                            &format!(
                                "policy {}: could not create its store in shared data ({e:?})",
                                rules.name
                            ),
                        );
                    }
                    described.push(format!(
                        "{} (shared data: {} entries, at most {} bytes)",
                        rules.name,
                        ring.entries(),
                        ring.max_bytes()
                    ));
                    Backend::Ring(ring)
                }
                Store::Redis(store) => {
                    described.push(format!(
                        "{} (redis: cluster {}, timeout {} ms, records up to {} bytes)",
                        rules.name,
                        store.cluster,
                        store.timeout.as_millis(),
                        rules.record_budget()
                    ));
                    Backend::Redis(store.clone())
                }
            };
            list.push(Policy {
                metrics: Metrics::new(&rules.name),
                backend,
                rules,
            });
        }
        log::info(
            FILTER,
            &format!("configured policies: {}", described.join(", ")),
        );
        self.policies = Rc::new(list);
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(IdempotencyStream {
            policies: Rc::clone(&self.policies),
            phase: Phase::Untracked,
            stage: self.stage.clone(),
            context_id,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Where one request is.
enum Phase {
    /// No policy applies, or the filter answered: nothing to do.
    Untracked,
    /// The request's body is being read to finish its fingerprint (the request is held).
    Reading {
        policy: usize,
        key: ScopedKey,
        fingerprint: Fingerprint,
        read: usize,
    },
    /// The request is held while the Redis store answers `token`.
    Asking {
        policy: usize,
        begin: RedisBegin,
        token: u32,
    },
    /// The first request with its key is upstream.
    Claimed {
        policy: usize,
        ticket: Claim,
        fingerprint: u64,
    },
    /// Its answer is being copied.
    Capturing {
        policy: usize,
        ticket: Claim,
        fingerprint: u64,
        response: StoredResponse,
    },
    /// The response is held while the Redis store writes (`SET` the answer, or `DEL` the
    /// claim given up).
    Writing {
        policy: usize,
        command: &'static str,
        stored: bool,
        token: u32,
    },
}

/// A claimed key in its store.
enum Claim {
    /// The shared-data ring's ticket.
    Ring(Ticket),
    /// The in-flight record written to Redis.
    Redis(Record),
}

struct IdempotencyStream {
    policies: Rc<Vec<Policy>>,
    phase: Phase,
    stage: Stage,
    context_id: u32,
}

fn refuse(status: u32, title: &str, detail: &str, extra: Option<(&str, String)>) {
    let mut headers = vec![(
        "content-type".to_string(),
        "application/problem+json".to_string(),
    )];
    if let Some((k, v)) = extra {
        headers.push((k.to_string(), v));
    }
    LocalReply {
        status,
        headers,
        body: problem(status as u16, title, detail),
    }
    .send();
}

impl IdempotencyStream {
    /// Decides a request whose fingerprint is complete; the action to return.
    fn begin(&mut self, policy: usize, key: ScopedKey, fingerprint: u64) -> Action {
        let policies = Rc::clone(&self.policies);
        let Some(p) = policies.get(policy) else {
            return Action::Continue;
        };
        let rules = &p.rules;
        let now = clock::now();
        let ring = match &p.backend {
            Backend::Ring(ring) => ring,
            Backend::Redis(store) => {
                let (begin, step) = RedisBegin::start(
                    &rules.name,
                    store,
                    key,
                    fingerprint,
                    now,
                    rules.in_flight_timeout,
                    rules.retry_after,
                );
                return self.redis_step(policy, begin, step);
            }
        };
        let began = ring.begin(
            &HostStore,
            key,
            fingerprint,
            now,
            rules.in_flight_timeout,
            rules.retry_after,
        );
        match began {
            Ok((begin, evicted)) => {
                if evicted > 0 {
                    p.metrics.evictions.increment(u64::from(evicted));
                }
                match begin {
                    Begin::Claimed(ticket) => {
                        self.phase = Phase::Claimed {
                            policy,
                            ticket: Claim::Ring(ticket),
                            fingerprint,
                        };
                        Action::Continue
                    }
                    Begin::Decided(d) => {
                        self.phase = Phase::Untracked;
                        answer(p, d)
                    }
                }
            }
            Err(e) => {
                self.phase = Phase::Untracked;
                fail(p, &format!("{e:?}"))
            }
        }
    }

    /// Acts on a step of the Redis store's decision; the action for the held request
    /// (`Pause` while the store has not answered).
    fn redis_step(&mut self, policy: usize, mut begin: RedisBegin, step: Step) -> Action {
        let policies = Rc::clone(&self.policies);
        let Some(p) = policies.get(policy) else {
            return Action::Continue;
        };
        let Backend::Redis(store) = &p.backend else {
            return Action::Continue;
        };
        let mut step = step;
        loop {
            match step {
                Step::Send(command, left) => match send(store, &command, left) {
                    Ok(token) => {
                        self.phase = Phase::Asking {
                            policy,
                            begin,
                            token,
                        };
                        return Action::Pause;
                    }
                    Err(e) => step = begin.on_answer(Err(e), clock::now()),
                },
                Step::Claimed(record) => {
                    self.phase = Phase::Claimed {
                        policy,
                        ticket: Claim::Redis(record),
                        fingerprint: begin.fingerprint(),
                    };
                    return Action::Continue;
                }
                Step::Decided(d) => {
                    self.phase = Phase::Untracked;
                    return answer(p, d);
                }
                Step::Failed(e) => {
                    self.phase = Phase::Untracked;
                    return fail(p, &e.to_string());
                }
            }
        }
    }

    /// Stores the copied answer; the key is released when it cannot be kept. The action for
    /// the response: `Pause` while Redis writes it.
    fn complete(&mut self) -> Action {
        let Phase::Capturing {
            policy,
            ticket,
            fingerprint,
            response,
        } = std::mem::replace(&mut self.phase, Phase::Untracked)
        else {
            return Action::Continue;
        };
        let policies = Rc::clone(&self.policies);
        let Some(p) = policies.get(policy) else {
            return Action::Continue;
        };
        let now = clock::now();
        match (&p.backend, ticket) {
            (Backend::Ring(ring), Claim::Ring(ticket)) => {
                match ring.complete(&HostStore, ticket, fingerprint, response, now, p.rules.ttl) {
                    Ok(Completion::Stored) => p.metrics.stored.increment(1),
                    Ok(Completion::TooLarge) => p.metrics.released.increment(1),
                    Ok(Completion::Evicted) => {}
                    Err(e) => {
                        p.metrics.store_errors.increment(1);
                        log::warn(FILTER, &format!("policy {}: could not store an answer ({e:?}); the key stays in flight until its timeout", p.rules.name));
                    }
                }
                Action::Continue
            }
            (Backend::Redis(store), Claim::Redis(claim)) => {
                match redis_store::completion(
                    &p.rules.name,
                    &claim,
                    fingerprint,
                    response,
                    now,
                    p.rules.ttl,
                ) {
                    Some(command) => self.write(policy, store, &command, true),
                    None => {
                        p.metrics.released.increment(1);
                        let command = redis_store::release(&p.rules.name, &claim);
                        self.write(policy, store, &command, false)
                    }
                }
            }
            _ => Action::Continue,
        }
    }

    /// Gives the claim up: the answer is not kept, the key runs again. The action for the
    /// response: `Pause` while Redis deletes the claim.
    fn release(&mut self) -> Action {
        let (policy, ticket) = match std::mem::replace(&mut self.phase, Phase::Untracked) {
            Phase::Claimed { policy, ticket, .. } | Phase::Capturing { policy, ticket, .. } => {
                (policy, ticket)
            }
            other => {
                self.phase = other;
                return Action::Continue;
            }
        };
        let policies = Rc::clone(&self.policies);
        let Some(p) = policies.get(policy) else {
            return Action::Continue;
        };
        p.metrics.released.increment(1);
        match (&p.backend, ticket) {
            (Backend::Ring(ring), Claim::Ring(ticket)) => {
                if ring.release(&HostStore, ticket).is_err() {
                    p.metrics.store_errors.increment(1);
                }
                Action::Continue
            }
            (Backend::Redis(store), Claim::Redis(claim)) => {
                let command = redis_store::release(&p.rules.name, &claim);
                self.write(policy, store, &command, false)
            }
            _ => Action::Continue,
        }
    }

    /// Sends a write to Redis and holds the response until it is answered (a callout sent
    /// from a stream ends with the stream, and the record must be there before the client
    /// has the answer).
    fn write(
        &mut self,
        policy: usize,
        store: &RedisStore,
        command: &Command,
        stored: bool,
    ) -> Action {
        match send(store, command, store.timeout) {
            Ok(token) => {
                self.phase = Phase::Writing {
                    policy,
                    command: if stored { "SET" } else { "DEL" },
                    stored,
                    token,
                };
                Action::Pause
            }
            Err(e) => {
                if let Some(p) = self.policies.get(policy) {
                    write_failed(p, &e);
                }
                Action::Continue
            }
        }
    }
}

/// Answers a request from its key's record.
fn answer(p: &Policy, decision: Decision) -> Action {
    let rules = &p.rules;
    match decision {
        Decision::Replay(answer) => {
            p.metrics.replayed.increment(1);
            let mut headers: Vec<(String, String)> = answer
                .headers
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect();
            headers.push((rules.replay_header.clone(), "true".to_string()));
            LocalReply {
                status: u32::from(answer.status),
                headers,
                body: answer.body,
            }
            .send();
        }
        Decision::Conflict { retry_after } => {
            p.metrics.conflicts.increment(1);
            refuse(
                409,
                "A request with this Idempotency-Key is in progress",
                "Retry after the first request has completed.",
                Some(("retry-after", retry_after.as_secs_ceil().to_string())),
            );
        }
        Decision::Mismatch => {
            p.metrics.mismatches.increment(1);
            refuse(
                422,
                "Idempotency-Key reused with another request",
                "This key was used with a different method, path, body or headers.",
                None,
            );
        }
        // A store claims instead of deciding First.
        Decision::First => return Action::Continue,
    }
    Action::Pause
}

/// Sends `command` to `store` with the callout timeout `timeout`.
fn send(store: &RedisStore, command: &Command, timeout: Duration) -> Result<u32, StoreError> {
    let store = RedisStore {
        timeout,
        ..store.clone()
    };
    fleet::send(&store, command)
}

/// A failing store: the policy's failure mode, one log line, the `store_errors` metric.
fn fail(p: &Policy, error: &str) -> Action {
    let rules = &p.rules;
    p.metrics.store_errors.increment(1);
    match rules.failure_mode {
        FailureMode::Allow => {
            log::warn(
                FILTER,
                &format!(
                    "policy {}: store failed ({error}); the request goes upstream untracked",
                    rules.name
                ),
            );
            Action::Continue
        }
        FailureMode::Deny => {
            log::warn(
                FILTER,
                &format!(
                    "policy {}: store failed ({error}); the request is refused",
                    rules.name
                ),
            );
            refuse(
                503,
                "Idempotency store unavailable",
                "The request was not sent; try again later.",
                Some(("retry-after", "1".into())),
            );
            Action::Pause
        }
    }
}

/// A write to Redis that failed: one log line, the `store_errors` metric; the claim stays
/// until its in-flight timeout.
fn write_failed(p: &Policy, e: &StoreError) {
    p.metrics.store_errors.increment(1);
    log::warn(
        FILTER,
        &format!(
            "policy {}: could not write to the store ({e}); the key stays in flight until its timeout",
            p.rules.name
        ),
    );
}

impl Context for IdempotencyStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        match std::mem::replace(&mut self.phase, Phase::Untracked) {
            Phase::Asking {
                policy,
                mut begin,
                token,
            } if token == token_id => {
                let answer = fleet::answer(begin.command_name(), num_headers, body_size);
                let step = begin.on_answer(answer, clock::now());
                if self.redis_step(policy, begin, step) == Action::Continue {
                    self.stage.resume_request(self.context_id);
                }
            }
            Phase::Writing {
                policy,
                command,
                stored,
                token,
            } if token == token_id => {
                if let Some(p) = self.policies.get(policy) {
                    match fleet::answer(command, num_headers, body_size) {
                        Ok(_) if stored => p.metrics.stored.increment(1),
                        Ok(_) => {}
                        Err(e) => write_failed(p, &e),
                    }
                }
                self.stage.resume_response(self.context_id);
            }
            other => self.phase = other,
        }
    }
}

impl HttpContext for IdempotencyStream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let policies = Rc::clone(&self.policies);
        let route = routing::route_name();
        let Some((at, p)) = routes::first(&policies, route.as_deref(), |p| &p.rules) else {
            return Action::Continue;
        };
        let rules = &p.rules;
        let method = request::header(":method").unwrap_or_default();
        if !rules.applies_to_method(&String::from_utf8_lossy(&method)) {
            return Action::Continue;
        }
        let key = match request::header(&rules.header) {
            Some(key) if !key.is_empty() && key.len() <= rules.max_key_length => key,
            Some(key) => {
                p.metrics.missing_key.increment(1);
                refuse(
                    400,
                    "Invalid Idempotency-Key",
                    &format!(
                        "The {} header must be 1 to {} bytes, got {}.",
                        rules.header,
                        rules.max_key_length,
                        key.len()
                    ),
                    None,
                );
                return Action::Pause;
            }
            None if rules.required => {
                p.metrics.missing_key.increment(1);
                refuse(
                    400,
                    "Idempotency-Key is missing",
                    &format!("This operation requires the {} header.", rules.header),
                    None,
                );
                return Action::Pause;
            }
            None => return Action::Continue,
        };
        let client = request::key(&rules.client).unwrap_or_default();
        let scoped = ScopedKey::new(
            &rules.name,
            route.as_deref().unwrap_or("").as_bytes(),
            &client,
            &key,
        );
        let path = request::header(":path").unwrap_or_default();
        let values: Vec<Option<Vec<u8>>> = rules
            .fingerprint_headers
            .iter()
            .map(|h| request::header(h))
            .collect();
        let fingerprint = Fingerprint::new(&method, &path, values.iter().map(|v| v.as_deref()));
        if end_of_stream {
            return self.begin(at, scoped, fingerprint.finish());
        }
        // The decision needs the body's hash. A proxy-wasm filter cannot hold the headers and
        // still see the body (Envoy's host turns a Pause here into "stop everything"), so the
        // headers go on, to Envoy's buffer filter placed after this one, which holds the
        // request until its end; this filter buffers the body until its decision.
        self.phase = Phase::Reading {
            policy: at,
            key: scoped,
            fingerprint,
            read: 0,
        };
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Phase::Reading {
            policy,
            key,
            fingerprint,
            read,
        } = &mut self.phase
        else {
            return Action::Continue;
        };
        let (policy, key) = (*policy, *key);
        let limit = self
            .policies
            .get(policy)
            .map_or(0, |p| p.rules.max_request_body);
        if body_size as u64 > limit {
            self.phase = Phase::Untracked;
            refuse(
                413,
                "Request body too large for an Idempotency-Key",
                &format!("Requests with an Idempotency-Key may carry at most {limit} bytes."),
                None,
            );
            return Action::Pause;
        }
        let chunk = stream::request_body_from(*read, body_size);
        fingerprint.body(&chunk);
        *read += chunk.len();
        if !end_of_stream {
            // Buffer: the host keeps the body until the decision.
            return Action::Pause;
        }
        let fp = fingerprint.finish();
        self.begin(policy, key, fp)
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        // A body that ends with trailers: the body is complete now.
        if let Phase::Reading {
            policy,
            key,
            fingerprint,
            ..
        } = &self.phase
        {
            let (policy, key, fp) = (*policy, *key, fingerprint.finish());
            return self.begin(policy, key, fp);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Phase::Claimed {
            policy,
            fingerprint,
            ..
        } = self.phase
        else {
            return Action::Continue;
        };
        let policies = Rc::clone(&self.policies);
        let Some(p) = policies.get(policy) else {
            return Action::Continue;
        };
        let status = response::status();
        let outcome = Outcome::from_envoy(status, response::flags().unwrap_or(0));
        let Outcome::Status(status) = outcome else {
            // Envoy answered in the upstream's place (reset, timeout): whether the upstream
            // acted is unknown, so the key stays in flight until its timeout.
            self.phase = Phase::Untracked;
            return Action::Continue;
        };
        let too_long = response::content_length().is_some_and(|n| n > p.rules.max_body);
        if !p.rules.store_responses.stores(status) || too_long {
            return self.release();
        }
        let headers: Vec<(String, Vec<u8>)> = response::headers()
            .into_iter()
            .filter(|(k, _)| StoredResponse::keeps_header(k))
            .collect();
        let answer = StoredResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if answer.header_bytes() > MAX_STORED_HEADER_BYTES {
            return self.release();
        }
        let Phase::Claimed { ticket, .. } = std::mem::replace(&mut self.phase, Phase::Untracked)
        else {
            return Action::Continue;
        };
        self.phase = Phase::Capturing {
            policy,
            ticket,
            fingerprint,
            response: answer,
        };
        if end_of_stream {
            return self.complete();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Phase::Writing { .. } = self.phase {
            // The rest of the body waits with the held part until Redis has answered.
            return Action::Pause;
        }
        let Phase::Capturing {
            policy, response, ..
        } = &mut self.phase
        else {
            return Action::Continue;
        };
        let max = self.policies.get(*policy).map_or(0, |p| p.rules.max_body);
        if (response.body.len() + body_size) as u64 > max {
            return self.release();
        }
        response.body.extend_from_slice(&response::body(body_size));
        if end_of_stream {
            // Stored before the last chunk reaches the client: a repeat sent after the client
            // has the whole answer finds it.
            return self.complete();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if let Phase::Writing { .. } = self.phase {
            return Action::Pause;
        }
        self.complete()
    }
}
