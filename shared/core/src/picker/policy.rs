//! The picker's validated configuration: [`FilterConfig`] and each [`PickerConfig`] with its
//! request-time behaviour (the request key, the sticky cookie, the routing target), validated
//! from the wire structs of [`super::wire`] with errors that name the field path.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::net::SocketAddr;

use super::bounded::BalanceFactor;
use super::levels::{Algorithm, Picker, PickerOptions};
use super::maglev::{TableSize, MAX_TABLE_SIZE};
use super::peak_ewma::PeakEwmaParams;
use super::ring::RingParams;
use super::select::PanicThreshold;
use super::wire::{AlgorithmName, EndpointSpec, FilterSpec, KeySpec, ModeName, PickerSpec};
use super::{Endpoint, KeyHash};
use crate::config::{validate_each, ConfigError, FieldPath, HeaderName, Selector, Validate};
use crate::rand::Rng;
use crate::time::Duration;

/// The header Envoy's `ORIGINAL_DST` cluster reads (with `use_http_header: true`).
pub const DEFAULT_HEADER: &str = "x-envoy-original-dst-host";
/// The request header that records the picked endpoint's address (`ip:port`) in
/// `cluster_header` mode, where the routing header holds a cluster name, for the filters after
/// the picker (a per-host breaker) and for the upstream. In `original_dst` mode the routing
/// header already holds the address, so none is set unless configured (one header write less
/// per request).
pub const DEFAULT_ENDPOINT_HEADER: &str = "x-keel-endpoint";

/// The per-host breaker a picker routes around: hosts whose breaker is open are skipped like
/// ejected hosts, a half-open host is picked while the breaker has a probe free
/// ([`crate::circuit_breaker::steer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerLink {
    /// The breaker's name: its states are `keel/circuit_breaker/<name>/host/<address>`.
    pub name: String,
    /// How many probes the breaker lets through per half-open period (its `half_open_probes`).
    pub half_open_probes: u16,
}

/// The validated filter configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterConfig {
    /// The pickers in configuration order.
    pub pickers: Vec<PickerConfig>,
}

/// Where a picker's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    /// Listed in the configuration.
    Static(Vec<Endpoint>),
    /// Published by the discovery filter under this service name.
    Service(String),
}

/// How the glue hands the pick to Envoy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Set `header` to the endpoint's address, for a cluster of type `ORIGINAL_DST`.
    OriginalDst {
        /// The header name, lower case.
        header: String,
    },
    /// Set `header` to the name of the cluster serving the endpoint, for a route with
    /// `cluster_header`.
    ClusterHeader {
        /// The header name, lower case.
        header: String,
        /// `(address, cluster)` for static endpoints with a `cluster`; others use the address.
        clusters: Vec<(String, String)>,
    },
}

impl Target {
    /// The header to set.
    pub fn header(&self) -> &str {
        match self {
            Target::OriginalDst { header } | Target::ClusterHeader { header, .. } => header,
        }
    }

    /// The header's value for `endpoint`.
    pub fn value<'a>(&'a self, endpoint: &'a Endpoint) -> &'a str {
        match self {
            Target::OriginalDst { .. } => &endpoint.address,
            Target::ClusterHeader { clusters, .. } => clusters
                .iter()
                .find(|(a, _)| *a == endpoint.address)
                .map_or(endpoint.address.as_str(), |(_, c)| c.as_str()),
        }
    }
}

/// A cookie generated for clients that do not send the key's cookie yet, as Envoy's cookie hash
/// policy with a TTL does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyCookie {
    /// The cookie's name.
    pub name: String,
    /// Its lifetime; zero means a session cookie.
    pub ttl: Duration,
}

impl StickyCookie {
    /// A fresh value: 16 hex digits from `rng` (random rather than derived from the client
    /// address, so clients behind one NAT still spread).
    pub fn generate(&self, rng: &mut impl Rng) -> String {
        format!("{:016x}", rng.next_u64())
    }

    /// The `set-cookie` response header value that stores `value`.
    pub fn set_cookie(&self, value: &str) -> String {
        if self.ttl.is_zero() {
            format!("{}={value}; Path=/; HttpOnly", self.name)
        } else {
            format!(
                "{}={value}; Max-Age={}; Path=/; HttpOnly",
                self.name,
                self.ttl.as_secs_ceil()
            )
        }
    }
}

/// What [`PickerConfig::request_key`] found in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestKey {
    /// The key hash; `None` when no selector had a value (the pick is then random).
    pub hash: Option<u64>,
    /// A `set-cookie` response header value when a sticky cookie was generated.
    pub set_cookie: Option<String>,
}

