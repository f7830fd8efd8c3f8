//! The circuit breaker in Keel's wasmtime host: workers sharing one breaker, a virtual clock,
//! Envoy's response flags set by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use keel_host_tests::harness::{request, response, Host, HttpStream, LogLevel, Vm};
use keel_host_tests::Module;

const MINIMAL: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3}]}"#;

/// Envoy response flags (`response.flags`), as read from Envoy 1.40.
const UF: i64 = 0x20;
const UC: i64 = 0x40;
const UT: i64 = 0x4;
const DC: i64 = 0x4000;

fn workers(host: &Host, config: &str, n: usize) -> Vec<Vm> {
    workers_in(host, Module::Own, config, n)
}

/// `n` workers of the filter from `module` (its own or keel.wasm).
fn workers_in(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "circuit_breaker", module, config, n).unwrap()
}

/// A request on route `orders` with these extra headers; the stream is left open.
fn send_with(vm: &Vm, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpStream {
    let stream = vm.http_stream();
    stream.set_property("xds.route_name", "orders");
    let mut h = request(method, path);
    for (name, value) in headers {
        h = h.with(name, value);
    }
    stream.request_headers(h, true);
    stream
}

fn send(vm: &Vm, path: &str) -> HttpStream {
    send_with(vm, "GET", path, &[])
}

fn admitted(stream: &HttpStream) -> bool {
    stream.local_reply().is_none()
}

/// The upstream answers `status` (no body) and the stream ends.
fn answer(stream: &HttpStream, status: u32) {
    stream.response_headers(response(status), true);
    stream.finish();
}

/// One call through the breaker on `vm`, answered with `status`; whether it was admitted.
fn call(vm: &Vm, status: u32) -> bool {
    let s = send(vm, "/orders");
    let ok = admitted(&s);
    if ok {
        answer(&s, status);
    } else {
        s.finish();
    }
    ok
}

/// Opens the minimal breaker with 20 failures spread over the workers.
fn trip(vms: &[Vm]) {
    for i in 0..20 {
        assert!(call(&vms[i % vms.len()], 500), "call {i} admitted");
    }
}

fn logged(vms: &[Vm], text: &str) -> usize {
    vms.iter()
        .map(|vm| vm.logs().iter().filter(|l| l.message == text).count())
        .sum()
}

#[test]
fn two_workers_share_one_breaker_that_opens_at_min_calls() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, MINIMAL, 2);
        assert!(vms[0].has_log("keel circuit_breaker: configured breakers: orders"));
        // 10 failures and 9 successes: 53 % failed, but fewer than min_calls outcomes.
        for i in 0..19 {
            let status = if i % 2 == 0 { 500 } else { 200 };
            assert!(call(&vms[i % 2], status), "call {i} admitted");
        }
        assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 0);
        // The 20th outcome, on the other worker, reaches min_calls: 11 of 20 failed.
        assert!(call(&vms[1], 503));
        let line =
            "keel circuit_breaker: breaker orders: closed -> open: 11 of 20 calls failed; open for 5s";
        assert_eq!(logged(&vms, line), 1, "one log line per transition");
        assert!(vms.iter().any(|vm| vm
            .logs_at_least(LogLevel::Warn)
            .iter()
            .any(|l| l.message == line)));

        // Open on both workers: the fast reply, exactly.
        for vm in &vms {
            let s = send(vm, "/orders");
            let reply = s.local_reply().expect("refused while open");
            assert_eq!(reply.status, 503);
            assert_eq!(
                reply.headers,
                vec![
                    ("content-type".into(), "text/plain; charset=utf-8".into()),
                    ("retry-after".into(), "5".into())
                ]
            );
            assert_eq!(reply.body_text(), "circuit breaker open\n");
            s.finish();
        }
        // Retry-After counts down the time left open (rounded up).
        host.advance(Duration::from_millis(2500));
        let reply = send(&vms[0], "/orders").local_reply().unwrap();
        assert_eq!(reply.header("retry-after"), Some("3"));

        assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 1);
        assert_eq!(host.gauge("keel.circuit_breaker.orders.open"), 1);
        assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 20);
        assert_eq!(host.counter("keel.circuit_breaker.orders.failures"), 11);
        assert_eq!(host.counter("keel.circuit_breaker.orders.opened"), 1);
        assert_eq!(host.counter("keel.circuit_breaker.orders.rejected"), 3);
    }
}

