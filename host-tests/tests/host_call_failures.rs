//! Failing host calls, per filter: the harness answers a chosen host call with a failing status
//! (`Vm::fail_host_call`, `Host::fail_host_call`) and each test checks what docs/operations.md
//! ("When a host call fails") promises: the request is served (or refused where the docs say
//! so), the failure is counted, exactly one log line names the call and the status, and the VM
//! is alive for the next request. Build the modules first (`make build`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::time::Duration;

use keel_core::discovery::endpoints::{encode_version, set_key, version_key};
use keel_core::discovery::{DiscoveredEndpoint, EndpointSet};
use keel_core::time::Instant;
use keel_host_tests::harness::{
    request, response, Action, Host, HttpStream, Response, ScriptedEtcd, Status, Vm,
};
use keel_host_tests::Module;

const GET: &str = "proxy_get_shared_data";
const SET: &str = "proxy_set_shared_data";
const TICK: &str = "proxy_set_tick_period_milliseconds";
const DEFINE: &str = "proxy_define_metric";
const INCREMENT: &str = "proxy_increment_metric";
const RECORD: &str = "proxy_record_metric";
const PROPERTY: &str = "proxy_get_property";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn workers(host: &Host, root_id: &str, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, root_id, Module::Own, config, n).unwrap()
}

fn worker(host: &Host, root_id: &str, config: &str) -> Vm {
    workers(host, root_id, config, 1).remove(0)
}

/// The VM's log lines that name `call` and `status`.
fn lines_naming(vm: &Vm, call: &str, status: Status) -> Vec<String> {
    vm.logs()
        .into_iter()
        .map(|e| e.message)
        .filter(|m| m.contains(call) && m.contains(&status.name()))
        .collect()
}

/// The failure was logged exactly once, the VM is alive, and the host answered the failure at
/// least once (so the test tested something).
fn reported_once(vm: &Vm, call: &str, status: Status) {
    assert!(vm.crashed().is_none(), "crashed: {:?}", vm.crashed());
    assert!(vm.failed_host_calls(call) > 0, "{call} was never called");
    let lines = lines_naming(vm, call, status);
    assert_eq!(lines.len(), 1, "{lines:?} in {:?}", vm.logs());
}

/// `keel.host.<call>.failed`.
fn failures(host: &Host, call: &str) -> u64 {
    host.counter(&format!("keel.host.{call}.failed"))
}

fn admitted(stream: &HttpStream) -> bool {
    stream.local_reply().is_none() && !stream.is_paused()
}

// ----- rate limit -----

const LIMIT: &str = r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 2, "per": "1s", "burst": 2}}]}"#;

fn limited_request(vm: &Vm, key: &str) -> HttpStream {
    let stream = vm.http_stream();
    stream.request_headers(request("GET", "/orders").with("x-api-key", key), true);
    stream
}

/// Over a limit of 2: `n` requests of one key, how many were admitted.
fn admitted_of(vm: &Vm, key: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| admitted(&limited_request(vm, key)))
        .count()
}

#[test]
fn rate_limit_fails_open_when_shared_data_reads_or_writes_fail() {
    for (call, status) in [
        (GET, Status::InternalFailure),
        (SET, Status::Unimplemented),
        (SET, Status::SerializationFailure),
    ] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = worker(&host, "rate_limit", LIMIT);
        vm.fail_host_call(call, status);
        // Over the limit of 2, and every one admitted: the limiter cannot count.
        assert_eq!(admitted_of(&vm, "alice", 5), 5);
        host.advance(ms(100));
        assert_eq!(host.counter("keel.rate_limit.per-key.failed_open"), 5);
        assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 0);
        assert_eq!(failures(&host, call), 5);
        reported_once(&vm, call, status);
        // The host recovers: the limit holds again, in the same VM.
        vm.heal_host_calls();
        assert_eq!(admitted_of(&vm, "bob", 5), 2);
        host.advance(ms(100));
        assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 3);
        assert_eq!(lines_naming(&vm, call, status).len(), 1);
    }
}

