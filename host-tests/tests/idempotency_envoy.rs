//! The idempotency filter in a real Envoy (`--concurrency 2`), with `envoy/idempotency.yaml`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::{Mode, Upstream};

const CLIENTS: usize = 200;

fn start(upstream: &Upstream, payments_ttl: &str) -> Envoy {
    EnvoyConfig::from_file("envoy/idempotency.yaml")
        .unwrap()
        .port(18080, upstream.port())
        .replace(
            r#""required": true, "client": "header:x-api-key", "ttl": "24h""#,
            &format!(r#""required": true, "client": "header:x-api-key", "ttl": "{payments_ttl}""#),
        )
        .concurrency(2)
        .start()
        .unwrap()
}

fn order(i: usize, body: &str) -> Request {
    Request::post("/orders", body.to_string())
        .header("x-api-key", &format!("client-{i}"))
        .header("idempotency-key", &format!("order-{i}"))
        .header("content-type", "application/json")
}

fn send(envoy: &Envoy, requests: Vec<Request>, concurrency: usize) -> Vec<Response> {
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

/// How many requests the upstream received per `idempotency-key`.
fn arrivals(upstream: &Upstream) -> BTreeMap<String, usize> {
    let mut by_key = BTreeMap::new();
    for r in upstream.received() {
        let key = r.header("idempotency-key").unwrap_or("").to_string();
        *by_key.entry(key).or_insert(0) += 1;
    }
    by_key
}

fn is_replay_of(replay: &Response, first: &Response) -> bool {
    replay.status == first.status
        && replay.body == first.body
        && replay.header("x-upstream-seq") == first.header("x-upstream-seq")
        && replay.header("idempotent-replayed") == Some("true")
}

#[test]
fn each_key_reaches_the_upstream_once_and_repeats_get_its_answer() {
    let upstream = Upstream::start("backend").unwrap();
    // Slow answers, so that a repeat sent with the first finds it in flight.
    upstream.set_mode(Mode::Delay(Duration::from_millis(300)));
    let envoy = start(&upstream, "24h");
    assert!(envoy
        .log()
        .contains("keel idempotency: configured policies: payments"));

    // Every client sends its POST twice at once...
    let body = |i: usize| format!("{{\"item\":{i}}}");
    let pairs: Vec<Request> = (0..CLIENTS)
        .flat_map(|i| [order(i, &body(i)), order(i, &body(i))])
        .collect();
    let concurrent = send(&envoy, pairs, 2 * CLIENTS);
    // ... then a third time once both are answered.
    let third = send(
        &envoy,
        (0..CLIENTS).map(|i| order(i, &body(i))).collect(),
        50,
    );

    let by_key = arrivals(&upstream);
    assert_eq!(by_key.len(), CLIENTS, "{by_key:?}");
    assert!(
        by_key.values().all(|n| *n == 1),
        "exactly one upstream request per key: {by_key:?}"
    );
    let mut conflicts = 0;
    for i in 0..CLIENTS {
        let (a, b) = (&concurrent[2 * i], &concurrent[2 * i + 1]);
        // One of the two went upstream; the other got 409 or (if it came after) the replay.
        let (first, other) = if a.header("idempotent-replayed").is_none() && a.status == 200 {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(first.status, 200, "client {i}: {first:?} / {other:?}");
        assert_eq!(first.text(), "backend");
        assert!(first.header("x-upstream-seq").is_some());
        if other.status == 409 {
            conflicts += 1;
            assert!(other.header("retry-after").is_some());
            assert_eq!(
                other.header("content-type"),
                Some("application/problem+json")
            );
        } else {
            assert!(
                is_replay_of(other, first),
                "client {i}: {other:?} vs {first:?}"
            );
        }
        assert!(
            is_replay_of(&third[i], first),
            "client {i}: {:?} vs {first:?}",
            third[i]
        );
    }
    eprintln!("{conflicts} of {CLIENTS} concurrent repeats got 409");
    assert!(
        conflicts > 0,
        "repeats sent with a slow first request get 409"
    );

    // A changed body with a used key: 422, and the upstream sees nothing.
    let changed = send(
        &envoy,
        (0..10).map(|i| order(i, "{\"item\":-1}")).collect(),
        10,
    );
    assert!(changed.iter().all(|r| r.status == 422), "{changed:?}");
    assert_eq!(upstream.total() as usize, CLIENTS);

    // A route that requires a key: 400 without one.
    let missing = envoy
        .send(Request::post("/payments", "{}").header("x-api-key", "client-0"))
        .unwrap();
    assert_eq!(missing.status, 400);
    assert!(
        missing.text().contains("Idempotency-Key is missing"),
        "{}",
        missing.text()
    );
    assert_eq!(upstream.total() as usize, CLIENTS);

    // Envoy's counters agree.
    let counter = |name: &str| envoy.counter(&format!("wasmcustom.{name}")).unwrap();
    assert_eq!(counter("keel.idempotency.orders.stored"), CLIENTS as u64);
    assert_eq!(counter("keel.idempotency.orders.conflicts"), conflicts);
    assert_eq!(counter("keel.idempotency.orders.mismatches"), 10);
    assert_eq!(counter("keel.idempotency.payments.missing_key"), 1);
    assert_eq!(
        counter("keel.idempotency.orders.replayed"),
        (2 * CLIENTS) as u64 - conflicts
    );
}

#[test]
fn after_the_ttl_the_key_runs_again() {
    let upstream = Upstream::start("backend").unwrap();
    let envoy = start(&upstream, "3s");
    let pay = || {
        Request::post("/payments", "{\"amount\":5}")
            .header("x-api-key", "alice")
            .header("idempotency-key", "pay-1")
    };
    let first = envoy.send(pay()).unwrap();
    assert_eq!(first.status, 200);
    let replay = envoy.send(pay()).unwrap();
    assert!(is_replay_of(&replay, &first), "{replay:?}");
    assert_eq!(upstream.total(), 1);
    std::thread::sleep(Duration::from_millis(3500));
    let again = envoy.send(pay()).unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), None);
    assert_ne!(
        again.header("x-upstream-seq"),
        first.header("x-upstream-seq")
    );
    assert_eq!(upstream.total(), 2);
}
