//! Capacity mode: the upstream behaves like a real service with a fixed number of workers.
//!
//! At most `concurrency` requests are served at once, each for `service` (plus, with `growth`,
//! a share of `service` per request already being served: `service * (1 + growth * busy /
//! concurrency)`, a service that slows down as it gets busier); the others wait in a FIFO
//! queue, so their latency grows with the queue; past `queue` waiting requests an arrival is
//! answered `503` at once (header `x-keel-capacity: full`). It is what adaptive limits are
//! tested against: below capacity latency is `service`, above it latency climbs, and far above
//! it the upstream sheds.
//!
//! Capacity is orthogonal to the [`Mode`](crate::Mode): the mode decides the answer (a failure
//! mode's status, a delay), capacity decides when it is served. It is switched by
//! [`Upstream::set_capacity`](crate::Upstream::set_capacity), by the `keel-upstream` flags
//! `--capacity N --service 10ms [--queue N] [--growth F]`, and by `POST /__keel/capacity`
//! (see [`crate::control`]).
//!
//! Invariants: at most `concurrency` requests hold a slot; a slot freed by a finished request
//! goes to the oldest waiter still connected; lowering `concurrency` at run time takes effect as
//! requests finish (no request is cut short), raising it lets waiters in at once; a waiter whose
//! client went away gives up its place.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// The capacity of the service.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    /// Requests served at once (at least 1).
    pub concurrency: u32,
    /// The service time of one request when the service is otherwise idle.
    pub service: Duration,
    /// Requests that may wait for a slot; one more is refused with `503`.
    pub queue: u32,
    /// How much the service time grows with load: `service * (1 + growth * busy / concurrency)`,
    /// `busy` being the requests in service when this one starts. `0` keeps it constant.
    pub growth: f64,
}

impl Capacity {
    /// `concurrency` slots of `service` each, a queue of 10 times the slots, no growth.
    pub fn new(concurrency: u32, service: Duration) -> Capacity {
        Capacity {
            concurrency: concurrency.max(1),
            service,
            queue: concurrency.max(1).saturating_mul(10),
            growth: 0.0,
        }
    }

    /// The service time of a request that starts while `busy` others are served.
    pub fn service_time(&self, busy: u32) -> Duration {
        if self.growth <= 0.0 {
            return self.service;
        }
        let factor = 1.0 + self.growth * f64::from(busy) / f64::from(self.concurrency.max(1));
        self.service.mul_f64(factor)
    }
}

/// What the gate counts, for `/__keel/stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Requests being served now.
    pub in_service: u32,
    /// Requests waiting now.
    pub queued: u32,
    /// Requests refused because the queue was full, since the start (or the last reset).
    pub rejected: u64,
    /// Requests that had to wait, since the start (or the last reset).
    pub waited: u64,
}

#[derive(Debug, Default)]
struct GateState {
    capacity: Option<Capacity>,
    in_service: u32,
    waiters: VecDeque<oneshot::Sender<Slot>>,
    rejected: u64,
    waited: u64,
}

/// The slots and the queue; shared by every connection of an upstream.
#[derive(Debug, Default)]
pub(crate) struct Gate(Arc<Mutex<GateState>>);

/// How an arrival enters the service.
pub(crate) enum Entry {
    /// No capacity is set: serve at once, no slot.
    Unlimited,
    /// A slot is free: serve now for the duration.
    Now(Slot, Duration),
    /// Wait for a slot (the receiver gets it, with the time to serve for).
    Queued(oneshot::Receiver<Slot>),
    /// The queue is full: answer 503.
    Full,
}

/// A held service slot; dropping it frees the slot for the oldest waiter.
#[derive(Debug)]
pub(crate) struct Slot {
    gate: Arc<Mutex<GateState>>,
    /// The service time this request gets.
    pub(crate) service: Duration,
    armed: bool,
}

