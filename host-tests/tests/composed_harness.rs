//! The composed scenario in Keel's wasmtime host: the filter configurations of
//! `envoy/composed.yaml`, read from the file, loaded into one host (vm_id `keel`, two workers
//! per filter), a virtual clock, etcd and the endpoints' health checks played by
//! `harness::ScriptedEtcd`.
//! A request of a route passes the filters of that route in the order of `http_filters`, each
//! in its own VM, as Envoy chains them; the test plays the router (it reads the picked
//! `x-envoy-original-dst-host` and answers for that upstream).
//!
//! Covered here without Envoy: every configuration loads; /users/ requests follow the set
//! discovery publishes from "etcd"; a failing upstream opens its per-host breaker and, once its
//! health checks fail, the picker moves only its keys; a burst on one /api/ key is refused with
//! 429 and Retry-After; a fourth registered instance takes only keys that move to it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keel_host_tests::harness::{request, response, HeaderList, Host, HttpStream, ScriptedEtcd, Vm};
use keel_host_tests::repo_root;
use serde_norway::Value;

const DST: &str = "x-envoy-original-dst-host";
const H: [&str; 4] = [
    "127.0.0.1:18091",
    "127.0.0.1:18092",
    "127.0.0.1:18093",
    "127.0.0.1:18094",
];

/// `(filter name, root_id, configuration)` of every Keel filter in envoy/composed.yaml, in
/// chain order.
fn composed_filters() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_root().join("envoy/composed.yaml")).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let hcm =
        &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|f| f["name"].as_str().unwrap().starts_with("keel."))
        .map(|f| {
            let config = &f["typed_config"]["config"];
            (
                f["name"].as_str().unwrap().to_string(),
                config["root_id"].as_str().unwrap().to_string(),
                config["configuration"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

struct Composed {
    host: Host,
    /// etcd and the health endpoints.
    registry: Arc<ScriptedEtcd>,
    /// Per filter (chain order): its name and its two workers.
    filters: Vec<(String, Vec<Vm>)>,
    /// Upstreams answering 500.
    failing: BTreeSet<String>,
}

impl Composed {
    fn start() -> Composed {
        let host = Host::new();
        let registry = ScriptedEtcd::install(&host, &H[..3]);
        let mut filters = Vec::new();
        for (name, root_id, config) in composed_filters() {
            let vms = host
                .vm(&root_id)
                .root_id(&root_id)
                .vm_id("keel")
                .config(config.as_str())
                .start_workers(2)
                .unwrap_or_else(|e| panic!("{name} loads (make build): {e}"));
            for vm in &vms {
                assert!(
                    vm.configured(),
                    "{name} refused its configuration: {:?}",
                    vm.logs()
                );
            }
            filters.push((name, vms));
        }
        let names: Vec<&str> = filters.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "keel.rate_limit",
                "keel.discovery",
                "keel.picker",
                "keel.retry",
                "keel.circuit_breaker"
            ]
        );
        Composed {
            host,
            registry,
            filters,
            failing: BTreeSet::new(),
        }
    }

    /// The Keel filters a route runs (the `typed_per_filter_config` of envoy/composed.yaml).
    fn chain(route: &str) -> &'static [&'static str] {
        match route {
            "api" => &["keel.rate_limit", "keel.retry", "keel.circuit_breaker"],
            "users" => &[
                "keel.discovery",
                "keel.picker",
                "keel.retry",
                "keel.circuit_breaker",
            ],
            _ => &[],
        }
    }

    /// One request through the route's chain on worker `w`: the status the client gets and the
    /// upstream that answered (none for a local reply). Retries are not played (the retry
    /// filter's callouts are answered by the responder as connect failures and not asserted on).
    fn send(
        &self,
        w: usize,
        route: &str,
        path: &str,
        header: (&str, &str),
    ) -> (u32, Option<String>) {
        let chain: Vec<&Vm> = Composed::chain(route)
            .iter()
            .map(|name| &self.filters.iter().find(|(n, _)| n == name).unwrap().1[w])
            .collect();
        let mut current: HeaderList = request("GET", path).with(header.0, header.1);
        let mut streams: Vec<HttpStream> = Vec::new();
        for vm in chain {
            let stream = vm.http_stream();
            stream.set_property("xds.route_name", route);
            stream.set_property(
                "xds.cluster_name",
                if route == "api" { "pool" } else { "picked" },
            );
            stream.request_headers(current.clone(), true);
            if let Some(reply) = stream.local_reply() {
                for s in streams.iter().chain([&stream]) {
                    s.finish();
                }
                return (reply.status, None);
            }
            current = stream.request_header_list().into();
            streams.push(stream);
        }
        // The router: the picked host, or the pool's first host for /api/.
        let upstream = streams
            .iter()
            .find_map(|s| s.request_header(DST))
            .unwrap_or_else(|| H[0].to_string());
        let status = if self.failing.contains(&upstream) {
            500
        } else {
            200
        };
        for s in streams.iter().rev() {
            s.set_property("upstream.address", upstream.as_str());
            s.set_property("response.code", u64::from(status));
            s.response_headers(response(status), true);
        }
        for s in &streams {
            s.finish();
        }
        (status, Some(upstream))
    }

    fn pick_all(&self, keys: &[String]) -> Vec<String> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                let (status, upstream) =
                    self.send(i % 2, "users", &format!("/users/{k}"), ("x-user", k));
                assert_eq!(status, 200, "{k}");
                upstream.unwrap()
            })
            .collect()
    }

    fn routable(&self) -> usize {
        self.host
            .gauge("keel.discovery.users.endpoints_routable")
            .max(0) as usize
    }
}

