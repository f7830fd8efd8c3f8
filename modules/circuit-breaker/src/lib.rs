//! `keel_circuit_breaker.wasm`: the circuit-breaker filter (crate `keel_circuit_breaker`) as a module of its own. The same
//! filter is also in `keel.wasm` (root_id `circuit_breaker`), built from the same crate.

keel_proxy::module!(keel_circuit_breaker::root);
