//! The fallback cache: the last good response per route and key, served while open.
//!
//! A closed breaker lets the glue keep a copy of good `GET` responses (2xx but `206`), keyed by
//! the Envoy route and a request key (the `fallback.key` selector, default the path). While the
//! breaker is open, a `GET` for the same route and key is answered with that copy if it is no
//! older than `max_age`, marked with the fallback header; otherwise with the open reply. This
//! is RFC 5861's `stale-if-error`, bounded in age, applied at the route.
//!
//! Memory is bounded: entries live in `max_entries` shared-data slots per breaker
//! (`keel/circuit_breaker/<breaker>/fallback/<slot>`, slot = xxHash64 of route and key modulo
//! `max_entries`), because proxy-wasm shared data can never delete a key. Each entry stores its
//! route and key, so a colliding slot is a miss, never another key's response; a newer
//! response simply overwrites an older one in its slot.
//!
//! Headers that belong to one connection or one client are not kept: pseudo-headers,
//! hop-by-hop headers, `content-length` (the host recomputes it), `set-cookie` (another client
//! must not receive it), `x-envoy-*` (they describe one trip through the proxy, such as
//! `x-envoy-upstream-service-time`), `age` and the fallback header itself (both set when
//! serving).
//!
//! # Entry layout, version 1
//!
//! Little-endian, no padding, variable length, every length checked on decode:
//!
//! | size | field |
//! |---|---|
//! | 1 | layout version, `1` |
//! | 2 | status (u16) |
//! | 8 | `stored_at`: u64 ns |
//! | 2 + n | route: u16 length, UTF-8 bytes |
//! | 2 + n | key: u16 length, UTF-8 bytes |
//! | 2 | header count (at most 100) |
//! | per header | name: u16 length + bytes; value: u16 length + bytes (UTF-8) |
//! | 4 + n | body: u32 length, bytes |
//!
//! Caps: route and key together at most 4096 bytes, headers at most 100 and 16 KiB in all, body
//! at most `max_body_bytes`; a response over a cap is not kept.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use xxhash_rust::xxh64::Xxh64;

use super::wire::FallbackSpec;
use crate::codec::{Reader, Writer};
use crate::config::{ConfigError, FieldPath, Selector};
use crate::time::{Duration, Instant};

/// The entry layout version written in the first byte.
pub const ENTRY_LAYOUT_VERSION: u8 = 1;
/// The default fallback header.
pub const DEFAULT_HEADER: &str = "x-keel-fallback";
const MAX_IDENTITY_BYTES: usize = 4096;
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 16 * 1024;
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
const DEFAULT_MAX_BODY: u32 = 64 * 1024;
pub(crate) const LIMIT_MAX_BODY: u64 = 4 * 1024 * 1024;
const DEFAULT_MAX_ENTRIES: u32 = 256;
pub(crate) const LIMIT_MAX_ENTRIES: u64 = 65_536;

/// The validated `fallback` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FallbackPolicy {
    max_age: Duration,
    max_body_bytes: u32,
    max_entries: u32,
    key: Selector,
    header: String,
}

impl FallbackPolicy {
    /// Validates `fallback` at `path`; `None` when it is present but `"enabled": false`.
    pub(crate) fn from_spec(
        path: &FieldPath,
        spec: &FallbackSpec,
    ) -> Result<Option<FallbackPolicy>, ConfigError> {
        let max_age = spec.max_age.map_or(DEFAULT_MAX_AGE, |d| d.0);
        let max_body_bytes = spec
            .max_body_bytes
            .map_or(DEFAULT_MAX_BODY, |n| n.get_u32());
        let max_entries = spec
            .max_entries
            .map_or(DEFAULT_MAX_ENTRIES, |n| n.get_u32());
        let key = match &spec.key {
            None => Selector::Path,
            Some(text) => Selector::parse(&path.field("key"), text)?,
        };
        let header = spec
            .header
            .as_ref()
            .map_or(DEFAULT_HEADER, |h| h.as_str())
            .to_owned();
        if spec.enabled == Some(false) {
            return Ok(None);
        }
        Ok(Some(FallbackPolicy {
            max_age,
            max_body_bytes,
            max_entries,
            key,
            header,
        }))
    }

