//! One wasm VM (an Envoy worker's instance of a module): its wasmtime store and the per-VM host
//! state, the calls into the module's exports, ticks, callouts and crash handling.
//!
//! Envoy behaviours kept here (proxy-wasm-cpp-host `context.cc`, Envoy
//! `source/extensions/common/wasm/context.cc`):
//! - every callback starts with the effective context set to the callback's own context;
//! - a local reply makes the current callback's result StopIteration whatever it returned;
//! - a trap fails the VM: the stream gets a 503 local reply (`wasm_fail_stream`, the
//!   fail-closed policy) and no callback of that VM runs again;
//! - callout answers are delivered to the root context id with `proxy_on_http_call_response`
//!   after the current callback returns; the response's headers, body and trailers are readable
//!   only during that call.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::{Instance, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{Deterministic, HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use super::abi::{Failure, Status};
use super::engine;
use super::host::{lock, Host, HostShared, EPOCH_START_NANOS, MAX_CHAINED_DELIVERIES};
use super::stream::{HttpStream, StreamData};
use super::types::{
    CalloutRequest, HeaderList, LocalReply, LogEntry, LogLevel, MetricKind, PropertyPath,
    PropertyValue, Response,
};

/// A callout the module made and nobody answered yet.
pub(crate) struct PendingCallout {
    pub(crate) request: CalloutRequest,
    /// When Envoy's router would answer 504 (virtual nanoseconds), if the call has a timeout.
    pub(crate) deadline: Option<u64>,
    /// A delayed answer and when it falls due.
    pub(crate) scheduled: Option<(u64, Response)>,
}

/// The callout response being delivered, readable by the module during
/// `proxy_on_http_call_response` only.
pub(crate) struct CallResponse {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Vec<(String, String)>,
}

/// The per-VM host state, the data of the wasmtime `Store`.
pub(crate) struct VmState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) host: Arc<HostShared>,
    pub(crate) index: usize,
    pub(crate) vm_id: String,
    pub(crate) root_id: String,
    pub(crate) plugin_name: String,
    pub(crate) root_context: u32,
    pub(crate) last_context: u32,
    /// The context of the running callback, and the one host calls act on.
    pub(crate) effective: u32,
    pub(crate) streams: BTreeMap<u32, StreamData>,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) plugin_config: Vec<u8>,
    pub(crate) in_configure: bool,
    pub(crate) configured: bool,
    pub(crate) tick_period: Option<u64>,
    pub(crate) next_tick: Option<u64>,
    pub(crate) callouts: BTreeMap<u32, PendingCallout>,
    pub(crate) last_token: u32,
    pub(crate) call_response: Option<CallResponse>,
    /// Answers to deliver as soon as the current callback returns.
    pub(crate) immediate: VecDeque<(u32, Response)>,
    pub(crate) metric_ids: HashMap<u32, (MetricKind, String)>,
    pub(crate) last_metric: u32,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) properties: BTreeMap<Vec<String>, Vec<u8>>,
    /// Calls into the module: callbacks (exports the host called), and allocations the host
    /// asked of the module to hand it data (a host call that returns data enters the VM again).
    pub(crate) callbacks: u64,
    pub(crate) allocations: u64,
    /// Callbacks per export name, and calls of each `env` host function by the module.
    pub(crate) callback_counts: BTreeMap<String, u64>,
    /// Host calls by (the callback the host was in, the host function).
    pub(crate) host_calls: BTreeMap<(&'static str, &'static str), u64>,
    /// The export the host is calling now (for `host_calls`).
    pub(crate) current_callback: &'static str,
    /// How many times the module asked for each property path (found or not).
    pub(crate) property_reads: BTreeMap<Vec<String>, u64>,
    /// Fuel the module consumed, by export (only with `KEEL_FUEL`, see `engine`).
    pub(crate) fuel: BTreeMap<String, u64>,
    /// With fuel: the fuel and host call at the last host call of the current callback, and the
    /// fuel spent between consecutive host calls, by (callback, previous call, next call).
    pub(crate) fuel_mark: Option<(u64, &'static str)>,
    pub(crate) fuel_segments: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    pub(crate) crashed: Option<String>,
    /// `proxy_get_status`: set to BrokenConnection/"reset" while a failed callout is delivered.
    pub(crate) status: (u32, String),
    /// Set by `proxy_send_local_response`: the current callback's result becomes StopIteration.
    pub(crate) stop_iteration: bool,
    pub(crate) done_called: bool,
    /// Host calls this VM answers with a failing status (see [`Vm::fail_host_call`]).
    pub(crate) failures: Vec<Failure>,
    /// How many failing answers each host call gave, by import name.
    pub(crate) failed_calls: BTreeMap<String, u64>,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl VmState {
    pub(crate) fn now(&self) -> u64 {
        self.host.now()
    }

    /// The stream the host calls act on, if the effective context is a live stream.
    pub(crate) fn effective_stream(&mut self) -> Option<&mut StreamData> {
        let id = self.effective;
        self.streams.get_mut(&id).filter(|s| !s.deleted)
    }

    pub(crate) fn is_live_context(&self, id: u32) -> bool {
        id == self.root_context || self.streams.get(&id).is_some_and(|s| !s.deleted)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.logs.push(LogEntry { level, message });
    }
}

/// A wall clock that reads the host's virtual clock (for WASI `clock_time_get`).
struct VirtualWallClock(Arc<std::sync::atomic::AtomicU64>);

impl HostWallClock for VirtualWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A monotonic clock that reads the host's virtual clock (nanoseconds since the host started).
struct VirtualMonotonicClock(Arc<std::sync::atomic::AtomicU64>);

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.0
            .load(Ordering::SeqCst)
            .saturating_sub(EPOCH_START_NANOS)
    }
}

