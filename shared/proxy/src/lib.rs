//! The proxy-wasm glue every Keel filter shares, written once.
//!
//! A filter's `lib.rs` reads what it needs from the host through this crate, hands plain values
//! to `keel-core`, and turns the core's decision back into host calls through this crate:
//!
//! - [`host`]: the proxy-wasm host calls, made directly: every status the ABI defines comes
//!   back as a value, and a failure is logged once and counted (`keel.host.<call>.failed`).
//!   The only module with `unsafe`.
//! - [`clock`]: the host's clock as a core [`Instant`](keel_core::time::Instant).
//! - [`store`]: the host's shared data as a core [`SharedStore`](keel_core::store::SharedStore),
//!   the one compare-and-swap update (one attempt budget, one metric for loops that ran out of
//!   attempts) and the one way to create a key before traffic.
//! - [`request`]: headers (as bytes: header values need not be UTF-8), properties, the route
//!   name, and request keys from the selector syntax.
//! - [`reply`]: local replies with headers.
//! - [`http_call`]: callouts to Envoy clusters and reading their answers safely.
//! - [`fleet`]: commands to the fleet store (Redis through Webdis) and their answers.
//! - [`metrics`]: a filter's metric family (`keel.<filter>.<policy>.<what>`), counters, gauges,
//!   and tallies flushed on the tick.
//! - [`response`]: the response's status, headers and body chunks, and Envoy's response flags.
//! - [`routing`]: the route name, the route's cluster (Envoy 1.40's `xds.*` properties) and the
//!   upstream host a filter chose.
//! - [`stream`]: copies of a request for replay, and acting on a held stream from the root
//!   context (switch to it, answer in its place; [`stage`] resumes it).
//! - [`stage`]: what a filter asks of whatever runs it (configuration, tick, resuming a stream
//!   it paused): the host itself, or Keel's pipeline.
//! - [`memo`]: one stream's host reads (route, cluster, status, time), shared by the stages of
//!   a pipeline.
//! - [`random`]: the seed of a VM's random generator.
//! - [`pipeline`]: one Envoy filter that runs several Keel filters per request as stages, in
//!   order, with one root context, one stream context and shared host reads.
//!
//! Every function here returns a value or an `Option`: host errors are logged or ignored, never
//! unwrapped, because a panic in a VM takes down every request of its worker. For the same
//! reason the host calls go through [`host`], not the SDK's `hostcalls`, which panic on
//! statuses they do not expect.

#![deny(unsafe_code)]

pub mod clock;
pub mod fleet;
#[allow(unsafe_code)]
pub mod host;
pub mod http_call;
pub mod log;
pub mod memo;
pub mod metrics;
pub mod pipeline;
pub mod random;
pub mod reply;
pub mod request;
pub mod response;
pub mod routing;
pub mod stage;
pub mod store;
pub mod stream;

/// The `vm_id` every Keel filter is configured with, so that filters of the suite share one
/// shared-data namespace (discovery publishes endpoint sets that the picker reads).
pub const VM_ID: &str = "keel";

#[doc(hidden)]
pub use proxy_wasm as __proxy_wasm;

/// The entry point of a module: `keel_proxy::module!(keel_retry::root);` installs that root
/// context factory (a `fn(u32) -> Box<dyn RootContext>`) with proxy-wasm's `main!`, which
/// exports the module's `_initialize`. Only a module crate (a `cdylib`) invokes it, once: the
/// filter crates are libraries without an `_initialize` of their own, so that several of them
/// link into one module (`keel.wasm`).
#[macro_export]
macro_rules! module {
    ($root:path) => {
        $crate::__proxy_wasm::main! {{
            $crate::__proxy_wasm::set_log_level($crate::__proxy_wasm::types::LogLevel::Info);
            $crate::__proxy_wasm::set_root_context($root);
        }}
    };
}