#[test]
fn rate_limit_counts_per_request_when_the_host_refuses_ticks() {
    let host = Host::new();
    host.fail_host_call(TICK, Status::Unimplemented);
    let vm = worker(&host, "rate_limit", LIMIT);
    assert_eq!(admitted_of(&vm, "alice", 3), 2);
    // No tick to batch on: the counts reach the host at once, without time passing.
    assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 2);
    assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 1);
    assert_eq!(failures(&host, TICK), 1, "asked once, then not again");
    reported_once(&vm, TICK, Status::Unimplemented);
    assert_eq!(vm.tick_period(), None);
}

#[test]
fn rate_limit_shaping_lets_the_request_through_without_ticks() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "paced", "key": "global", "algorithm": "leaky_bucket", "limit": {"requests": 10, "per": "1s", "burst": 5}, "shaping": {"max_delay": "1s"}}]}"#;
    let vm = worker(&host, "rate_limit", config);
    vm.fail_host_call(TICK, Status::InternalFailure);
    let first = limited_request(&vm, "any");
    assert!(admitted(&first));
    // The second would be held 100 ms, but nothing would resume it: it goes through.
    let second = limited_request(&vm, "any");
    assert!(admitted(&second), "{:?}", second.local_reply());
    assert!(vm.has_log("the host cannot set a tick period; not delaying the request"));
    reported_once(&vm, TICK, Status::InternalFailure);
}

#[test]
fn rate_limit_serves_and_limits_when_metrics_fail() {
    for (call, status) in [
        (DEFINE, Status::InternalFailure),
        (INCREMENT, Status::BadArgument),
    ] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        // From the VM's start on: the metrics are defined in on_configure.
        host.fail_host_call(call, status);
        let vm = worker(&host, "rate_limit", LIMIT);
        assert_eq!(admitted_of(&vm, "alice", 4), 2);
        host.advance(ms(100));
        assert_eq!(admitted_of(&vm, "alice", 2), 0);
        // Nothing can count (the failure counter is a metric too); the log says it, once.
        assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 0);
        reported_once(&vm, call, status);
    }
}

#[test]
fn rate_limit_reads_a_failed_property_as_a_missing_key() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "per-ip", "key": "source_ip", "missing_key": "deny", "limit": {"requests": 2, "per": "1s"}}]}"#;
    let vm = worker(&host, "rate_limit", config);
    host.set_property("source.address", "10.0.0.1:5000");
    let ok = vm.send_request(request("GET", "/"));
    assert!(admitted(&ok));
    vm.fail_host_call(PROPERTY, Status::SerializationFailure);
    // No address to key on: `missing_key: deny`, as documented for a request without its key.
    let refused = vm.send_request(request("GET", "/"));
    assert_eq!(refused.local_reply().map(|r| r.status), Some(429));
    assert_eq!(failures(&host, PROPERTY), 1);
    reported_once(&vm, PROPERTY, Status::SerializationFailure);
    vm.heal_host_calls();
    assert!(admitted(&vm.send_request(request("GET", "/"))));
}

// ----- circuit breaker -----

const BREAKER: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 4, "open_for": "5s", "half_open_probes": 1}]}"#;

/// One call answered `status`; whether the breaker admitted it.
fn breaker_call(vm: &Vm, status: u32) -> bool {
    let stream = vm.http_stream();
    stream.set_property("xds.route_name", "orders");
    stream.request_headers(request("GET", "/orders"), true);
    let ok = stream.local_reply().is_none();
    if ok {
        stream.response_headers(response(status), true);
    }
    stream.finish();
    ok
}

