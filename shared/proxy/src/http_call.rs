//! HTTP callouts: requests a filter sends to an Envoy cluster on its own, and reading their
//! answers in `on_http_call_response`.
//!
//! A failed call (connection refused, reset, no healthy host) reaches the module as a response
//! with no headers at all; its headers must then not be read: the host refuses the read (a
//! failure [`crate::host`] would report). Every reader here takes the callback's
//! `num_headers` and answers `None` when it is 0. Bodies are read only up to a bound the caller
//! gives, so a hostile or broken server cannot make a VM copy megabytes it will refuse anyway.

use keel_core::time::Duration;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::host::{self, Buffer, Map};

/// Sends a request to `cluster` (headers with the pseudo-headers `:method`, `:path` and
/// `:authority` first); the answer comes to the root context's `on_http_call_response` with the
/// returned token. Errors when the host refuses, e.g. for an unknown cluster (Envoy answers
/// BadArgument) or a host without callouts.
pub fn dispatch(
    cluster: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let millis = timeout.as_millis().clamp(1, u64::from(u32::MAX));
    hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        body,
        Vec::new(),
        std::time::Duration::from_millis(millis),
    )
}

/// The answer's status; `None` for a failed call (no headers) or a missing or malformed
/// `:status`.
pub fn status(num_headers: usize) -> Option<u16> {
    let value = header(num_headers, ":status")?;
    std::str::from_utf8(&value).ok()?.trim().parse().ok()
}

/// One header of the answer as bytes; `None` when absent or the call failed.
pub fn header(num_headers: usize, name: &str) -> Option<Vec<u8>> {
    if num_headers == 0 {
        return None;
    }
    host::get_header(Map::CallResponseHeaders, name)
        .ok()
        .flatten()
}

/// The answer's body, read only if it is at most `max` bytes: `Err(size)` when it is larger
/// (nothing is copied). An empty or unreadable body is empty.
pub fn body(body_size: usize, max: usize) -> Result<Vec<u8>, usize> {
    if body_size > max {
        return Err(body_size);
    }
    if body_size == 0 {
        return Ok(Vec::new());
    }
    Ok(host::get_buffer(Buffer::CallResponseBody, 0, body_size).unwrap_or_default())
}
