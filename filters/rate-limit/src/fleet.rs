//! Fleet-wide policies (`store`): the host side of `keel_core::rate_limit::fleet`.
//!
//! A lease-mode request takes a token from its process's lease in shared data
//! ([`process::acquire`]); when the lease is empty it sends the call itself, or waits for the
//! one in flight, never longer than the store's timeout. The refresher (one VM per process,
//! elected with a lease in shared data) refills active slots from the root context's tick. A
//! strict-mode request asks Redis for its token and waits for the answer. Every answer, to
//! whichever context it comes (root or stream), goes to [`answer`], which finds its call by
//! token in the VM's table.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use keel_core::discovery::lease as election;
use keel_core::fleet::{Script, StoreError};
use keel_core::rate_limit::fleet::health::Transition;
use keel_core::rate_limit::fleet::lease::Applied;
use keel_core::rate_limit::fleet::process::{self, Refill};
use keel_core::rate_limit::fleet::remote::{self, parse_grants, BucketAsk, BucketGrant, KeyAnswer};
use keel_core::rate_limit::fleet::{
    redis_key, Ask, FleetLimit, FleetMode, LeaseRules, OnStoreError, Take,
};
use keel_core::rate_limit::{Decision, Limiter};
use keel_core::time::{Duration, Instant};
use keel_proxy::metrics::{Counter, Family, Gauge};
use keel_proxy::store::HostStore;
use keel_proxy::{clock, fleet as wire, log, store};

use crate::{Flow, Policies, Policy, Ticker, FILTER, TICK};

/// The shared-data key of the refresher's election (one refresher per process).
pub(crate) const REFRESHER_KEY: &str = "keel/rate_limit/refresher";
/// The callout timeout of the refresher's calls, which no request waits on.
const REFILL_TIMEOUT: Duration = Duration::from_secs(1);
/// The most keys in one call.
const KEYS_PER_CALL: usize = 32;

/// A fleet-wide policy's glue, computed when the configuration loads.
pub(crate) struct FleetGlue {
    pub(crate) limit: FleetLimit,
    /// By limiter index.
    rules: Vec<LeaseRules>,
    /// The `local` fallback's limiters, by limiter index.
    fallback: Vec<Limiter>,
    metrics: FleetMetrics,
}

struct FleetMetrics {
    calls: Counter,
    errors: Counter,
    key_errors: Counter,
    leases: Counter,
    granted: Counter,
    returned: Counter,
    fallback: Counter,
    fallback_ms: Counter,
    down: Gauge,
}

impl FleetGlue {
    pub(crate) fn new(limit: FleetLimit, limiters: &[&Limiter], name: &str) -> FleetGlue {
        let family = Family::new(FILTER, name);
        FleetGlue {
            rules: limiters.iter().map(|l| limit.rules(l)).collect(),
            fallback: limiters.iter().map(|l| limit.fallback(l)).collect(),
            metrics: FleetMetrics {
                calls: family.counter("store_calls"),
                errors: family.counter("store_errors"),
                key_errors: family.counter("key_errors"),
                leases: family.counter("leases"),
                granted: family.counter("tokens_granted"),
                returned: family.counter("tokens_returned"),
                fallback: family.counter("store_fallback"),
                fallback_ms: family.counter("store_fallback_ms"),
                down: family.gauge("store_down"),
            },
            limit,
        }
    }

    fn rules(&self, index: usize) -> Option<&LeaseRules> {
        self.rules.get(index).or_else(|| self.rules.first())
    }
}

/// What a fleet-wide policy decided for a request.
pub(crate) enum FleetStep {
    /// Admitted, with the fleet's numbers for the headers.
    Admit { remaining: u64, reset: Duration },
    /// Refused.
    Deny {
        retry_after: Duration,
        reset: Duration,
    },
    /// Paused until an answer or the timeout.
    Wait,
}