#[test]
fn breaker_admits_and_counts_when_shared_data_fails() {
    for (call, status) in [(GET, Status::InternalFailure), (SET, Status::Unimplemented)] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = worker(&host, "circuit_breaker", BREAKER);
        vm.fail_host_call(call, status);
        // Failures that cannot be recorded never open the breaker: every call is admitted.
        for _ in 0..8 {
            assert!(breaker_call(&vm, 500));
        }
        assert!(host.counter("keel.circuit_breaker.orders.store_errors") >= 8);
        assert_eq!(host.gauge("keel.circuit_breaker.orders.open"), 0);
        reported_once(&vm, call, status);
        // Once the host recovers the breaker records again and opens on evidence.
        vm.heal_host_calls();
        for _ in 0..4 {
            assert!(breaker_call(&vm, 500));
        }
        assert!(!breaker_call(&vm, 200), "open after 4 recorded failures");
        assert_eq!(host.counter("keel.circuit_breaker.orders.opened"), 1);
    }
}

#[test]
fn breaker_opens_and_closes_when_gauges_fail() {
    let host = Host::new();
    let vm = worker(&host, "circuit_breaker", BREAKER);
    vm.fail_host_call(RECORD, Status::InternalFailure);
    for _ in 0..4 {
        assert!(breaker_call(&vm, 500));
    }
    assert!(!breaker_call(&vm, 200), "the breaker opened all the same");
    assert_eq!(host.counter("keel.circuit_breaker.orders.opened"), 1);
    // The state gauge (recorded) could not move; the log says why, once.
    assert_eq!(host.gauge("keel.circuit_breaker.orders.state"), 0);
    assert_eq!(failures(&host, RECORD), vm.failed_host_calls(RECORD));
    reported_once(&vm, RECORD, Status::InternalFailure);
    host.advance(Duration::from_secs(6));
    assert!(breaker_call(&vm, 200), "the probe after open_for");
    assert!(breaker_call(&vm, 200), "closed again");
}

#[test]
fn breaker_judges_by_the_status_when_properties_fail() {
    let host = Host::new();
    let vm = worker(&host, "circuit_breaker", BREAKER);
    vm.fail_host_call(PROPERTY, Status::InternalFailure);
    // No response flags, no route name: the status alone decides, and 500s still open it.
    for _ in 0..4 {
        assert!(breaker_call(&vm, 500));
    }
    assert!(!breaker_call(&vm, 200));
    assert_eq!(host.counter("keel.circuit_breaker.orders.failures"), 4);
    assert!(failures(&host, PROPERTY) > 0);
    reported_once(&vm, PROPERTY, Status::InternalFailure);
}

// ----- retry -----

const RETRY: &str = r#"{"policies": [{"name": "default", "cluster": "backend", "max_attempts": 3, "backoff": {"base": "25ms", "cap": "250ms", "jitter": "none"}, "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"}}]}"#;

/// A request that went through the router and got `status` back.
fn first_attempt(vm: &Vm, id: &str, status: u32) -> (HttpStream, Action) {
    let stream = vm.http_stream();
    stream.set_property("route_name", "orders");
    let headers = request("GET", "/orders").with("x-request-id", id);
    assert_eq!(stream.request_headers(headers, true), Action::Continue);
    let action = stream.response_headers(response(status), false);
    (stream, action)
}

#[test]
fn retry_refuses_retries_it_cannot_pay_for_when_shared_data_fails() {
    for (call, status) in [(GET, Status::InternalFailure), (SET, Status::ParseFailure)] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = worker(&host, "retry", RETRY);
        vm.fail_host_call(call, status);
        // The budget cannot be read or written: deposits are skipped and a retry, which must
        // withdraw, is refused (fail closed on retries): the 503 goes to the client as it is.
        let (stream, action) = first_attempt(&vm, "a", 503);
        assert_eq!(action, Action::Continue);
        assert!(stream.local_reply().is_none());
        host.advance(ms(500));
        assert!(vm.callouts().is_empty(), "no retry was sent");
        // One deposit and one withdrawal, both refused.
        assert_eq!(host.counter("keel.retry.default.store_errors"), 2);
        reported_once(&vm, call, status);
        // The host recovers: the next failure is retried.
        vm.heal_host_calls();
        let (_, action) = first_attempt(&vm, "b", 503);
        assert_eq!(action, Action::Pause);
        host.advance(ms(30));
        let callout = vm.next_callout().expect("a retry");
        callout.respond(Response::new(200).body("ok"));
        assert_eq!(host.counter("keel.retry.default.recovered"), 1);
    }
}

