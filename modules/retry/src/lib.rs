//! `keel_retry.wasm`: the retry filter (crate `keel_retry`) as a module of its own. The same
//! filter is also in `keel.wasm` (root_id `retry`), built from the same crate.

keel_proxy::module!(keel_retry::root);
