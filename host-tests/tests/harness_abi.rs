//! The harness tested as a host: the ABI probe (`dist/keel_abi_probe.wasm`) performs host calls
//! on command and reports what it read; the empty filter (`dist/keel_empty.wasm`) checks the
//! plain lifecycle. Build both with `make build`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::time::Duration;

use keel_host_tests::harness::{
    request, response, Action, Flow, Host, LogEntry, LogLevel, MetricKind, Response, Vm,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn probe(host: &Host, config: &str) -> Vm {
    host.vm("abi_probe")
        .root_id("probe-root")
        .config(config)
        .start()
        .unwrap()
}

/// Sends one probe command (request headers, end of stream) and returns the local reply's
/// status and body.
fn ask(vm: &Vm, command: &str, args: &[(&str, &str)]) -> (u32, String) {
    let mut headers = request("GET", "/").with("x-probe", command);
    for (name, value) in args {
        headers = headers.with(name, value);
    }
    let stream = vm.send_request(headers);
    let reply = stream
        .local_reply()
        .unwrap_or_else(|| panic!("`{command}` gave no local reply; logs: {:?}", vm.logs()));
    (reply.status, reply.body_text())
}

// ----- loading and configuration -----

#[test]
fn empty_filter_loads_configures_and_continues_every_phase() {
    let host = Host::new();
    let vm = host.vm("empty").start().unwrap();
    assert!(vm.configured());
    assert!(vm.crashed().is_none());
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers(request("POST", "/orders"), false),
        Action::Continue
    );
    assert_eq!(s.request_body(b"{}", true), Action::Continue);
    assert_eq!(s.response_headers(response(201), false), Action::Continue);
    assert_eq!(s.response_body(b"ok", true), Action::Continue);
    assert_eq!(s.request_flow(), Flow::Continued);
    assert_eq!(s.request_body_bytes(), b"{}");
    assert_eq!(s.response_body_bytes(), b"ok");
    assert!(s.local_reply().is_none());
    s.finish();
    assert!(s.is_finished());
    assert!(vm.crashed().is_none());
}

#[test]
fn a_missing_module_tells_to_run_make_build() {
    let error = Host::new().vm("no_such_filter").start().err().unwrap();
    let message = format!("{error:#}");
    assert!(message.contains("make build"), "{message}");
    assert!(message.contains("keel_no_such_filter.wasm"), "{message}");
}

#[test]
fn a_refused_configuration_is_an_outcome_not_an_error() {
    let host = Host::new();
    let vm = probe(&host, "refuse");
    assert!(!vm.configured());
    assert!(vm.crashed().is_none());
    assert!(vm.has_log("configuration refused"));
    assert!(vm.configure("tick_ms=10"));
    assert!(vm.configured());
    assert_eq!(vm.tick_period(), Some(ms(10)));
}

#[test]
fn vm_and_plugin_configurations_reach_the_module() {
    let host = Host::new();
    let vm = host
        .vm("abi_probe")
        .vm_config("shared-settings")
        .config("tick_ms=5")
        .start()
        .unwrap();
    assert_eq!(
        ask(&vm, "config", &[]).1,
        "vm=shared-settings;plugin=tick_ms=5"
    );
}

// ----- headers, bodies, local replies -----

#[test]
fn request_headers_round_trip_in_order_and_lower_case() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(
        request("GET", "/a")
            .with("X-Probe", "echo-headers")
            .with("x-b", "2"),
    );
    assert_eq!(
        s.local_reply().unwrap().body_text(),
        ":method: GET\n:path: /a\n:authority: example.com\n:scheme: http\nx-probe: echo-headers\nx-b: 2\n"
    );
}

#[test]
fn filter_modifications_are_what_goes_upstream() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.http_stream();
    let headers = request("GET", "/")
        .with("x-probe", "modify")
        .with("x-replace", "old")
        .with("x-replace", "older")
        .with("x-remove", "gone");
    assert_eq!(s.request_headers(headers, true), Action::Continue);
    assert_eq!(s.request_header("x-added").as_deref(), Some("1"));
    assert_eq!(s.request_header("x-replace").as_deref(), Some("replaced"));
    let replaced = s
        .request_header_list()
        .into_iter()
        .filter(|(k, _)| k == "x-replace")
        .count();
    assert_eq!(replaced, 1);
    assert_eq!(s.request_header("x-remove"), None);

    let s = vm.send_request(request("GET", "/").with("x-probe", "set-all"));
    assert_eq!(
        s.request_header_list(),
        vec![
            (":path".to_string(), "/rewritten".to_string()),
            ("x-only".to_string(), "yes".to_string())
        ]
    );

    let s = vm.send_request(
        request("GET", "/")
            .with("x-probe", "route")
            .with("x-target", "127.0.0.1:8081"),
    );
    assert_eq!(
        s.request_header("x-envoy-original-dst-host").as_deref(),
        Some("127.0.0.1:8081")
    );
}

