//! The simulated Envoy process: virtual clock, shared data, shared queues, metrics, host-wide
//! properties, the callout responder and the registry of its VMs.
//!
//! Everything VMs of one host share sits in [`HostShared`] behind `Arc<Mutex<..>>`; everything
//! else lives in each VM's wasmtime `Store`. Tests own their `Host`, so tests run in parallel.
//! A host call never locks a VM (only the shared parts), and the harness holds at most one VM
//! lock at a time, so there is no lock-order deadlock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::abi::{Failure, Status};
use super::types::{
    CalloutRequest, LogEntry, LogLevel, Metric, MetricKind, PropertyPath, PropertyValue, Response,
};
use super::vm::{Callout, Vm, VmBuilder, VmCell};

/// Virtual wall-clock start: 2025-01-01T00:00:00Z, in nanoseconds since the Unix epoch.
pub(crate) const EPOCH_START_NANOS: u64 = 1_735_689_600 * 1_000_000_000;

/// Upper bound on chained host-side deliveries (queue notifications, immediate callout answers)
/// after one call, so a module and a responder that answer each other forever end the test
/// with a log line instead of hanging.
pub(crate) const MAX_CHAINED_DELIVERIES: usize = 10_000;

pub(crate) type Responder = Arc<dyn Fn(&CalloutRequest) -> Option<Response> + Send + Sync>;

/// Locks a mutex, recovering the data if a panicking test poisoned it (the harness' own state is
/// always consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Shared data with Envoy's semantics (proxy-wasm-cpp-host `shared_data.cc`): keyed by `vm_id`
/// and key; `cas == 0` writes unconditionally, otherwise it must equal the stored version; a
/// missing key is written whatever the cas; versions come from one counter that skips 0.
#[derive(Default)]
pub(crate) struct SharedStore {
    values: HashMap<(String, String), (Vec<u8>, u32)>,
    last_cas: u32,
}

impl SharedStore {
    pub(crate) fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn keys(&self, vm_id: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .values
            .keys()
            .filter(|(id, _)| id == vm_id)
            .map(|(_, key)| key.clone())
            .collect();
        keys.sort();
        keys
    }

    /// `Err(())` is a cas mismatch.
    pub(crate) fn set(
        &mut self,
        vm_id: &str,
        key: &str,
        value: Vec<u8>,
        cas: u32,
    ) -> Result<u32, ()> {
        let slot = (vm_id.to_string(), key.to_string());
        if let Some((_, stored)) = self.values.get(&slot) {
            if cas != 0 && cas != *stored {
                return Err(());
            }
        }
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        let version = self.last_cas;
        self.values.insert(slot, (value, version));
        Ok(version)
    }
}

/// Shared queues (proxy-wasm-cpp-host `shared_queue.cc`): registered by `vm_id` and name; an
/// enqueue notifies the registering VM's root context with `on_queue_ready`.
#[derive(Default)]
pub(crate) struct Queues {
    by_name: HashMap<(String, String), u32>,
    queues: BTreeMap<u32, Queue>,
    last_id: u32,
}

pub(crate) struct Queue {
    owner_vm: usize,
    items: VecDeque<Vec<u8>>,
}

impl Queues {
    pub(crate) fn register(&mut self, vm_id: &str, name: &str, owner_vm: usize) -> u32 {
        let slot = (vm_id.to_string(), name.to_string());
        if let Some(id) = self.by_name.get(&slot) {
            let id = *id;
            if let Some(q) = self.queues.get_mut(&id) {
                q.owner_vm = owner_vm;
            }
            return id;
        }
        self.last_id += 1;
        let id = self.last_id;
        self.by_name.insert(slot, id);
        self.queues.insert(
            id,
            Queue {
                owner_vm,
                items: VecDeque::new(),
            },
        );
        id
    }

    pub(crate) fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    /// The owner VM to notify, or `None` for an unknown queue.
    pub(crate) fn enqueue(&mut self, id: u32, value: Vec<u8>) -> Option<usize> {
        let q = self.queues.get_mut(&id)?;
        q.items.push_back(value);
        Some(q.owner_vm)
    }

    /// `None`: unknown queue; `Some(None)`: empty.
    pub(crate) fn dequeue(&mut self, id: u32) -> Option<Option<Vec<u8>>> {
        Some(self.queues.get_mut(&id)?.items.pop_front())
    }
}

