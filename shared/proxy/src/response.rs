//! What a filter reads of the response on its way back to the client.
//!
//! Envoy lends the response headers only during `on_http_response_headers` (and while the
//! filter holds them), a body chunk only during its own `on_http_response_body`; reading them
//! at another time is refused and the SDK panics on the refusal, so a filter that needs a
//! header or the body later copies it here, then. Values are bytes: the SDK's string getters
//! panic on a value that is not UTF-8, and headers come from servers.
//!
//! The response flags say whether Envoy answered in the upstream's place (connection refused
//! or reset, timeout) or the client left: see `keel_core::breaker::Response::from_envoy`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

/// The response's `:status`, if the headers are lent and it is a number (read once for all the
/// stages of a pipeline, [`crate::memo`]).
pub fn status() -> Option<u16> {
    crate::memo::remembered(
        |m| &mut m.status,
        || {
            let value = header(":status")?;
            std::str::from_utf8(&value).ok()?.trim().parse().ok()
        },
    )
}

/// A response header's value as bytes; `None` when absent (or not lent).
pub fn header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// The response's `content-length`, when present and a number.
pub fn content_length() -> Option<u64> {
    let value = header("content-length")?;
    std::str::from_utf8(&value).ok()?.trim().parse().ok()
}

/// Every response header, in order, as (lower-case name, value bytes). Call it in
/// `on_http_response_headers`; empty when the host does not lend them.
pub fn headers() -> Vec<(String, Vec<u8>)> {
    hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default()
}

/// The response body bytes the host lends in `on_http_response_body` (the current chunk when
/// the filter continues each chunk), at most `size` bytes.
pub fn body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Envoy's response flags of the stream (the `response.flags` property: `UF`, `UT`, `DC`,
/// ... as a bit set); `None` on a host without the property. Readable in the response
/// callbacks and in `on_log`.
pub fn flags() -> Option<u64> {
    let bytes = hostcalls::get_property(vec!["response", "flags"])
        .ok()
        .flatten()?;
    let array: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(array))
}