    /// The oldest response that may be served.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }
    /// The largest body kept.
    pub fn max_body_bytes(&self) -> u32 {
        self.max_body_bytes
    }
    /// Where the request key comes from.
    pub fn key(&self) -> &Selector {
        &self.key
    }
    /// The header that marks a served fallback.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Whether a response to `method` with `status` (and, when known, a body of
    /// `content_length` bytes) is worth keeping: `GET`, 2xx but `206`, body within the cap.
    /// Lets the glue decide at response headers whether to buffer the body.
    pub fn keeps(&self, method: &str, status: u16, content_length: Option<u64>) -> bool {
        method == "GET"
            && (200..300).contains(&status)
            && status != 206
            && content_length.is_none_or(|n| n <= u64::from(self.max_body_bytes))
    }

    /// Whether a request with `method` may be answered with a fallback: `GET` only.
    pub fn serves(&self, method: &str) -> bool {
        method == "GET"
    }

    /// The shared-data key of the slot for `route` and `key` under breaker `breaker`.
    pub fn slot_key(&self, breaker: &str, route: &str, key: &str) -> String {
        let mut h = Xxh64::new(0);
        h.update(route.as_bytes());
        // A separator so that ("ab", "c") and ("a", "bc") land apart.
        h.update(&[0]);
        h.update(key.as_bytes());
        let slot = h.digest() % u64::from(self.max_entries.max(1));
        format!("keel/circuit_breaker/{breaker}/fallback/{slot}")
    }

    /// The entry to store for a good response, or `None` when it is over a cap.
    pub fn entry<N, V>(
        &self,
        route: &str,
        key: &str,
        status: u16,
        headers: impl IntoIterator<Item = (N, V)>,
        body: &[u8],
        now: Instant,
    ) -> Option<FallbackEntry>
    where
        N: AsRef<str>,
        V: AsRef<str>,
    {
        if body.len() > self.max_body_bytes as usize {
            return None;
        }
        let mut kept = Vec::new();
        for (name, value) in headers {
            let name = name.as_ref().to_ascii_lowercase();
            if !replayable(&name) || name == self.header {
                continue;
            }
            kept.push((name, value.as_ref().to_owned()));
        }
        FallbackEntry::new(route, key, status, kept, body.to_vec(), now)
    }

    /// The stored entry in `stored` if it is for `route` and `key` and fresh at `now`.
    pub fn lookup(
        &self,
        stored: &[u8],
        route: &str,
        key: &str,
        now: Instant,
    ) -> Option<FallbackEntry> {
        let entry = FallbackEntry::decode(stored)?;
        (entry.is_for(route, key)
            && entry.is_fresh(now, self.max_age)
            && entry.body.len() <= self.max_body_bytes as usize)
            .then_some(entry)
    }
}

fn replayable(name: &str) -> bool {
    // `x-envoy-*` response headers describe one trip through the proxy
    // (`x-envoy-upstream-service-time`), not the response.
    !name.starts_with(':')
        && !name.starts_with("x-envoy-")
        && !matches!(
            name,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
                | "te"
                | "trailer"
                | "content-length"
                | "set-cookie"
                | "age"
        )
}

/// One cached response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FallbackEntry {
    route: String,
    key: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    stored_at: Instant,
}

impl FallbackEntry {
    /// An entry, or `None` when it is over a cap (see the module docs) or the status is not
    /// 100..=599. The body cap of the policy is checked by [`FallbackPolicy::entry`]; here only
    /// the layout's own `u32` limit applies.
    pub fn new(
        route: &str,
        key: &str,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        stored_at: Instant,
    ) -> Option<FallbackEntry> {
        let header_bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        let fits = (100..=599).contains(&status)
            && route.len() + key.len() <= MAX_IDENTITY_BYTES
            && headers.len() <= MAX_HEADERS
            && header_bytes <= MAX_HEADER_BYTES
            && u32::try_from(body.len()).is_ok();
        fits.then(|| FallbackEntry {
            route: route.to_owned(),
            key: key.to_owned(),
            status,
            headers,
            body,
            stored_at,
        })
    }

