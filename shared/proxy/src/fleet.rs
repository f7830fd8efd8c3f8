//! Callouts to the fleet store (Redis behind Webdis in an Envoy cluster): send a
//! [`Command`] and read its answer in `on_http_call_response`.
//!
//! The wire (encoding, reply parsing, errors) is `keel_core::fleet`; this is the host side:
//! one `POST /` per command to the store's cluster with its timeout, and the answer read
//! through [`crate::http_call`] (a failed call has no headers, the body is read only up to
//! [`MAX_REPLY_BYTES`]).
//!
//! ```ignore
//! // In a root or stream context:
//! let command = Command::set_if_absent("idem:abc", "pending", Duration::from_secs(60));
//! let token = fleet::send(&store, &command)?;          // remember (token -> command.name())
//! // ... later, in on_http_call_response(token, num_headers, body_size, _):
//! match fleet::answer(command_name, num_headers, body_size) {
//!     Ok(reply) if reply.is_ok() => { /* set */ }
//!     Ok(Reply::Nil) => { /* already there */ }
//!     Ok(_) | Err(_) => { /* the store failed: the caller's failure mode */ }
//! }
//! ```

use keel_core::fleet::{parse_reply, Command, RedisStore, Reply, StoreError, MAX_REPLY_BYTES};

use crate::http_call;

/// Sends `command` to `store`; the answer comes to the root context's (or, sent from a
/// stream, that stream's) `on_http_call_response` with the returned token.
/// [`StoreError::NotSent`] when the host refuses (an unknown cluster, no callouts).
pub fn send(store: &RedisStore, command: &Command) -> Result<u32, StoreError> {
    http_call::dispatch(
        &store.cluster,
        &[
            (":method", "POST"),
            (":path", "/"),
            (":authority", &store.authority),
            ("content-type", "text/plain"),
        ],
        Some(command.body()),
        store.timeout,
    )
    .map_err(|_| StoreError::NotSent)
}

/// The answer to a command named `command` (its [`Command::name`]), read in
/// `on_http_call_response` from the callback's `num_headers` and `body_size`.
pub fn answer(command: &str, num_headers: usize, body_size: usize) -> Result<Reply, StoreError> {
    let status = http_call::status(num_headers);
    // A call that failed has no status; a missing one on an answer reads the same way.
    let body = match status {
        Some(_) => http_call::body(body_size, MAX_REPLY_BYTES).map_err(StoreError::TooLarge)?,
        None => Vec::new(),
    };
    parse_reply(command, status, &body)
}