/// One validated picker.
#[derive(Clone, Debug, PartialEq)]
pub struct PickerConfig {
    /// Unique name.
    pub name: String,
    /// The key's selectors, combined in order; empty for balancers.
    pub key: Vec<Selector>,
    /// The algorithm with its parameters.
    pub algorithm: Algorithm,
    /// Panic threshold and bounded loads.
    pub options: PickerOptions,
    /// Where the endpoints come from.
    pub source: EndpointSource,
    /// Route names, `None` for all routes.
    pub routes: Option<Vec<String>>,
    /// How the pick reaches Envoy.
    pub target: Target,
    /// Sticky cookie generation, if configured.
    pub cookie: Option<StickyCookie>,
    /// A request header set to the picked endpoint's address besides the routing header,
    /// lower case; see [`DEFAULT_ENDPOINT_HEADER`].
    pub endpoint_header: Option<String>,
    /// The per-host breaker that steers the pick, if configured.
    pub breaker: Option<BreakerLink>,
    /// A request header set to the request's ordered host list (the preference list, as
    /// [`super::failover::encode_hosts`] writes it), for Envoy's `override_host` load balancing
    /// policy; lower case.
    pub hosts_header: Option<String>,
    /// Whether each picked request's host list is left on the stream (the property
    /// [`super::failover::HOSTS_PROPERTY`]) for Keel's retry filter to fail over along: one
    /// `proxy_set_property` per picked request, useless when no `keel.retry` follows the
    /// picker (default true).
    pub hosts_property: bool,
}

impl PickerConfig {
    /// A picker over `endpoints` (for a `service` source, the set discovery published).
    pub fn picker(&self, endpoints: &[Endpoint]) -> Picker {
        Picker::new(self.algorithm, self.options, endpoints)
    }

    /// The picker over the static endpoints, `None` for a `service` source.
    pub fn static_picker(&self) -> Option<Picker> {
        match &self.source {
            EndpointSource::Static(endpoints) => Some(self.picker(endpoints)),
            EndpointSource::Service(_) => None,
        }
    }

    /// The key hash of a request: `read` gives the value of each selector in the request as
    /// bytes (or `None` when absent), and the parts combine as [`KeyHash`] does. When the
    /// sticky cookie's selector is absent, a fresh cookie value stands in for it and comes back
    /// as the `set-cookie` value to add to the response, so the client's next requests carry
    /// it.
    pub fn request_key<V: AsRef<[u8]>>(
        &self,
        mut read: impl FnMut(&Selector) -> Option<V>,
        rng: &mut impl Rng,
    ) -> RequestKey {
        let mut key = KeyHash::new();
        let mut set_cookie = None;
        for selector in &self.key {
            if let Some(value) = read(selector) {
                key.add(Some(value.as_ref()));
                continue;
            }
            if let (Selector::Cookie(name), Some(cookie)) = (selector, &self.cookie) {
                if *name == cookie.name {
                    let value = cookie.generate(rng);
                    key.add(Some(value.as_bytes()));
                    set_cookie = Some(cookie.set_cookie(&value));
                }
            }
        }
        RequestKey {
            hash: key.finish(),
            set_cookie,
        }
    }

    /// The shared-data key of this picker's in-flight counts ([`super::bounded`]).
    pub fn in_flight_key(&self) -> String {
        format!("keel/picker/{}/in_flight", self.name)
    }

    /// The shared-data key of the latency estimate and load of this picker's endpoint at
    /// `address` (an [`super::peak_ewma::EndpointLatency`]), for algorithm `peak_ewma`.
    pub fn latency_key(&self, address: &str) -> String {
        format!("keel/picker/{}/latency/{address}", self.name)
    }
}

impl Validate for FilterConfig {
    type Wire = FilterSpec;
    fn validate(spec: &FilterSpec) -> Result<FilterConfig, ConfigError> {
        validate(spec)
    }
}

/// Validates the filter's JSON structs.
fn validate(spec: &FilterSpec) -> Result<FilterConfig, ConfigError> {
    let pickers = validate_each(
        &FieldPath::root().field("pickers"),
        "picker",
        &spec.pickers,
        |p| p.name.as_str(),
        validate_picker,
    )?;
    Ok(FilterConfig { pickers })
}