/// What to do with an answer.
enum Then {
    /// The refresher's refills: apply them.
    Refills,
    /// A strict request's token.
    Strict {
        flow: Rc<Flow>,
        index: usize,
        fp: u64,
    },
    /// A lease-mode request that sent the call for its empty lease.
    Lease {
        flow: Rc<Flow>,
        index: usize,
        fp: u64,
        slot: u32,
    },
}

struct Pending {
    policies: Rc<Policies>,
    at: usize,
    name: String,
    asks: Vec<BucketAsk>,
    refills: Vec<Refill>,
    deadline: Instant,
    then: Then,
}

/// A request waiting for a call another request (or the refresher) sent.
struct Waiter {
    flow: Rc<Flow>,
    at: usize,
    index: usize,
    fp: u64,
    slot: u32,
    deadline: Instant,
}

/// One VM's fleet state, shared by its root and streams (inside the [`Ticker`]).
pub(crate) struct FleetVm {
    me: u64,
    script: Script,
    loaded: Cell<bool>,
    calls: RefCell<HashMap<u32, Pending>>,
    waiters: RefCell<Vec<Waiter>>,
    next_refresh: Cell<Instant>,
    refresher: Cell<bool>,
    /// Whether this VM has served a request of a fleet-wide policy: a VM that serves none
    /// (Envoy's main thread has one per filter) is preferred as the refresher.
    serves: Cell<bool>,
}

impl Default for FleetVm {
    fn default() -> FleetVm {
        // 64 random bits per VM, as discovery's poller election draws them.
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(clock::now().as_nanos());
        FleetVm {
            me: hasher.finish(),
            script: remote::script(),
            loaded: Cell::new(true),
            calls: RefCell::new(HashMap::new()),
            waiters: RefCell::new(Vec::new()),
            next_refresh: Cell::new(Instant::ZERO),
            refresher: Cell::new(false),
            serves: Cell::new(false),
        }
    }
}

impl FleetVm {
    /// Whether requests wait for answers (the tick must then run every [`TICK`]).
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters
            .try_borrow()
            .map(|w| !w.is_empty())
            .unwrap_or(true)
    }
}

/// A lease-mode or strict decision for key `fp` (tier and key fingerprint) with the limiter at
/// `index` of the policy at `at`.
#[allow(clippy::too_many_arguments)] // One request's context.
pub(crate) fn decide(
    policies: &Rc<Policies>,
    at: usize,
    index: usize,
    fp: u64,
    flow: &Rc<Flow>,
    ticker: &Ticker,
    now: Instant,
) -> FleetStep {
    let Some(policy) = policies.list.get(at) else {
        return FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        };
    };
    let Some(glue) = policy.fleet.as_ref() else {
        return FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        };
    };
    ticker.fleet.serves.set(true);
    let (_, limiter) = policy.rules.limiter_at(index);
    let timeout = glue.limit.store.timeout;
    let deadline = now.saturating_add(timeout);
    if glue.limit.mode == FleetMode::Strict {
        let ask = FleetLimit::bucket_ask(
            limiter,
            redis_key(&policy.rules.name, fp),
            Ask { ask: 1, back: 0 },
        );
        let then = Then::Strict {
            flow: Rc::clone(flow),
            index,
            fp,
        };
        if send(
            ticker,
            policies,
            at,
            vec![ask],
            Vec::new(),
            deadline,
            then,
            timeout,
        ) {
            return FleetStep::Wait;
        }
        return fallback(policy, glue, index, fp, now);
    }
    let Some(rules) = glue.rules(index) else {
        return FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        };
    };
    let taken = process::acquire(
        &HostStore,
        &policy.prefix,
        &policy.rules.table,
        fp,
        index as u64,
        now,
        rules,
        store::CAS_ATTEMPTS,
    );
    let Ok(taken) = taken else {
        // Shared data contended or refused: fail open, as the local limiter does.
        policy.count(crate::Count::FailedOpen, ticker);
        return FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        };
    };
    match taken.take {
        Take::Granted { remaining, reset } => FleetStep::Admit { remaining, reset },
        Take::Empty { retry_after, reset } => FleetStep::Deny { retry_after, reset },
        Take::Occupied => FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        },
        Take::KeyFailed => fallback(policy, glue, index, fp, now),
        Take::Wait { .. } => {
            if process::store_down(&HostStore, &policy.prefix) {
                // Nobody waits for the store while it is down, and no call is sent from here:
                // a stream's calls are cancelled when it ends, so its answer would never come.
                // The refresher's calls (from the root context, past pending marks while the
                // store is down) are the probes that bring it back.
                return fallback(policy, glue, index, fp, now);
            }
            match taken.refill {
                Some(refill) => {
                    let ask = bucket_ask(policy, &refill);
                    let then = Then::Lease {
                        flow: Rc::clone(flow),
                        index,
                        fp,
                        slot: taken.slot,
                    };
                    if send(
                        ticker,
                        policies,
                        at,
                        vec![ask],
                        vec![refill],
                        deadline,
                        then,
                        timeout,
                    ) {
                        return FleetStep::Wait;
                    }
                    let _ = process::call_failed(
                        &HostStore,
                        &policy.prefix,
                        &refill,
                        store::CAS_ATTEMPTS,
                    );
                    fallback(policy, glue, index, fp, now)
                }
                None => {
                    if wait(ticker, flow, at, index, fp, taken.slot, deadline) {
                        return FleetStep::Wait;
                    }
                    fallback(policy, glue, index, fp, now)
                }
            }
        }
    }
}

