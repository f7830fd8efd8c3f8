//! The adaptive filter's configuration: what an operator writes, validated into policies.
//!
//! ```json
//! {"policies": [
//!   {"name": "orders", "scope": "cluster", "concurrency": {"controller": "gradient"}},
//!   {"name": "search", "routes": ["search"], "throttle": {"k": 2, "window": "30s"}}
//! ]}
//! ```
//!
//! A policy has exactly one kind, `concurrency` or `throttle`; every constant of a kind is
//! optional and defaults to its reference's (see [`GradientParams`], [`AimdParams`],
//! [`ThrottleParams`]). `docs/config/adaptive.md` is the reference.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use super::concurrency::{AimdParams, Controller, GradientParams};
use super::throttle::ThrottleParams;
use super::wire::{AdaptiveSpec, ConcurrencySpec, ControllerName, PolicySpec, ThrottleSpec};
use crate::config::{validate_each, ConfigError, FieldPath, Validate};
use crate::time::Duration;

/// What one limit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One limit per Envoy route name.
    Route,
    /// One limit per upstream cluster of the route.
    Cluster,
    /// One limit for every request of the policy.
    Global,
}

/// What a policy does.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// An adaptive concurrency limit.
    Concurrency(Controller),
    /// Success-rate throttling.
    Throttle(ThrottleParams),
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptivePolicy {
    /// Its name.
    pub name: String,
    /// The routes it applies to (`None`: all).
    pub routes: Option<Vec<String>>,
    /// What one limit covers.
    pub scope: Scope,
    /// What it does.
    pub kind: Kind,
    /// The refusal's status.
    pub deny_status: u32,
    /// The refusal's `retry-after`.
    pub retry_after: Duration,
}

impl Validate for Vec<AdaptivePolicy> {
    type Wire = AdaptiveSpec;
    /// Validates the configuration; the error names the field.
    fn validate(spec: &AdaptiveSpec) -> Result<Vec<AdaptivePolicy>, ConfigError> {
        validate_each(
            &FieldPath::root().field("policies"),
            "policy",
            &spec.policies,
            |p| p.name.as_str(),
            validate_policy,
        )
    }
}

fn validate_policy(path: &FieldPath, spec: &PolicySpec) -> Result<AdaptivePolicy, ConfigError> {
    let scope = spec.scope.unwrap_or(Scope::Cluster);
    let kind = match (&spec.concurrency, &spec.throttle) {
        (Some(c), None) => Kind::Concurrency(validate_concurrency(&path.field("concurrency"), c)?),
        (None, Some(t)) => Kind::Throttle(validate_throttle(&path.field("throttle"), t)?),
        _ => {
            return Err(path.error(
                "needs exactly one of \"concurrency\" (an adaptive concurrency limit) or \"throttle\" (success-rate throttling)",
            ))
        }
    };
    let deny = spec.deny.clone().unwrap_or_default();
    let deny_status = deny.status.map_or(503, |s| s.get_u32());
    let retry_after = deny.retry_after.map_or(Duration::from_secs(1), |d| d.0);
    Ok(AdaptivePolicy {
        name: spec.name.as_str().to_owned(),
        routes: spec.routes.as_ref().map(|r| r.names().to_vec()),
        scope,
        kind,
        deny_status,
        retry_after,
    })
}

fn fraction(
    path: &FieldPath,
    value: Option<f64>,
    default: f64,
    low: f64,
    high: f64,
    open_low: bool,
) -> Result<f64, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let ok = v.is_finite() && v <= high && if open_low { v > low } else { v >= low };
    if ok {
        Ok(v)
    } else {
        let bracket = if open_low { "(" } else { "[" };
        Err(path.error(format!(
            "expected a number in {bracket}{low}, {high}], got {v}"
        )))
    }
}