#[test]
fn the_composed_configs_load_and_play_the_demo_phases() {
    let mut c = Composed::start();
    c.host.advance(Duration::from_secs(3));
    assert_eq!(
        c.routable(),
        3,
        "discovery published the three registered endpoints"
    );

    // Steady: every key picked, spread over the three, every request 200.
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let steady = c.pick_all(&keys);
    let spread: BTreeSet<&String> = steady.iter().collect();
    assert_eq!(spread.len(), 3);

    // One upstream fails: its per-host breaker opens; once its checks fail, only its keys move.
    // (The breaker's window is 1 s: let the steady calls age out of it first.)
    c.host.advance(Duration::from_millis(1500));
    let failing = H[1].to_string();
    c.failing.insert(failing.clone());
    c.registry.set_healthy(&failing, false);
    let mut statuses = Vec::new();
    for (i, k) in keys.iter().enumerate().take(60) {
        statuses.push(
            c.send(i % 2, "users", &format!("/users/{k}"), ("x-user", k))
                .0,
        );
    }
    assert!(
        c.host.counter("keel.circuit_breaker.users-host.opened") >= 1,
        "the per-host breaker opened"
    );
    c.host.advance(Duration::from_secs(3));
    assert_eq!(c.routable(), 2);
    let moved = c.pick_all(&keys);
    for ((k, was), now) in keys.iter().zip(&steady).zip(&moved) {
        assert_ne!(now, &failing, "{k}");
        if was != &failing {
            assert_eq!(now, was, "{k} moved although its upstream is healthy");
        }
    }
    c.failing.clear();
    c.registry.set_healthy(&failing, true);
    c.host.advance(Duration::from_secs(5));
    assert_eq!(c.routable(), 3);

    // A burst on one API key: the bucket of 20, then 429 with Retry-After.
    let mut limited = 0;
    for i in 0..60 {
        let w = i % 2;
        let vm = &c.filters[0].1[w];
        let stream = vm.http_stream();
        stream.set_property("xds.route_name", "api");
        stream.request_headers(
            request("GET", "/api/orders").with("x-api-key", "mallory"),
            true,
        );
        if let Some(reply) = stream.local_reply() {
            assert_eq!(reply.status, 429);
            assert!(reply.header("retry-after").is_some());
            limited += 1;
        }
        stream.finish();
    }
    assert_eq!(
        limited, 40,
        "20 allowed from a full bucket, the clock standing still"
    );

    // A fourth instance registers: only keys that move to it move.
    let before = c.pick_all(&keys);
    c.registry.set_hosts(&H);
    c.host.advance(Duration::from_secs(3));
    assert_eq!(c.routable(), 4);
    let after = c.pick_all(&keys);
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| after[i] != before[i]).collect();
    assert!(moved.iter().all(|&i| after[i] == H[3]));
    let share = moved.len() as f64 / keys.len() as f64;
    assert!((0.15..=0.35).contains(&share), "{share}");
    for (_, vms) in &c.filters {
        for vm in vms {
            assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
        }
    }
}
