//! The rate limiter in Keel's wasmtime host: several workers sharing data, a virtual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use keel_host_tests::harness::{request, response, Action, Host, HttpStream, Vm};
use keel_host_tests::Module;

const MINIMAL: &str = r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}}]}"#;

fn workers(host: &Host, config: &str, n: usize) -> Vec<Vm> {
    workers_in(host, Module::Own, config, n)
}

/// `n` workers of the filter from `module` (its own or keel.wasm).
fn workers_in(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "rate_limit", module, config, n).unwrap()
}

fn send(vm: &Vm, key: Option<&str>) -> HttpStream {
    let mut headers = request("GET", "/orders");
    if let Some(key) = key {
        headers = headers.with("x-api-key", key);
    }
    let stream = vm.http_stream();
    stream.set_property("route_name", "api");
    stream.request_headers(headers, true);
    stream
}

fn admitted(stream: &HttpStream) -> bool {
    stream.local_reply().is_none() && !stream.is_paused()
}

/// Sends `n` requests alternating over the workers; returns how many were admitted.
fn burst(vms: &[Vm], key: Option<&str>, n: usize) -> usize {
    (0..n)
        .filter(|i| admitted(&send(&vms[i % vms.len()], key)))
        .count()
}

#[test]
fn two_workers_admit_exactly_the_burst_then_exactly_the_refill() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, MINIMAL, 2);
        assert!(vms
            .iter()
            .all(|vm| vm.has_log("keel rate_limit: configured policies: per-key")));
        assert_eq!(burst(&vms, Some("alice"), 1000), 100);
        host.advance(Duration::from_secs(1));
        // Counts reach the host's counters on the workers' next tick (they are batched).
        assert_eq!(host.counter("keel.rate_limit.per-key.allowed"), 100);
        assert_eq!(host.counter("keel.rate_limit.per-key.limited"), 900);
        assert_eq!(burst(&vms, Some("alice"), 1000), 100);
        // Half a second refills half the bucket.
        host.advance(Duration::from_millis(500));
        assert_eq!(burst(&vms, Some("alice"), 1000), 50);
    }
}

#[test]
fn a_refusal_says_when_to_come_back() {
    // The filter's own module and keel.wasm (root_id) behave the same.
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, MINIMAL, 2);
        burst(&vms, Some("alice"), 100);
        let refused = send(&vms[1], Some("alice"));
        let reply = refused.local_reply().expect("refused");
        assert_eq!(reply.status, 429);
        assert_eq!(reply.body_text(), "rate limited\n");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"per-key\";q=100;w=1")
        );
        assert_eq!(reply.header("ratelimit"), Some("\"per-key\";r=0;t=1"));
        // One token comes back after 10 ms: exactly then the next request is admitted.
        host.advance(Duration::from_millis(9));
        assert!(!admitted(&send(&vms[0], Some("alice"))));
        host.advance(Duration::from_millis(1));
        assert!(admitted(&send(&vms[0], Some("alice"))));
    }
}

#[test]
fn allowed_responses_carry_the_remaining_quota() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    let stream = send(&vms[0], Some("alice"));
    assert!(admitted(&stream));
    assert_eq!(
        stream.response_headers(response(200), true),
        Action::Continue
    );
    assert_eq!(
        stream.response_header("ratelimit").as_deref(),
        Some("\"per-key\";r=99;t=1")
    );
    assert_eq!(
        stream.response_header("ratelimit-policy").as_deref(),
        Some("\"per-key\";q=100;w=1")
    );

    let quiet = workers(
        &Host::new(),
        r#"{"policies": [{"name": "q", "limit": {"requests": 5, "per": "1s"}, "response_headers": false}]}"#,
        1,
    );
    let stream = send(&quiet[0], None);
    stream.response_headers(response(200), true);
    assert_eq!(stream.response_header("ratelimit"), None);
}

#[test]
fn keys_have_their_own_buckets() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 2);
    assert_eq!(burst(&vms, Some("alice"), 300), 100);
    assert_eq!(burst(&vms, Some("bob"), 50), 50);
    assert_eq!(burst(&vms, Some("carol"), 150), 100);
}

#[test]
fn tiers_choose_the_limit() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "plans", "key": "header:x-api-key",
        "limit": {"requests": 1, "per": "1m"},
        "tiers": {"key": "header:x-plan", "default": "free",
                  "limits": {"free": {"requests": 2, "per": "1m"}, "pro": {"requests": 5, "per": "1m"}}}}]}"#;
    let vms = workers(&host, config, 2);
    let plan = |vm: &Vm, key: &str, plan: Option<&str>| {
        let mut headers = request("GET", "/").with("x-api-key", key);
        if let Some(plan) = plan {
            headers = headers.with("x-plan", plan);
        }
        vm.send_request(headers)
    };
    let pro = (0..10)
        .filter(|i| admitted(&plan(&vms[i % 2], "a", Some("pro"))))
        .count();
    let free = (0..10)
        .filter(|i| admitted(&plan(&vms[i % 2], "b", Some("free"))))
        .count();
    let unknown = (0..10)
        .filter(|i| admitted(&plan(&vms[i % 2], "c", Some("gold"))))
        .count();
    assert_eq!((pro, free, unknown), (5, 2, 2));
    let reply = plan(&vms[0], "a", Some("pro"))
        .local_reply()
        .expect("refused");
    assert_eq!(
        reply.header("ratelimit-policy"),
        Some("\"plans.pro\";q=5;w=60")
    );
}