fn limits(
    path: &FieldPath,
    spec: &ConcurrencySpec,
    (initial, min, max): (u32, u32, u32),
) -> Result<(u32, u32, u32), ConfigError> {
    let min = spec.min_limit.unwrap_or(min);
    let max = spec.max_limit.unwrap_or(max);
    if min == 0 {
        return Err(path.field("min_limit").error("must be at least 1"));
    }
    if max < min {
        return Err(path
            .field("max_limit")
            .error(format!("must be at least min_limit ({min}), got {max}")));
    }
    let initial = spec.initial_limit.unwrap_or(initial.clamp(min, max));
    if !(min..=max).contains(&initial) {
        return Err(path.field("initial_limit").error(format!(
            "must be within min_limit and max_limit ({min}..={max}), got {initial}"
        )));
    }
    Ok((initial, min, max))
}

fn validate_concurrency(
    path: &FieldPath,
    spec: &ConcurrencySpec,
) -> Result<Controller, ConfigError> {
    let only = |field: &str, set: bool, controller: &str| -> Result<(), ConfigError> {
        if set {
            Err(path
                .field(field)
                .error(format!("does not apply to the {controller} controller")))
        } else {
            Ok(())
        }
    };
    match spec.controller.unwrap_or(ControllerName::Gradient) {
        ControllerName::Gradient => {
            only("backoff", spec.backoff.is_some(), "gradient")?;
            only("timeout", spec.timeout.is_some(), "gradient")?;
            let d = GradientParams::default();
            let (initial_limit, min_limit, max_limit) =
                limits(path, spec, (d.initial_limit, d.min_limit, d.max_limit))?;
            let max_samples = spec.max_samples.map_or(d.max_samples, |n| n.get_u32());
            Ok(Controller::Gradient(GradientParams {
                update_interval: spec.update_interval.map_or(d.update_interval, |t| t.0),
                percentile: fraction(
                    &path.field("percentile"),
                    spec.percentile,
                    d.percentile,
                    0.0,
                    100.0,
                    true,
                )?,
                buffer: fraction(
                    &path.field("buffer"),
                    spec.buffer,
                    d.buffer,
                    0.0,
                    10.0,
                    false,
                )?,
                min_limit,
                max_limit,
                initial_limit,
                min_rtt_window: spec.min_rtt_window.map_or(d.min_rtt_window, |t| t.0),
                probe_fraction: fraction(
                    &path.field("probe_fraction"),
                    spec.probe_fraction,
                    d.probe_fraction,
                    0.0,
                    1.0,
                    true,
                )?,
                max_samples,
            }))
        }
        ControllerName::Aimd => {
            for (field, set) in [
                ("update_interval", spec.update_interval.is_some()),
                ("percentile", spec.percentile.is_some()),
                ("buffer", spec.buffer.is_some()),
                ("min_rtt_window", spec.min_rtt_window.is_some()),
                ("probe_fraction", spec.probe_fraction.is_some()),
                ("max_samples", spec.max_samples.is_some()),
            ] {
                only(field, set, "aimd")?;
            }
            let d = AimdParams::default();
            let (initial_limit, min_limit, max_limit) =
                limits(path, spec, (d.initial_limit, d.min_limit, d.max_limit))?;
            let backoff = fraction(
                &path.field("backoff"),
                spec.backoff,
                d.backoff,
                0.0,
                1.0,
                true,
            )?;
            if backoff >= 1.0 {
                return Err(path
                    .field("backoff")
                    .error("must be below 1 (it is what a drop multiplies the limit by)"));
            }
            Ok(Controller::Aimd(AimdParams {
                initial_limit,
                min_limit,
                max_limit,
                backoff,
                timeout: spec.timeout.map_or(d.timeout, |t| t.0),
            }))
        }
    }
}

