//! `keel_idempotency.wasm`: the idempotency-key filter (crate `keel_idempotency`) as a module of
//! its own. The same filter is also in `keel.wasm` (root_id `idempotency`), built from the same
//! crate.

keel_proxy::module!(keel_idempotency::root);
