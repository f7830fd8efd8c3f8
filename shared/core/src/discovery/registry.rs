//! What a registry answer becomes: validated endpoints, plus the entries that were skipped and
//! why.
//!
//! Registry data is hostile input: anyone who can write a key under the prefix (or register a
//! Consul service) controls it. Every parser therefore turns each entry into either a
//! [`DiscoveredEndpoint`] or a [`SkippedEntry`] whose [`SkipReason`] the glue logs; only a body
//! that is not the expected document at all (truncated, garbage, wrong shape) is a
//! [`ParseError`], and nothing panics.
//!
//! Invariants of a [`RegistryAnswer`]: at most `max_endpoints` endpoints, no two with the same
//! `ip:port`, every address an IPv4 or IPv6 literal (the `ORIGINAL_DST` cluster routes to
//! `ip:port` and cannot resolve names), every port in `1..=65535`, every text field bounded
//! and free of control characters, so that an address can be written into the
//! `x-envoy-original-dst-host` header without any chance of injecting another header.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::time::Duration;

/// The longest address text accepted (the longest IPv6 literal is 45 characters).
pub const MAX_ADDRESS_LEN: usize = 64;
/// The longest zone name accepted.
pub const MAX_ZONE_LEN: usize = 64;
/// The most metadata entries accepted on one endpoint.
pub const MAX_META_ENTRIES: usize = 32;
/// The longest metadata key accepted.
pub const MAX_META_KEY_LEN: usize = 128;
/// The longest metadata value accepted.
pub const MAX_META_VALUE_LEN: usize = 512;
/// The most tags accepted on one endpoint.
pub const MAX_TAGS: usize = 64;
/// The longest tag accepted.
pub const MAX_TAG_LEN: usize = 256;
/// The largest weight accepted. Weights are relative; a bound keeps a picker's table (points
/// per host proportional to weight) from being blown up by one entry.
pub const MAX_WEIGHT: u32 = 65_535;
/// How many skipped entries an answer keeps with their reasons; past that only a count is kept,
/// so that a registry full of junk cannot make the log (or memory) grow without bound.
pub const MAX_SKIPPED_KEPT: usize = 32;
/// How much of an entry's key or id a skip reason quotes.
const MAX_LABEL_CHARS: usize = 96;

/// One endpoint as a registry announced it, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredEndpoint {
    /// The IP literal and port.
    pub address: SocketAddr,
    /// Relative weight, `1..=MAX_WEIGHT`; 1 when the registry gives none.
    pub weight: u32,
    /// Priority level, 0 the highest (as Envoy's priorities); 0 when the registry gives none.
    pub priority: u8,
    /// Locality, e.g. `"us-east-1a"`; empty when unknown.
    pub zone: String,
    /// Whether the registry itself says the endpoint is healthy (Consul's checks; an etcd key
    /// is healthy by being there, since a lapsed lease deletes it).
    pub registry_healthy: bool,
    /// Free-form metadata (etcd `meta`, Consul `Service.Meta`), sorted by key.
    pub meta: Vec<(String, String)>,
    /// Consul `Service.Tags`; empty for other sources.
    pub tags: Vec<String>,
}

impl DiscoveredEndpoint {
    /// The address as `ip:port` (`[v6]:port` for IPv6), the form the shared set and the
    /// `x-envoy-original-dst-host` header use.
    pub fn address_text(&self) -> String {
        format!("{}", self.address)
    }
}