fn lock(state: &Mutex<GateState>) -> MutexGuard<'_, GateState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    /// Sets (or, with `None`, removes) the capacity. Raising it admits waiters at once; with no
    /// capacity every waiter is admitted.
    pub(crate) fn set(&self, capacity: Option<Capacity>) {
        let mut state = lock(&self.0);
        state.capacity = capacity;
        admit_waiters(&self.0, &mut state);
    }

    /// The capacity set now.
    pub(crate) fn capacity(&self) -> Option<Capacity> {
        lock(&self.0).capacity.clone()
    }

    /// The counts now.
    pub(crate) fn counts(&self) -> GateCounts {
        let mut state = lock(&self.0);
        state.waiters.retain(|w| !w.is_closed());
        GateCounts {
            in_service: state.in_service,
            queued: u32::try_from(state.waiters.len()).unwrap_or(u32::MAX),
            rejected: state.rejected,
            waited: state.waited,
        }
    }

    /// Clears the counters (not the slots held or the queue).
    pub(crate) fn reset_counts(&self) {
        let mut state = lock(&self.0);
        state.rejected = 0;
        state.waited = 0;
    }

    /// An arrival asks for a slot.
    pub(crate) fn enter(&self) -> Entry {
        let mut state = lock(&self.0);
        let Some(capacity) = state.capacity.clone() else {
            return Entry::Unlimited;
        };
        // Waiters whose client went away hold no place.
        state.waiters.retain(|w| !w.is_closed());
        if state.waiters.is_empty() && state.in_service < capacity.concurrency {
            let service = capacity.service_time(state.in_service);
            state.in_service += 1;
            return Entry::Now(self.slot(service), service);
        }
        if state.waiters.len() >= capacity.queue as usize {
            state.rejected += 1;
            return Entry::Full;
        }
        let (send, receive) = oneshot::channel();
        state.waiters.push_back(send);
        state.waited += 1;
        Entry::Queued(receive)
    }

    fn slot(&self, service: Duration) -> Slot {
        Slot {
            gate: Arc::clone(&self.0),
            service,
            armed: true,
        }
    }
}

/// Hands free slots to the oldest waiters still connected.
fn admit_waiters(gate: &Arc<Mutex<GateState>>, state: &mut GateState) {
    loop {
        let limit = state.capacity.as_ref().map(|c| c.concurrency);
        if limit.is_some_and(|limit| state.in_service >= limit) {
            return;
        }
        let Some(waiter) = state.waiters.pop_front() else {
            return;
        };
        let service = state
            .capacity
            .as_ref()
            .map(|c| c.service_time(state.in_service))
            .unwrap_or_default();
        let slot = Slot {
            gate: Arc::clone(gate),
            service,
            armed: true,
        };
        match waiter.send(slot) {
            Ok(()) => state.in_service += 1,
            // The client went away: the slot it would have had goes to the next one. Disarmed,
            // so that dropping it does not free a slot that was never taken (and does not lock
            // the gate again while it is held here).
            Err(mut slot) => slot.armed = false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let gate = Arc::clone(&self.gate);
        let mut state = lock(&gate);
        state.in_service = state.in_service.saturating_sub(1);
        admit_waiters(&gate, &mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(concurrency: u32, queue: u32) -> Capacity {
        Capacity {
            concurrency,
            service: Duration::from_millis(10),
            queue,
            growth: 0.0,
        }
    }

    #[test]
    fn serves_up_to_the_concurrency_then_queues_then_refuses() {
        let gate = Gate::default();
        assert!(matches!(gate.enter(), Entry::Unlimited));
        gate.set(Some(capacity(2, 1)));
        let a = gate.enter();
        let b = gate.enter();
        assert!(matches!(a, Entry::Now(..)) && matches!(b, Entry::Now(..)));
        let Entry::Queued(mut waiting) = gate.enter() else {
            panic!("the third request waits");
        };
        assert!(matches!(gate.enter(), Entry::Full));
        assert_eq!(
            gate.counts(),
            GateCounts {
                in_service: 2,
                queued: 1,
                rejected: 1,
                waited: 1
            }
        );
        assert!(waiting.try_recv().is_err());
        drop(a);
        let slot = waiting
            .try_recv()
            .expect("the freed slot goes to the waiter");
        assert_eq!(gate.counts().in_service, 2);
        drop(slot);
        drop(b);
        assert_eq!(gate.counts().in_service, 0);
    }

    #[test]
    fn a_waiter_that_left_gives_up_its_place() {
        let gate = Gate::default();
        gate.set(Some(capacity(1, 2)));
        let held = gate.enter();
        let Entry::Queued(gone) = gate.enter() else {
            panic!("waits");
        };
        let Entry::Queued(mut stays) = gate.enter() else {
            panic!("waits");
        };
        drop(gone);
        drop(held);
        assert!(stays.try_recv().is_ok());
        assert_eq!(gate.counts().queued, 0);
    }

    #[test]
    fn lowering_the_concurrency_takes_effect_as_requests_finish() {
        let gate = Gate::default();
        gate.set(Some(capacity(2, 10)));
        let a = gate.enter();
        let b = gate.enter();
        gate.set(Some(capacity(1, 10)));
        let Entry::Queued(mut w) = gate.enter() else {
            panic!("waits");
        };
        drop(a);
        assert!(w.try_recv().is_err(), "still one in service, the new limit");
        drop(b);
        assert!(w.try_recv().is_ok());
    }

    #[test]
    fn service_time_grows_with_load() {
        let mut c = capacity(10, 0);
        assert_eq!(c.service_time(5), Duration::from_millis(10));
        c.growth = 1.0;
        assert_eq!(c.service_time(0), Duration::from_millis(10));
        assert_eq!(c.service_time(5), Duration::from_millis(15));
    }
}
