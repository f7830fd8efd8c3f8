//! The retry filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), with the kit's field types ([`crate::config::fields`]) checking each
//! field's own rule while it is read. [`super::policy`] validates them into [`RetryPolicy`]
//! values and lists every field with its default.
//!
//! [`RetryPolicy`]: super::RetryPolicy

use alloc::vec::Vec;

use serde::{Deserialize, Deserializer};

use super::backoff::Jitter;
use super::condition::RetryCondition;
use super::policy::{FirstAttempt, MAX_ATTEMPTS, MAX_MAX_BODY};
use crate::config::{AnyDuration, Bounded, HeaderName, Name, PositiveDuration, Routes};

/// The JSON document: `{"policies": [...]}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfigSpec {
    /// The retry policies, first match wins.
    #[serde(default)]
    pub policies: Option<Vec<PolicySpec>>,
}

/// One policy as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The policy's name.
    pub name: Name,
    /// The Envoy cluster retries go to; absent: the route's.
    #[serde(default)]
    pub cluster: Option<alloc::string::String>,
    /// Envoy route names; absent means all routes.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// Attempts, first included.
    #[serde(default)]
    pub max_attempts: Option<Bounded<1, { MAX_ATTEMPTS as u64 }>>,
    /// The backoff schedule.
    #[serde(default)]
    pub backoff: Option<BackoffSpec>,
    /// The retry budget.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// What is retried.
    #[serde(default)]
    pub retry_on: Option<Vec<RetryCondition>>,
    /// Statuses always retried.
    #[serde(default)]
    pub retriable_statuses: Option<Vec<Bounded<400, 599>>>,
    /// The longest a retry attempt may take.
    #[serde(default)]
    pub per_try_timeout: Option<PositiveDuration>,
    /// From the request's arrival to the last attempt's start.
    #[serde(default)]
    pub deadline: Option<PositiveDuration>,
    /// Bytes.
    #[serde(default)]
    pub max_body: Option<Bounded<0, MAX_MAX_BODY>>,
    /// Absent: the default header; `null`: none; a string: that header.
    #[serde(default, deserialize_with = "present")]
    pub attempt_header: Option<Option<HeaderName>>,
    /// A request header name.
    #[serde(default)]
    pub idempotency_key_header: Option<HeaderName>,
    /// Whether to wait for `Retry-After`.
    #[serde(default)]
    pub respect_retry_after: Option<bool>,
    /// The longest pushback waited for.
    #[serde(default)]
    pub max_retry_after: Option<PositiveDuration>,
    /// How the first attempt is sent.
    #[serde(default)]
    pub first_attempt: Option<FirstAttempt>,
    /// A per-host breaker's name.
    #[serde(default)]
    pub breaker: Option<Name>,
}

/// `backoff` as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    /// The first delay's ceiling.
    #[serde(default)]
    pub base: Option<PositiveDuration>,
    /// The largest ceiling.
    #[serde(default)]
    pub cap: Option<AnyDuration>,
    /// How delays are randomised.
    #[serde(default)]
    pub jitter: Option<Jitter>,
}

/// `budget` as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// The share of requests retries may add.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Retries per second allowed whatever the traffic.
    #[serde(default)]
    pub min_per_second: Option<u32>,
    /// How long a request counts toward the budget.
    #[serde(default)]
    pub ttl: Option<AnyDuration>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<HeaderName>>, D::Error> {
    Option::<HeaderName>::deserialize(d).map(Some)
}