fn validate_throttle(path: &FieldPath, spec: &ThrottleSpec) -> Result<ThrottleParams, ConfigError> {
    let d = ThrottleParams::default();
    let buckets = spec
        .buckets
        .map_or(d.buckets, |n| u8::try_from(n.get()).unwrap_or(u8::MAX));
    let k = spec.k.unwrap_or(d.k);
    if !(k.is_finite() && k >= 1.0) {
        return Err(path
            .field("k")
            .error(format!("must be a number of at least 1, got {k}")));
    }
    Ok(ThrottleParams {
        window: spec.window.map_or(d.window, |t| t.0),
        buckets,
        k,
        max_probability: fraction(
            &path.field("max_probability"),
            spec.max_probability,
            d.max_probability,
            0.0,
            1.0,
            false,
        )?,
    })
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// The production entry point.
    fn load(json: &str) -> Result<Vec<AdaptivePolicy>, ConfigError> {
        crate::config::load(json.as_bytes())
    }

    #[test]
    fn defaults_are_the_references() {
        let p = load(r#"{"policies": [{"name": "a", "concurrency": {}}, {"name": "b", "throttle": {}}, {"name": "c", "concurrency": {"controller": "aimd"}}]}"#).unwrap();
        assert_eq!(
            p[0].kind,
            Kind::Concurrency(Controller::Gradient(GradientParams::default()))
        );
        assert_eq!(p[0].scope, Scope::Cluster);
        assert_eq!(
            (p[0].deny_status, p[0].retry_after),
            (503, Duration::from_secs(1))
        );
        assert_eq!(p[1].kind, Kind::Throttle(ThrottleParams::default()));
        assert_eq!(
            p[2].kind,
            Kind::Concurrency(Controller::Aimd(AimdParams::default()))
        );
    }

    #[test]
    fn every_constant_is_configurable() {
        let p = load(
            r#"{"policies": [{"name": "a", "scope": "global", "concurrency": {
            "update_interval": "50ms", "percentile": 90, "buffer": 0.5, "min_rtt_window": "10s",
            "probe_fraction": 0.25, "max_samples": 128, "initial_limit": 10, "min_limit": 2,
            "max_limit": 50}, "deny": {"status": 429, "retry_after": "2s"}}]}"#,
        )
        .unwrap();
        let Kind::Concurrency(Controller::Gradient(g)) = &p[0].kind else {
            panic!()
        };
        assert_eq!(
            *g,
            GradientParams {
                update_interval: Duration::from_millis(50),
                percentile: 90.0,
                buffer: 0.5,
                min_limit: 2,
                max_limit: 50,
                initial_limit: 10,
                min_rtt_window: Duration::from_secs(10),
                probe_fraction: 0.25,
                max_samples: 128,
            }
        );
        assert_eq!((p[0].scope, p[0].deny_status), (Scope::Global, 429));
    }

    #[test]
    fn errors_name_the_field() {
        let path = |json: &str| load(json).unwrap_err().path;
        assert_eq!(path(r#"{"policies": [{"name": "a"}]}"#), "policies[0]");
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "concurrency": {}, "throttle": {}}]}"#),
            "policies[0]"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "concurrency": {"buffer": -1}}]}"#),
            "policies[0].concurrency.buffer"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "concurrency": {"controller": "vegas"}}]}"#),
            "policies[0].concurrency.controller"
        );
        assert_eq!(
            path(
                r#"{"policies": [{"name": "a", "concurrency": {"controller": "aimd", "buffer": 0.1}}]}"#
            ),
            "policies[0].concurrency.buffer"
        );
        assert_eq!(
            path(
                r#"{"policies": [{"name": "a", "concurrency": {"min_limit": 5, "max_limit": 4}}]}"#
            ),
            "policies[0].concurrency.max_limit"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "concurrency": {"update_interval": "0s"}}]}"#),
            "policies[0].concurrency.update_interval"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "throttle": {"k": 0.5}}]}"#),
            "policies[0].throttle.k"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "throttle": {"max_probability": 2}}]}"#),
            "policies[0].throttle.max_probability"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "scope": "host", "throttle": {}}]}"#),
            "policies[0].scope"
        );
        assert_eq!(
            path(r#"{"policies": [{"name": "a", "throttle": {"windw": "1s"}}]}"#),
            "policies[0].throttle.windw"
        );
    }
}
