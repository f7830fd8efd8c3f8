//! The breaker filter's configuration: serde structs that mirror the JSON, then validation
//! into [`Breakers`] and [`BreakerPolicy`].
//!
//! Every field but `name` may be omitted; the defaults are listed in the [module
//! docs](super) and follow Hystrix where the issue gives no value (10 s window in 10 buckets,
//! 20 calls, 50 %, 5 s open, one probe). Validation never panics; each refusal names the field
//! path, e.g. `breakers[0].failure_rate: must be in (0, 1], got 1.5`.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use super::fallback::FallbackPolicy;
use super::outcome::{FailurePolicy, StatusSet};
use super::reply::OpenReply;
use super::state::MAX_BUCKETS;
use crate::config::{check_names, parse_positive_duration, ConfigError, FieldPath};
use crate::time::Duration;

/// The whole filter configuration: `{"breakers": [...]}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakersConfig {
    /// One entry per breaker policy.
    pub breakers: Vec<BreakerSpec>,
}

/// One breaker as written in the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Unique name: used in metrics, logs and shared-data keys.
    pub name: String,
    /// Envoy route names this breaker guards; omitted = every route.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// `"normal"`, `"forced_open"`, `"disabled"` or `"metrics_only"`.
    #[serde(default)]
    pub mode: Option<String>,
    /// `"policy"`, `"cluster"` or `"host"`: what one breaker instance covers.
    #[serde(default)]
    pub scope: Option<String>,
    /// Scopes `cluster` and `host`: the most instances one worker tracks.
    #[serde(default)]
    pub max_instances: Option<u64>,
    /// Length of the sliding window, e.g. `"10s"`.
    #[serde(default)]
    pub window: Option<String>,
    /// Number of buckets the window is cut into.
    #[serde(default)]
    pub buckets: Option<u64>,
    /// Failure rate, in (0, 1], at or above which the breaker opens.
    #[serde(default)]
    pub failure_rate: Option<f64>,
    /// Outcomes the window must hold before a rate can open the breaker.
    #[serde(default)]
    pub min_calls: Option<u64>,
    /// Slow-call tracking.
    #[serde(default)]
    pub slow_call: Option<SlowCallSpec>,
    /// What counts as a failure.
    #[serde(default)]
    pub failure: Option<FailureSpec>,
    /// First open period, e.g. `"5s"`.
    #[serde(default)]
    pub open_for: Option<String>,
    /// Factor applied to the open period on each consecutive opening.
    #[serde(default)]
    pub open_for_multiplier: Option<f64>,
    /// Cap of the open period.
    #[serde(default)]
    pub max_open_for: Option<String>,
    /// Probes admitted in half-open.
    #[serde(default)]
    pub half_open_probes: Option<u64>,
    /// How long a probe permit waits for its outcome before it is reclaimed.
    #[serde(default)]
    pub probe_timeout: Option<String>,
    /// The local reply sent while open.
    #[serde(default)]
    pub open_reply: Option<OpenReplySpec>,
    /// Serving the last good response while open.
    #[serde(default)]
    pub fallback: Option<FallbackSpec>,
}

/// `slow_call`: `{"duration": "2s", "rate": 0.8}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowCallSpec {
    /// A call whose response headers come later than this is slow.
    pub duration: String,
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

/// `open_reply`: `{"status": 503, "body": "...", "headers": {"content-type": "..."}}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenReplySpec {
    /// Status of the local reply.
    #[serde(default)]
    pub status: Option<u64>,
    /// Body of the local reply.
    #[serde(default)]
    pub body: Option<String>,
    /// Extra headers of the local reply.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
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
    pub max_age: Option<String>,
    /// Largest body kept.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Number of cache slots per breaker (bounds shared-data memory).
    #[serde(default)]
    pub max_entries: Option<u64>,
    /// Key selector, with the route, of the cached response.
    #[serde(default)]
    pub key: Option<String>,
    /// Header added to a served fallback.
    #[serde(default)]
    pub header: Option<String>,
}

