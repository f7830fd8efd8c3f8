//! `keel_discovery.wasm`: the discovery filter (crate `keel_discovery`) as a module of its own. The same
//! filter is also in `keel.wasm` (root_id `discovery`), built from the same crate.

keel_proxy::module!(keel_discovery::root);
