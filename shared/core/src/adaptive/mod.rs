//! Adaptive protection: limits that follow the upstream's health.
//!
//! - [`concurrency`]: an adaptive concurrency limit, found from measured latency by Envoy's
//!   gradient controller (with a minimum RTT that never stops traffic) or by AIMD on drops.
//! - [`throttle`]: success-rate throttling, Google SRE's client-side adaptive throttling.
//! - [`wire`]: the `adaptive` filter's configuration as written.
//! - [`policy`]: the validated policies.
//! - [`math`]: `sqrt` and `exp` for `no_std`.
//!
//! Peak-EWMA balancing, the latency-aware balancer, sits with the other balancers in
//! [`crate::picker::peak_ewma`].
//!
//! Everything here is a pure function of a small state, `now`, and a sample (or a random draw,
//! passed in): the state's binary layout is beside it, and the glue keeps it in shared data and
//! updates it by compare-and-swap, so that every worker counts and limits the same requests.

pub mod concurrency;
pub mod math;
pub mod policy;
pub mod throttle;
pub mod wire;

pub use concurrency::{Admission, AimdParams, Controller, GradientParams, LimitState, Outcome};
pub use policy::{AdaptivePolicy, Kind, Scope};
pub use throttle::{ThrottleParams, ThrottleState};
pub use wire::AdaptiveSpec;

impl crate::routes::Routed for AdaptivePolicy {
    fn routes(&self) -> Option<&[alloc::string::String]> {
        self.routes.as_deref()
    }
}