/// Bytes for WASI `random_get`: a splitmix64 stream, so runs are reproducible.
fn random_bytes(seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(4096);
    while out.len() < 4096 {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

pub(crate) struct VmInner {
    pub(crate) store: Store<VmState>,
    instance: Instance,
}

/// How a call into the module ended.
enum Outcome {
    /// The export does not exist: the host's default applies.
    Missing,
    /// The VM has crashed before: nothing ran.
    Skipped,
    /// It returned (the value of a function with a result).
    Returned(Option<i32>),
    /// It trapped; the VM is now crashed.
    Trapped,
}

/// The callbacks' names as `'static` strings for the host-call counts (others: "other").
fn callback_name(name: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "_initialize",
        "_start",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_context_create",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_request_trailers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_response_trailers",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
        "proxy_on_tick",
        "proxy_on_http_call_response",
        "proxy_on_queue_ready",
    ];
    KNOWN
        .iter()
        .find(|k| **k == name)
        .copied()
        .unwrap_or("other")
}

impl VmInner {
    /// Calls an export with i32 arguments, the effective context set to `context`.
    fn call(&mut self, name: &str, context: u32, args: &[i32]) -> Outcome {
        if self.store.data().crashed.is_some() {
            return Outcome::Skipped;
        }
        let Some(func) = self.instance.get_func(&mut self.store, name) else {
            return Outcome::Missing;
        };
        {
            let st = self.store.data_mut();
            st.callbacks += 1;
            *st.callback_counts.entry(name.to_string()).or_default() += 1;
            st.current_callback = callback_name(name);
            st.effective = context;
            st.stop_iteration = false;
        }
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let ty = func.ty(&self.store);
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        let fuel_before = self.store.get_fuel().ok();
        self.store.data_mut().fuel_mark = fuel_before.map(|f| (f, "start"));
        let called = func.call(&mut self.store, &params, &mut results);
        if let (Some((mark, last)), Ok(after)) =
            (self.store.data().fuel_mark, self.store.get_fuel())
        {
            let st = self.store.data_mut();
            *st.fuel_segments
                .entry((st.current_callback, last, "end"))
                .or_default() += mark.saturating_sub(after);
            st.fuel_mark = None;
        }
        if let (Some(before), Ok(after)) = (fuel_before, self.store.get_fuel()) {
            *self
                .store
                .data_mut()
                .fuel
                .entry(name.to_string())
                .or_default() += before.saturating_sub(after);
        }
        match called {
            Ok(()) => Outcome::Returned(results.first().and_then(Val::i32)),
            Err(error) => {
                let message = format!("{name} trapped: {error:?}");
                let st = self.store.data_mut();
                st.log(LogLevel::Critical, message.clone());
                st.crashed = Some(message);
                Outcome::Trapped
            }
        }
    }

    fn call_bool(&mut self, name: &str, context: u32, args: &[i32]) -> bool {
        match self.call(name, context, args) {
            Outcome::Returned(v) => v.unwrap_or(1) != 0,
            Outcome::Missing => true,
            Outcome::Skipped | Outcome::Trapped => false,
        }
    }

    pub(crate) fn state(&self) -> &VmState {
        self.store.data()
    }

    pub(crate) fn state_mut(&mut self) -> &mut VmState {
        self.store.data_mut()
    }

    fn root(&self) -> u32 {
        self.store.data().root_context
    }

    fn boot(&mut self) {
        let root = self.root();
        let init = match self.call("_initialize", root, &[]) {
            Outcome::Missing => self.call("_start", root, &[]),
            other => other,
        };
        if matches!(init, Outcome::Trapped) {
            return;
        }
        self.call("proxy_on_context_create", root, &[root as i32, 0]);
        let vm_config_len = self.state().vm_config.len() as i32;
        let started = self.call_bool("proxy_on_vm_start", root, &[root as i32, vm_config_len]);
        let configured = started && self.configure();
        self.state_mut().configured = configured;
        self.flush_immediate();
    }

    fn configure(&mut self) -> bool {
        let root = self.root();
        let len = self.state().plugin_config.len() as i32;
        self.state_mut().in_configure = true;
        let ok = self.call_bool("proxy_on_configure", root, &[root as i32, len]);
        self.state_mut().in_configure = false;
        ok
    }

    // ----- HTTP streams -----

    pub(crate) fn create_stream(&mut self) -> u32 {
        let root = self.root();
        let st = self.state_mut();
        st.last_context += 1;
        let id = st.last_context;
        st.streams.insert(id, StreamData::default());
        self.call("proxy_on_context_create", id, &[id as i32, root as i32]);
        id
    }

    /// Runs a stream callback and applies Envoy's rules to its result.
    pub(crate) fn stream_callback(&mut self, id: u32, export: &str, args: &[i32]) -> super::Action {
        use super::Action;
        let outcome = self.call(export, id, args);
        let stop = self.state().stop_iteration;
        match outcome {
            Outcome::Missing => Action::Continue,
            Outcome::Returned(v) if !stop && v.unwrap_or(0) == 0 => Action::Continue,
            Outcome::Returned(_) => Action::Pause,
            Outcome::Skipped | Outcome::Trapped => {
                self.fail_stream(id);
                Action::Pause
            }
        }
    }

    /// Envoy's fail-closed policy for a stream of a crashed VM.
    pub(crate) fn fail_stream(&mut self, id: u32) {
        if let Some(stream) = self.state_mut().streams.get_mut(&id) {
            if stream.local_reply.is_none() {
                stream.local_reply = Some(LocalReply {
                    status: 503,
                    headers: Vec::new(),
                    body: Vec::new(),
                    grpc_status: Some(14),
                    details: "wasm_fail_stream".to_string(),
                });
            }
        }
    }

    pub(crate) fn end_stream(&mut self, id: u32) {
        let already = self.state().streams.get(&id).is_none_or(|s| s.deleted);
        if already {
            return;
        }
        self.call("proxy_on_log", id, &[id as i32]);
        self.call("proxy_on_done", id, &[id as i32]);
        self.call("proxy_on_delete", id, &[id as i32]);
        if let Some(stream) = self.state_mut().streams.get_mut(&id) {
            stream.deleted = true;
        }
        self.flush_immediate();
    }

    // ----- ticks and callouts -----

    pub(crate) fn tick(&mut self) {
        let root = self.root();
        self.call("proxy_on_tick", root, &[root as i32]);
        self.flush_immediate();
    }

    fn next_event(&self) -> Option<u64> {
        let st = self.state();
        if st.crashed.is_some() {
            return None;
        }
        let callouts = st
            .callouts
            .values()
            .filter_map(|c| match (&c.scheduled, c.deadline) {
                (Some((at, _)), Some(deadline)) => Some((*at).min(deadline)),
                (Some((at, _)), None) => Some(*at),
                (None, deadline) => deadline,
            })
            .min();
        match (callouts, st.next_tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fire_due(&mut self, now: u64) {
        for _ in 0..MAX_CHAINED_DELIVERIES {
            let st = self.state();
            if st.crashed.is_some() {
                return;
            }
            let tick = (st.next_tick, st.tick_period);
            let due_callout = st
                .callouts
                .iter()
                .filter_map(|(token, c)| {
                    let answer = c.scheduled.as_ref().map(|(at, _)| *at);
                    let at = match (answer, c.deadline) {
                        (Some(a), Some(d)) => a.min(d),
                        (a, d) => a.or(d)?,
                    };
                    (at <= now).then_some((at, *token))
                })
                .min();
            if let Some((_, token)) = due_callout {
                let timed_out = self
                    .state_mut()
                    .callouts
                    .get_mut(&token)
                    .map(|c| match &c.scheduled {
                        Some((answer_at, _)) => c.deadline.is_some_and(|d| d < *answer_at),
                        None => true,
                    })
                    .unwrap_or(true);
                let response = if timed_out {
                    Response::timeout()
                } else {
                    self.state_mut()
                        .callouts
                        .get_mut(&token)
                        .and_then(|c| c.scheduled.take())
                        .map_or_else(Response::timeout, |(_, r)| r)
                };
                self.deliver(token, response);
                self.flush_immediate();
                continue;
            }
            match tick {
                (Some(at), Some(period)) if at <= now => {
                    self.state_mut().next_tick = Some(at.saturating_add(period));
                    self.tick();
                }
                _ => return,
            }
        }
    }

    /// Delivers an answer to a pending callout (ignored if the call is no longer pending).
    pub(crate) fn deliver(&mut self, token: u32, response: Response) {
        if self.state_mut().callouts.remove(&token).is_none() {
            return;
        }
        let root = self.root();
        if response.reset {
            self.state_mut().status = (11, "reset".to_string());
            self.call(
                "proxy_on_http_call_response",
                root,
                &[root as i32, token as i32, 0, 0, 0],
            );
        } else {
            let headers = response.wire_headers();
            let args = [
                root as i32,
                token as i32,
                headers.len() as i32,
                response.body.len() as i32,
                response.trailers.len() as i32,
            ];
            self.state_mut().call_response = Some(CallResponse {
                headers,
                body: response.body,
                trailers: response.trailers,
            });
            self.call("proxy_on_http_call_response", root, &args);
        }
        let st = self.state_mut();
        st.call_response = None;
        st.status = (0, String::new());
    }

    /// Delivers the answers a responder gave during the last callback.
    pub(crate) fn flush_immediate(&mut self) {
        for _ in 0..MAX_CHAINED_DELIVERIES {
            let Some((token, response)) = self.state_mut().immediate.pop_front() else {
                return;
            };
            self.deliver(token, response);
        }
        self.state_mut().log(
            LogLevel::Critical,
            "harness: too many chained callout answers; stopped delivering".to_string(),
        );
    }

    /// Answers a callout now, or schedules it when the response has a delay.
    pub(crate) fn answer(&mut self, token: u32, response: Response) {
        if response.delay.is_zero() {
            self.deliver(token, response);
            self.flush_immediate();
            return;
        }
        let at = self
            .state()
            .now()
            .saturating_add(u64::try_from(response.delay.as_nanos()).unwrap_or(u64::MAX));
        if let Some(c) = self.state_mut().callouts.get_mut(&token) {
            c.scheduled = Some((at, response));
        }
    }
}

/// The cell a [`Vm`] handle shares with its host's registry.
pub(crate) struct VmCell {
    pub(crate) index: usize,
    pub(crate) host: Arc<HostShared>,
    pub(crate) inner: Mutex<VmInner>,
}

/// One VM of a module (an Envoy worker's instance), with its root context configured.
///
/// Cloning gives another handle on the same VM.
#[derive(Clone)]
pub struct Vm {
    pub(crate) cell: Arc<VmCell>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("index", &self.cell.index)
            .finish()
    }
}

impl Vm {
    pub(crate) fn from_cell(cell: Arc<VmCell>) -> Vm {
        Vm { cell }
    }

    /// Runs `f` on the locked VM, then delivers queue notifications it posted.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut VmInner) -> R) -> R {
        let result = {
            let mut inner = lock(&self.cell.inner);
            f(&mut inner)
        };
        self.cell.host.drain_notifications();
        result
    }

    /// Reads the VM's state without calling into it.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&VmState) -> R) -> R {
        let inner = lock(&self.cell.inner);
        f(inner.state())
    }

    /// The host this VM belongs to.
    pub fn host(&self) -> Host {
        Host {
            shared: self.cell.host.clone(),
        }
    }

    /// The VM's index in its host (creation order, from 0).
    pub fn index(&self) -> usize {
        self.cell.index
    }

    /// The root context's id.
    pub fn root_context_id(&self) -> u32 {
        self.read(|st| st.root_context)
    }

    /// Whether `proxy_on_vm_start` and the last `proxy_on_configure` both returned true (a
    /// refused configuration is a normal outcome: this is false, the VM stays usable).
    pub fn configured(&self) -> bool {
        self.read(|st| st.configured)
    }

    /// Calls `proxy_on_configure` again with a new plugin configuration (as Envoy does on a
    /// configuration update); returns its result.
    pub fn configure(&self, plugin_config: impl Into<Vec<u8>>) -> bool {
        let config = plugin_config.into();
        self.with(|inner| {
            inner.state_mut().plugin_config = config;
            let ok = inner.configure();
            inner.state_mut().configured = ok;
            inner.flush_immediate();
            ok
        })
    }

    /// The trap that crashed the VM, if any (message with the wasm backtrace). A crashed VM runs
    /// no callback again, and its streams get 503 local replies, as with Envoy's fail-closed
    /// policy.
    pub fn crashed(&self) -> Option<String> {
        self.read(|st| st.crashed.clone())
    }

    /// The size of the module's linear memory in bytes (it only grows: a bound on what the
    /// module holds).
    pub fn memory_bytes(&self) -> usize {
        let mut inner = lock(&self.cell.inner);
        let inner = &mut *inner;
        match inner.instance.get_memory(&mut inner.store, "memory") {
            Some(memory) => memory.data_size(&inner.store),
            None => 0,
        }
    }

    /// Whether the module called `proxy_done`.
    pub fn done_called(&self) -> bool {
        self.read(|st| st.done_called)
    }

    // ----- streams -----

    /// Creates an HTTP stream (`proxy_on_context_create(id, root)`).
    pub fn http_stream(&self) -> HttpStream {
        let id = self.with(VmInner::create_stream);
        HttpStream::new(self.clone(), id)
    }

    /// Creates a stream and sends these request headers with `end_of_stream = true`: the usual
    /// first step of a test.
    pub fn send_request(&self, headers: impl Into<HeaderList>) -> HttpStream {
        let stream = self.http_stream();
        stream.request_headers(headers, true);
        stream
    }

    // ----- ticks -----

    /// The period the module set with `proxy_set_tick_period_milliseconds` (`None`: no ticks).
    pub fn tick_period(&self) -> Option<Duration> {
        self.read(|st| st.tick_period.map(Duration::from_nanos))
    }

    /// Calls `proxy_on_tick` now, whatever the period.
    pub fn tick(&self) {
        self.with(VmInner::tick);
    }

    pub(crate) fn next_event(&self) -> Option<u64> {
        lock(&self.cell.inner).next_event()
    }

    pub(crate) fn fire_due(&self, now: u64) {
        self.with(|inner| inner.fire_due(now));
    }

    pub(crate) fn deliver_queue_ready(&self, queue: u32) {
        let mut inner = lock(&self.cell.inner);
        let root = inner.root();
        inner.call("proxy_on_queue_ready", root, &[root as i32, queue as i32]);
        inner.flush_immediate();
    }

    // ----- callouts -----

    /// The VM's unanswered callouts, by token.
    pub fn callouts(&self) -> Vec<Callout> {
        self.read(|st| {
            st.callouts
                .values()
                .filter(|c| c.scheduled.is_none())
                .map(|c| c.request.clone())
                .collect::<Vec<_>>()
        })
        .into_iter()
        .map(|request| Callout {
            request,
            vm: self.clone(),
        })
        .collect()
    }

    /// The oldest unanswered callout.
    pub fn next_callout(&self) -> Option<Callout> {
        self.callouts().into_iter().next()
    }

    // ----- logs, output, properties -----

    /// Every captured log line, oldest first.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.read(|st| st.logs.clone())
    }

    /// The captured log lines at this level or above.
    pub fn logs_at_least(&self, level: LogLevel) -> Vec<LogEntry> {
        self.read(|st| {
            st.logs
                .iter()
                .filter(|e| e.level >= level)
                .cloned()
                .collect()
        })
    }

    /// Whether some captured log line contains this text.
    pub fn has_log(&self, text: &str) -> bool {
        self.read(|st| st.logs.iter().any(|e| e.message.contains(text)))
    }

    /// Forgets the captured log lines.
    pub fn clear_logs(&self) {
        lock(&self.cell.inner).state_mut().logs.clear();
    }

    /// What the module wrote to WASI stdout (Envoy logs it at info).
    pub fn stdout(&self) -> String {
        self.read(|st| String::from_utf8_lossy(&st.stdout.contents()).into_owned())
    }

    /// What the module wrote to WASI stderr (Envoy logs it at error; a Rust panic message lands
    /// here when no panic hook logs it).
    pub fn stderr(&self) -> String {
        self.read(|st| String::from_utf8_lossy(&st.stderr.contents()).into_owned())
    }

    /// How many times the host has entered the module so far: (callbacks, allocations). Each
    /// callback of each filter instance, and each host call that hands the module data (the
    /// host asks the module to allocate it), is a crossing into the VM, which is most of what a
    /// wasm filter instance costs before its logic.
    pub fn entries(&self) -> (u64, u64) {
        self.read(|st| (st.callbacks, st.allocations))
    }

    /// Fuel spent between consecutive host calls, by (callback, previous host call or
    /// `start`, next host call or `end`); empty unless `KEEL_FUEL` is set.
    pub fn fuel_segments(&self) -> BTreeMap<(String, String, String), u64> {
        self.read(|st| {
            st.fuel_segments
                .iter()
                .map(|((a, b, c), n)| ((a.to_string(), b.to_string(), c.to_string()), *n))
                .collect()
        })
    }

    /// Fuel (about one unit per wasm instruction) the module consumed so far, by export; empty
    /// unless `KEEL_FUEL` is set.
    pub fn fuel(&self) -> BTreeMap<String, u64> {
        self.read(|st| st.fuel.clone())
    }

    /// How many times the host has called each export of the module so far (callbacks by
    /// name: `proxy_on_request_headers`, `proxy_on_done`, ...).
    pub fn callback_counts(&self) -> BTreeMap<String, u64> {
        self.read(|st| st.callback_counts.clone())
    }

    /// How many times the module has called each proxy-wasm host function so far (by import
    /// name: `proxy_get_header_map_value`, `proxy_get_property`, ...). WASI calls are not
    /// counted here.
    pub fn host_calls(&self) -> BTreeMap<String, u64> {
        self.read(|st| {
            let mut calls = BTreeMap::new();
            for ((_, name), n) in &st.host_calls {
                *calls.entry(name.to_string()).or_default() += n;
            }
            calls
        })
    }

    /// [`Vm::host_calls`] by the callback they were made in: `(callback, host function)`, e.g.
    /// `("proxy_on_log", "proxy_set_shared_data")`.
    pub fn host_calls_by_callback(&self) -> BTreeMap<(String, String), u64> {
        self.read(|st| {
            st.host_calls
                .iter()
                .map(|((cb, name), n)| ((cb.to_string(), name.to_string()), *n))
                .collect()
        })
    }

    /// How many times the module asked for the property at `path` (found or not), e.g.
    /// `["xds", "route_name"]`: property reads are among a filter's dearer host calls.
    pub fn property_reads(&self, path: &[&str]) -> u64 {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.read(|st| st.property_reads.get(&path).copied().unwrap_or(0))
    }

    /// How many times the module asked for each property path so far (found or not).
    pub fn property_read_counts(&self) -> BTreeMap<Vec<String>, u64> {
        self.read(|st| st.property_reads.clone())
    }

    // ----- failing host calls -----

    /// Makes the host call `call` (the import's name, `"proxy_set_shared_data"`) answer
    /// `status` every time from now on, without doing its work, as a host under pressure or
    /// without the capability would. Until [`Vm::heal_host_calls`].
    pub fn fail_host_call(&self, call: &str, status: Status) {
        self.plan_failure(call, status, None);
    }

    /// Makes the next `times` calls of `call` answer `status`; the calls after them work.
    pub fn fail_host_call_times(&self, call: &str, status: Status, times: u64) {
        self.plan_failure(call, status, Some(times));
    }

    /// Makes the next call of `call` answer `status`.
    pub fn fail_host_call_once(&self, call: &str, status: Status) {
        self.plan_failure(call, status, Some(1));
    }

    fn plan_failure(&self, call: &str, status: Status, remaining: Option<u64>) {
        lock(&self.cell.inner).state_mut().failures.push(Failure {
            call: call.to_string(),
            status,
            remaining,
        });
    }

    /// Forgets every failure planned for this VM: host calls work again.
    pub fn heal_host_calls(&self) {
        lock(&self.cell.inner).state_mut().failures.clear();
    }

    /// How many times `call` answered a planned failure in this VM.
    pub fn failed_host_calls(&self, call: &str) -> u64 {
        self.read(|st| st.failed_calls.get(call).copied().unwrap_or(0))
    }

    /// Sets a property this VM's contexts see (over the host's, under a stream's).
    pub fn set_property(&self, path: impl PropertyPath, value: impl PropertyValue) {
        lock(&self.cell.inner)
            .state_mut()
            .properties
            .insert(path.segments(), value.encode());
    }
}