#[test]
fn missing_keys_share_a_bucket_are_allowed_or_are_refused_as_configured() {
    let config = |missing: &str| {
        format!(
            r#"{{"policies": [{{"name": "p", "key": "header:x-api-key", "missing_key": "{missing}", "limit": {{"requests": 3, "per": "1m"}}}}]}}"#
        )
    };
    let host = Host::new();
    let shared = workers(&host, &config("shared"), 2);
    assert_eq!(burst(&shared, None, 10), 3);
    assert_eq!(burst(&shared, Some("alice"), 10), 3);

    let allow = workers(&Host::new(), &config("allow"), 2);
    assert_eq!(burst(&allow, None, 10), 10);

    let deny = workers(&Host::new(), &config("deny"), 1);
    let stream = send(&deny[0], None);
    let reply = stream.local_reply().expect("refused");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), None);
    assert!(admitted(&send(&deny[0], Some("alice"))));
}

#[test]
fn shaping_holds_requests_and_releases_them_on_time() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "shaped", "limit": {"requests": 10, "per": "1s", "burst": 1},
        "shaping": {"max_delay": "350ms"}}]}"#;
    let vms = workers(&host, config, 2);
    let streams: Vec<HttpStream> = (0..6).map(|i| send(&vms[i % 2], None)).collect();
    // One at once, three held (100, 200, 300 ms), the rest would wait longer than 350 ms.
    assert!(admitted(&streams[0]));
    for held in &streams[1..4] {
        assert!(held.is_paused() && held.local_reply().is_none());
    }
    for refused in &streams[4..] {
        assert_eq!(refused.local_reply().map(|r| r.status), Some(429));
    }
    host.advance(Duration::from_millis(99));
    // Counted on the first tick.
    assert_eq!(host.counter("keel.rate_limit.shaped.delayed"), 3);
    assert!(streams[1..4].iter().all(|s| !s.is_resumed()));
    host.advance(Duration::from_millis(6));
    assert!(streams[1].is_resumed());
    assert!(!streams[2].is_resumed());
    host.advance(Duration::from_millis(100));
    assert!(streams[2].is_resumed() && !streams[3].is_resumed());
    host.advance(Duration::from_millis(100));
    assert!(streams[3].is_resumed());
    // Nothing parked any more: the ticks stop.
    assert!(vms.iter().all(|vm| vm.tick_period().is_none()));
}

#[test]
fn routes_choose_the_policies() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "orders", "routes": ["orders"], "limit": {"requests": 1, "per": "1m"}}]}"#;
    let vms = workers(&host, config, 1);
    let on = |route: &str| {
        let s = vms[0].http_stream();
        s.set_property("route_name", route);
        s.request_headers(request("GET", "/"), true);
        admitted(&s)
    };
    assert!(on("orders"));
    assert!(!on("orders"));
    assert!(on("search"));
    assert!(on("search"));
}

#[test]
fn the_refusal_reply_is_configurable() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "p", "limit": {"requests": 1, "per": "1m"},
        "deny": {"status": 503, "body": "slow down", "headers": {"x-why": "quota"}}}]}"#;
    let vms = workers(&host, config, 1);
    send(&vms[0], None);
    let reply = send(&vms[0], None).local_reply().expect("refused");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body_text(), "slow down");
    assert_eq!(reply.header("x-why"), Some("quota"));
    assert_eq!(reply.header("retry-after"), Some("60"));
}