fn wait(
    ticker: &Ticker,
    flow: &Rc<Flow>,
    at: usize,
    index: usize,
    fp: u64,
    slot: u32,
    deadline: Instant,
) -> bool {
    let Ok(mut waiters) = ticker.fleet.waiters.try_borrow_mut() else {
        return false;
    };
    waiters.push(Waiter {
        flow: Rc::clone(flow),
        at,
        index,
        fp,
        slot,
        deadline,
    });
    drop(waiters);
    ticker.wake()
}

fn bucket_ask(policy: &Policy, refill: &Refill) -> BucketAsk {
    let (_, limiter) = policy
        .rules
        .limiter_at(usize::try_from(refill.limiter).unwrap_or(0));
    FleetLimit::bucket_ask(
        limiter,
        redis_key(&policy.rules.name, refill.holder),
        refill.ask,
    )
}

/// The policy's `on_store_error` for a request that needed the store.
fn fallback(policy: &Policy, glue: &FleetGlue, index: usize, fp: u64, now: Instant) -> FleetStep {
    glue.metrics.fallback.increment(1);
    let (_, limiter) = policy.rules.limiter_at(index);
    match glue.limit.on_store_error {
        OnStoreError::Allow => FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        },
        OnStoreError::Deny => FleetStep::Deny {
            retry_after: limiter.rate().emission_interval(),
            reset: Duration::ZERO,
        },
        OnStoreError::Local => {
            let local = glue.fallback.get(index).unwrap_or(limiter);
            let decision = policy.rules.table.acquire(
                &HostStore,
                &policy.prefix,
                local,
                fp,
                now,
                1,
                Duration::ZERO,
                store::CAS_ATTEMPTS,
            );
            match decision {
                Ok(Decision::Deny { retry_after, reset }) => FleetStep::Deny { retry_after, reset },
                Ok(Decision::Allow { remaining, reset }) => FleetStep::Admit { remaining, reset },
                Ok(Decision::Delay { reset, .. }) => FleetStep::Admit {
                    remaining: 0,
                    reset,
                },
                Err(_) => FleetStep::Admit {
                    remaining: 0,
                    reset: Duration::ZERO,
                },
            }
        }
    }
}

