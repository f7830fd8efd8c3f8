//! Keel's test hosts.
//!
//! - [`harness`]: a proxy-wasm ABI 0.2.1 host on wasmtime that loads the built modules from
//!   `dist/` and drives them with a virtual clock, several VMs sharing one shared-data store,
//!   ticks, callouts, properties, metrics and logs.
//! - [`envoy`]: starts the real Envoy from `make setup` with a config from `envoy/`.
//! - [`upstream`]: real HTTP servers on loopback whose behaviour tests switch on command.
//! - [`etcd`]: a real etcd (Debian's `etcd-server`) on loopback, with its JSON gateway.

pub mod envoy;
pub mod etcd;
pub mod harness;
pub use keel_upstream as upstream;

use std::path::PathBuf;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The path of a built module, `dist/keel_<name>.wasm`.
pub fn module_path(name: &str) -> PathBuf {
    repo_root().join("dist").join(format!("keel_{name}.wasm"))
}