fn validate_picker(path: &FieldPath, spec: &PickerSpec) -> Result<PickerConfig, ConfigError> {
    let algorithm_name = spec.algorithm;
    let hashing = matches!(algorithm_name, AlgorithmName::Ring | AlgorithmName::Maglev);
    let only_for = |field: &str, what: &str| {
        path.field(field).error(format!(
            "applies to {what} only, not to algorithm \"{}\"",
            algorithm_name.as_str()
        ))
    };

    let key = match (&spec.key, hashing) {
        (None, true) => {
            return Err(path.field("key").error(format!(
                "algorithm \"{}\" needs a key, e.g. \"header:x-user\" or [\"header:x-user\", \
                 \"cookie:sid\"]",
                algorithm_name.as_str()
            )))
        }
        (Some(_), false) => {
            return Err(only_for(
                "key",
                "the hashing algorithms \"ring\" and \"maglev\"",
            ))
        }
        (None, false) => Vec::new(),
        (Some(KeySpec(parts)), true) => validate_key(&path.field("key"), parts)?,
    };

    let algorithm = match algorithm_name {
        AlgorithmName::Ring => {
            let mut params = RingParams::default();
            if let Some(size) = spec.ring_size {
                params.points_per_weight = size.get_u32();
            }
            Algorithm::Ring(params)
        }
        AlgorithmName::Maglev => {
            let size = match spec.table_size {
                None => TableSize::default(),
                Some(n) => TableSize::new(n).ok_or_else(|| {
                    path.field("table_size").error(format!(
                        "must be a prime number from 3 to {MAX_TABLE_SIZE} (e.g. 65537), got {n}"
                    ))
                })?,
            };
            Algorithm::Maglev(size)
        }
        AlgorithmName::RoundRobin => Algorithm::RoundRobin,
        AlgorithmName::Weighted => Algorithm::Weighted,
        AlgorithmName::LeastRequest => Algorithm::LeastRequest,
        AlgorithmName::PeakEwma => {
            let mut params = PeakEwmaParams::default();
            if let Some(p) = &spec.peak_ewma {
                if let Some(decay) = p.decay {
                    params.decay = decay.0;
                }
                if let Some(rtt) = p.default_rtt {
                    params.default_rtt = rtt.0;
                }
            }
            Algorithm::PeakEwma(params)
        }
    };
    if spec.peak_ewma.is_some() && algorithm_name != AlgorithmName::PeakEwma {
        return Err(only_for("peak_ewma", "algorithm \"peak_ewma\""));
    }
    if spec.ring_size.is_some() && algorithm_name != AlgorithmName::Ring {
        return Err(only_for("ring_size", "algorithm \"ring\""));
    }
    if spec.table_size.is_some() && algorithm_name != AlgorithmName::Maglev {
        return Err(only_for("table_size", "algorithm \"maglev\""));
    }

    let balance_factor = match spec.balance_factor {
        None => None,
        Some(_) if !hashing => {
            return Err(only_for(
                "balance_factor",
                "the hashing algorithms \"ring\" and \"maglev\"",
            ))
        }
        Some(f) => Some(BalanceFactor::new(f).ok_or_else(|| {
            path.field("balance_factor").error(format!(
                "must be from 1.0 to 100.0 (1.25: no endpoint over 125 % of the average), got {f}"
            ))
        })?),
    };
    let panic_threshold = match spec.panic_threshold {
        None => PanicThreshold::default(),
        Some(t) => PanicThreshold::new(t).ok_or_else(|| {
            path.field("panic_threshold").error(format!(
                "must be a fraction from 0 to 1 (0 turns panic off), got {t}"
            ))
        })?,
    };

    let mode = spec.mode.unwrap_or(ModeName::OriginalDst);
    let source = match (&spec.endpoints, &spec.service) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(path.error("needs exactly one of \"endpoints\" and \"service\""))
        }
        (None, Some(service)) => {
            EndpointSource::Service(validate_service(&path.field("service"), service)?)
        }
        (Some(list), None) => {
            EndpointSource::Static(validate_endpoints(&path.field("endpoints"), list, mode)?)
        }
    };
    if let (Algorithm::Maglev(size), EndpointSource::Static(list)) = (&algorithm, &source) {
        if (size.get() as usize) < list.len() {
            return Err(path.field("table_size").error(format!(
                "{} entries cannot hold {} endpoints; use a prime over 100 × endpoints",
                size.get(),
                list.len()
            )));
        }
    }

    let target = match mode {
        ModeName::OriginalDst => {
            if spec.cluster_header.is_some() {
                return Err(path
                    .field("cluster_header")
                    .error("applies to mode \"cluster_header\" only"));
            }
            let header = spec
                .header
                .as_ref()
                .map_or(DEFAULT_HEADER, HeaderName::as_str)
                .to_owned();
            Target::OriginalDst { header }
        }
        ModeName::ClusterHeader => {
            if spec.header.is_some() {
                return Err(path.field("header").error(
                    "applies to mode \"original_dst\" only; use \"cluster_header\" to name the \
                     header in this mode",
                ));
            }
            let header =
                match &spec.cluster_header {
                    None => return Err(path.field("cluster_header").error(
                        "mode \"cluster_header\" needs the header that carries the cluster name, \
                         e.g. \"x-keel-cluster\"",
                    )),
                    Some(h) => h.as_str().to_owned(),
                };
            let clusters = spec
                .endpoints
                .iter()
                .flatten()
                .filter_map(|e| Some((e.address.clone(), e.cluster.clone()?)))
                .collect();
            Target::ClusterHeader { header, clusters }
        }
    };

    let endpoint_header = match (&spec.endpoint_header, &target) {
        (Some(h), _) => Some(h.as_str().to_owned()),
        (None, Target::ClusterHeader { .. }) => Some(DEFAULT_ENDPOINT_HEADER.to_string()),
        (None, Target::OriginalDst { .. }) => None,
    };
    if endpoint_header.as_deref() == Some(target.header()) {
        return Err(path.field("endpoint_header").error(format!(
            "\"{}\" is already the header that routes the request; choose another name",
            target.header()
        )));
    }

    let cookie = match &spec.cookie {
        None => None,
        Some(c) => {
            let at = path.field("cookie");
            if !key.contains(&Selector::Cookie(c.name.clone())) {
                return Err(at.field("name").error(format!(
                    "\"{}\" must be one of the key's selectors as \"cookie:{}\"",
                    c.name, c.name
                )));
            }
            if c.name
                .bytes()
                .any(|b| matches!(b, b'=' | b';' | b',' | b'"'))
            {
                return Err(at
                    .field("name")
                    .error(format!("\"{}\" is not a valid cookie name", c.name)));
            }
            Some(StickyCookie {
                name: c.name.clone(),
                ttl: c.ttl.0,
            })
        }
    };

    let routes = spec.routes.as_ref().map(|r| r.names().to_vec());

    let breaker = spec.breaker.as_ref().map(|b| BreakerLink {
        name: b.name.as_str().to_owned(),
        half_open_probes: b.half_open_probes.map_or(1, |n| n.get_u16()),
    });

    let hosts_header = match &spec.hosts_header {
        None => None,
        Some(h) => {
            let at = path.field("hosts_header");
            let h = h.as_str().to_owned();
            if h == target.header() || endpoint_header.as_deref() == Some(h.as_str()) {
                return Err(at.error(format!(
                    "\"{h}\" is already a header this picker sets; choose another name"
                )));
            }
            Some(h)
        }
    };

    Ok(PickerConfig {
        name: spec.name.as_str().to_owned(),
        key,
        algorithm,
        options: PickerOptions {
            panic_threshold,
            balance_factor,
        },
        source,
        routes,
        target,
        cookie,
        endpoint_header,
        breaker,
        hosts_header,
        hosts_property: spec.hosts_property.unwrap_or(true),
    })
}

