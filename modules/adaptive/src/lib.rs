//! `keel_adaptive.wasm`: the adaptive protection filter (crate `keel_adaptive`) as a module of
//! its own. The same filter is also in `keel.wasm` (root_id `adaptive`), built from the same
//! crate.

keel_proxy::module!(keel_adaptive::root);
