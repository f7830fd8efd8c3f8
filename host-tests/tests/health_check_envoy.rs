//! Envoy's own active health checks against keel-upstream on a STATIC cluster
//! (`envoy/health-checks.yaml`, plain Envoy, no Keel filter), and the cause of the
//! `network_failure` seen before: a host not yet listening fails Envoy's start-up check, and
//! until the cluster has carried traffic Envoy waits `no_traffic_interval` (60 s by default)
//! for the next check. Needs `make setup`.
//!
//! Every wait is bounded; the only time-shaped assertion is the regression's, where 6 s of no
//! second check stands for Envoy's 60 s default.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keel_host_tests::envoy::{wait_for, Envoy, EnvoyConfig};
use keel_host_tests::upstream::Upstream;

const YAML: &str = "envoy/health-checks.yaml";
const WAIT: Duration = Duration::from_secs(15);

/// Envoy's `/clusters` health flags of `pool`'s host on `port`: `healthy`, `/failed_active_hc`.
fn flags(envoy: &Envoy, port: u16) -> String {
    let text = envoy.admin("/clusters").unwrap_or_default();
    let prefix = format!("pool::127.0.0.1:{port}::health_flags::");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or("?")
        .to_string()
}

fn wait_flags(envoy: &Envoy, port: u16, want: &str) {
    assert!(
        wait_for(Instant::now(), WAIT, || flags(envoy, port) == want).is_some(),
        "127.0.0.1:{port}: health flags {} after {WAIT:?}, expected {want}\n{}",
        flags(envoy, port),
        envoy.log()
    );
}

fn start(config: EnvoyConfig, one: &Upstream, two: &Upstream) -> Envoy {
    config
        .port(18301, one.port())
        .port(18302, two.port())
        .start()
        .expect("Envoy starts")
}

#[test]
fn active_health_checks_follow_keel_upstream_on_a_static_cluster() {
    let one = Upstream::start("pool-1").unwrap();
    // The second upstream is not listening when Envoy starts (as when a demo starts its
    // upstreams after Envoy): its start-up check fails with a refused connection.
    let two = Upstream::start("pool-2").unwrap();
    two.stop();
    let envoy = start(EnvoyConfig::from_file(YAML).unwrap(), &one, &two);
    wait_flags(&envoy, one.port(), "healthy");
    wait_flags(&envoy, two.port(), "/failed_active_hc");
    assert!(
        envoy
            .stat("cluster.pool.health_check.network_failure")
            .unwrap()
            >= 1
    );

    // It comes up: with no_traffic_interval 1 s the checks go on without traffic.
    two.restart().unwrap();
    wait_flags(&envoy, two.port(), "healthy");

    // keel-upstream answered them: its /healthz count moves with Envoy's successes.
    assert!(two.health_checks() >= 1);
    assert!(
        wait_for(Instant::now(), WAIT, || one.health_checks() >= 2
            && envoy.stat("cluster.pool.health_check.success").unwrap_or(0)
                >= 3)
        .is_some(),
        "checks of pool-1: {}, successes: {:?}",
        one.health_checks(),
        envoy.stat("cluster.pool.health_check.success")
    );

    // /healthz answers 503: out of the rotation after two failed checks; traffic avoids it.
    one.set_healthy(false);
    wait_flags(&envoy, one.port(), "/failed_active_hc");
    // The health checker runs on Envoy's main thread, which /clusters reads; each worker learns
    // of the new host set a moment later (a cross-thread post, slow on a loaded machine). Wait
    // until four requests in a row reach pool-2 (round robin over both would alternate).
    let mut settle = 0;
    let settled = wait_for(Instant::now(), WAIT, || {
        settle += 1;
        let to_two = envoy
            .get(&format!("/settle/{settle}"))
            .is_ok_and(|r| r.header("x-upstream") == Some("pool-2"));
        to_two
            && (1..4).all(|k| {
                envoy
                    .get(&format!("/settle/{settle}-{k}"))
                    .is_ok_and(|r| r.header("x-upstream") == Some("pool-2"))
            })
    });
    assert!(
        settled.is_some(),
        "the workers still send to pool-1 {WAIT:?} after it failed its checks"
    );
    let before = one.total();
    for i in 0..20 {
        let r = envoy.get(&format!("/r/{i}")).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream"), Some("pool-2"));
    }
    assert_eq!(
        one.received()
            .iter()
            .filter(|r| r.path.starts_with("/r/"))
            .count(),
        0,
        "an unhealthy host got traffic ({} requests since)",
        one.total() - before
    );
    one.set_healthy(true);
    wait_flags(&envoy, one.port(), "healthy");

    // A stopped upstream (connections refused): network failures, then unhealthy.
    let failures = envoy
        .stat("cluster.pool.health_check.network_failure")
        .unwrap();
    two.stop();
    wait_flags(&envoy, two.port(), "/failed_active_hc");
    assert!(
        envoy
            .stat("cluster.pool.health_check.network_failure")
            .unwrap()
            > failures
    );
    two.restart().unwrap();
    wait_flags(&envoy, two.port(), "healthy");
}

/// The cause of the earlier "network_failure": without `no_traffic_interval`, a host that was
/// down at start-up stays failed for Envoy's default 60 s, though it listens and answers.
#[test]
fn without_no_traffic_interval_a_host_down_at_start_stays_failed() {
    let one = Upstream::start("pool-1").unwrap();
    let two = Upstream::start("pool-2").unwrap();
    two.stop();
    let config = EnvoyConfig::from_file(YAML)
        .unwrap()
        .replace("      no_traffic_interval: 1s\n", "")
        .replace("      no_traffic_healthy_interval: 1s\n", "");
    let envoy = start(config, &one, &two);
    wait_flags(&envoy, two.port(), "/failed_active_hc");
    two.restart().unwrap();
    // Traffic now flows too (the timer already armed keeps its 60 s).
    for i in 0..5 {
        assert_eq!(envoy.get(&format!("/r/{i}")).unwrap().status, 200);
    }
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        flags(&envoy, two.port()),
        "/failed_active_hc",
        "checked again within 6 s"
    );
    assert_eq!(two.health_checks(), 0, "Envoy checked the restarted host");
}