#[test]
fn a_local_reply_is_captured_exactly_and_ends_the_filter_callbacks() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.http_stream();
    let headers = request("GET", "/")
        .with("x-probe", "reply")
        .with("x-status", "429")
        .with("x-body", "slow down")
        .with("x-reply-header", "v1");
    assert_eq!(s.request_headers(headers, true), Action::Pause);
    let reply = s.local_reply().unwrap();
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.headers,
        vec![("x-reply".to_string(), "v1".to_string())]
    );
    assert_eq!(reply.body, b"slow down");
    assert_eq!(reply.grpc_status, None);
    assert!(!s.is_paused());
    assert_eq!(s.response_headers(response(200), true), Action::Pause);
    assert!(s.response_header_list().is_empty());
}

#[test]
fn bodies_are_buffered_while_paused_and_rewritten_in_place() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers(request("POST", "/").with("x-probe", "body-upper"), false),
        Action::Continue
    );
    assert_eq!(s.request_body(b"hello ", false), Action::Pause);
    assert_eq!(s.request_body(b"world", true), Action::Continue);
    assert_eq!(s.request_body_bytes(), b"HELLO WORLD");
}

#[test]
fn response_headers_are_readable_and_writable_in_their_phase() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(request("GET", "/").with("x-probe", "stamp-response"));
    assert_eq!(s.request_flow(), Flow::Continued);
    assert_eq!(s.response_headers(response(503), true), Action::Continue);
    assert_eq!(s.response_header("x-probe-status").as_deref(), Some("503"));
}

// ----- shared data -----

#[test]
fn shared_data_compare_and_swap_across_two_workers() {
    let host = Host::new();
    let workers = host.vm("abi_probe").start_workers(2).unwrap();
    let (a, b) = (&workers[0], &workers[1]);
    assert_eq!(ask(a, "shared-get", &[("x-key", "k")]).0, 404);
    assert_eq!(
        ask(a, "shared-set", &[("x-key", "k"), ("x-value", "one")]),
        (200, "ok".into())
    );

    let seen_by_b = b.send_request(
        request("GET", "/")
            .with("x-probe", "shared-get")
            .with("x-key", "k"),
    );
    let reply = seen_by_b.local_reply().unwrap();
    assert_eq!(reply.body_text(), "one");
    let cas = reply.header("x-cas").unwrap().to_string();
    assert_ne!(cas, "0");

    // A writes with the version it read: accepted. B's write with the same, now stale,
    // version is refused.
    let set = |vm: &Vm, value: &str| {
        ask(
            vm,
            "shared-set",
            &[("x-key", "k"), ("x-value", value), ("x-cas", &cas)],
        )
    };
    assert_eq!(set(a, "two"), (200, "ok".into()));
    assert_eq!(set(b, "three"), (409, "cas-mismatch".into()));
    let (value, version) = host.shared_data("k").unwrap();
    assert_eq!(value, b"two");
    assert_ne!(version.to_string(), cas);

    // cas 0 (no cas) writes unconditionally.
    assert_eq!(
        ask(b, "shared-set", &[("x-key", "k"), ("x-value", "four")]).1,
        "ok"
    );
    assert_eq!(host.shared_data("k").unwrap().0, b"four");
}

#[test]
fn shared_data_is_separate_per_vm_id() {
    let host = Host::new();
    let keel = host.vm("abi_probe").vm_id("keel").start().unwrap();
    let other = host.vm("abi_probe").vm_id("other").start().unwrap();
    host.set_shared_data_in("keel", "k", "mine");
    assert_eq!(
        ask(&keel, "shared-get", &[("x-key", "k")]),
        (200, "mine".into())
    );
    assert_eq!(ask(&other, "shared-get", &[("x-key", "k")]).0, 404);
}

// ----- ticks and time -----

