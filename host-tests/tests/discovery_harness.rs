//! The discovery filter in Keel's wasmtime host: several workers sharing data, a virtual clock,
//! a registry and health checks played by a responder (`harness::ScriptedEtcd`).
//!
//! Build the modules first: `make build` (dist/keel_discovery.wasm and dist/keel.wasm; the
//! keel-discovery crate is now a library, its module is keel-discovery-module)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::time::Duration;

use keel_core::discovery::{EndpointSet, Freshness, PassiveCounter, POLLER_LEASE_TTL};
use keel_host_tests::etcd::{base64_encode, range_response};
use keel_host_tests::harness::{
    request, response, Action, EtcdAnswer, HealthAnswer, Host, Response, ScriptedEtcd, Vm,
};
use keel_host_tests::Module;
use serde_json::Value;

/// The issue's minimal configuration, verbatim.
const MINIMAL: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s", "health_check": {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}}]}"#;
const ADMIN: &str = "/keel/discovery";
const PREFIX: &str = "/services/users/";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The minimal configuration with top-level or per-service fields added.
fn config(top: &[(&str, Value)], service: &[(&str, Value)]) -> String {
    let mut doc: Value = serde_json::from_str(MINIMAL).unwrap();
    for (k, v) in top {
        doc[*k] = v.clone();
    }
    for (k, v) in service {
        doc["services"][0][*k] = v.clone();
    }
    doc.to_string()
}

fn with_admin() -> String {
    config(&[("admin_path", ADMIN.into())], &[])
}

fn workers(host: &Host, config: &str, n: usize) -> Vec<Vm> {
    workers_in(host, Module::Own, config, n)
}

/// `n` workers of the filter from `module` (its own or keel.wasm).
fn workers_in(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "discovery", module, config, n).unwrap()
}

fn published(host: &Host, service: &str) -> Option<EndpointSet> {
    let (bytes, _) = host.shared_data_in("keel", &format!("keel/discovery/{service}/endpoints"))?;
    EndpointSet::decode(&bytes)
}

fn users(host: &Host) -> EndpointSet {
    published(host, "users").expect("a published set")
}

fn addresses(set: &EndpointSet) -> Vec<&str> {
    set.endpoints.iter().map(|r| r.address.as_str()).collect()
}

fn routable(set: &EndpointSet) -> Vec<&str> {
    set.routable().map(|r| r.address.as_str()).collect()
}

fn gauge(host: &Host, what: &str) -> i64 {
    host.gauge(&format!("keel.discovery.users.{what}"))
}

fn counter(host: &Host, what: &str) -> u64 {
    host.counter(&format!("keel.discovery.users.{what}"))
}

/// The admin document as a worker answers it.
fn admin(vm: &Vm) -> Value {
    let stream = vm.send_request(request("GET", ADMIN));
    let reply = stream.local_reply().expect("the admin path is answered");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    serde_json::from_slice(&reply.body).expect("JSON")
}

/// One finished request of real traffic that went to `address`.
fn traffic(vm: &Vm, address: &str, status: u32, details: Option<&str>) {
    let stream = vm.http_stream();
    stream.set_property("upstream.address", address);
    if let Some(details) = details {
        stream.set_property("response.code_details", details);
    }
    assert_eq!(
        stream.request_headers(request("GET", "/users"), true),
        Action::Continue
    );
    stream.response_headers(response(status), true);
    stream.finish();
}

fn now(host: &Host) -> keel_core::time::Instant {
    keel_core::time::Instant::from_nanos(host.now_nanos())
}

fn no_crash(vms: &[Vm]) {
    for vm in vms {
        assert!(vm.crashed().is_none(), "crashed: {:?}", vm.crashed());
    }
}

const H1: &str = "127.0.0.1:18091";
const H2: &str = "127.0.0.1:18092";
const H3: &str = "127.0.0.1:18093";
const H4: &str = "127.0.0.1:18094";

// ----- one poller -----

