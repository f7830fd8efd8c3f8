//! Discovery and picker composed in one real Envoy (`--concurrency 2`), as an operator runs
//! them: `envoy/discovery-picker.yaml` as written (only its ports moved), a real etcd and three
//! real upstreams that register themselves with leases. Discovery publishes the `users` set in
//! shared data; the picker hashes `x-user` over it and routes through an `ORIGINAL_DST`
//! cluster. Needs `dist/keel_discovery.wasm`, `dist/keel_picker.wasm` and `/usr/bin/etcd`
//! (`make setup build`).
//!
//! Every test starts its own etcd, upstreams and Envoy on free ports, so they run in parallel.
//! Traffic is paced and bounded in count and time ([`Load`]); who served what is read from the
//! upstreams' own logs. Timing bounds are those the configuration promises (TTL + refresh,
//! unhealthy_threshold × interval + interval) plus [`SLACK`] for a loaded machine; each test
//! prints what it measured (`cargo test -p keel-host-tests --test discovery_picker_envoy --
//! --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{wait_for, Client, Envoy, EnvoyConfig, Request};
use keel_host_tests::etcd::{
    discovery_status, known_addresses, routable_addresses, RegisteredService,
};
use keel_host_tests::module_path;
use keel_host_tests::upstream::Upstream;

const YAML: &str = "envoy/discovery-picker.yaml";
const ADMIN: &str = "/keel/discovery";
/// The lease TTL the instances register with.
const TTL: Duration = Duration::from_secs(3);
/// As in the YAML: `refresh`, the check `interval` and `unhealthy_threshold`.
const REFRESH: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_secs(1);
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 1;
/// Added to every timing bound: the machine runs other builds and these tests in parallel on
/// two cores, so a tick, a callout or a request can be late by much more than on an idle one.
const SLACK: Duration = Duration::from_secs(2);

/// etcd, three registered instances and Envoy running the YAML, once all three are routable.
fn rig() -> (RegisteredService, Envoy) {
    for module in ["discovery", "picker"] {
        assert!(
            module_path(module).is_file(),
            "build dist/keel_{module}.wasm first (make build)"
        );
    }
    let users = RegisteredService::start("users", 3, TTL).expect("etcd and three instances");
    let envoy = users
        .remap(EnvoyConfig::from_file(YAML).unwrap(), &[])
        .concurrency(2)
        .start()
        .expect("Envoy starts");
    let all = sorted(users.addresses());
    let ready = wait_for(Instant::now(), Duration::from_secs(20), || {
        routable(&envoy) == all
    })
    .unwrap_or_else(|| panic!("never published: {:?}\n{}", status(&envoy), envoy.log()));
    println!("three registered instances routable {ready:?} after Envoy was ready");
    (users, envoy)
}

fn status(envoy: &Envoy) -> serde_json::Value {
    discovery_status(envoy.client(), ADMIN).expect("the admin path answers")
}

fn routable(envoy: &Envoy) -> Vec<String> {
    sorted(routable_addresses(&status(envoy), "users"))
}

