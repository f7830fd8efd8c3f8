//! The pipeline (root_id `pipeline` of `keel.wasm`) in a real Envoy (`--concurrency 2`):
//! `envoy/pipeline.yaml` as written, all five filters as the stages of one Envoy filter in front
//! of three real upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_host_tests::envoy::{EnvoyConfig, Request};
use keel_host_tests::upstream::Upstream;

const PORTS: [u16; 3] = [18091, 18092, 18093];

#[test]
fn all_five_stages_act_on_every_request_in_one_filter() {
    let ups: Vec<Upstream> = ["a", "b", "c"]
        .iter()
        .map(|n| Upstream::start(n).unwrap())
        .collect();
    let mut config = EnvoyConfig::from_file("envoy/pipeline.yaml").unwrap();
    for (fixed, up) in PORTS.iter().zip(&ups) {
        config = config.port(*fixed, up.port());
    }
    let envoy = config.concurrency(2).start().unwrap();
    let log = envoy.log();
    assert!(
        log.contains(
            "keel pipeline: configured stages: discovery, rate_limit, circuit_breaker, picker, retry"
        ),
        "{log}"
    );

    // The picker: each user sticks to one upstream; the rate limiter's headers are on every
    // response; the breaker and retry count every request.
    let mut by_user: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..40 {
        let user = format!("user-{}", i % 20);
        let r = envoy
            .send(
                Request::get("/users")
                    .header("x-user", &user)
                    .header("x-api-key", "k"),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let name = r.header("x-upstream").unwrap().to_string();
        assert_eq!(
            *by_user.entry(user.clone()).or_insert_with(|| name.clone()),
            name
        );
        assert!(r.header("ratelimit").unwrap().starts_with("\"per-key\";r="));
        assert_eq!(r.header("x-keel-attempts"), Some("1"));
    }
    let mut names: Vec<&String> = by_user.values().collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "{by_user:?}");
    let counter = |name: &str| {
        envoy
            .wait_for_counter(name, 40, Duration::from_secs(5))
            .unwrap()
    };
    assert_eq!(counter("wasmcustom.keel.rate_limit.per-key.allowed"), 40);
    assert_eq!(counter("wasmcustom.keel.circuit_breaker.orders.calls"), 40);
    assert_eq!(counter("wasmcustom.keel.retry.default.requests"), 40);

    // The rate limiter refuses past the bucket; refused requests reach no upstream.
    let before: u64 = ups.iter().map(Upstream::total).sum();
    let requests = (0..300).map(|_| {
        Request::get("/users")
            .header("x-user", "alice")
            .header("x-api-key", "burst")
    });
    let statuses: Vec<u16> = envoy
        .send_all(requests, 8)
        .into_iter()
        .map(|r| r.unwrap().status)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, 300, "{statuses:?}");
    assert!(ok >= 100 && limited > 0, "{ok} admitted, {limited} refused");
    let after: u64 = ups.iter().map(Upstream::total).sum();
    assert_eq!((after - before) as usize, ok);
}
