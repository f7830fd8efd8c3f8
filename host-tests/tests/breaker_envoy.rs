//! The circuit breaker in a real Envoy (`--concurrency 2`), with `envoy/circuit-breaker.yaml`
//! as written: `/orders` has the minimal configuration, `/catalog` a fallback, `/hosts` one
//! breaker per upstream host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::thread;
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::upstream::{Mode, Upstream};

const CONFIG: &str = "envoy/circuit-breaker.yaml";
const MINIMAL: &str = r#"{"breakers": [{"name": "orders", "window": "10s", "failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3}]}"#;

fn config(upstream: &Upstream) -> EnvoyConfig {
    EnvoyConfig::from_file(CONFIG)
        .unwrap()
        .port(18080, upstream.port())
        .concurrency(2)
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .unwrap()
        .get(&format!("wasmcustom.keel.circuit_breaker.{name}"))
        .copied()
        .unwrap_or(0)
}

fn all(envoy: &Envoy, requests: impl IntoIterator<Item = Request>, n: usize) -> Vec<Response> {
    envoy
        .send_all(requests, n)
        .into_iter()
        .map(|r| r.expect("every request gets an answer"))
        .collect()
}

fn is_open_reply(r: &Response) -> bool {
    r.status == 503 && r.text() == "circuit breaker open\n"
}

#[test]
fn the_minimal_config_opens_at_min_calls_sheds_everything_probes_then_closes() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail(500));
    let envoy = config(&upstream).start().unwrap();
    let yaml = std::fs::read_to_string(keel_host_tests::repo_root().join(CONFIG)).unwrap();
    assert!(
        yaml.contains(MINIMAL),
        "the yaml carries the minimal config as written"
    );
    assert!(envoy
        .log()
        .contains("keel circuit_breaker: configured breakers: orders"));

    // min_calls failures, one after the other, all reach the upstream; the 20th opens it.
    for i in 0..20 {
        let r = envoy.get(&format!("/orders/{i}")).unwrap();
        assert_eq!(r.status, 500, "call {i} reached the upstream");
    }
    let opened = Instant::now();
    assert_eq!(upstream.total(), 20);
    envoy
        .wait_for_log(
            "keel circuit_breaker: breaker orders: closed -> open: 20 of 20 calls failed; open for 5s",
            Duration::from_secs(2),
        )
        .unwrap();

    // For the whole open period the upstream receives nothing; every client gets the fast
    // reply, whichever worker serves it.
    let mut fast = 0;
    while opened.elapsed() < Duration::from_millis(4500) && fast < 400 {
        let r = envoy.get("/orders/while-open").unwrap();
        assert!(is_open_reply(&r), "{} {}", r.status, r.text());
        let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=5).contains(&retry_after), "retry-after {retry_after}");
        fast += 1;
        thread::sleep(Duration::from_millis(20));
    }
    assert!(fast >= 20, "{fast} requests while open");
    assert_eq!(
        upstream.total(),
        20,
        "nothing reached the upstream while open"
    );
    assert_eq!(stat(&envoy, "orders.state"), 1);

    // After open_for the upstream has recovered but answers slowly, so the probes stay out
    // while a burst arrives: exactly half_open_probes requests reach it.
    upstream.set_mode(Mode::Delay(Duration::from_secs(3)));
    let wait = Duration::from_millis(5200).saturating_sub(opened.elapsed());
    thread::sleep(wait);
    let burst = all(
        &envoy,
        (0..20).map(|i| Request::get(&format!("/orders/probe-{i}"))),
        20,
    );
    let passed = burst.iter().filter(|r| r.status == 200).count();
    let shed = burst.iter().filter(|r| is_open_reply(r)).count();
    assert_eq!(passed + shed, 20);
    assert_eq!(
        upstream.total(),
        23,
        "exactly 3 probes reached the upstream"
    );
    assert_eq!(passed, 3);
    assert_eq!(stat(&envoy, "orders.probes"), 3);
    envoy
        .wait_for_log(
            "keel circuit_breaker: breaker orders: half_open -> closed: 0 of 3 probes failed, 0 slow",
            Duration::from_secs(2),
        )
        .unwrap();

    // Closed again: traffic flows.
    upstream.set_mode(Mode::Normal);
    let after = all(
        &envoy,
        (0..40).map(|i| Request::get(&format!("/orders/{i}"))),
        4,
    );
    assert!(after
        .iter()
        .all(|r| r.status == 200 && r.text() == "backend"));
    assert_eq!(upstream.total(), 63);
    assert_eq!(stat(&envoy, "orders.state"), 0);
    assert_eq!(stat(&envoy, "orders.opened"), 1);
    assert_eq!(stat(&envoy, "orders.half_opened"), 1);
    assert_eq!(stat(&envoy, "orders.closed"), 1);
    assert_eq!(stat(&envoy, "orders.rejected"), fast as u64 + 17);
    assert_eq!(stat(&envoy, "orders.calls"), 63);
    assert_eq!(stat(&envoy, "orders.failures"), 20);
}

