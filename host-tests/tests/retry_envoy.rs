//! The retry filter in a real Envoy 1.40 (`--concurrency 2`) with `envoy/retry.yaml`, in front
//! of real upstream servers that fail on command. Needs `dist/keel_retry.wasm` and the Envoy of
//! `make setup`.
//!
//! Which way Envoy 1.40 takes: the first attempt goes through the router, and when its response
//! asks for a retry the filter holds it and later answers in its place
//! (`send_http_response` from the root context on a response held in
//! `on_http_response_headers`). Envoy replaces the held response: clients get the retry's answer
//! ([`a_failed_first_attempt_is_retried_once_and_every_client_gets_the_answer`]). The fallback,
//! every attempt a callout, works too ([`every_attempt_can_be_a_callout`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{self, Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::module_path;
use keel_host_tests::upstream::{Mode, Received, Upstream};

const CONFIG: &str = "envoy/retry.yaml";
/// The policy in `envoy/retry.yaml`: the issue's minimal configuration, as written.
const MINIMAL: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3, "backoff": {"base": "25ms", "cap": "250ms", "jitter": "full"}, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#;

fn config(upstream: &Upstream) -> EnvoyConfig {
    assert!(
        module_path("retry").is_file(),
        "dist/keel_retry.wasm is missing: build it (make build)"
    );
    EnvoyConfig::from_file(CONFIG)
        .unwrap()
        .port(18080, upstream.port())
        .concurrency(2)
}

fn start(upstream: &Upstream) -> Envoy {
    config(upstream).start().unwrap()
}

/// A counter of the filter, `keel.retry.default.<what>` (0 until the filter first touches it).
fn metric(envoy: &Envoy, what: &str) -> u64 {
    let name = format!("wasmcustom.keel.retry.default.{what}");
    envoy.stats().unwrap().get(&name).copied().unwrap_or(0)
}

fn all_ok(results: Vec<anyhow::Result<Response>>) -> Vec<Response> {
    results.into_iter().map(|r| r.unwrap()).collect()
}

/// Arrivals at the upstream grouped by `x-request-id`.
fn by_request_id(received: &[Received]) -> BTreeMap<String, Vec<&Received>> {
    let mut groups: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for r in received {
        let id = r.request_id().expect("Envoy gives every request an id");
        groups.entry(id.to_string()).or_default().push(r);
    }
    groups
}

#[test]
fn envoy_retry_yaml_runs_as_written() {
    assert!(
        CONFIG_TEXT.contains(MINIMAL),
        "envoy/retry.yaml holds the minimal policy"
    );
    envoy::validate(CONFIG).unwrap();
}

#[test]
fn envoy_refuses_a_bad_policy_and_names_the_field() {
    let upstream = Upstream::start("backend").unwrap();
    let log = config(&upstream)
        .replace(r#""max_attempts": 3"#, r#""max_attempts": 7"#)
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains(
            "keel retry: policies[0].max_attempts: at most 5, got 7; configuration refused"
        ),
        "{log}"
    );
}

const CONFIG_TEXT: &str = include_str!("../../envoy/retry.yaml");

#[test]
fn a_failed_first_attempt_is_retried_once_and_every_client_gets_the_answer() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail_first(1, 503));
    let envoy = start(&upstream);
    // 100 requests: the budget's reserve (10/s over 10 s) plus 20 % covers 120 retries.
    let n = 100;
    let responses =
        all_ok(envoy.send_all((0..n).map(|i| Request::get(&format!("/orders/{i}"))), 8));
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "backend");
        // The client gets the second attempt's answer: the held 503 was replaced.
        assert_eq!(r.header("x-upstream-attempt"), Some("2"));
        assert_eq!(r.header("x-keel-attempts"), Some("2"));
    }
    let received = upstream.received();
    let groups = by_request_id(&received);
    assert_eq!(groups.len(), n);
    for (id, arrivals) in &groups {
        assert_eq!(arrivals.len(), 2, "request {id}");
        // The retry is the same request.
        assert_eq!(arrivals[0].path, arrivals[1].path);
        assert_eq!(arrivals[0].method, arrivals[1].method);
    }
    assert_eq!(upstream.total(), 2 * n as u64);
    assert_eq!(metric(&envoy, "requests"), n as u64);
    assert_eq!(metric(&envoy, "retries"), n as u64);
    assert_eq!(metric(&envoy, "attempts_2"), n as u64);
    assert_eq!(metric(&envoy, "recovered"), n as u64);

    // The route "static" switches the filter off: the failure reaches the client as it is.
    let r = envoy.get("/static/a").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-keel-attempts"), None);
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

