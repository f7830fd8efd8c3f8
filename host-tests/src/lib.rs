//! Keel's test hosts.
//!
//! - [`harness`]: a proxy-wasm ABI 0.2.1 host on wasmtime that loads the built modules from
//!   `dist/` and drives them with a virtual clock, several VMs sharing one shared-data store,
//!   ticks, callouts, properties, metrics and logs; [`harness::ScriptedEtcd`] plays etcd and
//!   the instances' health checks for the discovery filter.
//! - [`envoy`]: starts the real Envoy from `make setup` with a config from `envoy/`, and
//!   [`envoy::wait_for`] polls a condition on it until a timeout.
//! - [`upstream`]: real HTTP servers on loopback whose behaviour tests switch on command.
//! - [`etcd`]: a real etcd (Debian's `etcd-server`) on loopback, with its JSON gateway.
//! - [`redis`]: a real Redis behind a real Webdis (Debian's) on loopback: the fleet store.

pub mod envoy;
pub mod etcd;
pub mod harness;
pub mod redis;
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

/// The path of the suite module, `dist/keel.wasm` (every filter, chosen by root_id).
pub fn suite_path() -> PathBuf {
    repo_root().join("dist").join("keel.wasm")
}

/// Where a test takes a filter from: the filter's own module or the suite module. Tests of a
/// filter's key behaviour run over [`Module::BOTH`]: the two are built from the same crate and
/// must behave the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    /// `dist/keel_<root_id>.wasm`.
    Own,
    /// `dist/keel.wasm`, the filter chosen by its root_id.
    Suite,
}

impl Module {
    /// Both modules, own first.
    pub const BOTH: [Module; 2] = [Module::Own, Module::Suite];

    /// The module file that holds the filter of `root_id`.
    pub fn path(self, root_id: &str) -> PathBuf {
        match self {
            Module::Own => module_path(root_id),
            Module::Suite => suite_path(),
        }
    }
}

/// `n` workers (VMs sharing the host's shared data, `vm_id` `keel`) of the filter `root_id`
/// from `module`, each configured with `config`; an error, with the logs, when a module does not
/// load or a VM refuses the configuration. Every filter's harness tests start their VMs here.
pub fn configured_workers(
    host: &harness::Host,
    root_id: &str,
    module: Module,
    config: &str,
    n: usize,
) -> anyhow::Result<Vec<harness::Vm>> {
    let vms = host
        .filter(root_id, module)
        .vm_id("keel")
        .config(config)
        .start_workers(n)
        .map_err(|e| anyhow::anyhow!("{e:#} (run `make build` first)"))?;
    if let Some(refused) = vms.iter().find(|vm| !vm.configured()) {
        anyhow::bail!("{root_id}: configuration refused: {:?}", refused.logs());
    }
    Ok(vms)
}