fn known(envoy: &Envoy) -> Vec<String> {
    sorted(known_addresses(&status(envoy), "users"))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A counter or gauge of the discovery filter for `users` (0 until defined).
fn discovery_stat(envoy: &Envoy, what: &str) -> u64 {
    envoy
        .stat(&format!("wasmcustom.keel.discovery.users.{what}"))
        .unwrap()
}

/// When an upstream received its last request (health checks are not counted).
fn last_arrival(upstream: &Upstream) -> Option<Instant> {
    upstream.received().last().map(|r| r.at)
}

/// When an upstream received its first request after `since`.
fn first_arrival_after(upstream: &Upstream, since: Instant) -> Option<Instant> {
    upstream
        .received()
        .iter()
        .map(|r| r.at)
        .find(|at| *at > since)
}

// ----- traffic -----

/// One request of a [`Load`].
#[derive(Debug)]
struct Outcome {
    /// When its batch's responses (or errors) were all in: a few milliseconds after its own.
    at: Instant,
    /// The status, or the error.
    result: Result<u16, String>,
    /// The `x-upstream` header: which instance answered.
    upstream: Option<String>,
}

/// Paced traffic with a new `x-user` key per request, from a thread of its own, until stopped,
/// `limit` passes or [`Load::MAX_REQUESTS`] are sent: batches of [`Load::BATCH`] requests,
/// [`Load::CONCURRENCY`] at a time, then a [`Load::PAUSE`]. On an idle machine that is a
/// few hundred requests a second: enough for each instance to see one every few milliseconds
/// (the resolution of the measured times), little enough not to starve the other tests.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    const BATCH: usize = 6;
    const CONCURRENCY: usize = 3;
    const PAUSE: Duration = Duration::from_millis(20);
    const MAX_REQUESTS: usize = 60_000;
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn start(envoy: &Envoy, tag: &str, limit: Duration) -> Load {
        let client: Client = envoy.client().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let tag = tag.to_string();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("load {tag}"))
                .spawn(move || {
                    let started = Instant::now();
                    let mut outcomes = Vec::new();
                    let mut n = 0usize;
                    while !stop.load(Ordering::SeqCst)
                        && started.elapsed() < limit
                        && n < Load::MAX_REQUESTS
                    {
                        let requests: Vec<Request> = (n..n + Load::BATCH)
                            .map(|i| {
                                Request::get("/users")
                                    .header("x-user", &format!("{tag}-{i}"))
                                    .timeout(Load::REQUEST_TIMEOUT)
                            })
                            .collect();
                        n += Load::BATCH;
                        let results = client.send_all_within(
                            requests,
                            Load::CONCURRENCY,
                            Load::REQUEST_TIMEOUT * 2,
                        );
                        let at = Instant::now();
                        outcomes.extend(results.into_iter().map(|r| match r {
                            Ok(r) => Outcome {
                                at,
                                result: Ok(r.status),
                                upstream: r.header("x-upstream").map(str::to_string),
                            },
                            Err(e) => Outcome {
                                at,
                                result: Err(format!("{e:#}")),
                                upstream: None,
                            },
                        }));
                        thread::sleep(Load::PAUSE);
                    }
                    outcomes
                })
                .expect("a load thread")
        };
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the traffic and returns every request's outcome, in order.
    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("the load thread"))
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asserts that every request got a 200; `what` names the phase.
fn assert_all_ok(outcomes: &[Outcome], what: &str) {
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed; first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
}

/// Requests answered per instance name.
fn tally(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for o in outcomes {
        let name = o.upstream.clone().unwrap_or_else(|| "(none)".to_string());
        *t.entry(name).or_default() += 1;
    }
    t
}

// ----- the tests -----

#[test]
fn varied_keys_spread_over_the_three_registered_instances_and_each_key_sticks() {
    let (users, envoy) = rig();
    let before: Vec<u64> = users
        .instances()
        .iter()
        .map(|i| i.upstream.total())
        .collect();

    let keys: Vec<String> = (0..600).map(|i| format!("user-{i}")).collect();
    let send = |keys: &[String]| -> Vec<String> {
        envoy
            .send_all(
                keys.iter()
                    .map(|k| Request::get("/users").header("x-user", k)),
                4,
            )
            .into_iter()
            .map(|r| {
                let r = r.expect("every request gets an answer");
                assert_eq!(r.status, 200, "{}", r.text());
                r.header("x-upstream")
                    .expect("an instance answered")
                    .to_string()
            })
            .collect()
    };
    let first = send(&keys);

    // The instances' own counters: each got a fair share of 600 distinct keys (a ring of 512
    // points per instance keeps each near a third).
    let hits: Vec<u64> = users
        .instances()
        .iter()
        .zip(&before)
        .map(|(i, b)| i.upstream.total() - b)
        .collect();
    let shares: Vec<String> = users
        .instances()
        .iter()
        .zip(&hits)
        .map(|(i, h)| format!("{} ({}): {h}", i.name(), i.address()))
        .collect();
    println!("600 requests with distinct keys: {}", shares.join(", "));
    assert_eq!(hits.iter().sum::<u64>(), 600);
    for (instance, h) in users.instances().iter().zip(&hits) {
        assert!(
            (120..=280).contains(h),
            "{} got {h} of 600: {shares:?}",
            instance.name()
        );
    }

    // The same keys again: every key lands on the same instance.
    let second = send(&keys);
    let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count();
    assert_eq!(moved, 0, "{moved} keys moved with an unchanged set");
    assert_eq!(
        envoy
            .counter("wasmcustom.keel.picker.users.no_host")
            .unwrap(),
        0
    );
}

