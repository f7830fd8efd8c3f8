//! The retry filter in Keel's wasmtime host: a virtual clock, scripted callout answers, two
//! workers sharing the budget. Build the module first (`dist/keel_retry.wasm`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::time::Duration;

use keel_host_tests::harness::{
    request, response, Action, Callout, Flow, HeaderList, Host, HttpStream, Response, Vm,
};
use keel_host_tests::Module;

/// The issue's minimal configuration, as written.
const MINIMAL: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3, "backoff": {"base": "25ms", "cap": "250ms", "jitter": "full"}, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#;

/// No jitter: the delays are exactly 25 ms, then 50 ms.
const STEADY: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "backoff": {"base": "25ms", "cap": "250ms", "jitter": "none"}}]}"#;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `n` workers of the filter from `module` (its own or keel.wasm).
fn workers_in(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "retry", module, config, n).unwrap()
}

/// `n` workers of the filter's own module.
fn workers(host: &Host, config: &str, n: usize) -> Vec<Vm> {
    workers_in(host, Module::Own, config, n)
}

fn worker(host: &Host, config: &str) -> Vm {
    worker_in(host, Module::Own, config)
}

fn worker_in(host: &Host, module: Module, config: &str) -> Vm {
    workers_in(host, module, config, 1).remove(0)
}

fn get(id: &str) -> HeaderList {
    request("GET", "/orders?page=2")
        .with("x-request-id", id)
        .with("accept", "application/json")
}

/// A request that went through the router and got `status` back.
fn first_attempt(vm: &Vm, headers: HeaderList, status: u32) -> (HttpStream, Action) {
    let stream = vm.http_stream();
    stream.set_property("route_name", "orders");
    assert_eq!(stream.request_headers(headers, true), Action::Continue);
    let action = stream.response_headers(response(status), false);
    (stream, action)
}

/// Advances the clock 1 ms at a time until the VM has a callout (at most `limit`); returns
/// when it appeared (virtual time since the host started) and the callout.
fn next_callout_within(host: &Host, vm: &Vm, limit: Duration) -> Option<(Duration, Callout)> {
    let end = host.elapsed() + limit;
    loop {
        if let Some(callout) = vm.next_callout() {
            return Some((host.elapsed(), callout));
        }
        if host.elapsed() >= end {
            return None;
        }
        host.advance(ms(1));
    }
}

fn crashed(vm: &Vm) -> bool {
    vm.crashed().is_some()
}

// ----- configuration -----

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    let host = Host::new();
    for (config, line) in [
        (
            r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 7}]}"#,
            "keel retry: policies[0].max_attempts: at most 5, got 7; configuration refused",
        ),
        (
            r#"{"policies": [{"name": "default", "budget": {"ratio": 0.2, "ttl": "fast"}}]}"#,
            "keel retry: policies[0].budget.ttl: ",
        ),
        (
            r#"{"policies": [{"name": "default", "backof": {}}]}"#,
            "keel retry: policies[0].backof: unknown field",
        ),
        (
            r#"{"policies": [{"name": "default", "first_attempt": "sometimes"}]}"#,
            "keel retry: policies[0].first_attempt: expected \"router\" or \"callout\"",
        ),
        ("", "keel retry: not valid JSON"),
    ] {
        let vm = host
            .vm("retry")
            .root_id("retry")
            .config(config)
            .start()
            .unwrap();
        assert!(!vm.configured(), "{config} was accepted");
        assert!(vm.has_log(line), "{config}: {:?}", vm.logs());
        assert!(!crashed(&vm));
    }
}

#[test]
fn the_minimal_config_creates_the_shared_budget_at_load() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    assert!(vm.has_log("configured policies: default (cluster backend, 3 attempts"));
    let (budget, _) = host
        .shared_data_in("keel", "keel/retry/default/budget")
        .expect("the budget exists before the first request");
    assert_eq!(budget.len(), 96);
}

// ----- requests that need no retry -----

