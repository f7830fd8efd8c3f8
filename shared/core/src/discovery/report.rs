//! What an operator sees of the published sets: counts for the metrics and a JSON document for
//! the glue's `admin_path`.
//!
//! Shared data is not visible in Envoy's admin interface, so without this an operator could
//! only infer the set from gauges. The document lists, per service, the version, how fresh the
//! data is and how old, and every endpoint with each of its health inputs (registry, active
//! checks, passive ejection), so "why does this host get no traffic" has an answer. It is built
//! by serde_json from values that were validated when they entered the set (IP literals, zones
//! without control characters), so nothing in it can break out of its JSON strings.
//!
//! ```json
//! {"services":[{"name":"users","published":true,"version":1735689600100000001,
//!   "freshness":"fresh","data_age_ms":120,"endpoints_known":3,"endpoints_healthy":2,
//!   "endpoints_ejected":0,"endpoints_routable":2,
//!   "endpoints":[{"address":"127.0.0.1:18091","weight":1,"priority":0,"zone":"",
//!                 "registry_healthy":true,"check_healthy":true,"ejected_for_ms":null,
//!                 "ejections":0,"routable":true}]}]}
//! ```

use alloc::string::String;
use alloc::vec::Vec;

use serde::Serialize;

use super::endpoints::EndpointSet;
use super::staleness::Freshness;
use crate::time::Instant;

/// How many endpoints of a set are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetCounts {
    /// Every endpoint the registry lists.
    pub known: usize,
    /// Healthy by the registry and the active checks (ejected or not).
    pub healthy: usize,
    /// Passively ejected now.
    pub ejected: usize,
    /// Healthy and not ejected: those that get traffic outside panic mode.
    pub routable: usize,
}

impl EndpointSet {
    /// The counts the glue's gauges show.
    pub fn counts(&self) -> SetCounts {
        let mut counts = SetCounts {
            known: self.endpoints.len(),
            ..SetCounts::default()
        };
        for r in &self.endpoints {
            counts.healthy += usize::from(r.healthy());
            counts.ejected += usize::from(r.ejected_until.is_some());
            counts.routable += usize::from(r.routable());
        }
        counts
    }
}

/// The name of a freshness in the document and in logs.
pub fn freshness_name(freshness: Freshness) -> &'static str {
    match freshness {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "stale",
        Freshness::Expired => "expired",
    }
}

#[derive(Serialize)]
struct Document<'a> {
    services: Vec<ServiceReport<'a>>,
}

#[derive(Serialize)]
struct ServiceReport<'a> {
    name: &'a str,
    published: bool,
    version: Option<u64>,
    freshness: Option<&'static str>,
    data_age_ms: Option<u64>,
    endpoints_known: usize,
    endpoints_healthy: usize,
    endpoints_ejected: usize,
    endpoints_routable: usize,
    endpoints: Vec<EndpointReport<'a>>,
}

#[derive(Serialize)]
struct EndpointReport<'a> {
    address: &'a str,
    weight: u32,
    priority: u8,
    zone: &'a str,
    registry_healthy: bool,
    check_healthy: bool,
    ejected_for_ms: Option<u64>,
    ejections: u32,
    routable: bool,
}

/// The JSON document for `services` (name and published set, `None` when nothing is
/// published yet) at `now`.
pub fn status_json(services: &[(&str, Option<&EndpointSet>)], now: Instant) -> String {
    let services = services
        .iter()
        .map(|(name, set)| match set {
            None => ServiceReport {
                name,
                published: false,
                version: None,
                freshness: None,
                data_age_ms: None,
                endpoints_known: 0,
                endpoints_healthy: 0,
                endpoints_ejected: 0,
                endpoints_routable: 0,
                endpoints: Vec::new(),
            },
            Some(set) => {
                let counts = set.counts();
                ServiceReport {
                    name,
                    published: true,
                    version: Some(set.version),
                    freshness: Some(freshness_name(set.freshness)),
                    data_age_ms: set
                        .refreshed_at
                        .map(|at| now.saturating_since(at).as_millis()),
                    endpoints_known: counts.known,
                    endpoints_healthy: counts.healthy,
                    endpoints_ejected: counts.ejected,
                    endpoints_routable: counts.routable,
                    endpoints: set
                        .endpoints
                        .iter()
                        .map(|r| EndpointReport {
                            address: &r.address,
                            weight: r.weight,
                            priority: r.priority,
                            zone: &r.zone,
                            registry_healthy: r.registry_healthy,
                            check_healthy: r.check_healthy,
                            ejected_for_ms: r
                                .ejected_until
                                .map(|until| until.saturating_since(now).as_millis()),
                            ejections: r.ejections,
                            routable: r.routable(),
                        })
                        .collect(),
                }
            }
        })
        .collect();
    // Serializing plain structs of strings, numbers and booleans cannot fail; an empty object
    // would still be valid JSON for the caller.
    serde_json::to_string(&Document { services }).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::discovery::policy::PassivePolicy;
    use crate::discovery::registry::DiscoveredEndpoint;
    use core::net::{IpAddr, SocketAddr};
    use serde_json::Value;

    fn t(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn ep(last: u8, zone: &str) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            address: SocketAddr::new(IpAddr::from([10, 0, 0, last]), 80),
            weight: 2,
            priority: 1,
            zone: zone.into(),
            registry_healthy: true,
            meta: Vec::new(),
            tags: Vec::new(),
        }
    }

    #[test]
    fn counts_and_document() {
        let mut set = EndpointSet::new(t(0));
        set.merge(&[ep(1, "eu-1a"), ep(2, ""), ep(3, "")], t(1000), true);
        set.set_check_health("10.0.0.1:80", true, t(1000));
        set.set_check_health("10.0.0.2:80", true, t(1000));
        let policy = PassivePolicy {
            max_ejection_percent: 100,
            ..PassivePolicy::default()
        };
        set.eject("10.0.0.2:80", t(2000), &policy);
        assert_eq!(
            set.counts(),
            SetCounts {
                known: 3,
                healthy: 2,
                ejected: 1,
                routable: 1
            }
        );
        let text = status_json(&[("users", Some(&set)), ("orders", None)], t(3500));
        let doc: Value = serde_json::from_str(&text).unwrap();
        let users = &doc["services"][0];
        assert_eq!(users["name"], "users");
        assert_eq!(users["published"], true);
        assert_eq!(users["version"], set.version);
        assert_eq!(users["freshness"], "fresh");
        assert_eq!(users["data_age_ms"], 2500);
        assert_eq!(users["endpoints_routable"], 1);
        let one = &users["endpoints"][0];
        assert_eq!(one["address"], "10.0.0.1:80");
        assert_eq!(one["zone"], "eu-1a");
        assert_eq!(
            (one["weight"].as_u64(), one["priority"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(one["routable"], true);
        let two = &users["endpoints"][1];
        assert_eq!(two["ejected_for_ms"], 28_500);
        assert_eq!(two["ejections"], 1);
        assert_eq!(two["routable"], false);
        let three = &users["endpoints"][2];
        assert_eq!(three["check_healthy"], false);
        assert_eq!(three["ejected_for_ms"], Value::Null);
        let orders = &doc["services"][1];
        assert_eq!(orders["published"], false);
        assert_eq!(orders["endpoints"].as_array().map(Vec::len), Some(0));
        assert_eq!(freshness_name(Freshness::Expired), "expired");
    }
}
