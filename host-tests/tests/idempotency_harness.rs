//! The idempotency filter in Keel's wasmtime host: two workers sharing data, a virtual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keel_host_tests::harness::{request, response, Action, Host, HttpStream, Vm};
use keel_host_tests::Module;

const CONFIG: &str = r#"{"policies": [{"name": "orders", "client": "header:x-api-key", "ttl": "60s", "in_flight_timeout": "10s", "retry_after": "3s", "store": {"shared_data": {"max_entries": 64}}}]}"#;

fn workers(host: &Host, module: Module, config: &str, n: usize) -> Vec<Vm> {
    keel_host_tests::configured_workers(host, "idempotency", module, config, n).unwrap()
}

/// A keyed `POST /orders` from `client` with `body` (none: no body at all), up to the filter's
/// decision: the stream and what the filter answered to the last request callback.
fn post(vm: &Vm, key: Option<&str>, client: &str, body: Option<&str>) -> (HttpStream, Action) {
    let mut headers = request("POST", "/orders").with("x-api-key", client);
    if let Some(key) = key {
        headers = headers.with("idempotency-key", key);
    }
    let stream = vm.http_stream();
    stream.set_property("route_name", "orders");
    let action = stream.request_headers(headers, body.is_none());
    let action = match body {
        Some(body) if stream.local_reply().is_none() => {
            // The headers go on (to Envoy's buffer filter); the body comes in two chunks, and
            // a keyed request's first chunk is buffered until the decision.
            assert_eq!(action, Action::Continue);
            let (a, b) = body.split_at(body.len() / 2);
            let held = if key.is_some() {
                Action::Pause
            } else {
                Action::Continue
            };
            assert_eq!(stream.request_body(a.as_bytes(), false), held);
            stream.request_body(b.as_bytes(), true)
        }
        _ => action,
    };
    (stream, action)
}

/// The upstream's answer to a request that went through.
fn answer(stream: &HttpStream, status: u32, body: &str) {
    let headers = response(status)
        .with("content-type", "application/json")
        .with("x-order", "7");
    assert_eq!(stream.response_headers(headers, false), Action::Continue);
    let (a, b) = body.split_at(body.len() / 2);
    assert_eq!(stream.response_body(a.as_bytes(), false), Action::Continue);
    assert_eq!(stream.response_body(b.as_bytes(), true), Action::Continue);
    stream.finish();
}

fn went_upstream(stream: &HttpStream, action: Action) -> bool {
    action == Action::Continue && stream.local_reply().is_none()
}