#[test]
fn only_one_of_several_workers_polls_and_all_see_the_set() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
        let vms = workers_in(&host, module, &with_admin(), 4);
        host.advance(Duration::from_secs(10));
        no_crash(&vms);

        // One registry read per refresh (1 s) for the whole process, not one per worker.
        let calls = registry.reads();
        assert_eq!(calls.len(), 10, "{calls:?}");
        assert!(calls.iter().all(|vm| *vm == calls[0]), "{calls:?}");
        assert_eq!(host.counter("keel.discovery.poller.acquired"), 1);
        // Health checks too: one per host per interval.
        let checks = registry.checks().len();
        assert!(
            (27..=33).contains(&checks),
            "{checks} checks for 3 hosts in 10 s"
        );

        // The registry request is etcd's range over the prefix.
        let set = users(&host);
        assert_eq!(addresses(&set), [H1, H2, H3]);
        assert_eq!(routable(&set), [H1, H2, H3]);
        assert_eq!(set.freshness, Freshness::Fresh);

        // Every worker, poller or not, serves the same published set.
        for vm in &vms {
            let doc = admin(vm);
            let users = &doc["services"][0];
            assert_eq!(users["name"], "users");
            assert_eq!(users["version"], set.version);
            assert_eq!(users["endpoints_routable"], 3);
            assert_eq!(users["freshness"], "fresh");
        }
        assert_eq!(gauge(&host, "endpoints_known"), 3);
        assert_eq!(gauge(&host, "endpoints_healthy"), 3);
        assert_eq!(gauge(&host, "endpoints_ejected"), 0);
        assert_eq!(gauge(&host, "freshness"), 0);
        assert!(gauge(&host, "data_age_ms") < 1000);
        assert_eq!(counter(&host, "refresh_ok"), 10);
        assert_eq!(counter(&host, "refresh_failed"), 0);

        // A request on another path goes on untouched.
        let stream = vms[1].send_request(request("GET", "/keel/discoveryx"));
        assert!(stream.local_reply().is_none());
    }
}

#[test]
fn the_registry_request_reads_the_prefix() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    host.advance(ms(100));
    let call = vms[0].next_callout().expect("a registry callout");
    assert_eq!(call.upstream, "etcd");
    assert_eq!(call.header(":method"), Some("POST"));
    assert_eq!(call.path(), "/v3/kv/range");
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(body["key"], base64_encode(PREFIX.as_bytes()));
    assert_eq!(body["range_end"], base64_encode(b"/services/users0"));
    assert!(call.timeout.is_some());
}

#[test]
fn another_worker_takes_over_when_the_poller_stops() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let mut vms = workers(&host, MINIMAL, 3);
    host.advance(Duration::from_secs(3));
    let poller = *registry.reads().last().unwrap();
    assert_eq!(users(&host).routable().count(), 3);

    // The poller's VM goes away (a worker that stopped running its tick).
    let stopped_at = host.elapsed();
    vms.retain(|vm| vm.index() != poller);
    let calls_before = registry.reads().len();
    let mut took_over = None;
    for _ in 0..100 {
        host.advance(ms(100));
        if let Some(vm) = registry.reads().get(calls_before) {
            took_over = Some((*vm, host.elapsed() - stopped_at));
            break;
        }
        // Meanwhile the others keep the published set.
        assert_eq!(users(&host).endpoints.len(), 3);
    }
    let (new_poller, after) = took_over.expect("another worker polls");
    assert_ne!(new_poller, poller);
    let ttl = Duration::from_nanos(POLLER_LEASE_TTL.as_nanos());
    assert!(after <= ttl + ms(100), "took over after {after:?}");
    assert_eq!(host.counter("keel.discovery.poller.acquired"), 2);

    // The new poller keeps the set current, alone.
    registry.set_hosts(&[H1, H2, H3, H4]);
    host.advance(Duration::from_secs(5));
    assert_eq!(addresses(&users(&host)), [H1, H2, H3, H4]);
    assert_eq!(routable(&users(&host)).len(), 4);
    let calls = registry.reads();
    assert!(calls[calls_before..].iter().all(|vm| *vm == new_poller));
    assert_eq!(host.counter("keel.discovery.poller.acquired"), 2);
    no_crash(&vms);
}

#[test]
fn a_vm_that_lost_the_lease_ignores_answers_to_what_it_sent() {
    let host = Host::new();
    let vms = workers(&host, &config(&[], &[("health_check", Value::Null)]), 2);
    let registry = ScriptedEtcd::new(&[H1, H2, H3]);
    host.advance(ms(100));
    let first = host.callouts();
    assert_eq!(first.len(), 1);
    let poller = first[0].vm;
    first
        .into_iter()
        .next()
        .unwrap()
        .respond(Response::new(200).body(registry.range_body()));
    assert_eq!(addresses(&users(&host)), [H1, H2, H3]);

    // The next read is in flight when another holder takes the lease.
    host.advance(Duration::from_secs(1));
    let late = host.callouts().into_iter().next().expect("the next read");
    let until = now(&host).saturating_add(keel_core::time::Duration::from_secs(10));
    let lease = keel_core::discovery::PollerLease {
        holder: 0xdead,
        expires_at: until,
    };
    host.set_shared_data_in("keel", "keel/discovery/poller", lease.encode());
    host.advance(ms(100));
    assert!(vms[poller].has_log("lost the poller lease"));
    // Its answer arrives afterwards: ignored, the set stays as published.
    registry.set_hosts(&[H1]);
    late.respond(Response::new(200).body(registry.range_body()));
    assert_eq!(addresses(&users(&host)), [H1, H2, H3]);
    assert!(
        host.callouts().is_empty(),
        "nobody polls while the other holds the lease"
    );

    // The other holder never renews: a VM takes over and reads again.
    host.advance(Duration::from_secs(10));
    let next = host
        .callouts()
        .into_iter()
        .next()
        .expect("a new poller reads");
    next.respond(Response::new(200).body(registry.range_body()));
    assert_eq!(addresses(&users(&host)), [H1]);
    assert_eq!(host.counter("keel.discovery.poller.acquired"), 2);
}