/// Sends one call; false when the host refused to send it.
#[allow(clippy::too_many_arguments)] // A call and what to do with its answer.
fn send(
    ticker: &Ticker,
    policies: &Rc<Policies>,
    at: usize,
    asks: Vec<BucketAsk>,
    refills: Vec<Refill>,
    deadline: Instant,
    then: Then,
    timeout: Duration,
) -> bool {
    let Some(glue) = policies.list.get(at).and_then(|p| p.fleet.as_ref()) else {
        return false;
    };
    let vm = &ticker.fleet;
    let command = remote::command(&vm.script, vm.loaded.get(), &asks);
    let mut store = glue.limit.store.clone();
    store.timeout = timeout.max(Duration::from_millis(1));
    glue.metrics.calls.increment(1);
    let returned: u64 = asks.iter().map(|a| a.back).sum();
    let Ok(token) = wire::send(&store, &command) else {
        glue.metrics.errors.increment(1);
        return false;
    };
    if returned > 0 {
        glue.metrics.returned.increment(returned);
    }
    let Ok(mut calls) = vm.calls.try_borrow_mut() else {
        return false;
    };
    calls.insert(
        token,
        Pending {
            policies: Rc::clone(policies),
            at,
            name: command.name().to_string(),
            asks,
            refills,
            deadline,
            then,
        },
    );
    true
}

fn send_refills(
    ticker: &Ticker,
    policies: &Rc<Policies>,
    at: usize,
    refills: Vec<Refill>,
    now: Instant,
) {
    let Some(policy) = policies.list.get(at) else {
        return;
    };
    let Some(glue) = policy.fleet.as_ref() else {
        return;
    };
    // No request waits on these calls: a slow answer still brings its tokens.
    let timeout = glue.limit.store.timeout.max(REFILL_TIMEOUT);
    for chunk in refills.chunks(KEYS_PER_CALL) {
        let asks = chunk.iter().map(|r| bucket_ask(policy, r)).collect();
        if !send(
            ticker,
            policies,
            at,
            asks,
            chunk.to_vec(),
            now.saturating_add(timeout),
            Then::Refills,
            timeout,
        ) {
            for refill in chunk {
                let _ =
                    process::call_failed(&HostStore, &policy.prefix, refill, store::CAS_ATTEMPTS);
            }
            record(policy, glue, Err(&StoreError::NotSent), now);
        }
    }
}

/// Records an outcome in the store's health; logs and sets the gauge on a transition.
fn record(policy: &Policy, glue: &FleetGlue, outcome: Result<(), &StoreError>, now: Instant) {
    let transition = process::record_health(
        &HostStore,
        &policy.prefix,
        outcome.is_ok(),
        now,
        store::CAS_ATTEMPTS,
    );
    let name = &policy.rules.name;
    match (transition, outcome) {
        (Ok(Some(Transition::WentDown)), Err(e)) => {
            glue.metrics.down.set(1);
            log::warn(
                FILTER,
                &format!(
                    "policy {name}: the fleet store failed: {e}; requests that need it take on_store_error \"{}\" until it answers",
                    glue.limit.on_store_error.as_str()
                ),
            );
        }
        (Ok(Some(Transition::CameBack { since })), _) => {
            glue.metrics.down.set(0);
            log::info(
                FILTER,
                &format!(
                    "policy {name}: the fleet store answers again after {}; the limit is shared again",
                    now.saturating_since(since)
                ),
            );
        }
        _ => {}
    }
}

