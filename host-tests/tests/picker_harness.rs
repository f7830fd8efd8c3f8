//! The picker in Keel's wasmtime host: workers that agree, endpoint sets published in shared
//! data, health, panic and priority failover, sticky cookies, bounded loads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_core::discovery::endpoints::{encode_version, set_key, version_key};
use keel_core::discovery::{DiscoveredEndpoint, EndpointSet};
use keel_core::picker::{hash_key, Pick};
use keel_core::time::Instant;
use keel_host_tests::harness::{request, response, Action, Host, HttpStream, Vm};
use keel_host_tests::Module;

/// The picker's configuration through the production entry point.
fn from_json(
    json: &str,
) -> Result<keel_core::picker::policy::FilterConfig, keel_core::config::ConfigError> {
    keel_core::config::load(json.as_bytes())
}

const MINIMAL: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;
const DST: &str = "x-envoy-original-dst-host";

fn workers(host: &Host, config: &str, n: usize) -> Vec<Vm> {
    workers_in(host, Module::Own, config, n)
}

/// `n` workers of the filter from `module` (its own or keel.wasm).
fn workers_in(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "picker", module, config, n).unwrap()
}

fn send(vm: &Vm, user: Option<&str>) -> HttpStream {
    let mut headers = request("GET", "/users");
    if let Some(user) = user {
        headers = headers.with("x-user", user);
    }
    let stream = vm.http_stream();
    stream.set_property("route_name", "users");
    stream.request_headers(headers, true);
    stream
}

/// The host picked for `user` (panics on a local reply).
fn picked(vm: &Vm, user: &str) -> String {
    let s = send(vm, Some(user));
    assert!(s.local_reply().is_none(), "{:?}", s.local_reply());
    let dst = s.request_header(DST).expect("the routing header is set");
    s.finish();
    dst
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

#[test]
fn two_workers_pick_identically_and_as_the_native_core() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, MINIMAL, 2);
        assert!(vms[0].has_log("keel picker: configured pickers: users (ring, 3 static endpoints)"));
        let config = from_json(MINIMAL).unwrap();
        let native = config.pickers[0].static_picker().unwrap();
        let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
        for user in users(1000) {
            let a = picked(&vms[0], &user);
            let b = picked(&vms[1], &user);
            assert_eq!(a, b, "workers disagree on {user}");
            let Pick::Host(i) = native.pick_hash(hash_key(user.as_bytes()), &[]) else {
                panic!("no host");
            };
            assert_eq!(
                a,
                native.endpoints()[i].address,
                "wasm and native disagree on {user}"
            );
            *per_host.entry(a).or_default() += 1;
        }
        assert_eq!(per_host.len(), 3, "{per_host:?}");
        // Picks per endpoint, summed over both workers, published on the next tick.
        assert_eq!(
            host.counter(&format!(
                "keel.picker.users.picks.{}",
                native.endpoints()[0].address
            )),
            0
        );
        host.advance(Duration::from_secs(1));
        for (address, n) in &per_host {
            assert_eq!(
                host.counter(&format!("keel.picker.users.picks.{address}")),
                2 * *n as u64
            );
        }
        assert_eq!(
            host.counter("keel.picker.users.rebuilds"),
            2,
            "one build per worker"
        );
    }
}

