//! A stream seen from outside its own callbacks, and what is copied out of it.
//!
//! Filters that hold a request or a response and finish it later (retries, shaping) copy what
//! they need while the host lends it, then act on the stream from the root context's tick or
//! callout callbacks by making it the effective context first. Envoy lends request headers
//! only until the request phase continues, and a body chunk only during its own callback, so
//! the copies are taken there.
//!
//! Header values are bytes: headers come from clients and servers and need not be UTF-8. A
//! stream that ended is refused by `set_effective_context` ([`switch_to`] returns `false`):
//! there is nobody left to answer. A held stream is resumed with the filter's
//! [`Stage`](crate::stage::Stage) (`resume_request` / `resume_response`), which switches to it.

use crate::host::{self, Buffer, Map};

/// Every request header of the current stream, in order, as (lower-case name, value bytes).
/// Call it in `on_http_request_headers`; empty when the host does not lend them.
pub fn request_headers() -> Vec<(String, Vec<u8>)> {
    host::get_headers(Map::RequestHeaders).unwrap_or_default()
}

/// The request body bytes the host lends in `on_http_request_body` (the current chunk, or
/// everything buffered after the filter paused), at most `size` bytes.
pub fn request_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    host::get_buffer(Buffer::RequestBody, 0, size).unwrap_or_default()
}

/// The request body bytes from `start` to `size` that the host lends in
/// `on_http_request_body` while the filter buffers (returns `Pause`): the bytes that came since
/// the last callback when `start` is what was read before.
pub fn request_body_from(start: usize, size: usize) -> Vec<u8> {
    if size <= start {
        return Vec::new();
    }
    host::get_buffer(Buffer::RequestBody, start, size - start).unwrap_or_default()
}

/// Every header of a callout's answer, in order; empty for a failed call (`num_headers` 0),
/// whose headers must not be read (the host refuses).
pub fn call_response_headers(num_headers: usize) -> Vec<(String, Vec<u8>)> {
    if num_headers == 0 {
        return Vec::new();
    }
    host::get_headers(Map::CallResponseHeaders).unwrap_or_default()
}

/// Makes the stream `context_id` the effective context, so that the calls after it act on that
/// stream. `false` when the stream is gone.
pub fn switch_to(context_id: u32) -> bool {
    host::set_effective_context(context_id).is_ok()
}

/// Sets (replacing any value) a header of a response that is still held (of the effective
/// context).
pub fn set_response_header(name: &str, value: &str) -> bool {
    host::set_header(Map::ResponseHeaders, name, Some(value.as_bytes())).is_ok()
}
