//! The field types every filter's wire structs are written with: each checks its one rule while
//! the JSON is read, so the error keeps the field path (see [`super::parse_json`]).
//!
//! | type | rule |
//! |---|---|
//! | [`AnyDuration`], [`PositiveDuration`] | `"250ms"`, `"2s"`, `"1m"`, ...; the second more than zero |
//! | [`Bounded<MIN, MAX>`] | a whole number from `MIN` to `MAX` |
//! | [`Ratio`] | a number from 0 to 1 |
//! | [`Name`] | 1 to 64 ASCII letters, digits, `-`, `_` (names metrics and shared-data keys) |
//! | [`HeaderName`] | an RFC 9110 token, kept in lower case |
//! | [`HeaderValue`] | no control character but tab |
//! | [`Routes`] | at least one Envoy route name, none empty, none twice |
//! | [`SortedMap`] | a JSON object as its entries sorted by key (a `BTreeMap`'s reading, less code) |
//! | [`LocalReplySpec`] | `{"status", "body", "headers"}` of a reply the filter sends itself |
//!
//! `docs/config/common.md` states the same rules for operators.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::FieldPath;
use crate::time::Duration;

/// Reads a string and parses it with `parse`, whose error becomes the field's.
fn parse_str<'de, D, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    parse(&text).map_err(de::Error::custom)
}

fn duration(text: &str) -> Result<Duration, String> {
    Duration::parse(text).map_err(|e| {
        format!("expected a duration like \"250ms\", \"1s\" or \"1m\", got \"{text}\" ({e})")
    })
}

/// A duration as written: `"250ms"`, `"1s"`, `"1m"`; zero allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AnyDuration(pub Duration);

impl<'de> Deserialize<'de> for AnyDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, duration).map(AnyDuration)
    }
}

/// A duration more than zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PositiveDuration(pub Duration);

impl<'de> Deserialize<'de> for PositiveDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, |text| {
            let d = duration(text)?;
            if d.is_zero() {
                return Err(format!("must be more than zero, got \"{text}\""));
            }
            Ok(PositiveDuration(d))
        })
    }
}

/// A whole number from `MIN` to `MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bounded<const MIN: u64, const MAX: u64>(u64);

/// A whole number of at least 1.
pub type Positive = Bounded<1, { u64::MAX }>;

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The number, which `MAX` lets fit a `u32`.
    pub fn get_u32(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }
    /// The number, which `MAX` lets fit a `u16`.
    pub fn get_u16(self) -> u16 {
        u16::try_from(self.0).unwrap_or(u16::MAX)
    }
    /// Checks `n` against the bounds.
    pub fn new(n: u64) -> Result<Self, String> {
        if n < MIN {
            Err(format!("at least {MIN}, got {n}"))
        } else if n > MAX {
            Err(format!("at most {MAX}, got {n}"))
        } else {
            Ok(Bounded(n))
        }
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        Bounded::new(n).map_err(de::Error::custom)
    }
}

/// A number from 0 to 1 (a share of requests, a probability).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Ratio(f64);

impl Ratio {
    /// The number.
    pub const fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&x) {
            Ok(Ratio(x))
        } else {
            Err(de::Error::custom(format!("must be from 0 to 1, got {x}")))
        }
    }
}

/// A name that is part of metric names and shared-data keys: 1 to 64 ASCII letters, digits,
/// `-` and `_`. Required wherever a filter asks for one (an absent name reads
/// `policies[0].name: required`); unique among its siblings ([`super::check_names`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Checks `name` against the rule.
    pub fn new(name: &str) -> Result<Name, String> {
        if name.is_empty() || name.len() > 64 {
            return Err(format!("must be 1 to 64 characters, got \"{name}\""));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(format!(
                "\"{name}\" may only use ASCII letters, digits, '-' and '_' (it names metrics and shared-data keys)"
            ));
        }
        Ok(Name(name.to_owned()))
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, Name::new)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `b` may stand in an HTTP field name (an RFC 9110 `tchar`).
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An HTTP header name: an RFC 9110 token (so never a `:pseudo` header), kept in lower case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderName(String);