#[test]
fn retry_hands_the_response_on_when_the_host_refuses_ticks() {
    let host = Host::new();
    let vm = worker(&host, "retry", RETRY);
    vm.fail_host_call(TICK, Status::Unimplemented);
    // The backoff needs a tick; without one the response goes on unretried, not held forever.
    let (stream, action) = first_attempt(&vm, "a", 503);
    assert_eq!(action, Action::Continue);
    assert!(stream.local_reply().is_none());
    host.advance(ms(500));
    assert!(vm.callouts().is_empty());
    assert_eq!(host.counter("keel.retry.default.attempts_1"), 1);
    assert_eq!(failures(&host, TICK), 1);
    reported_once(&vm, TICK, Status::Unimplemented);
    // Ticks come back: the next failure is retried on time.
    vm.heal_host_calls();
    let (_, action) = first_attempt(&vm, "b", 503);
    assert_eq!(action, Action::Pause);
    host.advance(ms(30));
    assert_eq!(vm.callouts().len(), 1);
}

#[test]
fn retry_retries_when_metrics_or_properties_fail() {
    for (call, status) in [
        (INCREMENT, Status::InternalFailure),
        (PROPERTY, Status::InternalFailure),
    ] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = worker(&host, "retry", RETRY);
        vm.fail_host_call(call, status);
        let (stream, action) = first_attempt(&vm, "a", 503);
        assert_eq!(action, Action::Pause);
        host.advance(ms(30));
        let callout = vm.next_callout().expect("a retry");
        callout.respond(Response::new(200).body("recovered"));
        let reply = stream.local_reply().expect("the retry's answer");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body_text(), "recovered");
        reported_once(&vm, call, status);
    }
}

// ----- picker -----

const PICKER: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "balance_factor": 1.25, "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}]}]}"#;
const SERVICE: &str = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "maglev", "service": "users"}]}"#;
const DST: &str = "x-envoy-original-dst-host";

fn pick(vm: &Vm, user: &str) -> HttpStream {
    let stream = vm.http_stream();
    stream.set_property("route_name", "users");
    stream.request_headers(request("GET", "/users").with("x-user", user), true);
    stream
}

fn picked(vm: &Vm, user: &str) -> Option<String> {
    let stream = pick(vm, user);
    let dst = stream.request_header(DST);
    stream.finish();
    dst
}

#[test]
fn picker_ignores_loads_it_cannot_read_and_picks_the_keys_own_host() {
    for (call, status) in [(GET, Status::InternalFailure), (SET, Status::Unimplemented)] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = worker(&host, "picker", PICKER);
        let home = picked(&vm, "hot").expect("a host");
        vm.fail_host_call(call, status);
        // Bounded loads cannot be counted: the key's own endpoint takes every request.
        let open: Vec<HttpStream> = (0..4).map(|_| pick(&vm, "hot")).collect();
        for stream in &open {
            assert_eq!(stream.request_header(DST).as_deref(), Some(home.as_str()));
        }
        assert!(host.counter("keel.picker.users.shared_data_errors") >= 4);
        assert_eq!(host.counter("keel.picker.users.spills"), 0);
        reported_once(&vm, call, status);
        for stream in &open {
            stream.finish();
        }
        vm.heal_host_calls();
        assert_eq!(picked(&vm, "hot"), Some(home));
    }
}

fn endpoint(port: u16) -> DiscoveredEndpoint {
    DiscoveredEndpoint {
        address: format!("127.0.0.1:{port}").parse().unwrap(),
        weight: 1,
        priority: 0,
        zone: String::new(),
        registry_healthy: true,
        meta: Vec::new(),
        tags: Vec::new(),
    }
}

