//! The breaker filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]) so that its own rule is checked, at its path, while the JSON is
//! read. The `policy` module validates them into [`super::BreakerPolicy`] values.
//!
//! Every field but `name` may be omitted; the defaults are listed in the [module
//! docs](super) and follow Hystrix where the issue gives no value (10 s window in 10 buckets,
//! 20 calls, 50 %, 5 s open, one probe).

use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use super::policy::{Mode, Scope, LIMIT_MAX_INSTANCES, MAX_PROBES};
use super::state::MAX_BUCKETS;
use crate::config::{Bounded, HeaderName, LocalReplySpec, Name, PositiveDuration, Routes};

/// The whole filter configuration: `{"breakers": [...]}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakersConfig {
    /// One entry per breaker policy.
    pub breakers: Vec<BreakerSpec>,
}

/// One breaker as written in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Unique name: used in metrics, logs and shared-data keys.
    pub name: Name,
    /// Envoy route names this breaker guards; omitted = every route.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// `"normal"`, `"forced_open"`, `"disabled"` or `"metrics_only"`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// `"policy"`, `"cluster"` or `"host"`: what one breaker instance covers.
    #[serde(default)]
    pub scope: Option<Scope>,
    /// Scopes `cluster` and `host`: the most instances one worker tracks.
    #[serde(default)]
    pub max_instances: Option<Bounded<1, LIMIT_MAX_INSTANCES>>,
    /// Length of the sliding window, e.g. `"10s"`.
    #[serde(default)]
    pub window: Option<PositiveDuration>,
    /// Number of buckets the window is cut into.
    #[serde(default)]
    pub buckets: Option<Bounded<1, { MAX_BUCKETS as u64 }>>,
    /// Failure rate, in (0, 1], at or above which the breaker opens.
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Outcomes the window must hold before a rate can open the breaker.
    #[serde(default)]
    pub min_calls: Option<Bounded<1, { u32::MAX as u64 }>>,
    /// Slow-call tracking.
    #[serde(default)]
    pub slow_call: Option<SlowCallSpec>,
    /// What counts as a failure.
    #[serde(default)]
    pub failure: Option<FailureSpec>,
    /// First open period, e.g. `"5s"`.
    #[serde(default)]
    pub open_for: Option<PositiveDuration>,
    /// Factor applied to the open period on each consecutive opening.
    #[serde(default)]
    pub open_for_multiplier: Option<f64>,
    /// Cap of the open period.
    #[serde(default)]
    pub max_open_for: Option<PositiveDuration>,
    /// Probes admitted in half-open.
    #[serde(default)]
    pub half_open_probes: Option<Bounded<1, MAX_PROBES>>,
    /// How long a probe permit waits for its outcome before it is reclaimed.
    #[serde(default)]
    pub probe_timeout: Option<PositiveDuration>,
    /// The local reply sent while open.
    #[serde(default)]
    pub open_reply: Option<LocalReplySpec>,
    /// Serving the last good response while open.
    #[serde(default)]
    pub fallback: Option<FallbackSpec>,
}

/// `slow_call`: `{"duration": "2s", "rate": 0.8}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowCallSpec {
    /// A call whose response headers come later than this is slow.
    pub duration: PositiveDuration,
    /// Slow-call rate, in (0, 1], at or above which the breaker opens; default 1.0.
    #[serde(default)]
    pub rate: Option<f64>,
}

/// `failure`: `{"statuses": ["5xx", 429], "resets": true, "timeouts": true}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailureSpec {
    /// Statuses that are failures: classes (`"5xx"`) or codes (`"503"` or `503`).
    #[serde(default)]
    pub statuses: Option<Vec<StatusSpec>>,
    /// Whether connection resets and calls without a response are failures.
    #[serde(default)]
    pub resets: Option<bool>,
    /// Whether upstream timeouts are failures.
    #[serde(default)]
    pub timeouts: Option<bool>,
}

/// A status as written: a number or a string (`"503"`, `"5xx"`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StatusSpec {
    /// `503`
    Code(u64),
    /// `"503"` or `"5xx"`
    Text(String),
}

/// `fallback`: `{"enabled": true, "max_age": "60s", "max_body_bytes": 65536, "key": "path"}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackSpec {
    /// Whether the fallback is served; default `true` once the section is present.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Oldest response that may be served.
    #[serde(default)]
    pub max_age: Option<PositiveDuration>,
    /// Largest body kept.
    #[serde(default)]
    pub max_body_bytes: Option<Bounded<1, { super::fallback::LIMIT_MAX_BODY }>>,
    /// Number of cache slots per breaker (bounds shared-data memory).
    #[serde(default)]
    pub max_entries: Option<Bounded<1, { super::fallback::LIMIT_MAX_ENTRIES }>>,
    /// Key selector, with the route, of the cached response.
    #[serde(default)]
    pub key: Option<String>,
    /// Header added to a served fallback.
    #[serde(default)]
    pub header: Option<HeaderName>,
}