/// Why one registry entry was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The entry (or the etcd value) is not a JSON object.
    NotAnObject,
    /// A required field is absent.
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        /// The field.
        field: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// A field is longer (or has more items) than allowed.
    Oversized {
        /// The field.
        field: &'static str,
        /// The bound it broke.
        limit: usize,
    },
    /// A field that must be base64 is not.
    BadBase64(&'static str),
    /// A field's bytes are not UTF-8.
    NotUtf8(&'static str),
    /// The etcd value is not JSON.
    NotJson,
    /// A text field contains control characters, spaces or non-ASCII where they could inject
    /// headers or log lines.
    UnsafeCharacters(&'static str),
    /// The address is a host name (quoted, shortened), not an IP literal.
    Hostname(String),
    /// The address carries its own port.
    AddressWithPort,
    /// The address is neither an IP literal nor a host name.
    NotAnIpAddress,
    /// The address is an IP literal that cannot receive traffic (unspecified, multicast,
    /// broadcast).
    UnroutableAddress(String),
    /// A number outside its range (port 0 or above 65535, weight 0, ...).
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The smallest allowed value.
        min: u64,
        /// The largest allowed value.
        max: u64,
    },
    /// An etcd key outside the configured prefix.
    OutsidePrefix,
    /// The same `ip:port` appeared earlier in the answer.
    Duplicate(String),
    /// The answer already holds `max_endpoints` endpoints.
    TooManyEndpoints(usize),
}

impl SkipReason {
    /// The field the reason is about, when it is about one (used for config field paths).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            SkipReason::MissingField(f)
            | SkipReason::WrongType { field: f, .. }
            | SkipReason::Oversized { field: f, .. }
            | SkipReason::BadBase64(f)
            | SkipReason::NotUtf8(f)
            | SkipReason::UnsafeCharacters(f)
            | SkipReason::OutOfRange { field: f, .. } => Some(f),
            SkipReason::Hostname(_)
            | SkipReason::AddressWithPort
            | SkipReason::NotAnIpAddress
            | SkipReason::UnroutableAddress(_)
            | SkipReason::Duplicate(_) => Some("address"),
            _ => None,
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotAnObject => f.write_str("not a JSON object"),
            SkipReason::MissingField(field) => write!(f, "missing \"{field}\""),
            SkipReason::WrongType { field, expected } => {
                write!(f, "\"{field}\" must be {expected}")
            }
            SkipReason::Oversized { field, limit } => {
                write!(f, "\"{field}\" is larger than the limit of {limit}")
            }
            SkipReason::BadBase64(field) => write!(f, "\"{field}\" is not valid base64"),
            SkipReason::NotUtf8(field) => write!(f, "\"{field}\" is not UTF-8"),
            SkipReason::NotJson => f.write_str("the value is not JSON"),
            SkipReason::UnsafeCharacters(field) => write!(
                f,
                "\"{field}\" contains control characters, spaces or non-ASCII bytes \
                 (refused: they could inject headers)"
            ),
            SkipReason::Hostname(name) => write!(
                f,
                "address \"{name}\" is a host name; only IPv4/IPv6 literals are accepted \
                 because the ORIGINAL_DST cluster routes to ip:port and resolves no names \
                 (register the endpoint's IP address)"
            ),
            SkipReason::AddressWithPort => f.write_str(
                "\"address\" carries a port; give the IP alone and the port in \"port\"",
            ),
            SkipReason::NotAnIpAddress => f.write_str("\"address\" is not an IP address"),
            SkipReason::UnroutableAddress(ip) => {
                write!(
                    f,
                    "address {ip} cannot receive traffic (unspecified, multicast or broadcast)"
                )
            }
            SkipReason::OutOfRange { field, min, max } => {
                write!(f, "\"{field}\" must be {min} to {max}")
            }
            SkipReason::OutsidePrefix => f.write_str("the key is outside the configured prefix"),
            SkipReason::Duplicate(address) => {
                write!(
                    f,
                    "{address} appears earlier in the answer; the first one is kept"
                )
            }
            SkipReason::TooManyEndpoints(limit) => {
                write!(
                    f,
                    "the answer has more than max_endpoints = {limit} endpoints"
                )
            }
        }
    }
}

/// An entry left out of an answer: which one (an etcd key or `[i] (<id>)` for Consul, quoted
/// safely for a log line) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedEntry {
    /// The entry, escaped and shortened so that logging it is safe.
    pub entry: String,
    /// Why it was skipped.
    pub reason: SkipReason,
}

impl fmt::Display for SkippedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped registry entry {}: {}", self.entry, self.reason)
    }
}

