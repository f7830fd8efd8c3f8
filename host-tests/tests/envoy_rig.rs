//! The real-Envoy rig and the upstream servers, tested on the real Envoy from `make setup`
//! with `envoy/empty.yaml` (needs `dist/keel_empty.wasm`: `make build`).

use std::thread;
use std::time::{Duration, Instant};

use keel_host_tests::envoy::{self, Client, EnvoyConfig, Request};
use keel_host_tests::module_path;
use keel_host_tests::upstream::{Mode, Upstream};

const EMPTY: &str = "envoy/empty.yaml";

fn require_empty_module() {
    let path = module_path("empty");
    assert!(
        path.is_file(),
        "{} is missing: build it with `make build` (or `cargo build --release --target \
         wasm32-wasip1 -p keel-empty` and copy it to dist/)",
        path.display()
    );
}

/// `envoy/empty.yaml` in front of `upstream`.
fn empty_config(upstream: &Upstream) -> anyhow::Result<EnvoyConfig> {
    require_empty_module();
    Ok(EnvoyConfig::from_file(EMPTY)?.port(18080, upstream.port()))
}

#[test]
fn a_request_passes_through_envoy_and_the_upstream_counts_it() {
    let upstream = Upstream::start("upstream").unwrap();
    let envoy = empty_config(&upstream).unwrap().start().unwrap();
    assert_ne!(envoy.listener_addr().port(), 10000);
    assert_ne!(envoy.admin_addr().port(), 9901);
    assert_eq!(envoy.port(18080), Some(upstream.port()));
    assert!(envoy
        .url("/x")
        .ends_with(&format!("{}/x", envoy.listener_addr())));

    let response = envoy.get("/orders?id=3").unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    assert_eq!(response.text(), "upstream");
    assert_eq!(response.header("x-upstream"), Some("upstream"));
    assert_eq!(upstream.total(), 1);
    assert_eq!(upstream.count_path("/orders"), 1);
    assert_eq!(upstream.count_method("get"), 1);
    let received = upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].query.as_deref(), Some("id=3"));
    // Envoy gives every request an id; retry tests rely on it.
    let id = received[0].request_id().unwrap().to_string();
    assert_eq!(upstream.count_request_id(&id), 1);

    // The route named "bare" switches the wasm filter off and still routes.
    let bare = envoy.get("/bare").unwrap();
    assert_eq!((bare.status, bare.text().as_str()), (200, "upstream"));

    let total = envoy
        .wait_for_counter(
            "cluster.upstream.upstream_rq_total",
            2,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(total, 2);
    assert_eq!(
        envoy.counter("cluster.upstream.upstream_rq_200").unwrap(),
        2
    );
    assert!(envoy.counter("wasm.envoy.wasm.runtime.v8.active").unwrap() >= 1);
    let missing = envoy.counter("cluster.upstream.no_such_stat").unwrap_err();
    assert!(missing.to_string().contains("no stat"), "{missing}");
    assert!(envoy.log().contains("starting main dispatch loop"));
    assert!(envoy.config_path().is_file());

    let log = envoy.stop();
    assert!(log.contains("cluster.upstream") || log.contains("all clusters initialized"));
}

#[test]
fn load_goes_through_a_keep_alive_pool() {
    let upstream = Upstream::start("upstream").unwrap();
    let envoy = empty_config(&upstream).unwrap().start().unwrap();
    let requests = (0..300).map(|i| Request::get(&format!("/load/{}", i % 3)));
    let responses = envoy.send_all(requests, 8);
    assert_eq!(responses.len(), 300);
    for response in &responses {
        assert_eq!(response.as_ref().unwrap().status, 200);
    }
    assert_eq!(upstream.total(), 300);
    assert_eq!(upstream.count_path("/load/0"), 100);
    // Pooled: far fewer downstream connections than requests.
    let connections = envoy.counter("http.ingress.downstream_cx_total").unwrap();
    assert!(
        connections <= 16,
        "{connections} connections for 300 requests"
    );
}

