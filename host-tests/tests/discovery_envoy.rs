//! The discovery filter in a real Envoy (`--concurrency 2`) with a real etcd and real upstreams
//! that register themselves with leases (`envoy/discovery.yaml`; needs
//! `dist/keel_discovery.wasm` and `/usr/bin/etcd`: `make setup build`).
//!
//! The published set is observed at the filter's `admin_path` through Envoy's listener and in
//! the filter's gauges in Envoy's stats. Timing bounds are those the issue states; each test
//! prints what it measured (`cargo test ... -- --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::thread;
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{self, wait_for, Envoy, EnvoyConfig, Request};
use keel_host_tests::etcd::{
    discovery_status, known_addresses, routable_addresses, RegisteredService,
};
use keel_host_tests::module_path;
use keel_host_tests::upstream::Mode;

const YAML: &str = "envoy/discovery.yaml";
/// The filter configuration as written in the YAML.
const CONFIG: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s", "health_check": {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}}], "admin_path": "/keel/discovery"}"#;
const ADMIN: &str = "/keel/discovery";
const TTL: Duration = Duration::from_secs(3);
const REFRESH: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_secs(1);
const UNHEALTHY_THRESHOLD: u32 = 2;

/// Three registered instances and an Envoy whose discovery filter reads them (the YAML's
/// static `users` cluster points at the same three upstreams).
fn rig(config: &str) -> (RegisteredService, Envoy) {
    assert!(
        module_path("discovery").is_file(),
        "build dist/keel_discovery.wasm first (make build)"
    );
    let users = RegisteredService::start("users", 3, TTL).expect("etcd and three instances");
    let mut yaml = users
        .remap(
            EnvoyConfig::from_file(YAML).unwrap(),
            &[18091, 18092, 18093],
        )
        .concurrency(2);
    if config != CONFIG {
        yaml = yaml.replace(CONFIG, config);
    }
    let envoy = yaml.start().expect("Envoy starts");
    (users, envoy)
}

fn status(envoy: &Envoy) -> serde_json::Value {
    discovery_status(envoy.client(), ADMIN).expect("the admin path answers")
}

fn routable(envoy: &Envoy) -> Vec<String> {
    let mut r = routable_addresses(&status(envoy), "users");
    r.sort();
    r
}

fn known(envoy: &Envoy) -> Vec<String> {
    let mut k = known_addresses(&status(envoy), "users");
    k.sort();
    k
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn stat(envoy: &Envoy, what: &str) -> u64 {
    envoy
        .stat(&format!("wasmcustom.keel.discovery.users.{what}"))
        .unwrap()
}

#[test]
fn the_yaml_runs_as_written_and_a_bad_configuration_is_refused() {
    envoy::validate(YAML).unwrap();
    let bad = CONFIG.replace(r#""refresh": "1s""#, r#""refresh": "often""#);
    let log = EnvoyConfig::from_file(YAML)
        .unwrap()
        .replace(CONFIG, &bad)
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains("keel discovery: services[0].refresh: expected a duration"),
        "{log}"
    );
}

#[test]
fn the_published_set_follows_leases_and_health_checks_with_one_poller() {
    let (mut users, envoy) = rig(CONFIG);
    let all = sorted(users.addresses());
    let started = Instant::now();
    let ready = wait_for(started, Duration::from_secs(15), || routable(&envoy) == all)
        .unwrap_or_else(|| panic!("never published: {}\n{}", status(&envoy), envoy.log()));
    println!("three registered instances routable after {ready:?}");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stat(&envoy, "endpoints_known"), 3);
    assert_eq!(stat(&envoy, "endpoints_healthy"), 3);
    assert_eq!(stat(&envoy, "endpoints_ejected"), 0);
    assert_eq!(stat(&envoy, "freshness"), 0);

    // One poller for the whole process: the etcd cluster sees one request per refresh, not one
    // per worker (two workers polling would make it about 20 in 10 s).
    let window = Duration::from_secs(10);
    let etcd_before = envoy.counter("cluster.etcd.upstream_rq_total").unwrap();
    let checks_before = envoy
        .counter("cluster.keel_health.upstream_rq_total")
        .unwrap();
    thread::sleep(window);
    let polls = envoy.counter("cluster.etcd.upstream_rq_total").unwrap() - etcd_before;
    let checks = envoy
        .counter("cluster.keel_health.upstream_rq_total")
        .unwrap()
        - checks_before;
    println!("in {window:?}: {polls} etcd requests, {checks} health checks for 3 endpoints");
    assert!(
        (8..=12).contains(&polls),
        "{polls} etcd requests in {window:?}"
    );
    assert!((24..=33).contains(&checks), "{checks} checks in {window:?}");
    assert_eq!(
        envoy
            .counter("wasmcustom.keel.discovery.poller.acquired")
            .unwrap(),
        1
    );

    // An instance dies: its lease lapses and it leaves the set within TTL + one refresh
    // (plus etcd's expiry sweep, every 500 ms, and this test's 50 ms polling).
    let gone = users.instance(0).address();
    let last_keepalive = users.instance_mut(0).registration.lapse();
    let left = wait_for(last_keepalive, Duration::from_secs(15), || {
        !known(&envoy).contains(&gone)
    })
    .expect("the lapsed instance leaves the set");
    println!("lease lapsed: the instance left the set {left:?} after its last keepalive (TTL {TTL:?}, refresh {REFRESH:?})");
    assert!(
        left <= TTL + REFRESH + Duration::from_millis(600),
        "left after {left:?}"
    );
    assert!(
        left >= TTL,
        "left after {left:?}, before its lease could lapse"
    );

    // An instance fails its health check: known, no traffic, within
    // unhealthy_threshold × interval + one interval; back once it passes again.
    let sick = users.instance(1).address();
    let failing_since = Instant::now();
    users.instance(1).upstream.set_healthy(false);
    let out = wait_for(failing_since, Duration::from_secs(10), || {
        !routable(&envoy).contains(&sick)
    })
    .expect("the failing instance leaves the traffic");
    let bound = INTERVAL * UNHEALTHY_THRESHOLD + INTERVAL;
    println!("health check failing: no traffic after {out:?} (bound {bound:?})");
    assert!(
        out <= bound + Duration::from_millis(100),
        "out after {out:?}"
    );
    assert!(known(&envoy).contains(&sick));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stat(&envoy, "endpoints_known"), 2);
    assert_eq!(stat(&envoy, "endpoints_healthy"), 1);
    let healthy_since = Instant::now();
    users.instance(1).upstream.set_healthy(true);
    let back = wait_for(healthy_since, Duration::from_secs(10), || {
        routable(&envoy).contains(&sick)
    })
    .expect("the instance returns when healthy");
    println!("health check passing again: traffic after {back:?}");
    assert!(back <= INTERVAL * 2, "back after {back:?}");
    assert!(stat(&envoy, "checks_failed") >= 2);
    assert!(stat(&envoy, "refresh_ok") >= 10);
}

