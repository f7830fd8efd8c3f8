//! The idempotency filter's Redis store in Keel's wasmtime host: two processes (two hosts, no
//! shared data between them) whose callouts go to one Redis played in Rust (Webdis's JSON for
//! `SET NX PX`, `SET PX`, `GET`, `DEL`), and a store that fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_host_tests::harness::{
    request, response, Action, CalloutRequest, Host, HttpStream, Response, Vm,
};
use keel_host_tests::Module;

const CONFIG: &str = r#"{"policies": [{"name": "orders", "client": "header:x-api-key", "ttl": "60s", "in_flight_timeout": "10s", "retry_after": "3s", "store_responses": "success", "store": {"redis": {"cluster": "webdis", "timeout": "200ms"}}}]}"#;

/// What the scripted Redis does with the next commands.
const UP: u32 = 0;
/// Webdis answers 503: it has no Redis.
const NO_REDIS: u32 = 1;
/// The callout is left unanswered (the test answers it).
const SILENT: u32 = 2;

/// One Redis for every process, and the commands it saw.
#[derive(Clone, Default)]
struct Redis {
    keys: Arc<Mutex<HashMap<String, String>>>,
    seen: Arc<Mutex<Vec<String>>>,
    mode: Arc<AtomicU32>,
}

fn decode(part: &str) -> String {
    let b = part.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&part[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

impl Redis {
    fn answer(&self, call: &CalloutRequest) -> Option<Response> {
        assert_eq!(call.upstream, "webdis");
        assert!(call
            .headers
            .iter()
            .any(|(k, v)| k == ":method" && v == "POST"));
        assert!(call
            .timeout
            .is_some_and(|t| t <= Duration::from_millis(200)));
        match self.mode.load(Ordering::SeqCst) {
            NO_REDIS => return Some(Response::new(503).body("")),
            SILENT => return None,
            _ => {}
        }
        let parts: Vec<String> = std::str::from_utf8(&call.body)
            .unwrap()
            .split('/')
            .map(decode)
            .collect();
        let mut keys = self.keys.lock().unwrap();
        let shape = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 2 && parts[0] == "SET" {
                    "<value>"
                } else {
                    p.as_str()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        self.seen.lock().unwrap().push(shape);
        let json = match (parts[0].as_str(), parts.len()) {
            ("SET", 6) => {
                assert_eq!((parts[3].as_str(), parts[4].as_str()), ("NX", "PX"));
                if keys.contains_key(&parts[1]) {
                    r#"{"SET":null}"#.to_string()
                } else {
                    keys.insert(parts[1].clone(), parts[2].clone());
                    r#"{"SET":[true,"OK"]}"#.to_string()
                }
            }
            ("SET", 5) => {
                assert_eq!(parts[3], "PX");
                keys.insert(parts[1].clone(), parts[2].clone());
                r#"{"SET":[true,"OK"]}"#.to_string()
            }
            ("GET", 2) => match keys.get(&parts[1]) {
                Some(v) => format!(r#"{{"GET":"{v}"}}"#),
                None => r#"{"GET":null}"#.to_string(),
            },
            ("DEL", 2) => format!(
                r#"{{"DEL":{}}}"#,
                u8::from(keys.remove(&parts[1]).is_some())
            ),
            other => panic!("unexpected command {other:?}"),
        };
        Some(
            Response::new(200)
                .header("content-type", "application/json")
                .body(json),
        )
    }

    fn seen(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// A process of the fleet: its own host (own shared data), one worker.
fn process(redis: &Redis, module: Module, config: &str) -> (Host, Vm) {
    let host = Host::new();
    let r = redis.clone();
    host.set_responder(move |call| r.answer(call));
    let mut vms =
        keel_host_tests::configured_workers(&host, "idempotency", module, config, 1).unwrap();
    (host, vms.remove(0))
}

/// A keyed `POST /orders` with a body in two chunks, up to the filter's decision.
fn post(vm: &Vm, key: &str, body: &str) -> HttpStream {
    let headers = request("POST", "/orders")
        .with("x-api-key", "alice")
        .with("idempotency-key", key);
    let stream = vm.http_stream();
    stream.set_property("route_name", "orders");
    assert_eq!(stream.request_headers(headers, false), Action::Continue);
    let (a, b) = body.split_at(body.len() / 2);
    assert_eq!(stream.request_body(a.as_bytes(), false), Action::Pause);
    // The last chunk: held while Redis answers (the answer comes right after the callback).
    assert_eq!(stream.request_body(b.as_bytes(), true), Action::Pause);
    stream
}

/// Whether the request went upstream: resumed once after the store's answer, no local reply.
fn went_upstream(stream: &HttpStream) -> bool {
    stream.local_reply().is_none() && stream.resume_counts().0 == 1
}

/// The upstream's answer; whether the filter held it for a store write (each hold resumed
/// once Redis answered).
fn answer(stream: &HttpStream, status: u32, body: &[u8]) -> bool {
    let headers = response(status)
        .with("content-type", "application/octet-stream")
        .with("x-order", "7");
    let (a, b) = body.split_at(body.len() / 2);
    let actions = [
        stream.response_headers(headers, false),
        stream.response_body(a, false),
        stream.response_body(b, true),
    ];
    let holds = actions.iter().filter(|a| **a == Action::Pause).count() as u32;
    assert_eq!(
        stream.resume_counts().1,
        holds,
        "every hold was resumed: {actions:?}"
    );
    stream.finish();
    holds > 0
}

const ANSWER: &[u8] = b"{\"id\":\"order-1\",\"raw\":\"\xff\x00\x01\"}";

#[test]
fn first_conflict_replay_mismatch_across_two_processes() {
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let redis = Redis::default();
        let (host_a, a) = process(&redis, module, CONFIG);
        let (host_b, b) = process(&redis, module, CONFIG);
        assert!(a.has_log("orders (redis: cluster webdis, timeout 200 ms"));

        let first = post(&a, "k1", r#"{"item":1}"#);
        assert!(went_upstream(&first));
        assert_eq!(first.request_body_bytes(), br#"{"item":1}"#);
        let seen = redis.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("SET keel:idempotency:orders:"),
            "{seen:?}"
        );
        assert!(seen[0].ends_with("<value> NX PX 10000"), "{seen:?}");

        // A repeat on the other process while the first is in flight: SET NX finds the key,
        // GET reads the claim: 409.
        let repeat = post(&b, "k1", r#"{"item":1}"#);
        let reply = repeat.local_reply().expect("409");
        assert_eq!(reply.status, 409);
        assert_eq!(reply.header("retry-after"), Some("3"));
        let seen = redis.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[1].starts_with("GET keel:idempotency:orders:"));

        // The answer is written (SET PX ttl) before its last chunk goes on.
        assert!(answer(&first, 201, ANSWER));
        let seen = redis.seen();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].ends_with("<value> PX 60000"), "{seen:?}");
        assert_eq!(host_a.counter("keel.idempotency.orders.stored"), 1);

        // Replayed on both processes, byte for byte, marked; nothing goes upstream.
        for (host, vm) in [(&host_a, &a), (&host_b, &b)] {
            let again = post(vm, "k1", r#"{"item":1}"#);
            let reply = again.local_reply().expect("replay");
            assert_eq!(reply.status, 201);
            assert_eq!(reply.body, ANSWER);
            assert_eq!(reply.header("idempotent-replayed"), Some("true"));
            assert_eq!(reply.header("x-order"), Some("7"));
            assert_eq!(host.counter("keel.idempotency.orders.replayed"), 1);
        }
        // The same key with another body: 422.
        let changed = post(&b, "k1", r#"{"item":2}"#);
        assert_eq!(changed.local_reply().expect("422").status, 422);
        assert_eq!(host_b.counter("keel.idempotency.orders.mismatches"), 1);
        assert_eq!(host_b.counter("keel.idempotency.orders.conflicts"), 1);

        // An answer that is not kept (a 500 under "success") gives the claim up (DEL): the
        // key runs again on the other process.
        redis.seen();
        let failing = post(&a, "k2", "{}");
        assert!(went_upstream(&failing));
        assert!(answer(&failing, 500, b"oops"));
        let seen = redis.seen();
        assert!(
            seen.last()
                .unwrap()
                .starts_with("DEL keel:idempotency:orders:"),
            "{seen:?}"
        );
        let again = post(&b, "k2", "{}");
        assert!(went_upstream(&again));
        assert_eq!(host_a.counter("keel.idempotency.orders.store_errors"), 0);
        assert_eq!(host_b.counter("keel.idempotency.orders.store_errors"), 0);
    }
}

#[test]
fn a_failing_store_follows_the_failure_mode() {
    for module in Module::BOTH {
        eprintln!("module: {module:?}");
        let redis = Redis::default();
        // allow (the default): the request goes upstream untracked, one log line.
        let (host, vm) = process(&redis, module, CONFIG);
        redis.mode.store(NO_REDIS, Ordering::SeqCst);
        let s = post(&vm, "k1", "{}");
        assert!(went_upstream(&s));
        assert_eq!(host.counter("keel.idempotency.orders.store_errors"), 1);
        let lines: Vec<_> = vm
            .logs()
            .into_iter()
            .filter(|l| l.message.contains("store failed"))
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].message.contains("HTTP status 503"),
            "{}",
            lines[0].message
        );
        assert!(lines[0].message.contains("goes upstream untracked"));
        // Untracked: its answer is not written.
        assert!(!answer(&s, 201, b"ok"));

        // A store that does not answer: the request waits, held, then the callout's timeout
        // (Envoy's 504) lets it go.
        redis.mode.store(SILENT, Ordering::SeqCst);
        let held = post(&vm, "k3", "{}");
        assert!(held.is_paused());
        let pending = vm.next_callout().expect("the claim is pending");
        assert_eq!(pending.request().timeout, Some(Duration::from_millis(200)));
        pending.respond(Response::timeout());
        assert!(went_upstream(&held));
        assert_eq!(host.counter("keel.idempotency.orders.store_errors"), 2);

        // deny: 503 with Retry-After, nothing upstream.
        let deny = CONFIG.replace(
            r#""store_responses""#,
            r#""failure_mode": "deny", "store_responses""#,
        );
        let (host, vm) = process(&redis, module, &deny);
        redis.mode.store(NO_REDIS, Ordering::SeqCst);
        let s = post(&vm, "k1", "{}");
        let reply = s.local_reply().expect("503");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(s.resume_counts().0, 0);
        assert_eq!(host.counter("keel.idempotency.orders.store_errors"), 1);
        assert!(vm.has_log("the request is refused"));
        // Back up: the same key runs (nothing was claimed while Redis was away).
        redis.mode.store(UP, Ordering::SeqCst);
        let s = post(&vm, "k1", "{}");
        assert!(went_upstream(&s));
    }
}