#[test]
fn half_open_admits_exactly_the_probes_across_both_workers_then_closes() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, MINIMAL, 2);
        trip(&vms);
        host.advance(Duration::from_millis(4999));
        assert!(!admitted(&send(&vms[0], "/orders")), "still open");
        host.advance(Duration::from_millis(1));

        // Eight requests over both workers while the probes are out: exactly three go through.
        let streams: Vec<HttpStream> = (0..8).map(|i| send(&vms[i % 2], "/orders")).collect();
        let probes: Vec<&HttpStream> = streams.iter().filter(|s| admitted(s)).collect();
        assert_eq!(probes.len(), 3);
        for s in streams.iter().filter(|s| !admitted(s)) {
            let reply = s.local_reply().unwrap();
            assert_eq!(reply.status, 503);
            // The probes, not the clock, decide what comes next: no Retry-After.
            assert_eq!(reply.header("retry-after"), None);
        }
        assert_eq!(
            logged(
                &vms,
                "keel circuit_breaker: breaker orders: open -> half_open: open period ended"
            ),
            1
        );
        assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 2);
        assert_eq!(host.counter("keel.circuit_breaker.orders.probes"), 3);

        // The probes succeed: closed, and traffic flows on both workers.
        answer(probes[0], 200);
        answer(probes[1], 204);
        assert!(
            !admitted(&send(&vms[0], "/orders")),
            "two of three probes in"
        );
        answer(probes[2], 200);
        assert_eq!(
            logged(
                &vms,
                "keel circuit_breaker: breaker orders: half_open -> closed: 0 of 3 probes failed, 0 slow"
            ),
            1
        );
        for i in 0..10 {
            assert!(call(&vms[i % 2], 200));
        }
        assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 0);
        assert_eq!(host.gauge("keel.circuit_breaker.orders.open"), 0);
        assert_eq!(host.counter("keel.circuit_breaker.orders.closed"), 1);
        assert_eq!(host.counter("keel.circuit_breaker.orders.half_opened"), 1);
        // Refusals while half-open count as rejected too: 1 while open, 5 + 1 while half-open.
        assert_eq!(host.counter("keel.circuit_breaker.orders.rejected"), 7);
        assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 33);
    }
}

#[test]
fn failed_probes_reopen_for_longer_and_late_results_do_not_extend_the_break() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    // A call admitted before the breaker opens, answered while it is open.
    let late = send(&vms[0], "/orders");
    trip(&vms);
    host.advance(Duration::from_secs(4));
    answer(&late, 500);
    host.advance(Duration::from_secs(1));
    // The late failure did not extend the break: half-open on time.
    let probes: Vec<HttpStream> = (0..3).map(|i| send(&vms[i % 2], "/orders")).collect();
    assert!(probes.iter().all(admitted));
    answer(&probes[0], 500);
    answer(&probes[1], 200);
    answer(&probes[2], 502);
    assert_eq!(
        logged(
            &vms,
            "keel circuit_breaker: breaker orders: half_open -> open: 2 of 3 probes failed, 0 slow; open for 10s"
        ),
        1
    );
    let reply = send(&vms[1], "/orders").local_reply().unwrap();
    assert_eq!(reply.header("retry-after"), Some("10"));
    host.advance(Duration::from_secs(9));
    assert!(!admitted(&send(&vms[0], "/orders")));
    host.advance(Duration::from_secs(1));
    assert!(admitted(&send(&vms[0], "/orders")));
    assert_eq!(host.counter("keel.circuit_breaker.orders.opened"), 2);
}