/// What all VMs of one host share.
pub(crate) struct HostShared {
    pub(crate) clock: Arc<AtomicU64>,
    pub(crate) shared_data: Mutex<SharedStore>,
    pub(crate) queues: Mutex<Queues>,
    pub(crate) metrics: Mutex<BTreeMap<(MetricKind, String), Metric>>,
    pub(crate) properties: Mutex<BTreeMap<Vec<String>, Vec<u8>>>,
    pub(crate) log_level: AtomicI32,
    pub(crate) upstreams: Mutex<Option<BTreeSet<String>>>,
    pub(crate) responder: Mutex<Option<Responder>>,
    pub(crate) vms: Mutex<Vec<Weak<VmCell>>>,
    pub(crate) next_vm: AtomicUsize,
    pub(crate) seed: AtomicU64,
    /// Host calls every VM answers with a failing status (see [`Host::fail_host_call`]).
    pub(crate) failures: Mutex<Vec<Failure>>,
    /// `(vm index, queue id)` notifications waiting for the current call to finish.
    pub(crate) queue_ready: Mutex<VecDeque<(usize, u32)>>,
}

impl HostShared {
    pub(crate) fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    pub(crate) fn responder(&self) -> Option<Responder> {
        lock(&self.responder).clone()
    }

    pub(crate) fn live_vms(&self) -> Vec<Arc<VmCell>> {
        lock(&self.vms).iter().filter_map(Weak::upgrade).collect()
    }

    /// Delivers queue notifications posted during the last call, each after the VM that posted
    /// it has been unlocked (Envoy posts them to the owning worker's event loop).
    pub(crate) fn drain_notifications(&self) {
        for _ in 0..MAX_CHAINED_DELIVERIES {
            let next = lock(&self.queue_ready).pop_front();
            let Some((vm_index, queue)) = next else {
                return;
            };
            if let Some(cell) = self.live_vms().into_iter().find(|c| c.index == vm_index) {
                Vm::from_cell(cell).deliver_queue_ready(queue);
            }
        }
    }
}

