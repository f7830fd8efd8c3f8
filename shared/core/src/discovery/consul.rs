//! Consul's health API with blocking queries.
//!
//! The poller asks `GET /v1/health/service/<name>?passing&index=<i>&wait=<w>[&dc=<dc>]`.
//! `passing` makes Consul return only instances whose every check passes; an instance that
//! starts failing therefore leaves the answer and the set. The answer is a JSON array of
//! entries `{"Node": {...}, "Service": {...}, "Checks": [...]}`, of which these fields are read:
//!
//! - `Service.Address`, or `Node.Address` when it is empty (Consul's rule);
//! - `Service.Port`; `Service.Weights.Passing` (default 1), `Service.Weights.Warning` used
//!   instead when the worst check is `warning` (Consul's DNS rule);
//! - `Service.Tags`, `Service.Meta`; `Service.Meta.zone` and `Service.Meta.priority` give the
//!   zone and priority (Consul has no fields of its own for them);
//! - `Checks[].Status`: `passing`, `warning` or `critical` (maintenance shows as a critical
//!   check). The worst status decides: `critical` or anything unknown marks the instance
//!   unhealthy by the registry (known, no traffic). With `?passing` such entries do not
//!   normally appear; the rule matters for answers without it.
//!
//! Blocking queries ([`ConsulIndex`]): the answer's `X-Consul-Index` is echoed as `?index=` so
//! the next request waits up to `wait` (at most 10 min; Consul adds up to `wait / 16` of
//! jitter) for a change. Following Consul's guidance, the index is reset to 0 (a plain,
//! non-blocking read) when it goes backwards, and raised to 1 when the header says 0, which
//! would otherwise make every blocking request return at once. The refresh interval still
//! spaces requests, so a misbehaving server cannot make the poller busy-loop.

use alloc::format;
use alloc::string::String;

use serde_json::{Map, Value};

use super::policy::ConsulSource;
use super::registry::{
    priority_from, quote, Collector, ParseError, ParseLimits, RawEndpoint, RegistryAnswer,
    RegistryRequest, SkipReason,
};
use super::DiscoveredEndpoint;
use crate::time::Duration;

/// Extra time a callout is given beyond `wait` and Consul's `wait / 16` jitter.
pub const REQUEST_MARGIN: Duration = Duration::from_secs(5);

/// The blocking-query cursor: the last `X-Consul-Index` seen, 0 before the first answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsulIndex(pub u64);

impl ConsulIndex {
    /// The cursor after an answer whose `X-Consul-Index` header is `header` (`None` when
    /// absent). Returns the new cursor and whether the index moved (an unchanged index after a
    /// blocking wait means the wait timed out and the answer is the same as before).
    pub fn advance(self, header: Option<&str>) -> (ConsulIndex, bool) {
        let Some(new) = header.and_then(|h| h.trim().parse::<u64>().ok()) else {
            // No usable index: next time read without blocking.
            return (ConsulIndex(0), true);
        };
        if new < self.0 {
            return (ConsulIndex(0), true);
        }
        let new = new.max(1);
        (ConsulIndex(new), new != self.0)
    }
}

/// The path of the health query for `source` at cursor `index`.
pub fn health_path(source: &ConsulSource, index: ConsulIndex) -> String {
    // Names were checked at configuration time to need no percent-encoding.
    let mut path = format!("/v1/health/service/{}?passing", source.service);
    if index.0 > 0 {
        path.push_str(&format!("&index={}&wait={}", index.0, source.wait));
    }
    if let Some(dc) = &source.dc {
        path.push_str(&format!("&dc={dc}"));
    }
    path
}

/// The callout for `source` at cursor `index`, with a timeout that outlasts the blocking wait.
pub fn health_request(source: &ConsulSource, index: ConsulIndex) -> RegistryRequest {
    let timeout = if index.0 > 0 {
        source
            .wait
            .saturating_add(source.wait.div(16))
            .saturating_add(REQUEST_MARGIN)
    } else {
        REQUEST_MARGIN
    };
    RegistryRequest {
        cluster: source.cluster.clone(),
        method: "GET",
        path: health_path(source, index),
        authority: source.cluster.clone(),
        body: None,
        timeout,
    }
}

/// Worst check status first: the order in which they decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Passing,
    Warning,
    Critical,
}

