//! What a filter reads of the current request.

use crate::host::{self, Map};
use keel_core::config::{find_cookie, find_query, path_only, strip_port, Selector};

/// A request header's value as bytes (`None` when absent). Bytes, not `String`: headers come
/// from clients and need not be UTF-8.
pub fn header(name: &str) -> Option<Vec<u8>> {
    host::get_header(Map::RequestHeaders, name).ok().flatten()
}

/// A request header's value as text, if it is UTF-8.
pub fn header_str(name: &str) -> Option<String> {
    header(name).and_then(|v| String::from_utf8(v).ok())
}

/// Sets (or replaces) a request header.
pub fn set_header(name: &str, value: &str) {
    let _ = host::set_header(Map::RequestHeaders, name, Some(value.as_bytes()));
}

/// Removes a request header (every value of it).
pub fn remove_header(name: &str) {
    let _ = host::set_header(Map::RequestHeaders, name, None);
}

/// A response header's value as text, if present and UTF-8.
pub fn response_header(name: &str) -> Option<String> {
    host::get_header(Map::ResponseHeaders, name)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
}

/// Adds a response header.
pub fn add_response_header(name: &str, value: &str) {
    let _ = host::add_header(Map::ResponseHeaders, name, value.as_bytes());
}

/// A host property as bytes (`["route_name"]`, `["source", "address"]`, ...).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    host::get_property(path).ok().flatten()
}

/// Sets a property of the current stream (a hand-off to the other filters of the stream);
/// `false` when the host refused it (reported once by [`host`]).
pub fn set_property(path: &[&str], value: &[u8]) -> bool {
    host::set_property(path, value).is_ok()
}

/// A host property as text.
pub fn property_str(path: &[&str]) -> Option<String> {
    property(path).and_then(|v| String::from_utf8(v).ok())
}

/// A host property holding an integer (Envoy encodes them as 8 little-endian bytes).
pub fn property_i64(path: &[&str]) -> Option<i64> {
    let bytes = property(path)?;
    let array: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(i64::from_le_bytes(array))
}

/// The Envoy route name of the current request, if the route has one.
pub fn route_name() -> Option<String> {
    crate::routing::route_name()
}

/// The request's key for `selector`: the bytes that identify its bucket, breaker or host.
/// `None` when the request does not carry it (no such header, cookie or parameter).
pub fn key(selector: &Selector) -> Option<Vec<u8>> {
    match selector {
        Selector::Header(name) => header(name),
        Selector::Cookie(name) => {
            let cookies = header_str("cookie")?;
            find_cookie(&cookies, name).map(|v| v.as_bytes().to_vec())
        }
        Selector::Query(name) => {
            let path = header_str(":path")?;
            find_query(&path, name).map(|v| v.as_bytes().to_vec())
        }
        Selector::SourceIp => {
            let address = property_str(&["source", "address"])?;
            Some(strip_port(&address).as_bytes().to_vec())
        }
        Selector::Path => header_str(":path").map(|p| path_only(&p).as_bytes().to_vec()),
        Selector::Route => route_name().map(String::into_bytes),
        Selector::Global => Some(Vec::new()),
    }
}
