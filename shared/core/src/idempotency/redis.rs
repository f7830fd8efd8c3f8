//! The fleet-wide store: one Redis key per scoped key, reached through Webdis
//! ([`crate::fleet`]), so that every proxy of the fleet sees the same records.
//!
//! - The key is `keel:idempotency:<policy>:<32 hex digits of the scoped key>` ([`redis_key`]).
//! - The value is a [`Record`] in its binary layout ([`super::record`]), base64 (Webdis
//!   carries UTF-8 text only).
//! - The first request claims its key with `SET key <in-flight record> NX PX
//!   <in_flight_timeout>`; a repeat finds the key taken (`nil`) and reads it with `GET`, and
//!   [`decide`] turns the record into the answer (replay, `409`, `422`) exactly as for the
//!   shared-data store. The completed answer is written with `SET key <record> PX <ttl>`; a
//!   claim given up (an answer that is not kept) is deleted (`DEL`).
//! - Redis's `PX` is what ends a record; the record's own `expires_at` (from the writing
//!   proxy's clock) is checked as well.
//!
//! [`RedisBegin`] is the decision of one request as a little state machine: the glue sends
//! each [`Step::Send`] and hands the answer back, until a claim, a decision or a failure.
//! Every call of one request shares the one callout timeout: a request never waits for the
//! store longer than `timeout` in all.

use alloc::format;
use alloc::string::String;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::record::{decide, Decision, Record, ScopedKey, StoredResponse, RECORD_OVERHEAD};
use crate::fleet::{Command, RedisStore, Reply, StoreError, MAX_REPLY_BYTES};
use crate::time::{Duration, Instant};

/// The largest encoded record the Redis store keeps: its base64 in a Webdis answer
/// (`{"GET":"..."}`) must fit in [`MAX_REPLY_BYTES`].
pub const MAX_RECORD_BYTES: usize = (MAX_REPLY_BYTES - 64) / 4 * 3;

/// How many times a request tries to claim a key that vanished between its `SET NX` and its
/// `GET` (it expired in between) before it is told to come back (`409`).
pub const CLAIM_ATTEMPTS: u8 = 2;

/// The Redis key of `key` under `policy`.
pub fn redis_key(policy: &str, key: ScopedKey) -> String {
    format!("keel:idempotency:{policy}:{}", key.hex())
}

/// A record as the text Redis keeps.
pub fn encode_value(record: &Record) -> String {
    STANDARD.encode(record.encode())
}

/// The record in `text`; `None` for a value that is not one.
pub fn decode_value(text: &str) -> Option<Record> {
    Record::decode(&STANDARD.decode(text).ok()?)
}

/// What the glue does next for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `command` with this callout timeout (what is left of the request's), then call
    /// [`RedisBegin::on_answer`].
    Send(Command, Duration),
    /// The request claimed its key: it goes upstream; its answer is written with
    /// [`completion`].
    Claimed(Record),
    /// The request is answered from the record.
    Decided(Decision),
    /// The store failed: the policy's failure mode applies.
    Failed(StoreError),
}

/// Which command is waiting for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    Claim,
    Read,
}

/// One request's way through the Redis store.
#[derive(Clone, Debug)]
pub struct RedisBegin {
    redis_key: String,
    claim: Record,
    fingerprint: u64,
    deadline: Instant,
    in_flight_timeout: Duration,
    retry_after: Duration,
    waiting: Waiting,
    claims: u8,
}

impl RedisBegin {
    /// Starts the decision of a request of `key` with `fingerprint` at `now`: the first step
    /// is always the claim (`SET NX PX in_flight_timeout`).
    pub fn start(
        policy: &str,
        store: &RedisStore,
        key: ScopedKey,
        fingerprint: u64,
        now: Instant,
        in_flight_timeout: Duration,
        retry_after: Duration,
    ) -> (RedisBegin, Step) {
        let mut begin = RedisBegin {
            redis_key: redis_key(policy, key),
            claim: Record::in_flight(0, key, now, in_flight_timeout),
            fingerprint,
            deadline: now.saturating_add(store.timeout),
            in_flight_timeout,
            retry_after,
            waiting: Waiting::Claim,
            claims: 0,
        };
        let step = begin.claim_step(now);
        (begin, step)
    }