#[test]
fn maglev_workers_agree_too() {
    let host = Host::new();
    let config = MINIMAL.replace(r#""ring""#, r#""maglev""#);
    let vms = workers(&host, &config, 2);
    let native = from_json(&config).unwrap().pickers[0]
        .static_picker()
        .unwrap();
    for user in users(300) {
        let a = picked(&vms[0], &user);
        assert_eq!(a, picked(&vms[1], &user));
        let Pick::Host(i) = native.pick_hash(hash_key(user.as_bytes()), &[]) else {
            panic!("no host");
        };
        assert_eq!(a, native.endpoints()[i].address);
    }
}

#[test]
fn a_client_cannot_choose_the_host() {
    let host = Host::new();
    let config = MINIMAL.replace(
        r#""algorithm""#,
        r#""routes": ["users"], "endpoint_header": "x-keel-endpoint", "algorithm""#,
    );
    let vms = workers(&host, &config, 1);
    let honest = picked(&vms[0], "alice");
    // A forged destination is replaced by the pick, and so is the configured record of it.
    let s = vms[0].http_stream();
    s.set_property("route_name", "users");
    s.request_headers(
        request("GET", "/")
            .with("x-user", "alice")
            .with(DST, "10.6.6.6:22")
            .with("x-keel-endpoint", "10.6.6.6:22"),
        true,
    );
    assert_eq!(s.request_header(DST), Some(honest.clone()));
    assert_eq!(s.request_header("x-keel-endpoint"), Some(honest));
    // On a route no picker covers, both are removed.
    let other = vms[0].http_stream();
    other.set_property("route_name", "static");
    assert_eq!(
        other.request_headers(
            request("GET", "/")
                .with(DST, "10.6.6.6:22")
                .with("x-keel-endpoint", "x"),
            true
        ),
        Action::Continue
    );
    assert_eq!(other.request_header(DST), None);
    assert_eq!(other.request_header("x-keel-endpoint"), None);
}

#[test]
fn a_request_without_key_still_gets_a_healthy_host() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let s = send(&vms[0], None);
        seen.insert(s.request_header(DST).unwrap());
    }
    assert_eq!(seen.len(), 3, "keyless requests are spread: {seen:?}");
    assert_eq!(host.counter("keel.picker.users.keyless"), 60);
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    let cases = [
        (
            MINIMAL.replace("127.0.0.1:18092", "users.local:80"),
            "keel picker: pickers[0].endpoints[1].address: expected \"ip:port\", got \"users.local:80\"",
        ),
        (
            MINIMAL.replace(r#""key": "header:x-user", "#, ""),
            "keel picker: pickers[0].key: algorithm \"ring\" needs a key",
        ),
        (
            MINIMAL.replace(r#""ring""#, r#""maglev", "table_size": 1000"#),
            "keel picker: pickers[0].table_size: must be a prime number",
        ),
        (
            MINIMAL.replace(r#""algorithm""#, r#""balance_factor": 0.5, "algorithm""#),
            "keel picker: pickers[0].balance_factor: must be from 1.0 to 100.0",
        ),
        (
            MINIMAL.replace(r#""endpoints""#, r#""endpoint": 1, "endpoints""#),
            "keel picker: pickers[0].endpoint: unknown field",
        ),
        (
            MINIMAL.replace(r#""algorithm": "ring", "#, r#""algorithm": "ring", "service": "users", "#),
            "keel picker: pickers[0]: needs exactly one of \"endpoints\" and \"service\"",
        ),
    ];
    for (config, expected) in cases {
        let host = Host::new();
        let vm = host
            .vm("picker")
            .root_id("picker")
            .vm_id("keel")
            .config(config.as_str())
            .start()
            .unwrap();
        assert!(!vm.configured(), "accepted: {config}");
        assert!(
            vm.has_log(expected),
            "{config}\nexpected {expected}\ngot {:?}",
            vm.logs()
        );
        assert!(vm.crashed().is_none());
    }
}

// ----- endpoint sets published by the discovery filter -----

const SERVICE: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "maglev", "service": "users"}]}"#;

fn endpoint(port: u16, priority: u8, healthy: bool) -> DiscoveredEndpoint {
    DiscoveredEndpoint {
        address: format!("127.0.0.1:{port}").parse().unwrap(),
        weight: 1,
        priority,
        zone: String::new(),
        registry_healthy: healthy,
        meta: Vec::new(),
        tags: Vec::new(),
    }
}

/// Publishes `answer` as the discovery filter does: the set (made by discovery's own encoder),
/// then the version stamp. Returns the version.
fn publish(host: &Host, set: &mut EndpointSet, answer: &[DiscoveredEndpoint]) -> u64 {
    let now = Instant::from_nanos(host.now_nanos());
    set.merge(answer, now, false);
    host.set_shared_data_in("keel", &set_key("users"), set.encode());
    host.set_shared_data_in("keel", &version_key("users"), encode_version(set.version));
    set.version
}

#[test]
fn the_table_is_rebuilt_once_per_endpoint_set_version() {
    let host = Host::new();
    let vms = workers(&host, SERVICE, 2);
    // Nothing published yet: no host, a 503 that says so, and one log line per worker.
    let s = send(&vms[0], Some("alice"));
    let reply = s.local_reply().expect("503");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-keel-picker"), Some("no-host"));
    send(&vms[0], Some("alice"));
    assert_eq!(
        vms[0]
            .logs()
            .iter()
            .filter(|l| l
                .message
                .contains("no endpoint set published for service \"users\""))
            .count(),
        1
    );

    let mut set = EndpointSet::new(Instant::from_nanos(1));
    let v1 = publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, true),
            endpoint(18092, 0, true),
            endpoint(18093, 0, true),
        ],
    );
    let before: Vec<String> = users(300)
        .iter()
        .map(|u| {
            let a = picked(&vms[0], u);
            assert_eq!(a, picked(&vms[1], u));
            a
        })
        .collect();
    assert_eq!(before.iter().collect::<BTreeSet<_>>().len(), 3);
    // 600 requests, one build per worker.
    assert_eq!(host.counter("keel.picker.users.set_updates"), 2);
    assert_eq!(host.counter("keel.picker.users.rebuilds"), 2);
    assert_eq!(host.gauge("keel.picker.users.endpoints"), 3);

    // The same version written again (discovery rewrites the set for freshness): nothing.
    host.set_shared_data_in("keel", &set_key("users"), set.encode());
    host.set_shared_data_in("keel", &version_key("users"), encode_version(v1));
    for u in users(50) {
        picked(&vms[0], &u);
        picked(&vms[1], &u);
    }
    assert_eq!(host.counter("keel.picker.users.set_updates"), 2);

    // A health change is a new version: applied once per worker, no table built, and only the
    // sick endpoint's keys move.
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, true),
            endpoint(18092, 0, false),
            endpoint(18093, 0, true),
        ],
    );
    for (u, was) in users(300).iter().zip(&before) {
        let now = picked(&vms[0], u);
        assert_eq!(now, picked(&vms[1], u));
        assert_ne!(now, "127.0.0.1:18092");
        if was != "127.0.0.1:18092" {
            assert_eq!(&now, was, "{u} moved although its endpoint is healthy");
        }
    }
    assert_eq!(host.counter("keel.picker.users.set_updates"), 4);
    assert_eq!(host.counter("keel.picker.users.rebuilds"), 2);
    assert_eq!(host.gauge("keel.picker.users.healthy_endpoints"), 2);

    // A member joins: rebuilt, once per worker.
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, true),
            endpoint(18092, 0, true),
            endpoint(18093, 0, true),
            endpoint(18094, 0, true),
        ],
    );
    for u in users(100) {
        assert_eq!(picked(&vms[0], &u), picked(&vms[1], &u));
    }
    assert_eq!(host.counter("keel.picker.users.set_updates"), 6);
    assert_eq!(host.counter("keel.picker.users.rebuilds"), 4);
}