#[test]
fn picker_keeps_the_last_applied_set_when_shared_data_reads_fail() {
    let host = Host::new();
    let vm = worker(&host, "picker", SERVICE);
    let now = Instant::from_nanos(host.now_nanos());
    let mut set = EndpointSet::new(now);
    set.merge(&[endpoint(18091), endpoint(18092)], now, false);
    host.set_shared_data_in("keel", &set_key("users"), set.encode());
    host.set_shared_data_in("keel", &version_key("users"), encode_version(set.version));
    let before: Vec<Option<String>> = (0..10).map(|i| picked(&vm, &format!("u{i}"))).collect();
    assert!(before.iter().all(Option::is_some));
    vm.fail_host_call(GET, Status::InternalFailure);
    host.advance(Duration::from_secs(2));
    let during: Vec<Option<String>> = (0..10).map(|i| picked(&vm, &format!("u{i}"))).collect();
    assert_eq!(during, before, "the last applied set keeps serving");
    assert_eq!(failures(&host, GET), vm.failed_host_calls(GET));
    reported_once(&vm, GET, Status::InternalFailure);
}

#[test]
fn picker_counts_picks_per_request_when_the_host_refuses_ticks() {
    let host = Host::new();
    host.fail_host_call(TICK, Status::InternalFailure);
    let vm = worker(&host, "picker", PICKER);
    let home = picked(&vm, "alice").expect("a host");
    assert_eq!(host.counter(&format!("keel.picker.users.picks.{home}")), 1);
    reported_once(&vm, TICK, Status::InternalFailure);
}

#[test]
fn picker_picks_when_metrics_fail() {
    for (call, status) in [
        (DEFINE, Status::InternalFailure),
        (INCREMENT, Status::Unimplemented),
    ] {
        eprintln!("{call} answers {status:?}");
        let native = {
            let host = Host::new();
            picked(&worker(&host, "picker", PICKER), "alice")
        };
        let host = Host::new();
        host.fail_host_call(call, status);
        let vm = worker(&host, "picker", PICKER);
        assert_eq!(picked(&vm, "alice"), native);
        host.advance(Duration::from_secs(2));
        assert_eq!(picked(&vm, "alice"), native);
        reported_once(&vm, call, status);
    }
}

#[test]
fn picker_does_not_apply_by_route_when_the_route_name_cannot_be_read() {
    let host = Host::new();
    let config = PICKER.replace(r#""key""#, r#""routes": ["users"], "key""#);
    let vm = worker(&host, "picker", &config);
    assert!(picked(&vm, "alice").is_some());
    vm.fail_host_call(PROPERTY, Status::InternalFailure);
    // No route name: a picker that lists routes does not apply; the request goes on unpicked.
    let stream = pick(&vm, "alice");
    assert!(stream.local_reply().is_none());
    assert_eq!(stream.request_header(DST), None);
    assert!(failures(&host, PROPERTY) > 0);
    reported_once(&vm, PROPERTY, Status::InternalFailure);
    vm.heal_host_calls();
    assert!(picked(&vm, "alice").is_some());
}

// ----- discovery -----

const DISCOVERY: &str = r#"{"services": [{"name": "users", "source": {"etcd": {"cluster": "etcd", "prefix": "/services/users/"}}, "refresh": "1s"}]}"#;
const H1: &str = "127.0.0.1:18091";
const H2: &str = "127.0.0.1:18092";

fn published(host: &Host) -> Option<EndpointSet> {
    let (bytes, _) = host.shared_data_in("keel", &set_key("users"))?;
    EndpointSet::decode(&bytes)
}

#[test]
fn discovery_retries_a_publication_the_host_refuses() {
    let host = Host::new();
    let registry = ScriptedEtcd::install(&host, &[H1]);
    let vm = worker(&host, "discovery", DISCOVERY);
    host.advance(Duration::from_secs(2));
    assert_eq!(published(&host).expect("published").endpoints.len(), 1);
    // The registry changes while the host refuses writes: the refresh cannot be published.
    registry.set_hosts(&[H1, H2]);
    vm.fail_host_call(SET, Status::InternalFailure);
    host.advance(Duration::from_secs(3));
    assert_eq!(
        published(&host).unwrap().endpoints.len(),
        1,
        "the last set stays"
    );
    assert!(host.counter("keel.discovery.users.refresh_failed") > 0);
    assert!(host.counter("keel.discovery.users.shared_data_errors") > 0);
    reported_once(&vm, SET, Status::InternalFailure);
    // Requests pass meanwhile.
    let stream = vm.send_request(request("GET", "/users"));
    assert!(stream.local_reply().is_none());
    vm.heal_host_calls();
    host.advance(Duration::from_secs(10));
    assert_eq!(
        published(&host).unwrap().endpoints.len(),
        2,
        "retried and published"
    );
}

#[test]
fn discovery_publishes_nothing_while_no_worker_can_take_the_lease() {
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1]);
    let vm = worker(&host, "discovery", DISCOVERY);
    vm.fail_host_call(SET, Status::Unimplemented);
    host.advance(Duration::from_secs(3));
    // The poller lease cannot be written: nobody polls (no refresh is attempted), nothing is
    // published, and the requests pass.
    assert!(published(&host).is_none());
    assert!(failures(&host, SET) >= 3, "one lease attempt per tick");
    reported_once(&vm, SET, Status::Unimplemented);
    assert!(vm
        .send_request(request("GET", "/users"))
        .local_reply()
        .is_none());
    vm.heal_host_calls();
    host.advance(Duration::from_secs(3));
    assert_eq!(published(&host).expect("published").endpoints.len(), 1);
}