/// A registry answer, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryAnswer {
    /// The endpoints, in the registry's order, unique by address, at most `max_endpoints`.
    pub endpoints: Vec<DiscoveredEndpoint>,
    /// The first [`MAX_SKIPPED_KEPT`] skipped entries with their reasons.
    pub skipped: Vec<SkippedEntry>,
    /// How many more entries were skipped beyond those listed.
    pub skipped_omitted: usize,
    /// etcd's `header.revision` (the store's revision when it answered); `None` for others.
    pub revision: Option<u64>,
}

impl RegistryAnswer {
    /// How many entries were skipped in all.
    pub fn skipped_total(&self) -> usize {
        self.skipped.len().saturating_add(self.skipped_omitted)
    }
}

/// Why a registry answer was refused as a whole. The last good set keeps serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The body is not JSON (truncated or garbage); serde_json's description.
    NotJson(String),
    /// The body is JSON but not the registry's document (e.g. not an array for Consul).
    Shape(&'static str),
    /// etcd's answer has no readable `header.revision`.
    MissingRevision,
    /// The body is larger than the configured bound.
    TooLarge {
        /// The body's size.
        size: usize,
        /// The bound.
        limit: usize,
    },
    /// The registry listed entries but none was valid. Refused rather than applied: a
    /// registry that suddenly holds only junk is far more likely broken or tampered with than
    /// a service that lost every instance, and applying it would drop all traffic.
    NoValidEntries {
        /// How many entries were skipped.
        skipped: usize,
        /// The first reasons, for the log.
        first: Vec<SkippedEntry>,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotJson(e) => write!(f, "the registry's answer is not JSON: {e}"),
            ParseError::Shape(what) => write!(f, "unexpected registry answer: {what}"),
            ParseError::MissingRevision => {
                f.write_str("the etcd answer has no readable header.revision")
            }
            ParseError::TooLarge { size, limit } => {
                write!(
                    f,
                    "the registry's answer is {size} bytes, above the limit of {limit}"
                )
            }
            ParseError::NoValidEntries { skipped, first } => {
                write!(f, "none of the {skipped} registry entries is valid")?;
                if let Some(e) = first.first() {
                    write!(f, " (first: {} {})", e.entry, e.reason)?;
                }
                Ok(())
            }
        }
    }
}

/// Bounds that a parser enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// The most endpoints kept; further valid entries are skipped.
    pub max_endpoints: usize,
    /// The largest body parsed at all. The glue should not read more than this from the host.
    pub max_body_bytes: usize,
}

impl ParseLimits {
    /// Limits for `max_endpoints`: a body of up to 64 KiB plus 16 KiB per endpoint (a Consul
    /// entry with node metadata and several checks' output runs to several KiB).
    pub fn for_endpoints(max_endpoints: usize) -> Self {
        ParseLimits {
            max_endpoints,
            max_body_bytes: max_endpoints
                .saturating_mul(16 * 1024)
                .saturating_add(64 * 1024),
        }
    }

    pub(crate) fn check_size(&self, body: &[u8]) -> Result<(), ParseError> {
        if body.len() > self.max_body_bytes {
            return Err(ParseError::TooLarge {
                size: body.len(),
                limit: self.max_body_bytes,
            });
        }
        Ok(())
    }
}

/// An HTTP callout the glue makes to the registry, as values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRequest {
    /// The Envoy cluster to call.
    pub cluster: String,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path with its query string.
    pub path: String,
    /// The `:authority` to send.
    pub authority: String,
    /// The request body, if any (JSON).
    pub body: Option<Vec<u8>>,
    /// How long the glue lets the callout run.
    pub timeout: Duration,
}

impl RegistryRequest {
    /// The request headers, pseudo-headers first, in the order proxy-wasm expects.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(5);
        headers.push((":method", self.method.to_owned()));
        headers.push((":path", self.path.clone()));
        headers.push((":authority", self.authority.clone()));
        if self.body.is_some() {
            headers.push(("content-type", "application/json".to_owned()));
        }
        headers.push(("user-agent", "keel-discovery".to_owned()));
        headers
    }
}

/// Gathers entries into an answer: deduplicates, bounds the count, keeps the first reasons.
pub(crate) struct Collector {
    limits: ParseLimits,
    seen: BTreeSet<SocketAddr>,
    answer: RegistryAnswer,
    entries: usize,
}