#[test]
fn ticks_fire_on_every_worker_at_the_right_virtual_times() {
    let host = Host::new();
    let workers = host
        .vm("abi_probe")
        .config("tick_ms=100")
        .start_workers(2)
        .unwrap();
    assert_eq!(workers[0].tick_period(), Some(ms(100)));
    host.advance(ms(99));
    assert_eq!(host.counter("probe.ticks"), 0);
    host.advance(ms(1));
    assert_eq!(host.counter("probe.ticks"), 2);
    host.advance(ms(250));
    assert_eq!(host.counter("probe.ticks"), 6);
    assert_eq!(host.elapsed(), ms(350));
    workers[1].tick();
    assert_eq!(host.counter("probe.ticks"), 7);
    assert!(workers[1].has_log("tick 4"));
}

#[test]
fn ticks_of_different_periods_interleave_in_time_order() {
    let host = Host::new();
    let fast = probe(&host, "tick_ms=30");
    let slow = probe(&host, "tick_ms=50");
    host.advance(ms(100));
    let ticks = |vm: &Vm| {
        vm.logs()
            .iter()
            .filter(|e| e.message.starts_with("tick"))
            .count()
    };
    assert_eq!(ticks(&fast), 3);
    assert_eq!(ticks(&slow), 2);
}

#[test]
fn the_module_reads_the_virtual_clock() {
    let host = Host::new();
    let vm = probe(&host, "");
    let before = host.now_nanos();
    assert_eq!(ask(&vm, "time", &[]).1, before.to_string());
    host.advance(Duration::from_secs(1));
    assert_eq!(
        ask(&vm, "time", &[]).1,
        (before + 1_000_000_000).to_string()
    );
}

// ----- callouts -----

#[test]
fn an_answered_callout_is_delivered_with_headers_and_body() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.http_stream();
    let headers = request("GET", "/")
        .with("x-probe", "callout")
        .with("x-upstream", "registry")
        .with("x-path", "/v1/health");
    assert_eq!(s.request_headers(headers, true), Action::Pause);
    assert!(s.is_paused());
    let call = s.callouts().pop().unwrap();
    assert_eq!(call.upstream, "registry");
    assert_eq!(call.path(), "/v1/health");
    assert_eq!(call.header(":authority"), Some("probe"));
    assert_eq!(call.body, b"probe body");
    assert_eq!(call.timeout, Some(ms(1000)));
    assert_eq!(call.context_id, s.id());
    call.respond(
        Response::new(200)
            .header("x-from", "registry")
            .body("[1,2]"),
    );
    assert_eq!(
        s.local_reply().unwrap().body_text(),
        "status=200 body=[1,2]"
    );
    assert!(vm.callouts().is_empty());
}

#[test]
fn a_failed_callout_delivers_no_headers_and_no_body() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(
        request("GET", "/")
            .with("x-probe", "callout")
            .with("x-upstream", "up"),
    );
    vm.next_callout().unwrap().fail();
    let reply = s.local_reply().unwrap();
    assert_eq!(
        (reply.status, reply.body_text()),
        (502, "callout failed".to_string())
    );
    assert!(vm.crashed().is_none());
}

#[test]
fn a_callout_times_out_when_the_clock_passes_its_timeout() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(
        request("GET", "/")
            .with("x-probe", "callout")
            .with("x-upstream", "slow")
            .with("x-timeout-ms", "50"),
    );
    host.advance(ms(49));
    assert!(s.local_reply().is_none());
    assert_eq!(vm.callouts().len(), 1);
    host.advance(ms(1));
    assert_eq!(
        s.local_reply().unwrap().body_text(),
        "status=504 body=upstream request timeout"
    );
    assert!(vm.callouts().is_empty());
}

#[test]
fn a_callout_to_an_undeclared_upstream_is_refused() {
    let host = Host::new();
    host.declare_upstreams(["registry"]);
    let vm = probe(&host, "");
    let (status, body) = ask(&vm, "callout", &[("x-upstream", "elsewhere")]);
    assert_eq!((status, body.as_str()), (502, "BadArgument"));
    assert!(vm.callouts().is_empty());
}

#[test]
fn callouts_from_the_root_are_answered_to_the_root() {
    let host = Host::new();
    let vm = probe(&host, "tick_ms=10 root_callout=registry");
    host.advance(ms(10));
    let call = vm.next_callout().unwrap();
    assert_eq!(call.context_id, vm.root_context_id());
    assert_eq!(call.path(), "/root");
    call.respond(Response::new(200).body("ok"));
    assert!(
        vm.has_log("root callout 1: headers=2 status=200 body=ok"),
        "{:?}",
        vm.logs()
    );

    let vm = probe(&host, "tick_ms=10 root_callout=registry");
    host.advance(ms(10));
    vm.next_callout().unwrap().fail();
    assert!(vm.has_log("root callout 1: failed"));
    assert!(vm.crashed().is_none());
}