#[test]
fn a_total_outage_costs_at_most_the_budget() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail(503));
    let envoy = start(&upstream);
    let n: u64 = 600;
    let started = Instant::now();
    let responses = all_ok(envoy.send_all((0..n).map(|i| Request::get(&format!("/down/{i}"))), 16));
    let elapsed = started.elapsed();
    // The bound holds per budget window (ttl 10 s): the run must fit in one.
    assert!(
        elapsed < Duration::from_secs(10),
        "the load took {elapsed:?}"
    );
    assert!(responses.iter().all(|r| r.status == 503));
    let total = upstream.total();
    // ratio 0.2 of the requests, plus min_per_second 10 over ttl 10 s.
    let bound = n + n / 5 + 10 * 10;
    eprintln!(
        "outage: {n} client requests -> {total} upstream requests ({:.2}x) in {elapsed:?}; \
         retries {}, budget_exhausted {}, bound {bound}",
        total as f64 / n as f64,
        metric(&envoy, "retries"),
        metric(&envoy, "budget_exhausted"),
    );
    assert!(
        total <= bound,
        "{total} upstream requests for {n} client requests"
    );
    assert!(
        total > n + 100,
        "retries happened while the budget lasted: {total}"
    );
    assert!(metric(&envoy, "budget_exhausted") > 0);
    assert_eq!(metric(&envoy, "retries"), total - n);
}

#[test]
fn a_post_is_retried_only_with_an_idempotency_key() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail_first(1, 503));
    let envoy = start(&upstream);
    let n = 20;
    let plain = all_ok(envoy.send_all(
        (0..n).map(|i| Request::post("/orders", format!("{{\"order\": {i}}}"))),
        4,
    ));
    for r in &plain {
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-keel-attempts"), None, "not eligible: untouched");
    }
    let received = upstream.received();
    assert_eq!(received.len(), n);
    assert!(by_request_id(&received).values().all(|a| a.len() == 1));
    assert_eq!(metric(&envoy, "ineligible"), n as u64);

    upstream.reset();
    let keyed = all_ok(envoy.send_all(
        (0..n).map(|i| {
            Request::post("/orders", format!("{{\"order\": {i}}}"))
                .header("idempotency-key", &format!("order-{i}"))
        }),
        4,
    ));
    for r in &keyed {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-keel-attempts"), Some("2"));
    }
    let received = upstream.received();
    let groups = by_request_id(&received);
    assert_eq!(groups.len(), n);
    for arrivals in groups.values() {
        assert_eq!(arrivals.len(), 2);
        assert!(arrivals.iter().all(|a| a.method == "POST"));
        assert_eq!(
            arrivals[0].header("idempotency-key"),
            arrivals[1].header("idempotency-key")
        );
        assert_eq!(
            arrivals[0].header("content-length"),
            arrivals[1].header("content-length")
        );
    }
}

#[test]
fn retry_after_delays_the_next_attempt_by_at_least_its_value() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail_first(1, 503).with_header("retry-after", "1"));
    let envoy = start(&upstream);
    let responses = all_ok(envoy.send_all((0..4).map(|i| Request::get(&format!("/slow/{i}"))), 4));
    for r in &responses {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-keel-attempts"), Some("2"));
        assert!(r.elapsed >= Duration::from_secs(1), "{:?}", r.elapsed);
    }
    let received = upstream.received();
    for (id, arrivals) in by_request_id(&received) {
        assert_eq!(arrivals.len(), 2);
        let gap = arrivals[1].at.duration_since(arrivals[0].at);
        eprintln!("retry-after 1: request {id} retried after {gap:?}");
        assert!(gap >= Duration::from_secs(1), "{id}: {gap:?}");
    }
}

#[test]
fn connect_failures_are_told_from_upstream_503s() {
    let upstream = Upstream::start("backend").unwrap();
    let only_connect_failures = MINIMAL.replace(
        r#""max_attempts": 3,"#,
        r#""max_attempts": 3, "retry_on": ["connect-failure"],"#,
    );
    let envoy = config(&upstream)
        .replace(MINIMAL, &only_connect_failures)
        .start()
        .unwrap();
    // The upstream's own 503 is not a connect failure.
    upstream.set_mode(Mode::fail(503));
    let r = envoy.get("/a").unwrap();
    assert_eq!((r.status, r.header("x-keel-attempts")), (503, Some("1")));
    assert_eq!(upstream.total(), 1);
    // Nothing listens: Envoy's local 503 says "connection failure" in its stream info (first
    // attempt) and its body (callouts); every attempt is made.
    upstream.stop();
    let r = envoy.get("/b").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-keel-attempts"), Some("3"), "{}", r.text());
    assert!(r.text().contains("connection failure"), "{}", r.text());
    assert_eq!(metric(&envoy, "retries"), 2);
    assert_eq!(metric(&envoy, "max_attempts"), 1);
}

