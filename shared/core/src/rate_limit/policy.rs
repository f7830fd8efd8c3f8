//! The rate-limit filter's configuration: what an operator writes, validated into policies.
//!
//! ```json
//! {"policies": [{"name": "per-key", "key": "header:x-api-key",
//!                "limit": {"requests": 100, "per": "1s", "burst": 100}}]}
//! ```
//!
//! Every field but `name` and `limit` is optional; `docs/config/rate-limit.md` is the reference.
//! A policy's state lives in shared data under `keel/rate_limit/<policy>/<slot>`, one value per
//! slot of its [`KeyTable`].

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use super::adaptive::{
    scaled, AdaptiveRate, DEFAULT_FLOOR_PERCENT, DEFAULT_MIN_REQUESTS, DEFAULT_TARGET,
};
use super::fleet::FleetLimit;
use super::wire::{AdaptiveSpec, PolicySpec, RateLimitSpec, TiersSpec};
use super::{Algorithm, KeyTable, Limiter};
use crate::config::{validate_each, ConfigError, FieldPath, LocalReply, Rate, Selector, Validate};
use crate::time::Duration;

/// What happens to a request that does not carry the policy's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// All such requests share one bucket.
    Shared,
    /// The policy does not apply.
    Allow,
    /// The request is refused.
    Deny,
}

/// A validated tier set.
#[derive(Clone, Debug)]
pub struct Tiers {
    /// Where the tier name comes from.
    pub selector: Selector,
    /// Tier names and their limiters.
    pub limits: Vec<(String, Limiter)>,
    /// Index into `limits` of the default tier, if any.
    pub default: Option<usize>,
}

/// The refusal reply: the kit's local reply, `429` and `rate limited` by default.
pub type DenyReply = LocalReply;

/// A validated policy.
#[derive(Clone, Debug)]
pub struct RateLimitPolicy {
    /// Name.
    pub name: String,
    /// Routes it applies to (`None`: all).
    pub routes: Option<Vec<String>>,
    /// The key selector.
    pub key: Selector,
    /// The limiter of requests without a tier.
    pub limiter: Limiter,
    /// Tiers, if configured.
    pub tiers: Option<Tiers>,
    /// Requests without a key.
    pub missing_key: MissingKey,
    /// The bounded key table.
    pub table: KeyTable,
    /// Longest delay when shaping; zero when not shaping.
    pub max_delay: Duration,
    /// Whether allowed responses carry `RateLimit` headers.
    pub response_headers: bool,
    /// The refusal reply.
    pub deny: DenyReply,
    /// The fleet-wide store, if any: the limit is then shared by every process.
    pub fleet: Option<FleetLimit>,
    /// The adaptive rate, if any: the limiters run at a percentage of their configured rate
    /// ([`RateLimitPolicy::at_percent`]).
    pub adaptive: Option<AdaptiveRate>,
}

/// The default of `max_keys`.
pub const DEFAULT_MAX_KEYS: u32 = 16_384;
/// The largest `max_keys`: each slot is one shared-data entry of a few dozen bytes, created when
/// the configuration loads.
pub const MAX_MAX_KEYS: u32 = 1_048_576;

impl RateLimitPolicy {
    /// The tier name (empty without tiers) and limiter for a request whose tier selector gave
    /// `tier` (`None`: no such header, cookie...).
    pub fn limiter_for(&self, tier: Option<&[u8]>) -> (&str, &Limiter) {
        self.limiter_at(self.limiter_index(tier))
    }

    /// Where [`RateLimitPolicy::limiter_for`]'s answer is, as an index a filter can key
    /// precomputed values with: 0 for the policy's own `limiter`, `i + 1` for
    /// `tiers.limits[i]`. Below [`RateLimitPolicy::limiter_count`].
    pub fn limiter_index(&self, tier: Option<&[u8]>) -> usize {
        let Some(tiers) = &self.tiers else {
            return 0;
        };
        let named = tier.and_then(|t| tiers.limits.iter().position(|(n, _)| n.as_bytes() == t));
        match named.or(tiers.default) {
            Some(i) if i < tiers.limits.len() => i + 1,
            _ => 0,
        }
    }