#[test]
fn per_host_scope_one_failing_host_of_three_opens_only_its_breaker() {
    let backend = Upstream::start("backend").unwrap();
    let hosts: Vec<Upstream> = ["a", "b", "c"]
        .iter()
        .map(|n| Upstream::start(n).unwrap())
        .collect();
    hosts[0].set_mode(Mode::fail(500));
    let envoy = config(&backend).start().unwrap();
    let to = |h: &Upstream, i: usize| {
        Request::get(&format!("/hosts/{i}")).header(
            "x-envoy-original-dst-host",
            &format!("127.0.0.1:{}", h.port()),
        )
    };
    for i in 0..12 {
        for (n, h) in hosts.iter().enumerate() {
            let r = envoy.send(to(h, i)).unwrap();
            match n {
                0 if i < 5 => assert_eq!(r.status, 500, "call {i} to the failing host passes"),
                0 => assert!(is_open_reply(&r), "call {i}: {} {}", r.status, r.text()),
                _ => assert_eq!((r.status, r.text()), (200, h.name().to_string())),
            }
        }
    }
    assert_eq!(hosts[0].total(), 5, "min_calls, then nothing");
    assert_eq!(hosts[1].total(), 12);
    assert_eq!(hosts[2].total(), 12);
    let port = hosts[0].port();
    envoy
        .wait_for_log(
            &format!("keel circuit_breaker: breaker per-host (host 127.0.0.1:{port}): closed -> open: 5 of 5 calls failed; open for 30s"),
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(stat(&envoy, "per-host.opened"), 1);
    assert_eq!(stat(&envoy, "per-host.open"), 1);
    assert_eq!(
        stat(&envoy, &format!("per-host.host.127_0_0_1_{port}.state")),
        1
    );
    assert_eq!(stat(&envoy, "per-host.rejected"), 7);
}

#[test]
fn the_fallback_serves_the_cached_body_while_open() {
    let upstream = Upstream::start("backend").unwrap();
    let envoy = config(&upstream).start().unwrap();
    let good = envoy.get("/catalog/1").unwrap();
    assert_eq!((good.status, good.text()), (200, "backend".to_string()));

    // With the good call, four failures make five calls (min_calls), 80 % failed.
    upstream.set_mode(Mode::fail(500));
    for i in 0..4 {
        assert_eq!(envoy.get("/catalog/2").unwrap().status, 500, "call {i}");
    }
    assert_eq!(upstream.total(), 5);
    // Open: the cached body for the path that had one, on either worker; the open reply
    // otherwise. The upstream sees none of it.
    for _ in 0..4 {
        let r = envoy.get("/catalog/1").unwrap();
        assert_eq!((r.status, r.text()), (200, "backend".to_string()));
        assert_eq!(r.header("x-keel-fallback"), Some("catalog"));
        assert_eq!(r.header("x-upstream"), Some("backend"));
        let age: u64 = r.header("age").unwrap().parse().unwrap();
        assert!(age <= 60);
        assert!(is_open_reply(&envoy.get("/catalog/2").unwrap()));
    }
    let post = envoy.send(Request::post("/catalog/1", "x")).unwrap();
    assert!(is_open_reply(&post), "a POST gets no fallback");
    assert_eq!(upstream.total(), 5);
    assert_eq!(stat(&envoy, "catalog.fallback_served"), 4);
    assert_eq!(stat(&envoy, "catalog.rejected"), 9);
}

#[test]
fn envoy_answers_for_a_closed_connection_count_as_resets() {
    // Only the upstream's own 500s are status failures here: Envoy's 503 for a connection
    // closed without an answer (flag UC) counts because resets are failures.
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::Close);
    let envoy = config(&upstream)
        .replace(
            r#""min_calls": 5, "open_for": "30s", "fallback""#,
            r#""min_calls": 5, "open_for": "30s", "failure": {"statuses": [500]}, "fallback""#,
        )
        .start()
        .unwrap();
    for i in 0..5 {
        let r = envoy.get(&format!("/catalog/{i}")).unwrap();
        assert_eq!(r.status, 503, "Envoy answers for the upstream");
        assert!(!is_open_reply(&r));
    }
    assert!(is_open_reply(&envoy.get("/catalog/9").unwrap()));
    assert_eq!(stat(&envoy, "catalog.failures"), 5);
    envoy
        .wait_for_log(
            "keel circuit_breaker: breaker catalog: closed -> open: 5 of 5 calls failed; open for 30s",
            Duration::from_secs(2),
        )
        .unwrap();
}