#[test]
fn first_runs_concurrent_repeat_conflicts_completed_repeat_replays_changed_body_mismatches() {
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let host = Host::new();
        let vms = workers(&host, module, CONFIG, 2);
        assert!(vms[0]
            .has_log("keel idempotency: configured policies: orders (shared data: 64 entries"));
        let (first, action) = post(&vms[0], Some("k1"), "alice", Some(r#"{"item":1}"#));
        assert!(went_upstream(&first, action));
        // The body went upstream whole.
        assert_eq!(first.request_body_bytes(), br#"{"item":1}"#);
        // A repeat on the other worker while the first is in flight.
        let (repeat, _) = post(&vms[1], Some("k1"), "alice", Some(r#"{"item":1}"#));
        let reply = repeat.local_reply().expect("409");
        assert_eq!(reply.status, 409);
        assert_eq!(reply.header("retry-after"), Some("3"));
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        assert!(
            reply.body_text().contains("\"status\":409"),
            "{}",
            reply.body_text()
        );
        answer(&first, 201, r#"{"id":"order-1"}"#);
        assert_eq!(host.counter("keel.idempotency.orders.stored"), 1);
        // Completed: both workers replay it, byte for byte, marked; nothing goes upstream.
        for vm in &vms {
            let (again, _) = post(vm, Some("k1"), "alice", Some(r#"{"item":1}"#));
            let reply = again.local_reply().expect("replay");
            assert_eq!(reply.status, 201);
            assert_eq!(reply.body, br#"{"id":"order-1"}"#);
            assert_eq!(reply.header("idempotent-replayed"), Some("true"));
            assert_eq!(reply.header("x-order"), Some("7"));
            assert_eq!(reply.header("content-type"), Some("application/json"));
        }
        // The same key with another body: 422.
        let (changed, _) = post(&vms[1], Some("k1"), "alice", Some(r#"{"item":2}"#));
        assert_eq!(changed.local_reply().expect("422").status, 422);
        // Another client's same key is its own key: it runs.
        let (bob, action) = post(&vms[1], Some("k1"), "bob", Some(r#"{"item":1}"#));
        assert!(went_upstream(&bob, action));
        // Without a key the request passes untouched (the key is not required).
        let (plain, action) = post(&vms[0], None, "alice", Some("{}"));
        assert!(went_upstream(&plain, action));
        // A GET is not covered.
        let get = vms[0].http_stream();
        let headers = request("GET", "/orders").with("idempotency-key", "k1");
        assert_eq!(get.request_headers(headers, true), Action::Continue);
        assert_eq!(host.counter("keel.idempotency.orders.replayed"), 2);
        assert_eq!(host.counter("keel.idempotency.orders.conflicts"), 1);
        assert_eq!(host.counter("keel.idempotency.orders.mismatches"), 1);
    }
}

#[test]
fn a_required_key_is_refused_when_missing_or_too_long() {
    let config = r#"{"policies": [{"name": "pay", "required": true, "max_key_length": 8}]}"#;
    for module in Module::BOTH {
        let host = Host::new();
        let vms = workers(&host, module, config, 1);
        let (missing, _) = post(&vms[0], None, "alice", Some("{}"));
        let reply = missing.local_reply().expect("400");
        assert_eq!(reply.status, 400);
        assert!(reply.body_text().contains("Idempotency-Key is missing"));
        let (long, _) = post(&vms[0], Some("123456789"), "alice", None);
        assert_eq!(long.local_reply().expect("400").status, 400);
        let (fine, action) = post(&vms[0], Some("12345678"), "alice", None);
        assert!(went_upstream(&fine, action));
        assert_eq!(host.counter("keel.idempotency.pay.missing_key"), 2);
    }
}

#[test]
fn keys_expire_after_the_ttl_and_unfinished_claims_after_the_in_flight_timeout() {
    let host = Host::new();
    let vms = workers(&host, Module::Own, CONFIG, 2);
    let (first, _) = post(&vms[0], Some("k1"), "alice", None);
    answer(&first, 200, "ok");
    host.advance(Duration::from_secs(59));
    let (replay, _) = post(&vms[1], Some("k1"), "alice", None);
    assert_eq!(replay.local_reply().expect("replay").status, 200);
    host.advance(Duration::from_secs(1));
    let (again, action) = post(&vms[1], Some("k1"), "alice", None);
    assert!(
        went_upstream(&again, action),
        "the ttl is over: the key runs again"
    );
    // `again` never completes (the client left): its claim holds for 10 s, then lapses.
    again.finish();
    host.advance(Duration::from_secs(9));
    let (held, _) = post(&vms[0], Some("k1"), "alice", None);
    let reply = held.local_reply().expect("409");
    assert_eq!(reply.status, 409);
    // Retry-After never promises past the claim's timeout.
    assert_eq!(reply.header("retry-after"), Some("1"));
    host.advance(Duration::from_secs(1));
    let (free, action) = post(&vms[0], Some("k1"), "alice", None);
    assert!(went_upstream(&free, action));
}

#[test]
fn server_errors_are_stored_unless_only_successes_are_and_large_answers_release_the_key() {
    let host = Host::new();
    let vms = workers(&host, Module::Own, CONFIG, 1);
    let (first, _) = post(&vms[0], Some("e1"), "alice", None);
    answer(&first, 500, "boom");
    let (replay, _) = post(&vms[0], Some("e1"), "alice", None);
    assert_eq!(replay.local_reply().expect("replayed 500").status, 500);

    let success_only =
        r#"{"policies": [{"name": "orders", "store_responses": "success", "max_body": 16}]}"#;
    let host = Host::new();
    let vms = workers(&host, Module::Own, success_only, 1);
    let (first, _) = post(&vms[0], Some("e1"), "alice", None);
    answer(&first, 503, "busy");
    let (again, action) = post(&vms[0], Some("e1"), "alice", None);
    assert!(went_upstream(&again, action), "a 503 released the key");
    answer(&again, 200, "this answer is longer than sixteen bytes");
    let (third, action) = post(&vms[0], Some("e1"), "alice", None);
    assert!(
        went_upstream(&third, action),
        "too large to store: released"
    );
    assert_eq!(host.counter("keel.idempotency.orders.released"), 2);
    assert_eq!(host.counter("keel.idempotency.orders.stored"), 0);
}

#[test]
fn the_oldest_record_is_evicted_first() {
    let config =
        r#"{"policies": [{"name": "orders", "store": {"shared_data": {"max_entries": 8}}}]}"#;
    let host = Host::new();
    let vms = workers(&host, Module::Own, config, 2);
    for i in 0..9 {
        let (s, action) = post(&vms[i % 2], Some(&format!("k{i}")), "alice", None);
        assert!(went_upstream(&s, action));
        answer(&s, 200, &format!("answer {i}"));
    }
    assert_eq!(host.counter("keel.idempotency.orders.evictions"), 1);
    for i in 1..9 {
        let (s, _) = post(&vms[0], Some(&format!("k{i}")), "alice", None);
        assert_eq!(
            s.local_reply().map(|r| r.body_text()),
            Some(format!("answer {i}"))
        );
    }
    let (oldest, action) = post(&vms[0], Some("k0"), "alice", None);
    assert!(went_upstream(&oldest, action), "k0 was the oldest: evicted");
}

/// The store's keys and the bytes of their values.
fn store_size(host: &Host, prefix: &str) -> (usize, usize) {
    let keys: Vec<String> = host
        .shared_data_keys("keel")
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect();
    let bytes = keys
        .iter()
        .filter_map(|k| host.shared_data_in("keel", k))
        .map(|(v, _)| v.len())
        .sum();
    (keys.len(), bytes)
}

#[test]
fn a_flood_of_distinct_keys_keeps_the_store_within_its_bounds() {
    // KEEL_IDEMPOTENCY_FLOOD sets the number of keys (1 000 000 for the issue's figure).
    let keys: usize = std::env::var("KEEL_IDEMPOTENCY_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let config = r#"{"policies": [{"name": "flood", "store": {"shared_data": {"max_entries": 256, "max_bytes": 262144}}}]}"#;
    let host = Host::new();
    let vms = workers(&host, Module::Own, config, 2);
    let (start_keys, _) = store_size(&host, "keel/idempotency/flood/");
    // 256 slots, 64 directory buckets, the cursor.
    assert_eq!(start_keys, 256 + 64 + 1);
    let started = Instant::now();
    for i in 0..keys {
        let (s, action) = post(&vms[i % 2], Some(&format!("key-{i}")), "alice", None);
        assert!(went_upstream(&s, action), "key {i}");
        answer(&s, 201, "{\"id\":1}");
        if i % 100_000 == 99_999 {
            let (n, bytes) = store_size(&host, "keel/idempotency/flood/");
            assert_eq!(n, start_keys);
            assert!(
                bytes <= 262_144 + 64 * 258 + 8,
                "{bytes} bytes after {i} keys"
            );
        }
    }
    eprintln!("{keys} keys in {:?}", started.elapsed());
    let (n, bytes) = store_size(&host, "keel/idempotency/flood/");
    assert_eq!(n, start_keys);
    assert!(bytes <= 262_144 + 64 * 258 + 8, "{bytes}");
    assert_eq!(host.counter("keel.idempotency.flood.stored"), keys as u64);
    assert_eq!(
        host.counter("keel.idempotency.flood.evictions"),
        keys as u64 - 256
    );
    // The newest answers are still there.
    let (last, _) = post(&vms[0], Some(&format!("key-{}", keys - 1)), "alice", None);
    assert_eq!(last.local_reply().expect("replay").status, 201);
}

#[test]
fn as_a_pipeline_stage_it_behaves_the_same() {
    let config = format!(
        r#"{{"stages": [{{"filter": "idempotency", "config": {}}}]}}"#,
        &CONFIG
    );
    let host = Host::new();
    let vms =
        keel_host_tests::configured_workers(&host, "pipeline", Module::Suite, &config, 2).unwrap();
    let (first, action) = post(&vms[0], Some("k1"), "alice", Some(r#"{"item":1}"#));
    assert!(went_upstream(&first, action));
    let (repeat, _) = post(&vms[1], Some("k1"), "alice", Some(r#"{"item":1}"#));
    assert_eq!(repeat.local_reply().expect("409").status, 409);
    answer(&first, 201, r#"{"id":"order-1"}"#);
    let (again, _) = post(&vms[1], Some("k1"), "alice", Some(r#"{"item":1}"#));
    let reply = again.local_reply().expect("replay");
    assert_eq!(reply.body, br#"{"id":"order-1"}"#);
    assert_eq!(reply.header("idempotent-replayed"), Some("true"));
    let (changed, _) = post(&vms[0], Some("k1"), "alice", Some(r#"{"item":2}"#));
    assert_eq!(changed.local_reply().expect("422").status, 422);
}
