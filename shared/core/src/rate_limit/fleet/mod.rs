//! Fleet-wide limits: N Envoy processes share one limit kept in Redis, with token leases so
//! that no request waits on the network in the common case.
//!
//! A policy with a `store` keeps each key's bucket in Redis ([`remote`]: one atomic Lua script
//! refills by elapsed time and grants up to the asked amount). Each process leases tokens from
//! it into shared data ([`lease`]), serves its workers' requests from the lease with one
//! compare-and-swap, and refills ahead of need from the tick of one elected VM (the
//! refresher, elected as discovery's poller is: [`crate::discovery::lease`]). Leases follow
//! each process's recent demand, so the limit goes where the traffic is. Whether the store
//! answers is shared by the workers too ([`health`]); when it does not, the policy's
//! [`OnStoreError`] decides.
//!
//! [`FleetMode::Strict`] is for low limits (a few per second): every request asks Redis for
//! one token and waits for the answer, exact across the fleet, at one round trip per request.
//!
//! Which algorithms: the token bucket and GCRA (the same admissions) are leased from one
//! Redis token bucket. The windows and the leaky bucket are refused with a store: a window's
//! quota could be leased from a counter per window, but leases that straddle a window boundary
//! would break its meaning, and the leaky bucket's queue order cannot be split between
//! processes without a round trip per request (strict mode's cost).

pub mod health;
pub mod lease;
pub mod process;
pub mod remote;

use alloc::format;
use alloc::string::String;

use serde::Deserialize;

use super::Limiter;
use crate::config::{parse_positive_duration, ConfigError, FieldPath, Rate};
use crate::fleet::{RedisSpec, RedisStore};
use crate::time::Duration;

pub use lease::{Ask, LeaseRules, LeaseSlot, Take};
pub use remote::{BucketAsk, BucketGrant, ScriptedRedis};

/// The default refresher period.
pub const DEFAULT_REFILL: Duration = Duration::from_millis(100);
/// The default lifetime of granted tokens.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(1);

/// A policy's `store` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// Redis through Webdis.
    pub redis: RedisSpec,
    /// `lease` (default) or `strict`.
    #[serde(default)]
    pub mode: Option<String>,
    /// The refresher's period; default `100ms`.
    #[serde(default)]
    pub refill: Option<String>,
    /// The most tokens one process holds per key; default two refill periods of the rate.
    #[serde(default)]
    pub max_lease: Option<u64>,
    /// How long granted tokens may be used; default `1s`.
    #[serde(default)]
    pub lease_ttl: Option<String>,
    /// `local` (default), `allow` or `deny`.
    #[serde(default)]
    pub on_store_error: Option<String>,
    /// How many processes share the limit, for the `local` fallback; default 1.
    #[serde(default)]
    pub expected_processes: Option<u32>,
}

/// How requests use the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetMode {
    /// Requests are served from leases; the store is called ahead of need.
    Lease,
    /// Every request asks the store for its token and waits for the answer.
    Strict,
}

/// What a request that needs the store gets while the store fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// A local limit: the policy's rate divided by `expected_processes`, per process.
    Local,
    /// Admitted.
    Allow,
    /// Refused.
    Deny,
}

impl OnStoreError {
    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// A validated `store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetLimit {
    /// Where the store is.
    pub store: RedisStore,
    /// Lease or strict.
    pub mode: FleetMode,
    /// The refresher's period.
    pub refill: Duration,
    /// `max_lease` as written (`None`: two refill periods of each limiter's rate).
    pub max_lease: Option<u64>,
    /// How long granted tokens may be used.
    pub lease_ttl: Duration,
    /// The failure mode.
    pub on_store_error: OnStoreError,
    /// Processes sharing the limit (the `local` fallback divides by it).
    pub expected_processes: u32,
}