fn worst_status(checks: Option<&Value>) -> Result<Status, SkipReason> {
    let checks = match checks {
        None | Some(Value::Null) => return Ok(Status::Passing),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(SkipReason::WrongType {
                field: "Checks",
                expected: "an array",
            })
        }
    };
    let mut worst = Status::Passing;
    for check in checks {
        let status = match check.get("Status").and_then(Value::as_str) {
            Some("passing") => Status::Passing,
            Some("warning") => Status::Warning,
            // "critical", and anything this code does not know, counts as failing.
            _ => Status::Critical,
        };
        worst = worst.max(status);
    }
    Ok(worst)
}

/// Parses a health answer. A body that is not a JSON array is an error; each invalid entry is
/// skipped with its reason.
pub fn parse_health_response(
    body: &[u8],
    limits: &ParseLimits,
) -> Result<RegistryAnswer, ParseError> {
    limits.check_size(body)?;
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson(format!("{e}")))?;
    let entries = doc
        .as_array()
        .ok_or(ParseError::Shape("the Consul answer is not a JSON array"))?;
    let mut collector = Collector::new(*limits);
    for (i, entry) in entries.iter().enumerate() {
        let label = || {
            let id = entry
                .get("Service")
                .and_then(|s| s.get("ID"))
                .and_then(Value::as_str);
            match id {
                Some(id) => format!("[{i}] {}", quote(id)),
                None => format!("[{i}]"),
            }
        };
        collector.push(label, parse_entry(entry));
    }
    collector.finish(None)
}

fn parse_entry(entry: &Value) -> Result<DiscoveredEndpoint, SkipReason> {
    let entry = entry.as_object().ok_or(SkipReason::NotAnObject)?;
    let service = match entry.get("Service") {
        Some(Value::Object(s)) => s,
        Some(Value::Null) | None => return Err(SkipReason::MissingField("Service")),
        Some(_) => return Err(SkipReason::NotAnObject),
    };
    let status = worst_status(entry.get("Checks"))?;
    let address = match service.get("Address") {
        Some(Value::String(a)) if !a.is_empty() => service.get("Address"),
        _ => entry.get("Node").and_then(|n| n.get("Address")),
    };
    let meta = service.get("Meta");
    let weights = service.get("Weights").and_then(Value::as_object);
    let weight = match status {
        Status::Warning => weight_field(weights, "Warning"),
        _ => weight_field(weights, "Passing"),
    };
    let priority = meta_priority(meta)?;
    let mut endpoint = RawEndpoint {
        address,
        port: service.get("Port"),
        weight: weight.as_ref(),
        priority: None,
        zone: meta.and_then(|m| m.get("zone")),
        meta,
        tags: service.get("Tags"),
        registry_healthy: status != Status::Critical,
    }
    .validate()?;
    endpoint.priority = priority;
    Ok(endpoint)
}

/// `Weights.<which>`, `None` when absent (the default of 1 applies).
fn weight_field(weights: Option<&Map<String, Value>>, which: &str) -> Option<Value> {
    weights
        .and_then(|w| w.get(which))
        .filter(|v| !v.is_null())
        .cloned()
}

