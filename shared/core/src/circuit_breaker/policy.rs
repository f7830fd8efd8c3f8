//! The breaker policy: the validated [`BreakerPolicy`] of one route set and [`Breakers`], the
//! filter's policies in order, read with [`crate::config::load`] from the wire structs in
//! [`super::wire`].
//!
//! Every field but `name` may be omitted; the defaults are listed in the [module
//! docs](super) and follow Hystrix where the issue gives no value (10 s window in 10 buckets,
//! 20 calls, 50 %, 5 s open, one probe). Validation never panics; each refusal names the field
//! path, e.g. `breakers[0].failure_rate: must be in (0, 1], got 1.5`.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use super::fallback::FallbackPolicy;
use super::outcome::{FailurePolicy, StatusSet};
use super::reply::{default_open_reply, RESERVED_HEADERS};
use super::wire::{BreakerSpec, BreakersConfig, FailureSpec, StatusSpec};
use crate::config::{validate_each, ConfigError, FieldPath, LocalReply, Routes, Validate};
use crate::routes::Routed;
use crate::time::Duration;

/// How a breaker acts on traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    pub(crate) routes: Option<Routes>,
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
    pub(crate) open_reply: LocalReply,
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
pub(crate) const MAX_PROBES: u64 = 1000;
const DEFAULT_MAX_INSTANCES: u32 = 1024;
pub(crate) const LIMIT_MAX_INSTANCES: u64 = 65_536;

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
    pub fn open_reply_settings(&self) -> &LocalReply {
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

    /// The shared-data key of the breaker instance for this request:
    /// `keel/circuit_breaker/<name>`, `.../cluster/<cluster>` or `.../host/<host>` by scope.
    /// `None` when the scope needs a cluster or host the caller does not know.
    pub fn state_key(&self, cluster: Option<&str>, host: Option<&str>) -> Option<String> {
        match self.scope {
            Scope::Policy => Some(format!("keel/circuit_breaker/{}", self.name)),
            Scope::Cluster => cluster
                .filter(|c| !c.is_empty())
                .map(|c| format!("keel/circuit_breaker/{}/cluster/{c}", self.name)),
            Scope::Host => host
                .filter(|h| !h.is_empty())
                .map(|h| super::steer::host_state_key(&self.name, h)),
        }
    }

    /// Validates one [`BreakerSpec`] found at `path`.
    pub fn from_spec(path: &FieldPath, spec: &BreakerSpec) -> Result<BreakerPolicy, ConfigError> {
        let mode = spec.mode.unwrap_or(Mode::Normal);
        let scope = spec.scope.unwrap_or(Scope::Policy);
        let window = spec.window.map_or(DEFAULT_WINDOW, |d| d.0);
        let buckets = spec.buckets.map_or(DEFAULT_BUCKETS, |n| {
            u8::try_from(n.get()).unwrap_or(u8::MAX)
        });
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
        let min_calls = spec.min_calls.map_or(DEFAULT_MIN_CALLS, |n| n.get_u32());

        let mut failure = match &spec.failure {
            None => FailurePolicy::default(),
            Some(f) => validate_failure(&path.field("failure"), f)?,
        };
        let slow_rate = match &spec.slow_call {
            None => None,
            Some(slow) => {
                let at = path.field("slow_call");
                failure.slow_after = Some(slow.duration.0);
                Some(match slow.rate {
                    None => Ratio(1_000_000),
                    Some(r) => Ratio::parse(&at.field("rate"), r)?,
                })
            }
        };

        let open_for = spec.open_for.map_or(DEFAULT_OPEN_FOR, |d| d.0);
        let open_for_multiplier = match spec.open_for_multiplier {
            None => DEFAULT_MULTIPLIER,
            Some(m) if m.is_finite() && m >= 1.0 => m,
            Some(m) => {
                return Err(path
                    .field("open_for_multiplier")
                    .error(format!("must be a number at least 1.0, got {m}")))
            }
        };
        let max_open_for = match spec.max_open_for {
            None => open_for.saturating_mul(DEFAULT_CAP_FACTOR),
            Some(cap) if cap.0 < open_for => {
                return Err(path.field("max_open_for").error(format!(
                    "must be at least open_for ({open_for}), got {}",
                    cap.0
                )));
            }
            Some(cap) => cap.0,
        };

        let half_open_probes = spec
            .half_open_probes
            .map_or(DEFAULT_PROBES, |n| n.get_u16());
        let max_instances = spec
            .max_instances
            .map_or(DEFAULT_MAX_INSTANCES, |n| n.get_u32());
        let probe_timeout = spec
            .probe_timeout
            .map_or(Ord::max(open_for, DEFAULT_PROBE_TIMEOUT_FLOOR), |d| d.0);

        let open_reply = match &spec.open_reply {
            None => default_open_reply(),
            Some(r) => LocalReply::from_spec(
                &path.field("open_reply"),
                r,
                &default_open_reply(),
                &RESERVED_HEADERS,
            )?,
        };
        let fallback = match &spec.fallback {
            None => None,
            Some(f) => FallbackPolicy::from_spec(&path.field("fallback"), f)?,
        };

        Ok(BreakerPolicy {
            name: spec.name.as_str().to_owned(),
            routes: spec.routes.clone(),
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

impl Routed for BreakerPolicy {
    /// The Envoy route names this policy guards; `None`: every route (the first policy that
    /// guards a request's route is its breaker: [`crate::routes::first`]).
    fn routes(&self) -> Option<&[String]> {
        self.routes.as_ref().map(Routes::names)
    }
}

/// Every validated breaker of the filter, in configuration order.
#[derive(Clone, Debug, PartialEq)]
pub struct Breakers {
    policies: Vec<BreakerPolicy>,
}

impl Breakers {
    /// Every policy, in configuration order.
    pub fn policies(&self) -> &[BreakerPolicy] {
        &self.policies
    }
}

impl Validate for Breakers {
    type Wire = BreakersConfig;

    fn validate(config: &BreakersConfig) -> Result<Breakers, ConfigError> {
        let policies = validate_each(
            &FieldPath::root().field("breakers"),
            "breaker",
            &config.breakers,
            |b| b.name.as_str(),
            BreakerPolicy::from_spec,
        )?;
        Ok(Breakers { policies })
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
    use crate::circuit_breaker::outcome::{Outcome, Response};
    use crate::config::Selector;
    use crate::routes::first;
    use alloc::string::ToString;

    const MINIMAL: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3}]}"#;

    fn parse(json: &str) -> Result<Breakers, ConfigError> {
        crate::config::load::<Breakers>(json.as_bytes())
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
        let (_, p) = first(breakers.policies(), Some("any-route"), |p| p).unwrap();
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
        assert_eq!(p.open_reply_settings().status, 503);
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
            "keel/circuit_breaker/orders"
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
        assert!(p.applies_to(Some("suggest")));
        assert!(!p.applies_to(Some("orders")));
        assert!(first(b.policies(), Some("orders"), |p| p).is_none());
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
        assert_eq!(p.open_reply_settings().status, 429);
        let f = p.fallback().unwrap();
        assert_eq!(f.max_age(), Duration::from_secs(30));
        assert_eq!(f.key(), &Selector::Header("x-user".into()));
        assert_eq!(p.state_key(Some("c"), None), None);
        assert_eq!(
            p.state_key(Some("c"), Some("10.0.0.1:80")).unwrap(),
            "keel/circuit_breaker/search/host/10.0.0.1:80"
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
            (r#""buckets": 0"#, "breakers[0].buckets", "at least 1"),
            (r#""buckets": 61"#, "breakers[0].buckets", "at most 60"),
            (
                r#""window": "10ms", "buckets": 20"#,
                "breakers[0].buckets",
                "1ms",
            ),
            (r#""min_calls": 0"#, "breakers[0].min_calls", "at least 1"),
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
                "at least 1,",
            ),
            (
                r#""half_open_probes": 1001"#,
                "breakers[0].half_open_probes",
                "at most 1000",
            ),
            (
                r#""max_instances": 0"#,
                "breakers[0].max_instances",
                "at least 1,",
            ),
            (
                r#""max_instances": 65537"#,
                "breakers[0].max_instances",
                "at most 65536",
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
                "at least 200",
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
                "set by the filter",
            ),
            (
                r#""fallback": {"max_age": "never"}"#,
                "breakers[0].fallback.max_age",
                "duration",
            ),
            (
                r#""fallback": {"max_body_bytes": 0}"#,
                "breakers[0].fallback.max_body_bytes",
                "at least 1",
            ),
            (
                r#""fallback": {"max_entries": 0}"#,
                "breakers[0].fallback.max_entries",
                "at least 1",
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
            assert!(parse(json).is_err(), "{json}");
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
