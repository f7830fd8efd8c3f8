//! The fleet's bucket in Redis: one Lua script that refills by elapsed time and grants up to
//! the asked amount, atomically, and the same arithmetic in Rust ([`RemoteBucket`]) for tests
//! and the harness's scripted Redis ([`ScriptedRedis`]).
//!
//! One call carries one or more keys. For key `i` (1-based) the script reads `ARGV[5i-4..5i]`:
//! `requests`, `period_us`, `burst`, `ask`, `back`, and answers three integers: `granted`,
//! `remaining` (whole tokens left in Redis) and `full_in_ms` (until the bucket is full again),
//! flattened for all keys (Webdis does not nest arrays). A key whose commands fail in Redis
//! (it holds another type: `WRONGTYPE`) answers the error's message in place of `granted`
//! (`redis.pcall`), so that one poisoned key does not fail the other keys of its call.
//!
//! The bucket is a hash `{c: credit, t: updated_us}` where `credit` counts tokens in units of
//! `1 / period_us` token (a token is `period_us` credits, a microsecond adds `requests`), so the
//! refill is exact integer arithmetic in Lua's doubles as long as `burst * period_us` stays
//! below 2^53 (checked by the configuration). Time is Redis's own `TIME`: every process of the
//! fleet is measured on one clock. Returned tokens (`back`) are added before the grant, and
//! the bucket never holds more than `burst`. The key expires when it would be full anyway.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::fleet::{Command, Reply, Script, StoreError};
use crate::time::Duration;