// ----- stale-if-error -----

#[test]
fn a_failing_registry_leaves_the_last_known_set_serving() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let cfg = config(
        &[("admin_path", ADMIN.into())],
        &[("max_stale", "30s".into())],
    );
    let vms = workers(&host, &cfg, 2);
    host.advance(Duration::from_secs(3));
    let good = users(&host);
    assert_eq!(routable(&good), [H1, H2, H3]);

    let valid = registry.range_body();
    let phases = [
        EtcdAnswer::Status(503),
        EtcdAnswer::Body(b"<html>bad gateway</html>".to_vec()),
        EtcdAnswer::Reset,
        EtcdAnswer::Body(valid[..valid.len() / 2].to_vec()),
        EtcdAnswer::Body(range_response(&[("/services/users/x", "junk")], 10).into_bytes()),
    ];
    let calls_before = registry.reads().len();
    let checks_before = counter(&host, "checks_passed");
    // Each phase outlasts the longest backoff (10 s for a 1 s refresh), so each is tried.
    for phase in phases {
        let failed_before = counter(&host, "refresh_failed");
        registry.set_answer(phase.clone());
        for _ in 0..12 {
            host.advance(Duration::from_secs(1));
            let set = users(&host);
            assert_eq!(routable(&set), [H1, H2, H3], "during {phase:?}");
            assert_eq!(
                set.version, good.version,
                "no picker rebuild during {phase:?}"
            );
            assert_ne!(set.freshness, Freshness::Fresh);
        }
        assert!(
            counter(&host, "refresh_failed") > failed_before,
            "{phase:?} was not tried"
        );
    }
    no_crash(&vms);
    // Refreshes went on with backoff: far fewer than one a second.
    let tries = registry.reads().len() - calls_before;
    assert!((5..=16).contains(&tries), "{tries} tries in 60 s");
    // Active checks went on: hosts that die meanwhile still leave the traffic.
    assert!(counter(&host, "checks_passed") >= checks_before + 3 * 55);
    // Past max_stale (30 s) the data is flagged expired, still served, and its age shows.
    assert_eq!(users(&host).freshness, Freshness::Expired);
    assert_eq!(gauge(&host, "freshness"), 2);
    assert!(
        gauge(&host, "data_age_ms") >= 59_000,
        "{}",
        gauge(&host, "data_age_ms")
    );
    let doc = admin(&vms[1]);
    assert_eq!(doc["services"][0]["freshness"], "expired");
    assert_eq!(doc["services"][0]["endpoints_routable"], 3);
    let logs: Vec<String> = host.logs().into_iter().map(|(_, e)| e.message).collect();
    for needle in [
        "registry refresh failed: the registry answered status 503",
        "the registry's answer is not JSON",
        "registry refresh failed: no answer",
        "none of the 1 registry entries is valid",
        "serving the last known set of 3 endpoints",
    ] {
        assert!(
            logs.iter().any(|l| l.contains(needle)),
            "no log {needle:?}: {logs:#?}"
        );
    }
    // One line per run of the same error, not one per attempt.
    let lines_503 = logs.iter().filter(|l| l.contains("status 503")).count();
    assert_eq!(lines_503, 1);

    // The registry comes back with a new instance: it joins within the backoff cap.
    registry.set_hosts(&[H1, H2, H3, H4]);
    registry.set_answer(EtcdAnswer::Hosts);
    let mut joined = None;
    for second in 1..=12 {
        host.advance(Duration::from_secs(1));
        if routable(&users(&host)).len() == 4 {
            joined = Some(second);
            break;
        }
    }
    assert!(joined.is_some(), "the new instance never joined");
    assert_eq!(users(&host).freshness, Freshness::Fresh);
    assert!(gauge(&host, "data_age_ms") < 1000);
    assert!(
        vms[0].has_log("registry refresh succeeded again")
            || vms[1].has_log("registry refresh succeeded again")
    );
}

