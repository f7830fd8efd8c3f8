//! The picker filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]). The `policy` module validates them into
//! [`super::policy::FilterConfig`], with errors that name the field path.
//!
//! ```json
//! {"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring",
//!               "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}]}]}
//! ```
//!
//! Per picker:
//!
//! | field | meaning | default |
//! |---|---|---|
//! | `name` | unique; names metrics and the shared-data keys `keel/picker/<name>/in_flight` and (`peak_ewma`) `keel/picker/<name>/latency/<ip:port>` | required |
//! | `key` | a selector or a list of selectors that combine ([`super::KeyHash`]) | required for `ring`, `maglev`; refused otherwise |
//! | `algorithm` | `ring`, `maglev`, `round_robin`, `weighted`, `least_request`, `peak_ewma` | required |
//! | `endpoints` | `[{"address": "ip:port", "weight": 1, "priority": 0, "cluster": "..."}]` | exactly one of `endpoints`, `service` |
//! | `service` | take the endpoint set the discovery filter publishes for this service | |
//! | `routes` | Envoy route names the picker applies to | all routes |
//! | `ring_size` | ring points per unit of weight (`ring` only; at most 1,048,576 points in all; see [`super::ring`]) | 512 |
//! | `table_size` | Maglev table size, a prime (`maglev` only) | 65537 |
//! | `peak_ewma` | `{"decay": "10s", "default_rtt": "30ms"}`: the latency estimate's decay time constant and the estimate of an endpoint never measured (`peak_ewma` only; see [`super::peak_ewma`]) | `10s`, `30ms` |
//! | `balance_factor` | bounded loads, e.g. 1.25 (`ring`, `maglev` only) | off |
//! | `panic_threshold` | healthy fraction under which a level uses all its endpoints | 0.5 |
//! | `mode` | `original_dst` (set `header` to the address) or `cluster_header` | `original_dst` |
//! | `header` | the header set in `original_dst` mode | `x-envoy-original-dst-host` |
//! | `cluster_header` | the header set to the endpoint's cluster name in `cluster_header` mode | required there |
//! | `cookie` | `{"name": "sid", "ttl": "1h"}`: when the key's cookie is absent, generate one and set it | off |
//! | `breaker` | `{"name": "users-host", "half_open_probes": 2}`: the circuit-breaker filter's per-host breaker (same `vm_id`); a host whose breaker is open is skipped like an ejected host, a half-open one picked while a probe is free; `half_open_probes` is the breaker's (1..=1000) | off |
//! | `hosts_header` | request header set to the request's ordered host list (`ip:port,ip:port,...`) for Envoy's `override_host` load balancing policy | off |
//! | `hosts_property` | leave the request's host list on the stream (property `keel.picker.hosts`) for Keel's retry filter's failover; `false` saves a `proxy_set_property` per request where no `keel.retry` follows the picker | `true` |
//! | `endpoint_header` | request header that also records the picked endpoint's `ip:port` | `x-keel-endpoint` in `cluster_header` mode; none in `original_dst` mode, whose header already holds the address |
//!
//! An endpoint's `cluster` (only in `cluster_header` mode) names the Envoy cluster serving it;
//! it defaults to the address, so a cluster named `"127.0.0.1:18091"` serves that endpoint.
//! Endpoint addresses are IP addresses with a port: endpoints come from configuration and from
//! registries, and neither the picker nor Envoy's `ORIGINAL_DST` cluster resolves names.

use alloc::borrow::ToOwned;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::ring::MAX_POINTS_PER_WEIGHT;
use crate::config::{AnyDuration, Bounded, HeaderName, Name, PositiveDuration, Routes};

/// The filter's JSON: `{"pickers": [...]}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// The pickers, each applying to its routes.
    pub pickers: Vec<PickerSpec>,
}

