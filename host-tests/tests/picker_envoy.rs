//! The picker in a real Envoy (`--concurrency 2`) in front of three real upstreams that name
//! themselves (`x-upstream: <name>`): `envoy/picker.yaml` as written, then composed with the
//! discovery filter for health and priority failover.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_core::picker::{hash_key, Pick};
use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::{Mode, Upstream};

/// The picker's configuration through the production entry point.
fn from_json(
    json: &str,
) -> Result<keel_core::picker::policy::FilterConfig, keel_core::config::ConfigError> {
    keel_core::config::load(json.as_bytes())
}

const MINIMAL: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;
const PORTS: [u16; 3] = [18091, 18092, 18093];

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

/// Sends one request per key (in order) and returns the upstream name that answered each.
fn answered_by(envoy: &Envoy, keys: &[String], concurrency: usize) -> Vec<String> {
    let requests = keys
        .iter()
        .map(|k| Request::get("/users").header("x-user", k));
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| {
            let r: Response = r.expect("every request gets an answer");
            assert_eq!(r.status, 200, "{}", r.text());
            let name = r
                .header("x-upstream")
                .expect("an upstream answered")
                .to_string();
            assert_eq!(r.text(), name);
            name
        })
        .collect()
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n.clone()).or_default() += 1;
    }
    t
}

#[test]
fn the_minimal_config_sticks_every_key_and_spreads_keys_as_the_core_does() {
    let ups = upstreams();
    let envoy = remap(EnvoyConfig::from_file("envoy/picker.yaml").unwrap(), &ups)
        .concurrency(2)
        .start()
        .unwrap();
    assert!(envoy
        .log()
        .contains("keel picker: configured pickers: users (ring, 3 static endpoints)"));

    // The core's picker over the same addresses: what every worker must pick.
    let mut config = MINIMAL.to_string();
    for (fixed, up) in PORTS.iter().zip(&ups) {
        config = config.replace(&format!(":{fixed}\""), &format!(":{}\"", up.port()));
    }
    let native = from_json(&config).unwrap().pickers[0]
        .static_picker()
        .unwrap();
    let name_of = |address: &str| {
        ups.iter()
            .find(|u| u.addr().to_string() == address)
            .map(|u| u.name().to_string())
            .unwrap()
    };
    let expected = |key: &str| match native.pick_hash(hash_key(key.as_bytes()), &[]) {
        Pick::Host(i) => name_of(&native.endpoints()[i].address),
        Pick::NoHost => panic!("no host"),
    };

    // 1000 requests over 50 keys, 8 at a time over both workers: each key always lands on the
    // same upstream, the one the core picks.
    let sticky: Vec<String> = keys("sticky", 50).into_iter().cycle().take(1000).collect();
    let got = answered_by(&envoy, &sticky, 8);
    let mut homes: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (k, up) in sticky.iter().zip(&got) {
        homes.entry(k).or_default().insert(up);
    }
    for (k, ups_seen) in &homes {
        assert_eq!(ups_seen.len(), 1, "{k} went to {ups_seen:?}");
        assert_eq!(ups_seen.first().copied(), Some(expected(k).as_str()), "{k}");
    }

    // 1000 distinct keys: exactly the core's spread, and each upstream between 25 % and 42 %
    // (a 3-endpoint ring of 512 points each, sampled by 1000 keys).
    let distinct = keys("user", 1000);
    let got = tally(&answered_by(&envoy, &distinct, 8));
    let want = tally(&distinct.iter().map(|k| expected(k)).collect::<Vec<_>>());
    assert_eq!(got, want);
    assert_eq!(got.len(), 3);
    for (up, n) in &got {
        assert!((250..=420).contains(n), "{up} took {n} of 1000: {got:?}");
    }
    // Picks per endpoint: Envoy's counters agree with what the upstreams received.
    // Picks per endpoint (published every second): Envoy's counters agree with what the
    // upstreams received.
    for up in &ups {
        let name = format!("wasmcustom.keel.picker.users.picks.{}", up.addr());
        let picks = envoy
            .wait_for_counter(&name, up.total(), Duration::from_secs(5))
            .unwrap();
        assert_eq!(picks, up.total(), "{}", up.name());
    }

    // A client cannot choose the host: a forged destination is replaced by the pick.
    let home = expected("alice");
    let other = ups.iter().find(|u| u.name() != home).unwrap();
    let r = envoy
        .send(
            Request::get("/")
                .header("x-user", "alice")
                .header("x-envoy-original-dst-host", &other.addr().to_string()),
        )
        .unwrap();
    assert_eq!(r.header("x-upstream"), Some(home.as_str()));
}

