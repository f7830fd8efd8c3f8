//! Whether a process can reach the fleet store, shared by its workers.
//!
//! `keel/rate_limit/<policy>/store`: `[layout u8 = 1][down u8][since u64 ns][errors u64]`,
//! 18 bytes. The VM that gets an answer (or a failure) records it with one compare-and-swap;
//! the one whose write changes the state logs the transition, so each transition is logged
//! once per process, whatever the number of workers. While down, requests that need the store
//! take the policy's `on_store_error` path at once (no waiting), and every call still sent
//! (the refresher's, a strict request's) is a probe: the first success brings the state back.

use alloc::vec::Vec;

use crate::codec::{Reader, Writer};
use crate::time::Instant;

/// The first byte of an encoded state.
pub const LAYOUT: u8 = 1;

/// The store's state as a process sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Whether the last call failed.
    pub down: bool,
    /// Since when the state holds.
    pub since: Instant,
    /// Failures in a row (0 when up).
    pub errors: u64,
}

impl StoreHealth {
    /// Encodes as 18 bytes.
    pub fn encode(&self) -> Vec<u8> {
        Writer::with_capacity(18)
            .u8(LAYOUT)
            .u8(u8::from(self.down))
            .u64(self.since.as_nanos())
            .u64(self.errors)
            .finish()
    }

    /// Decodes; `None` unless 18 bytes of layout 1 (read as up).
    pub fn decode(bytes: &[u8]) -> Option<StoreHealth> {
        let mut r = Reader::new(bytes);
        (r.u8()? == LAYOUT).then_some(())?;
        let down = r.u8()? != 0;
        let since = Instant::from_nanos(r.u64()?);
        let errors = r.u64()?;
        r.end()?;
        Some(StoreHealth {
            down,
            since,
            errors,
        })
    }
}

/// A change of state, for the one log line and the gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The store stopped answering (or answered garbage).
    WentDown,
    /// The store answers again after being down since `since`.
    CameBack {
        /// When it went down.
        since: Instant,
    },
}

/// Records one call's outcome (`ok`) at `now`: the state to write (`None`: unchanged) and the
/// transition, if any.
pub fn record(
    bytes: Option<&[u8]>,
    ok: bool,
    now: Instant,
) -> (Option<StoreHealth>, Option<Transition>) {
    let old = bytes.and_then(StoreHealth::decode).unwrap_or_default();
    match (old.down, ok) {
        (false, true) => (None, None),
        (true, true) => (
            Some(StoreHealth {
                down: false,
                since: now,
                errors: 0,
            }),
            Some(Transition::CameBack { since: old.since }),
        ),
        (false, false) => (
            Some(StoreHealth {
                down: true,
                since: now,
                errors: 1,
            }),
            Some(Transition::WentDown),
        ),
        (true, false) => (
            Some(StoreHealth {
                errors: old.errors.saturating_add(1),
                ..old
            }),
            None,
        ),
    }
}

/// Whether `bytes` says the store is down (absent or undecodable: up).
pub fn is_down(bytes: Option<&[u8]>) -> bool {
    bytes.and_then(StoreHealth::decode).is_some_and(|h| h.down)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn one_transition_per_change() {
        let t = |n| Instant::from_nanos(n);
        assert_eq!(record(None, true, t(1)), (None, None));
        let (down, tr) = record(None, false, t(2));
        assert_eq!(tr, Some(Transition::WentDown));
        let bytes = down.unwrap().encode();
        assert!(is_down(Some(&bytes)));
        let (again, tr) = record(Some(&bytes), false, t(3));
        assert_eq!((again.unwrap().errors, tr), (2, None));
        let (up, tr) = record(Some(&again.unwrap().encode()), true, t(4));
        assert_eq!(tr, Some(Transition::CameBack { since: t(2) }));
        assert!(!is_down(Some(&up.unwrap().encode())));
        assert!(!is_down(Some(&[9])));
    }
}