/// An answer to one of this VM's calls, whichever context it came to.
pub(crate) fn answer(ticker: &Ticker, token: u32, num_headers: usize, body_size: usize) {
    let pending = match ticker.fleet.calls.try_borrow_mut() {
        Ok(mut calls) => calls.remove(&token),
        Err(_) => None,
    };
    let Some(p) = pending else {
        return;
    };
    let Some(policy) = p.policies.list.get(p.at) else {
        return;
    };
    let Some(glue) = policy.fleet.as_ref() else {
        return;
    };
    let now = clock::now();
    let vm = &ticker.fleet;
    let result =
        wire::answer(&p.name, num_headers, body_size).and_then(|r| parse_grants(&r, p.asks.len()));
    if result == Err(StoreError::NoScript) && p.name == "EVALSHA" {
        // Redis lost its scripts (a restart): send the source once, within the time left.
        vm.loaded.set(false);
        let left = p.deadline.saturating_since(now);
        if !left.is_zero() {
            let policies = Rc::clone(&p.policies);
            if send(
                ticker,
                &policies,
                p.at,
                p.asks.clone(),
                p.refills.clone(),
                p.deadline,
                p.then,
                left,
            ) {
                return;
            }
            return fail_after_resend(ticker, policy, glue, &p.refills, now);
        }
    }
    match result {
        Ok(answers) => {
            if p.name == "EVAL" {
                vm.loaded.set(true);
            }
            // Redis answered: the store is up, whatever it said about single keys.
            record(policy, glue, Ok(()), now);
            let total: u64 = answers
                .iter()
                .filter_map(|a| a.as_ref().ok())
                .map(|g| g.granted)
                .sum();
            if total > 0 {
                glue.metrics.leases.increment(1);
                glue.metrics.granted.increment(total);
            }
            for (refill, answer) in p.refills.iter().zip(&answers) {
                key_answered(policy, glue, refill, answer, now);
            }
            match answers.first() {
                // Strict mode's or a waiting request's key failed alone: its on_store_error.
                Some(Err(_)) => then_failed(ticker, &p.policies, p.at, p.then, now),
                first => then_ok(
                    ticker,
                    &p.policies,
                    p.at,
                    p.then,
                    first.and_then(|a| a.as_ref().ok()).copied(),
                    p.deadline,
                    now,
                ),
            }
        }
        Err(e) => {
            glue.metrics.errors.increment(1);
            record(policy, glue, Err(&e), now);
            for refill in &p.refills {
                let _ =
                    process::call_failed(&HostStore, &policy.prefix, refill, store::CAS_ATTEMPTS);
            }
            then_failed(ticker, &p.policies, p.at, p.then, now);
        }
    }
}

/// Applies one key's part of an answer to its slot: the grant, or the store's failure for that
/// key alone (logged once per change, naming the key and the error).
fn key_answered(
    policy: &Policy,
    glue: &FleetGlue,
    refill: &Refill,
    answer: &KeyAnswer,
    now: Instant,
) {
    let name = &policy.rules.name;
    match answer {
        Ok(grant) => {
            let Some(rules) = glue.rules(usize::try_from(refill.limiter).unwrap_or(0)) else {
                return;
            };
            let applied = process::answered(
                &HostStore,
                &policy.prefix,
                refill,
                grant,
                now,
                rules,
                store::CAS_ATTEMPTS,
            );
            match applied {
                Ok(Applied::Lost) => {
                    log::debug(FILTER, "a lease answer came for a key that lost its slot");
                }
                Ok(Applied::Recovered) => log::info(
                    FILTER,
                    &format!(
                        "policy {name}: the fleet store answers again for key {}; its limit is shared again",
                        redis_key(name, refill.holder)
                    ),
                ),
                _ => {}
            }
        }
        Err(e) => {
            glue.metrics.key_errors.increment(1);
            let newly =
                process::key_failed(&HostStore, &policy.prefix, refill, now, store::CAS_ATTEMPTS);
            if newly == Ok(true) {
                log::warn(
                    FILTER,
                    &format!(
                        "policy {name}: the fleet store failed for key {} alone: {e}; its requests take on_store_error \"{}\" until it answers for it; other keys are not affected",
                        redis_key(name, refill.holder),
                        glue.limit.on_store_error.as_str()
                    ),
                );
            }
        }
    }
}

fn fail_after_resend(
    _ticker: &Ticker,
    policy: &Policy,
    glue: &FleetGlue,
    refills: &[Refill],
    now: Instant,
) {
    record(policy, glue, Err(&StoreError::NotSent), now);
    for refill in refills {
        let _ = process::call_failed(&HostStore, &policy.prefix, refill, store::CAS_ATTEMPTS);
    }
}

