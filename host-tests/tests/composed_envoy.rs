//! The composed scenario of `make demo` as an end-to-end test: `envoy/composed.yaml` as written
//! (all five Keel filters, one listener, a mix per route) in a real Envoy (`--concurrency 2`), a
//! real etcd and real upstreams that register themselves with leases (the etcd rig), plus a
//! plain upstream for `/static/`. Needs `make setup build`.
//!
//! One test walks the demo's four phases in order, because each starts from the state the
//! previous one leaves (as the demo does), and asserts what each must show:
//! steady (all 200, spread over the upstreams), a failing upstream (its per-host breaker opens,
//! clients see few errors thanks to retries and failover), a burst over the rate limit (429 with
//! Retry-After on /api/, /static/ untouched), a membership change (only the joining and the
//! leaving instance's keys move). Every wait is bounded; no assertion is on timing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{wait_for, Envoy, EnvoyConfig, Request, Response};
use keel_host_tests::etcd::{
    discovery_status, known_addresses, routable_addresses, RegisteredService,
};
use keel_host_tests::module_path;
use keel_host_tests::upstream::{Mode, Upstream};

const YAML: &str = "envoy/composed.yaml";
const ADMIN: &str = "/keel/discovery";
const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

fn counter(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).unwrap()
}

fn routable(envoy: &Envoy) -> BTreeSet<String> {
    discovery_status(envoy.client(), ADMIN)
        .map(|s| routable_addresses(&s, "users").into_iter().collect())
        .unwrap_or_default()
}

fn known(envoy: &Envoy) -> BTreeSet<String> {
    discovery_status(envoy.client(), ADMIN)
        .map(|s| known_addresses(&s, "users").into_iter().collect())
        .unwrap_or_default()
}

/// Waits (bounded) until `check` holds; the message says what was awaited.
fn wait_until(what: &str, envoy: &Envoy, check: impl Fn() -> bool) {
    assert!(
        wait_for(Instant::now(), WAIT, check).is_some(),
        "{what}: not within {WAIT:?}; set: {:?}\n{}",
        discovery_status(envoy.client(), ADMIN).ok(),
        envoy.log()
    );
}

fn users_request(key: &str) -> Request {
    Request::get(&format!("/users/{key}")).header("x-user", key)
}

fn api_request(i: usize, key: &str) -> Request {
    Request::get(&format!("/api/orders/{i}")).header("x-api-key", key)
}

/// Answers in order; a request without an answer is a test failure (Envoy always answers).
fn send(envoy: &Envoy, requests: Vec<Request>, concurrency: usize) -> Vec<Response> {
    envoy
        .send_all(requests, concurrency)
        .into_iter()
        .map(|r| r.expect("Envoy answers every request"))
        .collect()
}

/// Which upstream answers each key (`x-upstream`), one request per key.
fn key_map(envoy: &Envoy, keys: &[String]) -> Vec<String> {
    send(envoy, keys.iter().map(|k| users_request(k)).collect(), 8)
        .into_iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            r.header("x-upstream").unwrap_or("?").to_string()
        })
        .collect()
}

fn tally<'a>(names: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n.clone()).or_default() += 1;
    }
    t
}

