//! The retry policy: the validated [`RetryPolicy`] of one route set, and [`RetryConfig`], the
//! filter's policies in order, read with [`crate::config::load`] from the wire structs in
//! [`super::wire`]. Each field's own rule is checked while the JSON is read; what is checked here
//! is what spans fields (`per_try_timeout` within `deadline`, `retry_on` against
//! `retriable_statuses`) and policies (unique names, reachable policies).
//!
//! ```json
//! {"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3,
//!   "backoff": {"base": "25ms", "cap": "250ms", "jitter": "full"},
//!   "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}
//! ```
//!
//! | field | default | rule |
//! |---|---|---|
//! | `name` | required | letters, digits, `-`, `_`; unique; names metrics and the shared-data key |
//! | `cluster` | the route's cluster | the Envoy cluster retries are sent to as callouts |
//! | `routes` | all routes | Envoy route names; the first policy naming a route wins |
//! | `max_attempts` | 3 | 1 to 5, first attempt included (1: never retry); gRPC caps at 5 too |
//! | `backoff.base` | `"25ms"` | more than zero (Envoy's default base) |
//! | `backoff.cap` | 10 x `base` | at least `base` (Envoy's default cap) |
//! | `backoff.jitter` | `"full"` | `full`, `equal`, `decorrelated`, `none` |
//! | `budget.ratio` | 0.2 | 0 to 4 |
//! | `budget.min_per_second` | 10 | 0 to 1 000 000 |
//! | `budget.ttl` | `"10s"` | 1 s to 60 s |
//! | `retry_on` | `["5xx", "reset", "connect-failure"]` | see [`crate::retry::condition`] |
//! | `retriable_statuses` | `[]` | 400 to 599, retried whatever `retry_on` says |
//! | `deadline` | `"10s"` | more than zero; from the request's arrival to the last attempt's start |
//! | `per_try_timeout` | `"2s"`, at most `deadline` | more than zero, at most `deadline` |
//! | `max_body` | 65536 | bytes, at most 16 MiB: larger bodies are never retried |
//! | `attempt_header` | `"x-keel-attempts"` | response header with the attempt count; `null` disables |
//! | `idempotency_key_header` | `"idempotency-key"` | request header that makes any method retryable |
//! | `respect_retry_after` | `true` | wait for `Retry-After` / `X-RateLimit-Reset` on 429 and 503 |
//! | `max_retry_after` | `"300s"` | more than zero, at most 1 h; a longer ask gives up (Envoy's bound) |
//! | `breaker` | none | a per-host breaker's name (the circuit-breaker filter, scope `host`, same `vm_id`): a retry never goes to a host whose breaker is not closed |
//! | `first_attempt` | `"router"` | `router`: the first attempt goes through the host's router and only retries are callouts; `callout`: every attempt of an eligible request is a callout (for hosts that cannot replace a response they already hold) |
//!
//! Why these defaults: `deadline` 10 s bounds how long a client is held; `per_try_timeout` 2 s
//! lets three tries with their backoff fit in it with room to spare, while leaving slow but
//! healthy answers alone (set it near the backend's p99.9). The first attempt goes through
//! Envoy's router, whose route timeout applies to it instead. Because the deadline applies,
//! a `Retry-After` longer than what is left of it also gives up, whatever `max_retry_after`.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::Deserialize;

use super::wire::{BackoffSpec, BudgetSpec, PolicySpec, RetryConfigSpec};
use crate::config::{validate_each, ConfigError, FieldPath, Routes, Validate};
use crate::retry::backoff::{Backoff, InvalidBackoff};
use crate::retry::budget::{InvalidBudget, RetryBudget};
use crate::retry::condition::{RetryCondition, RetryOn, DEFAULT_RETRY_ON};
use crate::retry::eligibility::{Eligibility, IDEMPOTENCY_KEY_HEADER};
use crate::routes::Routed;
use crate::time::Duration;