#[test]
fn upstream_modes_answer_as_specified() {
    let upstream = Upstream::start("direct").unwrap();
    let client = Client::new(upstream.addr());

    let ok = client.get("/a").unwrap();
    assert_eq!((ok.status, ok.text().as_str()), (200, "direct"));

    upstream.set_mode(Mode::fail(503).with_header("retry-after", "2"));
    let failed = client.send(Request::post("/a", "body")).unwrap();
    assert_eq!(failed.status, 503);
    assert_eq!(failed.header("Retry-After"), Some("2"));
    assert_eq!(upstream.count_method("POST"), 1);
    assert_eq!(upstream.count_status(503), 1);

    // The first attempt of every request id fails, the next one succeeds.
    upstream.set_mode(Mode::fail_first(1, 502));
    for id in ["r1", "r2"] {
        let first = client
            .send(Request::get("/b").header("x-request-id", id))
            .unwrap();
        let second = client
            .send(Request::get("/b").header("x-request-id", id))
            .unwrap();
        assert_eq!((first.status, second.status), (502, 200));
        assert_eq!(second.header("x-upstream-attempt"), Some("2"));
        assert_eq!(upstream.count_request_id(id), 2);
    }

    upstream.set_mode(Mode::FailRate {
        rate: 1.0,
        status: 500,
    });
    assert_eq!(client.get("/c").unwrap().status, 500);
    upstream.set_mode(Mode::FailRate {
        rate: 0.0,
        status: 500,
    });
    assert_eq!(client.get("/c").unwrap().status, 200);

    upstream.set_mode(Mode::Delay(Duration::from_millis(150)));
    let delayed = client.get("/d").unwrap();
    assert_eq!(delayed.status, 200);
    assert!(
        delayed.elapsed >= Duration::from_millis(150),
        "{:?}",
        delayed.elapsed
    );

    upstream.set_mode(Mode::Close);
    let closed = client.get("/e").unwrap_err();
    assert!(format!("{closed:#}").contains("/e"), "{closed:#}");

    // A stall holds the request, then closes the connection without an answer.
    upstream.set_mode(Mode::Stall(Duration::from_millis(200)));
    let started = Instant::now();
    assert!(client.get("/f").is_err());
    assert!(started.elapsed() >= Duration::from_millis(200));
    upstream.set_mode(Mode::Stall(Duration::from_secs(30)));
    let timed_out = client
        .send(Request::get("/f").timeout(Duration::from_millis(100)))
        .unwrap_err();
    assert!(timed_out.to_string().contains("within"), "{timed_out}");

    upstream.set_mode(Mode::Normal);
    assert_eq!(client.get("/healthz").unwrap().status, 200);
    upstream.set_healthy(false);
    assert_eq!(client.get("/healthz").unwrap().status, 503);
    assert_eq!(upstream.health_checks(), 2);

    // Every request above is in the log with its arrival time, health checks are not.
    let received = upstream.received();
    assert_eq!(received.len() as u64, upstream.total());
    assert!(received.windows(2).all(|w| w[0].at <= w[1].at));
    let stalled = received.iter().filter(|r| r.answered.is_none()).count();
    assert_eq!(stalled, 3);

    upstream.reset();
    assert_eq!((upstream.total(), upstream.received().len()), (0, 0));
}

#[test]
fn upstream_stops_and_restarts_on_the_same_port() {
    let upstream = Upstream::start("phoenix").unwrap();
    let client = Client::new(upstream.addr());
    assert_eq!(client.get("/").unwrap().status, 200);
    upstream.stop();
    assert!(!upstream.is_running());
    let refused = Client::new(upstream.addr()).get("/").unwrap_err();
    assert!(format!("{refused:#}").contains("connecting"), "{refused:#}");
    upstream.restart().unwrap();
    assert_eq!(
        Client::new(upstream.addr()).get("/").unwrap().text(),
        "phoenix"
    );
    assert_eq!(upstream.total(), 2);
}

