//! The configuration contract shared by every filter.
//!
//! A filter's configuration is JSON. It is read in two stages, after the Kuadrant wasm-shim:
//! serde structs that mirror the JSON exactly (`deny_unknown_fields`), then a validation step
//! into typed core values. Both stages report a [`ConfigError`] whose message starts with the
//! field path, so an operator reads `rate-limit: policies[1].limit.per: expected a duration like
//! "1s", got "fast"` in Envoy's log and knows what to fix.
//!
//! The one entry point is [`load`] (a filter's [`Validate`] type from the plugin
//! configuration's bytes), through [`parse_json`], whose errors name the field path. The field
//! types in [`fields`] (durations, bounded numbers, names, header names and values, route lists,
//! local replies) check their rule while the JSON is read; request key selectors
//! ([`Selector`]), rates ([`RateSpec`]) and the [`FieldPath`] used while validating live here.

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::Deserialize;

use crate::time::Duration;

pub mod fields;
mod json;

pub use fields::{
    AnyDuration, Bounded, HeaderName, HeaderValue, LocalReply, LocalReplySpec, Name, Positive,
    PositiveDuration, Ratio, Routes, SortedMap,
};
pub use json::{from_value, parse_json};

/// A filter's validated configuration, read from its wire structs ([`Validate::Wire`], what the
/// JSON says). [`load`] is the one way from the plugin configuration's bytes to it: production
/// glue and tests both go through it.
pub trait Validate: Sized {
    /// The serde structs that mirror the JSON.
    type Wire: serde::de::DeserializeOwned;
    /// Checks what serde cannot (rules between fields, uniqueness, defaults).
    fn validate(wire: &Self::Wire) -> Result<Self, ConfigError>;
}

/// Parses `bytes` ([`parse_json`]) and validates the result: the one entry point of every
/// filter's configuration.
pub fn load<T: Validate>(bytes: &[u8]) -> Result<T, ConfigError> {
    T::validate(&parse_json(bytes)?)
}

/// A refused configuration: where (a field path such as `policies[1].limit.per`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The path of the offending field, `.`-separated, with `[i]` for list items. Empty for the
    /// document as a whole.
    pub path: String,
    /// What was expected and what was found.
    pub message: String,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A field path built up while validating nested configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    /// The document root.
    pub fn root() -> Self {
        FieldPath(String::new())
    }
    /// The path of field `name` below this one.
    pub fn field(&self, name: &str) -> FieldPath {
        if self.0.is_empty() {
            FieldPath(name.to_owned())
        } else {
            FieldPath(format!("{}.{}", self.0, name))
        }
    }
    /// The path of list item `index` of this one.
    pub fn index(&self, index: usize) -> FieldPath {
        FieldPath(format!("{}[{}]", self.0, index))
    }
    /// An error at this path.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.0.clone(), message)
    }
    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parses a duration string at `path`, e.g. `"250ms"`; the error names the path and the value.
pub fn parse_duration(path: &FieldPath, text: &str) -> Result<Duration, ConfigError> {
    Duration::parse(text).map_err(|e| {
        path.error(format!(
            "expected a duration like \"250ms\", \"1s\" or \"1m\", got \"{text}\" ({e})"
        ))
    })
}

/// Parses a duration that must be strictly positive.
pub fn parse_positive_duration(path: &FieldPath, text: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(path, text)?;
    if d.is_zero() {
        return Err(path.error(format!("must be more than zero, got \"{text}\"")));
    }
    Ok(d)
}

/// Where a request's key comes from: one small syntax for every filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `header:<name>`: a request header (name lower-cased).
    Header(String),
    /// `cookie:<name>`: a cookie of the `cookie` header.
    Cookie(String),
    /// `query:<name>`: a query parameter of the path.
    Query(String),
    /// `source_ip`: the client's address without its port.
    SourceIp,
    /// `path`: the request path without its query string.
    Path,
    /// `route`: the Envoy route name.
    Route,
    /// `global`: one key for every request.
    Global,
}

