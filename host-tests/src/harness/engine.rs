//! One wasmtime `Engine` per process, the host-call `Linker`, and a cache of compiled modules.
//!
//! Cranelift compilation is the slow part of starting a VM (seconds in a debug build), so each
//! module file is linked once per process (keyed by path, size and modification time) and every
//! VM of every test instantiates the cached `InstancePre`; the compiled code is also kept in
//! wasmtime's on-disk cache under the target directory, so later test processes skip Cranelift
//! until the module changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{anyhow, Context as _};
use wasmtime::{Cache, CacheConfig, Config, Engine, InstancePre, Linker, Module};

use super::host::lock;
use super::imports;
use super::vm::VmState;

pub(crate) fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable);
        // `KEEL_FUEL=1`: wasmtime counts fuel (about one unit per wasm instruction), which
        // `Vm::fuel` reports: the module's own work per callback, deterministic.
        config.consume_fuel(fuel_on());
        // Compiled code is cached on disk (keyed by the module's bytes and the compiler's
        // settings), so only the first test process after a module changes pays for Cranelift.
        let mut cache = CacheConfig::new();
        cache.with_directory(cache_dir());
        if let Ok(cache) = Cache::new(cache) {
            config.cache(Some(cache));
        }
        Engine::new(&config).unwrap_or_default()
    })
}

/// Whether `KEEL_FUEL` asks for fuel counting (see [`engine`]).
pub(crate) fn fuel_on() -> bool {
    std::env::var_os("KEEL_FUEL").is_some()
}

/// `$CARGO_TARGET_DIR/keel-wasmtime-cache`, else `target/keel-wasmtime-cache` in the
/// repository.
fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"))
        .join("keel-wasmtime-cache")
}

fn linker() -> anyhow::Result<&'static Linker<VmState>> {
    static LINKER: OnceLock<Result<Linker<VmState>, String>> = OnceLock::new();
    LINKER
        .get_or_init(|| {
            let mut linker = Linker::new(engine());
            wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut VmState| &mut s.wasi)
                .map_err(|e| format!("linking WASI preview1: {e:?}"))?;
            imports::define(&mut linker).map_err(|e| format!("linking proxy-wasm: {e:?}"))?;
            Ok(linker)
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

type Stamp = (u64, Option<SystemTime>);
type ModuleCache = Mutex<HashMap<PathBuf, (Stamp, InstancePre<VmState>)>>;

fn cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The linked, pre-instantiated module at `path`, compiled on first use.
pub(crate) fn instance_pre(path: &Path) -> anyhow::Result<InstancePre<VmState>> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow!(
            "module {} is missing ({e}): run `make build` to build the modules into dist/",
            path.display()
        )
    })?;
    let stamp = (meta.len(), meta.modified().ok());
    // Holding the lock while compiling makes parallel tests wait for one compilation instead
    // of each compiling the same module.
    let mut cache = lock(cache());
    if let Some((cached, pre)) = cache.get(path) {
        if *cached == stamp {
            return Ok(pre.clone());
        }
    }
    let module = Module::from_file(engine(), path)
        .map_err(|e| anyhow!("compiling {}: {e:?}", path.display()))?;
    let mut linker = linker()?.clone();
    // Imports outside the ABI and WASI preview1 become traps when called, so a module that
    // links something unexpected still loads and the test sees which call it was.
    linker
        .define_unknown_imports_as_traps(&module)
        .map_err(|e| anyhow!("{e:?}"))?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| anyhow!("linking {}: {e:?}", path.display()))
        .context("the module imports a host function with an unexpected signature")?;
    cache.insert(path.to_path_buf(), (stamp, pre.clone()));
    Ok(pre)
}