/// A callout the module made, as the test sees it: the request (through `Deref`, e.g.
/// `call.upstream`, `call.header(":path")`) and the means to answer it.
pub struct Callout {
    request: CalloutRequest,
    vm: Vm,
}

impl Deref for Callout {
    type Target = CalloutRequest;

    fn deref(&self) -> &CalloutRequest {
        &self.request
    }
}

impl std::fmt::Debug for Callout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.request.fmt(f)
    }
}

impl Callout {
    /// Answers the call: delivered now to the root context, or `response.after(d)` later on
    /// the virtual clock. Ignored if the call was already answered or timed out.
    pub fn respond(self, response: Response) {
        let token = self.request.token;
        self.vm.with(|inner| inner.answer(token, response));
    }

    /// Fails the call as a connection reset: 0 headers, 0 body, 0 trailers.
    pub fn fail(self) {
        self.respond(Response::reset());
    }

    /// The request.
    pub fn request(&self) -> &CalloutRequest {
        &self.request
    }
}

/// Builds and starts a [`Vm`]: `host.vm("probe").config("tick_ms=10").start()?`.
#[must_use = "call .start() to create the VM"]
pub struct VmBuilder {
    host: Host,
    path: PathBuf,
    root_id: String,
    vm_id: String,
    plugin_name: Option<String>,
    vm_config: Vec<u8>,
    plugin_config: Vec<u8>,
}