    /// The name of the command waiting for its answer (for [`crate::fleet::parse_reply`]).
    pub fn command_name(&self) -> &'static str {
        match self.waiting {
            Waiting::Claim => "SET",
            Waiting::Read => "GET",
        }
    }

    /// The request's fingerprint.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The Redis key of the request.
    pub fn redis_key(&self) -> &str {
        &self.redis_key
    }

    fn remaining(&self, now: Instant) -> Option<Duration> {
        let left = self.deadline.saturating_since(now);
        (!left.is_zero()).then_some(left)
    }

    fn claim_step(&mut self, now: Instant) -> Step {
        let Some(left) = self.remaining(now) else {
            return Step::Failed(StoreError::NoAnswer);
        };
        self.claims += 1;
        self.waiting = Waiting::Claim;
        self.claim = Record::in_flight(0, self.claim.key, now, self.in_flight_timeout);
        Step::Send(
            Command::set_if_absent(
                &self.redis_key,
                &encode_value(&self.claim),
                self.in_flight_timeout,
            ),
            left,
        )
    }

    /// The record is gone (it expired between the claim and the read): claim again, or,
    /// after [`CLAIM_ATTEMPTS`], tell the client to come back.
    fn gone(&mut self, now: Instant) -> Step {
        if self.claims < CLAIM_ATTEMPTS {
            return self.claim_step(now);
        }
        Step::Decided(Decision::Conflict {
            retry_after: self.retry_after.max(Duration::from_secs(1)),
        })
    }

    /// The answer (as [`crate::fleet::parse_reply`] read it) to the command sent last, at `now`.
    pub fn on_answer(&mut self, answer: Result<Reply, StoreError>, now: Instant) -> Step {
        let reply = match answer {
            Ok(reply) => reply,
            Err(e) => return Step::Failed(e),
        };
        match self.waiting {
            Waiting::Claim if reply.is_ok() => Step::Claimed(self.claim.clone()),
            Waiting::Claim if reply.is_nil() => {
                let Some(left) = self.remaining(now) else {
                    return Step::Failed(StoreError::NoAnswer);
                };
                self.waiting = Waiting::Read;
                Step::Send(Command::get(&self.redis_key), left)
            }
            Waiting::Claim => Step::Failed(unexpected("SET", &reply)),
            Waiting::Read => match reply {
                Reply::Nil => self.gone(now),
                Reply::Text(text) => {
                    let Some(record) = decode_value(&text) else {
                        return Step::Failed(StoreError::Garbage(format!(
                            "the value of {} is not a Keel idempotency record",
                            self.redis_key
                        )));
                    };
                    match decide(
                        Some(&record),
                        self.claim.key,
                        self.fingerprint,
                        now,
                        self.retry_after,
                    ) {
                        Some(decision) => Step::Decided(decision),
                        // Another key's record, or expired by the writer's clock.
                        None => self.gone(now),
                    }
                }
                other => Step::Failed(unexpected("GET", &other)),
            },
        }
    }
}

fn unexpected(command: &str, reply: &Reply) -> StoreError {
    StoreError::Garbage(format!("unexpected reply to {command}: {reply:?}"))
}

/// The command that stores the claim's answer: `SET key <completed record> PX ttl`, or `None`
/// when the record is larger than [`MAX_RECORD_BYTES`] (the claim is then released with
/// [`release`]).
pub fn completion(
    policy: &str,
    claim: &Record,
    fingerprint: u64,
    response: StoredResponse,
    now: Instant,
    ttl: Duration,
) -> Option<Command> {
    let size = RECORD_OVERHEAD + response.header_bytes() + response.body.len();
    if size > MAX_RECORD_BYTES {
        return None;
    }
    let record = claim.completed(fingerprint, response, now, ttl);
    Some(Command::set_with_ttl(
        &redis_key(policy, claim.key),
        &encode_value(&record),
        ttl,
    ))
}

