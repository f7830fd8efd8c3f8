//! Discovery and picker composed in Keel's wasmtime host: the harness twin of
//! `discovery_picker_envoy.rs` and of the composed tests of `picker_envoy.rs`.
//!
//! Each worker runs both modules as Envoy does, two VMs with the same `vm_id` (`keel`), so the
//! picker reads the set discovery publishes in the host's shared data. A request goes through
//! the discovery filter first (it watches outcomes), then the picker, whose chosen host is what
//! the "upstream" answers from. The registry (etcd's `/v3/kv/range`) and the instances'
//! `/healthz` are played by `harness::ScriptedEtcd`; time is the host's virtual clock. Where the
//! Envoy test watches a lease lapse in a real etcd, the registry here stops listing the
//! instance, which is what etcd does once the lease has lapsed (the TTL itself is etcd's clock,
//! not the filter's).
//!
//! Build the modules first (`make build`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_host_tests::harness::{request, response, Action, Host, ScriptedEtcd, Vm};
use serde_json::Value;

/// `envoy/discovery-picker.yaml`'s discovery configuration, as written.
const DISCOVERY: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s", "health_check": {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2, "healthy_threshold": 1}}], "admin_path": "/keel/discovery"}"#;
/// `envoy/discovery-picker.yaml`'s picker configuration, as written.
const PICKER: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "service": "users"}]}"#;
const ADMIN: &str = "/keel/discovery";
const DST: &str = "x-envoy-original-dst-host";

/// As in the configuration: `refresh`, the check `interval` and the thresholds.
const REFRESH: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_secs(1);
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 1;
/// Discovery's tick for this configuration (a tenth of the shortest period): the resolution of
/// everything it does, so bounds allow one.
const TICK: Duration = Duration::from_millis(100);

const H1: &str = "127.0.0.1:18091";
const H2: &str = "127.0.0.1:18092";
const H3: &str = "127.0.0.1:18093";
const H4: &str = "127.0.0.1:18094";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ----- one Envoy worker: discovery, then the picker -----

struct Worker {
    discovery: Vm,
    picker: Vm,
}

/// `n` workers, each with a discovery VM and a picker VM sharing the `keel` vm_id.
fn workers(host: &Host, discovery: &str, picker: &str, n: usize) -> Vec<Worker> {
    let start = |module: &str, config: &str| {
        let vms = host
            .vm(module)
            .root_id(module)
            .vm_id("keel")
            .config(config)
            .start_workers(n)
            .expect("the module loads (run `make build` first)");
        for vm in &vms {
            assert!(vm.configured(), "{module} refused: {:?}", vm.logs());
        }
        vms
    };
    let discovery = start("discovery", discovery);
    let picker = start("picker", picker);
    discovery
        .into_iter()
        .zip(picker)
        .map(|(discovery, picker)| Worker { discovery, picker })
        .collect()
}

/// One request with `x-user: user` through the worker's chain. The picked host answers 200;
/// the host it went to, or `None` when the picker answered itself (no host).
fn route(worker: &Worker, user: &str) -> Option<String> {
    let headers = request("GET", "/users").with("x-user", user);
    let d = worker.discovery.http_stream();
    d.set_property("route_name", "users");
    assert_eq!(d.request_headers(headers.clone(), true), Action::Continue);
    let p = worker.picker.http_stream();
    p.set_property("route_name", "users");
    p.request_headers(headers, true);
    if p.local_reply().is_some() {
        p.finish();
        d.finish();
        return None;
    }
    let dst = p
        .request_header(DST)
        .expect("the picker set the routing header");
    // Envoy's ORIGINAL_DST cluster sends it there; discovery sees the outcome at its end.
    d.set_property("upstream.address", dst.as_str());
    p.response_headers(response(200), true);
    d.response_headers(response(200), true);
    p.finish();
    d.finish();
    Some(dst)
}

/// Each key once, alternating over the workers starting at `first`; who served each.
fn serve(workers: &[Worker], keys: &[String], first: usize) -> Vec<String> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            route(&workers[(first + i) % workers.len()], k)
                .unwrap_or_else(|| panic!("{k}: no host"))
        })
        .collect()
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn tally(served: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for s in served {
        *t.entry(s.clone()).or_default() += 1;
    }
    t
}

/// The admin document, as a worker's discovery filter answers it.
fn status(worker: &Worker) -> Value {
    let s = worker.discovery.send_request(request("GET", ADMIN));
    let reply = s.local_reply().expect("the admin path is answered");
    assert_eq!(reply.status, 200);
    serde_json::from_slice(&reply.body).expect("JSON")
}

