//! A fleet on a virtual clock: several processes (each its own shared data) lease from one
//! scripted Redis running the bucket script's arithmetic, with latency, and the bounds of the
//! module docs are checked at every millisecond.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use alloc::string::String;
use alloc::vec::Vec;

use super::process::{self, Refill};
use super::remote::{self, parse_grants};
use super::*;
use crate::config::{parse_json, Rate};
use crate::fleet::{parse_reply, Script};
use crate::rate_limit::{fingerprint, Algorithm, KeyTable};
use crate::store::testing::MemoryStore;
use crate::time::Instant;

const PREFIX: &str = "keel/rate_limit/p/";

fn ms(n: u64) -> Instant {
    Instant::from_nanos(n * 1_000_000)
}

fn fleet(json: &str, limiter: &Limiter) -> Result<FleetLimit, ConfigError> {
    let spec: FleetSpec = parse_json(json.as_bytes())?;
    FleetLimit::from_spec(
        &FieldPath::root().field("store"),
        &spec,
        [("", limiter)].into_iter(),
    )
}

fn limiter(requests: u64, burst: u64) -> Limiter {
    Limiter::new(
        Algorithm::TokenBucket,
        Rate {
            requests,
            period: Duration::from_secs(1),
            burst,
        },
    )
}

/// A call on the wire: evaluated by Redis at `eval_at`, answered at `answer_at`.
struct Call {
    process: usize,
    eval_at: u64,
    answer_at: u64,
    refills: Vec<Refill>,
    body: Vec<u8>,
    name: String,
    reply: Option<String>,
}

struct Waiting {
    process: usize,
    slot: u32,
    fp: u64,
    since: u64,
}

struct Fleet {
    stores: Vec<MemoryStore>,
    loaded: Vec<bool>,
    redis: ScriptedRedis,
    script: Script,
    table: KeyTable,
    limiter: Limiter,
    rules: LeaseRules,
    calls: Vec<Call>,
    waiting: Vec<Waiting>,
    /// Per process: admitted, refused, waited past the timeout.
    admitted: Vec<u64>,
    refused: Vec<u64>,
    timed_out: u64,
    longest_wait: u64,
    /// Admissions in time order (ms), all processes.
    log: Vec<u64>,
    /// Admissions by key fingerprint.
    by_key: alloc::collections::BTreeMap<u64, u64>,
    /// Calls sent by requests (their lease was empty), in time order (ms).
    request_calls: Vec<u64>,
    /// Requests that took `on_store_error`, by key fingerprint.
    fell_back: alloc::collections::BTreeMap<u64, u64>,
    latency: u64,
}

impl Fleet {
    fn new(processes: usize, fleet: &FleetLimit, limiter: Limiter) -> Fleet {
        let table = KeyTable::new(64);
        let stores: Vec<MemoryStore> = (0..processes).map(|_| MemoryStore::default()).collect();
        for store in &stores {
            process::prepare(store, PREFIX, &table).unwrap();
        }
        Fleet {
            stores,
            loaded: alloc::vec![true; processes],
            redis: ScriptedRedis::default(),
            script: remote::script(),
            table,
            rules: fleet.rules(&limiter),
            limiter,
            calls: Vec::new(),
            waiting: Vec::new(),
            admitted: alloc::vec![0; processes],
            refused: alloc::vec![0; processes],
            timed_out: 0,
            longest_wait: 0,
            log: Vec::new(),
            by_key: Default::default(),
            fell_back: Default::default(),
            request_calls: Vec::new(),
            latency: 4,
        }
    }

    fn send(&mut self, process: usize, now: u64, refills: Vec<Refill>) {
        if refills.is_empty() {
            return;
        }
        let asks: Vec<BucketAsk> = refills
            .iter()
            .map(|r| FleetLimit::bucket_ask(&self.limiter, redis_key("p", r.holder), r.ask))
            .collect();
        let command = remote::command(&self.script, self.loaded[process], &asks);
        self.calls.push(Call {
            process,
            eval_at: now + self.latency / 2,
            answer_at: now + self.latency,
            refills,
            body: command.body().to_vec(),
            name: command.name().into(),
            reply: None,
        });
    }