#[test]
fn an_etcd_outage_flags_the_set_stale_keeps_it_and_a_new_instance_joins_after() {
    // discovery_envoy.rs's outage with the configuration as written (max_stale 5m): etcd
    // stopped for 30 s, then back with a new instance.
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, &with_admin(), 2);
    host.advance(Duration::from_secs(3));
    assert_eq!(routable(&users(&host)), [H1, H2, H3]);
    let failed_before = counter(&host, "refresh_failed");

    registry.set_answer(EtcdAnswer::ConnectFailure);
    let mut ages = Vec::new();
    for _ in 0..30 {
        host.advance(Duration::from_secs(1));
        assert_eq!(
            routable(&users(&host)),
            [H1, H2, H3],
            "the last known set serves"
        );
        ages.push(gauge(&host, "data_age_ms"));
    }
    assert!(ages.windows(2).all(|w| w[1] >= w[0]), "{ages:?}");
    assert!(*ages.last().unwrap() >= 28_000, "{ages:?}");
    assert_eq!(gauge(&host, "freshness"), 1, "flagged stale");
    assert_eq!(admin(&vms[1])["services"][0]["freshness"], "stale");
    let failed = counter(&host, "refresh_failed") - failed_before;
    assert!(
        (3..=20).contains(&failed),
        "{failed} attempts in 30 s: backoff"
    );
    assert!(host
        .logs()
        .iter()
        .any(|(_, l)| l.message.contains("registry refresh failed")));

    // etcd comes back and a new instance registers: it joins within the backoff cap.
    registry.set_hosts(&[H1, H2, H3, H4]);
    registry.set_answer(EtcdAnswer::Hosts);
    let mut joined = false;
    for _ in 0..120 {
        host.advance(ms(100));
        if routable(&users(&host)) == [H1, H2, H3, H4] {
            joined = true;
            break;
        }
    }
    assert!(joined, "the new instance never joined: {:?}", users(&host));
    host.advance(ms(300));
    assert_eq!(gauge(&host, "freshness"), 0);
    assert!(gauge(&host, "data_age_ms") < 2_000);
    no_crash(&vms);
}

// ----- configuration -----

#[test]
fn the_minimal_configuration_works_as_written() {
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1]);
    let vms = workers(&host, MINIMAL, 2);
    host.advance(Duration::from_secs(2));
    assert_eq!(routable(&users(&host)), [H1]);
    assert!(vms[0].has_log("configured services: users"));
}

#[test]
fn a_bad_configuration_is_refused_with_the_field_named() {
    let cases: Vec<(String, &str)> = vec![
        (
            config(&[], &[("refresh", "fast".into())]),
            "services[0].refresh: expected a duration",
        ),
        (
            config(&[], &[("refresh", "10ms".into())]),
            "services[0].refresh: must be at least 100ms",
        ),
        (
            config(&[], &[("refersh", "1s".into())]),
            "services[0].refersh",
        ),
        (
            config(
                &[],
                &[(
                    "health_check",
                    serde_json::json!({"path": "/healthz", "unhealthy_threshold": 0}),
                )],
            ),
            "services[0].health_check.unhealthy_threshold",
        ),
        (
            config(
                &[],
                &[(
                    "source",
                    serde_json::json!({"etcd": {"cluster": "etcd\r\nx: y", "prefix": "/p/"}}),
                )],
            ),
            "services[0].source.etcd.cluster",
        ),
        (
            config(
                &[],
                &[("passive", serde_json::json!({"max_ejection_percent": 150}))],
            ),
            "services[0].passive.max_ejection_percent",
        ),
        (
            config(&[("admin_path", "status".into())], &[]),
            "admin_path: must be a path",
        ),
        (
            r#"{"services": []}"#.to_string(),
            "services: must list at least one service",
        ),
        (String::new(), "configuration is empty"),
    ];
    for (json, needle) in cases {
        let host = Host::new();
        let vm = host
            .vm("discovery")
            .root_id("discovery")
            .vm_id("keel")
            .config(json.as_str())
            .start()
            .unwrap();
        assert!(!vm.configured(), "{json} was accepted");
        assert!(vm.crashed().is_none());
        assert!(
            vm.has_log(&format!("keel discovery: {needle}"))
                || (needle.starts_with("configuration") && vm.has_log(needle)),
            "{json}: {:?}",
            vm.logs()
        );
        assert!(vm.has_log("configuration refused"));
    }
}

// ----- active checks -----