#[test]
fn an_instance_whose_lease_lapses_stops_getting_traffic_within_ttl_and_one_refresh() {
    let (mut users, envoy) = rig();
    let gone = users.instance(0).address();
    let bound = TTL + REFRESH + SLACK;
    // Traffic before, during and well after the bound, so that "no more requests" is seen
    // while the others keep serving.
    let observe = bound + Duration::from_secs(3);
    let load = Load::start(&envoy, "lapse", observe + Duration::from_secs(5));
    thread::sleep(Duration::from_millis(500));

    let lapsed_at = Instant::now();
    let last_keepalive = users.instance_mut(0).registration.lapse();
    thread::sleep(observe.saturating_sub(last_keepalive.elapsed()));
    let outcomes = load.finish();

    assert_all_ok(&outcomes, "while the lease lapsed");
    let last =
        last_arrival(&users.instance(0).upstream).expect("it served before its lease lapsed");
    let since_keepalive = last.saturating_duration_since(last_keepalive);
    let since_lapse = last.saturating_duration_since(lapsed_at);
    println!(
        "lease lapsed: last request served {since_keepalive:?} after the last keepalive \
         ({since_lapse:?} after lapse() was called; TTL {TTL:?}, refresh {REFRESH:?}, \
         bound {bound:?}); {} requests, per instance {:?}",
        outcomes.len(),
        tally(&outcomes)
    );
    assert!(
        since_keepalive <= bound,
        "served {since_keepalive:?} after its last keepalive"
    );
    // It kept its traffic while its lease lived (etcd deletes the key one TTL after the last
    // keepalive; a second's margin for the keepalive's own round trip under load).
    assert!(
        since_keepalive + Duration::from_secs(1) >= TTL,
        "lost its traffic {since_keepalive:?} after its last keepalive, before the lease lapsed"
    );
    // The others carried the traffic to the end of the observation.
    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > last_keepalive + bound)
        .collect();
    assert!(
        after.len() >= 20,
        "only {} requests after the bound: the observation proves nothing",
        after.len()
    );
    assert!(after
        .iter()
        .all(|o| o.upstream.as_deref() != Some(users.instance(0).name())));
    assert!(!known(&envoy).contains(&gone), "{:?}", status(&envoy));
}

