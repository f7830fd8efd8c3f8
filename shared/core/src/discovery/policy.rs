//! The discovery filter's validated configuration: [`DiscoveryConfig`], each service's
//! [`ServiceConfig`] (its source, checks, passive ejection, bounds) and the tick the glue derives
//! from them ([`DiscoveryConfig::tick`]), validated from the wire structs of [`super::wire`] with
//! errors that name the field path.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::net::SocketAddr;

use super::registry::{
    check_zone, parse_ip, port_from, priority_from, weight_from, DiscoveredEndpoint, ParseLimits,
    SkipReason,
};
use super::wire::{
    DiscoverySpec, HealthCheckSpec, PassiveSpec, ServiceSpec, SourceSpec, StaticEndpointSpec,
};
use crate::config::{validate_each, ConfigError, FieldPath, PositiveDuration, Validate};
use crate::time::Duration;

/// Default time between registry reads.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// The shortest refresh accepted: faster polling only loads the registry.
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
/// Default blocking wait of a Consul query.
pub const DEFAULT_CONSUL_WAIT: Duration = Duration::from_secs(30);
/// Consul's own ceiling for `wait`.
pub const MAX_CONSUL_WAIT: Duration = Duration::from_secs(600);
/// Default age after which the last good answer is flagged expired.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(300);
/// Default bound on endpoints per service.
pub const DEFAULT_MAX_ENDPOINTS: usize = 1024;
/// The largest `max_endpoints` accepted.
pub const MAX_MAX_ENDPOINTS: usize = 16_384;
/// Default cluster for active health checks: an `ORIGINAL_DST` cluster routing on the
/// `x-envoy-original-dst-host` header.
pub const DEFAULT_HEALTH_CLUSTER: &str = "keel_health";
/// The shortest tick of the glue.
pub const MIN_TICK: Duration = Duration::from_millis(50);
/// The longest tick of the glue (it also renews the poller lease, whose TTL is
/// [`super::lease::POLLER_LEASE_TTL`], six ticks at this length).
pub const MAX_TICK: Duration = Duration::from_millis(500);

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The services, in configuration order, with unique names.
    pub services: Vec<ServiceConfig>,
    /// The request path answered with the published sets as JSON (visible ASCII, starts with
    /// `/`, no query), if configured.
    pub admin_path: Option<String>,
}

/// One validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The service's name in Keel.
    pub name: String,
    /// Where its endpoints come from.
    pub source: Source,
    /// Time between registry reads (at least [`MIN_REFRESH`]).
    pub refresh: Duration,
    /// Active checks, if configured.
    pub health_check: Option<ActiveCheckConfig>,
    /// Passive ejection, unless turned off.
    pub passive: Option<PassivePolicy>,
    /// Age past which the last good answer is flagged expired.
    pub max_stale: Duration,
    /// The most endpoints kept.
    pub max_endpoints: usize,
}

impl ServiceConfig {
    /// The bounds the registry parsers enforce for this service.
    pub fn parse_limits(&self) -> ParseLimits {
        ParseLimits::for_endpoints(self.max_endpoints)
    }
}

/// A validated registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// etcd v3 through its JSON gateway.
    Etcd(EtcdSource),
    /// Consul's health API with blocking queries.
    Consul(ConsulSource),
    /// A fixed list, already validated.
    Static(Vec<DiscoveredEndpoint>),
}

/// A validated etcd source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSource {
    /// The Envoy cluster of the gateway.
    pub cluster: String,
    /// The key prefix (non-empty).
    pub prefix: String,
}

/// A validated Consul source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulSource {
    /// The Envoy cluster of the agent.
    pub cluster: String,
    /// The service name, safe in a URL path without encoding.
    pub service: String,
    /// The blocking wait, at most 10 minutes.
    pub wait: Duration,
    /// The datacenter, safe in a query string without encoding.
    pub dc: Option<String>,
}

/// Validated active-check settings (Envoy's `HealthCheck`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveCheckConfig {
    /// The path to GET.
    pub path: String,
    /// The cluster the checks go through.
    pub cluster: String,
    /// Time between two checks of one endpoint.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Consecutive failures that make a healthy endpoint unhealthy (at least 1).
    pub unhealthy_threshold: u32,
    /// Consecutive successes that make an unhealthy endpoint healthy (at least 1).
    pub healthy_threshold: u32,
}

