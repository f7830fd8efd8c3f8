//! A proxy-wasm ABI 0.2.1 host on wasmtime: Keel's second, independent host beside Envoy.
//!
//! It loads the built modules from `dist/` (run `make build` first) and lets tests drive them
//! like Envoy would, deterministically: a virtual clock, several VMs of a module sharing one
//! shared-data store (Envoy's worker threads), ticks, HTTP callouts answered by the test,
//! properties, metrics and captured logs.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use keel_host_tests::harness::{request, response, Action, Host, Response};
//!
//! # fn main() -> anyhow::Result<()> {
//! let host = Host::new();
//! let workers = host.vm("abi_probe").config("tick_ms=100").start_workers(2)?;
//! assert!(workers[0].configured());
//!
//! // A request the filter answers locally.
//! let s = workers[0].send_request(request("GET", "/").with("x-probe", "time"));
//! let reply = s.local_reply().expect("a local reply");
//! assert_eq!(reply.status, 200);
//!
//! // A callout the test answers.
//! let s = workers[1].http_stream();
//! let call = request("GET", "/").with("x-probe", "callout").with("x-upstream", "registry");
//! assert_eq!(s.request_headers(call, true), Action::Pause);
//! let callout = workers[1].next_callout().expect("a callout");
//! assert_eq!(callout.upstream, "registry");
//! callout.respond(Response::new(200).body("hello"));
//! assert_eq!(s.local_reply().unwrap().body_text(), "status=200 body=hello");
//!
//! // Time passes: every worker ticks every 100 ms.
//! host.advance(Duration::from_millis(250));
//! assert_eq!(host.counter("probe.ticks"), 4);
//!
//! // The upstream answers a request that went through.
//! let s = workers[0].send_request(request("GET", "/orders"));
//! assert_eq!(s.response_headers(response(503), true), Action::Continue);
//! # Ok(())
//! # }
//! ```
//!
//! # Model
//!
//! - [`Host`]: one Envoy process. Owns the virtual clock ([`Host::advance`]), shared data (real
//!   compare-and-swap, per `vm_id`), shared queues, metrics (same kind and name = same metric
//!   across VMs), host-wide properties and the optional callout responder.
//! - [`Vm`]: one worker's instance of a module, created by [`Host::vm`] then
//!   [`VmBuilder::start`] (`_initialize`, root context, `proxy_on_vm_start`,
//!   `proxy_on_configure`). [`Vm::configured`] tells whether the configuration was accepted;
//!   [`Vm::crashed`] whether the module trapped (a filter panic is an abort, hence a trap).
//! - [`HttpStream`]: one request/response. Each phase method returns the filter's [`Action`];
//!   the stream records the headers and bodies as the filter left them, pauses and resumes
//!   ([`Flow`]), and the [`LocalReply`].
//! - [`Callout`]: an HTTP call the module made; answer it with [`Callout::respond`] or
//!   [`Callout::fail`], or let [`Host::advance`] pass its timeout (Envoy then answers 504
//!   `upstream request timeout`). Answers go to the root context id through
//!   `proxy_on_http_call_response`, after the module's current callback returns.
//!
//! # Envoy behaviours reproduced
//!
//! - Ticks: `proxy_set_tick_period_milliseconds` arms a timer `period` after the call; each
//!   tick re-arms it `period` later; 0 disables it.
//! - Shared data: `cas == 0` writes unconditionally, otherwise it must equal the stored version
//!   (else CasMismatch); a missing key is written whatever the cas; versions come from one
//!   process-wide counter that skips 0.
//! - `proxy_set_effective_context` to an unknown or finished context is refused with
//!   BadArgument (Envoy's answer, and the only error the SDK accepts).
//! - Header maps, bodies and callout responses are readable only while Envoy lends them (see
//!   the `stream` module); reading one that is gone is refused with BadArgument, which makes
//!   the Rust SDK panic, as in Envoy.
//! - A local reply makes the current callback return StopIteration whatever the filter
//!   returned, and no further callback of that stream runs (the harness does not replay the
//!   local reply through the filter's own response callbacks, which Envoy does).
//! - A trapped VM is failed: its streams get a 503 local reply (`wasm_fail_stream`) and none of
//!   its callbacks runs again (Envoy's fail-closed policy).
//! - Properties use Envoy's encodings: strings raw, integers 8-byte little-endian. Header-derived
//!   `request.*` properties (`request.path`, `request.method`, ...) exist only while the request
//!   headers are available, as in Envoy; `request.time` (int64 ns) and `response.code` (int64)
//!   from when they are known. Everything else a test sets with `set_property` on the stream,
//!   the VM or the host (`source.address` as "ip:port", `route_name`, `upstream.address`, ...).
//!   Unknown properties are NotFound.
//! - Failing host calls: [`Vm::fail_host_call`] (or [`Host::fail_host_call`] for every VM,
//!   from their start on) makes one import answer a chosen [`Status`] instead of doing its work,
//!   once, `n` times or always; [`Vm::failed_host_calls`] counts the answers given.
//! - WASI preview1 is provided with nothing inherited: stdout and stderr are captured
//!   ([`Vm::stdout`]), clocks read the virtual clock, `random_get` is seeded
//!   ([`Host::set_random_seed`]).
//!
//! # Scenery
//!
//! - [`ScriptedEtcd`]: a responder playing etcd's range reads and the instances' `/healthz`
//!   for the discovery filter, scripted by the test (see [`registry`]).

mod abi;
mod engine;
mod host;
mod imports;
pub mod registry;
mod stream;
mod types;
mod vm;

pub use abi::Status;
pub use host::Host;
pub use registry::{EtcdAnswer, HealthAnswer, ScriptedEtcd};
pub use stream::HttpStream;
pub use types::{
    request, response, Action, CalloutRequest, Flow, HeaderList, LocalReply, LogEntry, LogLevel,
    Metric, MetricKind, PropertyPath, PropertyValue, Response,
};
pub use vm::{Callout, Vm, VmBuilder};