/// The most attempts a policy may make, first attempt included.
pub const MAX_ATTEMPTS: u32 = 5;
/// The default `max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The default `deadline`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// The default `per_try_timeout` (lowered to the deadline when that is shorter).
pub const DEFAULT_PER_TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// The default `max_body`: 64 KiB.
pub const DEFAULT_MAX_BODY: u64 = 64 * 1024;
/// The largest `max_body`: 16 MiB, held in the VM's memory while attempts last.
pub const MAX_MAX_BODY: u64 = 16 * 1024 * 1024;
/// The default `attempt_header`.
pub const DEFAULT_ATTEMPT_HEADER: &str = "x-keel-attempts";
/// The default `max_retry_after`: Envoy's bound on rate-limit headers.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The largest `max_retry_after`.
pub const MAX_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How the first attempt of an eligible request is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstAttempt {
    /// Through the host's router, as any request: a request that succeeds costs no callout.
    /// When its response calls for a retry, the filter holds that response and later replaces
    /// it with the last attempt's. Needs a host that can pause a response and answer in its
    /// place afterwards (Envoy can).
    #[default]
    Router,
    /// Every attempt is a callout, the first included; the request is held at its headers and
    /// answered by the filter. For hosts that cannot replace a response once it started. Only
    /// requests without a body go this way: Envoy never shows a filter the body of a request
    /// it holds at its headers, so the glue lets those pass unretried.
    Callout,
}

impl FirstAttempt {
    /// The configuration name: `router` or `callout`.
    pub fn name(self) -> &'static str {
        match self {
            FirstAttempt::Router => "router",
            FirstAttempt::Callout => "callout",
        }
    }
}

/// A validated retry policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    name: String,
    cluster: Option<String>,
    routes: Option<Routes>,
    max_attempts: u32,
    backoff: Backoff,
    budget: RetryBudget,
    retry_on: RetryOn,
    per_try_timeout: Duration,
    deadline: Duration,
    max_body: u64,
    attempt_header: Option<String>,
    idempotency_key_header: String,
    respect_retry_after: bool,
    max_retry_after: Duration,
    first_attempt: FirstAttempt,
    breaker: Option<String>,
}