    /// The tier name (empty for the policy's own limiter) and limiter at `index` (see
    /// [`RateLimitPolicy::limiter_index`]); the policy's own for an index out of range.
    pub fn limiter_at(&self, index: usize) -> (&str, &Limiter) {
        let tier = index
            .checked_sub(1)
            .and_then(|i| self.tiers.as_ref()?.limits.get(i));
        match tier {
            Some((name, limiter)) => (name.as_str(), limiter),
            None => ("", &self.limiter),
        }
    }

    /// How many limiters the policy has: its own and one per tier.
    pub fn limiter_count(&self) -> usize {
        1 + self.tiers.as_ref().map_or(0, |t| t.limits.len())
    }

    /// The policy with every limiter at `percent` of its configured rate ([`scaled`]); called on
    /// the policy as configured (scaling a scaled policy compounds).
    pub fn at_percent(&self, percent: u8) -> RateLimitPolicy {
        let mut out = self.clone();
        if percent >= 100 {
            return out;
        }
        let rescale = |l: &Limiter| Limiter::new(l.algorithm(), scaled(l.rate(), percent));
        out.limiter = rescale(&self.limiter);
        if let Some(tiers) = out.tiers.as_mut() {
            for (_, limiter) in tiers.limits.iter_mut() {
                *limiter = rescale(limiter);
            }
        }
        out
    }

    /// The shared-data key prefix of this policy's slots.
    pub fn key_prefix(&self) -> String {
        format!("keel/rate_limit/{}/", self.name)
    }
}

impl Validate for Vec<RateLimitPolicy> {
    type Wire = RateLimitSpec;
    /// Validates the whole configuration.
    fn validate(spec: &RateLimitSpec) -> Result<Vec<RateLimitPolicy>, ConfigError> {
        validate_each(
            &FieldPath::root().field("policies"),
            "policy",
            &spec.policies,
            |p| p.name.as_str(),
            validate_policy,
        )
    }
}

fn validate_policy(path: &FieldPath, spec: &PolicySpec) -> Result<RateLimitPolicy, ConfigError> {
    let key = match &spec.key {
        Some(text) => Selector::parse(&path.field("key"), text)?,
        None => Selector::Global,
    };
    let algorithm = match &spec.algorithm {
        Some(text) => Algorithm::parse(&path.field("algorithm"), text)?,
        None => Algorithm::default(),
    };
    let limiter = Limiter::new(
        algorithm,
        Rate::from_spec(&path.field("limit"), &spec.limit)?,
    );
    let tiers = match &spec.tiers {
        Some(t) => Some(validate_tiers(&path.field("tiers"), t, algorithm)?),
        None => None,
    };
    let missing_key = spec.missing_key.unwrap_or(MissingKey::Shared);
    let max_keys = spec.max_keys.map_or(DEFAULT_MAX_KEYS, |n| n.get_u32());
    let max_delay = match &spec.shaping {
        Some(s) if s.max_delay.0 > MAX_SHAPING_DELAY => {
            return Err(path.field("shaping").field("max_delay").error(format!(
                "must be at most {MAX_SHAPING_DELAY} (a held request holds a connection), got {}",
                s.max_delay.0
            )));
        }
        Some(s) => s.max_delay.0,
        None => Duration::ZERO,
    };
    let fleet = match &spec.store {
        Some(store) => {
            let at = path.field("store");
            if !matches!(algorithm, Algorithm::TokenBucket | Algorithm::Gcra) {
                return Err(path.field("algorithm").error(format!(
                    "a fleet-wide limit (\"store\") supports \"token_bucket\" and \"gcra\", got \"{algorithm}\""
                )));
            }
            if spec.shaping.is_some() {
                return Err(path
                    .field("shaping")
                    .error("cannot be combined with a fleet-wide limit (\"store\")"));
            }
            let mut limiters: Vec<(&str, &Limiter)> = alloc::vec![("", &limiter)];
            if let Some(t) = &tiers {
                limiters.extend(t.limits.iter().map(|(n, l)| (n.as_str(), l)));
            }
            Some(FleetLimit::from_spec(&at, store, limiters.into_iter())?)
        }
        None => None,
    };
    let adaptive = match &spec.adaptive {
        Some(_) if fleet.is_some() => {
            return Err(path
                .field("adaptive")
                .error("cannot be combined with a fleet-wide limit (\"store\") yet: each process would scale its own share"));
        }
        Some(a) => Some(validate_adaptive(&path.field("adaptive"), a)?),
        None => None,
    };
    Ok(RateLimitPolicy {
        name: spec.name.as_str().to_owned(),
        routes: spec.routes.as_ref().map(|r| r.names().to_vec()),
        key,
        limiter,
        tiers,
        missing_key,
        table: KeyTable::new(max_keys),
        max_delay,
        response_headers: spec.response_headers.unwrap_or(true),
        deny: match &spec.deny {
            Some(deny) => LocalReply::from_spec(
                &path.field("deny"),
                deny,
                &default_deny(),
                &DENY_RESERVED_HEADERS,
            )?,
            None => default_deny(),
        },
        fleet,
        adaptive,
    })
}