#[test]
fn a_success_is_one_attempt_and_passes_on() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let (stream, action) = first_attempt(&vm, get("ok-1"), 200);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        stream.response_header("x-keel-attempts").as_deref(),
        Some("1")
    );
    assert_eq!(stream.response_body(b"fine", true), Action::Continue);
    host.advance(ms(1000));
    assert!(vm.callouts().is_empty());
    assert_eq!(host.counter("keel.retry.default.requests"), 1);
    assert_eq!(host.counter("keel.retry.default.attempts_1"), 1);
    assert_eq!(host.counter("keel.retry.default.retries"), 0);
    // A 404 is an answer, not a failure.
    let (stream, action) = first_attempt(&vm, get("missing"), 404);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        stream.response_header("x-keel-attempts").as_deref(),
        Some("1")
    );
    assert!(!crashed(&vm));
}

#[test]
fn the_attempt_header_can_be_switched_off() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "quiet", "cluster": "backend", "attempt_header": null}]}"#,
    );
    let (stream, _) = first_attempt(&vm, get("q"), 200);
    assert_eq!(stream.response_header("x-keel-attempts"), None);
}

// ----- retries -----

#[test]
fn attempts_happen_at_the_scheduled_times() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vm = worker_in(&host, module, STEADY);
        let body = b"{\"item\": 7}";
        let stream = vm.http_stream();
        stream.set_property("route_name", "orders");
        let headers = request("PUT", "/orders/7")
            .with("x-request-id", "put-7")
            .with("content-type", "application/json")
            .with("content-length", &body.len().to_string());
        assert_eq!(stream.request_headers(headers, false), Action::Continue);
        // Envoy hands the body over in chunks.
        assert_eq!(stream.request_body(&body[..4], false), Action::Continue);
        assert_eq!(stream.request_body(&body[4..], true), Action::Continue);
        let sent_at = host.elapsed();

        // The upstream fails: the response and its body are held, nothing reaches the client.
        assert_eq!(
            stream.response_headers(response(503).with("x-from", "router"), false),
            Action::Pause
        );
        assert_eq!(stream.response_body(b"busy", true), Action::Pause);
        assert_eq!(stream.response_flow(), Flow::Paused);

        // Second attempt exactly 25 ms later (jitter none), as a callout with the same request.
        let (at, second) = next_callout_within(&host, &vm, ms(100)).expect("a second attempt");
        assert_eq!(at - sent_at, ms(25));
        assert_eq!(second.upstream, "backend");
        assert_eq!(second.header(":method"), Some("PUT"));
        assert_eq!(second.header(":path"), Some("/orders/7"));
        assert_eq!(second.header(":authority"), Some("example.com"));
        assert_eq!(second.header("x-request-id"), Some("put-7"));
        assert_eq!(second.header("content-type"), Some("application/json"));
        assert_eq!(second.body, body);
        assert_eq!(second.timeout, Some(Duration::from_secs(2)));
        second.respond(Response::new(502).body("bad gateway"));

        // Third attempt 50 ms after the second's answer.
        let answered_at = host.elapsed();
        let (at, third) = next_callout_within(&host, &vm, ms(200)).expect("a third attempt");
        assert_eq!(at - answered_at, ms(50));
        assert_eq!(third.body, body);
        third.respond(
            Response::new(200)
                .header("content-type", "application/json")
                .header("x-upstream", "b")
                .body("{\"saved\": true}"),
        );

        // The held response is replaced by the last attempt's.
        let reply = stream.local_reply().expect("the filter answered");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body_text(), "{\"saved\": true}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-upstream"), Some("b"));
        assert_eq!(reply.header("x-keel-attempts"), Some("3"));
        assert_eq!(reply.header("content-length"), None);
        assert_eq!(reply.header("x-from"), None);
        assert_eq!(host.counter("keel.retry.default.retries"), 2);
        assert_eq!(host.counter("keel.retry.default.attempts_3"), 1);
        assert_eq!(host.counter("keel.retry.default.recovered"), 1);
        // Nothing else is scheduled: the tick is off.
        assert_eq!(vm.tick_period(), None);
        stream.finish();
        assert!(!crashed(&vm));
    }
}