#[test]
fn a_probe_whose_client_left_gives_its_permit_back_and_a_dead_one_fails() {
    let host = Host::new();
    let config = MINIMAL.replace(r#""half_open_probes": 3"#, r#""half_open_probes": 1"#);
    let vms = workers(&host, &config, 2);
    trip(&vms);
    host.advance(Duration::from_secs(5));
    let probe = send(&vms[0], "/orders");
    assert!(admitted(&probe));
    assert!(
        !admitted(&send(&vms[1], "/orders")),
        "the one permit is out"
    );
    // The client goes away before any response: Envoy flags DC; nothing is learnt.
    probe.set_property("response.flags", DC);
    probe.finish();
    let probe = send(&vms[1], "/orders");
    assert!(admitted(&probe), "the permit came back");
    // This one ends with no response and no flag: the upstream gave nothing, a failure.
    probe.finish();
    assert_eq!(
        logged(
            &vms,
            "keel circuit_breaker: breaker orders: half_open -> open: 1 of 1 probes failed, 0 slow; open for 10s"
        ),
        1
    );
    assert!(!admitted(&send(&vms[0], "/orders")));
}

#[test]
fn envoy_answers_for_a_missing_upstream_count_as_configured() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "orders", "min_calls": 100,
        "failure": {"statuses": [500], "resets": true, "timeouts": false}}]}"#;
    let vms = workers(&host, config, 1);
    let vm = &vms[0];
    let failures = || host.counter("keel.circuit_breaker.orders.failures");
    let with_flags = |status: u32, flags: i64| {
        let s = send(vm, "/orders");
        s.set_property("response.flags", flags);
        answer(&s, status);
    };
    // Envoy's 503 for a refused connection (UF): a reset, counted although 503 is not listed.
    with_flags(503, UF);
    assert_eq!(failures(), 1);
    // The upstream's own 503: a status, not listed.
    with_flags(503, 0);
    assert_eq!(failures(), 1);
    // Envoy's 504 for a route timeout (UT): timeouts are not failures here.
    with_flags(504, UT);
    assert_eq!(failures(), 1);
    // The upstream's own 500: listed.
    with_flags(500, 0);
    assert_eq!(failures(), 2);
    // The stream ends without response headers; the connection was closed (UC).
    let s = send(vm, "/orders");
    s.set_property("response.flags", UC);
    s.finish();
    assert_eq!(failures(), 3);
    // The client left (DC): no outcome at all.
    let s = send(vm, "/orders");
    s.set_property("response.flags", DC);
    s.finish();
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 5);
    assert_eq!(failures(), 3);
}

#[test]
fn envoys_503_for_a_closed_connection_counts_as_a_reset() {
    // breaker_envoy.rs: an upstream that closes the connection without answering. Envoy
    // answers 503 itself with flag UC; only 500 is a status failure here, but resets are
    // failures, so five such answers open the breaker.
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "catalog", "min_calls": 5, "open_for": "30s",
        "failure": {"statuses": [500]}, "fallback": {"max_age": "60s", "max_body_bytes": 65536}}]}"#;
    let vms = workers(&host, config, 2);
    for i in 0..5 {
        let s = send(&vms[i % 2], &format!("/catalog/{i}"));
        assert!(admitted(&s), "call {i} reaches the upstream");
        s.set_property("response.flags", UC);
        answer(&s, 503);
    }
    assert_eq!(host.counter("keel.circuit_breaker.catalog.failures"), 5);
    assert_eq!(
        logged(
            &vms,
            "keel circuit_breaker: breaker catalog: closed -> open: 5 of 5 calls failed; open for 30s"
        ),
        1
    );
    let reply = send(&vms[0], "/catalog/9").local_reply().expect("open");
    assert_eq!(
        (reply.status, reply.body_text().as_str()),
        (503, "circuit breaker open\n")
    );
    // The upstream's own 503, without the flag, is not listed: no failure.
    let other = Host::new();
    let vms = workers(&other, config, 1);
    for _ in 0..5 {
        let s = send(&vms[0], "/catalog/1");
        answer(&s, 503);
    }
    assert_eq!(other.counter("keel.circuit_breaker.catalog.failures"), 0);
    assert!(admitted(&send(&vms[0], "/catalog/1")));
}