    fn request(&mut self, process: usize, key: &[u8], now: u64) {
        let fp = fingerprint(key);
        let store = &self.stores[process];
        let taken =
            process::acquire(store, PREFIX, &self.table, fp, 0, ms(now), &self.rules, 8).unwrap();
        self.decided(process, fp, taken, now, now);
    }

    fn decided(&mut self, process: usize, fp: u64, taken: process::Taken, now: u64, since: u64) {
        match taken.take {
            Take::Granted { .. } => {
                self.admitted[process] += 1;
                *self.by_key.entry(fp).or_default() += 1;
                self.log.push(now);
                self.longest_wait = self.longest_wait.max(now - since);
            }
            Take::Empty { .. } => self.refused[process] += 1,
            Take::Wait { .. } => {
                if let Some(refill) = taken.refill {
                    self.request_calls.push(now);
                    self.send(process, now, alloc::vec![refill]);
                }
                self.waiting.push(Waiting {
                    process,
                    slot: taken.slot,
                    fp,
                    since,
                });
            }
            Take::KeyFailed => *self.fell_back.entry(fp).or_default() += 1,
            Take::Occupied => unreachable!(),
        }
    }

    fn tick(&mut self, process: usize, now: u64) {
        let rules = self.rules;
        let refills =
            process::refresh(&self.stores[process], PREFIX, ms(now), |_| rules, false, 8).unwrap();
        self.send(process, now, refills);
    }

    /// Runs Redis and delivers answers due at `now`, then lets waiting requests look again.
    fn step(&mut self, now: u64) {
        for call in &mut self.calls {
            if call.reply.is_none() && call.eval_at <= now {
                call.reply = Some(self.redis.answer(&call.body, now * 1000));
            }
        }
        let (due, rest): (Vec<Call>, Vec<Call>) =
            self.calls.drain(..).partition(|c| c.answer_at <= now);
        self.calls = rest;
        for call in due {
            let reply = parse_reply(
                &call.name,
                Some(200),
                call.reply.unwrap_or_default().as_bytes(),
            );
            let store = &self.stores[call.process];
            match reply.and_then(|r| parse_grants(&r, call.refills.len())) {
                Ok(answers) => {
                    self.loaded[call.process] = true;
                    for (refill, answer) in call.refills.iter().zip(answers) {
                        match answer {
                            Ok(grant) => {
                                process::answered(
                                    store,
                                    PREFIX,
                                    refill,
                                    &grant,
                                    ms(now),
                                    &self.rules,
                                    8,
                                )
                                .unwrap();
                            }
                            Err(e) => {
                                assert!(remote::is_key_error(&e), "{e}");
                                process::key_failed(store, PREFIX, refill, ms(now), 8).unwrap();
                            }
                        }
                    }
                }
                Err(crate::fleet::StoreError::NoScript) => {
                    self.loaded[call.process] = false;
                    // The caller sends the same asks again with the source.
                    let refills = call.refills.clone();
                    self.send(call.process, now, refills);
                }
                Err(e) => panic!("{e}"),
            }
        }
        let waiting: Vec<Waiting> = self.waiting.drain(..).collect();
        for w in waiting {
            if now - w.since >= self.rules.timeout.as_millis() {
                self.timed_out += 1;
                continue;
            }
            let store = &self.stores[w.process];
            let taken =
                process::retake(store, PREFIX, w.slot, w.fp, 0, ms(now), &self.rules, 8).unwrap();
            self.decided(w.process, w.fp, taken, now, w.since);
        }
    }

    fn total(&self) -> u64 {
        self.admitted.iter().sum()
    }

    /// The most admissions in any window of `span` ms.
    fn most_in_window(&self, span: u64) -> u64 {
        let mut most = 0;
        let mut start = 0;
        for end in 0..self.log.len() {
            while self.log[end] - self.log[start] >= span {
                start += 1;
            }
            most = most.max((end - start + 1) as u64);
        }
        most
    }
}