fn validate_adaptive(path: &FieldPath, spec: &AdaptiveSpec) -> Result<AdaptiveRate, ConfigError> {
    let floor_percent = match spec.floor {
        Some(f) if f.get() <= 0.0 => {
            return Err(path
                .field("floor")
                .error("must be more than 0 (a share of the configured rate), got 0"));
        }
        // A ratio in (0, 1]: 1 to 100 percent, rounded up so that a small floor stays above 0.
        Some(f) => ((f.get() * 100.0).ceil() as u8).clamp(1, 100),
        None => DEFAULT_FLOOR_PERCENT,
    };
    let target = match spec.target {
        Some(t) if t.get() <= 0.0 => {
            return Err(path
                .field("target")
                .error("must be more than 0 (a success rate), got 0"));
        }
        Some(t) => t.get(),
        None => DEFAULT_TARGET,
    };
    let scope = match &spec.scope {
        Some(s) if s.is_empty() => {
            return Err(path
                .field("scope")
                .error("must not be empty: omit it for a global adaptive policy"));
        }
        Some(s) => s.clone(),
        None => String::new(),
    };
    Ok(AdaptiveRate {
        policy: spec.policy.as_str().to_owned(),
        scope,
        floor_percent,
        target,
        min_requests: spec.min_requests.map_or(DEFAULT_MIN_REQUESTS, |n| n.get()),
    })
}

fn validate_tiers(
    path: &FieldPath,
    spec: &TiersSpec,
    algorithm: Algorithm,
) -> Result<Tiers, ConfigError> {
    let selector = Selector::parse(&path.field("key"), &spec.key)?;
    if spec.limits.is_empty() {
        return Err(path.field("limits").error("needs at least one tier"));
    }
    let mut limits = Vec::with_capacity(spec.limits.len());
    for (name, rate) in spec.limits.iter() {
        let rate = Rate::from_spec(&path.field("limits").field(name), rate)?;
        limits.push((name.clone(), Limiter::new(algorithm, rate)));
    }
    let default = match &spec.default {
        Some(name) => Some(limits.iter().position(|(n, _)| n == name).ok_or_else(|| {
            path.field("default")
                .error(format!("\"{name}\" is not one of the tiers in \"limits\""))
        })?),
        None => None,
    };
    Ok(Tiers {
        selector,
        limits,
        default,
    })
}

/// The refusal without a `deny` section: `429`, `rate limited`.
fn default_deny() -> LocalReply {
    LocalReply::new(429, "rate limited\n")
}

/// Headers a `deny` reply may not set: the filter sets them from the limit.
const DENY_RESERVED_HEADERS: [&str; 3] = ["retry-after", "ratelimit", "ratelimit-policy"];