#[test]
fn a_failed_first_attempt_is_retried_once_on_two_workers_within_the_minimal_budget() {
    // retry_envoy.rs's first test: 100 requests whose first attempt fails, over two workers
    // sharing the budget (its reserve, 10/s over 10 s, plus 20 % of requests covers them all).
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    let n = 100;
    for i in 0..n {
        let vm = &vms[i % 2];
        let id = format!("once-{i}");
        let (stream, action) = first_attempt(vm, get(&id), 503);
        assert_eq!(action, Action::Pause, "request {i} is held for a retry");
        let (_, retry) = next_callout_within(&host, vm, ms(30)).expect("a retry");
        // The retry is the same request.
        assert_eq!(retry.header(":method"), Some("GET"));
        assert_eq!(retry.header(":path"), Some("/orders?page=2"));
        assert_eq!(retry.header("x-request-id"), Some(id.as_str()));
        retry.respond(
            Response::new(200)
                .header("x-upstream-attempt", "2")
                .body("backend"),
        );
        // The client gets the second attempt's answer in place of the held 503.
        let reply = stream.local_reply().expect("the retry's answer");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body_text(), "backend");
        assert_eq!(reply.header("x-upstream-attempt"), Some("2"));
        assert_eq!(reply.header("x-keel-attempts"), Some("2"));
        stream.finish();
    }
    assert!(
        vms.iter().all(|vm| vm.callouts().is_empty()),
        "no third attempt"
    );
    for (what, expected) in [
        ("requests", n),
        ("retries", n),
        ("attempts_2", n),
        ("recovered", n),
        ("budget_exhausted", 0),
    ] {
        assert_eq!(
            host.counter(&format!("keel.retry.default.{what}")),
            expected as u64,
            "{what}"
        );
    }
    assert!(vms.iter().all(|vm| !crashed(vm)));
}

#[test]
fn a_total_outage_costs_at_most_the_minimal_budget() {
    // retry_envoy.rs's outage: 600 requests over two workers, every attempt a 503. Upstream
    // attempts stay within n + 20 % of n + 10/s × 10 s.
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    let n: u64 = 600;
    let streams: Vec<HttpStream> = (0..n as usize)
        .map(|i| first_attempt(&vms[i % 2], get(&format!("down-{i}")), 503).0)
        .collect();
    let mut upstream_attempts = n;
    // Answer every retry with a 503 until none is left (backoff is at most 250 ms).
    let mut quiet_for = Duration::ZERO;
    while quiet_for < ms(1000) {
        host.advance(ms(5));
        let callouts = host.callouts();
        if callouts.is_empty() {
            quiet_for += ms(5);
        } else {
            quiet_for = Duration::ZERO;
        }
        for callout in callouts {
            upstream_attempts += 1;
            callout.respond(Response::new(503).body("down"));
        }
    }
    assert!(
        host.elapsed() < Duration::from_secs(10),
        "within one budget window"
    );
    let bound = n + n / 5 + 10 * 10;
    assert!(
        upstream_attempts <= bound,
        "{upstream_attempts} upstream requests for {n} client requests"
    );
    // On the virtual clock every request falls in one window: the budget is spent to the last
    // retry it allows.
    assert_eq!(upstream_attempts, bound);
    assert!(
        upstream_attempts > n + 100,
        "retries happened while the budget lasted: {upstream_attempts}"
    );
    let retries = host.counter("keel.retry.default.retries");
    eprintln!(
        "outage: {n} client requests -> {upstream_attempts} upstream requests; retries \
         {retries}, budget_exhausted {}, bound {bound}",
        host.counter("keel.retry.default.budget_exhausted")
    );
    assert_eq!(retries, upstream_attempts - n);
    assert!(host.counter("keel.retry.default.budget_exhausted") > 0);
    // Every client got a 503: the router's own when no retry was paid for, else the last
    // attempt's.
    for s in &streams {
        let status = match s.local_reply() {
            Some(reply) => reply.status,
            None => {
                assert_ne!(s.response_flow(), Flow::Paused, "a client is left waiting");
                503
            }
        };
        assert_eq!(status, 503);
    }
    assert!(vms.iter().all(|vm| !crashed(vm)));
}