/// How a breaker acts on traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The state machine decides.
    Normal,
    /// Every request is refused (a kill switch).
    ForcedOpen,
    /// Every request passes and nothing is recorded.
    Disabled,
    /// The state machine runs and reports transitions, but every request passes (dark launch).
    MetricsOnly,
}

impl Mode {
    /// The configuration and metrics name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::ForcedOpen => "forced_open",
            Mode::Disabled => "disabled",
            Mode::MetricsOnly => "metrics_only",
        }
    }
}

/// What one breaker instance covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One breaker for the whole policy.
    Policy,
    /// One breaker per upstream cluster.
    Cluster,
    /// One breaker per upstream host.
    Host,
}

/// A threshold in parts per million, compared exactly in integers (`10 of 100` reaches
/// `0.1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ratio(u32);

impl Ratio {
    const ONE: u64 = 1_000_000;

    fn parse(path: &FieldPath, value: f64) -> Result<Ratio, ConfigError> {
        if !(value > 0.0 && value <= 1.0) {
            return Err(path.error(format!("must be in (0, 1], got {value}")));
        }
        // Rounded to the nearest millionth; `as` saturates and the range check bounds it.
        let ppm = (value * Self::ONE as f64 + 0.5) as u32;
        if ppm == 0 {
            return Err(path.error(format!(
                "must be at least 0.000001 (thresholds have a resolution of one millionth), got {value}"
            )));
        }
        Ok(Ratio(ppm))
    }

    /// Whether `part / whole` is at or above the threshold; never for an empty `whole`.
    pub fn reached(self, part: u64, whole: u64) -> bool {
        whole > 0
            && u128::from(part) * u128::from(Self::ONE) >= u128::from(self.0) * u128::from(whole)
    }

    /// The threshold as a fraction.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / Self::ONE as f64
    }
}

/// One validated breaker policy: what the state machine, the classifier and the replies need.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerPolicy {
    pub(crate) name: String,
    pub(crate) routes: Option<Vec<String>>,
    pub(crate) mode: Mode,
    pub(crate) scope: Scope,
    pub(crate) window: Duration,
    pub(crate) buckets: u8,
    pub(crate) bucket_width: Duration,
    pub(crate) failure_rate: Ratio,
    pub(crate) slow_rate: Option<Ratio>,
    pub(crate) min_calls: u32,
    pub(crate) open_for: Duration,
    pub(crate) open_for_multiplier: f64,
    pub(crate) max_open_for: Duration,
    pub(crate) half_open_probes: u16,
    pub(crate) probe_timeout: Duration,
    pub(crate) max_instances: u32,
    pub(crate) failure: FailurePolicy,
    pub(crate) open_reply: OpenReply,
    pub(crate) fallback: Option<FallbackPolicy>,
}

/// Defaults (see the module docs for the table).
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
const DEFAULT_BUCKETS: u8 = 10;
const DEFAULT_FAILURE_RATE: Ratio = Ratio(500_000);
const DEFAULT_MIN_CALLS: u32 = 20;
const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);
const DEFAULT_MULTIPLIER: f64 = 2.0;
/// Envoy outlier detection: 30 s base ejection, 300 s cap.
const DEFAULT_CAP_FACTOR: u64 = 10;
const DEFAULT_PROBES: u16 = 1;
/// Envoy's default route timeout: a forwarded probe has an outcome by then.
const DEFAULT_PROBE_TIMEOUT_FLOOR: Duration = Duration::from_secs(15);
const MIN_BUCKET_WIDTH: Duration = Duration::from_millis(1);
const MAX_PROBES: u64 = 1000;
const DEFAULT_MAX_INSTANCES: u32 = 1024;
const LIMIT_MAX_INSTANCES: u64 = 65_536;

