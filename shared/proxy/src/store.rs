//! The host's shared data as a [`SharedStore`].

use keel_core::store::{self, SharedStore, StoreError, UpdateError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::metrics::Counter;

/// Shared data of the host process (per `vm_id`).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Ok(Some((bytes, cas.unwrap_or(0)))),
            Ok((None, _)) => Ok(None),
            Err(_) => Err(StoreError::Host),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Host),
        }
    }
}

/// How many times a compare-and-swap loop tries before it gives up. Each try is two host calls;
/// eight tries cover the contention of a few workers on one hot key.
pub const CAS_ATTEMPTS: u32 = 8;

/// Runs [`store::update`] on the host store and counts, in `exhausted`, the loops that ran out of
/// attempts (the caller then fails open or closed as its filter documents).
pub fn update<R>(
    key: &str,
    exhausted: &Counter,
    change: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R),
) -> Result<R, UpdateError> {
    let result = store::update(&HostStore, key, CAS_ATTEMPTS, change);
    if result.is_err() {
        exhausted.increment(1);
    }
    result
}