#[test]
fn failing_checks_take_a_host_out_and_passing_ones_bring_it_back() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, MINIMAL, 2);
    host.advance(Duration::from_secs(2));
    assert_eq!(routable(&users(&host)), [H1, H2, H3]);
    let call = registry
        .checks()
        .into_iter()
        .find(|c| c.header("x-envoy-original-dst-host") == Some(H3))
        .unwrap();
    assert_eq!(call.path(), "/healthz");
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(call.header(":authority"), Some("users"));
    assert_eq!(call.timeout, Some(Duration::from_secs(1)));

    // Host 3 starts failing: out after unhealthy_threshold (2) failed checks, within
    // 2 × interval + one interval; known all along.
    registry.set_check(H3, Some(HealthAnswer::Status(503)));
    let failing_since = host.elapsed();
    let failed_before = counter(&host, "checks_failed");
    let mut out_after = None;
    for _ in 0..50 {
        host.advance(ms(100));
        if !routable(&users(&host)).contains(&H3) {
            out_after = Some(host.elapsed() - failing_since);
            break;
        }
    }
    let out_after = out_after.expect("host 3 leaves the traffic");
    assert!(out_after <= Duration::from_secs(3), "{out_after:?}");
    assert_eq!(counter(&host, "checks_failed") - failed_before, 2);
    let set = users(&host);
    assert_eq!(addresses(&set), [H1, H2, H3]);
    assert!(!set.find(H3).unwrap().check_healthy);
    host.advance(ms(200));
    assert_eq!(gauge(&host, "endpoints_known"), 3);
    assert_eq!(gauge(&host, "endpoints_healthy"), 2);
    assert!(vms.iter().any(|vm| vm
        .has_log("127.0.0.1:18093 is now unhealthy by active checks (last check: status 503)")));

    // It recovers: back after healthy_threshold (1) passing check, within one interval.
    registry.set_check(H3, None);
    let healthy_since = host.elapsed();
    let mut back_after = None;
    for _ in 0..30 {
        host.advance(ms(100));
        if routable(&users(&host)).contains(&H3) {
            back_after = Some(host.elapsed() - healthy_since);
            break;
        }
    }
    let back_after = back_after.expect("host 3 comes back");
    assert!(
        back_after <= Duration::from_secs(1) + ms(100),
        "{back_after:?}"
    );

    // A check that times out, and one whose connection is reset, fail too.
    registry.set_check(H1, Some(HealthAnswer::Hang));
    registry.set_check(H2, Some(HealthAnswer::Reset));
    host.advance(Duration::from_secs(5));
    assert_eq!(routable(&users(&host)), [H3]);
    no_crash(&vms);
}

#[test]
fn a_new_host_gets_traffic_after_one_passing_check() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1]);
    registry.set_check(H2, Some(HealthAnswer::Status(500)));
    let _vms = workers(&host, MINIMAL, 1);
    host.advance(Duration::from_secs(2));
    registry.set_hosts(&[H1, H2]);
    host.advance(Duration::from_secs(2));
    // Known, never passed a check: no traffic.
    let set = users(&host);
    assert_eq!(addresses(&set), [H1, H2]);
    assert_eq!(routable(&set), [H1]);
    registry.set_check(H2, None);
    host.advance(Duration::from_secs(2));
    assert_eq!(routable(&users(&host)), [H1, H2]);
}

// ----- passive ejection -----

fn passive_config() -> String {
    r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s"}], "admin_path": "/keel/discovery"}"#.to_string()
}