#[test]
fn discovery_without_ticks_says_so_and_lets_requests_through() {
    let host = Host::new();
    ScriptedEtcd::install(&host, &[H1]);
    host.fail_host_call(TICK, Status::Unimplemented);
    let vm = worker(&host, "discovery", DISCOVERY);
    host.advance(Duration::from_secs(3));
    // Not survivable for discovery's job (it polls on its tick): nothing is published, and the
    // log says so; the data path is untouched.
    assert!(published(&host).is_none());
    assert!(vm.has_log("the host cannot set a tick period: nothing will be polled or published"));
    reported_once(&vm, TICK, Status::Unimplemented);
    let stream = vm.send_request(request("GET", "/users"));
    assert!(stream.local_reply().is_none());
}

#[test]
fn discovery_publishes_when_metrics_fail() {
    for (call, status) in [
        (DEFINE, Status::InternalFailure),
        (RECORD, Status::InternalFailure),
    ] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        ScriptedEtcd::install(&host, &[H1]);
        host.fail_host_call(call, status);
        let vm = worker(&host, "discovery", DISCOVERY);
        host.advance(Duration::from_secs(3));
        let set = published(&host).expect("published");
        assert_eq!(set.endpoints.len(), 1);
        reported_once(&vm, call, status);
    }
}

// ----- pipeline -----

const PIPELINE: &str = r#"{"stages": [{"filter": "rate_limit", "config": {"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 2, "per": "1s", "burst": 2}}]}}, {"filter": "circuit_breaker", "config": {"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 4, "open_for": "5s"}]}}]}"#;

fn pipeline(host: &Host) -> Vm {
    keel_host_tests::configured_workers(host, "pipeline", Module::Suite, PIPELINE, 1)
        .unwrap()
        .remove(0)
}

#[test]
fn pipeline_fails_open_when_shared_data_fails() {
    for (call, status) in [(GET, Status::InternalFailure), (SET, Status::Unimplemented)] {
        eprintln!("{call} answers {status:?}");
        let host = Host::new();
        let vm = pipeline(&host);
        vm.fail_host_call(call, status);
        let served = (0..5)
            .filter(|_| {
                let stream = limited_request(&vm, "alice");
                let ok = admitted(&stream);
                stream.response_headers(response(500), true);
                stream.finish();
                ok
            })
            .count();
        // Both stages fail open: past the limit and past min_calls, all five served.
        assert_eq!(served, 5);
        host.advance(ms(100));
        assert_eq!(host.counter("keel.rate_limit.per-key.failed_open"), 5);
        assert!(host.counter("keel.circuit_breaker.orders.store_errors") >= 5);
        reported_once(&vm, call, status);
        vm.heal_host_calls();
        assert_eq!(admitted_of(&vm, "bob", 4), 2);
    }
}