#[test]
fn max_attempts_ends_with_the_last_response() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let (stream, action) = first_attempt(&vm, get("down"), 503);
    assert_eq!(action, Action::Pause);
    for n in 2..=3 {
        let (_, callout) = next_callout_within(&host, &vm, ms(300)).expect("a retry");
        callout.respond(Response::new(503).body(format!("attempt {n} failed")));
    }
    host.advance(ms(1000));
    assert!(vm.callouts().is_empty(), "no fourth attempt");
    let reply = stream.local_reply().expect("the last answer");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body_text(), "attempt 3 failed");
    assert_eq!(reply.header("x-keel-attempts"), Some("3"));
    assert_eq!(host.counter("keel.retry.default.max_attempts"), 1);
    assert_eq!(host.counter("keel.retry.default.recovered"), 0);
}

#[test]
fn failed_callouts_are_resets_and_leave_the_held_response() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let (stream, _) = first_attempt(&vm, get("reset"), 503);
    for _ in 2..=3 {
        let (_, callout) = next_callout_within(&host, &vm, ms(300)).expect("a retry");
        // No response at all: a reset, retried like one.
        callout.fail();
    }
    host.advance(ms(1000));
    // No attempt brought a response: the router's, held so far, goes on.
    assert!(stream.local_reply().is_none());
    assert_eq!(stream.response_flow(), Flow::Resumed);
    assert_eq!(
        stream.response_header("x-keel-attempts").as_deref(),
        Some("3")
    );
    assert!(!crashed(&vm));
}

#[test]
fn a_callout_timeout_is_the_per_try_timeout() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "slow", "cluster": "backend", "per_try_timeout": "100ms", "retry_on": ["reset"], "backoff": {"jitter": "none"}}]}"#,
    );
    let stream = vm.http_stream();
    stream.request_headers(get("slow"), true);
    stream.set_property(
        &["response", "code_details"][..],
        "upstream_per_try_timeout",
    );
    // The router's own timeout: a reset-class failure, so `reset` retries it.
    assert_eq!(stream.response_headers(response(504), true), Action::Pause);
    let (_, second) = next_callout_within(&host, &vm, ms(100)).expect("a retry");
    assert_eq!(second.timeout, Some(ms(100)));
    // Nobody answers: the host's timeout answers 504 at 100 ms, recognised as a timeout.
    host.advance(ms(100));
    let (_, third) = next_callout_within(&host, &vm, ms(100)).expect("the timeout is retried");
    third.respond(Response::new(200).body("late but fine"));
    let reply = stream.local_reply().unwrap();
    assert_eq!(
        (reply.status, reply.body_text().as_str()),
        (200, "late but fine")
    );
}

#[test]
fn retry_after_moves_the_next_attempt() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let stream = vm.http_stream();
    stream.request_headers(get("pushback"), true);
    let sent_at = host.elapsed();
    assert_eq!(
        stream.response_headers(response(503).with("retry-after", "1"), true),
        Action::Pause
    );
    // Not before the second the server asked for; within Envoy's 1.5x spread.
    host.advance(ms(999));
    assert!(vm.callouts().is_empty());
    let (at, callout) = next_callout_within(&host, &vm, ms(600)).expect("a retry");
    let waited = at - sent_at;
    assert!(waited >= ms(1000) && waited <= ms(1501), "{waited:?}");
    // An HTTP date works too, and 429 with rate-limited.
    callout.respond(Response::new(200));
    assert_eq!(stream.local_reply().unwrap().status, 200);

    let vm = worker(
        &host,
        r#"{"policies": [{"name": "limited", "cluster": "backend", "retry_on": ["rate-limited"]}]}"#,
    );
    let stream = vm.http_stream();
    stream.request_headers(get("quota"), true);
    // On a whole second, so that the date (whole seconds) is exactly two seconds ahead.
    host.advance(Duration::from_nanos(
        1_000_000_000 - host.now_nanos() % 1_000_000_000,
    ));
    let sent_at = host.elapsed();
    let in_two_seconds = httpdate(host.now() + Duration::from_secs(2));
    let action = stream.response_headers(response(429).with("retry-after", &in_two_seconds), true);
    assert_eq!(action, Action::Pause);
    let (at, _) = next_callout_within(&host, &vm, ms(3100)).expect("a retry");
    let waited = at - sent_at;
    assert!(waited >= ms(2000) && waited <= ms(3001), "{waited:?}");
}