#[test]
fn maglev_sticks_keys_too() {
    let ups = upstreams();
    let envoy = remap(EnvoyConfig::from_file("envoy/picker.yaml").unwrap(), &ups)
        .replace(
            r#""algorithm": "ring""#,
            r#""algorithm": "maglev", "routes": ["users"], "endpoint_header": "x-keel-endpoint""#,
        )
        .start()
        .unwrap();
    let sticky: Vec<String> = keys("k", 100).into_iter().cycle().take(400).collect();
    let got = answered_by(&envoy, &sticky, 8);
    // The upstream sees the pick recorded in the configured endpoint header.
    for up in &ups {
        let received = up.received();
        assert!(!received.is_empty());
        for r in received {
            assert_eq!(
                r.header("x-keel-endpoint"),
                Some(up.addr().to_string().as_str())
            );
        }
    }
    let mut homes: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (k, up) in sticky.iter().zip(&got) {
        homes.entry(k).or_default().insert(up);
    }
    assert!(homes.values().all(|s| s.len() == 1));
    assert_eq!(homes.values().flatten().collect::<BTreeSet<_>>().len(), 3);
    // Every request was picked, so the picker matched Envoy's route by its name
    // (`"routes": ["users"]`): on a route it does not cover it would strip the header, and the
    // ORIGINAL_DST cluster would have no upstream to send to.
    assert_eq!(
        envoy.counter("http.ingress.downstream_rq_2xx").unwrap(),
        400
    );
}

#[test]
fn bounded_loads_spill_a_hot_key_across_workers_and_take_it_back() {
    let ups = upstreams();
    let envoy = remap(EnvoyConfig::from_file("envoy/picker.yaml").unwrap(), &ups)
        .replace(
            r#""algorithm": "ring""#,
            r#""algorithm": "ring", "balance_factor": 1.0"#,
        )
        .start()
        .unwrap();
    let home = answered_by(&envoy, &["hot".to_string()], 1).pop().unwrap();
    // Three requests of one key in flight at once (the upstreams answer after 500 ms), over
    // both workers: with factor 1.0 each endpoint may hold one, so they land on all three.
    for up in &ups {
        up.set_mode(Mode::Delay(Duration::from_millis(500)));
    }
    let hot = vec!["hot".to_string(); 3];
    let spread: BTreeSet<String> = answered_by(&envoy, &hot, 3).into_iter().collect();
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert_eq!(
        envoy
            .counter("wasmcustom.keel.picker.users.spills")
            .unwrap(),
        2
    );
    // Every request was counted out at its end (on_log): the key is home again, alone.
    for up in &ups {
        up.set_mode(Mode::Normal);
    }
    for _ in 0..5 {
        assert_eq!(
            answered_by(&envoy, &["hot".to_string()], 1),
            vec![home.clone()]
        );
    }
    assert_eq!(
        envoy
            .counter("wasmcustom.keel.picker.users.shared_data_errors")
            .unwrap(),
        0
    );
}

#[test]
fn a_bad_configuration_makes_envoy_refuse_the_filter_with_our_message() {
    let ups = upstreams();
    let log = remap(EnvoyConfig::from_file("envoy/picker.yaml").unwrap(), &ups)
        .replace(
            r#""algorithm": "ring""#,
            r#""algorithm": "ring", "balance_factor": 0.5"#,
        )
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains("keel picker: pickers[0].balance_factor: must be from 1.0 to 100.0"),
        "{log}"
    );
}

// ----- composed with the discovery filter: health and priorities -----

