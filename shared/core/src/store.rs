//! Compare-and-swap updates of state that a host's worker threads share.
//!
//! Envoy runs one VM per worker; their only common memory is the host's shared data, a map from
//! key to bytes with a version number (`cas`). A limit that must hold for the whole process
//! therefore reads the value with its version, computes the new value, and writes it back only
//! if the version is unchanged, retrying on a conflict. Get-then-set without the version admits
//! anywhere between `x / workers` and `x * workers` (a known bug class of wasm limiters).
//!
//! [`SharedStore`] is the host service this needs; `keel-proxy` implements it with the
//! proxy-wasm calls and the harness with a real store. [`update`] is the loop, bounded so that a
//! hot key can never stall a worker.

use alloc::vec::Vec;

/// Why a write to shared data did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer changed the value since it was read.
    CasMismatch,
    /// The host refused the call (missing capability, bad key, ...).
    Host,
}

/// A host's shared key-value store with versioned writes.
pub trait SharedStore {
    /// The value under `key` and its version, or `None` when there is no value. A version of
    /// `0` means "not versioned"; hosts give non-zero versions to stored values.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Stores `value` under `key` if the stored version still is `cas` (`None`: write
    /// unconditionally, used only for values with a single writer).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
    /// Told when an [`update`] of `key` ran out of attempts (every one met a concurrent
    /// write): a host store counts it in a metric. Does nothing by default.
    fn exhausted(&self, _key: &str) {}
}

/// How many times an [`update`] tries before it reports contention, for every shared value of
/// every filter: each try is two host calls, and eight cover the contention of a few workers on
/// one hot key while bounding what one request can spend.
pub const ATTEMPTS: u32 = 8;

/// How an [`update`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum UpdateError {
    /// Every attempt met a concurrent write: the caller decides whether to fail open or closed.
    Contended,
    /// The host refused a read or write.
    Host,
}

/// Reads `key`, lets `change` compute the new value from the old one (`None` when absent), and
/// writes it back with compare-and-swap, retrying up to `attempts` times on conflicts.
///
/// `change` returns the bytes to store (or `None` to store nothing) and a result of its own;
/// the result of the attempt that won is returned. `change` may run several times, so it must
/// be a pure function of its input.
pub fn update<S, R>(
    store: &S,
    key: &str,
    attempts: u32,
    mut change: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R),
) -> Result<R, UpdateError>
where
    S: SharedStore + ?Sized,
{
    for _ in 0..attempts.max(1) {
        let current = store.get(key).map_err(|_| UpdateError::Host)?;
        let (old, cas) = match &current {
            Some((bytes, cas)) => (Some(bytes.as_slice()), *cas),
            None => (None, 0),
        };
        let (new, result) = change(old);
        let Some(new) = new else {
            return Ok(result);
        };
        // Envoy treats a version of 0 as "unconditional": two workers creating the same key
        // at once can both succeed. Callers that need exactness from the first request create
        // their keys before traffic (see `rate_limit::table`); after that every write is versioned.
        match store.set(key, &new, Some(cas)) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host) => return Err(UpdateError::Host),
        }
    }
    store.exhausted(key);
    Err(UpdateError::Contended)
}

/// Creates `key` with `initial` if it has no value; whether it created it. Call it before
/// traffic (when the configuration loads): hosts have no "create if absent", so the write is
/// unconditional, and two workers racing here both write the same initial value, which is
/// harmless; every write after it is a versioned compare-and-swap.
pub fn ensure<S>(store: &S, key: &str, initial: &[u8]) -> Result<bool, StoreError>
where
    S: SharedStore + ?Sized,
{
    if store.get(key)?.is_some() {
        return Ok(false);
    }
    store.set(key, initial, None)?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory [`SharedStore`] with real versions, for native tests.
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::string::{String, ToString};
    use core::cell::RefCell;

    /// Versions come from one counter and skip 0; a version of 0 writes unconditionally: both as
    /// in Envoy's `SharedData::set`.
    #[derive(Default)]
    pub struct MemoryStore {
        pub map: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.map.borrow().get(key).cloned())
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            let mut map = self.map.borrow_mut();
            if let (Some(cas), Some((_, version))) = (cas, map.get(key)) {
                if cas != 0 && cas != *version {
                    return Err(StoreError::CasMismatch);
                }
            }
            let next = map.values().map(|(_, v)| *v).max().unwrap_or(0) + 1;
            map.insert(key.to_string(), (value.to_vec(), next));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::MemoryStore;
    use super::*;
    use alloc::vec;

    fn bump(old: Option<&[u8]>) -> (Option<Vec<u8>>, u8) {
        let n = old.and_then(|b| b.first().copied()).unwrap_or(0) + 1;
        (Some(vec![n]), n)
    }

    #[test]
    fn updates_in_place() {
        let store = MemoryStore::default();
        assert_eq!(update(&store, "k", 3, bump), Ok(1));
        assert_eq!(update(&store, "k", 3, bump), Ok(2));
    }

    #[test]
    fn retries_after_a_concurrent_write_and_never_loses_it() {
        let store = MemoryStore::default();
        update(&store, "k", 3, bump).ok();
        // The first attempt reads 1, then another worker writes 5 before ours lands.
        let mut first = true;
        let result = update(&store, "k", 3, |old| {
            if first {
                first = false;
                store.map.borrow_mut().insert("k".into(), (vec![5], 9));
            }
            bump(old)
        });
        assert_eq!(result, Ok(6));
    }

    #[test]
    fn gives_up_after_the_bounded_attempts() {
        let store = MemoryStore::default();
        update(&store, "k", 1, bump).ok();
        let mut version = 100;
        let result = update(&store, "k", 4, |old| {
            version += 1;
            store
                .map
                .borrow_mut()
                .insert("k".into(), (vec![0], version));
            bump(old)
        });
        assert_eq!(result, Err(UpdateError::Contended));
    }

    /// A store that counts the exhausted updates it is told about.
    #[derive(Default)]
    struct Counting {
        inner: MemoryStore,
        exhausted: core::cell::Cell<u32>,
    }

    impl SharedStore for Counting {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
        fn exhausted(&self, _key: &str) {
            self.exhausted.set(self.exhausted.get() + 1);
        }
    }

    #[test]
    fn the_store_is_told_of_exactly_the_exhausted_updates() {
        let store = Counting::default();
        assert_eq!(update(&store, "k", ATTEMPTS, bump), Ok(1));
        let mut version = 100;
        let result = update(&store, "k", ATTEMPTS, |old| {
            version += 1;
            store
                .inner
                .map
                .borrow_mut()
                .insert("k".into(), (vec![0], version));
            bump(old)
        });
        assert_eq!(result, Err(UpdateError::Contended));
        assert_eq!(version, 100 + ATTEMPTS, "every attempt ran");
        assert_eq!(store.exhausted.get(), 1);
    }

    #[test]
    fn ensure_creates_once_and_leaves_a_value_alone() {
        let store = MemoryStore::default();
        assert_eq!(ensure(&store, "k", &[7]), Ok(true));
        assert_eq!(ensure(&store, "k", &[8]), Ok(false));
        assert_eq!(store.get("k").unwrap().map(|(v, _)| v), Some(vec![7]));
    }
}
