//! Retries fail over along the picker's ring and breaker state steers the picker, in a real
//! Envoy (`--concurrency 2`) running `envoy/composed.yaml` as written: on the route `users`,
//! discovery (a real etcd, three real upstreams that register themselves), the picker (ring on
//! `x-user`, following the per-host breaker), the retry filter (failing over along the picker's
//! host list) and the per-host breaker. Needs `make setup build`.
//!
//! One upstream answers 500 for 10 s, then refuses connections for 10 s (stopped), then comes
//! back. From the first failure on, per request: the client gets 200; a key of another host is
//! answered by its own host in one attempt (its keys never move); a key of the failing host is
//! answered by its next host on the ring (computed from the picker's configuration by keel-core
//! with the failing host taken out), after attempts on the failing host then that one, or on
//! that one alone when the picker skipped the failing host (`x-keel-attempt-hosts`). While its
//! breaker is open the failing host receives no more requests than the breaker handed out
//! probes. After recovery its keys come back. Every wait is bounded; nothing asserts on timing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_core::picker::{hash_key, Endpoint, Pick};
use keel_host_tests::envoy::{wait_for, Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::etcd::{discovery_status, routable_addresses, RegisteredService};
use keel_host_tests::upstream::Mode;
use keel_host_tests::{module_path, repo_root};
use serde_norway::Value;

const YAML: &str = "envoy/composed.yaml";
const ADMIN: &str = "/keel/discovery";
const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(30);
const PHASE: Duration = Duration::from_secs(10);

fn counter(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("wasmcustom.{name}")).unwrap_or(0)
}

fn routable(envoy: &Envoy) -> usize {
    discovery_status(envoy.client(), ADMIN)
        .map(|s| routable_addresses(&s, "users").len())
        .unwrap_or(0)
}

fn wait_until(what: &str, envoy: &Envoy, check: impl Fn() -> bool) {
    assert!(
        wait_for(Instant::now(), WAIT, check).is_some(),
        "{what}: not within {WAIT:?}\n{}",
        envoy.log()
    );
}

fn users(envoy: &Envoy, keys: &[String]) -> Vec<Response> {
    envoy
        .send_all(
            keys.iter()
                .map(|k| Request::get(&format!("/users/{k}")).header("x-user", k)),
            4,
        )
        .into_iter()
        .map(|r| r.expect("Envoy answers every request"))
        .collect()
}