#[test]
fn ejected_endpoints_get_no_traffic() {
    let host = Host::new();
    let vms = workers(&host, SERVICE, 1);
    let mut set = EndpointSet::new(Instant::from_nanos(1));
    let answer = [
        endpoint(18091, 0, true),
        endpoint(18092, 0, true),
        endpoint(18093, 0, true),
    ];
    publish(&host, &mut set, &answer);
    let before: Vec<String> = users(200).iter().map(|u| picked(&vms[0], u)).collect();
    assert!(before.iter().any(|a| a == "127.0.0.1:18091"));
    // Passive ejection as discovery records it: `ejected_until` set, the version bumped.
    set.endpoints[0].ejected_until = Some(Instant::from_nanos(host.now_nanos() + 30_000_000_000));
    set.version += 1;
    host.set_shared_data_in("keel", &set_key("users"), set.encode());
    host.set_shared_data_in("keel", &version_key("users"), encode_version(set.version));
    for (u, was) in users(200).iter().zip(&before) {
        let now = picked(&vms[0], u);
        assert_ne!(now, "127.0.0.1:18091");
        if was != "127.0.0.1:18091" {
            assert_eq!(&now, was);
        }
    }
}

#[test]
fn priority_one_takes_the_traffic_when_priority_zero_is_down() {
    let host = Host::new();
    let vms = workers(&host, SERVICE, 2);
    let mut set = EndpointSet::new(Instant::from_nanos(1));
    let up = [
        endpoint(18091, 0, true),
        endpoint(18092, 0, true),
        endpoint(18093, 1, true),
    ];
    publish(&host, &mut set, &up);
    let count = |vms: &[Vm]| {
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for (i, u) in users(400).iter().enumerate() {
            *per.entry(picked(&vms[i % 2], u)).or_default() += 1;
        }
        per
    };
    let healthy = count(&vms);
    assert_eq!(
        healthy.get("127.0.0.1:18093"),
        None,
        "priority 1 idles: {healthy:?}"
    );
    // One of two down: 140 % x 1/2 = 70 % stays on priority 0, 30 % spills.
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, false),
            endpoint(18092, 0, true),
            endpoint(18093, 1, true),
        ],
    );
    let half = count(&vms);
    let spilled = half.get("127.0.0.1:18093").copied().unwrap_or(0);
    assert!((80..=160).contains(&spilled), "{half:?}");
    assert_eq!(half.get("127.0.0.1:18091"), None);
    // Both down: everything on priority 1.
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, false),
            endpoint(18092, 0, false),
            endpoint(18093, 1, true),
        ],
    );
    assert_eq!(
        count(&vms),
        BTreeMap::from([("127.0.0.1:18093".to_string(), 400)])
    );
    // Back up: back home.
    publish(&host, &mut set, &up);
    assert_eq!(count(&vms), healthy);
}

