//! The pipeline (root_id `pipeline` in `keel.wasm`) in Keel's wasmtime host: each filter's key
//! behaviour gives the same outcome as a stage as it does as a filter of its own, stages run in
//! order and a stage that pauses resumes into the stages after it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_host_tests::harness::{request, response, Action, Host, HttpStream, Response, Vm};
use keel_host_tests::{suite_path, Module};

const RATE_LIMIT: &str = r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}}]}"#;
const BREAKER: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3}]}"#;
const RETRY: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3, "backoff": {"base": "25ms", "cap": "25ms", "jitter": "none"}, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#;
const TIGHT_RETRY: &str = r#"{"policies": [{"name": "tight", "cluster": "backend", "budget": {"ratio": 0, "min_per_second": 1, "ttl": "1s"}}]}"#;
const PICKER: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;
const SHAPING: &str = r#"{"policies": [{"name": "shaped", "key": "header:x-api-key", "limit": {"requests": 10, "per": "1s", "burst": 1}, "shaping": {"max_delay": "1s"}}]}"#;

/// Where the filters under test come from.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// Each filter from its own module (one filter per test here).
    Alone,
    /// The filters as stages of one pipeline, in the order given.
    Pipeline,
}

/// `{"stages": [{"filter": f, "config": c}, ...]}`.
fn pipeline_config(stages: &[(&str, &str)]) -> String {
    let stages: Vec<String> = stages
        .iter()
        .map(|(filter, config)| format!(r#"{{"filter": "{filter}", "config": {config}}}"#))
        .collect();
    format!(r#"{{"stages": [{}]}}"#, stages.join(", "))
}

fn pipeline(host: &Host, stages: &[(&str, &str)], n: usize) -> Vec<Vm> {
    let vms = host
        .vm_from_path(suite_path())
        .root_id("pipeline")
        .vm_id("keel")
        .config(pipeline_config(stages))
        .start_workers(n)
        .expect("keel.wasm loads (run `make build` first)");
    for vm in &vms {
        assert!(vm.configured(), "configuration refused: {:?}", vm.logs());
    }
    vms
}

/// `n` workers of one filter, alone or as the only stage of a pipeline.
fn workers(host: &Host, setup: Setup, filter: &str, config: &str, n: usize) -> Vec<Vm> {
    match setup {
        Setup::Pipeline => pipeline(host, &[(filter, config)], n),
        Setup::Alone => {
            let vms = host
                .filter(filter, Module::Own)
                .vm_id("keel")
                .config(config)
                .start_workers(n)
                .unwrap();
            assert!(vms.iter().all(Vm::configured));
            vms
        }
    }
}

fn send(vm: &Vm, route: &str, headers: &[(&str, &str)]) -> HttpStream {
    let mut h = request("GET", "/orders");
    for (name, value) in headers {
        h = h.with(name, value);
    }
    let stream = vm.http_stream();
    stream.set_property("route_name", route);
    stream.request_headers(h, true);
    stream
}

fn admitted(stream: &HttpStream) -> bool {
    stream.local_reply().is_none() && !stream.is_paused()
}

/// The upstream answers `status` and the stream ends; whether the request was admitted.
fn call(vm: &Vm, status: u32) -> bool {
    let s = send(vm, "orders", &[]);
    if !admitted(&s) {
        s.finish();
        return false;
    }
    s.response_headers(response(status), true);
    s.finish();
    true
}

const BOTH: [Setup; 2] = [Setup::Alone, Setup::Pipeline];

#[test]
fn the_rate_limiter_admits_exactly_the_burst_as_a_stage() {
    for setup in BOTH {
        let host = Host::new();
        let vms = workers(&host, setup, "rate_limit", RATE_LIMIT, 2);
        let burst = |n: usize| {
            (0..n)
                .filter(|i| admitted(&send(&vms[i % 2], "api", &[("x-api-key", "alice")])))
                .count()
        };
        assert_eq!(burst(1000), 100, "{setup:?}");
        host.advance(Duration::from_millis(500));
        assert_eq!(burst(1000), 50, "{setup:?}");
        let refused = send(&vms[0], "api", &[("x-api-key", "alice")]);
        let reply = refused.local_reply().unwrap();
        assert_eq!(reply.status, 429, "{setup:?}");
        assert_eq!(reply.header("retry-after"), Some("1"), "{setup:?}");
        host.advance(Duration::from_secs(1));
        assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 150);
        assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 1851);
        // The allowed response carries the RateLimit headers.
        let s = send(&vms[1], "api", &[("x-api-key", "bob")]);
        s.response_headers(response(200), true);
        assert_eq!(
            s.response_header("ratelimit-policy").as_deref(),
            Some("\"per-key\";q=100;w=1"),
            "{setup:?}"
        );
    }
}

#[test]
fn the_breaker_opens_and_half_opens_as_a_stage() {
    for setup in BOTH {
        let host = Host::new();
        let vms = workers(&host, setup, "circuit_breaker", BREAKER, 2);
        for i in 0..20 {
            let status = if i % 2 == 0 { 500 } else { 200 };
            assert!(call(&vms[i % 2], if i == 19 { 503 } else { status }));
        }
        // 11 of 20 failed: open on both workers.
        for vm in &vms {
            let s = send(vm, "orders", &[]);
            let reply = s.local_reply().expect("refused while open");
            assert_eq!(reply.status, 503, "{setup:?}");
            assert_eq!(reply.header("retry-after"), Some("5"), "{setup:?}");
        }
        host.advance(Duration::from_secs(5));
        // Half open: exactly three probes over both workers.
        let streams: Vec<HttpStream> = (0..8).map(|i| send(&vms[i % 2], "orders", &[])).collect();
        let probes: Vec<&HttpStream> = streams.iter().filter(|s| admitted(s)).collect();
        assert_eq!(probes.len(), 3, "{setup:?}");
        for p in probes {
            p.response_headers(response(200), true);
            p.finish();
        }
        assert!(call(&vms[0], 200), "closed again ({setup:?})");
        assert_eq!(host.counter("keel.circuit_breaker.orders.opened"), 1);
        assert_eq!(host.counter("keel.circuit_breaker.orders.closed"), 1);
        assert_eq!(host.counter("keel.circuit_breaker.orders.probes"), 3);
    }
}

/// Advances 1 ms at a time until `vm` has a callout (at most `limit`).
fn callout_within(host: &Host, vm: &Vm, limit: Duration) -> keel_host_tests::harness::Callout {
    let end = host.elapsed() + limit;
    loop {
        if let Some(c) = vm.next_callout() {
            return c;
        }
        assert!(host.elapsed() < end, "no callout within {limit:?}");
        host.advance(Duration::from_millis(1));
    }
}

#[test]
fn retry_retries_and_respects_its_budget_as_a_stage() {
    for setup in BOTH {
        let host = Host::new();
        let vm = workers(&host, setup, "retry", RETRY, 1).remove(0);
        let s = send(&vm, "orders", &[("x-request-id", "a")]);
        assert_eq!(s.response_headers(response(503), false), Action::Pause);
        let started = host.elapsed();
        let callout = callout_within(&host, &vm, Duration::from_millis(100));
        assert_eq!(
            host.elapsed() - started,
            Duration::from_millis(25),
            "{setup:?}"
        );
        assert_eq!(callout.upstream, "backend");
        assert_eq!(callout.header("x-request-id"), Some("a"));
        callout.respond(Response::new(200).body("recovered"));
        let reply = s.local_reply().expect("the retry's answer");
        assert_eq!(reply.status, 200, "{setup:?}");
        assert_eq!(reply.body_text(), "recovered");
        assert_eq!(reply.header("x-keel-attempts"), Some("2"));
        assert_eq!(host.counter("keel.retry.default.retries"), 1);

        // The budget: one retry a second between two workers.
        let host = Host::new();
        let vms = workers(&host, setup, "retry", TIGHT_RETRY, 2);
        let first = send(&vms[0], "orders", &[]);
        assert_eq!(first.response_headers(response(503), false), Action::Pause);
        let second = send(&vms[1], "orders", &[]);
        assert_eq!(
            second.response_headers(response(503), false),
            Action::Continue,
            "the other worker sees the spent budget ({setup:?})"
        );
        assert_eq!(
            second.response_header("x-keel-attempts").as_deref(),
            Some("1")
        );
        assert_eq!(host.counter("keel.retry.tight.budget_exhausted"), 1);
    }
}

#[test]
fn the_picker_picks_the_same_host_for_a_key_as_a_stage() {
    let host = Host::new();
    let alone = workers(&host, Setup::Alone, "picker", PICKER, 1).remove(0);
    let piped = pipeline(&host, &[("rate_limit", RATE_LIMIT), ("picker", PICKER)], 1).remove(0);
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..300 {
        let user = format!("user-{i}");
        let headers = [("x-user", user.as_str()), ("x-api-key", user.as_str())];
        let a = send(&alone, "users", &headers)
            .request_header("x-envoy-original-dst-host")
            .unwrap();
        let b = send(&piped, "users", &headers)
            .request_header("x-envoy-original-dst-host")
            .unwrap();
        assert_eq!(a, b, "{user}");
        *spread.entry(a).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
}

#[test]
fn a_delayed_request_resumes_into_the_next_stage() {
    let host = Host::new();
    let vm = pipeline(&host, &[("rate_limit", SHAPING), ("picker", PICKER)], 1).remove(0);
    // The first request takes the only token: through both stages at once.
    let first = send(&vm, "users", &[("x-api-key", "k"), ("x-user", "alice")]);
    assert!(admitted(&first));
    let host_of_alice = first.request_header("x-envoy-original-dst-host").unwrap();
    // The second waits 100 ms for the next token; the picker has not run yet.
    let second = send(&vm, "users", &[("x-api-key", "k"), ("x-user", "alice")]);
    assert!(second.is_paused());
    assert_eq!(second.request_header("x-envoy-original-dst-host"), None);
    host.advance(Duration::from_millis(99));
    assert!(second.is_paused());
    host.advance(Duration::from_millis(6));
    // Resumed by the rate limiter's tick, through the picker, then to the host.
    assert!(!second.is_paused(), "{:?}", vm.logs());
    assert!(second.is_resumed());
    assert_eq!(
        second.request_header("x-envoy-original-dst-host"),
        Some(host_of_alice)
    );
    assert_eq!(host.counter("keel.rate_limit.shaped.delayed"), 1);
    assert!(vm.crashed().is_none());
}

#[test]
fn a_delayed_request_stops_at_a_later_stage_that_refuses_it() {
    let host = Host::new();
    // A breaker forced open after the shaping: the delayed request is refused by the breaker,
    // once the rate limiter lets it go, and never reaches the host.
    let forced = r#"{"breakers": [{"name": "kill", "mode": "forced_open"}]}"#;
    let vm = pipeline(
        &host,
        &[("rate_limit", SHAPING), ("circuit_breaker", forced)],
        1,
    )
    .remove(0);
    let first = send(&vm, "orders", &[("x-api-key", "k")]);
    assert_eq!(first.local_reply().map(|r| r.status), Some(503));
    let second = send(&vm, "orders", &[("x-api-key", "k")]);
    assert!(second.is_paused());
    assert!(second.local_reply().is_none());
    host.advance(Duration::from_millis(105));
    assert_eq!(second.local_reply().map(|r| r.status), Some(503));
    assert!(!second.is_resumed(), "the host's stream was never resumed");
}

#[test]
fn a_held_response_resumes_into_the_earlier_stages() {
    let host = Host::new();
    // Retry holds the 503; its only retry fails (reset); it hands the held response on, and the
    // breaker before it in the chain then sees that response.
    let retry = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 2, "backoff": {"base": "10ms", "cap": "10ms", "jitter": "none"}}]}"#;
    let vm = pipeline(&host, &[("circuit_breaker", BREAKER), ("retry", retry)], 1).remove(0);
    let s = send(&vm, "orders", &[]);
    assert_eq!(s.response_headers(response(503), false), Action::Pause);
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 0);
    callout_within(&host, &vm, Duration::from_millis(50)).fail();
    assert!(s.local_reply().is_none());
    assert!(!s.is_paused());
    assert_eq!(s.response_header("x-keel-attempts").as_deref(), Some("2"));
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 1);
    assert_eq!(host.counter("keel.circuit_breaker.orders.failures"), 1);
}