fn addresses(doc: &Value, routable_only: bool) -> Vec<String> {
    let mut out: Vec<String> = doc["services"][0]["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|e| !routable_only || e["routable"] == true)
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn routable(worker: &Worker) -> Vec<String> {
    addresses(&status(worker), true)
}

fn known(worker: &Worker) -> Vec<String> {
    addresses(&status(worker), false)
}

fn all(hosts: &[&str]) -> Vec<String> {
    hosts.iter().map(|h| h.to_string()).collect()
}

/// A host with the registry and two workers, once the three instances are routable.
fn rig() -> (Host, Arc<ScriptedEtcd>, Vec<Worker>) {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1, H2, H3]);
    let ws = workers(&host, DISCOVERY, PICKER, 2);
    // Before anything is published the picker has no host.
    assert_eq!(route(&ws[0], "early"), None);
    // One registry read, then one passing check each (healthy_threshold 1).
    host.advance(REFRESH + INTERVAL);
    assert_eq!(routable(&ws[1]), all(&[H1, H2, H3]));
    (host, registry, ws)
}

fn no_crash(workers: &[Worker]) {
    for w in workers {
        for vm in [&w.discovery, &w.picker] {
            assert!(vm.crashed().is_none(), "crashed: {:?}", vm.crashed());
        }
    }
}

/// Moves time on in `TICK` steps for `span`, serving `per_step` new keys each step; returns
/// `(virtual time since the host started, who served)` for every request.
fn traffic(
    host: &Host,
    workers: &[Worker],
    tag: &str,
    span: Duration,
    per_step: usize,
) -> Vec<(Duration, String)> {
    let mut out = Vec::new();
    let mut n = 0;
    let end = host.elapsed() + span;
    while host.elapsed() < end {
        host.advance(TICK);
        let batch = keys(&format!("{tag}-{n}"), per_step);
        n += 1;
        let at = host.elapsed();
        out.extend(serve(workers, &batch, n).into_iter().map(|s| (at, s)));
    }
    out
}

// ----- the tests -----

#[test]
fn varied_keys_spread_over_the_three_registered_instances_and_each_key_sticks() {
    let (host, _registry, ws) = rig();
    let users = keys("user", 600);
    let first = serve(&ws, &users, 0);
    let shares = tally(&first);
    assert_eq!(shares.len(), 3, "{shares:?}");
    for (instance, n) in &shares {
        assert!(
            (120..=280).contains(n),
            "{instance} got {n} of 600: {shares:?}"
        );
    }
    // The same keys again, each on the other worker: every key lands on the same instance.
    let second = serve(&ws, &users, 1);
    let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count();
    assert_eq!(moved, 0, "{moved} keys moved with an unchanged set");
    // The picks counters (flushed every second) agree with what the instances served.
    host.advance(Duration::from_secs(1));
    for (instance, n) in &shares {
        assert_eq!(
            host.counter(&format!("keel.picker.users.picks.{instance}")),
            2 * *n as u64
        );
    }
    assert_eq!(
        host.counter("keel.picker.users.no_host"),
        1,
        "only before publication"
    );
    no_crash(&ws);
}

#[test]
fn an_instance_whose_lease_lapses_stops_getting_traffic_within_one_refresh() {
    let (host, registry, ws) = rig();
    let users = keys("user", 300);
    let before = serve(&ws, &users, 0);
    assert!(before.iter().any(|s| s == H1));

    // The lease lapses: from now on etcd no longer lists the instance.
    let lapsed_at = host.elapsed();
    registry.set_hosts(&[H2, H3]);
    let seen = traffic(&host, &ws, "lapse", REFRESH + Duration::from_secs(3), 30);
    let last = seen
        .iter()
        .filter(|(_, s)| s == H1)
        .map(|(at, _)| *at - lapsed_at)
        .max();
    if let Some(last) = last {
        assert!(last <= REFRESH + TICK, "served {last:?} after the lapse");
    }
    // The others carried the traffic to the end.
    let late: Vec<&(Duration, String)> = seen
        .iter()
        .filter(|(at, _)| *at > lapsed_at + REFRESH + TICK)
        .collect();
    assert!(late.len() >= 300);
    assert!(late.iter().all(|(_, s)| s != H1));
    assert_eq!(known(&ws[0]), all(&[H2, H3]));
    // Only the lapsed instance's keys moved.
    let after = serve(&ws, &users, 0);
    for ((u, was), now) in users.iter().zip(&before).zip(&after) {
        if was != H1 {
            assert_eq!(now, was, "{u} moved although {was} is registered");
        }
    }
    no_crash(&ws);
}