impl VmBuilder {
    pub(crate) fn new(host: Host, path: PathBuf) -> VmBuilder {
        VmBuilder {
            host,
            path,
            root_id: String::new(),
            vm_id: String::new(),
            plugin_name: None,
            vm_config: Vec::new(),
            plugin_config: Vec::new(),
        }
    }

    /// The plugin's `root_id` (property `plugin_root_id`; default "").
    pub fn root_id(mut self, root_id: &str) -> VmBuilder {
        self.root_id = root_id.to_string();
        self
    }

    /// The `vm_id`: VMs share shared data and queues only with VMs of the same `vm_id`, as in
    /// Envoy (default "").
    pub fn vm_id(mut self, vm_id: &str) -> VmBuilder {
        self.vm_id = vm_id.to_string();
        self
    }

    /// The plugin name (property `plugin_name`; default: the root id).
    pub fn plugin_name(mut self, name: &str) -> VmBuilder {
        self.plugin_name = Some(name.to_string());
        self
    }

    /// The VM configuration (`proxy_on_vm_start`'s buffer).
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> VmBuilder {
        self.vm_config = config.into();
        self
    }

    /// The plugin configuration (`proxy_on_configure`'s buffer).
    pub fn config(mut self, config: impl Into<Vec<u8>>) -> VmBuilder {
        self.plugin_config = config.into();
        self
    }