#[allow(clippy::too_many_arguments)] // An answer and where it goes.
fn then_ok(
    ticker: &Ticker,
    policies: &Rc<Policies>,
    at: usize,
    then: Then,
    grant: Option<BucketGrant>,
    deadline: Instant,
    now: Instant,
) {
    let Some(policy) = policies.list.get(at) else {
        return;
    };
    match then {
        Then::Refills => {}
        Then::Strict { flow, index, .. } => {
            let (_, limiter) = policy.rules.limiter_at(index);
            let step = match grant {
                Some(g) if g.granted > 0 => FleetStep::Admit {
                    remaining: g.remaining,
                    reset: g.full_in,
                },
                Some(g) => FleetStep::Deny {
                    retry_after: limiter.rate().emission_interval(),
                    reset: g.full_in,
                },
                None => FleetStep::Admit {
                    remaining: 0,
                    reset: Duration::ZERO,
                },
            };
            crate::resolve(&flow, ticker, at, index, step);
        }
        Then::Lease {
            flow,
            index,
            fp,
            slot,
        } => look_again(
            ticker,
            policies,
            Waiter {
                flow,
                at,
                index,
                fp,
                slot,
                deadline,
            },
            now,
        ),
    }
}

fn then_failed(ticker: &Ticker, policies: &Rc<Policies>, at: usize, then: Then, now: Instant) {
    let Some(policy) = policies.list.get(at) else {
        return;
    };
    let Some(glue) = policy.fleet.as_ref() else {
        return;
    };
    let (flow, index, fp) = match then {
        Then::Refills => return,
        Then::Strict { flow, index, fp } => (flow, index, fp),
        Then::Lease {
            flow, index, fp, ..
        } => (flow, index, fp),
    };
    let step = fallback(policy, glue, index, fp, now);
    crate::resolve(&flow, ticker, at, index, step);
}

/// A waiting request looks at its slot again: decided, still waiting, or it sends a call.
fn look_again(ticker: &Ticker, policies: &Rc<Policies>, w: Waiter, now: Instant) {
    let Some(policy) = policies.list.get(w.at) else {
        return;
    };
    let Some(glue) = policy.fleet.as_ref() else {
        return;
    };
    let Some(rules) = glue.rules(w.index) else {
        return;
    };
    let timed_out = now.saturating_add(Duration::from_nanos(TICK.as_nanos() as u64)) >= w.deadline;
    if process::store_down(&HostStore, &policy.prefix) {
        let step = fallback(policy, glue, w.index, w.fp, now);
        return crate::resolve(&w.flow, ticker, w.at, w.index, step);
    }
    let taken = process::retake(
        &HostStore,
        &policy.prefix,
        w.slot,
        w.fp,
        w.index as u64,
        now,
        rules,
        store::CAS_ATTEMPTS,
    );
    let step = match taken {
        Err(_) => FleetStep::Admit {
            remaining: 0,
            reset: Duration::ZERO,
        },
        Ok(t) => match t.take {
            Take::Granted { remaining, reset } => FleetStep::Admit { remaining, reset },
            Take::Empty { retry_after, reset } => FleetStep::Deny { retry_after, reset },
            Take::Occupied => FleetStep::Admit {
                remaining: 0,
                reset: Duration::ZERO,
            },
            Take::KeyFailed => fallback(policy, glue, w.index, w.fp, now),
            Take::Wait { .. } if timed_out => fallback(policy, glue, w.index, w.fp, now),
            Take::Wait { .. } => {
                if let Some(refill) = t.refill {
                    let ask = bucket_ask(policy, &refill);
                    let left = w.deadline.saturating_since(now);
                    let then = Then::Lease {
                        flow: Rc::clone(&w.flow),
                        index: w.index,
                        fp: w.fp,
                        slot: w.slot,
                    };
                    if send(
                        ticker,
                        policies,
                        w.at,
                        vec![ask],
                        vec![refill],
                        w.deadline,
                        then,
                        left,
                    ) {
                        return;
                    }
                    let _ = process::call_failed(
                        &HostStore,
                        &policy.prefix,
                        &refill,
                        store::CAS_ATTEMPTS,
                    );
                    fallback(policy, glue, w.index, w.fp, now)
                } else {
                    let deadline = if w.deadline > now { w.deadline } else { now };
                    if wait(ticker, &w.flow, w.at, w.index, w.fp, w.slot, deadline) {
                        return;
                    }
                    fallback(policy, glue, w.index, w.fp, now)
                }
            }
        },
    };
    crate::resolve(&w.flow, ticker, w.at, w.index, step);
}

