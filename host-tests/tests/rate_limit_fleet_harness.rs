//! Fleet-wide rate limits in the harness: three processes (three hosts, each its own shared
//! data) of two workers each, one Redis played in Rust by `ScriptedRedis` (the Lua script's
//! arithmetic, `NOSCRIPT` until the source is sent once), virtual time, exact bounds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::rate_limit::fleet::ScriptedRedis;
use keel_host_tests::harness::{Flow, HeaderList, Host, HttpStream, Response, Vm};
use keel_host_tests::{configured_workers, Module};

const CONFIG: &str = r#"{"policies": [{"name": "fleet", "key": "header:x-api-key", "limit": {"requests": 100, "per": "1s", "burst": 100}, "store": {"redis": {"cluster": "webdis", "timeout": "100ms"}, "on_store_error": "local", "expected_processes": 3}}]}"#;

/// The fleet's Redis, its clock (µs, the hosts' virtual clock) and whether it is up.
#[derive(Clone, Default)]
struct Redis {
    state: Arc<Mutex<ScriptedRedis>>,
    now_us: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
}

struct Process {
    host: Host,
    workers: Vec<Vm>,
}

fn fleet(n: usize, redis: &Redis, config: &str) -> Vec<Process> {
    (0..n)
        .map(|_| {
            let host = Host::new();
            let r = redis.clone();
            host.set_responder(move |call| {
                if r.down.load(Ordering::SeqCst) {
                    // Webdis without Redis.
                    return Some(Response::new(503).after(Duration::from_millis(1)));
                }
                let body = r
                    .state
                    .lock()
                    .unwrap()
                    .answer(&call.body, r.now_us.load(Ordering::SeqCst));
                Some(
                    Response::new(200)
                        .body(body)
                        .after(Duration::from_millis(2)),
                )
            });
            let workers = configured_workers(&host, "rate_limit", Module::Own, config, 2).unwrap();
            Process { host, workers }
        })
        .collect()
}

fn request(vm: &Vm, key: &str) -> HttpStream {
    vm.send_request(HeaderList::new().with(":path", "/").with("x-api-key", key))
}

/// A small seeded generator (xorshift), so that runs repeat.
struct Seeded(u64);

impl Seeded {
    /// True one time in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.is_multiple_of(n)
    }
}

/// Requests in flight and the tally.
#[derive(Default)]
struct Tally {
    waiting: Vec<(HttpStream, u64, usize)>,
    admitted: Vec<u64>,
    refused: u64,
    longest_wait_ms: u64,
}

impl Tally {
    fn sent(&mut self, stream: HttpStream, now_ms: u64, process: usize) {
        if stream.local_reply().is_some() {
            self.refused += 1;
        } else if stream.request_flow() == Flow::Continued {
            self.admitted[process] += 1;
        } else {
            self.waiting.push((stream, now_ms, process));
        }
    }

    fn settle(&mut self, now_ms: u64) {
        let mut still = Vec::new();
        for (stream, since, p) in self.waiting.drain(..) {
            if stream.is_resumed() {
                self.admitted[p] += 1;
            } else if let Some(reply) = stream.local_reply() {
                assert_eq!(reply.status, 429);
                self.refused += 1;
            } else {
                still.push((stream, since, p));
                continue;
            }
            self.longest_wait_ms = self.longest_wait_ms.max(now_ms - since);
        }
        self.waiting = still;
    }

    fn total(&self) -> u64 {
        self.admitted.iter().sum()
    }
}

/// Runs `ms` milliseconds from `start_ms`: `sends(process, now)` says whether each process
/// sends a request at that millisecond (on one of its workers).
fn run(
    processes: &[Process],
    redis: &Redis,
    tally: &mut Tally,
    start_ms: u64,
    ms: u64,
    mut sends: impl FnMut(usize, u64) -> bool,
    mut each_ms: impl FnMut(&Tally, u64),
) {
    for now in start_ms..start_ms + ms {
        for (p, process) in processes.iter().enumerate() {
            if sends(p, now) {
                let vm = &process.workers[(now as usize) % process.workers.len()];
                let stream = request(vm, "tenant-a");
                tally.sent(stream, now, p);
            }
        }
        for process in processes {
            process.host.advance(Duration::from_millis(1));
        }
        redis.now_us.store(
            processes[0].host.elapsed().as_micros() as u64,
            Ordering::SeqCst,
        );
        tally.settle(now + 1);
        each_ms(tally, now + 1);
    }
}

