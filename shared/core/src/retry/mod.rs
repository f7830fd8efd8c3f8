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
//! - [`wire`]: the JSON configuration as written; [`policy`]: the validated [`RetryPolicy`]
//!   and [`RetryConfig`], read with [`crate::config::load`], with field-path errors.
//! - [`session`]: one request's retries as a state machine ([`Session`]): events in (request
//!   headers and body, the router's response, an attempt due, a callout's answer), steps out
//!   (hold, send, hand on, answer), the best answer kept, and the filter's own 502 and 503.
//!
//! # How the glue uses it
//!
//! 0. When the configuration loads: for each policy, create its budget under
//!    [`RetryPolicy::budget_key`] ([`RetryBudget::ensure_bytes`] in a compare-and-swap update),
//!    so that every later write to the budget is a versioned compare-and-swap.
//! 1. On request headers: pick the policy ([`crate::routes::first`]) and start a
//!    [`Session`] with the request's headers. [`session::Start::Ineligible`] (a method not
//!    idempotent without an `Idempotency-Key`, a body over `max_body`, a header value that is
//!    not text): the request is left alone; it can never be retried, so it neither pays for a
//!    copy of its body nor earns retries for others. A tracked request deposits one request in
//!    the budget ([`RetryBudget::deposit_bytes`]); its body is copied chunk by chunk
//!    ([`Session::add_body`]) while the router sends it.
//! 2. On each attempt's end, the router's response ([`Session::router_response`], with the
//!    failure [`attempt::router_failure`] reads from Envoy's details and flags) or a callout's
//!    answer ([`Session::callout_answer`]): the session asks [`AttemptPlan::decide`] with a
//!    seeded generator and a closure that takes a retry from the budget
//!    ([`RetryBudget::withdraw_bytes`]; an error counts as a refusal: fail closed). A retry:
//!    hold the response and wait on the root context's tick; when it is due
//!    ([`Session::next_attempt`]) send the attempt as a callout to the policy's (or the
//!    route's) cluster with [`AttemptPlan::attempt_timeout`]. No retry: hand the response on
//!    with the attempt header, or answer with the best response so far ([`Session::end`]), and
//!    count the reason unless it is [`GiveUpReason::NotRetryable`] (the normal end of a good
//!    response). With [`FirstAttempt::Callout`] the first attempt is a callout too, sent at
//!    once.
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
pub mod eligibility;
pub mod plan;
pub mod policy;
pub mod session;
pub mod wire;

pub use after::Pushback;
pub use backoff::{Backoff, InvalidBackoff, Jitter};
pub use budget::{BudgetState, InvalidBudget, RetryBudget};
pub use condition::{Outcome, Response, RetryCondition, RetryOn};
pub use eligibility::Eligibility;
pub use plan::{AttemptPlan, GiveUpReason, RetryDecision};
pub use policy::{FirstAttempt, RetryConfig, RetryPolicy};
pub use session::Session;