#[test]
fn the_route_name_is_read_once_per_request_for_all_stages() {
    let host = Host::new();
    let routed =
        |config: &str| config.replacen("{\"name\"", "{\"routes\": [\"orders\"], \"name\"", 1);
    let stages = [
        ("rate_limit", routed(RATE_LIMIT)),
        ("circuit_breaker", routed(BREAKER)),
        ("retry", routed(RETRY)),
    ];
    let stages: Vec<(&str, &str)> = stages.iter().map(|(f, c)| (*f, c.as_str())).collect();
    let vm = pipeline(&host, &stages, 1).remove(0);
    let before = vm.property_reads(&["route_name"]);
    for _ in 0..10 {
        let s = send(&vm, "orders", &[("x-api-key", "k")]);
        assert!(admitted(&s));
        s.response_headers(response(200), true);
        s.finish();
    }
    assert_eq!(vm.property_reads(&["route_name"]) - before, 10);
    // A stage may list routes of its own: it is skipped on the others.
    let config = r#"{"stages": [{"filter": "circuit_breaker", "routes": ["admin"], "config": {"breakers": [{"name": "kill", "mode": "forced_open"}]}}, {"filter": "picker", "config": PICKER}]}"#
        .replace("PICKER", PICKER);
    let vm = host
        .vm_from_path(suite_path())
        .root_id("pipeline")
        .vm_id("keel")
        .config(config)
        .start()
        .unwrap();
    assert!(vm.configured(), "{:?}", vm.logs());
    assert!(vm.has_log("keel pipeline: configured stages: circuit_breaker (routes admin), picker"));
    let s = send(&vm, "users", &[("x-user", "a")]);
    assert!(admitted(&s));
    assert!(s.request_header("x-envoy-original-dst-host").is_some());
    let s = send(&vm, "admin", &[("x-user", "a")]);
    assert_eq!(s.local_reply().map(|r| r.status), Some(503));
}

