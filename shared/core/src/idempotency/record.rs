//! A key's record, its binary layout, and the decision a request gets from it.
//!
//! A record is *in flight* from the first request's claim until its answer is stored, then
//! *completed* until its `expires_at`. Either state ends at `expires_at` (`in_flight_timeout`
//! after the claim, `ttl` after the completion): an expired record is as good as none, so the
//! key runs again. A record is bound to its key by two 64-bit hashes of the scoped key
//! ([`ScopedKey`]), so a hash collision between two clients' keys would have to hit 128 bits.
//!
//! # Layout (little-endian, no padding)
//!
//! | bytes | field |
//! |---|---|
//! | 1 | state: `1` in flight, `2` completed (anything else: empty) |
//! | 8 | `seq`: the store's sequence number of the claim (0 outside the shared-data store) |
//! | 8 | `key_hash`: xxh64 of the scoped key, seed 0 |
//! | 8 | `key_check`: xxh64 of the scoped key, seed 1 |
//! | 8 | `fingerprint` of the first request (0 while in flight) |
//! | 8 | `claimed_at`, ns |
//! | 8 | `expires_at`, ns |
//! | completed only: | |
//! | 2 | status |
//! | 2 | header count `n`, then `n` × (u16 name length, name, u32 value length, value) |
//! | 4 | body length, then the body |
//!
//! A value that does not decode (short, trailing bytes, unknown state) is an empty record.

use alloc::string::String;
use alloc::vec::Vec;

use xxhash_rust::xxh64::{xxh64, Xxh64};

use crate::codec::{Reader, Writer};
use crate::time::{Duration, Instant};

/// The bytes of a completed record besides its headers and body.
pub const RECORD_OVERHEAD: usize = 1 + 8 * 6 + 2 + 2 + 4;

/// The encoded empty record (what a released or never used slot holds).
pub const EMPTY: &[u8] = &[0];

/// A key within its scope: the policy, the Envoy route and the client identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopedKey {
    /// xxh64, seed 0: finds the record.
    pub hash: u64,
    /// xxh64, seed 1: confirms it.
    pub check: u64,
}

impl ScopedKey {
    /// The key `key` of `client` on `route` under `policy`. The parts are joined with their
    /// lengths, so no choice of values can make two different scopes meet.
    pub fn new(policy: &str, route: &[u8], client: &[u8], key: &[u8]) -> ScopedKey {
        let mut joined =
            Vec::with_capacity(policy.len() + route.len() + client.len() + key.len() + 16);
        for part in [policy.as_bytes(), route, client, key] {
            joined.extend_from_slice(&(part.len() as u32).to_le_bytes());
            joined.extend_from_slice(part);
        }
        ScopedKey {
            hash: xxh64(&joined, 0),
            check: xxh64(&joined, 1),
        }
    }

    /// The key as text for a store that names keys (Redis): 32 hex digits.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for v in [self.hash, self.check] {
            for i in (0..16).rev() {
                let d = ((v >> (i * 4)) & 0xf) as u8;
                s.push(char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 }));
            }
        }
        s
    }
}

/// The request's fingerprint: method, path, the configured headers and the body, hashed as
/// they come ([`Fingerprint::body`] once per chunk).
#[derive(Clone)]
pub struct Fingerprint(Xxh64);

impl core::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Fingerprint")
    }
}

impl Fingerprint {
    /// Starts with the method, the path and the values of the configured headers (in the
    /// configuration's order; an absent header differs from an empty one).
    pub fn new<'a>(
        method: &[u8],
        path: &[u8],
        headers: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Fingerprint {
        let mut h = Xxh64::new(0);
        let mut part = |bytes: &[u8]| {
            h.update(&(bytes.len() as u32).to_le_bytes());
            h.update(bytes);
        };
        part(method);
        part(path);
        for header in headers {
            match header {
                Some(v) => part(v),
                None => part(b"\xff\xffabsent"),
            }
        }
        Fingerprint(h)
    }

    /// Adds a body chunk.
    pub fn body(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    /// The fingerprint; never 0 (0 means "not known yet" in a record).
    pub fn finish(&self) -> u64 {
        self.0.digest().max(1)
    }
}

/// A stored answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers, in order, as the upstream sent them (hop-by-hop ones left out).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Headers that describe one connection, not the answer (RFC 9110 7.6.1), and the length
/// Envoy sets itself on a replay.
const NOT_STORED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "proxy-authenticate",
];

impl StoredResponse {
    /// Whether a response header is kept in a stored answer.
    pub fn keeps_header(name: &str) -> bool {
        !name.starts_with(':') && !NOT_STORED.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// The bytes of the headers once encoded.
    pub fn header_bytes(&self) -> usize {
        self.headers
            .iter()
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum()
    }
}

/// The state of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The first request is on its way.
    InFlight,
    /// The first request's answer, with its fingerprint.
    Completed {
        /// The first request's fingerprint.
        fingerprint: u64,
        /// Its answer.
        response: StoredResponse,
    },
}