#[test]
fn a_retry_after_beyond_the_deadline_hands_the_answer_on() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let (stream, action) = {
        let stream = vm.http_stream();
        stream.request_headers(get("later"), true);
        let action = stream.response_headers(response(503).with("retry-after", "60"), true);
        (stream, action)
    };
    assert_eq!(action, Action::Continue);
    assert_eq!(stream.response_header("retry-after").as_deref(), Some("60"));
    assert_eq!(host.counter("keel.retry.default.retry_after_too_long"), 1);
}

#[test]
fn a_spent_budget_stops_retries_on_every_worker() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        // No share of the requests, one retry per second over one second: exactly one retry.
        let vms = workers_in(
            &host,
            module,
            r#"{"policies": [{"name": "tight", "cluster": "backend", "budget": {"ratio": 0, "min_per_second": 1, "ttl": "1s"}}]}"#,
            2,
        );
        let (first, action) = first_attempt(&vms[0], get("a"), 503);
        assert_eq!(action, Action::Pause, "the reserve pays for one retry");
        let (second, action) = first_attempt(&vms[1], get("b"), 503);
        assert_eq!(
            action,
            Action::Continue,
            "the other worker sees the spent budget"
        );
        assert_eq!(
            second.response_header("x-keel-attempts").as_deref(),
            Some("1")
        );
        assert_eq!(host.counter("keel.retry.tight.budget_exhausted"), 1);
        // The first request's retry fails too: no budget for its third attempt.
        let (_, callout) = next_callout_within(&host, &vms[0], ms(100)).unwrap();
        callout.respond(Response::new(503).body("still down"));
        let reply = first.local_reply().unwrap();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("x-keel-attempts"), Some("2"));
        assert_eq!(host.counter("keel.retry.tight.budget_exhausted"), 2);
        // A second later the retry has left the window: retries are possible again.
        host.advance(Duration::from_secs(1));
        let (_, action) = first_attempt(&vms[1], get("c"), 503);
        assert_eq!(action, Action::Pause);
    }
}

#[test]
fn a_post_without_a_key_makes_exactly_one_attempt() {
    let host = Host::new();
    let vm = worker(&host, MINIMAL);
    let stream = vm.http_stream();
    let headers = request("POST", "/orders").with("x-request-id", "p1");
    assert_eq!(stream.request_headers(headers, false), Action::Continue);
    assert_eq!(stream.request_body(b"{\"buy\": 1}", true), Action::Continue);
    // Untouched: the failure goes to the client as it is, with no attempt header.
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    assert_eq!(stream.response_header("x-keel-attempts"), None);
    host.advance(Duration::from_secs(2));
    assert!(vm.callouts().is_empty());
    assert_eq!(host.counter("keel.retry.default.ineligible"), 1);
    assert_eq!(host.counter("keel.retry.default.retries"), 0);

    // With an Idempotency-Key it is retried, body and key included.
    let stream = vm.http_stream();
    let headers = request("POST", "/orders")
        .with("x-request-id", "p2")
        .with("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324");
    stream.request_headers(headers, false);
    stream.request_body(b"{\"buy\": 2}", true);
    assert_eq!(stream.response_headers(response(503), true), Action::Pause);
    let (_, callout) = next_callout_within(&host, &vm, ms(100)).unwrap();
    assert_eq!(callout.header(":method"), Some("POST"));
    assert_eq!(
        callout.header("idempotency-key"),
        Some("8e03978e-40d5-43e8-bc93-6894a57f9324")
    );
    assert_eq!(callout.body, b"{\"buy\": 2}");
}