#[test]
fn below_the_panic_threshold_all_endpoints_are_used() {
    let host = Host::new();
    let vms = workers(&host, SERVICE, 2);
    let mut set = EndpointSet::new(Instant::from_nanos(1));
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, true),
            endpoint(18092, 0, false),
            endpoint(18093, 0, false),
        ],
    );
    let mut seen = BTreeSet::new();
    for u in users(200) {
        seen.insert(picked(&vms[0], &u));
        picked(&vms[1], &u);
    }
    assert_eq!(seen.len(), 3, "1 of 3 healthy is under 50 %: all are used");
    assert_eq!(
        host.counter("keel.picker.users.panic_entered"),
        2,
        "once per worker"
    );
    assert_eq!(host.counter("keel.picker.users.panic_picks"), 400);
    // Two of three healthy: out of panic, only the healthy ones.
    publish(
        &host,
        &mut set,
        &[
            endpoint(18091, 0, true),
            endpoint(18092, 0, true),
            endpoint(18093, 0, false),
        ],
    );
    for u in users(100) {
        assert_ne!(picked(&vms[0], &u), "127.0.0.1:18093");
    }
    assert_eq!(host.counter("keel.picker.users.panic_picks"), 400);
}

// ----- sticky cookies, bounded loads, cluster header -----

#[test]
fn a_client_without_the_cookie_gets_one_and_sticks() {
    let host = Host::new();
    let config = MINIMAL.replace(
        r#""key": "header:x-user""#,
        r#""key": "cookie:sid", "cookie": {"name": "sid", "ttl": "1h"}"#,
    );
    let vms = workers(&host, &config, 2);
    let first = vms[0].http_stream();
    first.request_headers(request("GET", "/"), true);
    let home = first.request_header(DST).unwrap();
    assert_eq!(
        first.response_headers(response(200), true),
        Action::Continue
    );
    let set_cookie = first
        .response_header("set-cookie")
        .expect("a sticky cookie");
    let value = set_cookie
        .strip_prefix("sid=")
        .and_then(|v| v.strip_suffix("; Max-Age=3600; Path=/; HttpOnly"))
        .unwrap_or_else(|| panic!("{set_cookie}"));
    assert_eq!(value.len(), 16);
    assert!(value.bytes().all(|b| b.is_ascii_hexdigit()));
    // Its next requests, on either worker, go where the first went, and get no new cookie.
    for i in 0..20 {
        let s = vms[i % 2].http_stream();
        s.request_headers(
            request("GET", "/").with("cookie", &format!("theme=dark; sid={value}")),
            true,
        );
        assert_eq!(s.request_header(DST).as_deref(), Some(home.as_str()));
        s.response_headers(response(200), true);
        assert_eq!(s.response_header("set-cookie"), None);
    }
    assert_eq!(host.counter("keel.picker.users.cookies_set"), 1);
    // Fresh clients get their own values, spread over the endpoints.
    let mut homes = BTreeSet::new();
    for _ in 0..40 {
        let s = vms[0].http_stream();
        s.request_headers(request("GET", "/"), true);
        homes.insert(s.request_header(DST).unwrap());
    }
    assert_eq!(homes.len(), 3);
}