impl RetryPolicy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The Envoy cluster retries are sent to; `None`: the cluster the host routed the request
    /// to.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }
    /// Attempts, the first included: 1 to [`MAX_ATTEMPTS`].
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    /// The backoff schedule.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
    /// The retry budget.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
    /// The shared-data key of the budget: `keel/retry/<name>/budget`.
    pub fn budget_key(&self) -> String {
        format!("keel/retry/{}/budget", self.name)
    }
    /// What is retried.
    pub fn retry_on(&self) -> &RetryOn {
        &self.retry_on
    }
    /// The longest a retry attempt may take.
    pub fn per_try_timeout(&self) -> Duration {
        self.per_try_timeout
    }
    /// The longest from a request's arrival to the start of its last attempt.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }
    /// The largest body that is buffered for retries.
    pub fn max_body(&self) -> u64 {
        self.max_body
    }
    /// The per-host breaker (scope `host`, same `vm_id`) whose open hosts a retry never goes
    /// to, if configured.
    pub fn breaker(&self) -> Option<&str> {
        self.breaker.as_deref()
    }
    /// The response header carrying the attempt count, if any (lower case).
    pub fn attempt_header(&self) -> Option<&str> {
        self.attempt_header.as_deref()
    }
    /// The request header that makes any method retryable (lower case).
    pub fn idempotency_key_header(&self) -> &str {
        &self.idempotency_key_header
    }
    /// Whether 429 and 503 pushback is waited for.
    pub fn respect_retry_after(&self) -> bool {
        self.respect_retry_after
    }
    /// The longest pushback waited for.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }
    /// How the first attempt is sent.
    pub fn first_attempt(&self) -> FirstAttempt {
        self.first_attempt
    }
    /// The eligibility of a request under this policy (see [`Eligibility::of`]).
    pub fn eligibility(
        &self,
        method: &str,
        idempotency_key: Option<&str>,
        body_len: u64,
    ) -> Eligibility {
        Eligibility::of(method, idempotency_key, body_len, self.max_body)
    }

    /// Validates the policy written at `path`.
    pub fn from_spec(path: &FieldPath, spec: &PolicySpec) -> Result<RetryPolicy, ConfigError> {
        let cluster = match &spec.cluster {
            Some(cluster) if cluster.trim().is_empty() => {
                return Err(path.field("cluster").error(
                    "must not be empty (the Envoy cluster to retry to; omit it for the route's cluster)",
                ))
            }
            cluster => cluster.clone(),
        };
        let max_attempts = spec
            .max_attempts
            .map_or(DEFAULT_MAX_ATTEMPTS, |n| n.get_u32());
        let backoff = validate_backoff(
            &path.field("backoff"),
            spec.backoff.as_ref().unwrap_or(&BackoffSpec::default()),
        )?;
        let budget = validate_budget(
            &path.field("budget"),
            spec.budget.as_ref().unwrap_or(&BudgetSpec::default()),
        )?;

        let deadline = spec.deadline.map_or(DEFAULT_DEADLINE, |d| d.0);
        let per_try_timeout = match spec.per_try_timeout {
            Some(timeout) if timeout.0 > deadline => {
                return Err(path.field("per_try_timeout").error(format!(
                    "must be at most the deadline ({deadline}), got {}",
                    timeout.0
                )));
            }
            Some(timeout) => timeout.0,
            None => DEFAULT_PER_TRY_TIMEOUT.min(deadline),
        };
        let max_body = spec.max_body.map_or(DEFAULT_MAX_BODY, |n| n.get());

        let attempt_header = match &spec.attempt_header {
            None => Some(DEFAULT_ATTEMPT_HEADER.to_owned()),
            Some(None) => None,
            Some(Some(name)) => Some(name.as_str().to_owned()),
        };
        let idempotency_key_header = spec
            .idempotency_key_header
            .as_ref()
            .map_or(IDEMPOTENCY_KEY_HEADER, |h| h.as_str())
            .to_owned();

        let respect_retry_after = spec.respect_retry_after.unwrap_or(true);
        let max_retry_after = match spec.max_retry_after {
            Some(max) if max.0 > MAX_MAX_RETRY_AFTER => {
                return Err(path
                    .field("max_retry_after")
                    .error(format!("at most {MAX_MAX_RETRY_AFTER}, got {}", max.0)));
            }
            Some(max) => max.0,
            None => DEFAULT_MAX_RETRY_AFTER,
        };
        let retry_on = validate_retry_on(path, spec, respect_retry_after)?;

        Ok(RetryPolicy {
            name: spec.name.as_str().to_owned(),
            cluster,
            routes: spec.routes.clone(),
            max_attempts,
            backoff,
            budget,
            retry_on,
            per_try_timeout,
            deadline,
            max_body,
            attempt_header,
            idempotency_key_header,
            respect_retry_after,
            max_retry_after,
            first_attempt: spec.first_attempt.unwrap_or_default(),
            breaker: spec.breaker.as_ref().map(|b| b.as_str().to_owned()),
        })
    }
}

fn validate_backoff(path: &FieldPath, spec: &BackoffSpec) -> Result<Backoff, ConfigError> {
    let base = spec.base.map_or(Backoff::default().base(), |d| d.0);
    // Envoy's rule for an absent cap: ten times the base.
    let cap = spec.cap.map_or(base.saturating_mul(10), |d| d.0);
    let jitter = spec.jitter.unwrap_or_default();
    Backoff::new(base, cap, jitter).map_err(|e| match e {
        InvalidBackoff::ZeroBase => path.field("base").error(e.to_string()),
        InvalidBackoff::CapBelowBase => path
            .field("cap")
            .error(format!("must be at least base ({base}), got {cap}")),
    })
}