/// The Lua source of the bucket script (Redis 7: scripts are replicated by their effects, so
/// reading `TIME` before writing is allowed).
pub const BUCKET_SCRIPT: &str = r#"-- keel rate_limit lease v2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 5
  local requests = tonumber(ARGV[a + 1])
  local period = tonumber(ARGV[a + 2])
  local burst = tonumber(ARGV[a + 3])
  local ask = tonumber(ARGV[a + 4])
  local back = tonumber(ARGV[a + 5])
  local cap = burst * period
  local s = redis.pcall('HMGET', key, 'c', 't')
  if s.err then
    out[#out + 1] = s.err
    out[#out + 1] = 0
    out[#out + 1] = 0
  else
    local credit = tonumber(s[1])
    local at = tonumber(s[2])
    if credit == nil or at == nil then
      credit = cap
      at = now
    end
    if now > at then
      credit = math.min(cap, credit + (now - at) * requests)
      at = now
    end
    credit = math.min(cap, credit + back * period)
    local granted = math.min(ask, math.floor(credit / period))
    credit = credit - granted * period
    local full_in = math.ceil((cap - credit) / requests)
    local w = redis.pcall('HSET', key, 'c', string.format('%.0f', credit), 't', string.format('%.0f', at))
    if type(w) == 'table' and w.err then
      out[#out + 1] = w.err
      out[#out + 1] = 0
      out[#out + 1] = 0
    else
      redis.pcall('PEXPIRE', key, math.floor(full_in / 1000) + 1000)
      out[#out + 1] = granted
      out[#out + 1] = math.floor(credit / period)
      out[#out + 1] = math.ceil(full_in / 1000)
    end
  end
end
return out
"#;

/// The largest `burst * period_us` the script computes exactly (2^53, Lua's doubles).
pub const MAX_CREDIT: u64 = 1 << 53;

/// The bucket script.
pub fn script() -> Script {
    Script::new(BUCKET_SCRIPT)
}

/// What one key asks of the fleet's bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketAsk {
    /// The Redis key.
    pub key: String,
    /// Tokens per period.
    pub requests: u64,
    /// The period in microseconds (at least 1).
    pub period_us: u64,
    /// The bucket size.
    pub burst: u64,
    /// Tokens asked for.
    pub ask: u64,
    /// Unused tokens given back.
    pub back: u64,
}

/// What the bucket granted one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketGrant {
    /// Tokens granted (at most the ask).
    pub granted: u64,
    /// Whole tokens left in the fleet's bucket.
    pub remaining: u64,
    /// Until the fleet's bucket is full again.
    pub full_in: Duration,
}

/// The call for `asks` (`EVALSHA` when the script is believed `loaded`, else `EVAL`).
pub fn command(script: &Script, loaded: bool, asks: &[BucketAsk]) -> Command {
    let keys: Vec<&str> = asks.iter().map(|a| a.key.as_str()).collect();
    let numbers: Vec<String> = asks
        .iter()
        .flat_map(|a| [a.requests, a.period_us, a.burst, a.ask, a.back])
        .map(|n| format!("{n}"))
        .collect();
    let args: Vec<&str> = numbers.iter().map(String::as_str).collect();
    script.call(loaded, &keys, &args)
}

/// What the script answered for one key: its grant, or the error Redis raised on that key
/// alone (a key that holds another type: `WRONGTYPE ...`).
pub type KeyAnswer = Result<BucketGrant, StoreError>;

/// The message of the error Redis raises on a key of another type.
pub const WRONG_TYPE: &str = "WRONGTYPE";

/// Whether `error`, in one key's place of the script's answer, concerns that key alone (the key
/// holds another type, [`WRONG_TYPE`]). Any other error there (`OOM`, `READONLY`, ...) would
/// come for every key: it is the store's.
pub fn is_key_error(error: &StoreError) -> bool {
    matches!(error, StoreError::Redis(message) if message.starts_with(WRONG_TYPE))
}

/// The answers in the script's reply for `n` keys, one per key in the order asked:
/// [`StoreError::Garbage`] for any other shape, naming what came. A key whose place holds an
/// error ([`is_key_error`]) answers `Err` alone; any other error in a key's place is the whole
/// call's error (it is the store's, not the key's).
pub fn parse_grants(reply: &Reply, n: usize) -> Result<Vec<KeyAnswer>, StoreError> {
    let wrong = || StoreError::Garbage(format!("bucket script answered {reply:?}"));
    let items = reply.as_array().ok_or_else(wrong)?;
    if items.len() != 3 * n {
        return Err(wrong());
    }
    let number = |r: &Reply| r.as_integer().and_then(|i| u64::try_from(i).ok());
    let mut answers = Vec::with_capacity(n);
    for c in items.chunks_exact(3) {
        let [g, r, f] = c else {
            return Err(wrong());
        };
        if let Reply::Text(message) = g {
            let error = StoreError::Redis(crate::fleet::webdis::excerpt(message.as_bytes()));
            if !is_key_error(&error) {
                return Err(error);
            }
            answers.push(Err(error));
            continue;
        }
        let grant = match (number(g), number(r), number(f)) {
            (Some(granted), Some(remaining), Some(full_in)) => BucketGrant {
                granted,
                remaining,
                full_in: Duration::from_millis(full_in),
            },
            _ => return Err(wrong()),
        };
        answers.push(Ok(grant));
    }
    Ok(answers)
}

/// One bucket as the script keeps it: `credit` in units of `1 / period_us` token, `at` in
/// microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteBucket {
    /// Credit (see the module docs).
    pub credit: u64,
    /// When `credit` was last refilled, in microseconds.
    pub at_us: u64,
}

impl RemoteBucket {
    /// The script on one key at `now_us`: the bucket after and the grant. `None`: no key
    /// (a full bucket).
    pub fn grant(
        state: Option<RemoteBucket>,
        now_us: u64,
        ask: &BucketAsk,
    ) -> (RemoteBucket, BucketGrant) {
        let requests = ask.requests.max(1);
        let period = ask.period_us.max(1);
        let cap = ask.burst.saturating_mul(period);
        let mut b = state.unwrap_or(RemoteBucket {
            credit: cap,
            at_us: now_us,
        });
        if now_us > b.at_us {
            let refill = (now_us - b.at_us).saturating_mul(requests);
            b.credit = b.credit.saturating_add(refill).min(cap);
            b.at_us = now_us;
        }
        b.credit = b
            .credit
            .saturating_add(ask.back.saturating_mul(period))
            .min(cap);
        let granted = ask.ask.min(b.credit / period);
        b.credit -= granted * period;
        let full_in_us = (cap - b.credit).div_ceil(requests);
        (
            b,
            BucketGrant {
                granted,
                remaining: b.credit / period,
                full_in: Duration::from_millis(full_in_us.div_ceil(1000)),
            },
        )
    }
}

/// Redis and Webdis played in Rust, for tests on a virtual clock: answers the bucket
/// script's `EVALSHA`/`EVAL` bodies as Webdis would (including `NOSCRIPT` until the script
/// has been sent once with `EVAL`, as after a Redis restart).
#[derive(Clone, Debug, Default)]
pub struct ScriptedRedis {
    /// The buckets by key.
    pub buckets: BTreeMap<String, RemoteBucket>,
    /// Whether `EVALSHA` finds the script.
    pub loaded: bool,
    /// Tokens granted so far, over all keys.
    pub granted: u64,
    /// Tokens given back so far.
    pub returned: u64,
    /// Keys that hold another type (a string set by someone else): the script's `HMGET`
    /// fails on them with `WRONGTYPE`, in their place of the answer.
    pub wrong_type: BTreeSet<String>,
}

impl ScriptedRedis {
    /// Webdis's JSON answer to `body` at `now_us`.
    pub fn answer(&mut self, body: &[u8], now_us: u64) -> String {
        let text = String::from_utf8_lossy(body);
        let parts: Vec<String> = text.split('/').map(percent_decode).collect();
        let [name, first, numkeys, rest @ ..] = parts.as_slice() else {
            return String::from("{}");
        };
        match name.as_str() {
            "EVALSHA" if !self.loaded || *first != script().sha() => {
                return String::from(
                    r#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#,
                )
            }
            "EVALSHA" => {}
            "EVAL" if first.as_str() == BUCKET_SCRIPT => self.loaded = true,
            _ => return format!(r#"{{"{name}":[false,"ERR not the bucket script"]}}"#),
        }
        let n: usize = numkeys.parse().unwrap_or(0);
        let (keys, args) = rest.split_at(n.min(rest.len()));
        let mut out = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if self.wrong_type.contains(key) {
                out.push(format!(
                    r#""{WRONG_TYPE} Operation against a key holding the wrong kind of value",0,0"#
                ));
                continue;
            }
            let arg = |j: usize| -> u64 {
                args.get(5 * i + j)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0)
            };
            let ask = BucketAsk {
                key: key.clone(),
                requests: arg(0),
                period_us: arg(1),
                burst: arg(2),
                ask: arg(3),
                back: arg(4),
            };
            let state = self.buckets.get(key).copied();
            let (next, grant) = RemoteBucket::grant(state, now_us, &ask);
            self.buckets.insert(key.clone(), next);
            self.granted += grant.granted;
            self.returned += ask.back;
            out.push(format!(
                "{},{},{}",
                grant.granted,
                grant.remaining,
                grant.full_in.as_millis()
            ));
        }
        format!(r#"{{"{name}":[{}]}}"#, out.join(","))
    }
}

/// Decodes `%XX` escapes (what [`crate::fleet::webdis::percent_encode`] writes).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| {
            bytes
                .get(j)
                .and_then(|b| char::from(*b).to_digit(16))
                .and_then(|d| u8::try_from(d).ok())
        };
        match (bytes.get(i), hex(i + 1), hex(i + 2)) {
            (Some(b'%'), Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (Some(b), _, _) => {
                out.push(*b);
                i += 1;
            }
            (None, _, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::fleet::parse_reply;
    use alloc::vec;

    fn ask(n: u64, back: u64) -> BucketAsk {
        BucketAsk {
            key: "keel:rl:p::1".into(),
            requests: 100,
            period_us: 1_000_000,
            burst: 100,
            ask: n,
            back,
        }
    }

    #[test]
    fn the_bucket_starts_full_refills_by_time_and_caps_at_burst() {
        let (b, g) = RemoteBucket::grant(None, 0, &ask(30, 0));
        assert_eq!((g.granted, g.remaining), (30, 70));
        assert_eq!(g.full_in, Duration::from_millis(300));
        let (b, g) = RemoteBucket::grant(Some(b), 0, &ask(100, 0));
        assert_eq!((g.granted, g.remaining), (70, 0));
        // 10 ms later: exactly one token.
        let (b, g) = RemoteBucket::grant(Some(b), 10_000, &ask(5, 0));
        assert_eq!(g.granted, 1);
        // 9.999 ms: not yet another one.
        let (b, g) = RemoteBucket::grant(Some(b), 19_999, &ask(5, 0));
        assert_eq!(g.granted, 0);
        // Given back tokens count, never above burst.
        let (b, g) = RemoteBucket::grant(Some(b), 19_999, &ask(0, 40));
        assert_eq!((g.granted, g.remaining), (0, 40));
        let (_, g) = RemoteBucket::grant(Some(b), 10_000_000, &ask(0, 50));
        assert_eq!((g.remaining, g.full_in), (100, Duration::ZERO));
    }

    #[test]
    fn grants_never_exceed_burst_plus_rate_times_time() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut state = None;
        let (mut now, mut net) = (0u64, 0i128);
        for _ in 0..5000 {
            now += rng.u64(0..20_000);
            let a = ask(rng.u64(0..30), 0);
            let (b, g) = RemoteBucket::grant(state, now, &a);
            state = Some(b);
            net += i128::from(g.granted);
            // Give some back now and then.
            if rng.u8(..) < 30 && g.granted > 0 {
                let back = rng.u64(0..=g.granted);
                let (b, _) = RemoteBucket::grant(state, now, &ask(0, back));
                state = Some(b);
                net -= i128::from(back);
            }
            assert!(
                net <= 100 + i128::from(now) * 100 / 1_000_000,
                "at {now}: {net}"
            );
        }
    }

    #[test]
    fn calls_and_answers_round_trip_through_the_scripted_redis() {
        let script = script();
        let mut redis = ScriptedRedis::default();
        let asks = [
            ask(10, 0),
            BucketAsk {
                key: "other".into(),
                ..ask(3, 0)
            },
        ];
        let call = command(&script, true, &asks);
        let body = redis.answer(call.body(), 0);
        assert_eq!(
            parse_reply(call.name(), Some(200), body.as_bytes()),
            Err(StoreError::NoScript)
        );
        let call = command(&script, false, &asks);
        let body = redis.answer(call.body(), 0);
        let reply = parse_reply(call.name(), Some(200), body.as_bytes()).unwrap();
        let grants = parse_grants(&reply, 2).unwrap();
        assert_eq!(grants[0].as_ref().unwrap().granted, 10);
        assert_eq!(grants[1].as_ref().unwrap().remaining, 97);
        // Now loaded: EVALSHA works.
        let call = command(&script, true, &asks[..1]);
        let reply = parse_reply(
            call.name(),
            Some(200),
            redis.answer(call.body(), 0).as_bytes(),
        );
        let grants = parse_grants(&reply.unwrap(), 1).unwrap();
        assert_eq!(grants[0].as_ref().unwrap().remaining, 80);
        assert_eq!(redis.granted, 23);
    }

    #[test]
    fn a_key_of_another_type_fails_alone() {
        let script = script();
        let mut redis = ScriptedRedis {
            loaded: true,
            ..ScriptedRedis::default()
        };
        redis.wrong_type.insert("poisoned".into());
        let asks = [
            BucketAsk {
                key: "poisoned".into(),
                ..ask(3, 0)
            },
            ask(10, 0),
        ];
        let call = command(&script, true, &asks);
        let body = redis.answer(call.body(), 0);
        let reply = parse_reply(call.name(), Some(200), body.as_bytes()).unwrap();
        let answers = parse_grants(&reply, 2).unwrap();
        assert!(
            matches!(&answers[0], Err(StoreError::Redis(m)) if m.starts_with("WRONGTYPE")),
            "{answers:?}"
        );
        assert_eq!(answers[1].as_ref().unwrap().granted, 10);
        assert_eq!(redis.granted, 10);
        // Another error in a key's place is the store's: the whole call fails.
        let oom = Reply::Array(vec![
            Reply::Text("OOM command not allowed when used memory > 'maxmemory'.".into()),
            Reply::Integer(0),
            Reply::Integer(0),
        ]);
        assert!(matches!(
            parse_grants(&oom, 1),
            Err(StoreError::Redis(m)) if m.starts_with("OOM")
        ));
    }

    #[test]
    fn answers_of_the_wrong_shape_are_garbage() {
        for reply in [
            Reply::Integer(1),
            Reply::Array(vec![Reply::Integer(1), Reply::Integer(2)]),
            Reply::Array(vec![
                Reply::Integer(-1),
                Reply::Integer(0),
                Reply::Integer(0),
            ]),
            Reply::Array(vec![Reply::Nil, Reply::Integer(0), Reply::Integer(0)]),
        ] {
            assert!(
                matches!(parse_grants(&reply, 1), Err(StoreError::Garbage(_))),
                "{reply:?}"
            );
        }
    }
}