/// `Service.Meta.priority`, a decimal string in Consul's string-only metadata.
fn meta_priority(meta: Option<&Value>) -> Result<u8, SkipReason> {
    match meta.and_then(|m| m.get("priority")).and_then(Value::as_str) {
        None => Ok(0),
        Some(text) => {
            let n = text.parse::<i128>().map_err(|_| SkipReason::WrongType {
                field: "priority",
                expected: "an integer",
            })?;
            priority_from(n)
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};
    use alloc::string::ToString;

    /// Shaped like Consul 1.x's answer for `/v1/health/service/users?passing`.
    const SAMPLE: &str = r#"[
      {"Node":{"ID":"40e4a748-2192-161a-0510-9bf59fe950b5","Node":"node-a","Address":"10.1.0.5",
               "Datacenter":"dc1","TaggedAddresses":{"lan":"10.1.0.5","wan":"10.1.0.5"},
               "Meta":{"consul-network-segment":""},"CreateIndex":12,"ModifyIndex":14},
       "Service":{"ID":"users-1","Service":"users","Tags":["primary","v2"],"Address":"10.1.0.10",
                  "TaggedAddresses":{"lan_ipv4":{"Address":"10.1.0.10","Port":8080}},
                  "Meta":{"version":"2.4.1","zone":"eu-1a"},"Port":8080,
                  "Weights":{"Passing":10,"Warning":1},"EnableTagOverride":false,
                  "Proxy":{"MeshGateway":{},"Expose":{}},"Connect":{},
                  "CreateIndex":15,"ModifyIndex":15},
       "Checks":[{"Node":"node-a","CheckID":"serfHealth","Name":"Serf Health Status",
                  "Status":"passing","Notes":"","Output":"Agent alive and reachable",
                  "ServiceID":"","ServiceName":"","ServiceTags":[],"Type":"",
                  "CreateIndex":12,"ModifyIndex":12},
                 {"Node":"node-a","CheckID":"service:users-1","Name":"Service 'users' check",
                  "Status":"passing","Notes":"","Output":"HTTP GET http://10.1.0.10:8080/healthz: 200 OK",
                  "ServiceID":"users-1","ServiceName":"users","ServiceTags":["primary","v2"],
                  "Type":"http","CreateIndex":15,"ModifyIndex":16}]},
      {"Node":{"ID":"b1f0c7e2-0000-4000-8000-000000000002","Node":"node-b","Address":"10.1.0.6",
               "Datacenter":"dc1","TaggedAddresses":null,"Meta":null,"CreateIndex":13,"ModifyIndex":13},
       "Service":{"ID":"users-2","Service":"users","Tags":null,"Address":"","Meta":null,
                  "Port":8081,"Weights":{"Passing":1,"Warning":1},"EnableTagOverride":false,
                  "CreateIndex":17,"ModifyIndex":17},
       "Checks":[{"Node":"node-b","CheckID":"serfHealth","Status":"passing","Output":""}]}
    ]"#;

    fn limits() -> ParseLimits {
        ParseLimits::for_endpoints(1024)
    }

    fn source(dc: Option<&str>) -> ConsulSource {
        ConsulSource {
            cluster: "consul".into(),
            service: "users".into(),
            wait: Duration::from_secs(30),
            dc: dc.map(Into::into),
        }
    }

    #[test]
    fn builds_blocking_query_paths() {
        let s = source(None);
        assert_eq!(
            health_path(&s, ConsulIndex(0)),
            "/v1/health/service/users?passing"
        );
        assert_eq!(
            health_path(&source(Some("dc2")), ConsulIndex(42)),
            "/v1/health/service/users?passing&index=42&wait=30s&dc=dc2"
        );
        let blocking = health_request(&s, ConsulIndex(42));
        assert_eq!(blocking.method, "GET");
        // 30 s wait + 1.875 s of Consul's jitter + 5 s margin.
        assert_eq!(blocking.timeout, Duration::from_millis(36_875));
        assert_eq!(health_request(&s, ConsulIndex(0)).timeout, REQUEST_MARGIN);
    }

    #[test]
    fn index_follows_consuls_rules() {
        let start = ConsulIndex(0);
        let (i, moved) = start.advance(Some("120"));
        assert_eq!((i, moved), (ConsulIndex(120), true));
        // A blocking wait that timed out: same index, nothing changed.
        assert_eq!(i.advance(Some("120")), (ConsulIndex(120), false));
        assert_eq!(i.advance(Some("130")), (ConsulIndex(130), true));
        // Backwards (e.g. a server restored from a snapshot): reset to a plain read.
        assert_eq!(i.advance(Some("7")), (ConsulIndex(0), true));
        // Zero would make every blocking query return at once.
        assert_eq!(start.advance(Some("0")), (ConsulIndex(1), true));
        assert_eq!(i.advance(None), (ConsulIndex(0), true));
        assert_eq!(i.advance(Some("x")), (ConsulIndex(0), true));
    }

    #[test]
    fn parses_a_real_shaped_answer() {
        let answer = parse_health_response(SAMPLE.as_bytes(), &limits()).unwrap();
        assert!(answer.skipped.is_empty(), "{:?}", answer.skipped);
        assert_eq!(answer.endpoints.len(), 2);
        let a = &answer.endpoints[0];
        assert_eq!(a.address_text(), "10.1.0.10:8080");
        assert_eq!((a.weight, a.zone.as_str()), (10, "eu-1a"));
        assert_eq!(a.tags, ["primary", "v2"]);
        assert!(a.registry_healthy);
        // An empty Service.Address means the node's address.
        let b = &answer.endpoints[1];
        assert_eq!(b.address_text(), "10.1.0.6:8081");
        assert_eq!(b.weight, 1);
        assert!(b.tags.is_empty() && b.meta.is_empty());
        assert_eq!(answer.revision, None);
        assert!(parse_health_response(b"[]", &limits())
            .unwrap()
            .endpoints
            .is_empty());
    }

    #[test]
    fn checks_decide_registry_health_and_weight() {
        let entry = |status: &str| {
            format!(
                r#"[{{"Node":{{"Address":"10.0.0.1"}},"Service":{{"ID":"u","Address":"10.0.0.2","Port":80,
                    "Weights":{{"Passing":5,"Warning":2}}}},"Checks":[{{"Status":"passing"}},{{"Status":"{status}"}}]}}]"#
            )
        };
        let parse = |s: &str| parse_health_response(entry(s).as_bytes(), &limits()).unwrap();
        let passing = parse("passing");
        assert!(passing.endpoints[0].registry_healthy);
        assert_eq!(passing.endpoints[0].weight, 5);
        let warning = parse("warning");
        assert!(warning.endpoints[0].registry_healthy);
        assert_eq!(warning.endpoints[0].weight, 2);
        assert!(!parse("critical").endpoints[0].registry_healthy);
        assert!(!parse("maintenance?").endpoints[0].registry_healthy);
    }

    #[test]
    fn skips_hostile_entries_with_reasons() {
        let body = r#"[
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"ok","Address":"","Port":80}},
          {"Node":{"Address":"node-a.consul"},"Service":{"ID":"hostname","Address":"","Port":80}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"inject","Address":"10.0.0.3\r\nx: y","Port":80}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"port0","Address":"10.0.0.4","Port":0}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"w0","Address":"10.0.0.5","Port":80,"Weights":{"Passing":0}}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"prio","Address":"10.0.0.6","Port":80,"Meta":{"priority":"high"}}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"tags","Address":"10.0.0.7","Port":80,"Tags":"a,b"}},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"checks","Address":"10.0.0.8","Port":80},"Checks":{}},
          {"Node":{"Address":"10.0.0.1"}},
          {"Node":{"Address":"10.0.0.1"},"Service":"users"},
          42
        ]"#;
        let answer = parse_health_response(body.as_bytes(), &limits()).unwrap();
        assert_eq!(answer.endpoints.len(), 1);
        let reason = |id: &str| {
            answer
                .skipped
                .iter()
                .find(|s| s.entry.contains(id))
                .map(|s| s.reason.clone())
                .unwrap()
        };
        assert!(matches!(reason("hostname"), SkipReason::Hostname(_)));
        assert_eq!(reason("inject"), SkipReason::UnsafeCharacters("address"));
        assert!(matches!(
            reason("port0"),
            SkipReason::OutOfRange { field: "port", .. }
        ));
        assert!(matches!(
            reason("w0"),
            SkipReason::OutOfRange {
                field: "weight",
                ..
            }
        ));
        assert!(matches!(
            reason("prio"),
            SkipReason::WrongType {
                field: "priority",
                ..
            }
        ));
        assert!(matches!(
            reason("tags"),
            SkipReason::WrongType { field: "tags", .. }
        ));
        assert!(matches!(
            reason("checks"),
            SkipReason::WrongType {
                field: "Checks",
                ..
            }
        ));
        assert_eq!(reason("[8]"), SkipReason::MissingField("Service"));
        assert_eq!(reason("[9]"), SkipReason::NotAnObject);
        assert_eq!(reason("[10]"), SkipReason::NotAnObject);
    }

    #[test]
    fn refuses_documents_that_are_not_consuls() {
        for body in [
            &b""[..],
            b"{}",
            b"null",
            b"No cluster leader",
            b"[{\"Service\":",
        ] {
            assert!(parse_health_response(body, &limits()).is_err(), "{body:?}");
        }
    }

    #[test]
    fn truncated_and_random_bodies_never_panic() {
        let bytes = SAMPLE.as_bytes();
        for len in 0..bytes.len() {
            let result = parse_health_response(&bytes[..len], &limits());
            // A prefix that ends right after a complete array is only possible at full
            // length, so every truncation is an error.
            assert!(result.is_err(), "length {len}");
        }
        let mut rng = SeededRng::new(0xc0_45);
        for round in 0..400 {
            let mut noisy = bytes.to_vec();
            if round % 2 == 0 {
                for _ in 0..4 {
                    let i = rng.below(noisy.len() as u64) as usize;
                    noisy[i] = rng.next_u64() as u8;
                }
            } else {
                let n = rng.below(200) as usize;
                noisy = (0..n).map(|_| rng.next_u64() as u8).collect();
            }
            match parse_health_response(&noisy, &limits()) {
                Ok(answer) => assert!(answer.endpoints.len() <= 2),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}