#[test]
fn a_body_over_max_body_is_never_retried() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "small", "cluster": "backend", "max_body": 8}]}"#,
    );
    // Declared too large: nothing is copied.
    let stream = vm.http_stream();
    stream.request_headers(request("PUT", "/a").with("content-length", "9"), false);
    stream.request_body(b"123456789", true);
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    // Streamed past the limit.
    let stream = vm.http_stream();
    stream.request_headers(request("PUT", "/b"), false);
    stream.request_body(b"12345", false);
    stream.request_body(b"6789", true);
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    // An answer before the whole body: nothing complete to replay.
    let stream = vm.http_stream();
    stream.request_headers(request("PUT", "/c"), false);
    stream.request_body(b"1234", false);
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    assert_eq!(host.counter("keel.retry.small.ineligible"), 3);
    host.advance(Duration::from_secs(1));
    assert!(vm.callouts().is_empty());
}

#[test]
fn connect_failures_are_read_from_envoys_stream_info() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "cf", "cluster": "backend", "retry_on": ["connect-failure"]}]}"#,
    );
    // Envoy's local 503 for a refused connection carries its cause in the stream info.
    let refused = vm.http_stream();
    refused.request_headers(get("refused"), true);
    refused.set_property(
        &["response", "code_details"][..],
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    );
    refused.set_property(&["response", "flags"][..], 0x20i64);
    assert_eq!(refused.response_headers(response(503), true), Action::Pause);
    // A callout that could not connect comes back as Envoy's local reply, recognised too.
    let (_, callout) = next_callout_within(&host, &vm, ms(300)).unwrap();
    callout.respond(Response::connect_failure());
    host.advance(ms(100));
    let again = refused
        .callouts()
        .pop()
        .expect("retried after a connect failure");
    again.respond(Response::new(200));
    assert_eq!(
        refused.local_reply().unwrap().header("x-keel-attempts"),
        Some("3")
    );
    // Without details, the UF flag says it.
    let stream = vm.http_stream();
    stream.request_headers(get("refused-2"), true);
    stream.set_property(&["response", "flags"][..], 0x20i64);
    assert_eq!(stream.response_headers(response(503), true), Action::Pause);
    // The upstream's own 503 is not a connect failure.
    let stream = vm.http_stream();
    stream.request_headers(get("busy"), true);
    stream.set_property(&["response", "code_details"][..], "via_upstream");
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    assert_eq!(host.counter("keel.retry.cf.retries"), 2);
}

#[test]
fn hop_by_hop_headers_are_neither_replayed_nor_handed_on() {
    let host = Host::new();
    let vm = worker(&host, STEADY);
    let headers = get("hop")
        .with("connection", "keep-alive, x-secret")
        .with("keep-alive", "timeout=5")
        .with("te", "trailers")
        .with("upgrade", "h2c");
    let (stream, _) = first_attempt(&vm, headers, 503);
    let (_, callout) = next_callout_within(&host, &vm, ms(100)).unwrap();
    for name in ["connection", "keep-alive", "te", "upgrade"] {
        assert_eq!(callout.header(name), None, "{name}");
    }
    assert_eq!(callout.header("accept"), Some("application/json"));
    callout.respond(
        Response::new(200)
            .header("connection", "close")
            .header("transfer-encoding", "chunked")
            .header("x-kept", "yes")
            .body("ok"),
    );
    let reply = stream.local_reply().unwrap();
    for name in [
        "connection",
        "transfer-encoding",
        "content-length",
        ":status",
    ] {
        assert_eq!(reply.header(name), None, "{name}");
    }
    assert_eq!(reply.header("x-kept"), Some("yes"));
}