#[test]
fn three_processes_of_two_workers_share_one_limit_exactly() {
    let redis = Redis::default();
    let processes = fleet(3, &redis, CONFIG);
    let mut tally = Tally {
        admitted: vec![0; 3],
        ..Tally::default()
    };
    let mut rng = Seeded(21);
    // About 300/s over the three for 10 s.
    run(
        &processes,
        &redis,
        &mut tally,
        0,
        10_000,
        |_, _| rng.one_in(10),
        |t, now| {
            // From a full bucket: never more than burst + rate * t, at any millisecond.
            assert!(t.total() <= 100 + now / 10 + 1, "{} at {now} ms", t.total());
        },
    );
    let total = tally.total();
    eprintln!(
        "admitted {:?} = {total} in 10 s (1100 expected)",
        tally.admitted
    );
    assert!(total >= 1078, "{total} of 1100");
    for p in &tally.admitted {
        assert!(*p > 150, "every process gets a share: {:?}", tally.admitted);
    }
    assert!(
        tally.longest_wait_ms <= 100,
        "a request waited {} ms",
        tally.longest_wait_ms
    );
    let state = redis.state.lock().unwrap();
    // Net of what was given back, Redis granted what was admitted plus what is still leased
    // (at most 2 * max_lease per process).
    let net = state.granted - state.returned;
    assert!(
        net >= total && net <= total + 3 * 2 * 20,
        "net {net}, admitted {total}"
    );
    for process in &processes {
        for vm in &process.workers {
            assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
        }
        // One refresher per process.
        let refreshers = process
            .workers
            .iter()
            .filter(|vm| vm.has_log("now refreshes the fleet leases"))
            .count();
        assert_eq!(refreshers, 1);
        // Redis had no script at first: the first call met NOSCRIPT, and the source went once.
        assert_eq!(
            process.host.counter("keel.rate_limit.fleet.store_errors"),
            0
        );
    }
    assert!(state.loaded);
}

#[test]
fn a_store_outage_falls_back_once_per_process_and_recovers_without_restart() {
    let redis = Redis::default();
    let processes = fleet(3, &redis, CONFIG);
    let mut tally = Tally {
        admitted: vec![0; 3],
        ..Tally::default()
    };
    let mut rng = Seeded(4);
    let mut sends = move |_: usize, _: u64| rng.one_in(10);
    run(
        &processes,
        &redis,
        &mut tally,
        0,
        2_000,
        &mut sends,
        |_, _| {},
    );
    let before = tally.total();
    redis.down.store(true, Ordering::SeqCst);
    run(
        &processes,
        &redis,
        &mut tally,
        2_000,
        3_000,
        &mut sends,
        |_, _| {},
    );
    let during = tally.total() - before;
    redis.down.store(false, Ordering::SeqCst);
    run(
        &processes,
        &redis,
        &mut tally,
        5_000,
        3_000,
        &mut sends,
        |_, _| {},
    );
    let after = tally.total() - before - during;
    eprintln!("before {before}, during 3 s of outage {during}, after 3 s {after}");
    // Local fallback: 100/3 per second and a burst of 100/3 per process, its bucket full at
    // first: at most 3 * (33 + 33 * 3) = 396 in 3 s, plus what was still leased (at most
    // 2 * max_lease per process); at least the local rate.
    assert!(
        (3 * 33 * 3..=396 + 3 * 2 * 20).contains(&during),
        "{during}"
    );
    // Sharing again: Redis's bucket filled up while nobody drew on it, so burst + 3 s * 100/s
    // at most, and the whole of it taken (300/s offered).
    assert!((370..=400).contains(&after), "{after}");
    assert!(
        tally.longest_wait_ms <= 100,
        "a request waited {} ms",
        tally.longest_wait_ms
    );
    for process in &processes {
        let lines = |text: &str| {
            process
                .workers
                .iter()
                .map(|vm| {
                    vm.logs()
                        .iter()
                        .filter(|l| l.message.contains(text))
                        .count()
                })
                .sum::<usize>()
        };
        assert_eq!(lines("the fleet store failed: HTTP status 503"), 1);
        assert_eq!(lines("the fleet store answers again"), 1);
        assert_eq!(process.host.gauge("keel.rate_limit.fleet.store_down"), 0);
        assert!(
            process
                .host
                .counter("keel.rate_limit.fleet.store_fallback_ms")
                >= 2_000
        );
    }
}