impl HeaderName {
    /// Checks `name` against the rule; the result is lower case.
    pub fn new(name: &str) -> Result<HeaderName, String> {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!(
                "expected an HTTP header name (a token of letters, digits, '-', ...), got \"{name}\""
            ));
        }
        Ok(HeaderName(name.to_ascii_lowercase()))
    }
    /// The name, lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, HeaderName::new)
    }
}

/// An HTTP header value: no control character but tab (CR, LF and NUL would split or end the
/// header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderValue(String);

impl HeaderValue {
    /// Checks `value` against the rule.
    pub fn new(value: &str) -> Result<HeaderValue, String> {
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(
                "a header value must not hold control characters (CR, LF, NUL, ...)".to_owned(),
            );
        }
        Ok(HeaderValue(value.to_owned()))
    }
    /// The value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, HeaderValue::new)
    }
}

/// The Envoy route names a policy applies to. Absent (`None` where a filter holds an
/// `Option<Routes>`): every route. Present: at least one name, none empty, none twice; an empty
/// list is refused rather than left to match nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes(Vec<String>);

impl Routes {
    /// The names, in configuration order.
    pub fn names(&self) -> &[String] {
        &self.0
    }
    /// Whether `route` is one of them.
    pub fn contains(&self, route: &str) -> bool {
        self.0.iter().any(|r| r == route)
    }
    /// Whether a policy with `routes` applies to the route named `route`: every route when
    /// `routes` is absent; a listed route otherwise (never a request whose route has no name).
    /// The rule is [`crate::routes::matches`], the one every filter selects by.
    pub fn applies(routes: Option<&Routes>, route: Option<&str>) -> bool {
        crate::routes::matches(routes.map(Routes::names), route)
    }
}

/// One route name, refused when empty or already listed.
struct RouteName<'a>(&'a [String]);

impl<'de> de::DeserializeSeed<'de> for RouteName<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let route = String::deserialize(d)?;
        if route.is_empty() {
            return Err(de::Error::custom("must not be empty"));
        }
        if self.0.contains(&route) {
            return Err(de::Error::custom(format!("\"{route}\" is listed twice")));
        }
        Ok(route)
    }
}

impl<'de> Deserialize<'de> for Routes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> Visitor<'de> for List {
            type Value = Routes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of Envoy route names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Routes, A::Error> {
                let mut routes = Vec::new();
                while let Some(route) = seq.next_element_seed(RouteName(&routes))? {
                    routes.push(route);
                }
                if routes.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list matches no route: name at least one route, or omit \"routes\" for every route",
                    ));
                }
                Ok(Routes(routes))
            }
        }
        d.deserialize_seq(List)
    }
}

/// A JSON object read as its entries sorted by key, a repeated key keeping its last value:
/// what a `BTreeMap` gives (same order, same errors), in a `Vec` whose code is a fraction of
/// the B-tree's in a module that only reads a few entries once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedMap<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K, V> SortedMap<K, V> {
    /// The entries, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SortedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<K, V>(PhantomData<(K, V)>);

        impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for Entries<K, V> {
            type Value = SortedMap<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(K, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<K, V>()? {
                    match entries.binary_search_by(|(k, _)| k.cmp(&key)) {
                        Ok(i) => {
                            if let Some(entry) = entries.get_mut(i) {
                                entry.1 = value;
                            }
                        }
                        Err(i) => entries.insert(i, (key, value)),
                    }
                }
                Ok(SortedMap(entries))
            }
        }

        deserializer.deserialize_map(Entries(PhantomData))
    }
}