impl BreakerPolicy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }
    /// The failure classifier; see [`FailurePolicy::classify`].
    pub fn failure(&self) -> &FailurePolicy {
        &self.failure
    }
    /// The fallback settings, when enabled.
    pub fn fallback(&self) -> Option<&FallbackPolicy> {
        self.fallback.as_ref()
    }
    /// The local reply sent while open.
    pub fn open_reply_settings(&self) -> &OpenReply {
        &self.open_reply
    }
    /// Probes admitted per half-open period.
    pub fn half_open_probes(&self) -> u16 {
        self.half_open_probes
    }
    /// Scopes `cluster` and `host`: the most breaker instances one worker tracks. Shared data
    /// can never delete a key, and a host key may come from a request header, so the glue
    /// lets requests for further instances pass unguarded rather than create state without
    /// bound.
    pub fn max_instances(&self) -> u32 {
        self.max_instances
    }
    /// The length of the sliding window and the number of its buckets.
    pub fn window(&self) -> (Duration, u8) {
        (self.window, self.buckets)
    }
    /// The first open period, its multiplier and its cap.
    pub fn open_for(&self) -> (Duration, f64, Duration) {
        (self.open_for, self.open_for_multiplier, self.max_open_for)
    }

    /// The Envoy route names this policy guards; `None`: every route.
    pub fn routes(&self) -> Option<&[String]> {
        self.routes.as_deref()
    }

    /// Whether this policy guards the Envoy route `route`.
    pub fn applies_to(&self, route: &str) -> bool {
        match &self.routes {
            None => true,
            Some(routes) => routes.iter().any(|r| r == route),
        }
    }

    /// The shared-data key of the breaker instance for this request:
    /// `keel/circuit-breaker/<name>`, `.../cluster/<cluster>` or `.../host/<host>` by scope.
    /// `None` when the scope needs a cluster or host the caller does not know.
    pub fn state_key(&self, cluster: Option<&str>, host: Option<&str>) -> Option<String> {
        match self.scope {
            Scope::Policy => Some(format!("keel/circuit-breaker/{}", self.name)),
            Scope::Cluster => cluster
                .filter(|c| !c.is_empty())
                .map(|c| format!("keel/circuit-breaker/{}/cluster/{c}", self.name)),
            Scope::Host => host
                .filter(|h| !h.is_empty())
                .map(|h| format!("keel/circuit-breaker/{}/host/{h}", self.name)),
        }
    }

    /// Validates one [`BreakerSpec`] found at `path`.
    pub fn from_spec(path: &FieldPath, spec: &BreakerSpec) -> Result<BreakerPolicy, ConfigError> {
        let routes = match &spec.routes {
            None => None,
            Some(list) => Some(validate_routes(&path.field("routes"), list)?),
        };
        let mode = match spec.mode.as_deref() {
            None | Some("normal") => Mode::Normal,
            Some("forced_open") => Mode::ForcedOpen,
            Some("disabled") => Mode::Disabled,
            Some("metrics_only") => Mode::MetricsOnly,
            Some(other) => {
                return Err(path.field("mode").error(format!(
                    "expected \"normal\", \"forced_open\", \"disabled\" or \"metrics_only\", got \"{other}\""
                )))
            }
        };
        let scope = match spec.scope.as_deref() {
            None | Some("policy") => Scope::Policy,
            Some("cluster") => Scope::Cluster,
            Some("host") => Scope::Host,
            Some(other) => {
                return Err(path.field("scope").error(format!(
                    "expected \"policy\", \"cluster\" or \"host\", got \"{other}\""
                )))
            }
        };

        let window = match &spec.window {
            None => DEFAULT_WINDOW,
            Some(text) => parse_positive_duration(&path.field("window"), text)?,
        };
        let buckets = match spec.buckets {
            None => DEFAULT_BUCKETS,
            Some(n) => match u8::try_from(n) {
                Ok(n @ 1..=MAX_BUCKETS) => n,
                _ => {
                    return Err(path
                        .field("buckets")
                        .error(format!("must be 1 to {MAX_BUCKETS}, got {n}")))
                }
            },
        };
        let bucket_width = window.div(u64::from(buckets));
        if bucket_width < MIN_BUCKET_WIDTH {
            return Err(path.field("buckets").error(format!(
                "a window of {window} in {buckets} buckets makes buckets shorter than 1ms"
            )));
        }

        let failure_rate = match spec.failure_rate {
            None => DEFAULT_FAILURE_RATE,
            Some(r) => Ratio::parse(&path.field("failure_rate"), r)?,
        };
        let min_calls = match spec.min_calls {
            None => DEFAULT_MIN_CALLS,
            Some(n) => match u32::try_from(n) {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(path
                        .field("min_calls")
                        .error(format!("must be 1 to {}, got {n}", u32::MAX)))
                }
            },
        };

        let mut failure = match &spec.failure {
            None => FailurePolicy::default(),
            Some(f) => validate_failure(&path.field("failure"), f)?,
        };
        let slow_rate = match &spec.slow_call {
            None => None,
            Some(slow) => {
                let at = path.field("slow_call");
                failure.slow_after = Some(parse_positive_duration(
                    &at.field("duration"),
                    &slow.duration,
                )?);
                Some(match slow.rate {
                    None => Ratio(1_000_000),
                    Some(r) => Ratio::parse(&at.field("rate"), r)?,
                })
            }
        };

        let open_for = match &spec.open_for {
            None => DEFAULT_OPEN_FOR,
            Some(text) => parse_positive_duration(&path.field("open_for"), text)?,
        };
        let open_for_multiplier = match spec.open_for_multiplier {
            None => DEFAULT_MULTIPLIER,
            Some(m) if m.is_finite() && m >= 1.0 => m,
            Some(m) => {
                return Err(path
                    .field("open_for_multiplier")
                    .error(format!("must be a number at least 1.0, got {m}")))
            }
        };
        let max_open_for = match &spec.max_open_for {
            None => open_for.saturating_mul(DEFAULT_CAP_FACTOR),
            Some(text) => {
                let at = path.field("max_open_for");
                let cap = parse_positive_duration(&at, text)?;
                if cap < open_for {
                    return Err(at.error(format!(
                        "must be at least open_for ({open_for}), got \"{text}\""
                    )));
                }
                cap
            }
        };

        let half_open_probes = match spec.half_open_probes {
            None => DEFAULT_PROBES,
            Some(n @ 1..=MAX_PROBES) => n as u16,
            Some(n) => {
                return Err(path
                    .field("half_open_probes")
                    .error(format!("must be 1 to {MAX_PROBES}, got {n}")))
            }
        };
        let max_instances = match spec.max_instances {
            None => DEFAULT_MAX_INSTANCES,
            Some(n @ 1..=LIMIT_MAX_INSTANCES) => n as u32,
            Some(n) => {
                return Err(path
                    .field("max_instances")
                    .error(format!("must be 1 to {LIMIT_MAX_INSTANCES}, got {n}")))
            }
        };
        let probe_timeout = match &spec.probe_timeout {
            None => Ord::max(open_for, DEFAULT_PROBE_TIMEOUT_FLOOR),
            Some(text) => parse_positive_duration(&path.field("probe_timeout"), text)?,
        };

        let open_reply = match &spec.open_reply {
            None => OpenReply::default(),
            Some(r) => OpenReply::from_spec(&path.field("open_reply"), r)?,
        };
        let fallback = match &spec.fallback {
            None => None,
            Some(f) => FallbackPolicy::from_spec(&path.field("fallback"), f)?,
        };

        Ok(BreakerPolicy {
            name: spec.name.clone(),
            routes,
            mode,
            scope,
            window,
            buckets,
            bucket_width,
            failure_rate,
            slow_rate,
            min_calls,
            open_for,
            open_for_multiplier,
            max_open_for,
            half_open_probes,
            probe_timeout,
            max_instances,
            failure,
            open_reply,
            fallback,
        })
    }
}

