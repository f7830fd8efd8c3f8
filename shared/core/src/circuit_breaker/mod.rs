//! The circuit breaker: a sliding failure window, closed / open / half-open, shared by every
//! worker of the process, with fast failure or a fallback while open.
//!
//! Follows Resilience4j (time-based window of buckets with O(1) running totals; trips when the
//! failure rate or the slow-call rate is at or above its threshold, never below `min_calls`;
//! half-open permits whose outcomes decide; `DISABLED`, `METRICS_ONLY`, `FORCED_OPEN`), Polly
//! (inclusive thresholds: 10 of 100 at 0.1 trips; results that arrive while open do not extend
//! the break), and Envoy's outlier detection for the open period that grows with consecutive
//! openings up to a cap. Defaults the issue leaves open are Hystrix's: a 10 s window in 10
//! buckets, 20 calls, 50 %, 5 s open, one probe.
//!
//! # Using it from the glue
//!
//! 1. At load: `config::load::<Breakers>(bytes)` reads the JSON into the wire structs
//!    ([`wire`]) and validates them into [`Breakers`].
//!    Errors name the field path (`breakers[0].failure_rate: must be in (0, 1], got 1.5`).
//!    Create a scope-`policy` key that does not exist yet with
//!    [`BreakerPolicy::initial_state`], so that every later write is a compare-and-swap.
//! 2. On request headers: pick the policy with [`crate::routes::first`] and the shared-data key
//!    with [`BreakerPolicy::state_key`] (for scopes `cluster` and `host`, track at most
//!    [`BreakerPolicy::max_instances`] instances), then
//!    `store::update(store, &key, attempts, |s| policy.admit(s, now))` gives a [`Decision`]
//!    ([`BreakerPolicy::admit_with`] reads the clock only when the breaker is not closed):
//!    forward ([`Admission::Allow`]), forward as a probe and keep its [`ProbeTicket`]
//!    ([`Admission::Probe`]), or answer locally ([`Admission::Reject`]): with a fresh fallback
//!    ([`FallbackPolicy::lookup`], [`BreakerPolicy::fallback_reply`]) for a `GET`, else with
//!    [`BreakerPolicy::open_reply`]. The upstream receives nothing while open.
//! 3. When the call ends: [`Response::from_envoy`] turns the status and Envoy's response
//!    flags into a [`Response`], `policy.failure().classify(response, latency)` into an
//!    [`Outcome`]; `store::update(.., |s| policy.record(s, now, outcome, ticket))` counts it.
//!    A stream that ends without an outcome reports [`Response::Reset`] (the upstream gave no
//!    response) or, if the client left first, [`Response::Cancelled`] (a probe's permit comes
//!    back).
//! 4. Every [`Transition`] returned by `admit` or `record` happened exactly once, in the
//!    worker whose write won: emit its metrics and one log line
//!    (`breaker orders: closed -> open: 12 of 20 calls failed; open for 5s`).
//! 5. If the fallback is on, keep good responses: [`FallbackPolicy::keeps`] at response
//!    headers, then [`FallbackPolicy::entry`] and a write to [`FallbackPolicy::slot_key`].
//!
//! # Configuration
//!
//! `{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20,
//! "open_for": "5s", "half_open_probes": 3}]}`. Only `name` is required.
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `name` | — | unique, `[A-Za-z0-9_-]{1,64}`; names metrics, logs and shared-data keys |
//! | `routes` | every route | Envoy route names; the first breaker listing a route guards it |
//! | `mode` | `"normal"` | `"forced_open"` refuses all, `"disabled"` allows all, `"metrics_only"` runs the machine but allows all |
//! | `scope` | `"policy"` | `"cluster"`: one breaker per upstream cluster; `"host"`: per upstream host |
//! | `max_instances` | `1024` | 1..=65536; scopes `cluster` and `host`: instances one worker tracks, further ones pass unguarded |
//! | `window` | `"10s"` | sliding window length |
//! | `buckets` | `10` | window buckets, 1..=60, each at least 1 ms |
//! | `failure_rate` | `0.5` | in (0, 1]; opens at or above it (resolution 10⁻⁶) |
//! | `min_calls` | `20` | outcomes the window must hold before a rate can open it |
//! | `slow_call.duration` | off | a call whose response headers come strictly later is slow |
//! | `slow_call.rate` | `1.0` | in (0, 1]; opens at or above it |
//! | `failure.statuses` | `["5xx"]` | codes (`503`, `"503"`) and classes (`"4xx"`) that are failures |
//! | `failure.resets` | `true` | resets and calls with no response are failures |
//! | `failure.timeouts` | `true` | upstream timeouts are failures |
//! | `open_for` | `"5s"` | first open period |
//! | `open_for_multiplier` | `2.0` | at least 1.0; applied on each consecutive opening |
//! | `max_open_for` | 10 × `open_for` | cap of the open period (Envoy: 30 s base, 300 s cap) |
//! | `half_open_probes` | `1` | 1..=1000 probes per half-open period |
//! | `probe_timeout` | max(`open_for`, 15 s) | unanswered permits are reclaimed after it (15 s: Envoy's route timeout) |
//! | `open_reply.status` | `503` | 200..=599 |
//! | `open_reply.body` | `"circuit breaker open\n"` | sent as `text/plain` unless a `content-type` is set |
//! | `open_reply.headers` | none | object of extra headers; `retry-after` is set by the breaker |
//! | `fallback` | off | present = on, unless `"enabled": false` |
//! | `fallback.max_age` | `"60s"` | oldest response served |
//! | `fallback.max_body_bytes` | `65536` | 1..=4 MiB; larger responses are not kept |
//! | `fallback.max_entries` | `256` | 1..=65536 shared-data slots per breaker |
//! | `fallback.key` | `"path"` | key selector, combined with the route |
//! | `fallback.header` | `"x-keel-fallback"` | marks a served fallback; its value is the breaker's name |
//!
//! # Shared data
//!
//! - `keel/circuit_breaker/<name>` (scope `policy`), `keel/circuit_breaker/<name>/cluster/<cluster>`
//!   or `keel/circuit_breaker/<name>/host/<host>`: a [`BreakerState`], layout in [`state`]'s
//!   docs (version 1, `92 + 12 × buckets` bytes).
//! - `keel/circuit_breaker/<name>/fallback/<slot>`: a [`FallbackEntry`], layout in
//!   [`fallback`]'s docs.
//!
//! Scope `host` needs the upstream host when the request is admitted, before Envoy's load
//! balancer runs: it works where the host is chosen ahead (Keel's picker setting
//! `x-envoy-original-dst-host`); elsewhere the glue gets `None` from
//! [`BreakerPolicy::state_key`] and must decide (e.g. admit without a breaker and log once).
//!
//! The first write of a key is unconditional in Envoy (version 0), so two workers creating the
//! same breaker at the same instant can lose one outcome; every later write is an exact
//! compare-and-swap. A value that does not decode is treated as a fresh closed breaker.
//!
//! # Invariants
//!
//! - The window's totals equal the sum of its buckets ([`Window`]).
//! - At most `half_open_probes` permits of a half-open period are out at once; a permit is
//!   reclaimed only after `probe_timeout` without any new permit.
//! - Open lasts within `[open_for, max_open_for]`; outcomes recorded while open change nothing.
//! - Each transition is returned by exactly one `admit` or `record` whose write succeeded.

pub mod fallback;
mod machine;
mod outcome;
mod policy;
mod reply;
pub mod state;
pub mod steer;
mod window;
pub mod wire;

pub use fallback::{FallbackEntry, FallbackPolicy};
pub use machine::{Admission, Decision, ProbeTicket, Reason, Transition};
pub use outcome::{FailurePolicy, Outcome, Response, StatusSet};
pub use policy::{BreakerPolicy, Breakers, Mode, Ratio, Scope};
pub use reply::Reply;
pub use state::{BreakerState, Phase, Probes};
pub use steer::{host_state_key, steering, Steering};
pub use window::{Tally, Totals, Window};
pub use wire::{BreakerSpec, BreakersConfig, FailureSpec, FallbackSpec, SlowCallSpec, StatusSpec};