#[test]
fn a_probe_whose_client_leaves_gives_its_permit_back() {
    let upstream = Upstream::start("backend").unwrap();
    upstream.set_mode(Mode::fail(500));
    let envoy = config(&upstream)
        .replace(
            MINIMAL,
            r#"{"breakers": [{"name": "orders", "min_calls": 2, "open_for": "1s", "half_open_probes": 1}]}"#,
        )
        .start()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(envoy.get("/orders").unwrap().status, 500);
    }
    assert!(is_open_reply(&envoy.get("/orders").unwrap()));
    thread::sleep(Duration::from_millis(1100));
    // The one probe stalls upstream and its client gives up: Envoy flags the stream DC.
    upstream.set_mode(Mode::Stall(Duration::from_secs(10)));
    let gave_up = envoy.send(Request::get("/orders/probe").timeout(Duration::from_millis(300)));
    assert!(gave_up.is_err(), "the client timed out");
    assert_eq!(upstream.total(), 3, "the probe reached the upstream");
    // Its permit came back (the probe timeout is 15 s): the next request is the probe.
    upstream.set_mode(Mode::Normal);
    let mut probe = None;
    for _ in 0..50 {
        let r = envoy.get("/orders/next").unwrap();
        if r.status == 200 {
            probe = Some(r);
            break;
        }
        assert!(is_open_reply(&r));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(probe.is_some(), "a new probe was admitted");
    envoy
        .wait_for_log(
            "keel circuit_breaker: breaker orders: half_open -> closed: 0 of 1 probes failed, 0 slow",
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(stat(&envoy, "orders.probes"), 2);
}

#[test]
fn a_breaker_on_a_direct_response_route_works() {
    // The benchmark's "breaker closed" scenario: no upstream at all, the route answers itself;
    // every answer is a successful call through a closed breaker.
    let upstream = Upstream::start("backend").unwrap();
    let envoy = config(&upstream)
        .replace(
            "match: { prefix: \"/orders\" }\n                route: { cluster: backend }",
            "match: { prefix: \"/orders\" }\n                direct_response: { status: 200, body: { inline_string: \"ok\" } }",
        )
        .start()
        .unwrap();
    let responses = all(&envoy, (0..200).map(|_| Request::get("/orders")), 4);
    assert!(responses
        .iter()
        .all(|r| r.status == 200 && r.text() == "ok"));
    assert_eq!(upstream.total(), 0);
    assert_eq!(stat(&envoy, "orders.calls"), 200);
    assert_eq!(stat(&envoy, "orders.state"), 0);
    assert_eq!(stat(&envoy, "orders.store_errors"), 0);
}

#[test]
fn a_bad_configuration_makes_envoy_refuse_the_filter_with_our_message() {
    let upstream = Upstream::start("backend").unwrap();
    let log = config(&upstream)
        .replace(MINIMAL, &MINIMAL.replace("0.5", "1.5"))
        .start_expect_failure()
        .unwrap();
    assert!(
        log.contains("keel circuit_breaker: breakers[0].failure_rate: must be in (0, 1], got 1.5; configuration refused"),
        "{log}"
    );
}
