//! An adaptive rate limit in a real Envoy (`--concurrency 2`), with
//! `envoy/adaptive-rate-limit.yaml` as written but for a 2 s throttle window: Keel's rate
//! limiter scales its rate by the success rate Keel's adaptive filter counts for the route,
//! in front of a real upstream that fails 60 % of requests, then heals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::{Mode, Upstream};

const GAUGE: &str = "wasmcustom.keel.rate_limit.flaky.rate_percent";

fn send(envoy: &Envoy, n: usize) -> Vec<Response> {
    let requests = (0..n).map(|i| Request::get(&format!("/flaky/{i}")));
    envoy
        .send_all(requests, 4)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

/// The `q` of the `RateLimit-Policy` headers in `responses` (every one that has it).
fn quotas(responses: &[Response]) -> Vec<u64> {
    responses
        .iter()
        .filter_map(|r| r.header("ratelimit-policy"))
        .filter_map(|v| v.split(";q=").nth(1)?.split(';').next()?.parse().ok())
        .collect()
}

/// Sends traffic (at most `rounds` rounds of 100 requests) until the gauge (the percentage the
/// last worker to read the signal put in force) satisfies `done`; returns it.
fn drive(envoy: &Envoy, rounds: usize, done: impl Fn(u64) -> bool) -> u64 {
    for _ in 0..rounds {
        send(envoy, 100);
        std::thread::sleep(Duration::from_millis(100));
        let percent = envoy.stat(GAUGE).unwrap();
        if done(percent) {
            return percent;
        }
    }
    envoy.stat(GAUGE).unwrap()
}

#[test]
fn the_rate_follows_the_upstreams_success_rate_and_comes_back() {
    let flaky = Upstream::start("flaky").unwrap();
    let envoy = EnvoyConfig::from_file("envoy/adaptive-rate-limit.yaml")
        .unwrap()
        .replace(r#""throttle": {}"#, r#""throttle": {"window": "2s"}"#)
        .port(18081, flaky.port())
        .concurrency(2)
        .start()
        .unwrap();
    assert!(envoy
        .log()
        .contains("keel rate_limit: configured policies: flaky"));

    // Healthy: the configured rate, 50 per second.
    let healthy = send(&envoy, 20);
    assert!(
        quotas(&healthy).iter().all(|q| *q == 50),
        "{:?}",
        quotas(&healthy)
    );
    assert_eq!(envoy.stat(GAUGE).unwrap(), 100);

    // 60 % failing: the adaptive filter's success rate falls to 40 % or less (its throttling
    // refuses some requests too, which count as requests without an accept), so the limiter
    // runs at 42 % of its rate or less, and never under its floor of 25 %.
    flaky.set_mode(Mode::FailRate {
        rate: 0.6,
        status: 503,
    });
    let started = Instant::now();
    let percent = drive(&envoy, 60, |p| p <= 45);
    eprintln!(
        "failing: rate at {percent}% after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!((25..=45).contains(&percent), "rate at {percent}%");
    assert!(envoy.log().contains("keel rate_limit: policy flaky: at "));
    // RateLimit-Policy says the rate in force. Each worker reads the signal on its tick after
    // the round; with no traffic in between, both read the same counts, so a few requests now
    // see one rate, at most 45 % of 50 and at least the floor's 12.
    std::thread::sleep(Duration::from_millis(300));
    let qs = quotas(&send(&envoy, 20));
    assert!(
        !qs.is_empty() && qs.iter().all(|q| (12..=22).contains(q) && *q == qs[0]),
        "quotas {qs:?}"
    );

    // Healed: once the failures leave the 2 s window, the configured rate again.
    flaky.set_mode(Mode::Normal);
    let started = Instant::now();
    let percent = drive(&envoy, 80, |p| p == 100);
    eprintln!(
        "healed: rate at {percent}% after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(percent, 100);
    assert!(envoy
        .log()
        .contains("keel rate_limit: policy flaky: back at its configured rate"));
    std::thread::sleep(Duration::from_millis(300));
    let after = send(&envoy, 10);
    assert!(
        quotas(&after).iter().all(|q| *q == 50),
        "{:?}",
        quotas(&after)
    );
}