/// One picker as written in JSON; see the module docs for the fields.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PickerSpec {
    /// Unique name.
    pub name: Name,
    /// One selector or several.
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// The algorithm.
    pub algorithm: AlgorithmName,
    /// Static endpoints.
    #[serde(default)]
    pub endpoints: Option<Vec<EndpointSpec>>,
    /// A service published by the discovery filter.
    #[serde(default)]
    pub service: Option<String>,
    /// Envoy route names.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// Ring points per unit of weight.
    #[serde(default)]
    pub ring_size: Option<Bounded<1, { MAX_POINTS_PER_WEIGHT as u64 }>>,
    /// Maglev table size.
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Peak-EWMA parameters.
    #[serde(default)]
    pub peak_ewma: Option<PeakEwmaSpec>,
    /// Bounded-load factor.
    #[serde(default)]
    pub balance_factor: Option<f64>,
    /// Panic threshold, a fraction.
    #[serde(default)]
    pub panic_threshold: Option<f64>,
    /// Header set in `original_dst` mode.
    #[serde(default)]
    pub header: Option<HeaderName>,
    /// How the pick reaches Envoy.
    #[serde(default)]
    pub mode: Option<ModeName>,
    /// Header set in `cluster_header` mode.
    #[serde(default)]
    pub cluster_header: Option<HeaderName>,
    /// Sticky cookie generation.
    #[serde(default)]
    pub cookie: Option<CookieSpec>,
    /// Header that records the picked endpoint.
    #[serde(default)]
    pub endpoint_header: Option<HeaderName>,
    /// The per-host breaker whose state steers the pick.
    #[serde(default)]
    pub breaker: Option<BreakerLinkSpec>,
    /// Request header that receives the request's ordered host list.
    #[serde(default)]
    pub hosts_header: Option<HeaderName>,
    /// Whether the host list is left on the stream for Keel's retry filter (default true).
    #[serde(default)]
    pub hosts_property: Option<bool>,
}

/// `{"name": "users-host", "half_open_probes": 2}`: the circuit-breaker filter's per-host
/// breaker this picker routes around.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BreakerLinkSpec {
    /// The breaker's name (scope `host`).
    pub name: Name,
    /// The breaker's `half_open_probes`.
    #[serde(default)]
    pub half_open_probes: Option<Bounded<1, 1000>>,
}

/// `{"decay": "10s", "default_rtt": "30ms"}`: the parameters of algorithm `peak_ewma`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeakEwmaSpec {
    /// The time constant the latency estimate decays with (default 10 s).
    #[serde(default)]
    pub decay: Option<PositiveDuration>,
    /// The estimate of an endpoint never measured (default 30 ms).
    #[serde(default)]
    pub default_rtt: Option<PositiveDuration>,
}

/// `"header:x-user"` or `["header:x-user", "cookie:sid"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec(pub Vec<String>);

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key selector such as \"header:x-user\", or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeySpec, E> {
                Ok(KeySpec(alloc::vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeySpec, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element::<String>()? {
                    parts.push(part);
                }
                Ok(KeySpec(parts))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

/// The algorithm names of the JSON.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// `"ring"`
    Ring,
    /// `"maglev"`
    Maglev,
    /// `"round_robin"`
    RoundRobin,
    /// `"weighted"`
    Weighted,
    /// `"least_request"`
    LeastRequest,
    /// `"peak_ewma"`
    PeakEwma,
}

impl AlgorithmName {
    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            AlgorithmName::Ring => "ring",
            AlgorithmName::Maglev => "maglev",
            AlgorithmName::RoundRobin => "round_robin",
            AlgorithmName::Weighted => "weighted",
            AlgorithmName::LeastRequest => "least_request",
            AlgorithmName::PeakEwma => "peak_ewma",
        }
    }
}

/// The mode names of the JSON.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// `"original_dst"`
    OriginalDst,
    /// `"cluster_header"`
    ClusterHeader,
}

/// One static endpoint as written in JSON.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `"ip:port"` or `"[ipv6]:port"`.
    pub address: String,
    /// Relative share, more than 0; default 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Priority level; default 0.
    #[serde(default)]
    pub priority: Option<u8>,
    /// The Envoy cluster serving it, in `cluster_header` mode; default the address.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// `{"name": "sid", "ttl": "1h"}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CookieSpec {
    /// The cookie's name: one of the key's `cookie:` selectors.
    pub name: String,
    /// Its lifetime, a duration; `"0s"` makes a session cookie.
    pub ttl: AnyDuration,
}