fn validate_routes(path: &FieldPath, list: &[String]) -> Result<Vec<String>, ConfigError> {
    if list.is_empty() {
        return Err(path.error("must name at least one route (omit the field for every route)"));
    }
    for (i, route) in list.iter().enumerate() {
        if route.is_empty() {
            return Err(path.index(i).error("must not be empty"));
        }
        if list.iter().take(i).any(|r| r == route) {
            return Err(path.index(i).error(format!("\"{route}\" is listed twice")));
        }
    }
    Ok(list.to_vec())
}

fn validate_failure(path: &FieldPath, spec: &FailureSpec) -> Result<FailurePolicy, ConfigError> {
    let defaults = FailurePolicy::default();
    let statuses = match &spec.statuses {
        None => defaults.statuses,
        Some(list) => {
            let mut set = StatusSet::EMPTY;
            for (i, status) in list.iter().enumerate() {
                parse_status(&path.field("statuses").index(i), status, &mut set)?;
            }
            set
        }
    };
    Ok(FailurePolicy {
        statuses,
        resets: spec.resets.unwrap_or(defaults.resets),
        timeouts: spec.timeouts.unwrap_or(defaults.timeouts),
        slow_after: None,
    })
}

fn parse_status(
    path: &FieldPath,
    spec: &StatusSpec,
    set: &mut StatusSet,
) -> Result<(), ConfigError> {
    let expected = "expected a status 100..599 or a class \"1xx\"..\"5xx\"";
    match spec {
        StatusSpec::Code(code @ 100..=599) => set.insert(*code as u16),
        StatusSpec::Code(code) => return Err(path.error(format!("{expected}, got {code}"))),
        StatusSpec::Text(text) => {
            let bytes = text.as_bytes();
            match bytes {
                [class @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    let first = u16::from(class - b'0') * 100;
                    set.insert_range(first, first + 99);
                }
                _ => match text.parse::<u16>() {
                    Ok(code @ 100..=599) if bytes.len() == 3 => set.insert(code),
                    _ => return Err(path.error(format!("{expected}, got \"{text}\""))),
                },
            }
        }
    }
    Ok(())
}