#[test]
fn bounded_loads_spill_a_hot_key_and_take_it_back_when_requests_end() {
    let host = Host::new();
    let config = MINIMAL.replace(r#""algorithm""#, r#""balance_factor": 1.0, "algorithm""#);
    let vms = workers(&host, &config, 2);
    let home = picked(&vms[0], "hot");
    // Three requests held open over two workers: 1.0 x average allows one per endpoint.
    let open: Vec<HttpStream> = (0..3).map(|i| send(&vms[i % 2], Some("hot"))).collect();
    let hosts: BTreeSet<String> = open
        .iter()
        .map(|s| s.request_header(DST).unwrap())
        .collect();
    assert_eq!(hosts.len(), 3, "each endpoint took one: {hosts:?}");
    assert_eq!(open[0].request_header(DST).as_deref(), Some(home.as_str()));
    assert_eq!(host.counter("keel.picker.users.spills"), 2);
    // The requests end (on_log): the hot key is home again.
    for s in &open {
        s.finish();
    }
    let (bytes, _) = host
        .shared_data_in("keel", "keel/picker/users/in_flight")
        .unwrap();
    assert_eq!(bytes, vec![0, 0, 0, 0], "every request counted out");
    assert_eq!(picked(&vms[1], "hot"), home);
    assert_eq!(host.counter("keel.picker.users.shared_data_errors"), 0);
}

#[test]
fn cluster_header_mode_names_the_cluster() {
    let host = Host::new();
    let config = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring",
        "mode": "cluster_header", "cluster_header": "x-keel-cluster",
        "endpoints": [{"address": "127.0.0.1:18091", "cluster": "users-a"},
                      {"address": "127.0.0.1:18092", "cluster": "users-b"}]}]}"#;
    let vms = workers(&host, config, 1);
    let mut clusters = BTreeSet::new();
    for u in users(100) {
        let s = send(&vms[0], Some(&u));
        let cluster = s.request_header("x-keel-cluster").unwrap();
        let endpoint = s.request_header("x-keel-endpoint").unwrap();
        assert_eq!(
            cluster,
            if endpoint == "127.0.0.1:18091" {
                "users-a"
            } else {
                "users-b"
            }
        );
        assert_eq!(s.request_header(DST), None);
        clusters.insert(cluster);
    }
    assert_eq!(clusters.len(), 2);
}

#[test]
fn a_non_ascii_key_is_hashed_as_its_bytes() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    let native = from_json(MINIMAL).unwrap().pickers[0]
        .static_picker()
        .unwrap();
    for user in ["caf\u{e9}", "\u{1f600}", "z\u{fc}rich"] {
        let Pick::Host(i) = native.pick_hash(hash_key(user.as_bytes()), &[]) else {
            panic!("no host");
        };
        assert_eq!(picked(&vms[0], user), native.endpoints()[i].address);
    }
    assert!(vms[0].crashed().is_none());
}

// ----- peak EWMA: latency-aware balancing, latencies shared by the workers -----

const PEAK_EWMA: &str = r#"{"pickers": [{"name": "users", "algorithm": "peak_ewma", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;

/// A virtual-time load: every 5 ms one request, alternating between the workers, answered
/// after the scripted latency of the endpoint it was sent to (`latency_ms[port - 18091]`, a
/// multiple of 5). Runs `seconds` of virtual time and returns the requests each endpoint got;
/// requests still open at the end are answered first.
fn run_latency_load(
    host: &Host,
    vms: &[Vm],
    latency_ms: [u64; 3],
    seconds: u64,
) -> BTreeMap<String, usize> {
    const STEP_MS: u64 = 5;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut open: Vec<(u64, HttpStream)> = Vec::new();
    let mut t = 0u64;
    for step in 0..seconds * 1000 / STEP_MS {
        let s = send(&vms[step as usize % vms.len()], None);
        assert!(s.local_reply().is_none(), "{:?}", s.local_reply());
        let dst = s.request_header(DST).expect("the routing header is set");
        let port: u16 = dst.rsplit(':').next().unwrap().parse().unwrap();
        let delay = latency_ms[usize::from(port - 18091)];
        *counts.entry(dst).or_default() += 1;
        open.push((t + delay, s));
        host.advance(Duration::from_millis(STEP_MS));
        t += STEP_MS;
        let (due, later): (Vec<_>, Vec<_>) = open.into_iter().partition(|(at, _)| *at <= t);
        open = later;
        for (_, s) in due {
            s.response_headers(response(200), true);
            s.finish();
        }
    }
    for (_, s) in open {
        s.response_headers(response(200), true);
        s.finish();
    }
    counts
}