#[test]
fn a_poisoned_key_falls_back_alone_while_another_keeps_its_fleet_share() {
    let redis = Redis::default();
    // Someone wrote a string where key A's bucket lives: the script's HMGET fails on it with
    // WRONGTYPE, in A's place of each answer.
    let poisoned = keel_core::rate_limit::fingerprint(b"\0tenant-poisoned");
    redis
        .state
        .lock()
        .unwrap()
        .wrong_type
        .insert(keel_core::rate_limit::fleet::redis_key("fleet", poisoned));
    let config = CONFIG.replace("\"local\"", "\"deny\"");
    let processes = fleet(3, &redis, &config);
    let mut tally = Tally {
        admitted: vec![0; 3],
        ..Tally::default()
    };
    let mut poisoned_tally = Tally {
        admitted: vec![0; 3],
        ..Tally::default()
    };
    let mut rng = Seeded(9);
    // About 300/s of key B over the three for 10 s, and 50/s of key A on each process (in the
    // same refresher calls as B: both are active in each process's list).
    for now in 0..10_000u64 {
        for (p, process) in processes.iter().enumerate() {
            let vm = &process.workers[(now as usize) % process.workers.len()];
            if rng.one_in(10) {
                tally.sent(request(vm, "tenant-a"), now, p);
            }
            if now % 20 == p as u64 {
                poisoned_tally.sent(request(vm, "tenant-poisoned"), now, p);
            }
        }
        for process in &processes {
            process.host.advance(Duration::from_millis(1));
        }
        redis.now_us.store(
            processes[0].host.elapsed().as_micros() as u64,
            Ordering::SeqCst,
        );
        tally.settle(now + 1);
        poisoned_tally.settle(now + 1);
        assert!(
            tally.total() <= 100 + (now + 1) / 10 + 1,
            "{} at {now} ms",
            tally.total()
        );
    }
    let total = tally.total();
    eprintln!(
        "key B admitted {:?} = {total} in 10 s (1100 expected); key A admitted {}, refused {}",
        tally.admitted,
        poisoned_tally.total(),
        poisoned_tally.refused
    );
    // Key B keeps its fleet-wide share, as with no poisoned key beside it.
    assert!(total >= 1078, "{total} of 1100");
    for p in &tally.admitted {
        assert!(*p > 150, "every process gets a share: {:?}", tally.admitted);
    }
    // Key A: on_store_error (deny) for every request, none held past the timeout.
    assert_eq!(poisoned_tally.total(), 0);
    assert_eq!(poisoned_tally.refused, 1500);
    assert!(
        poisoned_tally.longest_wait_ms <= 100 && tally.longest_wait_ms <= 100,
        "a request waited {} / {} ms",
        poisoned_tally.longest_wait_ms,
        tally.longest_wait_ms
    );
    for process in &processes {
        let lines = |text: &str| {
            process
                .workers
                .iter()
                .map(|vm| {
                    vm.logs()
                        .iter()
                        .filter(|l| l.message.contains(text))
                        .count()
                })
                .sum::<usize>()
        };
        // The store itself never went down; A's failure is logged once per process.
        assert_eq!(lines("the fleet store failed:"), 0);
        assert_eq!(
            lines("the fleet store failed for key keel:rl:fleet:"),
            1,
            "{:?}",
            process.workers[0].logs()
        );
        assert_eq!(lines("WRONGTYPE"), 1);
        assert_eq!(process.host.gauge("keel.rate_limit.fleet.store_down"), 0);
        assert_eq!(
            process.host.counter("keel.rate_limit.fleet.store_errors"),
            0
        );
        assert!(process.host.counter("keel.rate_limit.fleet.key_errors") > 0);
        for vm in &process.workers {
            assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
        }
    }
}

#[test]
fn a_vm_that_serves_no_requests_takes_the_refresher_over() {
    // Three VMs of one process; requests go to the first two only, as Envoy's main-thread VM
    // gets none: the third ends up refreshing, and the serving VMs stop sending calls once
    // their leases are refilled ahead of need.
    let redis = Redis::default();
    let host = Host::new();
    let r = redis.clone();
    host.set_responder(move |call| {
        let body = r
            .state
            .lock()
            .unwrap()
            .answer(&call.body, r.now_us.load(Ordering::SeqCst));
        Some(
            Response::new(200)
                .body(body)
                .after(Duration::from_millis(2)),
        )
    });
    let vms = configured_workers(&host, "rate_limit", Module::Own, CONFIG, 3).unwrap();
    let calls = |vm: &Vm| vm.host_calls().get("proxy_http_call").copied().unwrap_or(0);
    let mut sent_by_workers_at_1s = 0;
    for now in 0..3_000u64 {
        if now % 10 == 0 {
            let _ = request(&vms[(now / 10) as usize % 2], "tenant-a");
        }
        host.advance(Duration::from_millis(1));
        redis
            .now_us
            .store(host.elapsed().as_micros() as u64, Ordering::SeqCst);
        if now == 1_000 {
            sent_by_workers_at_1s = calls(&vms[0]) + calls(&vms[1]);
        }
    }
    let by_workers = calls(&vms[0]) + calls(&vms[1]) - sent_by_workers_at_1s;
    eprintln!(
        "calls by the serving VMs in the last 2 s: {by_workers}; by the idle VM in all: {}",
        calls(&vms[2])
    );
    assert!(vms[2].has_log("now refreshes the fleet leases"));
    assert_eq!(by_workers, 0, "the serving VMs sent calls after 1 s");
    assert!(calls(&vms[2]) >= 10, "the idle VM refreshes every period");
    for vm in &vms {
        assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
    }
}
