//! `keel.wasm` in a real Envoy (`--concurrency 2`): two plugins of the one module, chosen by
//! root_id, sharing one vm_id in one listener (`envoy/suite.yaml` as written), both acting on
//! every request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use keel_host_tests::envoy::{EnvoyConfig, Request};
use keel_host_tests::upstream::Upstream;

const PORTS: [u16; 3] = [18091, 18092, 18093];

fn config(ups: &[Upstream]) -> EnvoyConfig {
    let mut config = EnvoyConfig::from_file("envoy/suite.yaml").unwrap();
    for (fixed, up) in PORTS.iter().zip(ups) {
        config = config.port(*fixed, up.port());
    }
    config.concurrency(2)
}

#[test]
fn two_root_ids_of_keel_wasm_share_one_vm_id_and_both_act() {
    let ups: Vec<Upstream> = ["a", "b", "c"]
        .iter()
        .map(|n| Upstream::start(n).unwrap())
        .collect();
    let envoy = config(&ups).start().unwrap();
    let log = envoy.log();
    assert!(
        log.contains("keel rate_limit: configured policies: per-key"),
        "{log}"
    );
    assert!(
        log.contains("keel picker: configured pickers: users"),
        "{log}"
    );

    // The picker: every user sticks to one upstream, and the users spread over all three.
    let mut by_user: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..30 {
        let user = format!("user-{}", i % 15);
        let r = envoy
            .send(
                Request::get("/users")
                    .header("x-user", &user)
                    .header("x-api-key", &format!("key-{i}")),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let name = r.header("x-upstream").unwrap().to_string();
        let first = by_user.entry(user.clone()).or_insert_with(|| name.clone());
        assert_eq!(*first, name, "{user} moved");
        // The rate limiter's headers are on the same response.
        assert!(r.header("ratelimit").unwrap().starts_with("\"per-key\";r="));
    }
    let mut names: Vec<&String> = by_user.values().collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "{by_user:?}");

    // The rate limiter: one key gets exactly its burst of 5 across both workers (well within
    // a second: no refill to speak of), then 429s that never reach an upstream.
    let before: u64 = ups.iter().map(Upstream::total).sum();
    let requests = (0..20).map(|_| {
        Request::get("/users")
            .header("x-user", "alice")
            .header("x-api-key", "one")
    });
    let statuses: Vec<u16> = envoy
        .send_all(requests, 4)
        .into_iter()
        .map(|r| r.unwrap().status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((5..=6).contains(&ok), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 20 - ok);
    let after: u64 = ups.iter().map(Upstream::total).sum();
    assert_eq!((after - before) as usize, ok);
}

#[test]
fn an_unknown_root_id_makes_envoy_refuse_the_filter_naming_the_known_ones() {
    let ups: Vec<Upstream> = ["a", "b", "c"]
        .iter()
        .map(|n| Upstream::start(n).unwrap())
        .collect();
    let log = config(&ups)
        .replace("root_id: picker", "root_id: pickr")
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains(
            "keel suite: unknown root_id \"pickr\"; keel.wasm has the root_ids circuit_breaker, \
             retry, rate_limit, picker, discovery, idempotency, adaptive, pipeline; configuration refused"
        ),
        "{log}"
    );
}
