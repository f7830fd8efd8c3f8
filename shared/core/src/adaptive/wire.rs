//! The adaptive filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]) so that its own rule is checked, at its path, while the JSON is
//! read. The `policy` module validates them into [`super::policy::AdaptivePolicy`] values.

use super::policy::Scope;
use crate::config::{AnyDuration, Bounded, Name, PositiveDuration, Routes};
use alloc::vec::Vec;
use serde::Deserialize;

/// The filter's configuration as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSpec {
    /// The policies, each applied to the routes it matches.
    pub policies: Vec<PolicySpec>,
}

/// One policy as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique name: it names metrics and shared-data keys.
    pub name: Name,
    /// Envoy route names the policy applies to; all routes when absent.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// What one limit covers: `route`, `cluster` (default) or `global`.
    #[serde(default)]
    pub scope: Option<Scope>,
    /// An adaptive concurrency limit.
    #[serde(default)]
    pub concurrency: Option<ConcurrencySpec>,
    /// Success-rate throttling.
    #[serde(default)]
    pub throttle: Option<ThrottleSpec>,
    /// The refusal: status (default 503) and `retry-after` (default "1s").
    #[serde(default)]
    pub deny: Option<DenySpec>,
}

/// An adaptive concurrency limit as written; which fields apply depends on `controller`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencySpec {
    /// `gradient` (default) or `aimd`.
    #[serde(default)]
    pub controller: Option<ControllerName>,
    /// gradient: how often the limit is recomputed.
    #[serde(default)]
    pub update_interval: Option<PositiveDuration>,
    /// gradient: the percentile of an interval's samples.
    #[serde(default)]
    pub percentile: Option<f64>,
    /// gradient: latency tolerated above the minimum RTT, a fraction.
    #[serde(default)]
    pub buffer: Option<f64>,
    /// gradient: how often the minimum RTT is probed again.
    #[serde(default)]
    pub min_rtt_window: Option<PositiveDuration>,
    /// gradient: the limit during a probe, a fraction of the limit.
    #[serde(default)]
    pub probe_fraction: Option<f64>,
    /// gradient: samples kept per interval.
    #[serde(default)]
    pub max_samples: Option<Bounded<1, 1024>>,
    /// The limit before anything is measured.
    #[serde(default)]
    pub initial_limit: Option<u32>,
    /// The lowest limit.
    #[serde(default)]
    pub min_limit: Option<u32>,
    /// The highest limit.
    #[serde(default)]
    pub max_limit: Option<u32>,
    /// aimd: what a drop multiplies the limit by.
    #[serde(default)]
    pub backoff: Option<f64>,
    /// aimd: a round trip longer than this is a drop.
    #[serde(default)]
    pub timeout: Option<PositiveDuration>,
}

/// Success-rate throttling as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    /// The sliding window.
    #[serde(default)]
    pub window: Option<PositiveDuration>,
    /// Buckets of the window.
    #[serde(default)]
    pub buckets: Option<Bounded<1, 60>>,
    /// K.
    #[serde(default)]
    pub k: Option<f64>,
    /// The highest refusal probability.
    #[serde(default)]
    pub max_probability: Option<f64>,
}

/// The refusal as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenySpec {
    /// The status; default 503.
    #[serde(default)]
    pub status: Option<Bounded<200, 599>>,
    /// The `retry-after` value; default "1s" (rounded up to whole seconds).
    #[serde(default)]
    pub retry_after: Option<AnyDuration>,
}

/// The controllers of an adaptive concurrency limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControllerName {
    /// Netflix's gradient controller (the default).
    Gradient,
    /// Additive increase, multiplicative decrease.
    Aimd,
}