#[test]
fn pipeline_counts_per_request_when_the_host_refuses_ticks() {
    let host = Host::new();
    host.fail_host_call(TICK, Status::InternalFailure);
    let vm = pipeline(&host);
    assert_eq!(admitted_of(&vm, "alice", 3), 2);
    assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 2);
    assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 1);
    reported_once(&vm, TICK, Status::InternalFailure);
}

#[test]
fn a_failure_planned_once_fails_once() {
    let host = Host::new();
    let vm = worker(&host, "rate_limit", LIMIT);
    vm.fail_host_call_once(GET, Status::InternalFailure);
    // The first request is not counted (failed open); the burst of 2 is then spent as usual.
    assert_eq!(admitted_of(&vm, "alice", 4), 3);
    assert_eq!(vm.failed_host_calls(GET), 1);
    host.advance(ms(100));
    assert_eq!(host.counter("keel.rate_limit.per-key.failed_open"), 1);
    assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 2);
    assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 1);
    assert_eq!(failures(&host, GET), 1);
    reported_once(&vm, GET, Status::InternalFailure);
}

// ----- contention: one attempt budget, one metric -----

/// Every compare-and-swap of every filter loses its race: each update gives up after the one
/// budget of 8 attempts, is counted in `keel.shared_data.cas_exhausted`, and is not a host
/// failure (a lost race is an ordinary answer: no log line, no `keel.host.*.failed`).
#[test]
fn every_filter_gives_up_a_contended_update_after_eight_attempts_and_counts_it() {
    for root_id in [
        "rate_limit",
        "circuit_breaker",
        "retry",
        "picker",
        "discovery",
    ] {
        eprintln!("{root_id}");
        let host = Host::new();
        if root_id == "discovery" {
            ScriptedEtcd::install(&host, &[H1]);
        }
        let config = match root_id {
            "rate_limit" => LIMIT,
            "circuit_breaker" => BREAKER,
            "retry" => RETRY,
            "picker" => PICKER,
            _ => DISCOVERY,
        };
        let vm = worker(&host, root_id, config);
        vm.fail_host_call(SET, Status::CasMismatch);
        match root_id {
            "rate_limit" => assert!(admitted(&limited_request(&vm, "alice"))),
            "circuit_breaker" => assert!(breaker_call(&vm, 500)),
            "retry" => assert_eq!(first_attempt(&vm, "a", 503).1, Action::Continue),
            "picker" => assert!(picked(&vm, "alice").is_some()),
            _ => host.advance(Duration::from_secs(2)),
        }
        host.advance(ms(100));
        let exhausted = host.counter("keel.shared_data.cas_exhausted");
        assert!(exhausted > 0, "{root_id}: no update gave up");
        assert_eq!(vm.failed_host_calls(SET), 8 * exhausted, "{root_id}");
        assert_eq!(failures(&host, SET), 0);
        assert!(lines_naming(&vm, SET, Status::CasMismatch).is_empty());
        assert!(vm.crashed().is_none());
    }
}

/// A host that cannot tell the time: the filters that read it per request read the epoch and
/// serve on (the picker reads it only to seed its generator).
#[test]
fn every_filter_serves_when_the_clock_fails() {
    const CLOCK: &str = "proxy_get_current_time_nanoseconds";
    for root_id in ["rate_limit", "circuit_breaker", "retry"] {
        eprintln!("{root_id}");
        let host = Host::new();
        let config = match root_id {
            "rate_limit" => LIMIT,
            "circuit_breaker" => BREAKER,
            _ => RETRY,
        };
        let vm = worker(&host, root_id, config);
        vm.fail_host_call(CLOCK, Status::InternalFailure);
        for _ in 0..2 {
            match root_id {
                "rate_limit" => assert!(admitted(&limited_request(&vm, "alice"))),
                "circuit_breaker" => assert!(breaker_call(&vm, 200)),
                _ => assert_eq!(first_attempt(&vm, "a", 200).1, Action::Continue),
            }
        }
        reported_once(&vm, CLOCK, Status::InternalFailure);
    }
}