impl Collector {
    pub(crate) fn new(limits: ParseLimits) -> Self {
        Collector {
            limits,
            seen: BTreeSet::new(),
            answer: RegistryAnswer::default(),
            entries: 0,
        }
    }

    /// Adds one entry's outcome; `label` is only computed for skipped entries.
    pub(crate) fn push(
        &mut self,
        label: impl FnOnce() -> String,
        entry: Result<DiscoveredEndpoint, SkipReason>,
    ) {
        self.entries = self.entries.saturating_add(1);
        let reason = match entry {
            Ok(endpoint) if self.seen.contains(&endpoint.address) => {
                SkipReason::Duplicate(endpoint.address_text())
            }
            Ok(_) if self.answer.endpoints.len() >= self.limits.max_endpoints => {
                SkipReason::TooManyEndpoints(self.limits.max_endpoints)
            }
            Ok(endpoint) => {
                self.seen.insert(endpoint.address);
                self.answer.endpoints.push(endpoint);
                return;
            }
            Err(reason) => reason,
        };
        if self.answer.skipped.len() < MAX_SKIPPED_KEPT {
            self.answer.skipped.push(SkippedEntry {
                entry: label(),
                reason,
            });
        } else {
            self.answer.skipped_omitted = self.answer.skipped_omitted.saturating_add(1);
        }
    }

    /// The answer; refused when there were entries and none survived (see
    /// [`ParseError::NoValidEntries`]).
    pub(crate) fn finish(self, revision: Option<u64>) -> Result<RegistryAnswer, ParseError> {
        let mut answer = self.answer;
        if self.entries > 0 && answer.endpoints.is_empty() {
            return Err(ParseError::NoValidEntries {
                skipped: answer.skipped_total(),
                first: answer.skipped,
            });
        }
        answer.revision = revision;
        Ok(answer)
    }
}

