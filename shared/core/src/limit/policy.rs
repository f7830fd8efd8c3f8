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

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{Algorithm, KeyTable, Limiter};
use crate::config::{
    check_names, parse_duration, ConfigError, FieldPath, Rate, RateSpec, Selector,
};
use crate::time::Duration;

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
    pub name: String,
    /// Envoy route names the policy applies to; all routes when absent.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
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
    pub missing_key: Option<String>,
    /// The most keys tracked at once (slots in shared data); default 16384.
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Delay requests over the limit instead of refusing them.
    #[serde(default)]
    pub shaping: Option<ShapingSpec>,
    /// Whether allowed responses carry the `RateLimit` headers; default true.
    #[serde(default)]
    pub response_headers: Option<bool>,
    /// The reply to a refused request.
    #[serde(default)]
    pub deny: Option<DenySpec>,
}

/// Tiers as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersSpec {
    /// The selector whose value names the tier, e.g. `header:x-plan`.
    pub key: String,
    /// The limit of each tier by name.
    pub limits: SortedMap<RateSpec>,
    /// The tier of requests without a known tier; the policy's `limit` when absent.
    #[serde(default)]
    pub default: Option<String>,
}

/// Shaping as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingSpec {
    /// The longest a request may be held; longer waits are refused.
    pub max_delay: String,
}

/// The refusal reply as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenySpec {
    /// Status, default 429.
    #[serde(default)]
    pub status: Option<u32>,
    /// Body, default `rate limited\n`.
    #[serde(default)]
    pub body: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: Option<SortedMap<String>>,
}

/// A JSON object read as its entries sorted by key, a repeated key keeping its last value:
/// what a `BTreeMap` gives (same order, same errors), in a `Vec` whose code is a fraction of
/// the B-tree's in a module that only reads a few entries once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedMap<V>(pub Vec<(String, V)>);

impl<V> Default for SortedMap<V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<V> SortedMap<V> {
    /// The entries, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for SortedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = SortedMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    match entries.binary_search_by(|(k, _)| k.as_str().cmp(key.as_str())) {
                        Ok(i) => {
                            if let Some(entry) = entries.get_mut(i) {
                                entry.1 = value;
                            }
                        }
                        Err(i) => entries.insert(i, (key, value)),
                    }
                }
                Ok(SortedMap(entries))
            }
        }

        deserializer.deserialize_map(Entries(PhantomData))
    }
}

/// What happens to a request that does not carry the policy's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The refusal reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyReply {
    /// HTTP status.
    pub status: u32,
    /// Body.
    pub body: String,
    /// Extra headers (lower-case names).
    pub headers: Vec<(String, String)>,
}

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

    /// The shared-data key prefix of this policy's slots.
    pub fn key_prefix(&self) -> String {
        format!("keel/rate_limit/{}/", self.name)
    }
}

/// Validates the whole configuration.
pub fn validate(spec: &RateLimitSpec) -> Result<Vec<RateLimitPolicy>, ConfigError> {
    let root = FieldPath::root().field("policies");
    if spec.policies.is_empty() {
        return Err(root.error("needs at least one policy"));
    }
    check_names(&root, "name", spec.policies.iter().map(|p| p.name.as_str()))?;
    spec.policies
        .iter()
        .enumerate()
        .map(|(i, p)| validate_policy(&root.index(i), p))
        .collect()
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
    let missing_key = match spec.missing_key.as_deref() {
        None | Some("shared") => MissingKey::Shared,
        Some("allow") => MissingKey::Allow,
        Some("deny") => MissingKey::Deny,
        Some(other) => {
            return Err(path.field("missing_key").error(format!(
                "expected \"shared\", \"allow\" or \"deny\", got \"{other}\""
            )))
        }
    };
    let max_keys = spec.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys == 0 || max_keys > MAX_MAX_KEYS {
        return Err(path.field("max_keys").error(format!(
            "must be between 1 and {MAX_MAX_KEYS}, got {max_keys}"
        )));
    }
    let max_delay = match &spec.shaping {
        Some(s) => {
            let at = path.field("shaping").field("max_delay");
            let d = parse_duration(&at, &s.max_delay)?;
            if d.is_zero() || d > Duration::from_secs(60) {
                return Err(at.error(format!(
                    "must be more than zero and at most 60s (a held request holds a connection), got \"{}\"",
                    s.max_delay
                )));
            }
            d
        }
        None => Duration::ZERO,
    };
    Ok(RateLimitPolicy {
        name: spec.name.clone(),
        routes: spec.routes.clone(),
        key,
        limiter,
        tiers,
        missing_key,
        table: KeyTable::new(max_keys),
        max_delay,
        response_headers: spec.response_headers.unwrap_or(true),
        deny: match &spec.deny {
            Some(deny) => validate_deny(&path.field("deny"), deny)?,
            None => validate_deny(&path.field("deny"), &DenySpec::default())?,
        },
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

fn validate_deny(path: &FieldPath, spec: &DenySpec) -> Result<DenyReply, ConfigError> {
    let status = spec.status.unwrap_or(429);
    if !(200..=599).contains(&status) {
        return Err(path.field("status").error(format!(
            "must be an HTTP status from 200 to 599, got {status}"
        )));
    }
    let body = spec
        .body
        .clone()
        .unwrap_or_else(|| "rate limited\n".to_string());
    if body.len() > 65_536 {
        return Err(path.field("body").error("must be at most 64 KiB"));
    }
    let mut headers = Vec::new();
    for (name, value) in spec.headers.iter().flat_map(SortedMap::iter) {
        let at = path.field("headers").field(name);
        if name.is_empty() || name.starts_with(':') || !name.bytes().all(is_token_byte) {
            return Err(at.error("is not a valid header name"));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(at.error("header values may not contain CR, LF or NUL"));
        }
        headers.push((name.to_ascii_lowercase(), value.clone()));
    }
    Ok(DenyReply {
        status,
        body,
        headers,
    })
}

/// RFC 9110 token characters, which header names consist of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn parse(json: &str) -> Result<Vec<RateLimitPolicy>, ConfigError> {
        let spec: RateLimitSpec =
            serde_json::from_str(json).map_err(|e| ConfigError::new("", e.to_string()))?;
        validate(&spec)
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
            let ours: SortedMap<String> = serde_json::from_str(json).unwrap();
            let btree: BTreeMap<String, String> = serde_json::from_str(json).unwrap();
            let expected: Vec<(String, String)> = btree.into_iter().collect();
            assert_eq!(ours.0, expected, "{json}");
        }
        for json in ["5", "[]", r#"{"a": 1}"#, "null"] {
            let ours = serde_json::from_str::<SortedMap<String>>(json).unwrap_err();
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
        ];
        for (json, path) in cases {
            let e = parse(json).unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }
}