/// One simulated Envoy process.
///
/// Cloning a `Host` gives another handle on the same process. See the [module
/// docs](super) for an example.
#[derive(Clone)]
pub struct Host {
    pub(crate) shared: Arc<HostShared>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("elapsed", &self.elapsed())
            .field("vms", &self.shared.live_vms().len())
            .finish()
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

impl Host {
    /// A host whose virtual clock reads 2025-01-01T00:00:00Z, log level Info, every upstream
    /// name accepted, no responder, random seed 0.
    pub fn new() -> Host {
        Host {
            shared: Arc::new(HostShared {
                clock: Arc::new(AtomicU64::new(EPOCH_START_NANOS)),
                shared_data: Mutex::new(SharedStore::default()),
                queues: Mutex::new(Queues::default()),
                metrics: Mutex::new(BTreeMap::new()),
                properties: Mutex::new(BTreeMap::new()),
                log_level: AtomicI32::new(LogLevel::Info.to_abi()),
                upstreams: Mutex::new(None),
                responder: Mutex::new(None),
                vms: Mutex::new(Vec::new()),
                next_vm: AtomicUsize::new(0),
                seed: AtomicU64::new(0),
                queue_ready: Mutex::new(VecDeque::new()),
                failures: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Starts building a VM of the module `dist/keel_<name>.wasm` (see
    /// [`crate::module_path`]).
    pub fn vm(&self, name: &str) -> VmBuilder {
        VmBuilder::new(self.clone(), crate::module_path(name))
    }

    /// Starts building a VM of Keel's filter `root_id` (`rate_limit`, `picker`, ...) from its own
    /// module or from `keel.wasm`, with that root_id.
    pub fn filter(&self, root_id: &str, module: crate::Module) -> VmBuilder {
        VmBuilder::new(self.clone(), module.path(root_id)).root_id(root_id)
    }

    /// Starts building a VM of the module at this path.
    pub fn vm_from_path(&self, path: impl Into<PathBuf>) -> VmBuilder {
        VmBuilder::new(self.clone(), path.into())
    }

    /// Every live VM of this host, in creation order.
    pub fn vms(&self) -> Vec<Vm> {
        self.shared
            .live_vms()
            .into_iter()
            .map(Vm::from_cell)
            .collect()
    }

    // ----- time -----

    /// The virtual wall clock.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.shared.now())
    }

    /// The virtual clock in nanoseconds since the Unix epoch (what
    /// `proxy_get_current_time_nanoseconds` returns).
    pub fn now_nanos(&self) -> u64 {
        self.shared.now()
    }

    /// Virtual time elapsed since the host was created.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.shared.now().saturating_sub(EPOCH_START_NANOS))
    }

    /// Moves the virtual clock forward, firing in time order everything that falls due on the
    /// way: ticks of every VM whose period elapsed, delayed callout responses and callout
    /// timeouts. Events at the same instant fire in VM creation order; within a VM, callouts
    /// before the tick.
    pub fn advance(&self, by: Duration) {
        let target = self
            .shared
            .now()
            .saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX));
        loop {
            let mut next: Option<(u64, Arc<VmCell>)> = None;
            for cell in self.shared.live_vms() {
                let due = Vm::from_cell(cell.clone()).next_event();
                if let Some(at) = due {
                    if at <= target && next.as_ref().is_none_or(|(best, _)| at < *best) {
                        next = Some((at, cell));
                    }
                }
            }
            let Some((at, cell)) = next else {
                break;
            };
            self.shared.clock.fetch_max(at, Ordering::SeqCst);
            Vm::from_cell(cell).fire_due(at);
            self.shared.drain_notifications();
        }
        self.shared.clock.fetch_max(target, Ordering::SeqCst);
    }

    // ----- configuration -----

    /// The level `proxy_get_log_level` reports (Envoy's own log level; default Info). All
    /// `proxy_log` lines are captured whatever the level.
    pub fn set_log_level(&self, level: LogLevel) {
        self.shared
            .log_level
            .store(level.to_abi(), Ordering::SeqCst);
    }

    /// Declares the upstream (cluster) names callouts may use; a callout to any other name is
    /// refused with BadArgument, as Envoy refuses an unknown cluster. Until this is called every
    /// name is accepted.
    pub fn declare_upstreams<I, S>(&self, names: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let names = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        *lock(&self.shared.upstreams) = Some(names);
    }

    /// Installs a function that answers callouts as they are made: `Some(response)` answers
    /// (after the module's current callback returns, or `response.after(d)` later), `None`
    /// leaves the call pending for the test. It runs inside the host call, so it must not call
    /// back into the harness.
    pub fn set_responder<F>(&self, responder: F)
    where
        F: Fn(&CalloutRequest) -> Option<Response> + Send + Sync + 'static,
    {
        *lock(&self.shared.responder) = Some(Arc::new(responder));
    }

    /// Removes the responder.
    pub fn clear_responder(&self) {
        *lock(&self.shared.responder) = None;
    }

    /// Seeds the bytes WASI `random_get` returns to VMs created afterwards (each VM gets its own
    /// stream derived from the seed and its index).
    pub fn set_random_seed(&self, seed: u64) {
        self.shared.seed.store(seed, Ordering::SeqCst);
    }

    /// Sets a property every stream and root context of every VM sees, unless a VM or stream
    /// sets the same path. Values use Envoy's encodings (see [`PropertyValue`]).
    pub fn set_property(&self, path: impl PropertyPath, value: impl PropertyValue) {
        lock(&self.shared.properties).insert(path.segments(), value.encode());
    }

    // ----- failing host calls -----

    /// Makes the host call `call` answer `status` in every VM of this host, those running and
    /// those started later (from `_initialize` and `on_configure` on), until
    /// [`Host::heal_host_calls`]. A VM's own plan ([`Vm::fail_host_call`]) is used first.
    pub fn fail_host_call(&self, call: &str, status: Status) {
        lock(&self.shared.failures).push(Failure {
            call: call.to_string(),
            status,
            remaining: None,
        });
    }

    /// Forgets the failures planned for every VM with [`Host::fail_host_call`].
    pub fn heal_host_calls(&self) {
        lock(&self.shared.failures).clear();
    }

    // ----- shared data -----

    /// The value and version of a shared-data key of VMs with the empty `vm_id` (Envoy's
    /// default).
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared_data_in("", key)
    }

    /// The value and version of a shared-data key of VMs with this `vm_id`.
    pub fn shared_data_in(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.shared.shared_data).get(vm_id, key)
    }