#[test]
fn an_instance_failing_its_health_check_loses_its_traffic_and_gets_it_back() {
    let (host, registry, ws) = rig();
    let users = keys("user", 300);
    let before = serve(&ws, &users, 0);

    let failing_since = host.elapsed();
    registry.set_healthy(H2, false);
    let bound = INTERVAL * UNHEALTHY_THRESHOLD + INTERVAL;
    let seen = traffic(&host, &ws, "sick", bound + Duration::from_secs(3), 30);
    let last = seen
        .iter()
        .filter(|(_, s)| s == H2)
        .map(|(at, _)| *at - failing_since)
        .max()
        .expect("it served until its checks failed");
    assert!(
        last <= bound,
        "served {last:?} after its checks started failing"
    );
    // It needed unhealthy_threshold failed checks: it kept traffic through the first interval.
    assert!(
        last >= INTERVAL - TICK,
        "out after {last:?}, before two checks failed"
    );
    let late: Vec<&(Duration, String)> = seen
        .iter()
        .filter(|(at, _)| *at > failing_since + bound)
        .collect();
    assert!(late.len() >= 300);
    assert!(late.iter().all(|(_, s)| s != H2));
    // Known but not routable: it is still checked, so it can come back.
    assert!(known(&ws[0]).contains(&H2.to_string()));
    assert!(!routable(&ws[1]).contains(&H2.to_string()));
    assert!(host.counter("keel.discovery.users.checks_failed") >= 2);

    // Healthy again: one passing check (healthy_threshold 1), then traffic; every key home.
    let healthy_since = host.elapsed();
    registry.set_healthy(H2, true);
    let back_bound = INTERVAL * HEALTHY_THRESHOLD + INTERVAL;
    let seen = traffic(&host, &ws, "healed", back_bound + TICK, 30);
    let first = seen
        .iter()
        .find(|(_, s)| s == H2)
        .map(|(at, _)| *at - healthy_since)
        .expect("it serves again");
    assert!(first <= back_bound, "traffic again only after {first:?}");
    assert_eq!(serve(&ws, &users, 1), before);
    no_crash(&ws);
}

#[test]
fn an_etcd_outage_of_30s_keeps_every_request_served_and_a_new_instance_joins_after() {
    let (host, registry, ws) = rig();
    let failed_before = host.counter("keel.discovery.users.refresh_failed");
    let reads_before = registry.reads().len();
    registry.set_down(true);
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    let mut stale_seen = false;
    for second in 0..30 {
        // Every request of the second is served by the last known set.
        let served = traffic(
            &host,
            &ws,
            &format!("outage-{second}"),
            Duration::from_secs(1),
            3,
        );
        for (_, s) in served {
            *per_instance.entry(s).or_default() += 1;
        }
        let doc = status(&ws[second % 2]);
        assert_eq!(
            addresses(&doc, true),
            all(&[H1, H2, H3]),
            "the last known set serves"
        );
        stale_seen |= doc["services"][0]["freshness"] == "stale";
    }
    // Served by the whole last known set, not a remnant of it.
    assert_eq!(per_instance.values().sum::<usize>(), 900);
    for h in [H1, H2, H3] {
        assert!(
            per_instance.get(h).copied().unwrap_or(0) >= 150,
            "{per_instance:?}"
        );
    }
    assert!(stale_seen, "never flagged stale: {}", status(&ws[0]));
    // Refreshes went on, backing off: fewer than one a second.
    let failed = host.counter("keel.discovery.users.refresh_failed") - failed_before;
    let tries = registry.reads().len() - reads_before;
    assert!(
        (3..=20).contains(&failed),
        "{failed} failed refreshes in 30 s"
    );
    assert_eq!(failed as usize, tries);

    // etcd comes back and a fourth instance registers: it gets traffic within the backoff cap
    // (10 x refresh) plus one passing check.
    let back_at = host.elapsed();
    registry.set_hosts(&[H1, H2, H3, H4]);
    registry.set_down(false);
    let bound = REFRESH * 10 + INTERVAL * HEALTHY_THRESHOLD + TICK;
    let seen = traffic(&host, &ws, "back", bound + TICK, 30);
    let joined = seen
        .iter()
        .find(|(_, s)| s == H4)
        .map(|(at, _)| *at - back_at)
        .expect("the new instance gets traffic");
    assert!(joined <= bound, "joined after {joined:?}");
    assert_eq!(routable(&ws[0]), all(&[H1, H2, H3, H4]));
    assert_eq!(status(&ws[1])["services"][0]["freshness"], "fresh");
    no_crash(&ws);
}

