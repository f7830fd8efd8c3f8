//! The rate-limit filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]) so that its own rule is checked, at its path, while the JSON is
//! read. The `policy` module validates them into [`super::policy::RateLimitPolicy`] values.

use super::fleet::FleetSpec;
use super::policy::{MissingKey, MAX_MAX_KEYS};
use crate::config::{
    Bounded, LocalReplySpec, Name, PositiveDuration, RateSpec, Ratio, Routes, SortedMap,
};
use alloc::string::String;
use alloc::vec::Vec;
use serde::Deserialize;

/// The filter's configuration as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// The policies, applied in order to the routes they match.
    pub policies: Vec<PolicySpec>,
}

/// One policy as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique name: it names metrics, headers and shared-data keys.
    pub name: Name,
    /// Envoy route names the policy applies to; all routes when absent.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// The key selector; `"global"` (one bucket for all) when absent.
    #[serde(default)]
    pub key: Option<String>,
    /// The limit of each key.
    pub limit: RateSpec,
    /// `token_bucket` (default), `gcra`, `fixed_window`, `sliding_window`, `leaky_bucket`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// Limits per tier (plan, role), chosen by a second selector.
    #[serde(default)]
    pub tiers: Option<TiersSpec>,
    /// What to do with a request that has no key: `shared` (default), `allow` or `deny`.
    #[serde(default)]
    pub missing_key: Option<MissingKey>,
    /// The most keys tracked at once (slots in shared data); default 16384.
    #[serde(default)]
    pub max_keys: Option<Bounded<1, { MAX_MAX_KEYS as u64 }>>,
    /// Delay requests over the limit instead of refusing them.
    #[serde(default)]
    pub shaping: Option<ShapingSpec>,
    /// Whether allowed responses carry the `RateLimit` headers; default true.
    #[serde(default)]
    pub response_headers: Option<bool>,
    /// The reply to a refused request.
    #[serde(default)]
    pub deny: Option<LocalReplySpec>,
    /// A fleet-wide limit kept in Redis (through Webdis); per process when absent.
    #[serde(default)]
    pub store: Option<FleetSpec>,
    /// Scale the rate by the upstream's success rate, as the adaptive filter counts it.
    #[serde(default)]
    pub adaptive: Option<AdaptiveSpec>,
}

/// An adaptive rate as written: `{"policy": "orders", "scope": "backend", "floor": 0.25}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSpec {
    /// The adaptive filter's `throttle` policy whose counts are the signal (same `vm_id`).
    pub policy: Name,
    /// That policy's scope: the route or cluster name (its `scope`); absent for `global`.
    #[serde(default)]
    pub scope: Option<String>,
    /// The lowest share of the configured rate, more than 0; default 0.25.
    #[serde(default)]
    pub floor: Option<Ratio>,
    /// The success rate at and above which the full rate applies, more than 0; default 0.95.
    #[serde(default)]
    pub target: Option<Ratio>,
    /// The fewest requests in the signal's window for it to count; default 20.
    #[serde(default)]
    pub min_requests: Option<Bounded<1, 1_000_000>>,
}

/// Tiers as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersSpec {
    /// The selector whose value names the tier, e.g. `header:x-plan`.
    pub key: String,
    /// The limit of each tier by name.
    pub limits: SortedMap<String, RateSpec>,
    /// The tier of requests without a known tier; the policy's `limit` when absent.
    #[serde(default)]
    pub default: Option<String>,
}

/// Shaping as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingSpec {
    /// The longest a request may be held; longer waits are refused.
    pub max_delay: PositiveDuration,
}
