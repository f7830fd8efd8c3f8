//! What a per-host breaker's shared state means to the filters that route around it: the
//! picker (which skips a host whose breaker is open, as it skips an ejected host) and the retry
//! filter (which never sends an attempt to such a host).
//!
//! They read the state the breaker filter writes (`keel/circuit_breaker/<name>/host/<host>`,
//! [`host_state_key`]) through this module only: it decodes with the breaker's own codec
//! ([`BreakerState::decode`]) and never writes, so the breaker stays the one judge of its
//! transitions and probe permits. A picker that sends a request to a half-open host only makes
//! it a candidate: the breaker filter, later in the chain, still hands out the permit or
//! refuses.
//!
//! # Reading a state as of `now`
//!
//! | state | [`Steering`] |
//! |---|---|
//! | none yet, or bytes that do not decode (another layout) | `Closed` (as the breaker reads them) |
//! | closed | `Closed` |
//! | open, `now < open_until` | `Open` |
//! | open, period over (the next admission half-opens it with no permit out) | `Probe` |
//! | half-open, fewer than `half_open_probes` permits out (unanswered ones past their deadline reclaimed, as the breaker does) | `Probe` |
//! | half-open, every permit out | `Open` |

use alloc::format;
use alloc::string::String;

use super::state::{peek_phase, BreakerState, Phase};
use crate::time::Instant;

/// The stream property (Envoy: filter state `wasm.keel.circuit_breaker.host`) a per-host
/// breaker sets to the host (`ip:port`) when it admits a call to it: the breaker judges that
/// host by this call's outcome, so discovery's passive ejection leaves the call out and one
/// failure is counted by one filter.
pub const JUDGED_HOST_PROPERTY: &str = "keel.circuit_breaker.host";

/// How a router should treat a host, by its breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steering {
    /// Calls flow: route to it as usual.
    Closed,
    /// Refused by the breaker: route around it.
    Open,
    /// The breaker would admit a probe now: a candidate for that probe only.
    Probe,
}

impl Steering {
    /// Whether a host may be picked (closed, or a probe is free).
    pub fn pickable(self) -> bool {
        self != Steering::Open
    }
}

/// The shared-data key of breaker `breaker`'s instance for `host` (scope `host`):
/// `keel/circuit_breaker/<breaker>/host/<host>`.
pub fn host_state_key(breaker: &str, host: &str) -> String {
    format!("keel/circuit_breaker/{breaker}/host/{host}")
}

/// How to treat a host whose breaker state (as read from shared data) is `state`, as of `now`,
/// for a breaker that lets `half_open_probes` probes through per half-open period. See the
/// module docs.
pub fn steering(state: Option<&[u8]>, now: Instant, half_open_probes: u16) -> Steering {
    // The common case decides on the phase byte alone, as the breaker's admission does.
    if state
        .and_then(peek_phase)
        .is_none_or(|phase| phase == Phase::Closed)
    {
        return Steering::Closed;
    }
    let Some(s) = state.and_then(BreakerState::decode) else {
        return Steering::Closed;
    };
    let probes = s.probes();
    match s.phase() {
        Phase::Closed => Steering::Closed,
        Phase::Open if now < s.open_until() => Steering::Open,
        Phase::Open => {
            if half_open_probes > 0 {
                Steering::Probe
            } else {
                Steering::Open
            }
        }
        Phase::HalfOpen => {
            let out = if now >= probes.deadline && probes.issued > probes.done {
                probes.done
            } else {
                probes.issued
            };
            if out < half_open_probes && probes.done < half_open_probes {
                Steering::Probe
            } else {
                Steering::Open
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::circuit_breaker::{Admission, Breakers, Outcome};
    use crate::time::Duration;

    fn policy(probes: u32) -> crate::circuit_breaker::BreakerPolicy {
        let json = alloc::format!(
            r#"{{"breakers": [{{"name": "h", "scope": "host", "window": "1s", "buckets": 2, "min_calls": 2, "failure_rate": 0.5, "open_for": "3s", "half_open_probes": {probes}}}]}}"#
        );
        let breakers = crate::config::load::<Breakers>(json.as_bytes()).unwrap();
        breakers.policies()[0].clone()
    }

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn follows_the_breaker_through_open_half_open_and_closed() {
        let p = policy(2);
        let mut state = p.initial_state(at(0));
        assert_eq!(steering(None, at(0), 2), Steering::Closed);
        assert_eq!(steering(Some(&state), at(0), 2), Steering::Closed);
        assert_eq!(steering(Some(b"garbage"), at(0), 2), Steering::Closed);
        // Two failures open it for 3 s.
        for ms in [10, 20] {
            let (_, d) = p.admit(Some(&state), at(ms));
            assert_eq!(d.admission, Admission::Allow);
            let (next, _) = p.record(Some(&state), at(ms), Outcome::Failure, None);
            if let Some(next) = next {
                state = next;
            }
        }
        assert_eq!(steering(Some(&state), at(100), 2), Steering::Open);
        assert!(!steering(Some(&state), at(100), 2).pickable());
        // The period over: a probe is due.
        assert_eq!(steering(Some(&state), at(3100), 2), Steering::Probe);
        // Half-open: each permit handed out by the breaker is seen here.
        let mut tickets = alloc::vec::Vec::new();
        for _ in 0..2 {
            let (next, d) = p.admit(Some(&state), at(3100));
            state = next.unwrap();
            match d.admission {
                Admission::Probe(t) => tickets.push(t),
                other => panic!("expected a probe, got {other:?}"),
            }
        }
        assert_eq!(
            steering(Some(&state), at(3100), 2),
            Steering::Open,
            "both permits out"
        );
        // A picker that believes in one more probe than the breaker lets through sees one.
        assert_eq!(steering(Some(&state), at(3100), 3), Steering::Probe);
        // Both probes succeed: closed, its keys come back.
        for t in tickets {
            let (next, _) = p.record(Some(&state), at(3200), Outcome::Success, Some(t));
            if let Some(next) = next {
                state = next;
            }
        }
        assert_eq!(steering(Some(&state), at(3200), 2), Steering::Closed);
    }

    #[test]
    fn unanswered_permits_are_reclaimed_after_their_deadline() {
        let p = policy(1);
        let mut state = p.initial_state(at(0));
        for ms in [10, 20] {
            let (next, _) = p.record(Some(&state), at(ms), Outcome::Failure, None);
            if let Some(next) = next {
                state = next;
            }
        }
        let (next, d) = p.admit(Some(&state), at(3100));
        assert!(matches!(d.admission, Admission::Probe(_)));
        state = next.unwrap();
        assert_eq!(steering(Some(&state), at(3100), 1), Steering::Open);
        // probe_timeout defaults to max(open_for, 15 s).
        let later = at(3100).saturating_add(Duration::from_secs(15));
        assert_eq!(steering(Some(&state), later, 1), Steering::Probe);
        assert_eq!(
            host_state_key("users-host", "127.0.0.1:1"),
            "keel/circuit_breaker/users-host/host/127.0.0.1:1"
        );
        assert_eq!(
            p.state_key(None, Some("127.0.0.1:1")).as_deref(),
            Some("keel/circuit_breaker/h/host/127.0.0.1:1")
        );
    }
}