#[test]
fn an_etcd_outage_keeps_the_set_and_its_return_brings_a_new_instance() {
    let (mut users, envoy) = rig(CONFIG);
    let all = sorted(users.addresses());
    wait_for(Instant::now(), Duration::from_secs(15), || {
        routable(&envoy) == all
    })
    .expect("published");
    let failed_before = stat(&envoy, "refresh_failed");

    users.etcd().stop();
    let outage = Instant::now();
    let mut ages = Vec::new();
    while outage.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_secs(1));
        assert_eq!(routable(&envoy), all, "the last known set serves");
        ages.push(stat(&envoy, "data_age_ms"));
    }
    let failed = stat(&envoy, "refresh_failed") - failed_before;
    println!(
        "etcd down 30 s: {failed} failed refreshes, data_age_ms went {:?} .. {:?}",
        ages.first(),
        ages.last()
    );
    assert!(ages.windows(2).all(|w| w[1] >= w[0]), "{ages:?}");
    assert!(*ages.last().unwrap() >= 28_000, "{ages:?}");
    assert_eq!(stat(&envoy, "freshness"), 1, "flagged stale");
    assert!(
        (3..=20).contains(&failed),
        "{failed} attempts in 30 s: backoff"
    );
    let doc = status(&envoy);
    assert_eq!(doc["services"][0]["freshness"], "stale");
    assert!(envoy.log().contains("registry refresh failed"));

    // etcd comes back (same data; it extends the leases) and a new instance registers.
    users.etcd().restart().unwrap();
    let back = Instant::now();
    let newcomer = users.add().unwrap().address();
    let joined = wait_for(back, Duration::from_secs(20), || {
        routable(&envoy).contains(&newcomer)
    })
    .unwrap_or_else(|| panic!("the new instance never joined: {}", status(&envoy)));
    println!("etcd back: the new instance gets traffic after {joined:?}");
    let mut expected = all.clone();
    expected.push(newcomer);
    assert_eq!(routable(&envoy), sorted(expected));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stat(&envoy, "freshness"), 0);
    assert!(stat(&envoy, "data_age_ms") < 2_000);
}

#[test]
fn real_traffic_failures_eject_a_host() {
    let (users, envoy) = rig(CONFIG);
    let all = sorted(users.addresses());
    wait_for(Instant::now(), Duration::from_secs(15), || {
        routable(&envoy) == all
    })
    .expect("published");
    // Instance 2 answers 503 to real traffic but still passes its health checks.
    let bad = users.instance(2);
    bad.upstream.set_mode(Mode::fail(503));
    let responses = envoy.send_all((0..30).map(|_| Request::get("/users")), 1);
    let failures = responses
        .iter()
        .filter(|r| r.as_ref().map_or(true, |r| r.status == 503))
        .count();
    assert!(failures >= 5, "{failures} failures");
    let ejected = wait_for(Instant::now(), Duration::from_secs(2), || {
        !routable(&envoy).contains(&bad.address())
    });
    assert!(ejected.is_some(), "not ejected: {}", status(&envoy));
    let doc = status(&envoy);
    let record = doc["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == bad.address().as_str())
        .unwrap()
        .clone();
    assert_eq!(record["check_healthy"], true);
    let for_ms = record["ejected_for_ms"].as_u64().unwrap();
    assert!((25_000..=30_000).contains(&for_ms), "{record}");
    assert_eq!(stat(&envoy, "ejections"), 1);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stat(&envoy, "endpoints_ejected"), 1);
    assert!(envoy
        .log()
        .contains("ejected for 30s after 5 consecutive failures"));
}