#[test]
fn the_registry_sees_one_poller_for_the_whole_process() {
    let (host, registry, ws) = rig();
    let reads_before = registry.reads().len();
    // Traffic on both workers meanwhile: serving requests must not make anyone else poll.
    let served = traffic(&host, &ws, "poller", Duration::from_secs(10), 6);
    assert_eq!(served.len(), 600);
    let reads = &registry.reads()[reads_before..];
    assert_eq!(reads.len(), 10, "one read per refresh: {reads:?}");
    assert!(reads.iter().all(|vm| *vm == reads[0]));
    assert!(ws.iter().any(|w| w.discovery.index() == reads[0]));
    assert_eq!(host.counter("keel.discovery.poller.acquired"), 1);
    // The picker never calls anyone: it only reads what discovery published.
    assert!(ws.iter().all(|w| w.picker.callouts().is_empty()));
}

// ----- `picker_envoy.rs`'s composition: a static list with fast checks, Maglev -----

/// Discovery over a static list (priorities given) with checks every 100 ms, one failure
/// taking an endpoint out and one success bringing it back; the picker on Maglev.
fn static_rig(priorities: [u8; 3]) -> (Host, Arc<ScriptedEtcd>, Vec<Worker>) {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[]);
    let statics: Vec<String> = [18091, 18092, 18093]
        .iter()
        .zip(priorities)
        .map(|(p, prio)| format!(r#"{{"address": "127.0.0.1", "port": {p}, "priority": {prio}}}"#))
        .collect();
    let discovery = format!(
        r#"{{"services": [{{"name": "users", "source": {{"static": [{}]}}, "refresh": "1s", "health_check": {{"path": "/healthz", "interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1, "healthy_threshold": 1}}, "passive": {{"enabled": false}}}}], "admin_path": "/keel/discovery"}}"#,
        statics.join(", ")
    );
    let picker = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "maglev", "service": "users"}]}"#;
    let ws = workers(&host, &discovery, picker, 2);
    host.advance(ms(300));
    assert_eq!(routable(&ws[0]), all(&[H1, H2, H3]));
    assert!(
        registry.reads().is_empty(),
        "a static list reads no registry"
    );
    (host, registry, ws)
}

#[test]
fn with_static_discovery_an_unhealthy_endpoint_loses_only_its_own_keys() {
    let (host, registry, ws) = static_rig([0, 0, 0]);
    let users = keys("user", 600);
    let before = serve(&ws, &users, 0);
    assert_eq!(tally(&before).len(), 3, "{:?}", tally(&before));

    registry.set_healthy(H2, false);
    host.advance(ms(300));
    assert_eq!(routable(&ws[0]), all(&[H1, H3]));
    let after = serve(&ws, &users, 1);
    let mut moved = 0;
    for ((u, was), now) in users.iter().zip(&before).zip(&after) {
        assert_ne!(now, H2, "{u} still goes to the unhealthy endpoint");
        if was == H2 {
            moved += 1;
        } else {
            assert_eq!(now, was, "{u} moved although {was} is healthy");
        }
    }
    assert_eq!(moved, before.iter().filter(|w| *w == H2).count());
    assert!(
        tally(&after).values().all(|&n| n > 200),
        "{:?}",
        tally(&after)
    );

    // Healthy again: every key goes home.
    registry.set_healthy(H2, true);
    host.advance(ms(300));
    assert_eq!(serve(&ws, &users, 0), before);
    // Three versions reached the picker (all healthy, H2 down, H2 up): each applied once by
    // each worker, and only the first built a table.
    assert_eq!(host.counter("keel.picker.users.set_updates"), 6);
    assert_eq!(
        host.counter("keel.picker.users.rebuilds"),
        2,
        "health changes rebuild no table"
    );
    no_crash(&ws);
}

#[test]
fn with_static_discovery_priority_one_takes_the_traffic_when_priority_zero_is_down() {
    let (host, registry, ws) = static_rig([0, 0, 1]);
    let users = keys("user", 400);
    let healthy = tally(&serve(&ws, &users, 0));
    assert_eq!(
        healthy.get(H3),
        None,
        "priority 1 idles while priority 0 is healthy"
    );
    assert_eq!(healthy.len(), 2);

    registry.set_healthy(H1, false);
    registry.set_healthy(H2, false);
    host.advance(ms(300));
    assert_eq!(routable(&ws[1]), all(&[H3]));
    assert_eq!(
        tally(&serve(&ws, &users, 1)),
        BTreeMap::from([(H3.to_string(), 400)])
    );

    registry.set_healthy(H1, true);
    registry.set_healthy(H2, true);
    host.advance(ms(300));
    assert_eq!(tally(&serve(&ws, &users, 0)), healthy);
    no_crash(&ws);
}