#[test]
fn a_bad_pipeline_configuration_is_refused_naming_the_field() {
    let host = Host::new();
    for (config, line) in [
        (
            r#"{"stages": [{"filter": "ratelimit", "config": {}}]}"#.to_string(),
            "keel pipeline: stages[0].filter: expected one of circuit_breaker, retry, rate_limit, picker, discovery, idempotency, adaptive, got \"ratelimit\"; configuration refused",
        ),
        (
            pipeline_config(&[
                ("picker", PICKER),
                ("rate_limit", &RATE_LIMIT.replace("\"1s\"", "\"fast\"")),
            ]),
            "keel pipeline: stages[1].config.policies[0].limit.per: expected a duration like",
        ),
        (
            r#"{"stages": [{"filter": "retry", "config": {}, "order": 1}]}"#.to_string(),
            "keel pipeline: stages[0].order: unknown field",
        ),
        (
            r#"{"stages": []}"#.to_string(),
            "keel pipeline: stages: expected at least one stage",
        ),
    ] {
        let vm = host
            .vm_from_path(suite_path())
            .root_id("pipeline")
            .vm_id("keel")
            .config(config.as_str())
            .start()
            .unwrap();
        assert!(!vm.configured(), "{config} accepted");
        assert!(vm.crashed().is_none());
        assert!(vm.has_log(line), "{line} not in {:?}", vm.logs());
    }
}

