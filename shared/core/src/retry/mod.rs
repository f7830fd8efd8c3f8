//! Retries: bounded, jittered, budgeted, and only of what is safe to repeat.
//!
//! The pure core of `keel_retry.wasm`. The pieces, each after the system that does it best:
//!
//! - [`backoff`]: exponential backoff with full (default), equal, decorrelated or no jitter,
//!   after the AWS architecture study; Envoy's 25 ms base and 10x cap as defaults.
//! - [`after`]: server pushback, `Retry-After` (seconds or HTTP date) and `X-RateLimit-Reset`,
//!   bounded like Envoy's (300 s).
//! - [`budget`]: the retry budget of Finagle, Linkerd and tower's `TpsBudget` (20 % of requests
//!   plus 10 per second over 10 s), its ring of slots shared by every worker thread through a
//!   compare-and-swap on shared data.
//! - [`eligibility`]: RFC 9110's idempotent methods, or any method with an `Idempotency-Key`
//!   (IETF draft); bodies up to `max_body`.
//! - [`condition`]: Envoy's `retry_on` conditions (`5xx`, `gateway-error`, `reset`,
//!   `connect-failure`, `retriable-4xx`, listed statuses) plus `rate-limited`.
//! - [`plan`]: one request's [`AttemptPlan`], whose [`RetryDecision`] is
//!   `RetryAfter(delay)` or `GiveUp(reason)`; at most 5 attempts, as gRPC caps them.
//! - [`attempt`]: how an attempt ended, read from what the host reports (Envoy's response code
//!   details and flags, its local replies to callouts), and which headers are replayed and
//!   handed on (RFC 9110's hop-by-hop fields are not).
//! - [`config`]: the JSON configuration and its validation, with field-path errors.
//!
//! # How the glue uses it
//!
//! 0. When the configuration loads: [`RetryBudget::ensure_shared`] for each policy, so that
//!    every later write to the budget is a versioned compare-and-swap.
//! 1. On request headers: pick the policy ([`RetryConfig::policy_for_route`]), compute the
//!    eligibility ([`RetryPolicy::eligibility`]); for an eligible request deposit one request
//!    in the budget ([`RetryBudget::deposit_shared`] under [`RetryPolicy::budget_key`]) and
//!    make an [`AttemptPlan`]. An ineligible request is left alone: it can never be retried,
//!    so it neither pays for a copy of its body nor earns retries for others. An eligible
//!    request's body is copied (up to `max_body`) so it can be replayed;
//!    [`AttemptPlan::body_received`] once a streamed body's length is known.
//! 2. On each attempt's end (the router's response for the first, a callout's for the others):
//!    [`AttemptPlan::decide`] with the [`Outcome`] ([`attempt::router_failure`] /
//!    [`attempt::callout_failure`] tell a failure from a response), the host clock, a seeded
//!    generator and a closure that calls [`RetryBudget::withdraw_shared`] (an error counts as
//!    a refusal: fail closed). `RetryAfter(d)`: hold the response, wait `d` on the root
//!    context's tick, send the next attempt as a callout to [`RetryPolicy::cluster`] (or the
//!    route's) with [`AttemptPlan::attempt_timeout`]. `GiveUp(reason)`: send the last response
//!    on, with [`RetryPolicy::attempt_header`] set to [`AttemptPlan::attempts`], and count
//!    `reason` unless it is [`GiveUpReason::NotRetryable`] (the normal end of a good response).
//!    With [`FirstAttempt::Callout`] the first attempt is a callout too, sent at once.
//!
//! # Shared data
//!
//! One key per policy, `keel/retry/<policy>/budget`, holding the 96-byte budget state whose
//! layout is documented in [`budget`].

pub mod after;
pub mod attempt;
pub mod backoff;
pub mod budget;
pub mod condition;
pub mod config;
pub mod eligibility;
pub mod plan;

pub use after::Pushback;
pub use backoff::{Backoff, InvalidBackoff, Jitter};
pub use budget::{BudgetState, InvalidBudget, RetryBudget};
pub use condition::{Outcome, Response, RetryCondition, RetryOn};
pub use config::{FirstAttempt, RetryConfig, RetryPolicy};
pub use eligibility::Eligibility;
pub use plan::{AttemptPlan, GiveUpReason, RetryDecision};