#[test]
fn three_processes_share_one_limit_within_the_documented_bounds() {
    let limiter = limiter(100, 100);
    let config = fleet(r#"{"redis": {"cluster": "webdis"}}"#, &limiter).unwrap();
    assert_eq!(config.max_lease(&limiter), 20);
    let mut f = Fleet::new(3, &config, limiter);
    let mut rng = fastrand::Rng::with_seed(11);
    // Redis restarted before the fleet came: the first EVALSHA meets NOSCRIPT.
    let end = 10_000;
    for now in 0..=end {
        for p in 0..3 {
            // About 100/s per process, 300/s in all.
            if rng.u32(0..10) == 0 {
                f.request(p, b"tenant-a", now);
            }
            if now % 100 == (p as u64) * 33 {
                f.tick(p, now);
            }
        }
        f.step(now);
        // From a full bucket, no more than burst + rate * t, at every instant.
        assert!(
            f.total() <= 100 + now / 10 + 1,
            "at {now} ms: {}",
            f.total()
        );
    }
    let expected = 100 + end / 10;
    let total = f.total();
    assert!(total * 100 >= expected * 98, "{total} of {expected}");
    // Every process got a share.
    for p in 0..3 {
        assert!(f.admitted[p] > expected / 6, "{:?}", f.admitted);
    }
    // No request waited past the timeout, none needed the failure path.
    assert_eq!(f.timed_out, 0);
    assert!(f.longest_wait <= config.store.timeout.as_millis());
    // Any one-second window: burst + rate + processes * max_lease.
    assert!(
        f.most_in_window(1000) <= 100 + 100 + 3 * 20,
        "{}",
        f.most_in_window(1000)
    );
    // The bucket script ran its arithmetic: granted net of returned is what was admitted or
    // still held in leases (at most max_lease per process).
    let net = f.redis.granted - f.redis.returned;
    assert!(
        net >= total && net <= total + 3 * 20,
        "net {net}, admitted {total}"
    );
}

#[test]
fn the_whole_limit_follows_the_load_to_one_process() {
    let limiter = limiter(100, 100);
    let config = fleet(r#"{"redis": {"cluster": "webdis"}}"#, &limiter).unwrap();
    let mut f = Fleet::new(3, &config, limiter);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut at_move = [0; 3];
    for now in 0..=6_000u64 {
        if now == 3_000 {
            at_move.copy_from_slice(&f.admitted);
        }
        for p in 0..3 {
            let sends = if now < 3_000 {
                rng.u32(0..10) == 0
            } else {
                p == 0 && rng.u32(0..10) < 3
            };
            if sends {
                f.request(p, b"tenant-a", now);
            }
            if now % 100 == (p as u64) * 33 {
                f.tick(p, now);
            }
        }
        f.step(now);
    }
    // After the move, process 0 alone gets the rate (100/s for 3 s) within 5 %, once the
    // other processes' leases are back (one lease_ttl at most, far less here).
    let moved = f.admitted[0] - at_move[0];
    assert!((285..=315).contains(&moved), "process 0 got {moved} in 3 s");
    assert!(f.admitted[1] - at_move[1] <= 20 && f.admitted[2] - at_move[2] <= 20);
}

#[test]
fn another_key_is_not_affected() {
    let limiter = limiter(10, 10);
    let config = fleet(r#"{"redis": {"cluster": "webdis"}}"#, &limiter).unwrap();
    let mut f = Fleet::new(2, &config, limiter);
    // Requests until 2 s, then time for the last answers.
    for now in 0..=2_020u64 {
        if now <= 2_000 {
            f.request((now % 2) as usize, b"hot", now);
        }
        if now % 250 == 0 && now <= 2_000 {
            f.request(0, b"quiet", now);
        }
        if now % 100 == 0 {
            f.tick(0, now);
            f.tick(1, now);
        }
        f.step(now);
    }
    // The quiet key gets each of its 9 requests; the hot one about 10 + 10/s * 2 s (less the
    // tokens that accrued in Redis after the last look), never more.
    assert_eq!(f.by_key[&fingerprint(b"quiet")], 9);
    let hot = f.by_key[&fingerprint(b"hot")];
    assert!((25..=30).contains(&hot), "{hot}");
    assert_eq!(f.timed_out, 0);
}

#[test]
fn a_key_back_from_idle_is_refilled_ahead_of_need_again() {
    let limiter = limiter(1000, 1000);
    let config = fleet(r#"{"redis": {"cluster": "webdis"}}"#, &limiter).unwrap();
    let mut f = Fleet::new(1, &config, limiter);
    // 200/s for 1 s, nothing for 1 s (the refresher gives the lease back and drops the slot
    // from its list), then 200/s for 3 s.
    for now in 0..=5_000u64 {
        if !(1_000..2_000).contains(&now) && now % 5 == 0 {
            f.request(0, b"k", now);
        }
        if now % 100 == 0 {
            f.tick(0, now);
        }
        f.step(now);
    }
    let after = |from: u64| f.request_calls.iter().filter(|t| **t >= from).count();
    // The first requests after the pause send calls (the lease was given back), until the
    // refresher's next look sizes the lease: from then on it refills ahead of need.
    assert!(after(2_000) <= 10, "{:?}", f.request_calls);
    assert_eq!(after(2_500), 0, "{:?}", f.request_calls);
    assert_eq!(f.admitted[0], 801);
    assert_eq!(f.timed_out, 0);
}

#[test]
fn a_poisoned_key_falls_back_alone_and_the_others_keep_their_fleet_share() {
    let limiter = limiter(10, 10);
    let config = fleet(r#"{"redis": {"cluster": "webdis"}}"#, &limiter).unwrap();
    let mut f = Fleet::new(2, &config, limiter);
    // Someone else wrote a string at the poisoned key's name: HMGET fails on it alone.
    f.redis
        .wrong_type
        .insert(redis_key("p", fingerprint(b"poisoned")));
    for now in 0..=2_020u64 {
        if now <= 2_000 {
            // The hot key over both processes, the poisoned one on process 0, in the same
            // refresher calls (both active in one list).
            f.request((now % 2) as usize, b"hot", now);
            if now % 20 == 0 {
                f.request(0, b"poisoned", now);
            }
        }
        if now % 100 == 0 {
            f.tick(0, now);
            f.tick(1, now);
        }
        f.step(now);
    }
    // The hot key keeps exactly its fleet-wide limit: 10 + 10/s * 2 s, as when alone.
    let hot = f.by_key[&fingerprint(b"hot")];
    assert!((25..=30).contains(&hot), "{hot}");
    assert_eq!(f.fell_back.get(&fingerprint(b"hot")), None);
    // The poisoned key is never admitted from the store, and its requests do not wait: all
    // but the ones that waited for the first answers fall back at once.
    let poisoned = fingerprint(b"poisoned");
    assert_eq!(f.by_key.get(&poisoned), None);
    assert!(f.fell_back[&poisoned] >= 95, "{:?}", f.fell_back);
    assert_eq!(f.timed_out, 0);
}

#[test]
fn configuration_errors_name_the_field() {
    let l = limiter(100, 100);
    for (json, path) in [
        (
            r#"{"redis": {"cluster": "w"}, "mode": "eventual"}"#,
            "store.mode",
        ),
        (
            r#"{"redis": {"cluster": "w"}, "refill": "1ms"}"#,
            "store.refill",
        ),
        (
            r#"{"redis": {"cluster": "w"}, "refill": "1s", "lease_ttl": "1s"}"#,
            "store.lease_ttl",
        ),
        (
            r#"{"redis": {"cluster": "w"}, "on_store_error": "panic"}"#,
            "store.on_store_error",
        ),
        (
            r#"{"redis": {"cluster": "w"}, "expected_processes": 0}"#,
            "store.expected_processes",
        ),
        (
            r#"{"redis": {"cluster": "w"}, "max_lease": 101}"#,
            "store.max_lease",
        ),
        (r#"{"redis": {"cluster": ""}}"#, "store.redis.cluster"),
        (r#"{"redis": {"cluster": "w"}, "leases": 1}"#, ""),
    ] {
        let e = fleet(json, &l).unwrap_err();
        if path.is_empty() {
            assert!(e.message.contains("leases"), "{e}");
        } else {
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }
    let c = fleet(r#"{"redis": {"cluster": "w"}, "mode": "strict", "expected_processes": 3, "on_store_error": "deny"}"#, &l).unwrap();
    assert_eq!(
        (c.mode, c.on_store_error),
        (FleetMode::Strict, OnStoreError::Deny)
    );
    assert_eq!(c.fallback(&l).rate().requests, 33);
    assert_eq!(redis_key("p", 0xab), "keel:rl:p:00000000000000ab");
}