#[test]
fn consecutive_failures_of_real_traffic_eject_a_host_for_a_growing_time() {
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, &passive_config(), 2);
    host.advance(Duration::from_secs(2));
    assert_eq!(routable(&users(&host)), [H1, H2, H3]);

    // Five failures in a row from two workers: 503s, a reset, a timeout. A success of another
    // host does not interrupt host 1's run.
    traffic(&vms[0], H1, 503, Some("via_upstream"));
    traffic(&vms[1], H1, 502, None);
    traffic(&vms[0], H2, 200, None);
    traffic(
        &vms[1],
        H1,
        503,
        Some("upstream_reset_before_response_started{connection_failure}"),
    );
    traffic(&vms[0], H1, 504, Some("upstream_response_timeout"));
    assert!(users(&host).find(H1).unwrap().ejected_until.is_none());
    let ejected_at = now(&host);
    traffic(&vms[1], H1, 500, None);
    let set = users(&host);
    let one = set.find(H1).unwrap();
    assert_eq!(
        one.ejected_until,
        Some(ejected_at.saturating_add(keel_core::time::Duration::from_secs(30)))
    );
    assert_eq!(routable(&set), [H2, H3]);
    assert_eq!(counter(&host, "ejections"), 1);
    assert!(vms[1].has_log("127.0.0.1:18091 ejected for 30s after 5 consecutive failures"));
    host.advance(ms(200));
    assert_eq!(gauge(&host, "endpoints_ejected"), 1);
    assert_eq!(gauge(&host, "endpoints_routable"), 2);
    assert_eq!(
        admin(&vms[0])["services"][0]["endpoints"][0]["routable"],
        false
    );

    // At most 10 % of the hosts are ejected, but always one: host 2 is not ejected now.
    for _ in 0..5 {
        traffic(&vms[0], H2, 503, None);
    }
    assert_eq!(routable(&users(&host)), [H2, H3]);
    assert_eq!(counter(&host, "ejections_refused"), 1);

    // A success in between restarts the count.
    for status in [503, 503, 503, 503, 200, 503, 503, 503, 503] {
        traffic(&vms[1], H3, status, None);
    }
    assert!(users(&host).find(H3).unwrap().ejected_until.is_none());

    // After 30 s host 1 is back; ejected again, it is out for twice as long.
    host.advance(Duration::from_secs(30));
    assert!(routable(&users(&host)).contains(&H1));
    let again_at = now(&host);
    for _ in 0..5 {
        traffic(&vms[0], H1, 503, None);
    }
    let one = users(&host).find(H1).unwrap().clone();
    assert_eq!(one.ejections, 2);
    assert_eq!(
        one.ejected_until,
        Some(again_at.saturating_add(keel_core::time::Duration::from_secs(60)))
    );
    no_crash(&vms);
}

#[test]
fn an_ejected_host_stays_out_while_its_active_checks_pass() {
    // discovery_envoy.rs: with the configuration as written (active checks on), an instance
    // that fails real traffic but passes its checks is ejected, and stays ejected.
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, &with_admin(), 2);
    host.advance(Duration::from_secs(2));
    assert_eq!(routable(&users(&host)), [H1, H2, H3]);
    for i in 0..5 {
        traffic(&vms[i % 2], H3, 503, Some("via_upstream"));
    }
    assert_eq!(routable(&users(&host)), [H1, H2]);
    assert_eq!(counter(&host, "ejections"), 1);
    assert!(vms
        .iter()
        .any(|vm| vm.has_log("127.0.0.1:18093 ejected for 30s after 5 consecutive failures")));
    // Three seconds of passing checks later it is still out, and the admin document says why.
    let checks_before = counter(&host, "checks_passed");
    host.advance(Duration::from_secs(3));
    assert!(counter(&host, "checks_passed") >= checks_before + 6);
    assert_eq!(routable(&users(&host)), [H1, H2]);
    let doc = admin(&vms[0]);
    let record = doc["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == H3)
        .unwrap()
        .clone();
    assert_eq!(record["check_healthy"], true, "{record}");
    assert_eq!(record["routable"], false, "{record}");
    let for_ms = record["ejected_for_ms"].as_u64().unwrap();
    assert!((25_000..=30_000).contains(&for_ms), "{record}");
    assert_eq!(gauge(&host, "endpoints_ejected"), 1);
    no_crash(&vms);
}

#[test]
fn traffic_outside_the_set_or_without_an_upstream_is_not_counted() {
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, &passive_config(), 1);
    host.advance(Duration::from_secs(2));
    let keys_before = host.shared_data_keys("keel");
    for _ in 0..10 {
        traffic(&vms[0], "10.9.9.9:80", 503, None);
        traffic(&vms[0], "not an address", 503, None);
        // A local reply: no upstream host.
        let stream = vms[0].http_stream();
        stream.request_headers(request("GET", "/"), true);
        stream.response_headers(response(503), true);
        stream.finish();
    }
    assert_eq!(host.shared_data_keys("keel"), keys_before);
    assert_eq!(counter(&host, "ejections"), 0);

    // Passive ejection turned off.
    let off = Host::new();
    ScriptedEtcd::install(&off, &[H1, H2, H3]);
    let cfg = passive_config().replace(
        r#""refresh": "1s""#,
        r#""refresh": "1s", "passive": {"enabled": false}"#,
    );
    let vms = workers(&off, &cfg, 1);
    off.advance(Duration::from_secs(2));
    for _ in 0..10 {
        traffic(&vms[0], H1, 503, None);
    }
    assert_eq!(routable(&published(&off, "users").unwrap()), [H1, H2, H3]);
}

// ----- registry membership -----

