//! Seeds for a VM's random generators (keel-core's `SeededRng`): the core never draws
//! randomness itself, so every filter seeds its generator here, the same way.

use std::hash::{BuildHasher, Hasher};

/// A seed that differs between the workers of a process and between restarts: 64 bits of the
/// host's randomness (WASI `random_get`, through std's hasher keys), mixed with the host's
/// clock and `salt` (the root context's id, say). Under the harness both are deterministic.
pub fn seed(salt: u64) -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::clock::now().as_nanos());
    hasher.write_u64(salt);
    hasher.finish()
}