#[test]
fn without_a_cluster_the_routes_cluster_gets_the_retries() {
    let host = Host::new();
    let vm = worker(&host, r#"{"policies": [{"name": "routed"}]}"#);
    let stream = vm.http_stream();
    stream.request_headers(get("routed"), true);
    stream.set_property(&["xds", "cluster_name"][..], "orders_v2");
    assert_eq!(stream.response_headers(response(503), true), Action::Pause);
    let (_, callout) = next_callout_within(&host, &vm, ms(300)).unwrap();
    assert_eq!(callout.upstream, "orders_v2");
    // Without a cluster from either side, the failure is handed on.
    let stream = vm.http_stream();
    stream.request_headers(get("nowhere"), true);
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
}

#[test]
fn policies_apply_by_route_name() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [
            {"name": "orders", "cluster": "orders", "routes": ["orders"]},
            {"name": "search", "cluster": "search", "routes": ["search"], "max_attempts": 1}]}"#,
    );
    let send = |route: Option<&str>| {
        let stream = vm.http_stream();
        if let Some(route) = route {
            stream.set_property("route_name", route);
        }
        stream.request_headers(get("r"), true);
        stream.response_headers(response(503), true)
    };
    assert_eq!(send(Some("orders")), Action::Pause);
    assert_eq!(send(Some("search")), Action::Continue);
    assert_eq!(send(Some("static")), Action::Continue);
    assert_eq!(send(None), Action::Continue);
    assert_eq!(host.counter("keel.retry.orders.requests"), 1);
    assert_eq!(host.counter("keel.retry.search.requests"), 1);
    assert_eq!(host.counter("keel.retry.search.max_attempts"), 1);
    let (_, callout) = next_callout_within(&host, &vm, ms(300)).unwrap();
    assert_eq!(callout.upstream, "orders");
}

#[test]
fn a_client_that_leaves_ends_its_retries() {
    let host = Host::new();
    let vm = worker(&host, STEADY);
    let (stream, _) = first_attempt(&vm, get("gone"), 503);
    host.advance(ms(10));
    stream.finish();
    host.advance(ms(100));
    assert!(vm.callouts().is_empty());
    assert_eq!(host.counter("keel.retry.default.abandoned"), 1);
    // Leaving while an attempt is out: its late answer is dropped.
    let (stream, _) = first_attempt(&vm, get("gone-2"), 503);
    let (_, callout) = next_callout_within(&host, &vm, ms(100)).unwrap();
    stream.finish();
    callout.respond(Response::new(200));
    assert_eq!(host.counter("keel.retry.default.abandoned"), 2);
    host.advance(ms(500));
    assert!(vm.callouts().is_empty());
    assert!(!crashed(&vm));
}

#[test]
fn a_refused_callout_hands_the_held_response_on() {
    let host = Host::new();
    host.declare_upstreams(["other"]);
    let vm = worker(&host, STEADY);
    let (stream, _) = first_attempt(&vm, get("unknown-cluster"), 503);
    host.advance(ms(30));
    assert_eq!(stream.response_flow(), Flow::Resumed);
    // The second attempt never left: one attempt was made.
    assert_eq!(
        stream.response_header("x-keel-attempts").as_deref(),
        Some("1")
    );
    assert_eq!(host.counter("keel.retry.default.callout_refused"), 1);
    assert!(vm.has_log("refused a callout to cluster \"backend\""));
    assert!(!crashed(&vm));
}

#[test]
fn the_deadline_bounds_the_attempts() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "quick", "cluster": "backend", "max_attempts": 5, "deadline": "100ms", "backoff": {"base": "40ms", "jitter": "none"}}]}"#,
    );
    let (stream, _) = first_attempt(&vm, get("quick"), 503);
    let (at, callout) = next_callout_within(&host, &vm, ms(100)).unwrap();
    assert_eq!(at, ms(40));
    // The per-try timeout is what is left of the deadline.
    assert_eq!(callout.timeout, Some(ms(60)));
    callout.respond(Response::new(503).body("no"));
    // The next backoff (80 ms) would end past the deadline: the client gets this answer.
    let reply = stream.local_reply().unwrap();
    assert_eq!(reply.body_text(), "no");
    assert_eq!(host.counter("keel.retry.quick.deadline"), 1);
}