/// The latency value of `address` in shared data.
fn latency_of(host: &Host, address: &str) -> keel_core::picker::peak_ewma::EndpointLatency {
    let (bytes, _) = host
        .shared_data_in("keel", &format!("keel/picker/users/latency/{address}"))
        .expect("created before traffic");
    keel_core::picker::peak_ewma::EndpointLatency::decode(&bytes).expect("the layout")
}

fn share(counts: &BTreeMap<String, usize>, address: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(address).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

#[test]
fn peak_ewma_avoids_the_slow_endpoint_and_follows_when_the_slowness_moves() {
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        peak_ewma_follows_latency(module);
    }
}

fn peak_ewma_follows_latency(module: Module) {
    let host = Host::new();
    let vms = workers_in(&host, module, PEAK_EWMA, 2);
    assert!(vms[0].has_log("configured pickers: users (peak_ewma, 3 static endpoints)"));
    // Created at configuration, never measured, nothing in flight.
    for port in 18091..=18093 {
        let e = latency_of(&host, &format!("127.0.0.1:{port}"));
        assert_eq!((e.stamp, e.in_flight), (None, 0));
    }
    // 18093 answers 50 ms slower than the others. After a 2 s warm-up, at least 90 % of the
    // requests of both workers avoid it.
    let slow_last = [10, 10, 60];
    run_latency_load(&host, &vms, slow_last, 2);
    let counts = run_latency_load(&host, &vms, slow_last, 10);
    eprintln!("18093 slow: {counts:?}");
    assert!(share(&counts, "127.0.0.1:18093") <= 0.10, "{counts:?}");
    assert!(
        share(&counts, "127.0.0.1:18091") > 0.3 && share(&counts, "127.0.0.1:18092") > 0.3,
        "the fast two share the load: {counts:?}"
    );
    // Both workers balance on the same shared estimates: the slow host's is the peak.
    let slow = latency_of(&host, "127.0.0.1:18093");
    let fast = latency_of(&host, "127.0.0.1:18091");
    assert!(
        slow.estimate_ns > 3.0 * fast.estimate_ns,
        "{slow:?} {fast:?}"
    );
    // The slowness moves to 18091: within 5 s of virtual time the traffic has left it.
    let slow_first = [60, 10, 10];
    let moving = run_latency_load(&host, &vms, slow_first, 5);
    eprintln!("moving: {moving:?}");
    let after = run_latency_load(&host, &vms, slow_first, 5);
    eprintln!("18091 slow: {after:?}");
    assert!(share(&after, "127.0.0.1:18091") <= 0.10, "{after:?}");
    // The formerly slow 18093 is taken back as its estimate comes down at the EWMA's pace
    // (a fast sample only pulls the peak down by its weight).
    assert!(share(&after, "127.0.0.1:18093") > 0.15, "{after:?}");
    // Every request was counted out of flight at its response.
    for port in 18091..=18093 {
        assert_eq!(latency_of(&host, &format!("127.0.0.1:{port}")).in_flight, 0);
    }
    assert_eq!(host.counter("keel.picker.users.shared_data_errors"), 0);
}

#[test]
fn peak_ewma_fails_open_when_shared_data_fails() {
    use keel_host_tests::harness::Status;
    for call in ["proxy_get_shared_data", "proxy_set_shared_data"] {
        let host = Host::new();
        let vms = workers(&host, PEAK_EWMA, 1);
        vms[0].fail_host_call(call, Status::InternalFailure);
        // Every request still gets a host, all three are used, nothing traps.
        let counts = run_latency_load(&host, &vms, [10, 10, 60], 1);
        assert_eq!(counts.values().sum::<usize>(), 200, "{call}: {counts:?}");
        assert_eq!(counts.len(), 3, "{call}: {counts:?}");
        assert!(vms[0].crashed().is_none(), "{call}");
        assert!(
            host.counter("keel.picker.users.shared_data_errors") >= 200,
            "{call}: the failures are counted"
        );
        // The host recovers: the slow endpoint is avoided again.
        vms[0].heal_host_calls();
        run_latency_load(&host, &vms, [10, 10, 60], 2);
        let counts = run_latency_load(&host, &vms, [10, 10, 60], 5);
        assert!(
            share(&counts, "127.0.0.1:18093") <= 0.10,
            "{call}: {counts:?}"
        );
    }
}