/// One key's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The claim's sequence number in the shared-data store (0 elsewhere).
    pub seq: u64,
    /// The key it belongs to.
    pub key: ScopedKey,
    /// When the first request claimed the key.
    pub claimed_at: Instant,
    /// When the record stops counting.
    pub expires_at: Instant,
    /// In flight or completed.
    pub state: State,
}

impl Record {
    /// A new claim.
    pub fn in_flight(seq: u64, key: ScopedKey, now: Instant, timeout: Duration) -> Record {
        Record {
            seq,
            key,
            claimed_at: now,
            expires_at: now.saturating_add(timeout),
            state: State::InFlight,
        }
    }

    /// The claim completed with `response` at `now`, kept for `ttl`.
    pub fn completed(
        &self,
        fingerprint: u64,
        response: StoredResponse,
        now: Instant,
        ttl: Duration,
    ) -> Record {
        Record {
            seq: self.seq,
            key: self.key,
            claimed_at: self.claimed_at,
            expires_at: now.saturating_add(ttl),
            state: State::Completed {
                fingerprint,
                response,
            },
        }
    }

    /// Whether the record still counts at `now`.
    pub fn is_live(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    /// The encoded length.
    pub fn encoded_len(&self) -> usize {
        match &self.state {
            State::InFlight => 1 + 8 * 6,
            State::Completed { response, .. } => {
                RECORD_OVERHEAD + response.header_bytes() + response.body.len()
            }
        }
    }

    /// The layout of the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let (tag, fingerprint) = match &self.state {
            State::InFlight => (1, 0),
            State::Completed { fingerprint, .. } => (2, *fingerprint),
        };
        let mut w = Writer::with_capacity(self.encoded_len())
            .u8(tag)
            .u64(self.seq)
            .u64(self.key.hash)
            .u64(self.key.check)
            .u64(fingerprint)
            .u64(self.claimed_at.as_nanos())
            .u64(self.expires_at.as_nanos());
        if let State::Completed { response, .. } = &self.state {
            w = w
                .u16(response.status)
                .u16(u16::try_from(response.headers.len()).unwrap_or(u16::MAX));
            for (name, value) in response.headers.iter().take(usize::from(u16::MAX)) {
                let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
                w = w
                    .u16(name.len() as u16)
                    .bytes(name)
                    .u32(u32::try_from(value.len()).unwrap_or(u32::MAX))
                    .bytes(&value[..value.len().min(u32::MAX as usize)]);
            }
            w = w
                .u32(u32::try_from(response.body.len()).unwrap_or(u32::MAX))
                .bytes(&response.body[..response.body.len().min(u32::MAX as usize)]);
        }
        w.finish()
    }

    /// Decodes a record; `None` for an empty or foreign value.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let mut r = Reader::new(bytes);
        let tag = r.u8()?;
        let seq = r.u64()?;
        let key = ScopedKey {
            hash: r.u64()?,
            check: r.u64()?,
        };
        let fingerprint = r.u64()?;
        let claimed_at = Instant::from_nanos(r.u64()?);
        let expires_at = Instant::from_nanos(r.u64()?);
        let state = match tag {
            1 => State::InFlight,
            2 => {
                let status = r.u16()?;
                let count = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(count).min(64));
                for _ in 0..count {
                    let n = usize::from(r.u16()?);
                    let name = String::from_utf8(r.bytes(n)?.to_vec()).ok()?;
                    let v = r.u32()? as usize;
                    headers.push((name, r.bytes(v)?.to_vec()));
                }
                let b = r.u32()? as usize;
                let body = r.bytes(b)?.to_vec();
                State::Completed {
                    fingerprint,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                    },
                }
            }
            _ => return None,
        };
        r.end()?;
        Some(Record {
            seq,
            key,
            claimed_at,
            expires_at,
            state,
        })
    }
}

/// What a request with a key gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No live record: the request claimed the key and goes upstream.
    First,
    /// The first request's answer, replayed.
    Replay(StoredResponse),
    /// The first request is still in flight: `409` with `Retry-After`.
    Conflict {
        /// When to come back.
        retry_after: Duration,
    },
    /// The key was used with another request: `422`.
    Mismatch,
}

/// What a live `record` of the request's key means for a request with `fingerprint` at `now`;
/// `None` when the record does not count (none, another key's, expired): the request claims
/// the key. A `409`'s `Retry-After` is `retry_after`, or what is left of the in-flight timeout
/// when that is shorter (at least one second: `Retry-After` counts seconds).
pub fn decide(
    record: Option<&Record>,
    key: ScopedKey,
    fingerprint: u64,
    now: Instant,
    retry_after: Duration,
) -> Option<Decision> {
    let record = record.filter(|r| r.key == key && r.is_live(now))?;
    Some(match &record.state {
        State::InFlight => Decision::Conflict {
            retry_after: retry_after
                .min(record.expires_at.saturating_since(now))
                .max(Duration::from_secs(1)),
        },
        State::Completed {
            fingerprint: first,
            response,
        } => {
            if *first == fingerprint {
                Decision::Replay(response.clone())
            } else {
                Decision::Mismatch
            }
        }
    })
}