#[test]
fn upstream_control_endpoint_switches_a_running_server() {
    let upstream = Upstream::start("users-1").unwrap();
    let client = Client::new(upstream.addr());
    let set = client
        .send(Request::post(
            "/__keel/mode",
            r#"{"mode": "fail", "status": 503, "headers": {"retry-after": "1"}}"#,
        ))
        .unwrap();
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(
        upstream.mode(),
        Mode::fail(503).with_header("retry-after", "1")
    );
    assert_eq!(client.get("/x").unwrap().status, 503);

    let refused = client
        .send(Request::post(
            "/__keel/mode",
            r#"{"mode": "fail", "stauts": 503}"#,
        ))
        .unwrap();
    assert_eq!(refused.status, 400);
    assert!(
        refused.text().contains("stauts: unknown field"),
        "{}",
        refused.text()
    );

    let health = client
        .send(Request::post("/__keel/health", r#"{"up": false}"#))
        .unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(client.get("/healthz").unwrap().status, 503);

    let stats = client.get("/__keel/stats").unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(stats["name"], "users-1");
    assert_eq!(stats["total"], 1);
    assert_eq!(stats["by_status"]["503"], 1);
    assert_eq!(stats, upstream.stats_json());
}

#[test]
fn failures_retries_and_timeouts_through_envoy() {
    let upstream = Upstream::start("upstream").unwrap();
    let envoy = empty_config(&upstream)
        .unwrap()
        .replace(
            "route: { cluster: upstream }",
            "route: { cluster: upstream, timeout: 0.5s, \
             retry_policy: { retry_on: 5xx, num_retries: 2 } }",
        )
        .start()
        .unwrap();

    // One failed attempt per request id: Envoy retries with the same id and succeeds.
    upstream.set_mode(Mode::fail_first(1, 503));
    let response = envoy.get("/retried").unwrap();
    assert_eq!(response.status, 200, "{}", envoy.log());
    assert_eq!(response.header("x-upstream-attempt"), Some("2"));
    let attempts = upstream.received();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].request_id(), attempts[1].request_id());
    let gap = attempts[1].at - attempts[0].at;
    assert!(gap < Duration::from_millis(500), "retry gap {gap:?}");
    envoy
        .wait_for_counter(
            "cluster.upstream.upstream_rq_retry",
            1,
            Duration::from_secs(5),
        )
        .unwrap();

    // A failure Envoy passes on, headers included.
    upstream.reset();
    upstream.set_mode(Mode::fail(429).with_header("retry-after", "3"));
    let limited = envoy.get("/limited").unwrap();
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("3"));

    // A closed connection becomes Envoy's 503 after the retries.
    upstream.reset();
    upstream.set_mode(Mode::Close);
    let closed = envoy.get("/closed").unwrap();
    assert_eq!(closed.status, 503);
    assert_eq!(upstream.total(), 3);

    // A stall hits the route timeout.
    upstream.set_mode(Mode::Stall(Duration::from_secs(5)));
    let stalled = envoy.get("/stalled").unwrap();
    assert_eq!(stalled.status, 504);
    assert!(
        stalled.elapsed >= Duration::from_millis(450),
        "{:?}",
        stalled.elapsed
    );

    // A vanished upstream, then back on the same port.
    upstream.set_mode(Mode::Normal);
    upstream.stop();
    assert_eq!(envoy.get("/gone").unwrap().status, 503);
    upstream.restart().unwrap();
    assert_eq!(envoy.get("/back").unwrap().status, 200);
}

#[test]
fn validate_returns_envoys_message() {
    require_empty_module();
    envoy::validate(EMPTY).unwrap();
    let broken = EnvoyConfig::from_yaml(
        "broken.yaml",
        "static_resources:\n  listeners:\n    - name: x\n      bogus_field: 1\n",
    );
    let error = broken.validate().unwrap_err().to_string();
    assert!(error.contains("broken.yaml"), "{error}");
    assert!(error.contains("no such  field: 'bogus_field'") || error.contains("bogus_field"));
}

#[test]
fn a_refused_config_gives_its_log() {
    let upstream = Upstream::start("upstream").unwrap();
    let config = empty_config(&upstream)
        .unwrap()
        .replace("dist/keel_empty.wasm", "dist/keel_missing.wasm");
    let log = config.start_expect_failure().unwrap();
    assert!(
        log.contains("Invalid path: dist/keel_missing.wasm"),
        "{log}"
    );
    let error = config.start().unwrap_err().to_string();
    assert!(
        error.contains("Invalid path: dist/keel_missing.wasm"),
        "{error}"
    );
    assert!(error.contains("exited"), "{error}");

    // A config that starts is a failure of `start_expect_failure`.
    assert!(empty_config(&upstream)
        .unwrap()
        .start_expect_failure()
        .is_err());
    // Text to replace that does not occur is an error, not a silent no-op.
    let stale = empty_config(&upstream)
        .unwrap()
        .replace("no such text", "x")
        .start();
    assert!(stale.unwrap_err().to_string().contains("does not occur"));
}

#[test]
fn two_rigs_run_at_the_same_time() {
    let rigs: Vec<_> = ["left", "right"]
        .into_iter()
        .map(|name| {
            thread::spawn(move || {
                let upstream = Upstream::start(name).unwrap();
                let envoy = empty_config(&upstream)
                    .unwrap()
                    .concurrency(1)
                    .start()
                    .unwrap();
                (upstream, envoy)
            })
        })
        .collect();
    let rigs: Vec<_> = rigs.into_iter().map(|h| h.join().unwrap()).collect();
    for (upstream, envoy) in &rigs {
        assert_eq!(envoy.get("/").unwrap().text(), upstream.name());
    }
    assert_ne!(rigs[0].1.listener_addr(), rigs[1].1.listener_addr());
    assert_ne!(rigs[0].1.admin_addr(), rigs[1].1.admin_addr());
}