/// A reply the filter sends itself (the breaker while open, the limiter's refusal, ...), as
/// written: `{"status": 503, "body": "...", "headers": {"content-type": "..."}}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalReplySpec {
    /// The status, 200 to 599; absent: the filter's default.
    #[serde(default)]
    pub status: Option<Bounded<200, 599>>,
    /// The body, at most 64 KiB; absent: the filter's default.
    #[serde(default)]
    pub body: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: Option<SortedMap<HeaderName, HeaderValue>>,
}

/// The largest local-reply body.
pub const MAX_REPLY_BODY: usize = 64 * 1024;

/// The `content-type` of a local reply whose headers name none.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// Headers a local reply may not set: the proxy frames the reply itself.
const FRAMING_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

/// A validated local reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// The status.
    pub status: u16,
    /// The body.
    pub body: String,
    /// The headers, lower-case names; a non-empty body always has a `content-type`.
    pub headers: Vec<(String, String)>,
}

impl LocalReply {
    /// A reply of `status` and `body` with only the `content-type` the body needs.
    pub fn new(status: u16, body: &str) -> LocalReply {
        let mut headers = Vec::new();
        if !body.is_empty() {
            headers.push(("content-type".to_owned(), TEXT_PLAIN.to_owned()));
        }
        LocalReply {
            status,
            body: body.to_owned(),
            headers,
        }
    }

    /// Validates `spec` at `path`: the default's status and body where the spec has none; a
    /// body of at most [`MAX_REPLY_BODY`]; no framing header and none of `reserved` (headers
    /// the filter sets itself, such as `retry-after`); a `content-type` of
    /// [`TEXT_PLAIN`] for a non-empty body that names none.
    pub fn from_spec(
        path: &FieldPath,
        spec: &LocalReplySpec,
        default: &LocalReply,
        reserved: &[&str],
    ) -> Result<LocalReply, super::ConfigError> {
        let status = spec.status.map_or(default.status, Bounded::get_u16);
        let body = spec.body.clone().unwrap_or_else(|| default.body.clone());
        if body.len() > MAX_REPLY_BODY {
            return Err(path.field("body").error("must be at most 64 KiB"));
        }
        let mut headers = Vec::new();
        for (name, value) in spec.headers.iter().flat_map(SortedMap::iter) {
            let name = name.as_str();
            if FRAMING_HEADERS.contains(&name) || reserved.contains(&name) {
                return Err(path
                    .field("headers")
                    .field(name)
                    .error(format!("\"{name}\" is set by the filter or the proxy")));
            }
            headers.push((name.to_owned(), value.as_str().to_owned()));
        }
        if !body.is_empty() && !headers.iter().any(|(n, _)| n == "content-type") {
            headers.push(("content-type".to_owned(), TEXT_PLAIN.to_owned()));
        }
        Ok(LocalReply {
            status,
            body,
            headers,
        })
    }
}

impl Default for LocalReply {
    fn default() -> Self {
        LocalReply::new(503, "")
    }
}