/// The longest `shaping.max_delay`.
const MAX_SHAPING_DELAY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::config::SortedMap;
    use alloc::string::ToString;

    /// The production entry point.
    fn parse(json: &str) -> Result<Vec<RateLimitPolicy>, ConfigError> {
        crate::config::load(json.as_bytes())
    }

    #[test]
    fn adaptive_takes_its_signal_floor_and_target() {
        let p = parse(r#"{"policies": [{"name": "api", "limit": {"requests": 100, "per": "1s", "burst": 200}, "tiers": {"key": "header:x-plan", "limits": {"gold": {"requests": 10, "per": "1s"}}}, "adaptive": {"policy": "orders", "scope": "backend", "floor": 0.2, "target": 0.9, "min_requests": 50}}]}"#).unwrap();
        let a = p[0].adaptive.clone().unwrap();
        assert_eq!(
            a,
            AdaptiveRate {
                policy: "orders".into(),
                scope: "backend".into(),
                floor_percent: 20,
                target: 0.9,
                min_requests: 50
            }
        );
        let half = p[0].at_percent(50);
        assert_eq!(half.limiter.rate().requests, 50);
        assert_eq!(half.limiter.rate().burst, 100);
        assert_eq!(half.limiter_at(1).1.rate().requests, 5, "tiers scale too");
        assert_eq!(p[0].at_percent(100).limiter.rate().requests, 100);
        assert_eq!(
            p[0].limiter.rate().requests,
            100,
            "the configured policy is unchanged"
        );

        let defaults = parse(r#"{"policies": [{"name": "api", "limit": {"requests": 10, "per": "1s"}, "adaptive": {"policy": "orders"}}]}"#).unwrap();
        let a = defaults[0].adaptive.clone().unwrap();
        assert_eq!(
            (a.scope.as_str(), a.floor_percent, a.target, a.min_requests),
            ("", 25, 0.95, 20)
        );
        assert_eq!(
            parse(r#"{"policies": [{"name": "api", "limit": {"requests": 10, "per": "1s"}}]}"#)
                .unwrap()[0]
                .adaptive,
            None
        );
    }

    #[test]
    fn adaptive_refusals_name_the_field() {
        let base = |adaptive: &str| {
            format!(
                r#"{{"policies": [{{"name": "api", "limit": {{"requests": 10, "per": "1s"}}, "adaptive": {adaptive}}}]}}"#
            )
        };
        let err = |adaptive: &str| parse(&base(adaptive)).unwrap_err().to_string();
        assert!(
            err(r#"{"scope": "x"}"#).starts_with("policies[0].adaptive.policy: required"),
            "{}",
            err(r#"{"scope": "x"}"#)
        );
        assert!(err(r#"{"policy": "o", "floor": 0}"#)
            .starts_with("policies[0].adaptive.floor: must be more than 0"));
        assert!(err(r#"{"policy": "o", "floor": 1.5}"#)
            .starts_with("policies[0].adaptive.floor: must be from 0 to 1"));
        assert!(err(r#"{"policy": "o", "target": 0}"#)
            .starts_with("policies[0].adaptive.target: must be more than 0"));
        assert!(err(r#"{"policy": "o", "scope": ""}"#)
            .starts_with("policies[0].adaptive.scope: must not be empty"));
        assert!(err(r#"{"policy": "o", "min_requests": 0}"#)
            .starts_with("policies[0].adaptive.min_requests:"));
        assert!(
            err(r#"{"policy": "o", "window": "1s"}"#)
                .starts_with("policies[0].adaptive.window: unknown field"),
            "{}",
            err(r#"{"policy": "o", "window": "1s"}"#)
        );
        let fleet = parse(r#"{"policies": [{"name": "api", "limit": {"requests": 10, "per": "1s"}, "store": {"redis": {"cluster": "webdis"}}, "adaptive": {"policy": "o"}}]}"#).unwrap_err().to_string();
        assert!(
            fleet.starts_with("policies[0].adaptive: cannot be combined with a fleet-wide limit"),
            "{fleet}"
        );
    }

    #[test]
    fn the_minimal_configuration_works_as_written() {
        let p = parse(
            r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}}]}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 1);
        let p = &p[0];
        assert_eq!(p.key, Selector::Header("x-api-key".into()));
        assert_eq!(p.limiter.rate().burst, 100);
        assert_eq!(p.limiter.algorithm(), Algorithm::TokenBucket);
        assert_eq!(p.missing_key, MissingKey::Shared);
        assert_eq!(p.max_delay, Duration::ZERO);
        assert!(p.response_headers);
        assert_eq!(p.deny.status, 429);
        assert_eq!(p.key_prefix(), "keel/rate_limit/per-key/");
    }

    #[test]
    fn tiers_choose_their_limit() {
        let p = parse(
            r#"{"policies": [{"name": "plans", "key": "header:x-api-key",
                "limit": {"requests": 1, "per": "1s"},
                "tiers": {"key": "header:x-plan", "default": "free",
                          "limits": {"free": {"requests": 10, "per": "1s"},
                                     "pro": {"requests": 100, "per": "1s"}}}}]}"#,
        )
        .unwrap();
        let p = &p[0];
        assert_eq!(p.limiter_for(Some(b"pro")).0, "pro");
        assert_eq!(p.limiter_for(Some(b"pro")).1.rate().requests, 100);
        assert_eq!(p.limiter_for(Some(b"gold")).0, "free");
        assert_eq!(p.limiter_for(None).1.rate().requests, 10);
        assert_eq!(p.limiter_count(), 3);
        for tier in [Some(&b"pro"[..]), Some(b"free"), Some(b"gold"), None] {
            let i = p.limiter_index(tier);
            assert!(i < p.limiter_count());
            assert_eq!(p.limiter_at(i), p.limiter_for(tier));
        }
        assert_eq!(p.limiter_at(0).0, "");
        assert_eq!(p.limiter_at(99).0, "");
    }

    #[test]
    fn sorted_maps_read_objects_as_a_btree_map_does() {
        use alloc::collections::BTreeMap;
        for json in [
            r#"{}"#,
            r#"{"b": "1", "a": "2", "c": "3"}"#,
            r#"{"x": "1", "x": "2", "a": "0", "x": "3"}"#,
            r#"{"é": "1", "Z": "2", "z": "3", "": "4"}"#,
        ] {
            let ours: SortedMap<String, String> = serde_json::from_str(json).unwrap();
            let btree: BTreeMap<String, String> = serde_json::from_str(json).unwrap();
            let expected: Vec<(String, String)> = btree.into_iter().collect();
            assert_eq!(ours.0, expected, "{json}");
        }
        for json in ["5", "[]", r#"{"a": 1}"#, "null"] {
            let ours = serde_json::from_str::<SortedMap<String, String>>(json).unwrap_err();
            let btree = serde_json::from_str::<BTreeMap<String, String>>(json).unwrap_err();
            assert_eq!(ours.to_string(), btree.to_string(), "{json}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                r#"{"policies": [{"name": "a", "limit": {"requests": 1, "per": "fast"}}]}"#,
                "policies[0].limit.per",
            ),
            (
                r#"{"policies": [{"name": "a", "limit": {"requests": 1, "per": "1s"}}, {"name": "b", "key": "ip", "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[1].key",
            ),
            (
                r#"{"policies": [{"name": "a", "algorithm": "magic", "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].algorithm",
            ),
            (
                r#"{"policies": [{"name": "a", "missing_key": "maybe", "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].missing_key",
            ),
            (
                r#"{"policies": [{"name": "a", "max_keys": 0, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].max_keys",
            ),
            (
                r#"{"policies": [{"name": "a", "shaping": {"max_delay": "2h"}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].shaping.max_delay",
            ),
            (
                r#"{"policies": [{"name": "a", "deny": {"status": 99}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].deny.status",
            ),
            (
                r#"{"policies": [{"name": "a", "deny": {"headers": {"x-a": "1\r\nx-b: 2"}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].deny.headers.x-a",
            ),
            (
                r#"{"policies": [{"name": "a", "tiers": {"key": "header:x-plan", "default": "gold", "limits": {"free": {"requests": 1, "per": "1s"}}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].tiers.default",
            ),
            (
                r#"{"policies": [{"name": "a", "limit": {"requests": 1, "per": "1s"}}, {"name": "a", "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[1].name",
            ),
            (r#"{"policies": []}"#, "policies"),
            (
                r#"{"policies": [{"name": "a", "algorithm": "fixed_window", "store": {"redis": {"cluster": "w"}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].algorithm",
            ),
            (
                r#"{"policies": [{"name": "a", "shaping": {"max_delay": "1s"}, "store": {"redis": {"cluster": "w"}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].shaping",
            ),
            (
                r#"{"policies": [{"name": "a", "store": {"redis": {"cluster": "w", "timeout": "1h"}}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].store.redis.timeout",
            ),
            (
                r#"{"policies": [{"name": "a", "store": {"redis": {"cluster": "w"}, "on_store_error": "x"}, "limit": {"requests": 1, "per": "1s"}}]}"#,
                "policies[0].store.on_store_error",
            ),
        ];
        for (json, path) in cases {
            let e = parse(json).unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }
}
