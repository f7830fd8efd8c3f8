//! The idempotency filter's Redis store in two real Envoy processes (`--concurrency 2` each)
//! sharing one real Redis through one real Webdis, with `envoy/idempotency-fleet.yaml`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::thread;
use std::time::Duration;

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::redis::{FleetStore, WEBDIS_PORT};
use keel_host_tests::upstream::{Mode, Upstream};

const KEYS: usize = 60;

fn start(store: &FleetStore, upstream: &Upstream) -> Envoy {
    EnvoyConfig::from_file("envoy/idempotency-fleet.yaml")
        .unwrap()
        .port(18080, upstream.port())
        .port(WEBDIS_PORT, store.webdis_port())
        // Slack for a loaded machine: a store timeout here would send a key upstream twice.
        .replace(r#""timeout": "100ms""#, r#""timeout": "2s""#)
        .concurrency(2)
        .start()
        .unwrap()
}

fn order(i: usize) -> Request {
    Request::post("/orders", format!("{{\"item\":{i}}}"))
        .header("x-api-key", &format!("client-{i}"))
        .header("idempotency-key", &format!("order-{i}"))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(10))
}

fn send(envoy: &Envoy, requests: Vec<Request>, concurrency: usize) -> Vec<Response> {
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

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
        && replay.header("content-type") == first.header("content-type")
        && replay.header("idempotent-replayed") == Some("true")
}

#[test]
fn two_proxies_share_the_keys_through_redis() {
    let store = FleetStore::start().unwrap();
    let upstream = Upstream::start("backend").unwrap();
    // Slow answers, so that a repeat sent with the first finds it in flight.
    upstream.set_mode(Mode::Delay(Duration::from_millis(300)));
    let envoys = [start(&store, &upstream), start(&store, &upstream)];
    for envoy in &envoys {
        assert!(
            envoy.log().contains("orders (redis: cluster webdis"),
            "{}",
            envoy.log()
        );
    }

    // Each key is sent to both proxies at once...
    let (on_a, on_b) = thread::scope(|s| {
        let a = s.spawn(|| send(&envoys[0], (0..KEYS).map(order).collect(), KEYS));
        let b = s.spawn(|| send(&envoys[1], (0..KEYS).map(order).collect(), KEYS));
        (a.join().unwrap(), b.join().unwrap())
    });
    // ... then repeated, alternating between them.
    let repeats: Vec<Vec<Response>> = (0..4)
        .map(|round| send(&envoys[round % 2], (0..KEYS).map(order).collect(), 20))
        .collect();

    let by_key = arrivals(&upstream);
    assert_eq!(by_key.len(), KEYS, "{by_key:?}");
    assert!(
        by_key.values().all(|n| *n == 1),
        "exactly one upstream request per key: {by_key:?}"
    );
    let mut conflicts = 0;
    let mut replayed_at_once = 0;
    for i in 0..KEYS {
        let (a, b) = (&on_a[i], &on_b[i]);
        let (first, other, first_on) =
            if a.status == 200 && a.header("idempotent-replayed").is_none() {
                (a, b, 0)
            } else {
                (b, a, 1)
            };
        assert_eq!(first.status, 200, "key {i}: {first:?} / {other:?}");
        assert_eq!(first.text(), "backend");
        if other.status == 409 {
            conflicts += 1;
            assert!(other.header("retry-after").is_some());
        } else {
            replayed_at_once += 1;
            assert!(
                is_replay_of(other, first),
                "key {i}: {other:?} vs {first:?}"
            );
        }
        for (round, r) in repeats.iter().enumerate() {
            assert!(
                is_replay_of(&r[i], first),
                "key {i}, round {round} (first on proxy {first_on}): {:?} vs {first:?}",
                r[i]
            );
        }
    }
    eprintln!("{conflicts} of {KEYS} concurrent repeats got 409, {replayed_at_once} the replay");
    assert!(
        conflicts > 0,
        "repeats sent with a slow first request get 409"
    );
    assert_eq!(upstream.total() as usize, KEYS);

    // Redis holds one record per key.
    let size = store.command("DBSIZE").unwrap();
    assert_eq!(size, format!("{{\"DBSIZE\":{KEYS}}}"), "{size}");

    let counter = |envoy: &Envoy, name: &str| {
        envoy
            .counter(&format!("wasmcustom.keel.idempotency.orders.{name}"))
            .unwrap()
    };
    let sum = |name: &str| counter(&envoys[0], name) + counter(&envoys[1], name);
    assert_eq!(sum("stored"), KEYS as u64);
    assert_eq!(sum("conflicts"), conflicts);
    assert_eq!(sum("replayed"), (5 * KEYS) as u64 - conflicts);
    assert_eq!(sum("store_errors"), 0);

    // Redis down: Webdis answers 503, the requests go upstream untracked (failure_mode
    // "allow"), each counted, and nothing hangs.
    store.stop_redis();
    let down = send(&envoys[0], (0..3).map(|_| order(1000)).collect(), 1);
    assert!(
        down.iter()
            .all(|r| r.status == 200 && r.header("idempotent-replayed").is_none()),
        "{down:?}"
    );
    assert_eq!(arrivals(&upstream).get("order-1000"), Some(&3));
    assert_eq!(counter(&envoys[0], "store_errors"), 3);
    assert!(envoys[0].log().contains("store failed"));
    for envoy in &envoys {
        let log = envoy.log();
        assert!(!log.contains("panicked"), "a VM panicked:\n{log}");
    }
}
