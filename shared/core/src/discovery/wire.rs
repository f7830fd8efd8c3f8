//! The discovery filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]). The `policy` module validates them into
//! [`super::policy::DiscoveryConfig`], with errors that name the field path.
//!
//!
//! ```json
//! {"services": [{"name": "users",
//!                "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}},
//!                "refresh": "1s",
//!                "health_check": {"path": "/healthz", "interval": "1s",
//!                                 "unhealthy_threshold": 2, "healthy_threshold": 1}}]}
//! ```
//!
//! Per service, with defaults:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `name` | required | names the shared-data keys and metrics (`[A-Za-z0-9_-]{1,64}`) |
//! | `source` | required | `{"etcd": {"cluster", "prefix"}}`, `{"consul": {"cluster", "service", "wait": "30s", "dc"}}` or `{"static": [{"address", "port", "weight": 1, "priority": 0, "zone"}]}` |
//! | `refresh` | `"5s"` | time between registry reads (at least 100 ms); with Consul, the least time between two blocking queries |
//! | `health_check` | none (no active checks) | `{"path", "cluster": "keel_health", "interval": "5s", "timeout": "1s", "unhealthy_threshold": 3, "healthy_threshold": 2}` |
//! | `passive` | on, Envoy's defaults | `{"enabled": true, "consecutive_failures": 5, "base_ejection": "30s", "max_ejection": "300s", "max_ejection_percent": 10}` |
//! | `max_stale` | `"5m"` | how old the last good answer may get before the set is flagged expired (it keeps serving; see `staleness`) |
//! | `max_endpoints` | 1024 | the most endpoints kept per service (1 to 16384) |
//!
//! `passive` sits beside `health_check` rather than inside it: outlier ejection works on real
//! traffic and is useful without any active check.
//!
//! At the top level, beside `services`:
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `admin_path` | none (off) | a request path (e.g. `"/keel/discovery"`) that the filter answers itself with every service's published set as JSON, for operators; put it on an internal listener or route |
//!
//! From the validated values the glue derives its tick
//! ([`DiscoveryConfig::tick`](super::policy::DiscoveryConfig::tick)): a tenth of the shortest
//! refresh or check interval, between [`MIN_TICK`](super::policy::MIN_TICK) and
//! [`MAX_TICK`](super::policy::MAX_TICK), so that a refresh or a check is never late by more
//! than a tenth of its period.
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;

use crate::config::{AnyDuration, Name, PositiveDuration};

/// The whole configuration, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySpec {
    /// The services to discover.
    pub services: Vec<ServiceSpec>,
    /// The path the filter answers with the published sets as JSON.
    #[serde(default)]
    pub admin_path: Option<String>,
}

/// One service, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The service's name in Keel (keys, metrics).
    pub name: Name,
    /// Where its endpoints come from.
    pub source: SourceSpec,
    /// Time between registry reads.
    #[serde(default)]
    pub refresh: Option<PositiveDuration>,
    /// Active health checks.
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// Passive ejection from real traffic.
    #[serde(default)]
    pub passive: Option<PassiveSpec>,
    /// How old the last good answer may get before it is flagged expired.
    #[serde(default)]
    pub max_stale: Option<PositiveDuration>,
    /// The most endpoints kept.
    #[serde(default)]
    pub max_endpoints: Option<u64>,
}

/// A registry, as written: exactly one of the three keys.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceSpec {
    /// etcd v3 through its JSON gateway.
    Etcd(EtcdSpec),
    /// Consul's health API.
    Consul(ConsulSpec),
    /// A fixed list.
    Static(Vec<StaticEndpointSpec>),
}

/// An etcd source, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSpec {
    /// The Envoy cluster that reaches etcd's gateway.
    pub cluster: String,
    /// The key prefix under which instances register.
    pub prefix: String,
}

/// A Consul source, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsulSpec {
    /// The Envoy cluster that reaches a Consul agent.
    pub cluster: String,
    /// The Consul service name.
    pub service: String,
    /// The blocking wait.
    #[serde(default)]
    pub wait: Option<PositiveDuration>,
    /// The datacenter (the agent's own when absent).
    #[serde(default)]
    pub dc: Option<String>,
}

/// A static endpoint, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpointSpec {
    /// An IP literal.
    pub address: String,
    /// The port (wide here so that 70000 gets a message with its path, not a serde error).
    pub port: i64,
    /// Relative weight.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Priority level.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Locality.
    #[serde(default)]
    pub zone: Option<String>,
}

/// Active health checks, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// The HTTP path to GET on each endpoint.
    pub path: String,
    /// The cluster the checks go through.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Time between two checks of one endpoint.
    #[serde(default)]
    pub interval: Option<PositiveDuration>,
    /// How long one check may take.
    #[serde(default)]
    pub timeout: Option<PositiveDuration>,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    #[serde(default)]
    pub unhealthy_threshold: Option<u64>,
    /// Consecutive successes that make an unhealthy endpoint healthy.
    #[serde(default)]
    pub healthy_threshold: Option<u64>,
}

/// Passive ejection, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PassiveSpec {
    /// `false` turns passive ejection off.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Consecutive failures (5xx, resets, timeouts) that eject a host.
    #[serde(default)]
    pub consecutive_failures: Option<u64>,
    /// The first ejection's length; the n-th lasts n times this.
    #[serde(default)]
    pub base_ejection: Option<PositiveDuration>,
    /// The longest ejection.
    #[serde(default)]
    pub max_ejection: Option<AnyDuration>,
    /// The largest share of a service's hosts ejected at once, in percent.
    #[serde(default)]
    pub max_ejection_percent: Option<u64>,
}
