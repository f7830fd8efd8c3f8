//! The host's clock.

use keel_core::time::Instant;
use proxy_wasm::hostcalls;

/// The host's current time, in nanoseconds since the Unix epoch (the harness's virtual clock
/// under test). A host that cannot tell the time gives the epoch, which makes every limiter
/// fail towards its fresh state rather than trap.
pub fn now() -> Instant {
    // One read per callback for all the stages of a pipeline (crate::memo).
    crate::memo::remembered(|m| &mut m.now, read)
}

fn read() -> Instant {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| Instant::from_nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
        .unwrap_or(Instant::ZERO)
}
