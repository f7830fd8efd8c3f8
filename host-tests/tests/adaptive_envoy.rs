//! The adaptive filter in a real Envoy (`--concurrency 2`), with `envoy/adaptive.yaml` as
//! written, in front of real upstreams: one in capacity mode, one failing 60 %.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keel_host_tests::envoy::{wait_for, Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::capacity::Capacity;
use keel_host_tests::upstream::{Mode, Upstream};

fn start(backend: &Upstream, flaky: &Upstream) -> Envoy {
    config()
        .port(18080, backend.port())
        .port(18081, flaky.port())
        .concurrency(2)
        .start()
        .unwrap()
}

fn config() -> EnvoyConfig {
    EnvoyConfig::from_file("envoy/adaptive.yaml").unwrap()
}

fn send(envoy: &Envoy, path: &str, n: usize, concurrency: usize) -> Vec<Response> {
    let requests = (0..n).map(|i| Request::get(&format!("{path}/{i}")));
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

fn refused_by(response: &Response, policy: &str) -> bool {
    response.status == 503 && response.header("x-keel-adaptive") == Some(policy)
}

/// Google SRE throttling with K = 2 and the default cap of 0.8: an upstream that fails 60 % of
/// what reaches it accepts too little for any probability below the cap, so, once the window
/// holds only traffic at the cap, one request in five reaches it (the formula's bound, 0.2).
/// The tolerance (0.12..0.28) is about six standard deviations of 1000 draws.
#[test]
fn throttling_cuts_a_sixty_percent_failing_upstream_to_the_formulas_bound() {
    let backend = Upstream::start("backend").unwrap();
    let flaky = Upstream::start("flaky").unwrap();
    flaky.set_mode(Mode::FailRate {
        rate: 0.6,
        status: 503,
    });
    // A 2 s window instead of 30 s: the counts of the warm-up, when the probability was still
    // climbing, must leave the window before the measurement (with 30 s that takes 30 s of
    // traffic; in less, the probability is still below its cap).
    let envoy = config()
        .replace(r#""throttle": {}"#, r#""throttle": {"window": "2s"}"#)
        .port(18080, backend.port())
        .port(18081, flaky.port())
        .concurrency(2)
        .start()
        .unwrap();
    assert!(envoy
        .log()
        .contains("keel adaptive: configured policies: backend, flaky"));
    // Warm-up: more than one window of traffic (bounded), so the window holds only requests
    // sent at the cap.
    let warm = std::time::Instant::now();
    for _ in 0..40 {
        send(&envoy, "/flaky", 500, 4);
        if warm.elapsed() >= Duration::from_millis(2500) {
            break;
        }
    }
    flaky.reset();
    let responses = send(&envoy, "/flaky", 1000, 4);
    let attempts = flaky.total();
    let refused = responses.iter().filter(|r| refused_by(r, "flaky")).count();
    let share = attempts as f64 / 1000.0;
    eprintln!(
        "of 1000 requests {attempts} reached the upstream ({share:.3}), {refused} refused by Keel"
    );
    assert!(
        (0.12..=0.28).contains(&share),
        "{attempts} attempts of 1000"
    );
    assert_eq!(
        refused as u64 + attempts,
        1000,
        "every request is refused or attempted"
    );
    let retry_after = responses
        .iter()
        .find(|r| refused_by(r, "flaky"))
        .and_then(|r| r.header("retry-after"))
        .unwrap();
    assert_eq!(retry_after, "1");
    let permille = envoy
        .stat("wasmcustom.keel.adaptive.flaky.rejection_permille")
        .unwrap();
    assert!((700..=800).contains(&permille), "{permille}");
    // The backend's policy is not involved.
    assert_eq!(backend.total(), 0);
}

/// The gradient limit in front of an upstream that serves 4 requests at once for 20 ms each,
/// offered 24 concurrent clients: Keel refuses the excess at once (the limit starts at 3), the
/// upstream never has to shed (its queue never fills), and the in-flight count, shared by
/// both workers, returns to exactly 0 when the load stops.
#[test]
fn the_concurrency_limit_keeps_the_excess_off_an_overloaded_upstream() {
    let backend = Upstream::start("backend").unwrap();
    backend.set_capacity(Some(Capacity {
        concurrency: 4,
        service: Duration::from_millis(20),
        queue: 1000,
        growth: 0.0,
    }));
    let flaky = Upstream::start("flaky").unwrap();
    let envoy = start(&backend, &flaky);
    let responses = send(&envoy, "/orders", 1500, 24);
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let refused = responses
        .iter()
        .filter(|r| refused_by(r, "backend"))
        .count();
    eprintln!("1500 requests, 24 at once: {ok} served, {refused} refused by Keel");
    assert_eq!(ok + refused, 1500, "only answers and Keel's refusals");
    assert!(refused > 0 && ok > 0);
    assert_eq!(
        backend.total() as usize,
        ok,
        "refused requests never reach the upstream"
    );
    assert_eq!(backend.capacity_counts().rejected, 0);
    let limit = envoy
        .stat("wasmcustom.keel.adaptive.backend.limit")
        .unwrap();
    assert!((3..=1000).contains(&limit), "{limit}");
    // Every admission was given back, whichever worker took it.
    let drained = wait_for(Instant::now(), Duration::from_secs(5), || {
        envoy
            .stat("wasmcustom.keel.adaptive.backend.in_flight")
            .ok()
            == Some(0)
    });
    assert!(drained.is_some(), "in flight never returned to 0");
    assert_eq!(
        envoy
            .stat("wasmcustom.keel.adaptive.backend.allowed")
            .unwrap() as usize,
        ok
    );
}