#[test]
fn a_host_the_registry_drops_is_removed_and_forgotten() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let vms = workers(&host, &passive_config(), 2);
    host.advance(Duration::from_secs(2));
    for _ in 0..3 {
        traffic(&vms[0], H2, 503, None);
    }
    let key = "keel/discovery/users/passive/127.0.0.1:18092";
    let count = |host: &Host| {
        PassiveCounter::decode(&host.shared_data_in("keel", key).unwrap().0)
            .unwrap()
            .consecutive_failures
    };
    assert_eq!(count(&host), 3);
    // Host 2's lease lapses: the next refresh drops it.
    registry.set_hosts(&[H1, H3]);
    host.advance(Duration::from_secs(1));
    assert_eq!(addresses(&users(&host)), [H1, H3]);
    assert_eq!(count(&host), 0);
    // It comes back with a clean record.
    registry.set_hosts(&[H1, H2, H3]);
    host.advance(Duration::from_secs(1));
    for _ in 0..4 {
        traffic(&vms[1], H2, 503, None);
    }
    assert!(users(&host).find(H2).unwrap().ejected_until.is_none());
    assert!(vms
        .iter()
        .any(|vm| vm.has_log("users: 2 endpoints (0 new, 1 gone)")));
}

// ----- hostile registries -----

#[test]
fn hostile_entries_are_skipped_logged_once_and_never_reach_a_header() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[]);
    let ok = r#"{"address":"127.0.0.1","port":18091}"#;
    let long_zone = format!(
        r#"{{"address":"127.0.0.3","port":80,"zone":"{}"}}"#,
        "z".repeat(300)
    );
    let kvs: Vec<(&str, &str)> = vec![
        ("/services/users/ok", ok),
        (
            "/services/users/inject",
            "{\"address\":\"127.0.0.1\\r\\nx-evil: 1\",\"port\":18092}",
        ),
        (
            "/services/users/host",
            r#"{"address":"evil.example.com","port":80}"#,
        ),
        (
            "/services/users/port",
            r#"{"address":"127.0.0.2","port":70000}"#,
        ),
        ("/services/users/zone", &long_zone),
        ("/services/users/notjson", "not json"),
        ("/services/other/x", r#"{"address":"127.0.0.9","port":80}"#),
        ("/services/users/dup", ok),
        (
            "/services/users/weight",
            r#"{"address":"127.0.0.4","port":80,"weight":0}"#,
        ),
    ];
    let mut body = range_response(&kvs, 7);
    // One value that is not even base64.
    body = body.replacen(
        r#""kvs":["#,
        r#""kvs":[{"key":"L3NlcnZpY2VzL3VzZXJzL2I2NA==","value":"%%%"},"#,
        1,
    );
    registry.set_answer(EtcdAnswer::Body(body.into_bytes()));
    let vms = workers(&host, &with_admin(), 2);
    host.advance(Duration::from_secs(5));
    no_crash(&vms);

    let set = users(&host);
    assert_eq!(addresses(&set), [H1]);
    assert_eq!(routable(&set), [H1]);
    // 9 entries skipped per answer, 5 answers.
    assert_eq!(counter(&host, "entries_skipped"), 9 * 5);
    // Logged once, the first 8 with reasons, then a count, though every refresh saw them.
    let logs: Vec<String> = host.logs().into_iter().map(|(_, e)| e.message).collect();
    let skipped = logs
        .iter()
        .filter(|l| l.contains("skipped registry entry"))
        .count();
    assert_eq!(skipped, 8, "{logs:#?}");
    assert!(logs
        .iter()
        .any(|l| l.contains("1 more registry entries skipped")));
    assert!(logs.iter().any(|l| l.contains("is a host name")));
    assert!(logs.iter().all(|l| !l.contains('\r') && !l.contains('\n')));
    // Health checks only ever name the valid host.
    for check in registry.checks() {
        assert_eq!(check.header("x-envoy-original-dst-host"), Some(H1));
    }
    // The admin document is valid JSON naming only the valid host.
    let doc = admin(&vms[0]);
    assert_eq!(doc["services"][0]["endpoints"].as_array().unwrap().len(), 1);
}