impl Selector {
    /// Parses the selector syntax: `header:x-api-key`, `cookie:session`, `query:user`,
    /// `source_ip`, `path`, `route`, `global`.
    pub fn parse(path: &FieldPath, text: &str) -> Result<Selector, ConfigError> {
        let named = |kind: &str, name: &str, make: fn(String) -> Selector| {
            if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                Err(path.error(format!(
                    "\"{kind}:\" needs a name without spaces, e.g. \"{kind}:x-api-key\""
                )))
            } else {
                Ok(make(name.to_string()))
            }
        };
        match text.split_once(':') {
            Some(("header", name)) => {
                named("header", name, |n| Selector::Header(n.to_ascii_lowercase()))
            }
            Some(("cookie", name)) => named("cookie", name, Selector::Cookie),
            Some(("query", name)) => named("query", name, Selector::Query),
            None if text == "source_ip" => Ok(Selector::SourceIp),
            None if text == "path" => Ok(Selector::Path),
            None if text == "route" => Ok(Selector::Route),
            None if text == "global" => Ok(Selector::Global),
            _ => Err(path.error(format!(
                "expected a key selector (\"header:NAME\", \"cookie:NAME\", \"query:NAME\", \
                 \"source_ip\", \"path\", \"route\" or \"global\"), got \"{text}\""
            ))),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Header(n) => write!(f, "header:{n}"),
            Selector::Cookie(n) => write!(f, "cookie:{n}"),
            Selector::Query(n) => write!(f, "query:{n}"),
            Selector::SourceIp => f.write_str("source_ip"),
            Selector::Path => f.write_str("path"),
            Selector::Route => f.write_str("route"),
            Selector::Global => f.write_str("global"),
        }
    }
}

/// The value of the cookie `name` in a `cookie` header (`a=1; b=2`), if present.
pub fn find_cookie<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The value of the query parameter `name` in a request path (`/a?x=1&y=2`), if present. The
/// value is returned as sent (not percent-decoded): a key only needs to be stable.
pub fn find_query<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The path without its query string or fragment.
pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The address part of `ip:port` or `[v6]:port`; the input when it has no port.
pub fn strip_port(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => address,
    }
}

/// A rate as written in configuration: `{"requests": 100, "per": "1s", "burst": 100}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    /// Requests allowed per `per`.
    pub requests: u64,
    /// The period of `requests`, a duration string.
    pub per: String,
    /// How many requests may come at once (the bucket size); defaults to `requests`.
    #[serde(default)]
    pub burst: Option<u64>,
}

/// A validated rate: `requests` per `period`, with bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period, at least 1.
    pub requests: u64,
    /// The period, more than zero.
    pub period: Duration,
    /// The largest burst, at least 1.
    pub burst: u64,
}

impl Rate {
    /// The time one request's worth of capacity takes to come back (`period / requests`),
    /// at least one nanosecond.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos((self.period.as_nanos() / self.requests.max(1)).max(1))
    }

    /// Validates a [`RateSpec`] found at `path`.
    pub fn from_spec(path: &FieldPath, spec: &RateSpec) -> Result<Rate, ConfigError> {
        if spec.requests == 0 {
            return Err(path
                .field("requests")
                .error("must be at least 1 (to block everything, use a deny rule)"));
        }
        let period = parse_positive_duration(&path.field("per"), &spec.per)?;
        let burst = spec.burst.unwrap_or(spec.requests);
        if burst == 0 {
            return Err(path.field("burst").error("must be at least 1"));
        }
        if period.as_nanos() / spec.requests == 0 {
            return Err(path.field("requests").error(format!(
                "{} per {} is more than one per nanosecond",
                spec.requests, spec.per
            )));
        }
        Ok(Rate {
            requests: spec.requests,
            period,
            burst,
        })
    }
}

/// Validates the list at `path` of the named items every filter configures (`policies`,
/// `breakers`, `pickers`, `services`): at least one `what`, names unique ([`check_names`]), then
/// each item with `one` at its own path.
pub fn validate_each<S, T>(
    path: &FieldPath,
    what: &str,
    items: &[S],
    name: impl Fn(&S) -> &str,
    one: impl Fn(&FieldPath, &S) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    if items.is_empty() {
        return Err(path.error(format!("must list at least one {what}")));
    }
    check_names(path, "name", items.iter().map(&name))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| one(&path.index(i), item))
        .collect()
}