/// Discovery (static list of `ups` with active checks every 100 ms, one failure takes a host
/// out, one success brings it back) and the picker following its set, routed by ORIGINAL_DST.
fn composed_yaml(ups: &[Upstream], priorities: [u8; 3]) -> String {
    let statics: Vec<String> = ups
        .iter()
        .map(Upstream::port)
        .zip(priorities)
        .map(|(p, prio)| format!(r#"{{"address": "127.0.0.1", "port": {p}, "priority": {prio}}}"#))
        .collect();
    let discovery = format!(
        r#"{{"services": [{{"name": "users", "source": {{"static": [{}]}}, "refresh": "1s", "health_check": {{"path": "/healthz", "interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1, "healthy_threshold": 1}}, "passive": {{"enabled": false}}}}]}}"#,
        statics.join(", ")
    );
    let picker = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "maglev", "service": "users"}]}"#;
    let wasm = |name: &str, config: &str| {
        format!(
            r#"
          - name: keel.{name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                vm_config:
                  vm_id: keel
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: dist/keel_{name}.wasm }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{config}'"#
        )
    };
    format!(
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
              - name: "users"
                match: {{ prefix: "/" }}
                route: {{ cluster: picked }}
          http_filters:{}{}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: picked
    connect_timeout: 1s
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {{ use_http_header: true }}
  - name: keel_health
    connect_timeout: 1s
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {{ use_http_header: true }}
"#,
        wasm("discovery", &discovery),
        wasm("picker", picker)
    )
}

fn start_composed(ups: &[Upstream], priorities: [u8; 3]) -> Envoy {
    EnvoyConfig::from_yaml("picker+discovery", &composed_yaml(ups, priorities))
        .concurrency(2)
        .start()
        .unwrap()
}

/// Waits (bounded) until discovery publishes `n` routable endpoints.
fn wait_routable(envoy: &Envoy, n: u64) {
    let name = "wasmcustom.keel.discovery.users.endpoints_routable";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = envoy.stats().unwrap().get(name).copied();
        if value == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {value:?}, not {n}, after 10 s:\n{}",
            envoy.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_unhealthy_endpoint_loses_only_its_own_keys() {
    let ups = upstreams();
    let envoy = start_composed(&ups, [0, 0, 0]);
    wait_routable(&envoy, 3);
    let users = keys("user", 600);
    let before = answered_by(&envoy, &users, 8);
    assert_eq!(tally(&before).len(), 3, "{:?}", tally(&before));

    ups[1].set_healthy(false);
    wait_routable(&envoy, 2);
    let after = answered_by(&envoy, &users, 8);
    let mut moved = 0;
    for ((u, was), now) in users.iter().zip(&before).zip(&after) {
        assert_ne!(now, "b", "{u} still goes to the unhealthy endpoint");
        if was == "b" {
            moved += 1;
        } else {
            assert_eq!(now, was, "{u} moved although {was} is healthy");
        }
    }
    assert_eq!(moved, before.iter().filter(|w| *w == "b").count());
    assert!(
        tally(&after).values().all(|&n| n > 200),
        "{:?}",
        tally(&after)
    );

    // Healthy again: every key goes home.
    ups[1].set_healthy(true);
    wait_routable(&envoy, 3);
    assert_eq!(answered_by(&envoy, &users, 8), before);
    // Three versions reached the picker (all healthy, b down, b up): each applied once by
    // each worker that had requests, and only the first built a table.
    let updates = envoy
        .counter("wasmcustom.keel.picker.users.set_updates")
        .unwrap();
    let rebuilds = envoy
        .counter("wasmcustom.keel.picker.users.rebuilds")
        .unwrap();
    assert!((3..=6).contains(&updates), "{updates} set updates");
    assert!(
        (1..=2).contains(&rebuilds),
        "health changes rebuild no table; {rebuilds} rebuilds"
    );
}

#[test]
fn with_priority_zero_down_traffic_goes_to_priority_one() {
    let ups = upstreams();
    let envoy = start_composed(&ups, [0, 0, 1]);
    wait_routable(&envoy, 3);
    let users = keys("user", 400);
    let healthy = tally(&answered_by(&envoy, &users, 8));
    assert_eq!(
        healthy.get("c"),
        None,
        "priority 1 idles while priority 0 is healthy"
    );
    assert_eq!(healthy.len(), 2);

    ups[0].set_healthy(false);
    ups[1].set_healthy(false);
    wait_routable(&envoy, 1);
    let failed_over = tally(&answered_by(&envoy, &users, 8));
    assert_eq!(failed_over, BTreeMap::from([("c".to_string(), 400)]));

    ups[0].set_healthy(true);
    ups[1].set_healthy(true);
    wait_routable(&envoy, 3);
    assert_eq!(tally(&answered_by(&envoy, &users, 8)), healthy);
}
