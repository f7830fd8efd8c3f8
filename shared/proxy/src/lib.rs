//! proxy-wasm glue shared by every Keel filter.
