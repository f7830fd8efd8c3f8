//! The picker in Envoy-native routing mode (`envoy/override-host.yaml`): the picker writes the
//! key's ordered host list into `x-keel-hosts`, the STATIC cluster's
//! `envoy.load_balancing_policies.override_host` policy reads it, and Envoy's own router retries
//! (`previous_hosts`), active health checks and outlier detection do the rest. Real Envoy
//! (`--concurrency 2`), three real upstreams. Needs `make setup build`.
//!
//! The failure scenario of the default mode: one upstream answers 500 for 10 s, then refuses
//! connections for 10 s, then comes back. Per request: the client gets 200; a key of another
//! host is answered by its own host in one attempt (`x-envoy-attempt-count: 1`); a key of the
//! failing host is answered by its next host on the ring (keel-core's ring from the picker's
//! configuration, the failing host out). After recovery every key is back on its host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_core::picker::{hash_key, Endpoint, Pick};
use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::module_path;
use keel_host_tests::upstream::{Mode, Upstream};

const YAML: &str = "envoy/override-host.yaml";
const FIXED: [u16; 3] = [18091, 18092, 18093];
const PHASE: Duration = Duration::from_secs(10);

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

#[test]
fn envoy_retries_walk_the_pickers_host_list_and_keys_stick() {
    assert!(module_path("picker").is_file(), "make build first");
    let ups: Vec<Upstream> = (1..=3)
        .map(|i| Upstream::start(&format!("users-{i}")).unwrap())
        .collect();
    let mut config = EnvoyConfig::from_file(YAML).unwrap();
    for (fixed, u) in FIXED.iter().zip(&ups) {
        config = config.port(*fixed, u.port());
    }
    let envoy = config.concurrency(2).start().expect("Envoy starts");
    let addresses: Vec<String> = ups.iter().map(|u| u.addr().to_string()).collect();
    let name_of: BTreeMap<String, String> = ups
        .iter()
        .map(|u| (u.addr().to_string(), u.name().to_string()))
        .collect();

    // The ring of the picker's configuration over the real addresses (the ports moved).
    let mut json = String::from(
        r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": ["#,
    );
    json.push_str(
        &addresses
            .iter()
            .map(|a| format!(r#"{{"address": "{a}"}}"#))
            .collect::<Vec<_>>()
            .join(", "),
    );
    json.push_str("]}]}");
    let picker_config =
        keel_core::config::load::<keel_core::picker::policy::FilterConfig>(json.as_bytes())
            .unwrap()
            .pickers
            .remove(0);
    let endpoints: Vec<Endpoint> = addresses.iter().map(|a| Endpoint::new(a.clone())).collect();
    let failing = &ups[1];
    let failing_addr = failing.addr().to_string();
    let full = picker_config.picker(&endpoints);
    let without: Vec<Endpoint> = endpoints
        .iter()
        .cloned()
        .map(|mut e| {
            e.healthy = e.address != failing_addr;
            e
        })
        .collect();
    let degraded = picker_config.picker(&without);
    let at = |p: &keel_core::picker::Picker, k: &str| match p.pick_hash(hash_key(k.as_bytes()), &[])
    {
        Pick::Host(i) => p.endpoints()[i].address.clone(),
        Pick::NoHost => panic!("no host"),
    };
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let order: Vec<(String, String)> = keys
        .iter()
        .map(|k| (at(&full, k), at(&degraded, k)))
        .collect();
    assert!(order.iter().filter(|(h, _)| *h == failing_addr).count() >= 5);

    // Steady: each key on its ring host, in one attempt.
    for (r, (k, (home, _))) in users(&envoy, &keys).iter().zip(keys.iter().zip(&order)) {
        assert_eq!(r.status, 200, "{k}");
        assert_eq!(r.header("x-upstream"), Some(name_of[home].as_str()), "{k}");
        assert_eq!(r.header("x-envoy-attempt-count"), Some("1"), "{k}");
    }

    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for phase in ["500", "refused"] {
        match phase {
            "500" => failing.set_mode(Mode::fail(500)),
            _ => failing.stop(),
        }
        let start = Instant::now();
        let mut rounds = 0;
        while start.elapsed() < PHASE && rounds < 400 {
            rounds += 1;
            for (r, (k, (home, next))) in users(&envoy, &keys).iter().zip(keys.iter().zip(&order)) {
                let count = r.header("x-envoy-attempt-count").unwrap_or("-");
                if r.status != 200 {
                    let stats = envoy.stats().unwrap_or_default();
                    let retry: Vec<String> = stats
                        .iter()
                        .filter(|(n, _)| n.starts_with("cluster.users.") && n.contains("retry"))
                        .map(|(n, v)| format!("{n}={v}"))
                        .collect();
                    panic!(
                        "phase {phase}, {k}: {} {} (attempts {count}) {:?}; {}",
                        r.status,
                        r.text(),
                        r.headers,
                        retry.join(" ")
                    );
                }
                if *home != failing_addr {
                    assert_eq!(
                        r.header("x-upstream"),
                        Some(name_of[home].as_str()),
                        "{k} moved"
                    );
                    assert_eq!(count, "1", "{k}");
                } else {
                    assert_eq!(
                        r.header("x-upstream"),
                        Some(name_of[next].as_str()),
                        "{k}: not answered by its next host on the ring"
                    );
                    *attempts
                        .entry(format!("{phase}: {count} attempts"))
                        .or_default() += 1;
                }
            }
        }
    }
    println!(
        "failing host's keys: {attempts:?}; outlier ejections {}, health check failures {}",
        envoy
            .stat("cluster.users.outlier_detection.ejections_enforced_total")
            .unwrap_or(0),
        envoy
            .stat("cluster.users.health_check.failure")
            .unwrap_or(0)
    );
    assert!(attempts.keys().any(|k| k.ends_with("2 attempts")));

    // Recovery: its keys come back.
    failing.set_mode(Mode::Normal);
    failing.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers = users(&envoy, &keys);
        assert!(answers.iter().all(|r| r.status == 200));
        if answers
            .iter()
            .zip(&order)
            .all(|(r, (home, _))| r.header("x-upstream") == Some(name_of[home].as_str()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys never came back\n{}",
            envoy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
