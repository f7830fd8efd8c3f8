//! What a filter reads of the response on its way back to the client.
//!
//! Envoy lends the response headers only during `on_http_response_headers` (and while the
//! filter holds them), a body chunk only during its own `on_http_response_body`; reading them
//! at another time is refused (a failure [`crate::host`] reports), so a filter that needs a
//! header or the body later copies it here, then. Values are bytes: headers come from servers
//! and need not be UTF-8.
//!
//! The response flags say whether Envoy answered in the upstream's place (connection refused
//! or reset, timeout) or the client left: see `keel_core::circuit_breaker::Response::from_envoy`.

use crate::host::{self, Buffer, Map};

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
    host::get_header(Map::ResponseHeaders, name).ok().flatten()
}

/// The response's `content-length`, when present and a number.
pub fn content_length() -> Option<u64> {
    let value = header("content-length")?;
    std::str::from_utf8(&value).ok()?.trim().parse().ok()
}

/// Every response header, in order, as (lower-case name, value bytes). Call it in
/// `on_http_response_headers`; empty when the host does not lend them.
pub fn headers() -> Vec<(String, Vec<u8>)> {
    host::get_headers(Map::ResponseHeaders).unwrap_or_default()
}

/// The response body bytes the host lends in `on_http_response_body` (the current chunk when
/// the filter continues each chunk), at most `size` bytes.
pub fn body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    host::get_buffer(Buffer::ResponseBody, 0, size).unwrap_or_default()
}

/// Envoy's response flags of the stream (the `response.flags` property: `UF`, `UT`, `DC`,
/// ... as a bit set); `None` on a host without the property. Readable in the response
/// callbacks and in `on_log`.
pub fn flags() -> Option<u64> {
    let bytes = host::get_property(&["response", "flags"]).ok().flatten()?;
    let array: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(array))
}