#[test]
fn every_attempt_can_be_a_callout() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail_first(1, 503));
    let callouts = MINIMAL.replace(
        r#""max_attempts": 3,"#,
        r#""max_attempts": 3, "first_attempt": "callout","#,
    );
    let envoy = config(&upstream)
        .replace(MINIMAL, &callouts)
        .start()
        .unwrap();
    let responses = all_ok(envoy.send_all(
        (0..10).map(|i| Request::new("DELETE", &format!("/items/{i}"))),
        4,
    ));
    for r in &responses {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-keel-attempts"), Some("2"));
        assert_eq!(r.header("x-upstream-attempt"), Some("2"));
    }
    assert!(by_request_id(&upstream.received())
        .values()
        .all(|a| a.len() == 2));
    assert_eq!(metric(&envoy, "retries"), 10);
    // A body, or a method that is not idempotent: the router sends it, once.
    upstream.reset();
    let r = envoy
        .send(Request::new("PUT", "/items/1").body("v"))
        .unwrap();
    assert_eq!((r.status, r.header("x-keel-attempts")), (503, None));
    let r = envoy.send(Request::post("/items", "v")).unwrap();
    assert_eq!((r.status, r.header("x-keel-attempts")), (503, None));
    assert_eq!(upstream.total(), 2);
}

#[test]
fn a_stalled_attempt_ends_at_the_per_try_timeout() {
    // Every attempt a callout, each given 200 ms: an upstream that never answers costs three
    // timeouts, not the client's patience (the stall lasts 30 s, the client waits 10 s).
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::Stall(Duration::from_secs(30)));
    let policy = MINIMAL.replace(
        r#""max_attempts": 3,"#,
        r#""max_attempts": 3, "first_attempt": "callout", "per_try_timeout": "200ms","#,
    );
    let envoy = config(&upstream).replace(MINIMAL, &policy).start().unwrap();
    let r = envoy.get("/stalled").unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.text(), "upstream request timeout");
    assert_eq!(r.header("x-keel-attempts"), Some("3"));
    assert_eq!(upstream.wait_for_total(3, Duration::from_secs(2)), 3);
    assert_eq!(metric(&envoy, "max_attempts"), 1);
}

#[test]
fn a_refused_callout_lets_the_held_response_go_on() {
    // A cluster Envoy does not know: the callout is refused, and the response held in
    // `on_http_response_headers` is resumed (with its body) rather than replaced.
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail(503));
    let envoy = config(&upstream)
        .replace(r#""cluster": "backend""#, r#""cluster": "nowhere""#)
        .start()
        .unwrap();
    let r = envoy.get("/held").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-upstream"),
        Some("backend"),
        "the router's own response"
    );
    assert_eq!(r.header("x-keel-attempts"), Some("1"));
    assert_eq!(upstream.total(), 1);
    assert_eq!(metric(&envoy, "callout_refused"), 1);
    envoy
        .wait_for_log(
            "refused a callout to cluster \"nowhere\"",
            Duration::from_secs(2),
        )
        .unwrap();
}

#[test]
fn a_request_that_needs_no_retry_passes_before_a_direct_response() {
    // The benchmark's setting: the route answers itself, so there is no cluster at all.
    let upstream = Upstream::start("backend").unwrap();
    let envoy = config(&upstream)
        .replace(
            "match: { prefix: \"/\" }\n                route: { cluster: backend }",
            "match: { prefix: \"/\" }\n                direct_response: { status: 200, body: { inline_string: \"ok\" } }",
        )
        .start()
        .unwrap();
    let responses = all_ok(envoy.send_all((0..50).map(|_| Request::get("/")), 4));
    for r in &responses {
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert_eq!(r.header("x-keel-attempts"), Some("1"));
    }
    assert_eq!(upstream.total(), 0);
    assert_eq!(metric(&envoy, "requests"), 50);
    assert_eq!(metric(&envoy, "attempts_1"), 50);
    assert!(!envoy.log().contains("panicked"));
}