fn validate_budget(path: &FieldPath, spec: &BudgetSpec) -> Result<RetryBudget, ConfigError> {
    let defaults = RetryBudget::default();
    let ratio = spec.ratio.unwrap_or(defaults.ratio());
    let min_per_second = spec.min_per_second.unwrap_or(defaults.min_per_second());
    let ttl = spec.ttl.map_or(defaults.ttl(), |d| d.0);
    RetryBudget::new(ratio, min_per_second, ttl).map_err(|e| match e {
        InvalidBudget::Ratio => path.field("ratio").error(format!("{e}, got {ratio}")),
        InvalidBudget::MinPerSecond => path
            .field("min_per_second")
            .error(format!("{e}, got {min_per_second}")),
        InvalidBudget::Ttl => path.field("ttl").error(format!("{e}, got {ttl}")),
    })
}

fn validate_retry_on(
    path: &FieldPath,
    spec: &PolicySpec,
    respect_retry_after: bool,
) -> Result<RetryOn, ConfigError> {
    let statuses: Vec<u16> = spec
        .retriable_statuses
        .iter()
        .flatten()
        .map(|s| s.get_u16())
        .collect();
    let Some(conditions) = &spec.retry_on else {
        return Ok(RetryOn::new(&DEFAULT_RETRY_ON, statuses));
    };
    let at = path.field("retry_on");
    for (i, condition) in conditions.iter().enumerate() {
        match condition {
            RetryCondition::RetriableStatusCodes if statuses.is_empty() => {
                return Err(at
                    .index(i)
                    .error("\"retriable-status-codes\" needs a non-empty \"retriable_statuses\""));
            }
            RetryCondition::RateLimited if !respect_retry_after => {
                return Err(at.index(i).error(
                    "\"rate-limited\" waits for Retry-After: it needs \"respect_retry_after\": true",
                ));
            }
            _ => {}
        }
    }
    if conditions.is_empty() && statuses.is_empty() {
        return Err(at.error(
            "an empty list never retries; omit it for the default [\"5xx\", \"reset\", \"connect-failure\"]",
        ));
    }
    Ok(RetryOn::new(conditions, statuses))
}

/// The validated configuration: the policies in order.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    policies: Vec<RetryPolicy>,
}

impl RetryConfig {
    /// Validates a parsed document.
    pub fn from_spec(spec: &RetryConfigSpec) -> Result<RetryConfig, ConfigError> {
        let path = FieldPath::root().field("policies");
        let policies = validate_each(
            &path,
            "retry policy",
            spec.policies.as_deref().unwrap_or_default(),
            |p| p.name.as_str(),
            RetryPolicy::from_spec,
        )?;
        check_reachable(&path, &policies)?;
        Ok(RetryConfig { policies })
    }

    /// The policies, in order.
    pub fn policies(&self) -> &[RetryPolicy] {
        &self.policies
    }
}

impl Routed for RetryPolicy {
    /// The route names it applies to; `None` for all routes (the first policy that applies to
    /// a request's route is its policy: [`crate::routes::first`]).
    fn routes(&self) -> Option<&[String]> {
        self.routes.as_ref().map(Routes::names)
    }
}

/// Refuses a policy that can never be chosen: after one for all routes, or naming only routes
/// that earlier policies took. Either is a mistake the operator wants to hear about at load.
fn check_reachable(path: &FieldPath, policies: &[RetryPolicy]) -> Result<(), ConfigError> {
    for (i, policy) in policies.iter().enumerate() {
        let earlier = policies.get(..i).unwrap_or_default();
        if let Some(j) = earlier.iter().position(|p| p.routes.is_none()) {
            return Err(path.index(i).error(format!(
                "never used: policies[{j}] (\"{}\") already applies to every route",
                earlier.get(j).map_or("", |p| p.name())
            )));
        }
        for (k, route) in policy.routes().into_iter().flatten().enumerate() {
            if let Some(j) = earlier.iter().position(|p| p.applies_to(Some(route))) {
                return Err(path.index(i).field("routes").index(k).error(format!(
                    "route \"{route}\" is already taken by policies[{j}]; the first match wins"
                )));
            }
        }
    }
    Ok(())
}

