//! `keel_picker.wasm`: the picker filter (crate `keel_picker`) as a module of its own. The same
//! filter is also in `keel.wasm` (root_id `picker`), built from the same crate.

keel_proxy::module!(keel_picker::root);