#[test]
fn every_answer_through_a_closed_breaker_is_one_successful_call() {
    // breaker_envoy.rs's direct-response route: 200 answers over two workers.
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    for i in 0..200 {
        assert!(call(&vms[i % 2], 200), "call {i} admitted");
    }
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 200);
    assert_eq!(host.counter("keel.circuit_breaker.orders.failures"), 0);
    assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 0);
    assert_eq!(host.counter("keel.circuit_breaker.orders.store_errors"), 0);
    assert!(vms.iter().all(|vm| vm.crashed().is_none()));
}

#[test]
fn slow_calls_open_the_breaker() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "orders", "min_calls": 4, "failure_rate": 1.0,
        "slow_call": {"duration": "1s", "rate": 0.5}}]}"#;
    let vms = workers(&host, config, 2);
    let slow = |vm: &Vm, after: Duration| {
        let s = send(vm, "/orders");
        host.advance(after);
        answer(&s, 200);
    };
    slow(&vms[0], Duration::from_millis(10));
    slow(&vms[1], Duration::from_millis(1500));
    // Exactly the slow-call duration is not slow (strictly later only).
    slow(&vms[0], Duration::from_secs(1));
    assert!(admitted(&send(&vms[0], "/orders")));
    slow(&vms[1], Duration::from_secs(2));
    assert_eq!(
        logged(
            &vms,
            "keel circuit_breaker: breaker orders: closed -> open: 2 of 4 calls were slow; open for 5s"
        ),
        1
    );
    assert_eq!(host.counter("keel.circuit_breaker.orders.slow_calls"), 2);
    assert!(!admitted(&send(&vms[0], "/orders")));
}

#[test]
fn the_open_reply_is_exactly_as_configured() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "orders", "min_calls": 1, "open_for": "30s",
        "open_reply": {"status": 429, "body": "{\"error\":\"orders unavailable\"}",
                       "headers": {"Content-Type": "application/json", "x-why": "breaker"}}}]}"#;
    let vms = workers(&host, config, 2);
    assert!(call(&vms[0], 500));
    let s = send_with(
        &vms[1],
        "POST",
        "/orders",
        &[("content-type", "text/plain")],
    );
    let reply = s.local_reply().expect("refused");
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.headers,
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-why".into(), "breaker".into()),
            ("retry-after".into(), "30".into()),
        ]
    );
    assert_eq!(reply.body_text(), r#"{"error":"orders unavailable"}"#);
    // The breaker's own reply is not an outcome.
    s.finish();
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 1);
}