    /// Instantiates the module, runs `_initialize` (or `_start`), creates the root context and
    /// calls `proxy_on_vm_start` and `proxy_on_configure`. Errors only when the module cannot
    /// be loaded or linked; a refused configuration or a trap is reported by
    /// [`Vm::configured`] and [`Vm::crashed`].
    pub fn start(self) -> anyhow::Result<Vm> {
        let pre = engine::instance_pre(&self.path)?;
        let shared = self.host.shared.clone();
        let index = shared.next_vm.fetch_add(1, Ordering::SeqCst);
        let seed = shared.seed.load(Ordering::SeqCst) ^ (index as u64).wrapping_mul(0x9E37_79B9);
        let stdout = MemoryOutputPipe::new(1 << 20);
        let stderr = MemoryOutputPipe::new(1 << 20);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(VirtualWallClock(shared.clock.clone()))
            .monotonic_clock(VirtualMonotonicClock(shared.clock.clone()))
            .secure_random(Deterministic::new(random_bytes(seed)))
            .insecure_random(Deterministic::new(random_bytes(!seed)))
            .build_p1();
        let state = VmState {
            wasi,
            host: shared.clone(),
            index,
            plugin_name: self.plugin_name.unwrap_or_else(|| self.root_id.clone()),
            vm_id: self.vm_id,
            root_id: self.root_id,
            root_context: 1,
            last_context: 1,
            effective: 1,
            streams: BTreeMap::new(),
            vm_config: self.vm_config,
            plugin_config: self.plugin_config,
            in_configure: false,
            configured: false,
            tick_period: None,
            next_tick: None,
            callouts: BTreeMap::new(),
            last_token: 0,
            call_response: None,
            immediate: VecDeque::new(),
            metric_ids: HashMap::new(),
            last_metric: 0,
            logs: Vec::new(),
            properties: BTreeMap::new(),
            property_reads: BTreeMap::new(),
            fuel: BTreeMap::new(),
            fuel_mark: None,
            fuel_segments: BTreeMap::new(),
            callbacks: 0,
            allocations: 0,
            callback_counts: BTreeMap::new(),
            host_calls: BTreeMap::new(),
            current_callback: "start",
            crashed: None,
            status: (0, String::new()),
            stop_iteration: false,
            done_called: false,
            failures: Vec::new(),
            failed_calls: BTreeMap::new(),
            stdout,
            stderr,
        };
        let mut store = Store::new(engine::engine(), state);
        if engine::fuel_on() {
            store
                .set_fuel(u64::MAX / 2)
                .map_err(|e| anyhow::anyhow!("setting fuel: {e:?}"))?;
        }
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| anyhow::anyhow!("instantiating {}: {e:?}", self.path.display()))?;
        let cell = Arc::new(VmCell {
            index,
            host: shared.clone(),
            inner: Mutex::new(VmInner { store, instance }),
        });
        lock(&shared.vms).push(Arc::downgrade(&cell));
        let vm = Vm { cell };
        vm.with(VmInner::boot);
        Ok(vm)
    }

    /// Starts `n` VMs with the same settings, like Envoy's `n` worker threads.
    pub fn start_workers(self, n: usize) -> anyhow::Result<Vec<Vm>> {
        (0..n)
            .map(|_| {
                VmBuilder {
                    host: self.host.clone(),
                    path: self.path.clone(),
                    root_id: self.root_id.clone(),
                    vm_id: self.vm_id.clone(),
                    plugin_name: self.plugin_name.clone(),
                    vm_config: self.vm_config.clone(),
                    plugin_config: self.plugin_config.clone(),
                }
                .start()
            })
            .collect()
    }
}