fn validate_key(path: &FieldPath, parts: &[String]) -> Result<Vec<Selector>, ConfigError> {
    if parts.is_empty() {
        return Err(path.error("needs at least one selector"));
    }
    if parts.len() == 1 {
        return parts.iter().map(|p| Selector::parse(path, p)).collect();
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| Selector::parse(&path.index(i), p))
        .collect()
}

fn validate_service(path: &FieldPath, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(path.error(format!(
            "expected a service name of ASCII letters, digits, '-', '_' and '.', got \"{name}\""
        )))
    }
}

/// Checks an `ip:port` address; the error explains why names are not accepted.
pub fn parse_address(path: &FieldPath, text: &str) -> Result<SocketAddr, ConfigError> {
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        Ok(_) => Err(path.error(format!(
            "expected \"ip:port\", got \"{text}\": port 0 cannot be connected to"
        ))),
        Err(_) => Err(path.error(format!(
            "expected \"ip:port\", got \"{text}\": an IPv4 address or a bracketed IPv6 address \
             with a port, e.g. \"10.0.0.1:8080\" or \"[2001:db8::1]:8080\"; host names are not \
             resolved (endpoints come from configuration and registries as addresses, and \
             Envoy's ORIGINAL_DST cluster connects to the header's address as is)"
        ))),
    }
}

