//! Keel's core: every algorithm and state machine of the suite, free of any host.
//!
//! The crate is `#![no_std]` with `alloc`. It never reads a clock and never draws ambient
//! randomness: the current [`time::Instant`] and a [`rand::Rng`] are passed in by the caller.
//! That keeps every decision reproducible in native tests, in wasm32 tests and in the proxy-wasm
//! harness, where the host's clock is virtual.
//!
//! State that must be exact across a host's worker threads is encoded in small fixed binary
//! layouts ([`codec`]) and updated through the compare-and-swap loop of [`store`].

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod adaptive;
pub mod circuit_breaker;
pub mod codec;
pub mod config;
pub mod discovery;
pub mod fleet;
pub mod idempotency;
pub mod picker;
pub mod rand;
pub mod rate_limit;
pub mod retry;
pub mod routes;
pub mod store;
pub mod time;