    /// The response status.
    pub fn status(&self) -> u16 {
        self.status
    }
    /// The kept response headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
    /// The response body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// When the response was kept.
    pub fn stored_at(&self) -> Instant {
        self.stored_at
    }
    /// Whether this is the response for `route` and `key`.
    pub fn is_for(&self, route: &str, key: &str) -> bool {
        self.route == route && self.key == key
    }
    /// Whether the entry is at most `max_age` old at `now` (an entry stamped after `now` by
    /// another worker counts as new).
    pub fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        now.saturating_since(self.stored_at) <= max_age
    }

    /// Encodes the entry in layout version 1 (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        // `new` and `decode` enforce the caps, so every length fits its field; `as` cannot
        // truncate here.
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum();
        let len = 1
            + 2
            + 8
            + 4
            + self.route.len()
            + self.key.len()
            + 2
            + header_bytes
            + 4
            + self.body.len();
        let mut w = Writer::with_capacity(len)
            .u8(ENTRY_LAYOUT_VERSION)
            .u16(self.status)
            .u64(self.stored_at.as_nanos())
            .u16(self.route.len() as u16)
            .bytes(self.route.as_bytes())
            .u16(self.key.len() as u16)
            .bytes(self.key.as_bytes())
            .u16(self.headers.len() as u16);
        for (name, value) in &self.headers {
            w = w
                .u16(name.len() as u16)
                .bytes(name.as_bytes())
                .u16(value.len() as u16)
                .bytes(value.as_bytes());
        }
        w.u32(self.body.len() as u32).bytes(&self.body).finish()
    }

    /// Decodes a layout-version-1 entry; `None` for anything else, including an entry over a
    /// cap or with text that is not UTF-8.
    pub fn decode(bytes: &[u8]) -> Option<FallbackEntry> {
        fn text<'a>(r: &mut Reader<'a>) -> Option<&'a str> {
            let len = r.u16()?;
            core::str::from_utf8(r.bytes(usize::from(len))?).ok()
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != ENTRY_LAYOUT_VERSION {
            return None;
        }
        let status = r.u16()?;
        let stored_at = Instant::from_nanos(r.u64()?);
        let route = text(&mut r)?;
        let key = text(&mut r)?;
        let count = usize::from(r.u16()?);
        if count > MAX_HEADERS {
            return None;
        }
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name = text(&mut r)?;
            let value = text(&mut r)?;
            headers.push((name.to_owned(), value.to_owned()));
        }
        let body_len = usize::try_from(r.u32()?).ok()?;
        let body = r.bytes(body_len)?.to_vec();
        r.end()?;
        FallbackEntry::new(route, key, status, headers, body, stored_at)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::circuit_breaker::Breakers;
    use crate::rand::{Rng, SeededRng};
    use alloc::vec;

    fn policy(json: &str) -> crate::circuit_breaker::BreakerPolicy {
        crate::config::load::<Breakers>(json.as_bytes())
            .unwrap()
            .policies()[0]
            .clone()
    }

    fn fallback() -> FallbackPolicy {
        policy(r#"{"breakers": [{"name": "orders", "fallback": {"max_age": "30s", "max_body_bytes": 16}}]}"#)
            .fallback()
            .unwrap()
            .clone()
    }

    fn at(secs: u64) -> Instant {
        Instant::from_nanos(secs * 1_000_000_000)
    }

    #[test]
    fn defaults_and_disabling() {
        let p = policy(r#"{"breakers": [{"name": "o", "fallback": {}}]}"#);
        let f = p.fallback().unwrap();
        assert_eq!(f.max_age(), DEFAULT_MAX_AGE);
        assert_eq!(f.max_body_bytes(), DEFAULT_MAX_BODY);
        assert_eq!(f.key(), &Selector::Path);
        assert_eq!(f.header(), DEFAULT_HEADER);
        let p = policy(r#"{"breakers": [{"name": "o", "fallback": {"enabled": false}}]}"#);
        assert!(p.fallback().is_none());
    }

    #[test]
    fn keeps_good_gets_only() {
        let f = fallback();
        assert!(f.keeps("GET", 200, None));
        assert!(f.keeps("GET", 204, Some(0)));
        assert!(!f.keeps("GET", 206, None));
        assert!(!f.keeps("GET", 304, None));
        assert!(!f.keeps("GET", 503, None));
        assert!(!f.keeps("POST", 200, None));
        assert!(!f.keeps("GET", 200, Some(17)));
        assert!(f.serves("GET") && !f.serves("HEAD") && !f.serves("PUT"));
    }

    #[test]
    fn stores_and_serves_the_same_route_and_key_while_fresh() {
        let f = fallback();
        let headers = vec![
            ("Content-Type", "application/json"),
            (":status", "200"),
            ("set-cookie", "sid=secret"),
            ("content-length", "7"),
            ("connection", "close"),
            ("x-envoy-upstream-service-time", "3"),
            ("etag", "\"v1\""),
        ];
        let e = f
            .entry("orders", "/orders/7", 200, headers, b"{\"id\":7}", at(100))
            .unwrap();
        assert_eq!(
            e.headers(),
            &[
                ("content-type".into(), "application/json".into()),
                ("etag".into(), "\"v1\"".into())
            ]
        );
        let bytes = e.encode();
        assert_eq!(
            f.lookup(&bytes, "orders", "/orders/7", at(130)),
            Some(e.clone())
        );
        assert_eq!(f.lookup(&bytes, "orders", "/orders/7", at(131)), None);
        assert_eq!(f.lookup(&bytes, "orders", "/orders/8", at(101)), None);
        assert_eq!(f.lookup(&bytes, "search", "/orders/7", at(101)), None);
        // Stamped by a worker whose clock read a little later: still fresh.
        assert!(e.is_fresh(at(99), Duration::ZERO));

        let p = policy(r#"{"breakers": [{"name": "orders", "fallback": {}}]}"#);
        let reply = p.fallback_reply(&e, at(112));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, b"{\"id\":7}");
        assert!(reply
            .headers
            .contains(&("x-keel-fallback".into(), "orders".into())));
        assert!(reply.headers.contains(&("age".into(), "12".into())));
    }

    #[test]
    fn refuses_what_is_over_a_cap() {
        let f = fallback();
        let none: [(&str, &str); 0] = [];
        assert!(f.entry("r", "k", 200, none, &[0; 17], at(0)).is_none());
        assert!(f.entry("r", "k", 200, none, &[0; 16], at(0)).is_some());
        let many: Vec<(String, String)> =
            (0..101).map(|i| (format!("x-{i}"), "v".into())).collect();
        assert!(f.entry("r", "k", 200, many, b"", at(0)).is_none());
        let big = vec![("x-big", "v".repeat(MAX_HEADER_BYTES))];
        assert!(f.entry("r", "k", 200, big, b"", at(0)).is_none());
        let long_key = "k".repeat(MAX_IDENTITY_BYTES);
        assert!(f.entry("r", &long_key, 200, none, b"", at(0)).is_none());
    }

    #[test]
    fn slots_are_bounded_and_stable() {
        let f = policy(r#"{"breakers": [{"name": "o", "fallback": {"max_entries": 4}}]}"#)
            .fallback()
            .unwrap()
            .clone();
        let mut slots = Vec::new();
        for i in 0..200 {
            let k = f.slot_key("o", "r", &format!("/p/{i}"));
            assert_eq!(k, f.slot_key("o", "r", &format!("/p/{i}")));
            if !slots.contains(&k) {
                slots.push(k);
            }
        }
        slots.sort();
        assert_eq!(
            slots,
            (0..4)
                .map(|s| format!("keel/circuit_breaker/o/fallback/{s}"))
                .collect::<Vec<_>>()
        );
    }

    /// Property: decoding corrupted entries never panics; what decodes re-encodes identically.
    #[test]
    fn never_decodes_to_garbage() {
        let f = fallback();
        let e = f
            .entry(
                "orders",
                "/o/1",
                200,
                vec![("etag", "x"), ("vary", "accept")],
                b"hello",
                at(5),
            )
            .unwrap();
        let good = e.encode();
        assert_eq!(FallbackEntry::decode(&good), Some(e));
        let mut rng = SeededRng::new(3);
        for _ in 0..3000 {
            let mut bytes = good.clone();
            match rng.below(3) {
                0 => {
                    let i = rng.below(bytes.len() as u64) as usize;
                    bytes[i] = rng.next_u64() as u8;
                }
                1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                _ => bytes.push(rng.next_u64() as u8),
            }
            if let Some(d) = FallbackEntry::decode(&bytes) {
                assert_eq!(d.encode(), bytes);
            }
        }
    }
}
