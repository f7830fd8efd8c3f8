//! `keel.wasm`: every Keel filter in one module, each selected by its plugin's `root_id`
//! (`circuit_breaker`, `retry`, `rate_limit`, `picker`, `discovery`, `idempotency`, `adaptive`), built from the same filter
//! crates as the modules of one filter each; and root_id `pipeline`, one filter that runs
//! several of them per request as stages (`keel_proxy::pipeline`, `docs/config/pipeline.md`).
//!
//! Envoy gives every plugin of a module its own root context, and proxy-wasm's Rust SDK makes
//! them all with the one factory installed by `set_root_context`. The factory reads the
//! plugin's `root_id` from the `plugin_root_id` property and returns that filter's own root
//! context, so a filter of the suite runs exactly the code of its own module, with no layer in
//! between. Envoy (proxy-wasm-cpp-host) sets a root context's root_id when it creates it, so the
//! property answers during `proxy_on_context_create`; on a host where it does not, the root
//! context chooses at `on_vm_start` or `on_configure` instead (Envoy calls `on_vm_start` only for
//! the first root context of a VM; every root context gets `on_configure`). An unknown root_id
//! refuses the configuration with one log line that names the known ones.
//!
//! Several plugins with the same `vm_id` and this module share one VM per worker: their filters
//! share linear memory and shared data, each with its own root context.

use keel_proxy::log;
use keel_proxy::pipeline::Filters;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::ContextType;

const SUITE: &str = "suite";

/// A filter's root context factory.
type Factory = fn(u32) -> Box<dyn RootContext>;

/// The filters of the module, by root_id.
const FILTERS: [(&str, Factory); 8] = [
    ("circuit_breaker", keel_circuit_breaker::root),
    ("retry", keel_retry::root),
    ("rate_limit", keel_rate_limit::root),
    ("picker", keel_picker::root),
    ("discovery", keel_discovery::root),
    ("idempotency", keel_idempotency::root),
    ("adaptive", keel_adaptive::root),
    ("pipeline", pipeline),
];

/// The filters a pipeline runs as stages, by the names its configuration gives them (their
/// root_ids).
const STAGES: Filters = &[
    ("circuit_breaker", keel_circuit_breaker::stage),
    ("retry", keel_retry::stage),
    ("rate_limit", keel_rate_limit::stage),
    ("picker", keel_picker::stage),
    ("discovery", keel_discovery::stage),
    ("idempotency", keel_idempotency::stage),
    ("adaptive", keel_adaptive::stage),
];

/// The pipeline's root context.
fn pipeline(context_id: u32) -> Box<dyn RootContext> {
    keel_proxy::pipeline::root(context_id, STAGES)
}

keel_proxy::module!(root);

/// The factory of `root_id`, if the module has it.
fn factory(root_id: &str) -> Option<Factory> {
    FILTERS
        .iter()
        .find(|(id, _)| *id == root_id)
        .map(|(_, factory)| *factory)
}

/// The plugin's root_id, if the host tells it now.
fn plugin_root_id() -> Option<String> {
    keel_proxy::request::property_str(&["plugin_root_id"])
}

/// The root context of the plugin being created: its filter's own root context when the
/// root_id is known now, else a [`SuiteRoot`] that chooses later or refuses.
pub fn root(context_id: u32) -> Box<dyn RootContext> {
    match plugin_root_id().as_deref().map(|id| (id, factory(id))) {
        Some((_, Some(factory))) => factory(context_id),
        Some((id, None)) => Box::new(SuiteRoot {
            context_id,
            vm_started: None,
            selected: Selected::Unknown(id.to_string()),
        }),
        None => Box::new(SuiteRoot {
            context_id,
            vm_started: None,
            selected: Selected::Pending,
        }),
    }
}

enum Selected {
    /// The root_id was not available yet.
    Pending,
    /// The filter of the root_id.
    Filter(Box<dyn RootContext>),
    /// A root_id the module does not have (or none at all): the configuration is refused.
    Unknown(String),
}

/// A root context whose filter is chosen after its creation, or refused.
struct SuiteRoot {
    context_id: u32,
    /// The VM configuration's size, when `on_vm_start` came before the filter was known: the
    /// filter gets the call when it is chosen.
    vm_started: Option<usize>,
    selected: Selected,
}

impl SuiteRoot {
    /// Chooses the filter if the root_id is known by now.
    fn select(&mut self) {
        if !matches!(self.selected, Selected::Pending) {
            return;
        }
        let Some(id) = plugin_root_id() else {
            return;
        };
        self.selected = match factory(&id) {
            Some(factory) => {
                let mut filter = factory(self.context_id);
                if let Some(size) = self.vm_started {
                    filter.on_vm_start(size);
                }
                Selected::Filter(filter)
            }
            None => Selected::Unknown(id),
        };
    }

    fn filter(&mut self) -> Option<&mut Box<dyn RootContext>> {
        match &mut self.selected {
            Selected::Filter(filter) => Some(filter),
            _ => None,
        }
    }
}

/// The refusal's log line.
fn refusal(root_id: &str) -> String {
    let known: Vec<&str> = FILTERS.iter().map(|(id, _)| *id).collect();
    format!(
        "unknown root_id \"{root_id}\"; keel.wasm has the root_ids {}; configuration refused",
        known.join(", ")
    )
}

impl Context for SuiteRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        if let Some(filter) = self.filter() {
            filter.on_http_call_response(token_id, num_headers, body_size, num_trailers);
        }
    }

    fn on_done(&mut self) -> bool {
        self.filter().is_none_or(|filter| filter.on_done())
    }
}

impl RootContext for SuiteRoot {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        self.vm_started = Some(vm_configuration_size);
        self.select();
        self.filter()
            .is_none_or(|filter| filter.on_vm_start(vm_configuration_size))
    }

    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        self.select();
        match &mut self.selected {
            Selected::Filter(filter) => filter.on_configure(plugin_configuration_size),
            Selected::Unknown(id) => {
                log::error(SUITE, &refusal(id));
                false
            }
            Selected::Pending => {
                log::error(SUITE, &refusal(""));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(filter) = self.filter() {
            filter.on_tick();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(filter) = self.filter() {
            filter.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.selected {
            Selected::Filter(filter) => filter.create_http_context(context_id),
            // A refused plugin gets no streams from Envoy; a host that asks anyway gets a
            // stream that lets everything through (the SDK aborts the VM on `None`).
            _ => Some(Box::new(PassThrough)),
        }
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        match &self.selected {
            Selected::Filter(filter) => filter.create_stream_context(context_id),
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        match &self.selected {
            Selected::Filter(filter) => filter.get_type(),
            _ => Some(ContextType::HttpContext),
        }
    }
}

/// The stream of a refused plugin.
struct PassThrough;

impl Context for PassThrough {}

impl HttpContext for PassThrough {}