impl ActiveCheckConfig {
    /// Checks of `path` with the defaults: `keel_health`, every 5 s, 1 s timeout, 3 failures
    /// to go unhealthy, 2 successes to come back.
    pub fn with_path(path: &str) -> Self {
        ActiveCheckConfig {
            path: path.to_owned(),
            cluster: DEFAULT_HEALTH_CLUSTER.to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// Validated passive-ejection settings (Envoy's outlier detection, consecutive-5xx kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassivePolicy {
    /// Consecutive failures that eject a host (at least 1).
    pub consecutive_failures: u32,
    /// The first ejection's length (more than zero).
    pub base_ejection: Duration,
    /// The longest ejection (at least `base_ejection`).
    pub max_ejection: Duration,
    /// The largest share of hosts ejected at once, 0 to 100; one host may always be.
    pub max_ejection_percent: u8,
}

impl Default for PassivePolicy {
    /// Envoy's defaults: 5 consecutive failures, 30 s × times ejected, capped at 300 s, at most
    /// 10 % of hosts.
    fn default() -> Self {
        PassivePolicy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

impl DiscoveryConfig {
    /// Validates a parsed document.
    fn from_spec(spec: &DiscoverySpec) -> Result<Self, ConfigError> {
        let services = validate_each(
            &FieldPath::root().field("services"),
            "service",
            &spec.services,
            |s| s.name.as_str(),
            ServiceConfig::from_spec,
        )?;
        let admin_path = match &spec.admin_path {
            None => None,
            Some(p) => {
                let ok = p.starts_with('/')
                    && p.len() <= 256
                    && p.bytes()
                        .all(|b| (0x21..0x7f).contains(&b) && b != b'?' && b != b'#');
                if !ok {
                    return Err(FieldPath::root().field("admin_path").error(format!(
                        "must be a path starting with '/' of up to 256 visible ASCII characters without '?' or '#', got \"{}\"",
                        p.escape_debug()
                    )));
                }
                Some(p.clone())
            }
        };
        Ok(DiscoveryConfig {
            services,
            admin_path,
        })
    }

    /// How often the glue's root context ticks: a tenth of the shortest refresh or active-check
    /// interval, within [`MIN_TICK`]..=[`MAX_TICK`].
    pub fn tick(&self) -> Duration {
        let shortest = self
            .services
            .iter()
            .flat_map(|s| {
                core::iter::once(s.refresh).chain(s.health_check.as_ref().map(|h| h.interval))
            })
            .min()
            .unwrap_or(MAX_TICK);
        shortest.div(10).max(MIN_TICK).min(MAX_TICK)
    }
}

impl Validate for DiscoveryConfig {
    type Wire = DiscoverySpec;
    fn validate(spec: &DiscoverySpec) -> Result<Self, ConfigError> {
        DiscoveryConfig::from_spec(spec)
    }
}

/// The duration written, or `default`.
fn duration_or(value: Option<PositiveDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

fn count(path: &FieldPath, value: Option<u64>, default: u32, max: u32) -> Result<u32, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    match u32::try_from(v) {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(path.error(format!("must be 1 to {max}, got {v}"))),
    }
}

/// A name that goes into a URL, a header or a cluster reference as is: visible ASCII without
/// the characters that would need encoding or could split a header.
fn check_token(path: &FieldPath, text: &str, what: &str) -> Result<(), ConfigError> {
    let ok = !text.is_empty()
        && text.len() <= 256
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(path.error(format!(
            "{what} must be 1 to 256 ASCII letters, digits, '-', '_' or '.', got \"{}\"",
            text.escape_debug()
        )));
    }
    Ok(())
}

impl ServiceConfig {
    fn from_spec(path: &FieldPath, spec: &ServiceSpec) -> Result<Self, ConfigError> {
        let refresh = duration_or(spec.refresh, DEFAULT_REFRESH);
        if refresh < MIN_REFRESH {
            return Err(path.field("refresh").error(format!(
                "must be at least {MIN_REFRESH} (faster polling only loads the registry), got {refresh}"
            )));
        }
        let max_endpoints = match spec.max_endpoints {
            None => DEFAULT_MAX_ENDPOINTS,
            Some(n) => match usize::try_from(n) {
                Ok(n) if (1..=MAX_MAX_ENDPOINTS).contains(&n) => n,
                _ => {
                    return Err(path
                        .field("max_endpoints")
                        .error(format!("must be 1 to {MAX_MAX_ENDPOINTS}, got {n}")))
                }
            },
        };
        let source = Source::from_spec(&path.field("source"), &spec.source, max_endpoints)?;
        let max_stale = duration_or(spec.max_stale, DEFAULT_MAX_STALE);
        // An answer can only be as fresh as the polling (or the blocking wait) allows.
        let floor = match &source {
            Source::Consul(c) => refresh.saturating_add(c.wait),
            _ => refresh,
        };
        if max_stale < floor {
            return Err(path.field("max_stale").error(format!(
                "must be at least the refresh{} ({floor}), got {max_stale}",
                if matches!(source, Source::Consul(_)) {
                    " plus the Consul wait"
                } else {
                    ""
                }
            )));
        }
        let health_check = spec
            .health_check
            .as_ref()
            .map(|h| ActiveCheckConfig::from_spec(&path.field("health_check"), h))
            .transpose()?;
        let passive = match &spec.passive {
            None => Some(PassivePolicy::default()),
            Some(p) => PassivePolicy::from_spec(&path.field("passive"), p)?,
        };
        Ok(ServiceConfig {
            name: spec.name.as_str().to_owned(),
            source,
            refresh,
            health_check,
            passive,
            max_stale,
            max_endpoints,
        })
    }
}

impl Source {
    fn from_spec(
        path: &FieldPath,
        spec: &SourceSpec,
        max_endpoints: usize,
    ) -> Result<Self, ConfigError> {
        match spec {
            SourceSpec::Etcd(e) => {
                let at = path.field("etcd");
                check_token(&at.field("cluster"), &e.cluster, "a cluster name")?;
                // The whole keyspace is never what was meant, and a prefix goes into a log
                // line and a request body: keep it printable.
                if e.prefix.is_empty() || e.prefix.len() > 512 {
                    return Err(at
                        .field("prefix")
                        .error("must be 1 to 512 bytes, e.g. \"/services/users/\""));
                }
                if e.prefix.chars().any(char::is_control) {
                    return Err(at
                        .field("prefix")
                        .error("must not contain control characters"));
                }
                Ok(Source::Etcd(EtcdSource {
                    cluster: e.cluster.clone(),
                    prefix: e.prefix.clone(),
                }))
            }
            SourceSpec::Consul(c) => {
                let at = path.field("consul");
                check_token(&at.field("cluster"), &c.cluster, "a cluster name")?;
                check_token(&at.field("service"), &c.service, "a Consul service name")?;
                if let Some(dc) = &c.dc {
                    check_token(&at.field("dc"), dc, "a datacenter name")?;
                }
                let wait = duration_or(c.wait, DEFAULT_CONSUL_WAIT);
                if wait > MAX_CONSUL_WAIT {
                    return Err(at
                        .field("wait")
                        .error(format!("must be at most 10m (Consul's limit), got {wait}")));
                }
                Ok(Source::Consul(ConsulSource {
                    cluster: c.cluster.clone(),
                    service: c.service.clone(),
                    wait,
                    dc: c.dc.clone(),
                }))
            }
            SourceSpec::Static(list) => {
                let at = path.field("static");
                if list.is_empty() {
                    return Err(at.error("must list at least one endpoint"));
                }
                if list.len() > max_endpoints {
                    return Err(at.error(format!(
                        "lists {} endpoints, more than max_endpoints = {max_endpoints}",
                        list.len()
                    )));
                }
                let mut seen = BTreeSet::new();
                let mut out = Vec::with_capacity(list.len());
                for (i, e) in list.iter().enumerate() {
                    let item = at.index(i);
                    let endpoint = static_endpoint(e).map_err(|reason| {
                        item.field(reason.field().unwrap_or("address"))
                            .error(format!("{reason}"))
                    })?;
                    if !seen.insert(endpoint.address) {
                        return Err(
                            item.error(format!("{} is listed twice", endpoint.address_text()))
                        );
                    }
                    out.push(endpoint);
                }
                Ok(Source::Static(out))
            }
        }
    }
}

fn static_endpoint(e: &StaticEndpointSpec) -> Result<DiscoveredEndpoint, SkipReason> {
    let ip = parse_ip(&e.address)?;
    let port = port_from(i128::from(e.port))?;
    let weight = e.weight.map_or(Ok(1), |w| weight_from(i128::from(w)))?;
    let priority = e.priority.map_or(Ok(0), |p| priority_from(i128::from(p)))?;
    let zone = e.zone.clone().unwrap_or_default();
    check_zone(&zone)?;
    Ok(DiscoveredEndpoint {
        address: SocketAddr::new(ip, port),
        weight,
        priority,
        zone,
        registry_healthy: true,
        meta: Vec::new(),
        tags: Vec::new(),
    })
}

impl ActiveCheckConfig {
    fn from_spec(path: &FieldPath, spec: &HealthCheckSpec) -> Result<Self, ConfigError> {
        let defaults = ActiveCheckConfig::with_path(&spec.path);
        let path_ok = spec.path.starts_with('/')
            && spec.path.len() <= 256
            && spec.path.bytes().all(|b| (0x21..0x7f).contains(&b));
        if !path_ok {
            return Err(path.field("path").error(format!(
                "must start with '/' and hold up to 256 visible ASCII characters, got \"{}\"",
                spec.path.escape_debug()
            )));
        }
        let cluster = spec.cluster.clone().unwrap_or(defaults.cluster);
        check_token(&path.field("cluster"), &cluster, "a cluster name")?;
        let interval = duration_or(spec.interval, defaults.interval);
        let timeout = duration_or(spec.timeout, defaults.timeout);
        Ok(ActiveCheckConfig {
            path: spec.path.clone(),
            cluster,
            interval,
            timeout,
            unhealthy_threshold: count(
                &path.field("unhealthy_threshold"),
                spec.unhealthy_threshold,
                defaults.unhealthy_threshold,
                1000,
            )?,
            healthy_threshold: count(
                &path.field("healthy_threshold"),
                spec.healthy_threshold,
                defaults.healthy_threshold,
                1000,
            )?,
        })
    }
}

impl PassivePolicy {
    fn from_spec(path: &FieldPath, spec: &PassiveSpec) -> Result<Option<Self>, ConfigError> {
        if spec.enabled == Some(false) {
            return Ok(None);
        }
        let d = PassivePolicy::default();
        let base_ejection = duration_or(spec.base_ejection, d.base_ejection);
        let max_ejection = match spec.max_ejection {
            Some(t) => t.0,
            None => d.max_ejection.max(base_ejection),
        };
        if max_ejection < base_ejection {
            return Err(path.field("max_ejection").error(format!(
                "must be at least base_ejection ({base_ejection}), got {max_ejection}"
            )));
        }
        let max_ejection_percent = match spec.max_ejection_percent {
            None => d.max_ejection_percent,
            Some(p) => match u8::try_from(p) {
                Ok(p) if p <= 100 => p,
                _ => {
                    return Err(path
                        .field("max_ejection_percent")
                        .error(format!("must be 0 to 100, got {p}")))
                }
            },
        };
        Ok(Some(PassivePolicy {
            consecutive_failures: count(
                &path.field("consecutive_failures"),
                spec.consecutive_failures,
                d.consecutive_failures,
                100_000,
            )?,
            base_ejection,
            max_ejection,
            max_ejection_percent,
        }))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// The production entry point.
    fn from_json(json: &str) -> Result<DiscoveryConfig, ConfigError> {
        crate::config::load(json.as_bytes())
    }
    use alloc::string::ToString;

    const MINIMAL: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s", "health_check": {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}}]}"#;

    fn error_of(json: &str) -> ConfigError {
        from_json(json).unwrap_err()
    }

    /// The minimal document with `field` of service 0 replaced by `value`.
    fn with(field: &str, value: &str) -> String {
        let mut doc: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        let patch: serde_json::Value = serde_json::from_str(value).unwrap();
        let mut target = &mut doc["services"][0];
        let parts: Vec<&str> = field.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            target = &mut target[*p];
        }
        target[*parts.last().unwrap()] = patch;
        doc.to_string()
    }

    #[test]
    fn the_minimal_config_parses_with_documented_defaults() {
        let config = from_json(MINIMAL).unwrap();
        let users = &config.services[0];
        assert_eq!(users.name, "users");
        assert_eq!(
            users.source,
            Source::Etcd(EtcdSource {
                cluster: "etcd".into(),
                prefix: "/services/users/".into()
            })
        );
        assert_eq!(users.refresh, Duration::from_secs(1));
        let hc = users.health_check.as_ref().unwrap();
        assert_eq!(hc.path, "/healthz");
        assert_eq!(hc.cluster, "keel_health");
        assert_eq!(hc.interval, Duration::from_secs(1));
        assert_eq!(hc.timeout, Duration::from_secs(1));
        assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (2, 1));
        assert_eq!(users.passive, Some(PassivePolicy::default()));
        let p = PassivePolicy::default();
        assert_eq!(p.consecutive_failures, 5);
        assert_eq!(p.base_ejection, Duration::from_secs(30));
        assert_eq!(p.max_ejection, Duration::from_secs(300));
        assert_eq!(p.max_ejection_percent, 10);
        assert_eq!(users.max_stale, Duration::from_secs(300));
        assert_eq!(users.max_endpoints, 1024);
    }

    #[test]
    fn admin_path_and_tick() {
        let config = from_json(MINIMAL).unwrap();
        assert_eq!(config.admin_path, None);
        // 1 s refresh and interval: a tick of 100 ms.
        assert_eq!(config.tick(), Duration::from_millis(100));
        let mut doc: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        doc["admin_path"] = "/keel/discovery".into();
        doc["services"][0]["refresh"] = "1m".into();
        doc["services"][0]["health_check"]["interval"] = "200ms".into();
        let config = from_json(&doc.to_string()).unwrap();
        assert_eq!(config.admin_path.as_deref(), Some("/keel/discovery"));
        assert_eq!(config.tick(), MIN_TICK);
        doc["services"][0]["health_check"]["interval"] = "30s".into();
        let config = from_json(&doc.to_string()).unwrap();
        assert_eq!(config.tick(), MAX_TICK);
        for bad in ["keel", "/a?b", "/a b", ""] {
            doc["admin_path"] = bad.into();
            let e = error_of(&doc.to_string());
            assert_eq!(e.path, "admin_path", "{bad}: {e}");
        }
    }

    #[test]
    fn consul_and_static_sources() {
        let consul = with(
            "source",
            r#"{"consul": {"cluster": "consul", "service": "users", "wait": "30s", "dc": "dc1"}}"#,
        );
        let config = from_json(&consul).unwrap();
        assert_eq!(
            config.services[0].source,
            Source::Consul(ConsulSource {
                cluster: "consul".into(),
                service: "users".into(),
                wait: Duration::from_secs(30),
                dc: Some("dc1".into()),
            })
        );
        let stat = with(
            "source",
            r#"{"static": [{"address": "127.0.0.1", "port": 18091, "weight": 1}, {"address": "::1", "port": 18092}]}"#,
        );
        let config = from_json(&stat).unwrap();
        let Source::Static(list) = &config.services[0].source else {
            panic!("not static");
        };
        assert_eq!(list[0].address_text(), "127.0.0.1:18091");
        assert_eq!(list[1].address_text(), "[::1]:18092");
        let off = with("passive", r#"{"enabled": false}"#);
        assert_eq!(from_json(&off).unwrap().services[0].passive, None);
    }

    #[test]
    fn refuses_bad_fields_with_their_path() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "refresh",
                r#""x""#,
                "services[0].refresh",
                "expected a duration",
            ),
            (
                "refresh",
                r#""10ms""#,
                "services[0].refresh",
                "at least 100ms",
            ),
            (
                "max_stale",
                r#""500ms""#,
                "services[0].max_stale",
                "at least the refresh",
            ),
            (
                "max_endpoints",
                "0",
                "services[0].max_endpoints",
                "1 to 16384",
            ),
            ("name", r#""a/b""#, "services[0].name", "may only use"),
            (
                "source.etcd.prefix",
                r#""""#,
                "services[0].source.etcd.prefix",
                "1 to 512",
            ),
            (
                "source.etcd.cluster",
                r#""etcd\r\nx""#,
                "services[0].source.etcd.cluster",
                "cluster name",
            ),
            (
                "health_check.path",
                r#""healthz""#,
                "services[0].health_check.path",
                "start with '/'",
            ),
            (
                "health_check.interval",
                r#""soon""#,
                "services[0].health_check.interval",
                "\"soon\"",
            ),
            (
                "health_check.timeout",
                r#""0s""#,
                "services[0].health_check.timeout",
                "more than zero",
            ),
            (
                "health_check.unhealthy_threshold",
                "0",
                "services[0].health_check.unhealthy_threshold",
                "1 to 1000",
            ),
            (
                "health_check.cluster",
                r#""""#,
                "services[0].health_check.cluster",
                "cluster name",
            ),
            (
                "passive",
                r#"{"max_ejection_percent": 101}"#,
                "services[0].passive.max_ejection_percent",
                "0 to 100",
            ),
            (
                "passive",
                r#"{"base_ejection": "60s", "max_ejection": "10s"}"#,
                "services[0].passive.max_ejection",
                "at least base_ejection",
            ),
            (
                "passive",
                r#"{"consecutive_failures": 0}"#,
                "services[0].passive.consecutive_failures",
                "1 to 100000",
            ),
            (
                "source",
                r#"{"consul": {"cluster": "consul", "service": "users", "wait": "11m"}}"#,
                "services[0].source.consul.wait",
                "10m",
            ),
            (
                "source",
                r#"{"consul": {"cluster": "consul", "service": "us ers"}}"#,
                "services[0].source.consul.service",
                "service name",
            ),
            (
                "source",
                r#"{"consul": {"cluster": "consul", "service": "users", "dc": "dc1&x=1"}}"#,
                "services[0].source.consul.dc",
                "datacenter",
            ),
            (
                "source",
                r#"{"static": []}"#,
                "services[0].source.static",
                "at least one",
            ),
            (
                "source",
                r#"{"static": [{"address": "users.local", "port": 80}]}"#,
                "services[0].source.static[0].address",
                "host name",
            ),
            (
                "source",
                r#"{"static": [{"address": "10.0.0.1", "port": 70000}]}"#,
                "services[0].source.static[0].port",
                "1 to 65535",
            ),
            (
                "source",
                r#"{"static": [{"address": "10.0.0.1", "port": 80, "weight": 0}]}"#,
                "services[0].source.static[0].weight",
                "1 to 65535",
            ),
            (
                "source",
                r#"{"static": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.1", "port": 80}]}"#,
                "services[0].source.static[1]",
                "twice",
            ),
        ];
        for (field, value, path, needle) in cases {
            let e = error_of(&with(field, value));
            assert_eq!(e.path, *path, "{field} = {value}: {e}");
            assert!(e.message.contains(needle), "{field} = {value}: {e}");
        }
        let e = error_of(&with("refresh", r#""x""#));
        assert!(
            e.to_string()
                .starts_with("services[0].refresh: expected a duration like"),
            "{e}"
        );
    }

    #[test]
    fn refuses_unknown_fields_and_shapes() {
        assert!(from_json(&with("refersh", r#""1s""#)).is_err());
        assert!(from_json(&with("health_check.intervall", r#""1s""#)).is_err());
        assert!(from_json(&with(
            "source",
            r#"{"etcd": {"cluster": "e", "prefix": "/p/"}, "consul": {"cluster": "c", "service": "s"}}"#
        ))
        .is_err());
        assert!(from_json(&with("source", r#"{"zookeeper": {}}"#)).is_err());
        assert_eq!(error_of(r#"{"services": []}"#).path, "services");
        let twice = r#"{"services": [
            {"name": "a", "source": {"static": [{"address": "10.0.0.1", "port": 80}]}},
            {"name": "a", "source": {"static": [{"address": "10.0.0.1", "port": 80}]}}]}"#;
        assert_eq!(error_of(twice).path, "services[1].name");
    }
}