#[test]
fn the_fallback_serves_the_last_good_response_exactly() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "orders", "min_calls": 5, "failure_rate": 0.4,
        "open_for": "60s", "fallback": {"max_age": "30s", "max_body_bytes": 64}}]}"#;
    let vms = workers(&host, config, 2);

    // A good GET, its body in two chunks, is kept on worker 0.
    let s = send(&vms[0], "/orders/7?verbose=1");
    s.response_headers(
        response(200)
            .with("content-type", "application/json")
            .with("etag", "\"v1\"")
            .with("set-cookie", "sid=secret")
            .with("content-length", "21")
            .with("x-envoy-upstream-service-time", "4"),
        false,
    );
    s.response_body(br#"{"id":7,"#, false);
    s.response_body(br#""name":"x"}"#, true);
    s.finish();
    // Too big for the cache, and a POST: neither is kept.
    let big = send(&vms[0], "/orders/8");
    big.response_headers(response(200), false);
    big.response_body(&[b'x'; 65], true);
    big.finish();
    let post = send_with(&vms[0], "POST", "/orders/9", &[]);
    post.response_headers(response(200), false);
    post.response_body(b"{}", true);
    post.finish();
    // Two failures in five calls open the breaker.
    assert!(call(&vms[1], 500));
    assert!(call(&vms[0], 500));

    host.advance(Duration::from_secs(3));
    // Worker 1 serves what worker 0 kept, for the same route and path (query ignored).
    let s = send(&vms[1], "/orders/7");
    let reply = s.local_reply().expect("answered locally");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers,
        vec![
            ("content-type".into(), "application/json".into()),
            ("etag".into(), "\"v1\"".into()),
            ("x-keel-fallback".into(), "orders".into()),
            ("age".into(), "3".into()),
        ]
    );
    assert_eq!(reply.body_text(), r#"{"id":7,"name":"x"}"#);
    assert_eq!(
        host.counter("keel.circuit_breaker.orders.fallback_served"),
        1
    );

    // Nothing kept for these: the open reply.
    for (method, path) in [
        ("GET", "/orders/8"),
        ("GET", "/orders/9"),
        ("POST", "/orders/7"),
    ] {
        let s = send_with(&vms[0], method, path, &[]);
        assert_eq!(s.local_reply().unwrap().status, 503, "{method} {path}");
    }
    // Another route with the same path has its own entry.
    let other = vms[0].http_stream();
    other.set_property("xds.route_name", "search");
    other.request_headers(request("GET", "/orders/7"), true);
    assert_eq!(other.local_reply().unwrap().status, 503);

    // Older than max_age: no longer served.
    host.advance(Duration::from_secs(27));
    assert_eq!(
        send(&vms[0], "/orders/7").local_reply().unwrap().status,
        200
    );
    host.advance(Duration::from_secs(1));
    let reply = send(&vms[0], "/orders/7").local_reply().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-keel-fallback"), None);
    assert_eq!(
        host.counter("keel.circuit_breaker.orders.fallback_served"),
        2
    );
    // A served fallback is a refusal too: 2 fallbacks and 5 open replies.
    assert_eq!(host.counter("keel.circuit_breaker.orders.rejected"), 7);
}

#[test]
fn a_bad_configuration_is_refused_with_the_field_named() {
    let cases = [
        (
            MINIMAL.replace("0.5", "1.5"),
            "keel circuit_breaker: breakers[0].failure_rate: must be in (0, 1], got 1.5; configuration refused",
        ),
        (
            MINIMAL.replace(r#""10s""#, r#""fast""#),
            "keel circuit_breaker: breakers[0].window: ",
        ),
        (
            MINIMAL.replace("failure_rate", "failure_ratio"),
            "keel circuit_breaker: breakers[0].failure_ratio: ",
        ),
        (
            r#"{"breakers": [{"name": "a"}, {"name": "b", "scope": "route"}]}"#.to_string(),
            "keel circuit_breaker: breakers[1].scope: ",
        ),
    ];
    for (config, expected) in cases {
        let host = Host::new();
        let vm = host
            .vm("circuit_breaker")
            .root_id("circuit_breaker")
            .vm_id("keel")
            .config(config.as_str())
            .start()
            .unwrap();
        assert!(!vm.configured(), "{config}");
        assert!(
            vm.logs().iter().any(|l| l.message.starts_with(expected)),
            "{expected}: {:?}",
            vm.logs()
        );
        assert!(vm.crashed().is_none());
    }
}

#[test]
fn per_host_scope_opens_only_the_failing_host() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "per-host", "scope": "host", "min_calls": 3, "failure_rate": 0.5}]}"#;
    let vms = workers(&host, config, 2);
    let to = |i: usize, target: &str| {
        send_with(
            &vms[i % 2],
            "GET",
            "/",
            &[("x-envoy-original-dst-host", target)],
        )
    };
    let hosts = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
    for round in 0..3 {
        for (h, target) in hosts.iter().enumerate() {
            let s = to(round + h, target);
            assert!(admitted(&s));
            answer(&s, if h == 0 { 500 } else { 200 });
        }
    }
    assert_eq!(
        logged(
            &vms,
            "keel circuit_breaker: breaker per-host (host 10.0.0.1:80): closed -> open: 3 of 3 calls failed; open for 5s"
        ),
        1
    );
    for round in 0..4 {
        assert!(
            !admitted(&to(round, hosts[0])),
            "the failing host is cut off"
        );
        for target in &hosts[1..] {
            let s = to(round, target);
            assert!(admitted(&s));
            answer(&s, 200);
        }
    }
    assert_eq!(
        host.gauge("keel.circuit_breaker.per-host.host.10_0_0_1_80.state"),
        1
    );
    assert_eq!(host.gauge("keel.circuit_breaker.per-host.open"), 1);
    assert_eq!(host.counter("keel.circuit_breaker.per-host.opened"), 1);
    assert_eq!(host.counter("keel.circuit_breaker.per-host.rejected"), 4);
    assert!(host
        .shared_data_in("keel", "keel/circuit_breaker/per-host/host/10.0.0.2:80")
        .is_some());

    // Without the header (no picker before the breaker) the request passes unguarded, once
    // explained per worker.
    let s = send(&vms[0], "/");
    assert!(admitted(&s));
    answer(&s, 500);
    assert!(admitted(&send(&vms[0], "/")));
    assert_eq!(host.counter("keel.circuit_breaker.per-host.unguarded"), 2);
    let warnings = vms[0]
        .logs_at_least(LogLevel::Warn)
        .into_iter()
        .filter(|l| l.message.contains("pass unguarded"))
        .count();
    assert_eq!(warnings, 1);
}