impl Validate for RetryConfig {
    type Wire = RetryConfigSpec;
    fn validate(wire: &RetryConfigSpec) -> Result<RetryConfig, ConfigError> {
        RetryConfig::from_spec(wire)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::retry::backoff::Jitter;
    use crate::retry::condition::RetryCondition as C;
    use alloc::vec;

    /// The production entry point.
    fn from_json(json: &str) -> Result<RetryConfig, ConfigError> {
        crate::config::load(json.as_bytes())
    }

    const MINIMAL: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3, "backoff": {"base": "25ms", "cap": "250ms", "jitter": "full"}, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#;

    /// The error for a policy `{"name": "p", "cluster": "c", <extra>}`.
    fn policy_error(extra: &str) -> ConfigError {
        let json = format!(r#"{{"policies": [{{"name": "p", "cluster": "c", {extra}}}]}}"#);
        from_json(&json).unwrap_err()
    }

    fn assert_refused(extra: &str, path: &str, words: &str) {
        let e = policy_error(extra);
        assert_eq!(e.path, path, "{extra}: {e}");
        assert!(e.message.contains(words), "{extra}: {e}");
    }

    #[test]
    fn the_minimal_config_parses_with_the_documented_defaults() {
        let config = from_json(MINIMAL).unwrap();
        let [p] = config.policies() else {
            panic!("one policy")
        };
        assert_eq!(p.name(), "default");
        assert_eq!(p.cluster(), Some("backend"));
        assert_eq!(p.routes(), None);
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(
            *p.backoff(),
            Backoff::new(
                Duration::from_millis(25),
                Duration::from_millis(250),
                Jitter::Full
            )
            .unwrap()
        );
        assert_eq!(*p.budget(), RetryBudget::default());
        assert_eq!(*p.retry_on(), RetryOn::default());
        assert_eq!(p.per_try_timeout(), Duration::from_secs(2));
        assert_eq!(p.deadline(), Duration::from_secs(10));
        assert_eq!(p.max_body(), 65_536);
        assert_eq!(p.attempt_header(), Some("x-keel-attempts"));
        assert_eq!(p.idempotency_key_header(), "idempotency-key");
        assert!(p.respect_retry_after());
        assert_eq!(p.max_retry_after(), Duration::from_secs(300));
        assert_eq!(p.budget_key(), "keel/retry/default/budget");
        assert_eq!(p.first_attempt(), FirstAttempt::Router);
        assert!(p.applies_to(Some("anything")) && p.applies_to(None));
    }

    #[test]
    fn a_policy_can_name_the_per_host_breaker_it_routes_around() {
        let json = r#"{"policies": [{"name": "p", "breaker": "users-host"}]}"#;
        let config = from_json(json).unwrap();
        assert_eq!(config.policies()[0].breaker(), Some("users-host"));
        assert_eq!(from_json(MINIMAL).unwrap().policies()[0].breaker(), None);
        assert_refused(
            r#""breaker": "a/b""#,
            "policies[0].breaker",
            "ASCII letters",
        );
        assert_refused(r#""breaker": """#, "policies[0].breaker", "1 to 64");
    }

    #[test]
    fn without_a_cluster_retries_go_to_the_routes_cluster() {
        let config = from_json(r#"{"policies": [{"name": "p"}]}"#).unwrap();
        assert_eq!(config.policies()[0].cluster(), None);
    }

    #[test]
    fn the_first_attempt_can_be_a_callout() {
        let json = r#"{"policies": [{"name": "p", "first_attempt": "callout"}]}"#;
        let config = from_json(json).unwrap();
        assert_eq!(config.policies()[0].first_attempt(), FirstAttempt::Callout);
        assert_eq!(FirstAttempt::Callout.name(), "callout");
        assert_eq!(FirstAttempt::Router.name(), "router");
        let e = policy_error(r#""first_attempt": "proxy""#);
        assert_eq!(
            e.to_string(),
            "policies[0].first_attempt: expected \"router\" or \"callout\", got \"proxy\""
        );
    }

    #[test]
    fn name_and_cluster_alone_take_every_default() {
        let bare =
            from_json(r#"{"policies": [{"name": "default", "cluster": "backend"}]}"#).unwrap();
        assert_eq!(bare, from_json(MINIMAL).unwrap());
    }

    #[test]
    fn every_field_can_be_set() {
        let json = r#"{"policies": [{"name": "orders", "cluster": "orders_v2",
            "routes": ["orders", "checkout"], "max_attempts": 5,
            "backoff": {"base": "10ms", "jitter": "decorrelated"},
            "budget": {"ratio": 0.5, "min_per_second": 0, "ttl": "30s"},
            "retry_on": ["gateway-error", "rate-limited", "retriable-status-codes"],
            "retriable_statuses": [409, 429], "per_try_timeout": "300ms", "deadline": "3s",
            "max_body": 0, "attempt_header": "X-Attempts",
            "idempotency_key_header": "X-Request-Key", "respect_retry_after": true,
            "max_retry_after": "30s"}]}"#;
        let config = from_json(json).unwrap();
        let p = &config.policies()[0];
        assert_eq!(
            p.routes(),
            Some(&["orders".to_owned(), "checkout".to_owned()][..])
        );
        assert_eq!(p.max_attempts(), 5);
        assert_eq!(p.backoff().cap(), Duration::from_millis(100));
        assert_eq!(p.backoff().jitter(), Jitter::Decorrelated);
        assert_eq!(p.budget().ttl(), Duration::from_secs(30));
        assert_eq!(
            *p.retry_on(),
            RetryOn::new(
                &[C::GatewayError, C::RateLimited, C::RetriableStatusCodes],
                vec![409, 429]
            )
        );
        assert_eq!(p.per_try_timeout(), Duration::from_millis(300));
        assert_eq!(p.deadline(), Duration::from_secs(3));
        assert_eq!(p.max_body(), 0);
        assert_eq!(p.attempt_header(), Some("x-attempts"));
        assert_eq!(p.idempotency_key_header(), "x-request-key");
        assert_eq!(p.max_retry_after(), Duration::from_secs(30));
        assert!(p.applies_to(Some("checkout")));
        assert!(!p.applies_to(Some("search")) && !p.applies_to(None));
    }

    #[test]
    fn null_disables_the_attempt_header() {
        let json = r#"{"policies": [{"name": "p", "cluster": "c", "attempt_header": null}]}"#;
        let config = from_json(json).unwrap();
        assert_eq!(config.policies()[0].attempt_header(), None);
    }

    #[test]
    fn a_short_deadline_lowers_the_default_per_try_timeout() {
        let json = r#"{"policies": [{"name": "p", "cluster": "c", "deadline": "500ms"}]}"#;
        let config = from_json(json).unwrap();
        assert_eq!(
            config.policies()[0].per_try_timeout(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn max_attempts_is_bounded_with_a_clear_message() {
        let e = policy_error(r#""max_attempts": 7"#);
        assert_eq!(e.to_string(), "policies[0].max_attempts: at most 5, got 7");
        assert_refused(
            r#""max_attempts": 0"#,
            "policies[0].max_attempts",
            "at least 1",
        );
        assert_refused(
            r#""max_attempts": -1"#,
            "policies[0].max_attempts",
            "invalid value",
        );
    }

    #[test]
    fn bad_values_are_refused_at_their_path() {
        for (extra, path, words) in [
            (
                r#""backoff": {"base": "0ms"}"#,
                "policies[0].backoff.base",
                "more than zero",
            ),
            (
                r#""backoff": {"base": "fast"}"#,
                "policies[0].backoff.base",
                "\"fast\"",
            ),
            (
                r#""backoff": {"base": "100ms", "cap": "50ms"}"#,
                "policies[0].backoff.cap",
                "at least base (100ms), got 50ms",
            ),
            (
                r#""backoff": {"jitter": "random"}"#,
                "policies[0].backoff.jitter",
                "\"random\"",
            ),
            (
                r#""budget": {"ratio": 5}"#,
                "policies[0].budget.ratio",
                "from 0 to 4, got 5",
            ),
            (
                r#""budget": {"ratio": -0.5}"#,
                "policies[0].budget.ratio",
                "got -0.5",
            ),
            (
                r#""budget": {"min_per_second": 2000000}"#,
                "policies[0].budget.min_per_second",
                "at most",
            ),
            (
                r#""budget": {"ttl": "500ms"}"#,
                "policies[0].budget.ttl",
                "from 1s to 1m",
            ),
            (
                r#""budget": {"ttl": "2m"}"#,
                "policies[0].budget.ttl",
                "got 2m",
            ),
            (
                r#""retry_on": ["5xx", "500"]"#,
                "policies[0].retry_on[1]",
                "got \"500\"",
            ),
            (r#""retry_on": []"#, "policies[0].retry_on", "never retries"),
            (
                r#""retry_on": ["retriable-status-codes"]"#,
                "policies[0].retry_on[0]",
                "retriable_statuses",
            ),
            (
                r#""retry_on": ["rate-limited"], "respect_retry_after": false"#,
                "policies[0].retry_on[0]",
                "respect_retry_after",
            ),
            (
                r#""retriable_statuses": [503, 200]"#,
                "policies[0].retriable_statuses[1]",
                "got 200",
            ),
            (
                r#""retriable_statuses": [70000]"#,
                "policies[0].retriable_statuses[0]",
                "got 70000",
            ),
            (
                r#""per_try_timeout": "0s""#,
                "policies[0].per_try_timeout",
                "more than zero",
            ),
            (
                r#""per_try_timeout": "20s""#,
                "policies[0].per_try_timeout",
                "at most the deadline (10s)",
            ),
            (r#""deadline": "soon""#, "policies[0].deadline", "\"soon\""),
            (
                r#""max_body": 20000000"#,
                "policies[0].max_body",
                "at most 16777216",
            ),
            (
                r#""attempt_header": "x attempts""#,
                "policies[0].attempt_header",
                "header name",
            ),
            (
                r#""attempt_header": """#,
                "policies[0].attempt_header",
                "header name",
            ),
            (
                r#""idempotency_key_header": ":path""#,
                "policies[0].idempotency_key_header",
                "header name",
            ),
            (
                r#""max_retry_after": "2h""#,
                "policies[0].max_retry_after",
                "at most 1h",
            ),
            (r#""routes": []"#, "policies[0].routes", "matches no route"),
            (r#""routes": ["a", ""]"#, "policies[0].routes[1]", "empty"),
            (
                r#""respect_retry_after": "yes""#,
                "policies[0].respect_retry_after",
                "expected a boolean",
            ),
        ] {
            assert_refused(extra, path, words);
        }
    }

    #[test]
    fn unknown_fields_are_refused_at_their_path() {
        assert_refused(
            r#""max_attemps": 3"#,
            "policies[0].max_attemps",
            "unknown field",
        );
        assert_refused(
            r#""backoff": {"base": "25ms", "jiter": "full"}"#,
            "policies[0].backoff.jiter",
            "unknown field",
        );
        assert_refused(
            r#""budget": {"percent": 20}"#,
            "policies[0].budget.percent",
            "unknown field",
        );
        let e = from_json(r#"{"policies": [], "polices": []}"#).unwrap_err();
        assert_eq!(e.path, "polices");
    }

    #[test]
    fn type_errors_name_the_field() {
        assert_refused(
            r#""max_attempts": "3""#,
            "policies[0].max_attempts",
            "invalid type",
        );
        assert_refused(
            r#""backoff": "fast""#,
            "policies[0].backoff",
            "invalid type",
        );
        assert_refused(
            r#""budget": {"ratio": "20%"}"#,
            "policies[0].budget.ratio",
            "invalid type",
        );
        assert_refused(
            r#""routes": "orders""#,
            "policies[0].routes",
            "invalid type",
        );
        assert_refused(
            r#""routes": ["a", 7]"#,
            "policies[0].routes[1]",
            "invalid type",
        );
        // The second policy's fault is reported at index 1.
        let json = r#"{"policies": [{"name": "a", "cluster": "c", "routes": ["x"]},
            {"name": "b", "cluster": "c", "deadline": 10}]}"#;
        assert_eq!(from_json(json).unwrap_err().path, "policies[1].deadline");
    }

    #[test]
    fn required_fields_and_documents() {
        let e = from_json(r#"{"policies": [{"cluster": "c"}]}"#).unwrap_err();
        assert_eq!(e.to_string(), "policies[0].name: required");
        let e = from_json(r#"{"policies": [{"name": "p", "cluster": " "}]}"#).unwrap_err();
        assert_eq!(e.path, "policies[0].cluster");
        assert!(e.message.contains("omit it for the route's cluster"), "{e}");
        for json in ["{}", r#"{"policies": []}"#, r#"{"policies": null}"#] {
            assert_eq!(from_json(json).unwrap_err().path, "policies", "{json}");
        }
        let e = from_json("{\"policies\": [").unwrap_err();
        assert!(
            e.path.is_empty() && e.message.starts_with("not valid JSON"),
            "{e}"
        );
        let e = from_json("7").unwrap_err();
        assert!(
            e.path.is_empty() && e.message.contains("invalid type"),
            "{e}"
        );
        let e = from_json(r#"{"policies": [7]}"#).unwrap_err();
        assert_eq!(e.path, "policies[0]");
    }

    #[test]
    fn arrays_are_not_read_as_objects_by_position() {
        for (json, path) in [
            ("[[]]", ""),
            (r#"{"policies": [["p", "c"]]}"#, "policies[0]"),
            (
                r#"{"policies": [{"name": "p", "cluster": "c", "backoff": ["25ms", "250ms"]}]}"#,
                "policies[0].backoff",
            ),
            (
                r#"{"policies": [{"name": "p", "cluster": "c", "budget": [0.2, 10, "10s"]}]}"#,
                "policies[0].budget",
            ),
        ] {
            let e = from_json(json).unwrap_err();
            assert_eq!(e.path, path, "{json}");
            assert!(e.message.contains("got an array"), "{json}: {e}");
        }
    }

    #[test]
    fn names_and_routes_must_not_collide() {
        let e = from_json(
            r#"{"policies": [{"name": "a", "cluster": "c", "routes": ["x"]}, {"name": "a", "cluster": "c"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "policies[1].name");
        let e = from_json(r#"{"policies": [{"name": "a/b", "cluster": "c"}]}"#).unwrap_err();
        assert_eq!(e.path, "policies[0].name");
        let e = from_json(
            r#"{"policies": [{"name": "all", "cluster": "c"}, {"name": "b", "cluster": "c", "routes": ["x"]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "policies[1]");
        assert!(e.message.contains("policies[0] (\"all\")"), "{e}");
        let e = from_json(
            r#"{"policies": [{"name": "a", "cluster": "c", "routes": ["x", "y"]}, {"name": "b", "cluster": "c", "routes": ["z", "y"]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.path, "policies[1].routes[1]");
    }

    #[test]
    fn the_first_matching_policy_wins() {
        let config = from_json(
            r#"{"policies": [{"name": "orders", "cluster": "c", "routes": ["orders"]},
                {"name": "rest", "cluster": "c"}]}"#,
        )
        .unwrap();
        let name =
            |route| crate::routes::first(config.policies(), route, |p| p).map(|(_, p)| p.name());
        assert_eq!(name(Some("orders")), Some("orders"));
        assert_eq!(name(Some("search")), Some("rest"));
        assert_eq!(name(None), Some("rest"));
        let only_orders = from_json(
            r#"{"policies": [{"name": "orders", "cluster": "c", "routes": ["orders"]}]}"#,
        )
        .unwrap();
        assert!(crate::routes::first(only_orders.policies(), Some("search"), |p| p).is_none());
    }
}