#[test]
fn a_responder_answers_at_once_or_after_a_delay() {
    let host = Host::new();
    host.set_responder(|call| match call.upstream.as_str() {
        "fast" => Some(Response::new(200).body(call.path().to_string())),
        "slow" => Some(
            Response::new(201)
                .body("late")
                .after(Duration::from_millis(30)),
        ),
        _ => None,
    });
    let vm = probe(&host, "");
    let fast = vm.send_request(
        request("GET", "/")
            .with("x-probe", "callout")
            .with("x-upstream", "fast")
            .with("x-path", "/x"),
    );
    assert_eq!(
        fast.local_reply().unwrap().body_text(),
        "status=200 body=/x"
    );

    let slow = vm.send_request(
        request("GET", "/")
            .with("x-probe", "callout")
            .with("x-upstream", "slow"),
    );
    host.advance(ms(29));
    assert!(slow.local_reply().is_none());
    host.advance(ms(1));
    assert_eq!(
        slow.local_reply().unwrap().body_text(),
        "status=201 body=late"
    );

    let left = vm.send_request(
        request("GET", "/")
            .with("x-probe", "callout")
            .with("x-upstream", "other"),
    );
    assert_eq!(left.callouts().len(), 1);
}

// ----- effective context, pause and resume -----

#[test]
fn a_paused_stream_is_resumed_from_the_tick_through_the_effective_context() {
    let host = Host::new();
    let vm = probe(&host, "tick_ms=10");
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers(request("GET", "/").with("x-probe", "pause"), true),
        Action::Pause
    );
    assert!(s.is_paused());
    assert_eq!(s.request_flow(), Flow::Paused);
    host.advance(ms(10));
    assert!(s.is_resumed());
    assert!(!s.is_paused());
    assert_eq!(s.request_flow(), Flow::Resumed);
    assert_eq!(s.resume_counts(), (1, 0));
}

#[test]
fn set_effective_context_refuses_unknown_and_finished_contexts() {
    let host = Host::new();
    let vm = probe(&host, "");
    assert_eq!(
        ask(&vm, "effective", &[("x-context", "9999")]).1,
        "bad-argument"
    );
    let root = vm.root_context_id().to_string();
    assert_eq!(ask(&vm, "effective", &[("x-context", &root)]).1, "ok");
    let other = vm.http_stream();
    let id = other.id().to_string();
    assert_eq!(ask(&vm, "effective", &[("x-context", &id)]).1, "ok");
    other.finish();
    assert_eq!(
        ask(&vm, "effective", &[("x-context", &id)]).1,
        "bad-argument"
    );
}

// ----- properties -----

#[test]
fn properties_use_envoy_encodings_and_precedence() {
    let host = Host::new();
    host.set_property("source.address", "10.1.2.3:4567");
    host.set_property("route_name", "host-level");
    let vm = probe(&host, "");
    vm.set_property("upstream.address", "127.0.0.1:9000");
    let property = |path: &str, stream_props: &[(&str, i64)]| {
        let s = vm.http_stream();
        s.set_property("route_name", "orders");
        for (name, value) in stream_props {
            s.set_property(*name, *value);
        }
        s.request_headers(
            request("GET", "/p?q=1")
                .with("x-probe", "property")
                .with("x-path", path),
            true,
        );
        let reply = s.local_reply().unwrap();
        (reply.status, reply.body)
    };
    assert_eq!(
        property("source.address", &[]),
        (200, b"10.1.2.3:4567".to_vec())
    );
    assert_eq!(property("route_name", &[]), (200, b"orders".to_vec()));
    assert_eq!(
        property("upstream.address", &[]),
        (200, b"127.0.0.1:9000".to_vec())
    );
    assert_eq!(property("request.path", &[]), (200, b"/p?q=1".to_vec()));
    assert_eq!(property("request.url_path", &[]), (200, b"/p".to_vec()));
    assert_eq!(property("request.method", &[]), (200, b"GET".to_vec()));
    assert_eq!(
        property("plugin_root_id", &[]),
        (200, b"probe-root".to_vec())
    );
    assert_eq!(
        property("custom.count", &[("custom.count", 42)]),
        (200, 42i64.to_le_bytes().to_vec())
    );
    let now = host.now_nanos() as i64;
    assert_eq!(
        property("request.time", &[]),
        (200, now.to_le_bytes().to_vec())
    );
    assert_eq!(property("no.such.property", &[]).0, 404);
}