#[test]
fn random_and_oversized_answers_never_crash_and_keep_the_set() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2]);
    let cfg = config(&[], &[("max_endpoints", 2.into())]);
    let vms = workers(&host, &cfg, 2);
    host.advance(Duration::from_secs(2));
    registry.set_answer(EtcdAnswer::Noise);
    let failed_before = counter(&host, "refresh_failed");
    for _ in 0..90 {
        host.advance(Duration::from_secs(10));
        let set = users(&host);
        // Whatever got through is a valid set: at most max_endpoints, canonical addresses.
        assert!(set.endpoints.len() <= 2);
        for r in &set.endpoints {
            let parsed: std::net::SocketAddr = r.address.parse().unwrap();
            assert_eq!(parsed.to_string(), r.address);
        }
    }
    let attempts = registry.reads().len();
    assert!(attempts > 100, "{attempts} noisy answers");
    assert!(counter(&host, "refresh_failed") > failed_before + 50);
    no_crash(&vms);
    // max_endpoints 2 allows 64 KiB + 2 × 16 KiB; a bigger answer is refused unread.
    let mut big = b"{\"header\":{\"revision\":\"1\"},\"pad\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 100 * 1024));
    big.extend_from_slice(b"\"}");
    registry.set_answer(EtcdAnswer::Body(big));
    host.advance(Duration::from_secs(15));
    assert!(vms.iter().any(|vm| vm.has_log("above the limit of 98304")));
    no_crash(&vms);
}

// ----- other sources -----

#[test]
fn consul_blocking_queries_echo_the_index() {
    let host = Host::new();
    let cfg = r#"{"services": [{"name": "users", "source": {"consul": {"cluster": "consul", "service": "users", "wait": "30s"}}, "refresh": "1s"}]}"#;
    let vms = workers(&host, cfg, 1);
    let entry = |port: u16, status: &str| {
        format!(
            r#"{{"Node":{{"Node":"n1","Address":"10.0.0.1"}},"Service":{{"ID":"users-{port}","Service":"users","Address":"127.0.0.1","Port":{port},"Tags":["v1"],"Meta":{{"zone":"eu-1a"}},"Weights":{{"Passing":2,"Warning":1}}}},"Checks":[{{"Status":"{status}"}}]}}"#
        )
    };
    host.advance(ms(100));
    let call = vms[0].next_callout().expect("a consul callout");
    assert_eq!(call.upstream, "consul");
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(call.path(), "/v1/health/service/users?passing");
    call.respond(
        Response::new(200)
            .header("x-consul-index", "42")
            .body(format!(
                "[{},{}]",
                entry(18091, "passing"),
                entry(18092, "critical")
            )),
    );
    let set = users(&host);
    assert_eq!(addresses(&set), [H1, H2]);
    // A host Consul calls critical is known but gets no traffic.
    assert_eq!(routable(&set), [H1]);
    assert_eq!(
        (set.endpoints[0].weight, set.endpoints[0].zone.as_str()),
        (2, "eu-1a")
    );

    // The next query blocks on index 42, with a callout timeout beyond the wait.
    host.advance(Duration::from_secs(1));
    let call = vms[0].next_callout().expect("a blocking query");
    assert_eq!(
        call.path(),
        "/v1/health/service/users?passing&index=42&wait=30s"
    );
    assert!(call.timeout.unwrap() > Duration::from_secs(30));
    // Consul answers when something changes.
    call.respond(
        Response::new(200)
            .header("x-consul-index", "43")
            .body(format!("[{}]", entry(18093, "passing")))
            .after(Duration::from_secs(12)),
    );
    host.advance(Duration::from_secs(13));
    assert_eq!(addresses(&users(&host)), [H3]);
    host.advance(Duration::from_secs(1));
    let call = vms[0].next_callout().expect("the next blocking query");
    assert!(call.path().contains("index=43"), "{}", call.path());
    no_crash(&vms);
}

#[test]
fn a_static_list_is_published_without_a_registry() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[]);
    registry.set_check(H2, Some(HealthAnswer::Status(503)));
    let cfg = r#"{"services": [{"name": "users", "source": {"static": [{"address": "127.0.0.1", "port": 18091, "zone": "a"}, {"address": "127.0.0.1", "port": 18092, "weight": 3}]}, "health_check": {"path": "/healthz", "interval": "1s"}},
                  {"name": "orders", "source": {"static": [{"address": "::1", "port": 8080}]}}], "admin_path": "/keel/discovery"}"#;
    let vms = workers(&host, cfg, 2);
    host.advance(Duration::from_secs(3));
    assert!(registry.reads().is_empty());
    let set = users(&host);
    assert_eq!(addresses(&set), [H1, H2]);
    assert_eq!(routable(&set), [H1]);
    let orders = published(&host, "orders").unwrap();
    assert_eq!(routable(&orders), ["[::1]:8080"]);
    assert_eq!(host.gauge("keel.discovery.orders.endpoints_known"), 1);
    let doc = admin(&vms[1]);
    assert_eq!(doc["services"][1]["name"], "orders");
    assert_eq!(doc["services"][1]["endpoints"][0]["address"], "[::1]:8080");
}