    /// How many shared-data keys exist, over every `vm_id` (to check that state stays bounded).
    pub fn shared_data_count(&self) -> usize {
        lock(&self.shared.shared_data).len()
    }

    /// Every shared-data key of this `vm_id`, sorted.
    pub fn shared_data_keys(&self, vm_id: &str) -> Vec<String> {
        lock(&self.shared.shared_data).keys(vm_id)
    }

    /// Writes a shared-data key unconditionally (for VMs with the empty `vm_id`); returns the
    /// new version.
    pub fn set_shared_data(&self, key: &str, value: impl Into<Vec<u8>>) -> u32 {
        self.set_shared_data_in("", key, value)
    }

    /// Writes a shared-data key unconditionally for VMs with this `vm_id`; returns the new
    /// version.
    pub fn set_shared_data_in(&self, vm_id: &str, key: &str, value: impl Into<Vec<u8>>) -> u32 {
        lock(&self.shared.shared_data)
            .set(vm_id, key, value.into(), 0)
            .unwrap_or(0)
    }

    // ----- metrics -----

    /// A counter's value (0 when never defined), summed over every VM of the host.
    pub fn counter(&self, name: &str) -> u64 {
        self.metric(MetricKind::Counter, name)
            .map_or(0, |m| m.value as u64)
    }

    /// A gauge's value (0 when never defined).
    pub fn gauge(&self, name: &str) -> i64 {
        self.metric(MetricKind::Gauge, name).map_or(0, |m| m.value)
    }

    /// A histogram's recorded samples, in order (empty when never defined).
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        self.metric(MetricKind::Histogram, name)
            .map(|m| m.samples)
            .unwrap_or_default()
    }

    /// A metric by kind and name, if some VM defined it.
    pub fn metric(&self, kind: MetricKind, name: &str) -> Option<Metric> {
        lock(&self.shared.metrics)
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// Every defined metric, sorted by kind then name.
    pub fn metrics(&self) -> Vec<Metric> {
        lock(&self.shared.metrics).values().cloned().collect()
    }

    // ----- callouts and logs across VMs -----

    /// Every unanswered callout of every VM, by VM then token.
    pub fn callouts(&self) -> Vec<Callout> {
        self.vms().iter().flat_map(Vm::callouts).collect()
    }

    /// Every captured log line of every VM, tagged with the VM's index.
    pub fn logs(&self) -> Vec<(usize, LogEntry)> {
        self.vms()
            .iter()
            .flat_map(|vm| {
                let index = vm.index();
                vm.logs().into_iter().map(move |entry| (index, entry))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_store_follows_envoy_cas_rules() {
        let mut store = SharedStore::default();
        // A missing key is written whatever the cas.
        let v1 = store.set("", "k", b"a".to_vec(), 77).unwrap();
        assert_eq!(v1, 1);
        assert_eq!(store.set("", "k", b"b".to_vec(), 99), Err(()));
        let v2 = store.set("", "k", b"b".to_vec(), v1).unwrap();
        assert_ne!(v2, v1);
        // cas 0 writes unconditionally.
        let v3 = store.set("", "k", b"c".to_vec(), 0).unwrap();
        assert_eq!(store.get("", "k"), Some((b"c".to_vec(), v3)));
        // vm_ids are separate namespaces.
        assert_eq!(store.get("other", "k"), None);
    }

    #[test]
    fn shared_store_versions_skip_zero() {
        let mut store = SharedStore {
            last_cas: u32::MAX - 1,
            ..SharedStore::default()
        };
        assert_eq!(store.set("", "a", vec![], 0), Ok(u32::MAX));
        assert_eq!(store.set("", "a", vec![], 0), Ok(1));
    }

    #[test]
    fn queues_register_resolve_and_drain_in_order() {
        let mut queues = Queues::default();
        let id = queues.register("vm", "q", 3);
        assert_eq!(queues.register("vm", "q", 4), id);
        assert_eq!(queues.resolve("vm", "q"), Some(id));
        assert_eq!(queues.resolve("other", "q"), None);
        assert_eq!(queues.enqueue(id, b"1".to_vec()), Some(4));
        assert_eq!(queues.enqueue(id + 1, b"x".to_vec()), None);
        assert_eq!(queues.dequeue(id), Some(Some(b"1".to_vec())));
        assert_eq!(queues.dequeue(id), Some(None));
        assert_eq!(queues.dequeue(id + 1), None);
    }
}