// ----- every attempt as a callout -----

#[test]
fn callout_mode_sends_every_attempt_as_a_callout() {
    let host = Host::new();
    let vm = worker(
        &host,
        r#"{"policies": [{"name": "all", "cluster": "backend", "first_attempt": "callout", "backoff": {"jitter": "none"}}]}"#,
    );
    let stream = vm.http_stream();
    assert_eq!(
        stream.request_headers(request("DELETE", "/x/1").with("x-request-id", "c1"), true),
        Action::Pause
    );
    let first = vm.next_callout().expect("the first attempt goes at once");
    assert_eq!(first.header(":method"), Some("DELETE"));
    assert_eq!(first.header("x-request-id"), Some("c1"));
    first.respond(Response::new(503));
    let (_, second) = next_callout_within(&host, &vm, ms(100)).unwrap();
    second.respond(Response::new(204).header("x-done", "yes"));
    let reply = stream.local_reply().unwrap();
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("x-done"), Some("yes"));
    assert_eq!(reply.header("x-keel-attempts"), Some("2"));
    assert_eq!(
        stream.request_flow(),
        Flow::Paused,
        "the router never saw it"
    );
    assert_eq!(host.counter("keel.retry.all.retries"), 1);

    // A request with a body passes unretried: Envoy never shows the body of a request held at
    // its headers.
    let stream = vm.http_stream();
    assert_eq!(
        stream.request_headers(request("PUT", "/x/2"), false),
        Action::Continue
    );
    assert_eq!(stream.request_body(b"abcd", true), Action::Continue);
    assert_eq!(
        stream.response_headers(response(503), true),
        Action::Continue
    );
    // Not eligible: straight through the router.
    let stream = vm.http_stream();
    assert_eq!(
        stream.request_headers(request("POST", "/x"), true),
        Action::Continue
    );
    assert_eq!(host.counter("keel.retry.all.ineligible"), 2);
    assert!(vm.callouts().is_empty());
    // A cluster the host does not know: the router takes the request.
    host.declare_upstreams(["other"]);
    let stream = vm.http_stream();
    assert_eq!(stream.request_headers(get("c2"), true), Action::Continue);
    assert!(!crashed(&vm));
}

#[test]
fn stalled_callout_attempts_end_at_the_per_try_timeout() {
    // retry_envoy.rs's stalled upstream: every attempt a callout given 200 ms, none answered.
    let host = Host::new();
    let vm = worker(
        &host,
        &MINIMAL.replace(
            r#""max_attempts": 3,"#,
            r#""max_attempts": 3, "first_attempt": "callout", "per_try_timeout": "200ms","#,
        ),
    );
    let stream = vm.http_stream();
    stream.set_property("route_name", "orders");
    assert_eq!(stream.request_headers(get("stalled"), true), Action::Pause);
    let mut attempts = 0;
    for _ in 0..3 {
        let (_, callout) = next_callout_within(&host, &vm, ms(300)).expect("an attempt");
        assert_eq!(callout.timeout, Some(ms(200)));
        attempts += 1;
        // Nobody answers: the host's timeout answers 504 once the per-try timeout passes.
        host.advance(ms(200));
    }
    host.advance(ms(1000));
    assert!(vm.callouts().is_empty(), "no fourth attempt");
    assert_eq!(attempts, 3);
    let reply = stream.local_reply().expect("the last attempt's answer");
    assert_eq!(reply.status, 504);
    assert_eq!(reply.body_text(), "upstream request timeout");
    assert_eq!(reply.header("x-keel-attempts"), Some("3"));
    assert_eq!(host.counter("keel.retry.default.max_attempts"), 1);
    assert!(!crashed(&vm));
}

// ----- helpers -----

/// An IMF-fixdate for a time.
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {d:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        months[(month - 1) as usize]
    )
}