/// An RFC 9457 problem body (`application/problem+json`) for the filter's refusals.
pub fn problem(status: u16, title: &str, detail: &str) -> Vec<u8> {
    let mut s = String::with_capacity(96 + title.len() + detail.len());
    s.push_str("{\"type\":\"about:blank\",\"title\":");
    push_json_string(&mut s, title);
    s.push_str(",\"status\":");
    crate::codec::push_decimal(&mut s, u64::from(status));
    s.push_str(",\"detail\":");
    push_json_string(&mut s, detail);
    s.push('}');
    s.into_bytes()
}

fn push_json_string(s: &mut String, text: &str) {
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => s.push(' '),
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::vec;

    fn key(k: &str) -> ScopedKey {
        ScopedKey::new("orders", b"route", b"alice", k.as_bytes())
    }

    fn answer() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: b"{\"id\":7}".to_vec(),
        }
    }

    #[test]
    fn records_round_trip() {
        let now = Instant::from_nanos(5);
        let r = Record::in_flight(3, key("a"), now, Duration::from_secs(1));
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        assert_eq!(r.encode().len(), r.encoded_len());
        let c = r.completed(9, answer(), now, Duration::from_secs(10));
        let bytes = c.encode();
        assert_eq!(bytes.len(), c.encoded_len());
        assert_eq!(Record::decode(&bytes), Some(c));
        assert_eq!(Record::decode(EMPTY), None);
        assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Record::decode(&longer), None);
    }

    #[test]
    fn scopes_keep_clients_apart() {
        let a = ScopedKey::new("p", b"r", b"alice", b"k1");
        assert_ne!(a, ScopedKey::new("p", b"r", b"bob", b"k1"));
        assert_ne!(a, ScopedKey::new("p", b"r2", b"alice", b"k1"));
        assert_ne!(a, ScopedKey::new("q", b"r", b"alice", b"k1"));
        // Moving bytes between parts gives another scope.
        assert_ne!(
            ScopedKey::new("p", b"r", b"ab", b"c"),
            ScopedKey::new("p", b"r", b"a", b"bc")
        );
        assert_eq!(a.hex().len(), 32);
    }

    #[test]
    fn decisions_follow_the_draft() {
        let now = Instant::from_nanos(1_000_000_000);
        let ra = Duration::from_secs(2);
        let claim = Record::in_flight(1, key("a"), now, Duration::from_secs(30));
        assert_eq!(decide(None, key("a"), 5, now, ra), None);
        assert_eq!(
            decide(Some(&claim), key("a"), 5, now, ra),
            Some(Decision::Conflict { retry_after: ra })
        );
        // Another key's record does not count.
        assert_eq!(decide(Some(&claim), key("b"), 5, now, ra), None);
        let done = claim.completed(5, answer(), now, Duration::from_secs(60));
        assert_eq!(
            decide(Some(&done), key("a"), 5, now, ra),
            Some(Decision::Replay(answer()))
        );
        assert_eq!(
            decide(Some(&done), key("a"), 6, now, ra),
            Some(Decision::Mismatch)
        );
        let later = now.saturating_add(Duration::from_secs(60));
        assert_eq!(decide(Some(&done), key("a"), 5, later, ra), None);
        // In flight past its timeout: the key runs again.
        let timed_out = now.saturating_add(Duration::from_secs(30));
        assert_eq!(decide(Some(&claim), key("a"), 5, timed_out, ra), None);
        // Retry-After never promises past the timeout, and is at least a second.
        let near = now.saturating_add(Duration::from_millis(29_900));
        assert_eq!(
            decide(Some(&claim), key("a"), 5, near, ra),
            Some(Decision::Conflict {
                retry_after: Duration::from_secs(1)
            })
        );
    }

    #[test]
    fn fingerprints_cover_method_path_headers_and_body() {
        let fp = |m: &str, p: &str, h: Option<&str>, body: &[&str]| {
            let mut f = Fingerprint::new(
                m.as_bytes(),
                p.as_bytes(),
                [h.map(str::as_bytes)].into_iter(),
            );
            for c in body {
                f.body(c.as_bytes());
            }
            f.finish()
        };
        let base = fp("POST", "/o", Some("json"), &["ab", "c"]);
        assert_eq!(base, fp("POST", "/o", Some("json"), &["a", "bc"]));
        assert_ne!(base, fp("PATCH", "/o", Some("json"), &["abc"]));
        assert_ne!(base, fp("POST", "/p", Some("json"), &["abc"]));
        assert_ne!(base, fp("POST", "/o", Some("xml"), &["abc"]));
        assert_ne!(base, fp("POST", "/o", None, &["abc"]));
        assert_ne!(base, fp("POST", "/o", Some("json"), &["abd"]));
    }

    #[test]
    fn problem_bodies_are_json() {
        let body = problem(422, "Idempotency-Key \"x\" reused", "line\nbreak");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 422);
        assert_eq!(v["title"], "Idempotency-Key \"x\" reused");
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        assert!(StoredResponse::keeps_header("content-type"));
        assert!(!StoredResponse::keeps_header("Transfer-Encoding"));
        assert!(!StoredResponse::keeps_header(":status"));
    }
}