/// Quotes untrusted text for a log line: escaped, shortened.
pub(crate) fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for (i, c) in text.chars().enumerate() {
        if i == MAX_LABEL_CHARS {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Whether `text` is safe to put in a header value or a log line: visible ASCII only.
pub(crate) fn is_visible_ascii(text: &str) -> bool {
    text.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Validates an address field: an IPv4 or IPv6 literal (IPv6 may be bracketed).
pub fn parse_ip(text: &str) -> Result<IpAddr, SkipReason> {
    if text.is_empty() {
        return Err(SkipReason::MissingField("address"));
    }
    if text.len() > MAX_ADDRESS_LEN {
        return Err(SkipReason::Oversized {
            field: "address",
            limit: MAX_ADDRESS_LEN,
        });
    }
    if !is_visible_ascii(text) {
        return Err(SkipReason::UnsafeCharacters("address"));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let unroutable = match ip {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if unroutable {
            return Err(SkipReason::UnroutableAddress(format!("{ip}")));
        }
        return Ok(ip);
    }
    if text.parse::<SocketAddr>().is_ok() {
        return Err(SkipReason::AddressWithPort);
    }
    let hostname = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && text.bytes().any(|b| b.is_ascii_alphabetic());
    if hostname {
        return Err(SkipReason::Hostname(
            text.chars().take(MAX_LABEL_CHARS).collect(),
        ));
    }
    Err(SkipReason::NotAnIpAddress)
}

/// Validates a zone name: visible ASCII, at most [`MAX_ZONE_LEN`] bytes (may be empty).
pub fn check_zone(zone: &str) -> Result<(), SkipReason> {
    if zone.len() > MAX_ZONE_LEN {
        return Err(SkipReason::Oversized {
            field: "zone",
            limit: MAX_ZONE_LEN,
        });
    }
    if !is_visible_ascii(zone) {
        return Err(SkipReason::UnsafeCharacters("zone"));
    }
    Ok(())
}

/// The fields of one endpoint, as the JSON gave them, before validation.
#[derive(Default)]
pub(crate) struct RawEndpoint<'a> {
    pub address: Option<&'a Value>,
    pub port: Option<&'a Value>,
    pub weight: Option<&'a Value>,
    pub priority: Option<&'a Value>,
    pub zone: Option<&'a Value>,
    pub meta: Option<&'a Value>,
    pub tags: Option<&'a Value>,
    pub registry_healthy: bool,
}

/// A JSON integer (or, for leniency with hand-written registrations, a decimal string).
fn integer(value: &Value, field: &'static str) -> Result<i128, SkipReason> {
    let wrong = SkipReason::WrongType {
        field,
        expected: "an integer",
    };
    if let Some(n) = value.as_u64() {
        return Ok(i128::from(n));
    }
    if let Some(n) = value.as_i64() {
        return Ok(i128::from(n));
    }
    match value.as_str() {
        Some(s) if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<i128>().map_err(|_| wrong)
        }
        _ => Err(wrong),
    }
}

fn in_range(value: i128, field: &'static str, min: u64, max: u64) -> Result<u64, SkipReason> {
    if value < i128::from(min) || value > i128::from(max) {
        return Err(SkipReason::OutOfRange { field, min, max });
    }
    u64::try_from(value).map_err(|_| SkipReason::OutOfRange { field, min, max })
}

fn text<'a>(value: &'a Value, field: &'static str) -> Result<&'a str, SkipReason> {
    value.as_str().ok_or(SkipReason::WrongType {
        field,
        expected: "a string",
    })
}

/// Validates a port number (`1..=65535`).
pub(crate) fn port_from(value: i128) -> Result<u16, SkipReason> {
    let n = in_range(value, "port", 1, u64::from(u16::MAX))?;
    u16::try_from(n).map_err(|_| SkipReason::OutOfRange {
        field: "port",
        min: 1,
        max: u64::from(u16::MAX),
    })
}

/// Validates a weight (`1..=MAX_WEIGHT`).
pub(crate) fn weight_from(value: i128) -> Result<u32, SkipReason> {
    let n = in_range(value, "weight", 1, u64::from(MAX_WEIGHT))?;
    u32::try_from(n).map_err(|_| SkipReason::OutOfRange {
        field: "weight",
        min: 1,
        max: u64::from(MAX_WEIGHT),
    })
}

/// Validates a priority (`0..=255`).
pub(crate) fn priority_from(value: i128) -> Result<u8, SkipReason> {
    let n = in_range(value, "priority", 0, u64::from(u8::MAX))?;
    u8::try_from(n).map_err(|_| SkipReason::OutOfRange {
        field: "priority",
        min: 0,
        max: u64::from(u8::MAX),
    })
}

fn meta_from(value: &Value) -> Result<Vec<(String, String)>, SkipReason> {
    let map = value.as_object().ok_or(SkipReason::WrongType {
        field: "meta",
        expected: "an object of strings",
    })?;
    if map.len() > MAX_META_ENTRIES {
        return Err(SkipReason::Oversized {
            field: "meta",
            limit: MAX_META_ENTRIES,
        });
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let v = v.as_str().ok_or(SkipReason::WrongType {
            field: "meta",
            expected: "an object of strings",
        })?;
        if k.len() > MAX_META_KEY_LEN || v.len() > MAX_META_VALUE_LEN {
            return Err(SkipReason::Oversized {
                field: "meta",
                limit: MAX_META_VALUE_LEN,
            });
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(SkipReason::UnsafeCharacters("meta"));
        }
        out.push((k.clone(), v.to_owned()));
    }
    // serde_json's map without `preserve_order` is a BTreeMap: already sorted by key.
    Ok(out)
}

fn tags_from(value: &Value) -> Result<Vec<String>, SkipReason> {
    let wrong = SkipReason::WrongType {
        field: "tags",
        expected: "an array of strings",
    };
    let items = value.as_array().ok_or(wrong.clone())?;
    if items.len() > MAX_TAGS {
        return Err(SkipReason::Oversized {
            field: "tags",
            limit: MAX_TAGS,
        });
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let tag = item.as_str().ok_or(wrong.clone())?;
        if tag.len() > MAX_TAG_LEN {
            return Err(SkipReason::Oversized {
                field: "tags",
                limit: MAX_TAG_LEN,
            });
        }
        if tag.chars().any(char::is_control) {
            return Err(SkipReason::UnsafeCharacters("tags"));
        }
        out.push(tag.to_owned());
    }
    Ok(out)
}

/// A field that is present and not JSON `null` (which counts as absent).
fn given(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

impl RawEndpoint<'_> {
    /// Validates every field. JSON `null` counts as absent for optional fields.
    pub(crate) fn validate(&self) -> Result<DiscoveredEndpoint, SkipReason> {
        let address = given(self.address).ok_or(SkipReason::MissingField("address"))?;
        let ip = parse_ip(text(address, "address")?)?;
        let port = given(self.port).ok_or(SkipReason::MissingField("port"))?;
        let port = port_from(integer(port, "port")?)?;
        let weight = match given(self.weight) {
            Some(v) => weight_from(integer(v, "weight")?)?,
            None => 1,
        };
        let priority = match given(self.priority) {
            Some(v) => priority_from(integer(v, "priority")?)?,
            None => 0,
        };
        let zone = match given(self.zone) {
            Some(v) => text(v, "zone")?,
            None => "",
        };
        check_zone(zone)?;
        let meta = given(self.meta)
            .map(meta_from)
            .transpose()?
            .unwrap_or_default();
        let tags = given(self.tags)
            .map(tags_from)
            .transpose()?
            .unwrap_or_default();
        Ok(DiscoveredEndpoint {
            address: SocketAddr::new(ip, port),
            weight,
            priority,
            zone: zone.to_owned(),
            registry_healthy: self.registry_healthy,
            meta,
            tags,
        })
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::string::ToString;
    use serde_json::json;

    #[test]
    fn accepts_ip_literals_only() {
        assert!(parse_ip("10.0.0.1").is_ok());
        assert!(parse_ip("::1").is_ok());
        assert!(parse_ip("[fe80::1]").is_ok());
        assert!(matches!(
            parse_ip("users.internal"),
            Err(SkipReason::Hostname(_))
        ));
        let msg = parse_ip("users.internal").unwrap_err().to_string();
        assert!(msg.contains("ORIGINAL_DST"), "{msg}");
        assert_eq!(parse_ip("10.0.0.1:80"), Err(SkipReason::AddressWithPort));
        assert_eq!(parse_ip("[::1]:80"), Err(SkipReason::AddressWithPort));
        assert_eq!(
            parse_ip("10.0.0.1\r\nx-evil: 1"),
            Err(SkipReason::UnsafeCharacters("address"))
        );
        assert_eq!(
            parse_ip("10.0.0.1 "),
            Err(SkipReason::UnsafeCharacters("address"))
        );
        assert_eq!(parse_ip("1.2.3.4.5"), Err(SkipReason::NotAnIpAddress));
        assert_eq!(parse_ip("10.0.0.256"), Err(SkipReason::NotAnIpAddress));
        assert!(matches!(
            parse_ip("0.0.0.0"),
            Err(SkipReason::UnroutableAddress(_))
        ));
        assert!(matches!(
            parse_ip("224.0.0.1"),
            Err(SkipReason::UnroutableAddress(_))
        ));
        assert!(matches!(
            parse_ip("::"),
            Err(SkipReason::UnroutableAddress(_))
        ));
        let long = "1".repeat(MAX_ADDRESS_LEN + 1);
        assert!(matches!(parse_ip(&long), Err(SkipReason::Oversized { .. })));
    }

    #[test]
    fn validates_fields_with_reasons() {
        let good = json!({"address": "10.0.0.1", "port": 8080, "weight": 3, "priority": 1,
                          "zone": "eu-1a", "meta": {"version": "v2"}});
        let raw = |v: &'static str| -> Result<DiscoveredEndpoint, SkipReason> {
            let mut value = good.clone();
            let patch: Value = serde_json::from_str(v).unwrap();
            for (k, x) in patch.as_object().unwrap() {
                value[k] = x.clone();
            }
            RawEndpoint {
                address: value.get("address"),
                port: value.get("port"),
                weight: value.get("weight"),
                priority: value.get("priority"),
                zone: value.get("zone"),
                meta: value.get("meta"),
                tags: None,
                registry_healthy: true,
            }
            .validate()
        };
        let ok = raw("{}").unwrap();
        assert_eq!(ok.address_text(), "10.0.0.1:8080");
        assert_eq!((ok.weight, ok.priority, ok.zone.as_str()), (3, 1, "eu-1a"));
        assert_eq!(ok.meta, [("version".to_string(), "v2".to_string())]);
        assert!(matches!(
            raw(r#"{"port": 0}"#),
            Err(SkipReason::OutOfRange { field: "port", .. })
        ));
        assert!(matches!(
            raw(r#"{"port": 65536}"#),
            Err(SkipReason::OutOfRange { field: "port", .. })
        ));
        assert!(matches!(
            raw(r#"{"port": -1}"#),
            Err(SkipReason::OutOfRange { field: "port", .. })
        ));
        assert!(matches!(
            raw(r#"{"port": 1.5}"#),
            Err(SkipReason::WrongType { field: "port", .. })
        ));
        assert_eq!(raw(r#"{"port": "8081"}"#).unwrap().address.port(), 8081);
        assert!(matches!(
            raw(r#"{"port": null}"#),
            Err(SkipReason::MissingField("port"))
        ));
        assert!(matches!(
            raw(r#"{"weight": 0}"#),
            Err(SkipReason::OutOfRange {
                field: "weight",
                ..
            })
        ));
        assert_eq!(raw(r#"{"weight": null}"#).unwrap().weight, 1);
        assert!(matches!(
            raw(r#"{"priority": 256}"#),
            Err(SkipReason::OutOfRange { .. })
        ));
        assert!(matches!(
            raw(r#"{"zone": 7}"#),
            Err(SkipReason::WrongType { field: "zone", .. })
        ));
        assert!(matches!(
            raw(r#"{"zone": "a\nb"}"#),
            Err(SkipReason::UnsafeCharacters("zone"))
        ));
        assert!(matches!(
            raw(r#"{"meta": {"a": 1}}"#),
            Err(SkipReason::WrongType { field: "meta", .. })
        ));
        assert!(matches!(
            raw(r#"{"address": ["10.0.0.1"]}"#),
            Err(SkipReason::WrongType { .. })
        ));
    }

    #[test]
    fn collector_dedups_bounds_and_refuses_all_junk() {
        let ep = |last: u8| DiscoveredEndpoint {
            address: SocketAddr::new(IpAddr::from([10, 0, 0, last]), 80),
            weight: 1,
            priority: 0,
            zone: String::new(),
            registry_healthy: true,
            meta: Vec::new(),
            tags: Vec::new(),
        };
        let mut c = Collector::new(ParseLimits::for_endpoints(2));
        c.push(|| "a".into(), Ok(ep(1)));
        c.push(|| "b".into(), Ok(ep(1)));
        c.push(|| "c".into(), Ok(ep(2)));
        c.push(|| "d".into(), Ok(ep(3)));
        for _ in 0..100 {
            c.push(|| "junk".into(), Err(SkipReason::NotAnObject));
        }
        let answer = c.finish(None).unwrap();
        assert_eq!(answer.endpoints.len(), 2);
        assert!(matches!(answer.skipped[0].reason, SkipReason::Duplicate(_)));
        assert_eq!(answer.skipped[1].reason, SkipReason::TooManyEndpoints(2));
        assert_eq!(answer.skipped.len(), MAX_SKIPPED_KEPT);
        assert_eq!(answer.skipped_total(), 102);

        let mut c = Collector::new(ParseLimits::for_endpoints(2));
        c.push(|| "x".into(), Err(SkipReason::NotAnObject));
        assert!(matches!(
            c.finish(None),
            Err(ParseError::NoValidEntries { skipped: 1, .. })
        ));
        // No entries at all is a real answer: the service has no instances.
        assert!(Collector::new(ParseLimits::for_endpoints(2))
            .finish(None)
            .is_ok());
    }

    #[test]
    fn labels_are_quoted_safely() {
        assert_eq!(quote("a\r\nb"), "\"a\\r\\nb\"");
        assert!(quote(&"x".repeat(500)).len() < 110);
    }
}