// ----- metrics and logs -----

#[test]
fn metrics_of_the_same_name_are_shared_by_all_workers() {
    let host = Host::new();
    let workers = host.vm("abi_probe").start_workers(3).unwrap();
    for vm in &workers {
        ask(
            vm,
            "metric",
            &[("x-kind", "counter"), ("x-name", "requests")],
        );
    }
    assert_eq!(host.counter("requests"), 3);
    assert_eq!(
        ask(
            &workers[0],
            "metric",
            &[("x-name", "requests"), ("x-value", "5")]
        )
        .1,
        "8"
    );

    assert_eq!(
        ask(
            &workers[1],
            "metric",
            &[("x-kind", "gauge"), ("x-name", "g"), ("x-value", "7")]
        )
        .1,
        "7"
    );
    assert_eq!(host.gauge("g"), 7);

    for value in ["5", "9"] {
        let (_, body) = ask(
            &workers[2],
            "metric",
            &[
                ("x-kind", "histogram"),
                ("x-name", "latency"),
                ("x-value", value),
            ],
        );
        assert_eq!(body, "n/a");
    }
    assert_eq!(host.histogram("latency"), vec![5, 9]);
    assert_eq!(host.metric(MetricKind::Counter, "latency"), None);
    assert_eq!(host.counter("never-defined"), 0);
}

#[test]
fn a_counter_refuses_a_non_positive_increment() {
    let host = Host::new();
    let vm = probe(&host, "");
    ask(&vm, "metric", &[("x-name", "c"), ("x-value", "0")]);
    assert_eq!(host.counter("c"), 0);
    assert!(vm.crashed().is_none());
}

#[test]
fn logs_are_captured_with_their_level() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(
        request("GET", "/")
            .with("x-probe", "log")
            .with("x-level", "warn")
            .with("x-message", "hello"),
    );
    assert_eq!(s.request_flow(), Flow::Continued);
    assert!(vm.logs().contains(&LogEntry {
        level: LogLevel::Warn,
        message: "hello".into()
    }));
    assert_eq!(vm.logs_at_least(LogLevel::Warn).len(), 1);
    assert_eq!(host.logs().len(), vm.logs().len());
    assert_eq!(ask(&vm, "log-level", &[]).1, "2");
    host.set_log_level(LogLevel::Debug);
    assert_eq!(ask(&vm, "log-level", &[]).1, "1");
}

#[test]
fn an_enqueued_item_wakes_the_registering_root() {
    let host = Host::new();
    let workers = host.vm("abi_probe").start_workers(2).unwrap();
    workers[1].send_request(
        request("GET", "/")
            .with("x-probe", "enqueue")
            .with("x-value", "job-1"),
    );
    // The queue was registered last by worker 1 (same vm_id and name): it is woken.
    assert!(
        workers[1].has_log("dequeued job-1"),
        "{:?}",
        workers[1].logs()
    );
}

// ----- traps -----

#[test]
fn a_trap_crashes_the_vm_and_fails_its_streams_closed() {
    let host = Host::new();
    let workers = host.vm("abi_probe").start_workers(2).unwrap();
    let vm = &workers[0];
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers(request("GET", "/").with("x-probe", "panic"), true),
        Action::Pause
    );
    let crash = vm.crashed().unwrap();
    assert!(crash.contains("proxy_on_request_headers"), "{crash}");
    assert!(vm.has_log("probe panic on command"), "{:?}", vm.logs());
    assert_eq!(s.local_reply().unwrap().status, 503);
    assert_eq!(s.local_reply().unwrap().details, "wasm_fail_stream");

    let next = vm.send_request(request("GET", "/").with("x-probe", "time"));
    assert_eq!(next.local_reply().unwrap().status, 503);
    // The other worker is unaffected.
    assert_eq!(ask(&workers[1], "time", &[]).0, 200);
}

#[test]
fn wasi_clocks_follow_the_virtual_clock() {
    let host = Host::new();
    let vm = probe(&host, "");
    host.advance(ms(1500));
    assert_eq!(ask(&vm, "wasi-time", &[]).1, host.now_nanos().to_string());
}

