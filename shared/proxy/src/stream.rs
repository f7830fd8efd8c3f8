//! A stream seen from outside its own callbacks, and what is copied out of it.
//!
//! Filters that hold a request or a response and finish it later (retries, shaping) copy what
//! they need while the host lends it, then act on the stream from the root context's tick or
//! callout callbacks by making it the effective context first. Envoy lends request headers
//! only until the request phase continues, and a body chunk only during its own callback, so
//! the copies are taken there.
//!
//! Header values are bytes: the SDK's string getters panic on a value that is not UTF-8, and
//! headers come from clients and servers. A stream that ended is refused by
//! `set_effective_context` ([`switch_to`] returns `false`): there is nobody left to answer.
//! The SDK aborts the VM on any other unexpected host status, so the calls that act on a
//! stream are made only after a successful [`switch_to`], on a direction the filter holds.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

/// Every request header of the current stream, in order, as (lower-case name, value bytes).
/// Call it in `on_http_request_headers`; empty when the host does not lend them.
pub fn request_headers() -> Vec<(String, Vec<u8>)> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
}

/// The request body bytes the host lends in `on_http_request_body` (the current chunk, or
/// everything buffered after the filter paused), at most `size` bytes.
pub fn request_body(size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Every header of a callout's answer, in order; empty for a failed call (`num_headers` 0),
/// whose headers must not be read (the host refuses and the SDK panics).
pub fn call_response_headers(num_headers: usize) -> Vec<(String, Vec<u8>)> {
    if num_headers == 0 {
        return Vec::new();
    }
    hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default()
}

/// Makes the stream `context_id` the effective context, so that the calls after it act on that
/// stream. `false` when the stream is gone.
pub fn switch_to(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

/// Lets a request held in the request phase go on (of the effective context).
pub fn resume_request() -> bool {
    hostcalls::resume_http_request().is_ok()
}

/// Lets a response held in the response phase go on (of the effective context).
pub fn resume_response() -> bool {
    hostcalls::resume_http_response().is_ok()
}

/// Sets (replacing any value) a header of a response that is still held (of the effective
/// context).
pub fn set_response_header(name: &str, value: &str) -> bool {
    hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, Some(value.as_bytes()))
        .is_ok()
}

/// Sets the root context's tick period (zero stops the ticks). `false` when the host has no
/// ticks.
pub fn set_tick_period(period: std::time::Duration) -> bool {
    hostcalls::set_tick_period(period).is_ok()
}