/// The refresher's election for this VM at `now`: whether it refreshes.
///
/// Discovery's lease ([`election`]), with one preference: a VM that serves no requests takes
/// the job over from one that does. Envoy gives every filter a VM on its main thread too, which
/// ticks but never gets a stream: there the refresher's calls and answers cost the workers
/// nothing, and no request waits behind them. A VM bids with its id's low bit set once it has
/// served a request; where every VM serves (a host without a main-thread VM), the first to
/// tick keeps the job as before.
fn elect(vm: &FleetVm, now: Instant, ttl: Duration) -> Result<bool, keel_core::store::UpdateError> {
    let serves = vm.serves.get();
    let me = if serves { vm.me | 1 } else { vm.me & !1 };
    keel_core::store::update(&HostStore, REFRESHER_KEY, store::CAS_ATTEMPTS, |old| {
        let current = old.and_then(election::PollerLease::decode).map(|lease| {
            if lease.holder | 1 == me | 1 {
                // This VM, perhaps bidding with the other bit since it served a request.
                election::PollerLease {
                    holder: me,
                    ..lease
                }
            } else if !serves && lease.holder & 1 == 1 {
                // Held by a VM that serves requests: this one, which does not, takes over.
                election::PollerLease {
                    expires_at: now,
                    ..lease
                }
            } else {
                lease
            }
        });
        let (next, held) = election::try_acquire(current, me, now, ttl);
        let stored = old.and_then(election::PollerLease::decode);
        let write = (stored != Some(next)).then(|| next.encode());
        (write, held)
    })
}

/// The root context's tick: waiting requests look again; the refresher refills.
pub(crate) fn tick(ticker: &Ticker, policies: &Rc<Policies>, now: Instant) {
    let waiters: Vec<Waiter> = match ticker.fleet.waiters.try_borrow_mut() {
        Ok(mut w) => w.drain(..).collect(),
        Err(_) => Vec::new(),
    };
    for w in waiters {
        let policies = Rc::clone(&w.flow.policies);
        look_again(ticker, &policies, w, now);
    }
    let vm = &ticker.fleet;
    let Some(every) = policies.fleet_refill else {
        return;
    };
    if now < vm.next_refresh.get() {
        return;
    }
    vm.next_refresh.set(now.saturating_add(every));
    let ttl = Duration::from_secs(1).max(every.saturating_mul(5));
    let holding = vm.refresher.get();
    let held = elect(vm, now, ttl).unwrap_or(holding);
    if held != holding {
        vm.refresher.set(held);
        if held {
            log::info(
                FILTER,
                &format!(
                    "this VM ({:016x}) now refreshes the fleet leases of its process",
                    vm.me
                ),
            );
        }
    }
    if !held {
        return;
    }
    for (at, policy) in policies.list.iter().enumerate() {
        let Some(glue) = policy.fleet.as_ref() else {
            continue;
        };
        if glue.limit.mode != FleetMode::Lease {
            continue;
        }
        let down = process::store_down(&HostStore, &policy.prefix);
        if down {
            glue.metrics.fallback_ms.increment(every.as_millis());
        }
        let rules = &glue.rules;
        let refills = process::refresh(
            &HostStore,
            &policy.prefix,
            now,
            |i| {
                let i = usize::try_from(i).unwrap_or(0);
                rules
                    .get(i)
                    .or_else(|| rules.first())
                    .copied()
                    .unwrap_or(LeaseRules {
                        refill: every,
                        max_lease: 1,
                        lease_ttl: every,
                        timeout: glue.limit.store.timeout,
                        interval: every,
                    })
            },
            down,
            store::CAS_ATTEMPTS,
        );
        if let Ok(refills) = refills {
            if !refills.is_empty() {
                send_refills(ticker, policies, at, refills, now);
            }
        }
    }
}