/// Every validated breaker of the filter, in configuration order.
#[derive(Clone, Debug, PartialEq)]
pub struct Breakers {
    policies: Vec<BreakerPolicy>,
}

impl Breakers {
    /// The first policy (in configuration order) that guards `route`.
    pub fn for_route(&self, route: &str) -> Option<&BreakerPolicy> {
        self.policies.iter().find(|p| p.applies_to(route))
    }
    /// Every policy, in configuration order.
    pub fn policies(&self) -> &[BreakerPolicy] {
        &self.policies
    }
}

impl TryFrom<&BreakersConfig> for Breakers {
    type Error = ConfigError;

    fn try_from(config: &BreakersConfig) -> Result<Breakers, ConfigError> {
        let path = FieldPath::root().field("breakers");
        if config.breakers.is_empty() {
            return Err(path.error("must list at least one breaker"));
        }
        check_names(
            &path,
            "name",
            config.breakers.iter().map(|b| b.name.as_str()),
        )?;
        let policies = config
            .breakers
            .iter()
            .enumerate()
            .map(|(i, spec)| BreakerPolicy::from_spec(&path.index(i), spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Breakers { policies })
    }
}

impl TryFrom<BreakersConfig> for Breakers {
    type Error = ConfigError;

    fn try_from(config: BreakersConfig) -> Result<Breakers, ConfigError> {
        Breakers::try_from(&config)
    }
}

impl core::fmt::Display for Scope {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Scope::Policy => "policy",
            Scope::Cluster => "cluster",
            Scope::Host => "host",
        })
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::breaker::outcome::{Outcome, Response};
    use crate::config::Selector;
    use alloc::string::ToString;

    const MINIMAL: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3}]}"#;

    fn parse(json: &str) -> Result<Breakers, ConfigError> {
        let config: BreakersConfig = serde_json::from_str(json).unwrap();
        Breakers::try_from(&config)
    }

    /// The error for `{"breakers": [{"name": "orders", <field>}]}`.
    fn refuse(field: &str) -> ConfigError {
        parse(&format!(
            r#"{{"breakers": [{{"name": "orders", {field}}}]}}"#
        ))
        .unwrap_err()
    }

    #[test]
    fn the_minimal_config_parses_with_the_documented_defaults() {
        let breakers = parse(MINIMAL).unwrap();
        let p = breakers.for_route("any-route").unwrap();
        assert_eq!(p.name(), "orders");
        assert_eq!(p.window(), (Duration::from_secs(10), 10));
        assert_eq!(p.bucket_width, Duration::from_secs(1));
        assert_eq!(p.failure_rate, Ratio(500_000));
        assert_eq!(p.min_calls, 20);
        assert_eq!(
            p.open_for(),
            (Duration::from_secs(5), 2.0, Duration::from_secs(50))
        );
        assert_eq!(p.half_open_probes(), 3);
        assert_eq!(p.probe_timeout, Duration::from_secs(15));
        assert_eq!(p.max_instances(), 1024);
        assert_eq!(p.mode(), Mode::Normal);
        assert_eq!(p.scope(), Scope::Policy);
        assert_eq!(p.slow_rate, None);
        assert_eq!(p.failure(), &FailurePolicy::default());
        assert_eq!(p.open_reply_settings().status(), 503);
        assert!(p.fallback().is_none());
        let z = Duration::ZERO;
        assert_eq!(
            p.failure().classify(Response::Status(502), z),
            Outcome::Failure
        );
        assert_eq!(p.failure().classify(Response::Reset, z), Outcome::Failure);
        assert_eq!(p.failure().classify(Response::Timeout, z), Outcome::Failure);
        assert_eq!(
            p.state_key(None, None).unwrap(),
            "keel/circuit-breaker/orders"
        );
    }

    #[test]
    fn a_name_alone_takes_every_default() {
        let p = parse(r#"{"breakers": [{"name": "b"}]}"#).unwrap();
        let p = &p.policies()[0];
        assert_eq!(p.min_calls, DEFAULT_MIN_CALLS);
        assert_eq!(p.half_open_probes(), 1);
        assert_eq!(p.open_for().0, Duration::from_secs(5));
    }

    #[test]
    fn every_field_parses() {
        let json = r#"{"breakers": [{
            "name": "search", "routes": ["search", "suggest"], "mode": "metrics_only",
            "scope": "host", "window": "30s", "buckets": 30, "failure_rate": 0.25,
            "min_calls": 100, "slow_call": {"duration": "2s", "rate": 0.8},
            "failure": {"statuses": ["5xx", "429", 408], "resets": false, "timeouts": true},
            "open_for": "1s", "open_for_multiplier": 1.5, "max_open_for": "1m",
            "half_open_probes": 10, "probe_timeout": "3s", "max_instances": 64,
            "open_reply": {"status": 429, "body": "{}", "headers": {"Content-Type": "application/json"}},
            "fallback": {"max_age": "30s", "max_body_bytes": 1024, "max_entries": 16,
                         "key": "header:x-user", "header": "x-stale"}
        }]}"#;
        let b = parse(json).unwrap();
        let p = &b.policies()[0];
        assert!(p.applies_to("suggest"));
        assert!(!p.applies_to("orders"));
        assert!(b.for_route("orders").is_none());
        assert_eq!(p.mode(), Mode::MetricsOnly);
        assert_eq!(p.scope(), Scope::Host);
        assert_eq!(p.bucket_width, Duration::from_secs(1));
        assert_eq!(p.slow_rate, Some(Ratio(800_000)));
        assert_eq!(p.failure().slow_after(), Some(Duration::from_secs(2)));
        let z = Duration::ZERO;
        assert_eq!(
            p.failure().classify(Response::Status(429), z),
            Outcome::Failure
        );
        assert_eq!(
            p.failure().classify(Response::Status(408), z),
            Outcome::Failure
        );
        assert_eq!(
            p.failure().classify(Response::Status(404), z),
            Outcome::Success
        );
        assert_eq!(p.failure().classify(Response::Reset, z), Outcome::Success);
        assert_eq!(
            p.open_for(),
            (Duration::from_secs(1), 1.5, Duration::from_secs(60))
        );
        assert_eq!(p.probe_timeout, Duration::from_secs(3));
        assert_eq!(p.max_instances(), 64);
        assert_eq!(p.open_reply_settings().status(), 429);
        let f = p.fallback().unwrap();
        assert_eq!(f.max_age(), Duration::from_secs(30));
        assert_eq!(f.key(), &Selector::Header("x-user".into()));
        assert_eq!(p.state_key(Some("c"), None), None);
        assert_eq!(
            p.state_key(Some("c"), Some("10.0.0.1:80")).unwrap(),
            "keel/circuit-breaker/search/host/10.0.0.1:80"
        );
    }

    #[test]
    fn bad_fields_are_refused_with_their_path() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#""failure_rate": 1.5"#,
                "breakers[0].failure_rate",
                "must be in (0, 1], got 1.5",
            ),
            (
                r#""failure_rate": 0"#,
                "breakers[0].failure_rate",
                "must be in (0, 1], got 0",
            ),
            (
                r#""failure_rate": 0.0000001"#,
                "breakers[0].failure_rate",
                "resolution",
            ),
            (r#""window": "fast""#, "breakers[0].window", "\"fast\""),
            (r#""window": "0s""#, "breakers[0].window", "more than zero"),
            (r#""buckets": 0"#, "breakers[0].buckets", "1 to 60"),
            (r#""buckets": 61"#, "breakers[0].buckets", "1 to 60"),
            (
                r#""window": "10ms", "buckets": 20"#,
                "breakers[0].buckets",
                "1ms",
            ),
            (r#""min_calls": 0"#, "breakers[0].min_calls", "must be 1"),
            (r#""open_for": "soon""#, "breakers[0].open_for", "duration"),
            (
                r#""open_for_multiplier": 0.5"#,
                "breakers[0].open_for_multiplier",
                "at least 1.0",
            ),
            (
                r#""open_for": "10s", "max_open_for": "5s""#,
                "breakers[0].max_open_for",
                "at least open_for (10s)",
            ),
            (
                r#""half_open_probes": 0"#,
                "breakers[0].half_open_probes",
                "1 to 1000",
            ),
            (
                r#""half_open_probes": 1001"#,
                "breakers[0].half_open_probes",
                "1 to 1000",
            ),
            (
                r#""max_instances": 0"#,
                "breakers[0].max_instances",
                "1 to 65536",
            ),
            (
                r#""max_instances": 65537"#,
                "breakers[0].max_instances",
                "1 to 65536",
            ),
            (
                r#""probe_timeout": "0ms""#,
                "breakers[0].probe_timeout",
                "more than zero",
            ),
            (r#""mode": "off""#, "breakers[0].mode", "\"off\""),
            (r#""scope": "route""#, "breakers[0].scope", "\"route\""),
            (r#""routes": []"#, "breakers[0].routes", "at least one"),
            (r#""routes": ["a", "a"]"#, "breakers[0].routes[1]", "twice"),
            (
                r#""slow_call": {"duration": "1s", "rate": 2}"#,
                "breakers[0].slow_call.rate",
                "(0, 1]",
            ),
            (
                r#""slow_call": {"duration": "x"}"#,
                "breakers[0].slow_call.duration",
                "duration",
            ),
            (
                r#""failure": {"statuses": ["5xx", "6xx"]}"#,
                "breakers[0].failure.statuses[1]",
                "\"6xx\"",
            ),
            (
                r#""failure": {"statuses": [99]}"#,
                "breakers[0].failure.statuses[0]",
                "got 99",
            ),
            (
                r#""failure": {"statuses": ["0503"]}"#,
                "breakers[0].failure.statuses[0]",
                "\"0503\"",
            ),
            (
                r#""open_reply": {"status": 99}"#,
                "breakers[0].open_reply.status",
                "200 to 599",
            ),
            (
                r#""open_reply": {"headers": {"bad name": "x"}}"#,
                "breakers[0].open_reply.headers.bad name",
                "token",
            ),
            (
                r#""open_reply": {"headers": {"x-a": "a\nb"}}"#,
                "breakers[0].open_reply.headers.x-a",
                "control",
            ),
            (
                r#""open_reply": {"headers": {"retry-after": "1"}}"#,
                "breakers[0].open_reply.headers.retry-after",
                "set by the breaker",
            ),
            (
                r#""fallback": {"max_age": "never"}"#,
                "breakers[0].fallback.max_age",
                "duration",
            ),
            (
                r#""fallback": {"max_body_bytes": 0}"#,
                "breakers[0].fallback.max_body_bytes",
                "1 to",
            ),
            (
                r#""fallback": {"max_entries": 0}"#,
                "breakers[0].fallback.max_entries",
                "1 to",
            ),
            (
                r#""fallback": {"key": "body"}"#,
                "breakers[0].fallback.key",
                "selector",
            ),
            (
                r#""fallback": {"header": ":status"}"#,
                "breakers[0].fallback.header",
                "token",
            ),
        ];
        for (field, path, message) in cases {
            let e = refuse(field);
            assert_eq!(e.path, *path, "{field}: {e}");
            assert!(e.message.contains(message), "{field}: {e}");
        }
        assert_eq!(
            refuse(r#""failure_rate": 1.5"#).to_string(),
            "breakers[0].failure_rate: must be in (0, 1], got 1.5"
        );
    }

    #[test]
    fn the_list_and_names_are_checked() {
        assert_eq!(parse(r#"{"breakers": []}"#).unwrap_err().path, "breakers");
        let e = parse(r#"{"breakers": [{"name": "a"}, {"name": "a"}]}"#).unwrap_err();
        assert_eq!(e.path, "breakers[1].name");
        let e = parse(r#"{"breakers": [{"name": "a"}, {"name": "b", "buckets": 0}]}"#).unwrap_err();
        assert_eq!(e.path, "breakers[1].buckets");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        for json in [
            r#"{"breakers": [{"name": "a", "failure_ratio": 0.5}]}"#,
            r#"{"breakers": [{"name": "a"}], "extra": 1}"#,
            r#"{"breakers": [{"name": "a", "slow_call": {"duration": "1s", "ratio": 1}}]}"#,
            r#"{"breakers": [{"name": "a", "failure": {"status": ["5xx"]}}]}"#,
            r#"{"breakers": [{"name": "a", "open_reply": {"code": 503}}]}"#,
            r#"{"breakers": [{"name": "a", "fallback": {"ttl": "1s"}}]}"#,
            r#"{"breakers": [{"name": "a", "min_calls": -1}]}"#,
            r#"{"breakers": [{"name": "a", "window": 10}]}"#,
        ] {
            assert!(
                serde_json::from_str::<BreakersConfig>(json).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn ratios_compare_exactly_and_inclusively() {
        let p = FieldPath::root();
        let tenth = Ratio::parse(&p, 0.1).unwrap();
        assert!(tenth.reached(10, 100));
        assert!(!tenth.reached(9, 100));
        assert!(!tenth.reached(0, 0));
        let third = Ratio::parse(&p, 1.0 / 3.0).unwrap();
        assert!(third.reached(1, 3));
        assert!(Ratio::parse(&p, f64::NAN).is_err());
        assert!(Ratio::parse(&p, 1.0).unwrap().reached(u64::MAX, u64::MAX));
    }
}