impl fmt::Display for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::super::parse_json;
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        timeout: Option<PositiveDuration>,
        #[serde(default)]
        grace: Option<AnyDuration>,
        #[serde(default)]
        attempts: Option<Bounded<1, 5>>,
        #[serde(default)]
        share: Option<Ratio>,
        #[serde(default)]
        name: Option<Name>,
        #[serde(default)]
        header: Option<HeaderName>,
        #[serde(default)]
        routes: Option<Routes>,
        #[serde(default)]
        reply: Option<LocalReplySpec>,
    }

    fn doc(json: &str) -> Result<Doc, super::super::ConfigError> {
        parse_json::<Doc>(json.as_bytes())
    }

    fn refused(json: &str, path: &str, words: &str) {
        let e = doc(json).unwrap_err();
        assert_eq!(e.path, path, "{json}: {e}");
        assert!(e.message.contains(words), "{json}: {e}");
    }

    #[test]
    fn good_values_read() {
        let d = doc(
            r#"{"timeout": "250ms", "grace": "0s", "attempts": 5, "share": 0.5, "name": "a-b_1",
                "header": "X-Key", "routes": ["a", "b"]}"#,
        )
        .unwrap();
        assert_eq!(
            d.timeout,
            Some(PositiveDuration(Duration::from_millis(250)))
        );
        assert_eq!(d.grace, Some(AnyDuration(Duration::ZERO)));
        assert_eq!(d.attempts.map(Bounded::get), Some(5));
        assert_eq!(d.share.map(Ratio::get), Some(0.5));
        assert_eq!(d.name.as_ref().map(Name::as_str), Some("a-b_1"));
        assert_eq!(d.header.as_ref().map(HeaderName::as_str), Some("x-key"));
        let routes = d.routes.unwrap();
        assert!(Routes::applies(Some(&routes), Some("b")));
        assert!(!Routes::applies(Some(&routes), Some("c")));
        assert!(!Routes::applies(Some(&routes), None));
        assert!(Routes::applies(None, None));
    }

    #[test]
    fn bad_values_are_refused_at_their_field() {
        refused(r#"{"timeout": "fast"}"#, "timeout", "\"fast\"");
        refused(r#"{"timeout": "0s"}"#, "timeout", "more than zero");
        refused(r#"{"timeout": 5}"#, "timeout", "invalid type");
        refused(r#"{"grace": "-1s"}"#, "grace", "expected a duration");
        refused(r#"{"attempts": 0}"#, "attempts", "at least 1, got 0");
        refused(r#"{"attempts": 9}"#, "attempts", "at most 5, got 9");
        refused(r#"{"share": 1.5}"#, "share", "from 0 to 1");
        refused(r#"{"name": "a/b"}"#, "name", "ASCII letters");
        refused(r#"{"name": ""}"#, "name", "1 to 64");
        refused(r#"{"header": "x key"}"#, "header", "header name");
        refused(r#"{"header": ":path"}"#, "header", "header name");
        refused(r#"{"routes": []}"#, "routes", "matches no route");
        refused(r#"{"routes": ["a", ""]}"#, "routes[1]", "must not be empty");
        refused(r#"{"routes": ["a", "a"]}"#, "routes[1]", "listed twice");
        refused(
            r#"{"reply": {"status": 700}}"#,
            "reply.status",
            "at most 599",
        );
        refused(
            r#"{"reply": {"headers": {"X-A": "a\nb"}}}"#,
            "reply.headers.X-A",
            "control characters",
        );
        refused(
            r#"{"reply": {"headers": {"x a": "b"}}}"#,
            "reply.headers.x a",
            "header name",
        );
    }

    #[test]
    fn local_replies_take_defaults_and_a_content_type() {
        let d = doc(r#"{"reply": {"body": "slow down", "headers": {"X-Why": "quota"}}}"#).unwrap();
        let at = FieldPath::root().field("reply");
        let default = LocalReply::new(429, "rate limited\n");
        let r = LocalReply::from_spec(&at, &d.reply.unwrap(), &default, &[]).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.body, "slow down");
        assert_eq!(
            r.headers,
            [
                ("x-why".to_owned(), "quota".to_owned()),
                ("content-type".to_owned(), TEXT_PLAIN.to_owned())
            ]
        );
        let d = doc(r#"{"reply": {"headers": {"Retry-After": "1"}}}"#).unwrap();
        let e = LocalReply::from_spec(&at, &d.reply.unwrap(), &default, &["retry-after"]);
        assert_eq!(e.unwrap_err().path, "reply.headers.retry-after");
        let d = doc(r#"{"reply": {"headers": {"content-length": "1"}}}"#).unwrap();
        assert!(LocalReply::from_spec(&at, &d.reply.unwrap(), &default, &[]).is_err());
        let big = format!(
            r#"{{"reply": {{"body": "{}"}}}}"#,
            "a".repeat(MAX_REPLY_BODY + 1)
        );
        let d = doc(&big).unwrap();
        let e = LocalReply::from_spec(&at, &d.reply.unwrap(), &default, &[]).unwrap_err();
        assert_eq!(e.path, "reply.body");
    }
}
