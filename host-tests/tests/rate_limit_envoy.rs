//! The rate limiter in a real Envoy (`--concurrency 2`), with `envoy/rate-limit.yaml` as written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::Upstream;

const MINIMAL: &str = r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}}]}"#;

fn start(upstream: &Upstream) -> Envoy {
    EnvoyConfig::from_file("envoy/rate-limit.yaml")
        .unwrap()
        .port(18080, upstream.port())
        .concurrency(2)
        .start()
        .unwrap()
}

fn burst(envoy: &Envoy, key: &str, n: usize, concurrency: usize) -> Vec<Response> {
    let requests = (0..n).map(|i| Request::get(&format!("/orders/{i}")).header("x-api-key", key));
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

#[test]
fn the_minimal_config_admits_the_burst_plus_the_refill_across_two_workers() {
    let upstream = Upstream::start("backend").unwrap();
    let envoy = start(&upstream);
    assert!(envoy
        .log()
        .contains("keel rate_limit: configured policies: per-key"));

    let started = Instant::now();
    let responses = burst(&envoy, "alice", 1000, 16);
    let elapsed = started.elapsed().as_secs_f64();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Response> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + limited.len(), 1000, "only 200s and 429s");
    // The bucket starts full (100) and refills at 100/s while the burst runs. Exact across the
    // two workers: never more than that (plus 1 % of the burst for the clock's granularity).
    let most = 100.0 + 100.0 * elapsed + 10.0;
    eprintln!(
        "burst of 1000: {ok} admitted, {} refused in {elapsed:.3} s (bound {most:.0})",
        limited.len()
    );
    assert!(ok >= 100, "{ok} admitted; the full bucket admits 100");
    assert!(
        (ok as f64) <= most,
        "{ok} admitted in {elapsed:.3} s; at most {most:.0} allowed"
    );
    assert_eq!(
        upstream.total() as usize,
        ok,
        "refused requests never reach the upstream"
    );

    let refused = limited[0];
    assert_eq!(refused.text(), "rate limited\n");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, 1);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"per-key\";q=100;w=1")
    );
    assert!(refused
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-key\";r=0;t="));

    // Envoy's own counters agree with what the clients saw, once the workers' ticks have
    // flushed their batched counts (every 50 ms).
    let counter = |name: &str, expected: usize| {
        envoy
            .wait_for_counter(name, expected as u64, Duration::from_secs(5))
            .unwrap() as usize
    };
    assert_eq!(
        counter("wasmcustom.keel.rate_limit.per-key.allowed", ok),
        ok
    );
    assert_eq!(
        counter("wasmcustom.keel.rate_limit.per-key.limited", limited.len()),
        limited.len()
    );

    // Another key is not affected.
    let bob = burst(&envoy, "bob", 20, 4);
    assert!(bob.iter().all(|r| r.status == 200));
    let header = bob[0].header("ratelimit").unwrap();
    assert!(header.starts_with("\"per-key\";r="), "{header}");
}

#[test]
fn a_bad_configuration_makes_envoy_refuse_the_filter_with_our_message() {
    let upstream = Upstream::start("backend").unwrap();
    let log = EnvoyConfig::from_file("envoy/rate-limit.yaml")
        .unwrap()
        .port(18080, upstream.port())
        .replace(MINIMAL, &MINIMAL.replace("\"1s\"", "\"fast\""))
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains("keel rate_limit: policies[0].limit.per: expected a duration like"),
        "{log}"
    );
}

/// Every Envoy config under `envoy/` and `examples/` (any depth; a YAML file with
/// `static_resources`, so not docker-compose files) passes `envoy --mode validate`.
#[test]
fn every_config_in_envoy_validates() {
    fn walk(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && std::fs::read_to_string(&path)
                    .unwrap()
                    .contains("static_resources:")
            {
                found.push(path);
            }
        }
    }
    let root = keel_host_tests::repo_root();
    let mut configs = Vec::new();
    walk(&root.join("envoy"), &mut configs);
    walk(&root.join("examples"), &mut configs);
    configs.sort();
    for path in &configs {
        let relative = path.strip_prefix(&root).unwrap();
        keel_host_tests::envoy::validate(relative)
            .unwrap_or_else(|e| panic!("{}: {e}", relative.display()));
    }
    assert!(
        configs.iter().any(|p| p.ends_with("envoy/composed.yaml")),
        "{configs:?}"
    );
}