/// Checks that every name in `names` is unique, non-empty and usable in a shared-data key and a
/// metric name (ASCII letters, digits, `-`, `_`, `.`).
pub fn check_names<'a>(
    path: &FieldPath,
    field: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    let mut seen: Vec<&str> = Vec::new();
    for (i, name) in names.enumerate() {
        let at = path.index(i).field(field);
        if name.is_empty() || name.len() > 64 {
            return Err(at.error("must be 1 to 64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(at.error(format!(
                "\"{name}\" may only use ASCII letters, digits, '-' and '_' (it names metrics and shared-data keys)"
            )));
        }
        if seen.contains(&name) {
            return Err(at.error(format!("\"{name}\" is used twice; names must be unique")));
        }
        seen.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> FieldPath {
        FieldPath::root().field("policies").index(1).field("key")
    }

    #[test]
    fn paths_read_like_the_json() {
        assert_eq!(root().as_str(), "policies[1].key");
        assert_eq!(
            root().error("bad").to_string(),
            "policies[1].key: bad".to_string()
        );
    }

    #[test]
    fn selectors_parse() {
        let p = root();
        assert_eq!(
            Selector::parse(&p, "header:X-Api-Key"),
            Ok(Selector::Header("x-api-key".into()))
        );
        assert_eq!(
            Selector::parse(&p, "cookie:session"),
            Ok(Selector::Cookie("session".into()))
        );
        assert_eq!(
            Selector::parse(&p, "query:user"),
            Ok(Selector::Query("user".into()))
        );
        assert_eq!(Selector::parse(&p, "source_ip"), Ok(Selector::SourceIp));
        assert_eq!(Selector::parse(&p, "global"), Ok(Selector::Global));
        let err = Selector::parse(&p, "header:").unwrap_err();
        assert_eq!(err.path, "policies[1].key");
        assert!(Selector::parse(&p, "body:x").is_err());
        assert!(Selector::parse(&p, "ip").is_err());
    }

    #[test]
    fn key_extraction_helpers() {
        assert_eq!(find_cookie("a=1; sid=xyz; b=2", "sid"), Some("xyz"));
        assert_eq!(find_cookie("a=1", "sid"), None);
        assert_eq!(find_query("/x?user=7&y=1", "user"), Some("7"));
        assert_eq!(find_query("/x?y=1&user", "user"), Some(""));
        assert_eq!(find_query("/x", "user"), None);
        assert_eq!(path_only("/a/b?c=1"), "/a/b");
        assert_eq!(strip_port("10.0.0.1:5000"), "10.0.0.1");
        assert_eq!(strip_port("[::1]:5000"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn rates_validate_with_paths() {
        let p = FieldPath::root().field("limit");
        let spec = |requests, per: &str, burst| RateSpec {
            requests,
            per: per.into(),
            burst,
        };
        let r = Rate::from_spec(&p, &spec(100, "1s", None)).unwrap();
        assert_eq!(r.burst, 100);
        assert_eq!(r.emission_interval(), Duration::from_millis(10));
        let e = Rate::from_spec(&p, &spec(100, "fast", None)).unwrap_err();
        assert_eq!(e.path, "limit.per");
        assert!(e.message.contains("\"fast\""), "{e}");
        assert_eq!(
            Rate::from_spec(&p, &spec(0, "1s", None)).unwrap_err().path,
            "limit.requests"
        );
        assert_eq!(
            Rate::from_spec(&p, &spec(1, "1s", Some(0)))
                .unwrap_err()
                .path,
            "limit.burst"
        );
        assert_eq!(
            Rate::from_spec(&p, &spec(1, "0s", None)).unwrap_err().path,
            "limit.per"
        );
    }

    #[test]
    fn rate_spec_refuses_unknown_fields() {
        let r: Result<RateSpec, _> =
            serde_json::from_str(r#"{"requests": 1, "per": "1s", "brust": 2}"#);
        assert!(r.is_err());
    }

    #[test]
    fn names_are_checked() {
        let p = FieldPath::root().field("policies");
        assert!(check_names(&p, "name", ["a", "b-c_1"].into_iter()).is_ok());
        assert_eq!(
            check_names(&p, "name", ["a", "a"].into_iter())
                .unwrap_err()
                .path,
            "policies[1].name"
        );
        assert!(check_names(&p, "name", ["a/b"].into_iter()).is_err());
        assert!(check_names(&p, "name", [""].into_iter()).is_err());
    }
}