/// The command that gives a claim up (the key runs again): `DEL key`.
pub fn release(policy: &str, claim: &Record) -> Command {
    Command::del(&redis_key(policy, claim.key))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    fn store() -> RedisStore {
        RedisStore {
            cluster: "webdis".into(),
            authority: "webdis".into(),
            timeout: Duration::from_millis(100),
        }
    }

    /// Redis's SET NX PX / SET PX / GET / DEL over a map (no expiry: the tests expire by
    /// deleting).
    #[derive(Default)]
    struct Map(BTreeMap<String, String>);

    impl Map {
        fn run(&mut self, command: &Command) -> Reply {
            let body = command.body();
            let parts: Vec<String> = core::str::from_utf8(body)
                .unwrap()
                .split('/')
                .map(|p| {
                    let mut out = Vec::new();
                    let b = p.as_bytes();
                    let mut i = 0;
                    while i < b.len() {
                        if b[i] == b'%' {
                            out.push(u8::from_str_radix(&p[i + 1..i + 3], 16).unwrap());
                            i += 3;
                        } else {
                            out.push(b[i]);
                            i += 1;
                        }
                    }
                    String::from_utf8(out).unwrap()
                })
                .collect();
            match parts[0].as_str() {
                "SET" if parts.get(3).map(String::as_str) == Some("NX") => {
                    if self.0.contains_key(&parts[1]) {
                        Reply::Nil
                    } else {
                        self.0.insert(parts[1].clone(), parts[2].clone());
                        Reply::Status("OK".into())
                    }
                }
                "SET" => {
                    self.0.insert(parts[1].clone(), parts[2].clone());
                    Reply::Status("OK".into())
                }
                "GET" => self
                    .0
                    .get(&parts[1])
                    .cloned()
                    .map_or(Reply::Nil, Reply::Text),
                "DEL" => Reply::Integer(i64::from(self.0.remove(&parts[1]).is_some())),
                other => panic!("{other}"),
            }
        }

        /// Runs a request's steps to the end.
        fn drive(&mut self, key: ScopedKey, fp: u64, now: Instant) -> Step {
            let (mut b, mut step) = RedisBegin::start(
                "p",
                &store(),
                key,
                fp,
                now,
                Duration::from_secs(30),
                Duration::from_secs(5),
            );
            while let Step::Send(command, left) = &step {
                assert!(*left <= store().timeout);
                assert_eq!(command.name(), b.command_name());
                let reply = self.run(command);
                step = b.on_answer(Ok(reply), now);
            }
            step
        }
    }

    fn answer() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".to_string(), b"text/plain".to_vec())],
            body: vec![0, 1, 2, 255, b'x'],
        }
    }

    #[test]
    fn first_conflict_replay_and_mismatch() {
        let mut redis = Map::default();
        let key = ScopedKey::new("p", b"r", b"c", b"k1");
        let t0 = Instant::from_nanos(1_000_000_000);
        let Step::Claimed(claim) = redis.drive(key, 7, t0) else {
            panic!("not claimed")
        };
        assert_eq!(
            redis.drive(key, 7, t0),
            Step::Decided(Decision::Conflict {
                retry_after: Duration::from_secs(5)
            })
        );
        let set = completion("p", &claim, 7, answer(), t0, Duration::from_secs(3600)).unwrap();
        assert_eq!(set.name(), "SET");
        assert!(redis.run(&set).is_ok());
        assert_eq!(
            redis.drive(key, 7, t0),
            Step::Decided(Decision::Replay(answer()))
        );
        assert_eq!(redis.drive(key, 8, t0), Step::Decided(Decision::Mismatch));
        // Another key is independent.
        let other = ScopedKey::new("p", b"r", b"c", b"k2");
        assert!(matches!(redis.drive(other, 7, t0), Step::Claimed(_)));
        // A released claim runs again.
        assert_eq!(redis.run(&release("p", &claim)), Reply::Integer(1));
        assert!(matches!(redis.drive(key, 9, t0), Step::Claimed(_)));
    }

    #[test]
    fn a_record_gone_between_claim_and_read_is_claimed_again() {
        let key = ScopedKey::new("p", b"", b"", b"k");
        let t0 = Instant::from_nanos(5);
        let (mut b, step) = RedisBegin::start(
            "p",
            &store(),
            key,
            1,
            t0,
            Duration::from_secs(30),
            Duration::from_secs(1),
        );
        assert!(matches!(step, Step::Send(..)));
        let Step::Send(get, _) = b.on_answer(Ok(Reply::Nil), t0) else {
            panic!()
        };
        assert_eq!(get.name(), "GET");
        // GET finds nothing: claim again, once.
        let Step::Send(set, _) = b.on_answer(Ok(Reply::Nil), t0) else {
            panic!()
        };
        assert_eq!(set.name(), "SET");
        assert!(matches!(b.on_answer(Ok(Reply::Nil), t0), Step::Send(..)));
        assert!(matches!(
            b.on_answer(Ok(Reply::Nil), t0),
            Step::Decided(Decision::Conflict { .. })
        ));
    }

    #[test]
    fn failures_and_the_shared_deadline() {
        let key = ScopedKey::new("p", b"", b"", b"k");
        let t0 = Instant::from_nanos(0);
        let start = || {
            RedisBegin::start(
                "p",
                &store(),
                key,
                1,
                t0,
                Duration::from_secs(30),
                Duration::from_secs(1),
            )
        };
        let (mut b, _) = start();
        assert_eq!(
            b.on_answer(Err(StoreError::NoAnswer), t0),
            Step::Failed(StoreError::NoAnswer)
        );
        let (mut b, _) = start();
        assert!(matches!(
            b.on_answer(Ok(Reply::Integer(3)), t0),
            Step::Failed(StoreError::Garbage(_))
        ));
        // The claim's answer came at 60 ms: the GET may take the 40 ms left.
        let (mut b, _) = start();
        let later = t0.saturating_add(Duration::from_millis(60));
        assert!(matches!(
            b.on_answer(Ok(Reply::Nil), later),
            Step::Send(_, left) if left == Duration::from_millis(40)
        ));
        // A value that is not a record.
        assert!(matches!(
            b.on_answer(Ok(Reply::Text("not base64!".into())), later),
            Step::Failed(StoreError::Garbage(_))
        ));
        // Past the deadline nothing more is sent.
        let (mut b, _) = start();
        let late = t0.saturating_add(Duration::from_millis(100));
        assert_eq!(
            b.on_answer(Ok(Reply::Nil), late),
            Step::Failed(StoreError::NoAnswer)
        );
    }

    #[test]
    fn values_round_trip_and_large_answers_are_not_kept() {
        let key = ScopedKey::new("p", b"", b"", b"k");
        let claim = Record::in_flight(0, key, Instant::from_nanos(3), Duration::from_secs(1));
        assert_eq!(decode_value(&encode_value(&claim)), Some(claim.clone()));
        assert_eq!(
            redis_key("orders", key),
            format!("keel:idempotency:orders:{}", key.hex())
        );
        let big = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: vec![b'a'; MAX_RECORD_BYTES],
        };
        let now = Instant::from_nanos(9);
        assert!(completion("p", &claim, 1, big, now, Duration::from_secs(1)).is_none());
        // The largest kept record still fits a Webdis answer.
        let fits = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: vec![b'a'; MAX_RECORD_BYTES - RECORD_OVERHEAD],
        };
        let set = completion("p", &claim, 1, fits, now, Duration::from_secs(1)).unwrap();
        let value = encode_value(&claim.completed(
            1,
            StoredResponse {
                status: 200,
                headers: Vec::new(),
                body: vec![b'a'; MAX_RECORD_BYTES - RECORD_OVERHEAD],
            },
            now,
            Duration::from_secs(1),
        ));
        assert!(value.len() + 16 <= MAX_REPLY_BYTES);
        assert!(set.body().len() > value.len());
    }
}
