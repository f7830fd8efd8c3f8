//! The host's clock.

use keel_core::time::Instant;

/// The host's current time, in nanoseconds since the Unix epoch (the harness's virtual clock
/// under test). A host that cannot tell the time gives the epoch, which makes every limiter
/// fail towards its fresh state rather than trap.
pub fn now() -> Instant {
    // One read per callback for all the stages of a pipeline (crate::memo).
    crate::memo::remembered(|m| &mut m.now, read)
}

fn read() -> Instant {
    crate::host::current_time_nanos()
        .map(Instant::from_nanos)
        .unwrap_or(Instant::ZERO)
}