/// The picker's configuration in envoy/composed.yaml.
fn picker_config() -> keel_core::picker::policy::PickerConfig {
    let text = std::fs::read_to_string(repo_root().join(YAML)).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence()
        .unwrap();
    let picker = filters
        .iter()
        .find(|f| f["name"].as_str() == Some("keel.picker"))
        .unwrap();
    let json = picker["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    keel_core::config::load::<keel_core::picker::policy::FilterConfig>(json.as_bytes())
        .unwrap()
        .pickers
        .remove(0)
}

/// Per key: its host and its next host on the ring once `failing` is out, by address.
fn ring_order(addresses: &[String], failing: &str, keys: &[String]) -> Vec<(String, String)> {
    let config = picker_config();
    let endpoints: Vec<Endpoint> = addresses.iter().map(|a| Endpoint::new(a.clone())).collect();
    let full = config.picker(&endpoints);
    let without: Vec<Endpoint> = endpoints
        .iter()
        .cloned()
        .map(|mut e| {
            e.healthy = e.address != failing;
            e
        })
        .collect();
    let degraded = config.picker(&without);
    let at = |p: &keel_core::picker::Picker, k: &str| match p.pick_hash(hash_key(k.as_bytes()), &[])
    {
        Pick::Host(i) => p.endpoints()[i].address.clone(),
        Pick::NoHost => panic!("no host for {k}"),
    };
    keys.iter()
        .map(|k| (at(&full, k), at(&degraded, k)))
        .collect()
}

#[test]
fn retries_fail_over_along_the_ring_while_the_breaker_steers_the_picker() {
    for module in [
        "circuit_breaker",
        "retry",
        "picker",
        "discovery",
        "rate_limit",
    ] {
        assert!(
            module_path(module).is_file(),
            "build dist/keel_{module}.wasm first (make build)"
        );
    }
    let users_service =
        RegisteredService::start("users", 3, TTL).expect("etcd and three instances");
    let statics = keel_host_tests::upstream::Upstream::start("static").unwrap();
    let envoy = users_service
        .remap(
            EnvoyConfig::from_file(YAML).unwrap(),
            &[18091, 18092, 18093],
        )
        .port(18080, statics.port())
        .concurrency(2)
        .start()
        .expect("Envoy starts with envoy/composed.yaml");
    wait_until("3 routable endpoints", &envoy, || routable(&envoy) == 3);

    let addresses = users_service.addresses();
    let name_of: BTreeMap<String, String> = users_service
        .instances()
        .iter()
        .map(|i| (i.address(), i.name().to_string()))
        .collect();
    let failing = users_service.instance(1);
    let failing_addr = failing.address();
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let order = ring_order(&addresses, &failing_addr, &keys);
    assert!(
        order
            .iter()
            .filter(|(home, _)| *home == failing_addr)
            .count()
            >= 5,
        "too few keys on {failing_addr}"
    );

    // Steady: every key on its ring host (the picker in Envoy agrees with keel-core's ring).
    for (r, (k, (home, _))) in users(&envoy, &keys).iter().zip(keys.iter().zip(&order)) {
        assert_eq!(r.status, 200, "{k}: {}", r.text());
        assert_eq!(r.header("x-upstream"), Some(name_of[home].as_str()), "{k}");
        assert_eq!(r.header("x-keel-attempts"), Some("1"), "{k}");
    }

    // Let the steady calls age out of the breaker's 1 s window, so that it judges the failing
    // host by its failures alone.
    std::thread::sleep(Duration::from_millis(1500));

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut received_while_open = 0u64;
    let mut probes_while_open = 0u64;
    for phase in ["500", "refused"] {
        match phase {
            "500" => failing.upstream.set_mode(Mode::fail(500)),
            _ => failing.upstream.stop(),
        }
        let start = Instant::now();
        let mut rounds = 0;
        while start.elapsed() < PHASE && rounds < 400 {
            rounds += 1;
            // The breaker is open now: what the host receives from here on must be probes.
            let open = counter(&envoy, "keel.circuit_breaker.users-host.opened") > 0;
            let user_requests = || {
                failing
                    .upstream
                    .received()
                    .iter()
                    .filter(|r| r.path.starts_with("/users/"))
                    .count() as u64
            };
            let (received_before, probes_before) = (
                user_requests(),
                counter(&envoy, "keel.circuit_breaker.users-host.probes"),
            );
            let answers = users(&envoy, &keys);
            for (r, (k, (home, next))) in answers.iter().zip(keys.iter().zip(&order)) {
                let hosts = r.header("x-keel-attempt-hosts").unwrap_or("-");
                let attempts = r.header("x-keel-attempts").unwrap_or("-");
                assert_eq!(
                    r.status,
                    200,
                    "phase {phase}, {k}: {} (attempts {attempts}, hosts {hosts})\n{}",
                    r.text(),
                    envoy.log()
                );
                if *home != failing_addr {
                    assert_eq!(
                        r.header("x-upstream"),
                        Some(name_of[home].as_str()),
                        "{k} moved"
                    );
                    assert_eq!(attempts, "1", "{k}");
                    continue;
                }
                assert_eq!(
                    r.header("x-upstream"),
                    Some(name_of[next].as_str()),
                    "{k}: the retry did not land on the next host on the ring ({hosts})"
                );
                let via_failing = format!("{failing_addr},{next}");
                let shape = if hosts == via_failing && attempts == "2" {
                    "failed over by a retry"
                } else if hosts == next.as_str() && attempts == "1" {
                    "skipped by the picker"
                } else {
                    panic!("{k}: attempts {attempts}, hosts {hosts}; ring order {home} then {next}")
                };
                *tally.entry(format!("{phase}: {shape}")).or_default() += 1;
            }
            if open && phase == "500" {
                // Only requests that reach the process count: in the refused phase nothing does.
                let received = user_requests() - received_before;
                let probes = counter(&envoy, "keel.circuit_breaker.users-host.probes");
                received_while_open += received;
                probes_while_open += probes.saturating_sub(probes_before);
            }
        }
    }
    println!("failing host's keys: {tally:?}");
    println!(
        "while open: {received_while_open} requests reached the failing host, {probes_while_open} probes handed out; breaker opened {} times, retries {} failovers {} hosts_exhausted {}",
        counter(&envoy, "keel.circuit_breaker.users-host.opened"),
        counter(&envoy, "keel.retry.users.retries"),
        counter(&envoy, "keel.retry.users.failovers"),
        counter(&envoy, "keel.retry.users.hosts_exhausted"),
    );
    let stats = envoy.stats().unwrap_or_default();
    let shown: Vec<String> = stats
        .iter()
        .filter(|(k, _)| {
            [
                ".opened",
                ".half_opened",
                ".probes",
                ".rejected",
                ".ejections",
                ".failovers",
            ]
            .iter()
            .any(|w| k.ends_with(w))
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("{}", shown.join(" "));
    assert!(counter(&envoy, "keel.circuit_breaker.users-host.opened") >= 1);
    assert!(
        received_while_open <= probes_while_open,
        "the host received {received_while_open} requests while its breaker was open, {probes_while_open} probes"
    );
    assert!(counter(&envoy, "keel.picker.users.breaker_avoided") > 0);
    assert!(
        probes_while_open > 0,
        "no half-open probe reached the failing host"
    );
    assert!(tally.keys().any(|k| k.ends_with("skipped by the picker")));
    assert!(tally.keys().any(|k| k.ends_with("failed over by a retry")));

    // Recovery: back up; once routable and its breaker closed, its keys come back.
    failing.upstream.set_mode(Mode::Normal);
    failing.upstream.restart().unwrap();
    wait_until("3 routable endpoints again", &envoy, || {
        routable(&envoy) == 3
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let answers = users(&envoy, &keys);
        assert!(
            answers.iter().all(|r| r.status == 200),
            "an error during recovery"
        );
        let back = answers
            .iter()
            .zip(&order)
            .all(|(r, (home, _))| r.header("x-upstream") == Some(name_of[home].as_str()));
        if back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing host's keys never came back\n{}",
            envoy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