fn validate_endpoints(
    path: &FieldPath,
    list: &[EndpointSpec],
    mode: ModeName,
) -> Result<Vec<Endpoint>, ConfigError> {
    if list.is_empty() {
        return Err(path.error("needs at least one endpoint (or use \"service\")"));
    }
    let mut seen: Vec<SocketAddr> = Vec::with_capacity(list.len());
    let mut endpoints = Vec::with_capacity(list.len());
    for (i, spec) in list.iter().enumerate() {
        let at = path.index(i);
        let addr = parse_address(&at.field("address"), &spec.address)?;
        if seen.contains(&addr) {
            return Err(at.field("address").error(format!(
                "\"{}\" is listed twice; each endpoint once",
                spec.address
            )));
        }
        seen.push(addr);
        let weight = spec.weight.unwrap_or(1);
        if weight == 0 {
            return Err(at
                .field("weight")
                .error("must be more than 0 (remove the endpoint to send it nothing)"));
        }
        if let Some(cluster) = &spec.cluster {
            if mode != ModeName::ClusterHeader {
                return Err(at
                    .field("cluster")
                    .error("applies to mode \"cluster_header\" only"));
            }
            if cluster.is_empty() || cluster.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                return Err(at.field("cluster").error(format!(
                    "expected an Envoy cluster name without spaces, got \"{cluster}\""
                )));
            }
        }
        endpoints.push(Endpoint {
            address: spec.address.clone(),
            weight,
            priority: spec.priority.unwrap_or(0),
            healthy: true,
        });
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// The production entry point.
    fn from_json(json: &str) -> Result<FilterConfig, ConfigError> {
        crate::config::load(json.as_bytes())
    }
    use crate::picker::{hash_key, Pick};
    use crate::rand::SeededRng;
    use alloc::vec;

    const MINIMAL: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;

    fn error(json: &str) -> ConfigError {
        from_json(json).unwrap_err()
    }

    /// `MINIMAL` with the first picker's fields replaced by `fields` (a JSON object body).
    fn with(fields: &str) -> String {
        let base = r#""name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}]"#;
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{base}}}")).unwrap();
        let extra: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{fields}}}")).unwrap();
        for (k, v) in extra {
            if v.is_null() {
                obj.remove(&k);
            } else {
                obj.insert(k, v);
            }
        }
        format!(r#"{{"pickers": [{}]}}"#, serde_json::Value::Object(obj))
    }

    #[test]
    fn the_minimal_configuration_works_as_written() {
        let config = from_json(MINIMAL).unwrap();
        let p = &config.pickers[0];
        assert_eq!(p.name, "users");
        assert_eq!(p.key, vec![Selector::Header("x-user".into())]);
        assert_eq!(p.algorithm, Algorithm::Ring(RingParams::default()));
        assert_eq!(p.options.panic_threshold.get(), 0.5);
        assert_eq!(p.options.balance_factor, None);
        assert_eq!(p.target.header(), "x-envoy-original-dst-host");
        assert_eq!(p.routes, None);
        assert_eq!(p.cookie, None);
        assert_eq!(
            p.endpoint_header, None,
            "the routing header holds the address"
        );
        assert_eq!(p.in_flight_key(), "keel/picker/users/in_flight");
        let EndpointSource::Static(eps) = &p.source else {
            panic!("static endpoints expected");
        };
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[1], Endpoint::new("127.0.0.1:18092"));
        let picker = p.static_picker().unwrap();
        let mut key = KeyHash::new();
        key.add(Some(b"alice"));
        let Pick::Host(i) = picker.pick_hash(key.finish().unwrap(), &[]) else {
            panic!("no host");
        };
        assert_eq!(
            p.target.value(&picker.endpoints()[i]),
            picker.endpoints()[i].address
        );
    }

    #[test]
    fn every_option_parses() {
        let c = from_json(&with(
            r#""key": ["header:X-User", "cookie:sid"], "algorithm": "maglev", "table_size": 251,
               "balance_factor": 1.25, "panic_threshold": 0.3, "routes": ["users"],
               "mode": "cluster_header", "cluster_header": "X-Keel-Cluster",
               "cookie": {"name": "sid", "ttl": "1h"}, "endpoints": [
                 {"address": "10.0.0.1:80", "weight": 2, "priority": 1, "cluster": "users-a"},
                 {"address": "[2001:db8::1]:80"}]"#,
        ))
        .unwrap();
        let p = &c.pickers[0];
        assert_eq!(
            p.key,
            vec![
                Selector::Header("x-user".into()),
                Selector::Cookie("sid".into())
            ]
        );
        assert_eq!(p.algorithm, Algorithm::Maglev(TableSize::new(251).unwrap()));
        assert_eq!(p.options.balance_factor, BalanceFactor::new(1.25));
        assert_eq!(p.options.panic_threshold.get(), 0.3);
        assert_eq!(p.routes, Some(vec!["users".to_string()]));
        assert_eq!(p.target.header(), "x-keel-cluster");
        assert_eq!(p.endpoint_header.as_deref(), Some("x-keel-endpoint"));
        let EndpointSource::Static(eps) = &p.source else {
            panic!("static endpoints expected");
        };
        assert_eq!((eps[0].weight, eps[0].priority), (2, 1));
        assert_eq!(p.target.value(&eps[0]), "users-a");
        assert_eq!(p.target.value(&eps[1]), "[2001:db8::1]:80");
        let cookie = p.cookie.as_ref().unwrap();
        let value = cookie.generate(&mut SeededRng::new(1));
        assert_eq!(value.len(), 16);
        assert_eq!(
            cookie.set_cookie(&value),
            format!("sid={value}; Max-Age=3600; Path=/; HttpOnly")
        );
        let session = StickyCookie {
            name: "sid".into(),
            ttl: Duration::from_secs(0),
        };
        assert_eq!(session.set_cookie("x"), "sid=x; Path=/; HttpOnly");

        let s = from_json(&with(
            r#""endpoints": null, "service": "users.v1", "ring_size": 64"#,
        ))
        .unwrap();
        assert_eq!(
            s.pickers[0].source,
            EndpointSource::Service("users.v1".into())
        );
        assert_eq!(
            s.pickers[0].static_picker().map(|p| p.endpoints().len()),
            None
        );
        assert_eq!(
            s.pickers[0].algorithm,
            Algorithm::Ring(RingParams {
                points_per_weight: 64,
                ..RingParams::default()
            })
        );
        for (name, algorithm) in [
            ("round_robin", Algorithm::RoundRobin),
            ("weighted", Algorithm::Weighted),
            ("least_request", Algorithm::LeastRequest),
        ] {
            let c = from_json(&with(&format!(r#""algorithm": "{name}", "key": null"#))).unwrap();
            assert_eq!(c.pickers[0].algorithm, algorithm);
            assert!(c.pickers[0].key.is_empty());
        }
        let b = from_json(&with(
            r#""breaker": {"name": "users-host", "half_open_probes": 2}"#,
        ))
        .unwrap();
        assert_eq!(
            b.pickers[0].breaker,
            Some(BreakerLink {
                name: "users-host".into(),
                half_open_probes: 2
            })
        );
        let o = from_json(&with(r#""hosts_header": "X-Keel-Hosts""#)).unwrap();
        assert_eq!(o.pickers[0].hosts_header.as_deref(), Some("x-keel-hosts"));
        assert!(
            o.pickers[0].hosts_property,
            "the host list is left on by default"
        );
        let o = from_json(&with(r#""hosts_property": false"#)).unwrap();
        assert!(!o.pickers[0].hosts_property);
        let h = from_json(&with(r#""header": "X-Dst", "endpoint_header": "X-Picked""#)).unwrap();
        assert_eq!(h.pickers[0].target.header(), "x-dst");
        assert_eq!(h.pickers[0].endpoint_header.as_deref(), Some("x-picked"));
    }

    #[test]
    fn peak_ewma_takes_its_durations_and_refuses_what_does_not_apply() {
        let plain = from_json(&with(r#""algorithm": "peak_ewma", "key": null"#)).unwrap();
        let p = &plain.pickers[0];
        assert_eq!(p.algorithm, Algorithm::PeakEwma(PeakEwmaParams::default()));
        assert!(p.key.is_empty());
        assert_eq!(
            p.latency_key("127.0.0.1:18091"),
            "keel/picker/users/latency/127.0.0.1:18091"
        );
        let tuned = from_json(&with(
            r#""algorithm": "peak_ewma", "key": null,
               "peak_ewma": {"decay": "2s", "default_rtt": "5ms"}"#,
        ))
        .unwrap();
        assert_eq!(
            tuned.pickers[0].algorithm,
            Algorithm::PeakEwma(PeakEwmaParams {
                decay: Duration::from_secs(2),
                default_rtt: Duration::from_millis(5),
            })
        );
        let half = from_json(&with(
            r#""algorithm": "peak_ewma", "key": null, "peak_ewma": {"default_rtt": "1ms"}"#,
        ))
        .unwrap();
        assert_eq!(
            half.pickers[0].algorithm,
            Algorithm::PeakEwma(PeakEwmaParams {
                default_rtt: Duration::from_millis(1),
                ..PeakEwmaParams::default()
            })
        );
        let cases: &[(&str, &str, &str)] = &[
            (
                r#""algorithm": "peak_ewma""#,
                "pickers[0].key",
                "the hashing algorithms",
            ),
            (
                r#""peak_ewma": {"decay": "1s"}"#,
                "pickers[0].peak_ewma",
                "algorithm \"peak_ewma\" only",
            ),
            (
                r#""algorithm": "peak_ewma", "key": null, "peak_ewma": {"decay": "0s"}"#,
                "pickers[0].peak_ewma.decay",
                "",
            ),
            (
                r#""algorithm": "peak_ewma", "key": null, "peak_ewma": {"default_rtt": "fast"}"#,
                "pickers[0].peak_ewma.default_rtt",
                "",
            ),
            (
                r#""algorithm": "peak_ewma", "key": null, "peak_ewma": {"decay": "1s", "alpha": 1}"#,
                "pickers[0].peak_ewma.alpha",
                "unknown field",
            ),
            (
                r#""algorithm": "peak_ewma", "key": null, "balance_factor": 1.5"#,
                "pickers[0].balance_factor",
                "",
            ),
        ];
        for (fields, path, text) in cases {
            let e = error(&with(fields));
            assert_eq!(e.path, *path, "{fields}: {e}");
            assert!(e.to_string().contains(text), "{fields}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_refused_with_their_path() {
        let bad_address = MINIMAL.replace("127.0.0.1:18092", "x");
        let e = error(&bad_address);
        assert_eq!(e.path, "pickers[0].endpoints[1].address");
        assert!(
            e.to_string()
                .starts_with(r#"pickers[0].endpoints[1].address: expected "ip:port", got "x""#),
            "{e}"
        );
        assert!(e.message.contains("host names are not resolved"), "{e}");
        let cases: &[(&str, &str)] = &[
            (
                r#""endpoints": [{"address": "users.local:80"}]"#,
                "pickers[0].endpoints[0].address",
            ),
            (
                r#""endpoints": [{"address": "10.0.0.1"}]"#,
                "pickers[0].endpoints[0].address",
            ),
            (
                r#""endpoints": [{"address": "10.0.0.1:0"}]"#,
                "pickers[0].endpoints[0].address",
            ),
            (
                r#""endpoints": [{"address": "::1:80"}]"#,
                "pickers[0].endpoints[0].address",
            ),
            (
                r#""endpoints": [{"address": "10.0.0.1:80"}, {"address": "10.0.0.1:80"}]"#,
                "pickers[0].endpoints[1].address",
            ),
            (
                r#""endpoints": [{"address": "10.0.0.1:80", "weight": 0}]"#,
                "pickers[0].endpoints[0].weight",
            ),
            (
                r#""endpoints": [{"address": "10.0.0.1:80", "cluster": "a"}]"#,
                "pickers[0].endpoints[0].cluster",
            ),
            (r#""endpoints": []"#, "pickers[0].endpoints"),
            (r#""breaker": {"name": "a b"}"#, "pickers[0].breaker.name"),
            (
                r#""hosts_header": "x-envoy-original-dst-host""#,
                "pickers[0].hosts_header",
            ),
            (r#""hosts_header": "a b""#, "pickers[0].hosts_header"),
            (
                r#""breaker": {"name": "h", "half_open_probes": 0}"#,
                "pickers[0].breaker.half_open_probes",
            ),
            (r#""service": "users""#, "pickers[0]"),
            (r#""endpoints": null"#, "pickers[0]"),
            (
                r#""endpoints": null, "service": "a b""#,
                "pickers[0].service",
            ),
            (r#""key": null"#, "pickers[0].key"),
            (r#""key": []"#, "pickers[0].key"),
            (r#""key": "body:x""#, "pickers[0].key"),
            (r#""key": ["header:a", "bad"]"#, "pickers[0].key[1]"),
            (r#""algorithm": "round_robin""#, "pickers[0].key"),
            (r#""ring_size": 0"#, "pickers[0].ring_size"),
            (r#""ring_size": 100000"#, "pickers[0].ring_size"),
            (r#""table_size": 65537"#, "pickers[0].table_size"),
            (
                r#""algorithm": "maglev", "table_size": 65536"#,
                "pickers[0].table_size",
            ),
            (
                r#""algorithm": "maglev", "table_size": 2"#,
                "pickers[0].table_size",
            ),
            (
                r#""algorithm": "maglev", "ring_size": 10"#,
                "pickers[0].ring_size",
            ),
            (r#""balance_factor": 0.9"#, "pickers[0].balance_factor"),
            (
                r#""algorithm": "weighted", "key": null, "balance_factor": 1.5"#,
                "pickers[0].balance_factor",
            ),
            (r#""panic_threshold": 1.5"#, "pickers[0].panic_threshold"),
            (r#""header": "bad header""#, "pickers[0].header"),
            (r#""cluster_header": "x-c""#, "pickers[0].cluster_header"),
            (r#""mode": "cluster_header""#, "pickers[0].cluster_header"),
            (
                r#""mode": "cluster_header", "cluster_header": "x-c", "header": "x-d""#,
                "pickers[0].header",
            ),
            (
                r#""cookie": {"name": "sid", "ttl": "1h"}"#,
                "pickers[0].cookie.name",
            ),
            (
                r#""key": "cookie:sid", "cookie": {"name": "sid", "ttl": "soon"}"#,
                "pickers[0].cookie.ttl",
            ),
            (r#""routes": [""]"#, "pickers[0].routes[0]"),
            (
                r#""endpoint_header": "x-envoy-original-dst-host""#,
                "pickers[0].endpoint_header",
            ),
            (r#""endpoint_header": "a b""#, "pickers[0].endpoint_header"),
            (r#""name": "a/b""#, "pickers[0].name"),
        ];
        for (fields, path) in cases {
            let e = error(&with(fields));
            assert_eq!(e.path, *path, "{fields}: {e}");
        }
        assert_eq!(error(r#"{"pickers": []}"#).path, "pickers");
        let two = format!(
            r#"{{"pickers": [{0}, {0}]}}"#,
            &MINIMAL[13..MINIMAL.len() - 2]
        );
        assert_eq!(error(&two).path, "pickers[1].name");
    }

    #[test]
    fn request_keys_combine_selectors_and_generate_the_sticky_cookie() {
        let c = from_json(&with(
            r#""key": ["header:x-user", "cookie:sid"], "cookie": {"name": "sid", "ttl": "10m"}"#,
        ))
        .unwrap();
        let p = &c.pickers[0];
        let mut rng = SeededRng::new(9);
        let both = p.request_key(
            |s| match s {
                Selector::Header(_) => Some(b"alice".to_vec()),
                Selector::Cookie(_) => Some(b"c1".to_vec()),
                _ => None,
            },
            &mut rng,
        );
        let mut expected = KeyHash::new();
        expected.add(Some(b"alice"));
        expected.add(Some(b"c1"));
        assert_eq!(
            both,
            RequestKey {
                hash: expected.finish(),
                set_cookie: None
            }
        );
        // No cookie yet: one is generated, used as the key part, and returned to be set.
        let fresh = p.request_key(|_| None::<&[u8]>, &mut rng);
        let set = fresh.set_cookie.unwrap();
        let value = set.strip_prefix("sid=").unwrap().split(';').next().unwrap();
        assert!(set.ends_with("; Max-Age=600; Path=/; HttpOnly"), "{set}");
        assert_eq!(fresh.hash, Some(hash_key(value.as_bytes())));
        // Without a cookie config an absent part is skipped, and no part means no key.
        let plain = from_json(MINIMAL).unwrap();
        assert_eq!(
            plain.pickers[0]
                .request_key(|_| None::<&[u8]>, &mut rng)
                .hash,
            None
        );
        // Values are bytes: a header that is not UTF-8 is still a key.
        let raw = plain.pickers[0].request_key(|_| Some([0xff_u8, 0xfe]), &mut rng);
        assert_eq!(raw.hash, Some(hash_key(&[0xff, 0xfe])));
    }

    #[test]
    fn serde_refuses_unknown_fields_and_names() {
        let unknown = MINIMAL.replace(r#""algorithm""#, r#""algoritm": 1, "algorithm""#);
        assert!(error(&unknown).message.contains("unknown field"));
        let bad_algorithm = MINIMAL.replace(r#""ring""#, r#""jump""#);
        let e = error(&bad_algorithm);
        assert_eq!(e.path, "pickers[0].algorithm");
        assert!(e.message.contains("expected \"ring\", \"maglev\""), "{e}");
        let bad_endpoint = MINIMAL.replace(
            r#"{"address": "127.0.0.1:18091"}"#,
            r#"{"address": "127.0.0.1:18091", "healthy": false}"#,
        );
        assert!(error(&bad_endpoint).message.contains("unknown field"));
        assert!(error(
            r#"{"pickers": [{"name": "a", "key": 5, "algorithm": "ring", "service": "s"}]}"#
        )
        .message
        .contains("key selector"));
        // The key hash of a single-header config is the plain hash of the header value.
        let mut k = KeyHash::new();
        k.add(Some(b"alice"));
        assert_eq!(k.finish(), Some(hash_key(b"alice")));
    }
}
