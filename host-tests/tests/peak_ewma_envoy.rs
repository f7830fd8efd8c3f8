//! Latency-aware balancing in a real Envoy (`--concurrency 2`): three real upstreams on
//! loopback, one answering 50 ms late. Keel's `peak_ewma` picker keeps nine requests in ten
//! off the slow one; the same load through Keel's `least_request` and through Envoy's own
//! `LEAST_REQUEST` cluster is measured and printed beside it, for comparison only (those two
//! balance on requests in flight, which a 50 ms delay moves only a little at this load).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request};
use keel_host_tests::upstream::{Mode, Upstream};

const PORTS: [u16; 3] = [18091, 18092, 18093];
/// Requests in flight at once, from the test's client over both Envoy workers: one at a time
/// (no balancer sees a load), and four.
const CONCURRENCIES: [usize; 2] = [1, 4];
/// Requests before the measured ones: every endpoint measured a few times.
const WARM_UP: usize = 60;
/// Requests measured per balancer.
const MEASURED: usize = 600;
/// A bound on each load, whatever the balancer does.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

fn upstreams() -> Vec<Upstream> {
    ["a", "b", "c"]
        .iter()
        .map(|n| Upstream::start(n).unwrap())
        .collect()
}

fn remap(mut config: EnvoyConfig, ups: &[Upstream]) -> EnvoyConfig {
    for (fixed, up) in PORTS.iter().zip(ups) {
        config = config.port(*fixed, up.port());
    }
    config
}

/// `envoy/picker.yaml` with the picker's algorithm replaced by the keyless `algorithm`.
fn keel(ups: &[Upstream], algorithm: &str) -> Envoy {
    remap(EnvoyConfig::from_file("envoy/picker.yaml").unwrap(), ups)
        .replace(
            r#""key": "header:x-user", "algorithm": "ring""#,
            &format!(r#""algorithm": "{algorithm}""#),
        )
        .concurrency(2)
        .start()
        .unwrap()
}

/// No Keel filter: a static cluster of the three upstreams with Envoy's `LEAST_REQUEST`.
fn envoy_least_request(ups: &[Upstream]) -> Envoy {
    let endpoints: String = PORTS
        .iter()
        .map(|p| {
            format!(
                "\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}"
            )
        })
        .collect();
    let yaml = format!(
        r#"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 9901 }}
static_resources:
  listeners:
  - name: main
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 10000 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: users }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: users
    connect_timeout: 1s
    type: STATIC
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: users
      endpoints:
      - lb_endpoints:{endpoints}
"#
    );
    remap(EnvoyConfig::from_yaml("least_request cluster", &yaml), ups)
        .concurrency(2)
        .start()
        .unwrap()
}

/// Sends `n` requests, `concurrency` at a time, within `LOAD_DEADLINE`; the requests each
/// upstream answered, by name.
fn load(envoy: &Envoy, n: usize, concurrency: usize) -> BTreeMap<String, usize> {
    let requests = (0..n).map(|_| Request::get("/users"));
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for r in envoy
        .client()
        .send_all_within(requests, concurrency, LOAD_DEADLINE)
    {
        let r = r.expect("every request gets an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        let name = r.header("x-upstream").expect("an upstream answered");
        *answered.entry(name.to_string()).or_default() += 1;
    }
    answered
}

/// The share of `counts` that went to `name`.
fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

/// Warms up, then measures: the share of the measured requests that went to `slow`.
fn slow_share(
    label: &str,
    envoy: &Envoy,
    slow: &str,
    concurrency: usize,
) -> (f64, BTreeMap<String, usize>) {
    load(envoy, WARM_UP, concurrency);
    let counts = load(envoy, MEASURED, concurrency);
    let s = share(&counts, slow);
    eprintln!(
        "{label}, {concurrency} in flight: {:.1} % of {MEASURED} requests to the slow upstream \
         {slow} ({counts:?})",
        100.0 * s
    );
    (s, counts)
}

#[test]
fn peak_ewma_keeps_nine_in_ten_requests_off_a_slow_upstream() {
    let ups = upstreams();
    let slow = ups[2].name().to_string();
    ups[2].set_mode(Mode::Delay(Duration::from_millis(50)));

    let envoy = keel(&ups, "peak_ewma");
    assert!(envoy
        .log()
        .contains("keel picker: configured pickers: users (peak_ewma, 3 static endpoints)"));
    for concurrency in CONCURRENCIES {
        let (peak, counts) = slow_share("keel peak_ewma", &envoy, &slow, concurrency);
        assert!(peak <= 0.10, "the slow upstream got {counts:?}");
        // Both fast upstreams share the rest (two choices between near-equal costs).
        for fast in &ups[..2] {
            assert!(share(&counts, fast.name()) > 0.2, "{counts:?}");
        }
    }
    assert_eq!(
        envoy
            .counter("wasmcustom.keel.picker.users.shared_data_errors")
            .unwrap(),
        0
    );
    drop(envoy);

    // The same load through the in-flight balancers, printed for comparison.
    let envoy = keel(&ups, "least_request");
    for concurrency in CONCURRENCIES {
        slow_share("keel least_request", &envoy, &slow, concurrency);
    }
    drop(envoy);
    let envoy = envoy_least_request(&ups);
    for concurrency in CONCURRENCIES {
        slow_share("envoy LEAST_REQUEST", &envoy, &slow, concurrency);
    }
}