const DISCOVERY: &str = r#"{"services": [{"name": "users", "source": {"static": [{"address": "127.0.0.1", "port": 18091}, {"address": "127.0.0.1", "port": 18092}]}, "refresh": "1s"}]}"#;

/// One request as the benchmark sends it, through every request and response callback.
fn one_request(vm: &Vm) {
    let s = vm.http_stream();
    s.set_property("route_name", "bench");
    s.request_headers(
        request("GET", "/")
            .with("x-api-key", "bench")
            .with("x-user", "u"),
        true,
    );
    assert!(admitted(&s));
    s.response_headers(response(200), false);
    s.response_body(b"ok", true);
    s.finish();
}

/// Entries into the VM per request (callbacks, allocations), over 10 requests after one.
fn entries_per_request(vm: &Vm) -> (u64, u64) {
    one_request(vm);
    let (c0, a0) = vm.entries();
    for _ in 0..10 {
        one_request(vm);
    }
    let (c1, a1) = vm.entries();
    ((c1 - c0) / 10, (a1 - a0) / 10)
}

#[test]
fn one_pipeline_enters_the_vm_far_less_often_than_five_filters() {
    let five = [
        ("rate_limit", RATE_LIMIT),
        ("circuit_breaker", BREAKER),
        ("retry", RETRY),
        ("picker", PICKER),
        ("discovery", DISCOVERY),
    ];
    let host = Host::new();
    let mut alone = (0, 0);
    for (filter, config) in five {
        let vm = workers(&host, Setup::Alone, filter, config, 1).remove(0);
        let (callbacks, allocations) = entries_per_request(&vm);
        eprintln!("{filter} alone: {callbacks} callbacks, {allocations} allocations per request");
        alone = (alone.0 + callbacks, alone.1 + allocations);
    }
    let host = Host::new();
    let piped = entries_per_request(&pipeline(&host, &five, 1).remove(0));
    eprintln!(
        "five filters alone: {} callbacks, {} allocations per request; one pipeline: {} callbacks, {} allocations",
        alone.0, alone.1, piped.0, piped.1
    );
    // One filter instance's callbacks instead of five's.
    assert_eq!(piped.0 * 5, alone.0);
    // The stages' host reads that are the same read are made once (here the response's
    // status, which the breaker and retry both read).
    assert!(piped.1 < alone.1, "{piped:?} vs {alone:?}");
}
