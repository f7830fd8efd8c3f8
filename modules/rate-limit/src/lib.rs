//! `keel_rate_limit.wasm`: the rate-limit filter (crate `keel_rate_limit`) as a module of its own. The same
//! filter is also in `keel.wasm` (root_id `rate_limit`), built from the same crate.

keel_proxy::module!(keel_rate_limit::root);