#[test]
fn an_instance_failing_its_health_check_loses_its_traffic_and_gets_it_back() {
    let (users, envoy) = rig();
    let sick = users.instance(1);
    let control = Client::new(sick.upstream.addr());
    let set_health = |up: bool| {
        let r = control
            .send(Request::post(
                "/__keel/health",
                format!(r#"{{"up": {up}}}"#),
            ))
            .expect("the control endpoint answers");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let bound = INTERVAL * UNHEALTHY_THRESHOLD + INTERVAL + SLACK;
    let observe = bound + Duration::from_secs(3);

    let load = Load::start(&envoy, "sick", observe + Duration::from_secs(5));
    thread::sleep(Duration::from_millis(500));
    let failing_since = Instant::now();
    set_health(false);
    thread::sleep(observe);
    let outcomes = load.finish();

    assert_all_ok(&outcomes, "while an instance failed its checks");
    let last = last_arrival(&sick.upstream).expect("it served before");
    let out = last.saturating_duration_since(failing_since);
    println!(
        "health check failing: last request served {out:?} after /healthz turned 503 \
         (unhealthy_threshold {UNHEALTHY_THRESHOLD} x interval {INTERVAL:?} + interval; \
         bound {bound:?}); {} requests, per instance {:?}",
        outcomes.len(),
        tally(&outcomes)
    );
    assert!(
        out <= bound,
        "served {out:?} after its checks started failing"
    );
    let after: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > failing_since + bound)
        .collect();
    assert!(
        after.len() >= 20,
        "only {} requests after the bound",
        after.len()
    );
    assert!(after
        .iter()
        .all(|o| o.upstream.as_deref() != Some(sick.name())));
    // Known but not routable: it is still checked, so it can come back.
    assert!(known(&envoy).contains(&sick.address()));
    assert!(!routable(&envoy).contains(&sick.address()));

    // Healthy again: one passing check (healthy_threshold 1) within an interval, then traffic.
    let back_bound = INTERVAL * HEALTHY_THRESHOLD + INTERVAL + SLACK;
    let total = sick.upstream.total();
    let load = Load::start(&envoy, "healed", back_bound + Duration::from_secs(10));
    thread::sleep(Duration::from_millis(300));
    let healthy_since = Instant::now();
    set_health(true);
    let seen = wait_for(healthy_since, back_bound + Duration::from_secs(5), || {
        sick.upstream.total() > total
    });
    let outcomes = load.finish();
    assert_all_ok(&outcomes, "while an instance came back");
    assert!(
        seen.is_some(),
        "no traffic {:?} after its checks pass again: {:?}",
        back_bound + Duration::from_secs(5),
        status(&envoy)
    );
    let first = first_arrival_after(&sick.upstream, healthy_since).expect("it served again");
    let back = first.saturating_duration_since(healthy_since);
    println!(
        "health check passing again: first request served {back:?} after /healthz turned 200 \
         (bound {back_bound:?})"
    );
    assert!(back <= back_bound, "traffic again only after {back:?}");
}

#[test]
fn an_etcd_outage_of_30s_keeps_every_request_served_and_a_new_instance_joins_after() {
    let (mut users, envoy) = rig();
    let outage = Duration::from_secs(30);

    let failed_before = discovery_stat(&envoy, "refresh_failed");
    users.etcd().stop();
    let down_at = Instant::now();
    let load = Load::start(&envoy, "outage", outage);
    // Watch the published set now and then, as an operator would.
    let mut stale_seen = false;
    while down_at.elapsed() < outage {
        thread::sleep(Duration::from_secs(2));
        let doc = status(&envoy);
        assert_eq!(
            sorted(routable_addresses(&doc, "users")),
            sorted(users.addresses()),
            "the last known set serves"
        );
        stale_seen |= doc["services"][0]["freshness"] == "stale";
    }
    let outcomes = load.finish();
    let down_for = down_at.elapsed();
    let failed = discovery_stat(&envoy, "refresh_failed") - failed_before;
    let per_instance = tally(&outcomes);
    println!(
        "etcd down {down_for:?}: {} requests, all 200: {}; per instance {per_instance:?}; \
         {failed} failed refreshes (backing off)",
        outcomes.len(),
        outcomes.iter().all(|o| o.result == Ok(200))
    );
    assert_all_ok(&outcomes, "during the etcd outage");
    assert!(outcomes.len() >= 300, "only {} requests", outcomes.len());
    // Served by the whole last known set, not a remnant of it.
    for instance in users.instances() {
        assert!(
            per_instance.get(instance.name()).copied().unwrap_or(0) >= 30,
            "{per_instance:?}"
        );
    }
    assert!(
        outcomes
            .last()
            .is_some_and(|o| o.at >= down_at + outage - Duration::from_secs(2)),
        "the traffic did not last the outage"
    );
    assert!(
        stale_seen,
        "the set was never flagged stale: {:?}",
        status(&envoy)
    );

    // etcd comes back (same data; it extends the leases) and a fourth instance registers.
    let restarting = Instant::now();
    users.etcd().restart().expect("etcd restarts");
    let back_at = Instant::now();
    let newcomer = users
        .add()
        .expect("a fourth instance registers")
        .name()
        .to_string();
    let load = Load::start(&envoy, "back", Duration::from_secs(45));
    let joined = wait_for(back_at, Duration::from_secs(40), || {
        users.instance(3).upstream.total() > 0
    });
    let outcomes = load.finish();
    assert_all_ok(&outcomes, "after etcd came back");
    let joined = joined.unwrap_or_else(|| {
        panic!(
            "{newcomer} got no traffic within 40 s of etcd's return: {:?}",
            status(&envoy)
        )
    });
    println!(
        "etcd back (healthy {:?} after the restart began): {newcomer} registered and got its \
         first request {joined:?} after etcd was healthy (refresh backoff is capped at 10 x \
         refresh)",
        back_at - restarting
    );
    let mut all = users.addresses();
    all.sort();
    assert_eq!(routable(&envoy), all);
}

#[test]
fn the_etcd_cluster_sees_one_poller_for_the_whole_process() {
    let (_users, envoy) = rig();
    let window = Duration::from_secs(10);
    // Traffic on both workers meanwhile: serving requests must not make anyone else poll.
    let load = Load::start(&envoy, "poller", window + Duration::from_secs(5));
    let before = envoy.counter("cluster.etcd.upstream_rq_total").unwrap();
    let started = Instant::now();
    thread::sleep(window);
    let polls = envoy.counter("cluster.etcd.upstream_rq_total").unwrap() - before;
    let measured = started.elapsed();
    let outcomes = load.finish();
    assert_all_ok(&outcomes, "while counting polls");

    let expected = measured.as_secs_f64() / REFRESH.as_secs_f64();
    let acquired = envoy
        .counter("wasmcustom.keel.discovery.poller.acquired")
        .unwrap();
    println!(
        "one poller: {polls} etcd requests in {measured:?} (one poller at refresh {REFRESH:?}: \
         {expected:.1}; ratio {:.2}); poller.acquired {acquired}; {} requests served meanwhile",
        polls as f64 / expected,
        outcomes.len()
    );
    assert!(
        (polls as f64) < 1.5 * expected,
        "{polls} etcd requests in {measured:?}: more than one poller"
    );
    assert!(
        (polls as f64) >= 0.5 * expected,
        "{polls} etcd requests in {measured:?}: the poller does not keep its refresh"
    );
}