#[test]
fn headers_can_be_given_as_plain_arrays() {
    let host = Host::new();
    let vm = host.vm("empty").start().unwrap();
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers([(":path", "/"), (":method", "GET")], true),
        Action::Continue
    );
    assert_eq!(
        s.response_headers(vec![(":status", "200")], true),
        Action::Continue
    );
    assert_eq!(s.request_header(":path").as_deref(), Some("/"));
}

/// The example of the harness' module docs, run.
#[test]
fn the_module_docs_example_holds() {
    let host = Host::new();
    let workers = host
        .vm("abi_probe")
        .config("tick_ms=100")
        .start_workers(2)
        .unwrap();
    assert!(workers[0].configured());

    let s = workers[0].send_request(request("GET", "/").with("x-probe", "time"));
    assert_eq!(s.local_reply().unwrap().status, 200);

    let s = workers[1].http_stream();
    let call = request("GET", "/")
        .with("x-probe", "callout")
        .with("x-upstream", "registry");
    assert_eq!(s.request_headers(call, true), Action::Pause);
    let callout = workers[1].next_callout().unwrap();
    assert_eq!(callout.upstream, "registry");
    callout.respond(Response::new(200).body("hello"));
    assert_eq!(
        s.local_reply().unwrap().body_text(),
        "status=200 body=hello"
    );

    host.advance(Duration::from_millis(250));
    assert_eq!(host.counter("probe.ticks"), 4);

    let s = workers[0].send_request(request("GET", "/orders"));
    assert_eq!(s.response_headers(response(503), true), Action::Continue);
}

#[test]
fn request_headers_are_gone_once_the_request_continued_as_in_envoy() {
    let host = Host::new();
    let vm = probe(&host, "");
    let s = vm.send_request(request("GET", "/").with("x-probe", "late-read"));
    assert_eq!(s.request_flow(), Flow::Continued);
    assert_eq!(s.response_headers(response(200), true), Action::Pause);
    let crash = vm.crashed().unwrap();
    assert!(crash.contains("proxy_on_response_headers"), "{crash}");
    assert!(vm.has_log("unexpected status: 2"), "{:?}", vm.logs());
}

#[test]
#[ignore = "measurement: cargo test --test harness_abi -- --ignored --nocapture"]
fn measure_request_cost() {
    let host = Host::new();
    let vm = host.vm("empty").start().unwrap();
    let started = std::time::Instant::now();
    for _ in 0..10_000 {
        let s = vm.send_request(request("GET", "/"));
        s.response_headers(response(200), true);
        s.finish();
    }
    println!("empty filter: {:?} per request", started.elapsed() / 10_000);
}

// ----- the benchmark's floor instrument -----

#[test]
fn floor_mode_makes_exactly_the_listed_host_calls_and_continues() {
    let host = Host::new();
    let vm = probe(
        &host,
        "floor=time,header,shared,set-header,counter,response-header",
    );
    for _ in 0..3 {
        let s = vm.http_stream();
        // An `x-probe` command is ignored in floor mode: the request continues untouched.
        let headers = request("GET", "/")
            .with("x-api-key", "k")
            .with("x-probe", "reply");
        assert_eq!(s.request_headers(headers, true), Action::Continue);
        assert!(s.local_reply().is_none());
        assert_eq!(s.request_header("x-floor").as_deref(), Some("1"));
        assert_eq!(s.response_headers(response(200), true), Action::Continue);
        assert_eq!(s.response_header("x-floor").as_deref(), Some("1"));
        s.finish();
    }
    assert_eq!(host.counter("probe.floor"), 3);
    // One write per request (the first creates the key, then compare-and-swap): version 3.
    let (value, version) = host.shared_data("keel/floor").unwrap();
    assert_eq!(value.len(), 16);
    assert_eq!(version, 3);
}

#[test]
fn floor_mode_without_an_op_is_the_empty_filter_and_an_unknown_op_is_refused() {
    let host = Host::new();
    let vm = probe(&host, "floor=");
    let s = vm.http_stream();
    assert_eq!(
        s.request_headers(request("GET", "/"), true),
        Action::Continue
    );
    assert_eq!(s.response_headers(response(200), true), Action::Continue);
    assert!(s.response_header("x-floor").is_none());
    assert!(host.shared_data("keel/floor").is_none());

    let vm = host
        .vm("abi_probe")
        .config("floor=header,teleport")
        .start()
        .unwrap();
    assert!(!vm.configured());
    assert!(vm
        .logs()
        .iter()
        .any(|l| l.message.contains("unknown floor op \"teleport\"")));
}