#[test]
fn the_demo_scenario_steady_failure_burst_and_membership_change() {
    for module in [
        "rate_limit",
        "circuit_breaker",
        "retry",
        "picker",
        "discovery",
    ] {
        assert!(
            module_path(module).is_file(),
            "build dist/keel_{module}.wasm first (make build)"
        );
    }
    let mut users = RegisteredService::start("users", 3, TTL).expect("etcd and three instances");
    let statics = Upstream::start("static").unwrap();
    let envoy = users
        .remap(
            EnvoyConfig::from_file(YAML).unwrap(),
            &[18091, 18092, 18093],
        )
        .port(18080, statics.port())
        .concurrency(2)
        .start()
        .expect("Envoy starts with envoy/composed.yaml");
    wait_until("3 routable endpoints", &envoy, || {
        routable(&envoy).len() == 3
    });

    // --- a. steady state: every request answered 200, spread over the upstreams.
    let user_keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let steady_users = key_map(&envoy, &user_keys);
    let spread = tally(&steady_users);
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n >= 40), "{spread:?}");
    // 30 API keys, 10 requests each: under the 20-request bucket of every key.
    let api: Vec<Request> = (0..300)
        .map(|i| api_request(i, &format!("key-{}", i % 30)))
        .collect();
    let answers = send(&envoy, api, 8);
    assert!(
        answers.iter().all(|r| r.status == 200),
        "{:?}",
        tally(
            &answers
                .iter()
                .map(|r| r.status.to_string())
                .collect::<Vec<_>>()
        )
    );
    let api_spread = tally(
        &answers
            .iter()
            .map(|r| r.header("x-upstream").unwrap_or("?").to_string())
            .collect::<Vec<_>>(),
    );
    assert_eq!(api_spread.len(), 3, "{api_spread:?}");
    let statics_ok = send(
        &envoy,
        (0..20)
            .map(|i| Request::get(&format!("/static/{i}.js")))
            .collect(),
        4,
    );
    assert!(statics_ok
        .iter()
        .all(|r| r.status == 200 && r.text() == "static"));

    // --- b. users-2 starts failing: 500 to requests, 503 to health checks.
    let failing = users.instance(1);
    let failing_addr = failing.address();
    let failing_name = failing.name().to_string();
    let opened_before = counter(&envoy, "wasmcustom.keel.circuit_breaker.users-host.opened");
    failing.upstream.set_mode(Mode::fail(500));
    failing.upstream.set_healthy(false);
    // Traffic in rounds until discovery has taken it out (bounded by WAIT), then one more round.
    let mut users_answers = Vec::new();
    let mut api_answers = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut round = 0;
    loop {
        let out = !routable(&envoy).contains(&failing_addr);
        users_answers.extend(send(
            &envoy,
            user_keys.iter().map(|k| users_request(k)).collect(),
            8,
        ));
        api_answers.extend(send(
            &envoy,
            (0..60)
                .map(|i| api_request(i, &format!("key-b{round}-{}", i % 10)))
                .collect(),
            8,
        ));
        round += 1;
        if out {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{failing_addr} still routable after {WAIT:?}\n{}",
            envoy.log()
        );
    }
    let opened = envoy
        .wait_for_counter(
            "wasmcustom.keel.circuit_breaker.users-host.opened",
            opened_before + 1,
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        opened > opened_before,
        "the per-host breaker of {failing_addr} never opened\n{}",
        envoy.log()
    );
    assert!(
        envoy.log().contains(&format!(
            "breaker users-host (host {failing_addr}): closed -> open"
        )),
        "{}",
        envoy.log()
    );
    let errors = |answers: &[Response]| answers.iter().filter(|r| r.status != 200).count();
    let statuses = |answers: &[Response]| {
        tally(
            &answers
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.status,
                        r.header("x-keel-attempts").unwrap_or("-")
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    println!("/users/ status, attempts: {:?}", statuses(&users_answers));
    println!("/api/ status, attempts: {:?}", statuses(&api_answers));
    let (users_errors, api_errors) = (errors(&users_answers), errors(&api_answers));
    println!(
        "failing upstream: {round} rounds; /users/ errors {users_errors}/{}; /api/ errors {api_errors}/{}; retries users {} api {}",
        users_answers.len(),
        api_answers.len(),
        counter(&envoy, "wasmcustom.keel.retry.users.retries"),
        counter(&envoy, "wasmcustom.keel.retry.api.retries"),
    );
    println!(
        "pool: outlier ejections {}",
        counter(
            &envoy,
            "cluster.pool.outlier_detection.ejections_enforced_total"
        ),
    );
    // Without Keel a third of the /users/ keys (and of /api/) would fail for the whole phase.
    // With retries through the pool a request still fails when both of its retries land on the
    // failing upstream too (about 1 in 9 retried requests) until Envoy's outlier detection takes it
    // out of the pool: a few percent, under this test's unpaced load (bounded at 10 % here,
    // against 33 % without Keel), and none once both discovery and the pool have dropped it.
    assert!(
        users_errors * 10 <= users_answers.len(),
        "more than 10 % of /users/ failed: {users_errors}/{}",
        users_answers.len()
    );
    assert!(
        api_errors * 10 <= api_answers.len(),
        "more than 10 % of /api/ failed: {api_errors}/{}",
        api_answers.len()
    );
    wait_until(
        "the pool's outlier detection ejects the failing upstream",
        &envoy,
        || counter(&envoy, "cluster.pool.outlier_detection.ejections_active") == 1,
    );
    let users_after = send(
        &envoy,
        user_keys.iter().map(|k| users_request(k)).collect(),
        8,
    );
    let api_after = send(
        &envoy,
        (0..60)
            .map(|i| api_request(i, &format!("key-after-{}", i % 10)))
            .collect(),
        8,
    );
    assert_eq!(errors(&users_after), 0, "{:?}", statuses(&users_after));
    assert_eq!(errors(&api_after), 0, "{:?}", statuses(&api_after));
    assert!(counter(&envoy, "wasmcustom.keel.retry.users.recovered") > 0);
    // Failed over: its keys go to the others, every other key stays where it was.
    let failed_over = key_map(&envoy, &user_keys);
    for ((key, was), now) in user_keys.iter().zip(&steady_users).zip(&failed_over) {
        assert_ne!(
            now, &failing_name,
            "{key} still goes to the failing upstream"
        );
        if was != &failing_name {
            assert_eq!(now, was, "{key} moved although {was} is healthy");
        }
    }
    // Recovery: healthy again, its keys come back; the breaker closes on good probes.
    failing.upstream.set_mode(Mode::Normal);
    failing.upstream.set_healthy(true);
    wait_until("3 routable endpoints again", &envoy, || {
        routable(&envoy).len() == 3
    });
    let deadline = Instant::now() + WAIT;
    while counter(&envoy, "wasmcustom.keel.circuit_breaker.users-host.closed") == 0 {
        // Requests keep arriving for its keys: the first after the open period is a probe.
        let _ = send(
            &envoy,
            user_keys
                .iter()
                .take(60)
                .map(|k| users_request(k))
                .collect(),
            4,
        );
        assert!(
            Instant::now() < deadline,
            "the breaker never closed\n{}",
            envoy.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(key_map(&envoy, &user_keys), steady_users);

    // --- c. a burst over the /api/ rate limit on one key, with /static/ requests interleaved.
    let burst: Vec<Request> = (0..200)
        .map(|i| {
            if i % 4 == 3 {
                Request::get(&format!("/static/b{i}.js"))
            } else {
                api_request(i, "mallory")
            }
        })
        .collect();
    let answers = send(&envoy, burst, 8);
    let (mut allowed, mut limited, mut static_ok) = (0, 0, 0);
    for (i, r) in answers.iter().enumerate() {
        if i % 4 == 3 {
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, "static"),
                "/static/ is untouched by the burst"
            );
            static_ok += 1;
        } else if r.status == 429 {
            limited += 1;
            let retry_after: u64 = r
                .header("retry-after")
                .expect("a 429 carries Retry-After")
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry_after), "retry-after {retry_after}");
            assert!(r
                .header("ratelimit-policy")
                .is_some_and(|p| p.contains("\"api-key\";q=20")));
        } else {
            assert_eq!(r.status, 200, "{}", r.text());
            allowed += 1;
        }
    }
    println!("burst: {allowed} allowed, {limited} refused, /static/ {static_ok} OK");
    assert!(
        allowed >= 20,
        "the bucket of 20 starts full: {allowed} allowed"
    );
    assert!(
        limited >= 75,
        "150 requests on one key over 20/s: {limited} refused"
    );
    // Counters may be published on the VM's next tick.
    let counted = envoy
        .wait_for_counter(
            "wasmcustom.keel.rate_limit.api-key.limited",
            limited as u64,
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(counted >= limited as u64, "{counted} < {limited}");
    // Another key is not affected by mallory's burst.
    assert_eq!(envoy.send(api_request(0, "alice")).unwrap().status, 200);

    // --- d. membership change: a fourth instance joins, then the first leaves.
    let member_keys: Vec<String> = (0..600).map(|i| format!("member-{i}")).collect();
    let before = key_map(&envoy, &member_keys);
    let joined = users.add().unwrap().name().to_string();
    wait_until("4 routable endpoints", &envoy, || {
        routable(&envoy).len() == 4
    });
    let after_join = key_map(&envoy, &member_keys);
    let moved_join: Vec<usize> = (0..member_keys.len())
        .filter(|&i| after_join[i] != before[i])
        .collect();
    for &i in &moved_join {
        assert_eq!(
            after_join[i], joined,
            "{} moved to {}, not to the new instance",
            member_keys[i], after_join[i]
        );
    }
    let share = moved_join.len() as f64 / member_keys.len() as f64;
    println!(
        "join: {} of {} keys moved ({:.1} %, expected about 25 %)",
        moved_join.len(),
        member_keys.len(),
        share * 100.0
    );
    assert!((0.15..=0.35).contains(&share), "{share}");

    let leaving = users.instance(0).address();
    let leaving_name = users.instance(0).name().to_string();
    users.instance_mut(0).registration.deregister().unwrap();
    wait_until("the leaving instance gone from the set", &envoy, || {
        !known(&envoy).contains(&leaving)
    });
    users.instance(0).upstream.stop();
    let after_leave = key_map(&envoy, &member_keys);
    let held: Vec<usize> = (0..member_keys.len())
        .filter(|&i| after_join[i] == leaving_name)
        .collect();
    let moved_leave: Vec<usize> = (0..member_keys.len())
        .filter(|&i| after_leave[i] != after_join[i])
        .collect();
    println!(
        "leave: {} keys moved; {leaving_name} held {}",
        moved_leave.len(),
        held.len()
    );
    assert_eq!(
        moved_leave, held,
        "exactly the keys of the instance that left moved"
    );
    let share = held.len() as f64 / member_keys.len() as f64;
    assert!((0.15..=0.35).contains(&share), "{share}");
    assert!(!after_leave.contains(&leaving_name));
}