#[test]
fn a_worker_guards_at_most_max_instances_hosts() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "per-host", "scope": "host", "min_calls": 1, "max_instances": 2}]}"#;
    let vms = workers(&host, config, 1);
    let to = |target: &str| {
        send_with(
            &vms[0],
            "GET",
            "/",
            &[("x-envoy-original-dst-host", target)],
        )
    };
    answer(&to("10.0.0.1:80"), 200);
    answer(&to("10.0.0.2:80"), 200);
    // A third host would need new shared state: it passes unguarded, even when failing.
    answer(&to("10.0.0.3:80"), 500);
    assert!(admitted(&to("10.0.0.3:80")));
    assert_eq!(host.counter("keel.circuit_breaker.per-host.unguarded"), 2);
    assert!(vms[0].has_log(
        "keel circuit_breaker: breaker per-host: this worker already guards max_instances (2) host instances; such requests pass unguarded (counted in unguarded)"
    ));
    assert_eq!(
        host.shared_data_keys("keel"),
        vec![
            "keel/circuit_breaker/per-host/host/10.0.0.1:80".to_string(),
            "keel/circuit_breaker/per-host/host/10.0.0.2:80".to_string(),
        ]
    );
    // The known hosts are still guarded.
    answer(&to("10.0.0.1:80"), 500);
    assert!(!admitted(&to("10.0.0.1:80")));
}

#[test]
fn per_cluster_scope_reads_the_route_cluster() {
    let host = Host::new();
    let config = r#"{"breakers": [{"name": "clusters", "scope": "cluster", "min_calls": 2}]}"#;
    let vms = workers(&host, config, 1);
    let to = |cluster: &str| {
        let s = vms[0].http_stream();
        s.set_property("xds.cluster_name", cluster);
        s.request_headers(request("GET", "/"), true);
        s
    };
    for _ in 0..2 {
        answer(&to("payments"), 503);
        answer(&to("catalog"), 200);
    }
    assert!(!admitted(&to("payments")));
    assert!(admitted(&to("catalog")));
    assert!(vms[0].has_log(
        "keel circuit_breaker: breaker clusters (cluster payments): closed -> open: 2 of 2 calls failed; open for 5s"
    ));
    assert_eq!(
        host.gauge("keel.circuit_breaker.clusters.cluster.payments.state"),
        1
    );
}

#[test]
fn routes_choose_the_breaker() {
    let host = Host::new();
    let config = r#"{"breakers": [
        {"name": "orders", "routes": ["orders"], "min_calls": 1},
        {"name": "rest", "min_calls": 1}]}"#;
    let vms = workers(&host, config, 1);
    let on = |route: &str| {
        let s = vms[0].http_stream();
        s.set_property("xds.route_name", route);
        s.request_headers(request("GET", "/"), true);
        s
    };
    answer(&on("orders"), 500);
    assert!(!admitted(&on("orders")));
    assert!(admitted(&on("search")));
    assert_eq!(host.counter("keel.circuit_breaker.rest.calls"), 0);
    answer(&on("search"), 500);
    assert!(!admitted(&on("search")));
    assert_eq!(host.counter("keel.circuit_breaker.rest.opened"), 1);
}