#[test]
fn a_bad_configuration_is_refused_with_the_field_named() {
    let host = Host::new();
    let vm = host
        .vm("rate_limit")
        .root_id("rate_limit")
        .config(r#"{"policies": [{"name": "per-key", "limit": {"requests": 100, "per": "fast"}}]}"#)
        .start()
        .expect("the module loads");
    assert!(!vm.configured());
    assert!(
        vm.has_log("keel rate_limit: policies[0].limit.per: expected a duration"),
        "{:?}",
        vm.logs()
    );
    let vm = host
        .vm("rate_limit")
        .root_id("rate_limit")
        .config(
            r#"{"policies": [{"name": "x", "limit": {"requests": 1, "per": "1s"}, "burts": 3}]}"#,
        )
        .start()
        .expect("the module loads");
    assert!(!vm.configured());
    assert!(vm.has_log("policies[0].burts"), "{:?}", vm.logs());
}

#[test]
fn hostile_keys_never_crash_the_vm() {
    let host = Host::new();
    let vms = workers(&host, MINIMAL, 1);
    for key in ["", "\u{0}", "é", &"k".repeat(100_000)] {
        let s = send(&vms[0], Some(key));
        assert!(s.local_reply().is_none() || s.local_reply().map(|r| r.status) == Some(429));
    }
    assert!(vms[0].crashed().is_none());
}

#[test]
fn a_flood_of_distinct_keys_stays_within_max_keys() {
    let host = Host::new();
    let config = r#"{"policies": [{"name": "flood", "key": "header:x-api-key", "max_keys": 1000,
        "limit": {"requests": 10, "per": "1s"}}]}"#;
    let vms = workers(&host, config, 2);
    // Slots are created when the configuration loads.
    assert_eq!(host.shared_data_count(), 1000);
    let flood = |from: u32, to: u32| {
        for i in from..to {
            let key = format!("{:08x}", i.wrapping_mul(2_654_435_761));
            let stream = send(&vms[(i % 2) as usize], Some(&key));
            stream.finish();
        }
    };
    // Warm up (the allocator takes what it needs once), then twenty times the table's size in
    // distinct keys: neither shared data nor linear memory grows.
    flood(0, 2_000);
    let memory: Vec<usize> = vms.iter().map(Vm::memory_bytes).collect();
    flood(2_000, 22_000);
    assert_eq!(host.shared_data_count(), 1000);
    let after: Vec<usize> = vms.iter().map(Vm::memory_bytes).collect();
    assert_eq!(memory, after, "linear memory grew");
    assert!(vms.iter().all(|vm| vm.crashed().is_none()));
}

/// The adaptive filter's success-rate counts of `requests` and `accepts`, as it writes them.
fn throttle_state(requests: u32, accepts: u32) -> Vec<u8> {
    keel_core::adaptive::throttle::ThrottleState {
        epoch: 1,
        buckets: vec![(requests, accepts)],
    }
    .encode()
}

#[test]
fn an_adaptive_rate_follows_the_upstreams_success_rate() {
    const ADAPTIVE: &str = r#"{"policies": [{"name": "api", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}, "adaptive": {"policy": "orders", "scope": "backend", "floor": 0.2}}]}"#;
    const SIGNAL: &str = "keel/adaptive/orders/backend";
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers_in(&host, module, ADAPTIVE, 2);
        // No signal yet: the configured rate.
        assert_eq!(burst(&vms, Some("alice"), 1000), 100);
        assert_eq!(host.gauge("keel.rate_limit.api.rate_percent"), 100);

        // 40 of 100 upstream answers good: 100 × 0.40 / 0.95 = 42 % of the rate, read on the
        // workers' next tick.
        host.set_shared_data_in("keel", SIGNAL, throttle_state(100, 40));
        vms.iter().for_each(Vm::tick);
        assert_eq!(host.gauge("keel.rate_limit.api.rate_percent"), 42);
        assert!(vms.iter().all(|vm| vm.has_log(
            "keel rate_limit: policy api: at 42% of its configured rate (success rate of adaptive policy orders below 0.95)"
        )));
        assert_eq!(burst(&vms, Some("bob"), 1000), 42);
        let refused = send(&vms[0], Some("bob"));
        let reply = refused.local_reply().expect("refused");
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"api\";q=42;w=1"),
            "RateLimit-Policy says the rate in force"
        );
        // The refill is at the scaled rate too: half a second brings 21.
        host.advance(Duration::from_millis(500));
        assert_eq!(burst(&vms, Some("bob"), 1000), 21);

        // Under the floor: 5 % success is 5 %, held at the floor of 20 %.
        host.set_shared_data_in("keel", SIGNAL, throttle_state(100, 5));
        vms.iter().for_each(Vm::tick);
        assert_eq!(host.gauge("keel.rate_limit.api.rate_percent"), 20);
        assert_eq!(burst(&vms, Some("carol"), 1000), 20);

        // Healed: the configured rate again.
        host.set_shared_data_in("keel", SIGNAL, throttle_state(100, 99));
        vms.iter().for_each(Vm::tick);
        assert_eq!(host.gauge("keel.rate_limit.api.rate_percent"), 100);
        assert!(vms[0].has_log("keel rate_limit: policy api: back at its configured rate"));
        assert_eq!(burst(&vms, Some("dave"), 1000), 100);

        // A signal the limiter cannot read is no signal: the configured rate, no crash.
        host.set_shared_data_in("keel", SIGNAL, b"not a throttle state".to_vec());
        vms.iter().for_each(Vm::tick);
        assert_eq!(burst(&vms, Some("erin"), 1000), 100);
    }
}