impl FleetLimit {
    /// Validates `spec` found at `path` for a policy whose limiters are `limiters`.
    pub fn from_spec<'a>(
        path: &FieldPath,
        spec: &FleetSpec,
        limiters: impl Iterator<Item = (&'a str, &'a Limiter)>,
    ) -> Result<FleetLimit, ConfigError> {
        let store = RedisStore::from_spec(&path.field("redis"), &spec.redis)?;
        let mode = match spec.mode.as_deref() {
            None | Some("lease") => FleetMode::Lease,
            Some("strict") => FleetMode::Strict,
            Some(other) => {
                return Err(path
                    .field("mode")
                    .error(format!("expected \"lease\" or \"strict\", got \"{other}\"")))
            }
        };
        let ranged =
            |name: &str, text: &Option<String>, default: Duration, min: Duration, max: Duration| {
                let Some(text) = text else {
                    return Ok(default);
                };
                let at = path.field(name);
                let d = parse_positive_duration(&at, text)?;
                if d < min || d > max {
                    return Err(at.error(format!("must be from {min} to {max}, got \"{text}\"")));
                }
                Ok(d)
            };
        let refill = ranged(
            "refill",
            &spec.refill,
            DEFAULT_REFILL,
            Duration::from_millis(10),
            Duration::from_secs(10),
        )?;
        let lease_ttl = ranged(
            "lease_ttl",
            &spec.lease_ttl,
            DEFAULT_LEASE_TTL.max(refill.saturating_mul(2)),
            refill.saturating_mul(2),
            Duration::from_secs(600),
        )?;
        let on_store_error = match spec.on_store_error.as_deref() {
            None | Some("local") => OnStoreError::Local,
            Some("allow") => OnStoreError::Allow,
            Some("deny") => OnStoreError::Deny,
            Some(other) => {
                return Err(path.field("on_store_error").error(format!(
                    "expected \"local\", \"allow\" or \"deny\", got \"{other}\""
                )))
            }
        };
        let expected_processes = spec.expected_processes.unwrap_or(1);
        if !(1..=100_000).contains(&expected_processes) {
            return Err(path.field("expected_processes").error(format!(
                "must be from 1 to 100000, got {expected_processes}"
            )));
        }
        for (tier, limiter) in limiters {
            let rate = limiter.rate();
            let credit = u128::from(rate.burst) * u128::from(period_us(&rate));
            if credit > u128::from(remote::MAX_CREDIT) {
                return Err(path.error(format!(
                    "the limit{} is too large for the fleet store: burst times the period in microseconds must be at most 2^53",
                    if tier.is_empty() { String::new() } else { format!(" of tier \"{tier}\"") }
                )));
            }
            if let Some(max) = spec.max_lease {
                if max == 0 || max > rate.burst {
                    return Err(path.field("max_lease").error(format!(
                        "must be from 1 to the burst ({}), got {max}",
                        rate.burst
                    )));
                }
            }
        }
        Ok(FleetLimit {
            store,
            mode,
            refill,
            max_lease: spec.max_lease,
            lease_ttl,
            on_store_error,
            expected_processes,
        })
    }

    /// The most tokens one process holds of a key of `limiter`: `max_lease`, or two refill
    /// periods of the rate (at least 1, at most the burst).
    pub fn max_lease(&self, limiter: &Limiter) -> u64 {
        let rate = limiter.rate();
        self.max_lease.unwrap_or_else(|| {
            let two = u128::from(rate.requests) * 2 * u128::from(self.refill.as_nanos());
            let n = two.div_ceil(u128::from(rate.period.as_nanos().max(1)));
            u64::try_from(n)
                .unwrap_or(u64::MAX)
                .clamp(1, rate.burst.max(1))
        })
    }

    /// The lease rule's parameters for keys of `limiter`.
    pub fn rules(&self, limiter: &Limiter) -> LeaseRules {
        LeaseRules {
            refill: self.refill,
            max_lease: self.max_lease(limiter),
            lease_ttl: self.lease_ttl,
            timeout: self.store.timeout,
            interval: limiter.rate().emission_interval(),
        }
    }

    /// The `local` fallback's limiter: `limiter`'s rate and burst divided by
    /// `expected_processes` (at least 1 each).
    pub fn fallback(&self, limiter: &Limiter) -> Limiter {
        let rate = limiter.rate();
        let n = u64::from(self.expected_processes.max(1));
        Limiter::new(
            limiter.algorithm(),
            Rate {
                requests: (rate.requests / n).max(1),
                period: rate.period,
                burst: (rate.burst / n).max(1),
            },
        )
    }

    /// The call's part for one key.
    pub fn bucket_ask(limiter: &Limiter, key: String, ask: Ask) -> BucketAsk {
        let rate = limiter.rate();
        BucketAsk {
            key,
            requests: rate.requests,
            period_us: period_us(&rate),
            burst: rate.burst,
            ask: ask.ask,
            back: ask.back,
        }
    }
}

/// The Redis key of a bucket: `keel:rl:<policy>:<fingerprint as 16 hex digits>` (the
/// fingerprint covers the tier and the key).
pub fn redis_key(policy: &str, fp: u64) -> String {
    format!("keel:rl:{policy}:{fp:016x}")
}

fn period_us(rate: &Rate) -> u64 {
    (rate.period.as_nanos() / 1000).max(1)
}

#[cfg(test)]
mod tests;