#[test]
fn forced_open_disabled_and_metrics_only_modes() {
    let host = Host::new();
    let config = r#"{"breakers": [
        {"name": "kill", "routes": ["kill"], "mode": "forced_open"},
        {"name": "off", "routes": ["off"], "mode": "disabled", "min_calls": 1},
        {"name": "dark", "mode": "metrics_only", "min_calls": 1}]}"#;
    let vms = workers(&host, config, 1);
    let on = |route: &str| {
        let s = vms[0].http_stream();
        s.set_property("xds.route_name", route);
        s.request_headers(request("GET", "/"), true);
        s
    };
    let reply = on("kill").local_reply().expect("forced open");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), None);
    assert_eq!(host.gauge("keel.circuit_breaker.kill.state"), 3);

    answer(&on("off"), 500);
    assert!(admitted(&on("off")));
    assert_eq!(host.gauge("keel.circuit_breaker.off.state"), 4);
    assert!(host
        .shared_data_in("keel", "keel/circuit_breaker/off")
        .is_none());

    answer(&on("dark"), 500);
    assert!(vms[0].has_log(
        "keel circuit_breaker: breaker dark: closed -> open: 1 of 1 calls failed; open for 5s"
    ));
    assert!(admitted(&on("dark")), "metrics_only never refuses");
    assert_eq!(host.counter("keel.circuit_breaker.dark.would_reject"), 1);
    assert_eq!(host.counter("keel.circuit_breaker.dark.rejected"), 0);
}

#[test]
fn admitting_on_a_closed_breaker_reads_and_writes_nothing() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    // Created at configuration, before traffic, so every later write is a compare-and-swap.
    let (_, version) = host
        .shared_data_in("keel", "keel/circuit_breaker/orders")
        .expect("created at configure");
    let streams: Vec<HttpStream> = (0..10).map(|i| send(&vms[i % 2], "/orders")).collect();
    assert!(streams.iter().all(admitted));
    assert_eq!(
        host.shared_data_in("keel", "keel/circuit_breaker/orders")
            .unwrap()
            .1,
        version
    );
    answer(&streams[0], 200);
    assert_ne!(
        host.shared_data_in("keel", "keel/circuit_breaker/orders")
            .unwrap()
            .1,
        version
    );
}

/// Regression (one state read per request): the response's update starts from the state the
/// request read. A stream whose state changed in between (other streams recorded their
/// outcomes) must still record its own, exactly once: the write with the old version is
/// refused and the update reads the state again.
#[test]
fn outcomes_of_interleaved_streams_are_each_recorded_once() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    // Ten streams admitted on two workers before any answers: all read the same version.
    let streams: Vec<HttpStream> = (0..10).map(|i| send(&vms[i % 2], "/orders")).collect();
    assert!(streams.iter().all(admitted));
    for s in &streams {
        answer(s, 500);
    }
    // Nine more failures: 19 calls, below min_calls (20), so still closed.
    for i in 0..9 {
        assert!(call(&vms[i % 2], 500), "call {i} admitted");
    }
    assert!(
        call(&vms[0], 500),
        "the 20th call is admitted and opens the breaker"
    );
    let s = send(&vms[1], "/orders");
    assert!(
        !admitted(&s),
        "open after exactly 20 failures: none was lost or counted twice"
    );
    assert_eq!(host.counter("keel.circuit_breaker.orders.calls"), 20);
}

/// A request on a closed breaker, with nothing written in between, reads the state once.
#[test]
fn a_closed_breaker_reads_its_state_once_per_request() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    assert!(call(&vms[0], 200));
    let reads = |vm: &Vm| {
        vm.host_calls()
            .get("proxy_get_shared_data")
            .copied()
            .unwrap_or(0)
    };
    let (before, writes_before) = (reads(&vms[0]), vms[0].host_calls()["proxy_set_shared_data"]);
    for _ in 0..5 {
        assert!(call(&vms[0], 200));
    }
    assert_eq!(reads(&vms[0]) - before, 5, "one read per request");
    assert_eq!(
        vms[0].host_calls()["proxy_set_shared_data"] - writes_before,
        5,
        "one write per request"
    );
}
