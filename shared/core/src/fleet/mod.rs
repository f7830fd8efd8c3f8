//! The fleet store: state shared by every Envoy process of a fleet, kept in Redis and reached
//! through Webdis with HTTP callouts.
//!
//! Shared data is per process; a limit or an idempotency key that must hold across a fleet
//! needs a store all processes reach. Stock Envoy gives a wasm filter HTTP and gRPC callouts
//! only, so the store is Redis behind Webdis (an HTTP front end for Redis) in an Envoy cluster:
//! a callout `POST /` whose body is a command (`EVALSHA/<sha>/1/<key>/<arg>`) answers JSON.
//!
//! This module is the wire, pure and natively tested; `keel-proxy`'s `fleet` sends the
//! callouts and reads their answers with it:
//!
//! - [`webdis`]: [`Command`] (encoding, with `GET`, `SET ... PX`, `SET ... NX PX`, `DEL`
//!   built in), [`parse_reply`] into a [`Reply`] or a [`StoreError`] (no answer, HTTP status,
//!   `NOSCRIPT`, a Redis error, garbage, too large).
//! - [`script`]: a Lua [`Script`] named by its SHA-1 (the `sha1_smol` crate), called with `EVALSHA` and
//!   reloaded with `EVAL` after `NOSCRIPT`.
//! - [`redis`]: where the store is, as written in a filter's configuration ([`RedisSpec`] into
//!   [`RedisStore`]: cluster, authority, timeout).
//!
//! Nothing here knows what is stored: the rate limiter's leases (`rate_limit::fleet`) and
//! idempotency keys build on it.

pub mod redis;
pub mod script;
pub mod webdis;

pub use redis::{RedisSpec, RedisStore};
pub use script::Script;
pub use webdis::{parse_reply, Command, Reply, StoreError, MAX_REPLY_BYTES};
