//! The host's shared data as a [`SharedStore`], and the one way Keel's filters update it.
//!
//! Every shared value is changed the same way: read it with its version, compute the new value,
//! write it back with compare-and-swap, up to [`CAS_ATTEMPTS`] times ([`update`], or a core
//! mechanism's own operation given [`HostStore`], which runs the same loop). A loop that runs
//! out of attempts is counted, whichever filter ran it, in [`EXHAUSTED_METRIC`]; a host that
//! refuses a read or a write is reported by [`crate::host`] (`keel.host.<call>.failed`). Keys
//! that must exist before traffic are created with [`ensure`].
//!
//! # One read instead of two
//!
//! A filter that reads a value at the request (to decide) and updates it at the response (to
//! record the outcome) would read it twice, though the value is usually what the request read:
//! no worker wrote it in between. [`Remembered`] keeps what the request's read returned (when
//! the request wrote nothing), and [`Primed`] hands it to the response's update ([`update_in`])
//! as its first read. Exactness is that of any compare-and-swap loop: the write carries the
//! version the request read, so if any worker (or another stream of this one) wrote since, the
//! host refuses it and the loop reads the current value from the host and tries again. The
//! circuit breaker saves one `proxy_get_shared_data` per request so
//! (`bench-results/host-calls.md`).

use std::cell::{Cell, RefCell};

use keel_core::store::{self, SharedStore, StoreError, UpdateError};

use crate::host::{self, MetricType, Status};
use crate::metrics::Counter;

/// The counter of compare-and-swap loops that ran out of attempts, over every filter of the VM.
pub const EXHAUSTED_METRIC: &str = "keel.shared_data.cas_exhausted";

/// How many times a compare-and-swap loop tries before it gives up: the one budget of every
/// shared value ([`keel_core::store::ATTEMPTS`]).
pub const CAS_ATTEMPTS: u32 = store::ATTEMPTS;

thread_local! {
    /// [`EXHAUSTED_METRIC`]'s id once defined (`Some(None)`: the host refused it).
    static EXHAUSTED: Cell<Option<Option<u32>>> = const { Cell::new(None) };
}

/// Shared data of the host process (per `vm_id`).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        host::get_shared_data(key).map_err(|_| StoreError::Host)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match host::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }

    fn exhausted(&self, _key: &str) {
        let id = EXHAUSTED.with(|cell| match cell.get() {
            Some(id) => id,
            None => {
                let id = host::define_metric(MetricType::Counter, EXHAUSTED_METRIC).ok();
                cell.set(Some(id));
                id
            }
        });
        if let Some(id) = id {
            let _ = host::increment_metric(id, 1);
        }
    }
}

/// Runs [`store::update`] on the host store with [`CAS_ATTEMPTS`], and counts in `errors` the
/// updates that did not happen (out of attempts, or refused by the host); the caller then fails
/// open or closed as its filter documents.
pub fn update<R>(
    key: &str,
    errors: &Counter,
    change: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R),
) -> Result<R, UpdateError> {
    update_in(&HostStore, key, errors, change)
}

/// [`update`] on a store that wraps the host's (one that remembers or primes a read, say).
pub fn update_in<S: SharedStore, R>(
    shared: &S,
    key: &str,
    errors: &Counter,
    change: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R),
) -> Result<R, UpdateError> {
    let result = store::update(shared, key, CAS_ATTEMPTS, change);
    if result.is_err() {
        errors.increment(1);
    }
    result
}

/// Creates `key` with `initial` if it has no value ([`store::ensure`]); whether it created it.
pub fn ensure(key: &str, initial: &[u8]) -> Result<bool, StoreError> {
    store::ensure(&HostStore, key, initial)
}

/// The host store, remembering the last value read and whether anything was written.
#[derive(Default)]
pub struct Remembered {
    read: RefCell<Option<(Vec<u8>, u32)>>,
    wrote: RefCell<bool>,
}

impl Remembered {
    /// The value and version read, if nothing was written after it (a write gives the value a
    /// version this stream does not know).
    pub fn unchanged(self) -> Option<(Vec<u8>, u32)> {
        if self.wrote.into_inner() {
            None
        } else {
            self.read.into_inner()
        }
    }
}

impl SharedStore for Remembered {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let value = HostStore.get(key)?;
        *self.read.borrow_mut() = value.clone();
        Ok(value)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        *self.wrote.borrow_mut() = true;
        HostStore.set(key, value, cas)
    }

    fn exhausted(&self, key: &str) {
        HostStore.exhausted(key);
    }
}

/// The host store whose first read returns a value read earlier (with its version).
pub struct Primed {
    first: RefCell<Option<(Vec<u8>, u32)>>,
}

impl Primed {
    pub fn new(first: Option<(Vec<u8>, u32)>) -> Primed {
        Primed {
            // A version of 0 would make the write unconditional: never reuse such a read.
            first: RefCell::new(first.filter(|(_, cas)| *cas != 0)),
        }
    }
}

impl SharedStore for Primed {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match self.first.borrow_mut().take() {
            Some(value) => Ok(Some(value)),
            None => HostStore.get(key),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        HostStore.set(key, value, cas)
    }

    fn exhausted(&self, key: &str) {
        HostStore.exhausted(key);
    }
}
