//! The ABI probe: a proxy-wasm filter that performs host calls on command, so that the harness
//! (and any other host) can be tested as a host.
//!
//! It is a test module, not a product. A request names its command in the `x-probe` header and
//! passes arguments in `x-*` headers; most commands answer with a local reply whose body says what
//! the probe read from the host:
//!
//! | `x-probe` | arguments | does |
//! |---|---|---|
//! | `echo-headers` | | replies 200 with the request headers, one `name: value` line each |
//! | `modify` | | adds `x-added: 1`, replaces `x-replace` with `replaced`, removes `x-remove`, continues |
//! | `set-all` | | replaces all request headers with `:path /rewritten` and `x-only: yes`, continues |
//! | `route` | `x-target` | sets `x-envoy-original-dst-host` to the target, continues |
//! | `property` | `x-path` (dot-separated) | replies 200 with the raw bytes, or 404 when absent |
//! | `time` | | replies with `get_current_time` in nanoseconds since the epoch |
//! | `wasi-time` | | replies with `std::time::SystemTime::now()` (WASI `clock_time_get`) in nanoseconds |
//! | `shared-get` | `x-key` | replies `value` with header `x-cas`, or 404 |
//! | `shared-set` | `x-key`, `x-value`, optional `x-cas` | replies `ok` or 409 `cas-mismatch` |
//! | `metric` | `x-kind` (counter, gauge, histogram), `x-name`, `x-value` | defines, increments or records, replies with `get_metric` (or `n/a`) |
//! | `callout` | `x-upstream`, optional `x-path`, `x-timeout-ms` | dispatches a callout, pauses, relays the response |
//! | `pause` | | pauses; the root resumes it on its next tick through `set_effective_context` |
//! | `effective` | `x-context` | calls `set_effective_context`, replies `ok` or `bad-argument` |
//! | `log` | `x-level`, `x-message` | logs, continues |
//! | `log-level` | | replies with the host's log level number |
//! | `reply` | `x-status`, `x-body`, optional `x-reply-header` | sends that local reply |
//! | `config` | | replies `vm=<vm configuration>;plugin=<plugin configuration>` |
//! | `enqueue` | `x-value` | enqueues on the probe queue, continues; the root logs `dequeued <value>` |
//! | `body-upper` | | buffers the request body and uppercases it |
//! | `stamp-response` | | adds `x-probe-status: <:status>` to the response headers |
//! | `late-read` | | reads a request header in `on_http_response_headers` (Envoy refuses: the SDK panics) |
//! | `panic` | | panics (a trap for the host) |
//!
//! Plugin configuration: space-separated `key=value` words. `tick_ms=N` sets the tick period,
//! `root_callout=UPSTREAM` makes the root send one callout on its first tick (and log the
//! response), `refuse` makes `on_configure` return false.
//!
//! `floor=OP,OP,...` turns the probe into the Envoy benchmark's floor instrument: every request
//! makes exactly the host calls listed, in this order, and continues (no `x-probe` command is
//! read). It measures what the host calls a filter needs cost by themselves, before any logic.
//! An op runs in `on_http_request_headers`, or where its prefix says: `response:OP` in
//! `on_http_response_headers`, `log:OP` in `on_log` (the floors of `bench/floors.txt` make each
//! filter's host calls in the callbacks the filter makes them in):
//!
//! | op | host call |
//! |---|---|
//! | `time` | `get_current_time` |
//! | `route` | the `xds.route_name` property |
//! | `upstream` | the `upstream.address` property |
//! | `header` | the `x-api-key` header of the callback's map (request, or response for `response:`) |
//! | `headers` | every header of the callback's map (`get_header_map_pairs`) |
//! | `status` | the response header `:status` |
//! | `shared` | `get_shared_data("keel/floor")`, then `set_shared_data` with its version (a CAS) |
//! | `shared-get` | `get_shared_data("keel/floor")` only (its version is kept for `shared-set`) |
//! | `shared-set` | `set_shared_data("keel/floor")` with the version the last `shared-get` read (a CAS without its read) |
//! | `set-header` | sets (replaces) the header `x-floor` of the callback's map |
//! | `counter` | increments the counter `probe.floor` |
//! | `response-header` | adds the response header `x-floor` (in `on_http_response_headers`) |

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

thread_local! {
    /// Streams paused by `pause`, resumed by the root's next tick. A VM is single-threaded, so a
    /// thread local is the VM's memory shared between its root and its streams.
    static PAUSED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The probe queue's id, registered by the root at start.
    static QUEUE: RefCell<Option<u32>> = const { RefCell::new(None) };
    /// The configurations, kept for the `config` command.
    static CONFIGS: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
    /// `floor=...`: the host calls every request makes, or `None` for the command mode.
    static FLOOR: RefCell<Option<Vec<FloorOp>>> = const { RefCell::new(None) };
}

/// The callback a floor op runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Response,
    Log,
}

/// One host call of the floor mode (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FloorCall {
    Time,
    Route,
    Upstream,
    Header,
    Headers,
    Status,
    Shared,
    SharedGet,
    SharedSet,
    SetHeader,
    SetProperty,
    Counter,
    ResponseHeader,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FloorOp {
    phase: Phase,
    call: FloorCall,
}

impl FloorOp {
    fn parse(word: &str) -> Option<FloorOp> {
        let (phase, name) = match word.split_once(':') {
            Some(("response", name)) => (Phase::Response, name),
            Some(("log", name)) => (Phase::Log, name),
            Some(_) => return None,
            None => (Phase::Request, word),
        };
        let call = match name {
            "time" => FloorCall::Time,
            "route" => FloorCall::Route,
            "upstream" => FloorCall::Upstream,
            "header" => FloorCall::Header,
            "headers" => FloorCall::Headers,
            "status" => FloorCall::Status,
            "shared" => FloorCall::Shared,
            "shared-get" => FloorCall::SharedGet,
            "shared-set" => FloorCall::SharedSet,
            "set-header" => FloorCall::SetHeader,
            "set-property" => FloorCall::SetProperty,
            "counter" => FloorCall::Counter,
            // Always a response header, so always in on_http_response_headers.
            "response-header" => {
                return Some(FloorOp {
                    phase: Phase::Response,
                    call: FloorCall::ResponseHeader,
                })
            }
            _ => return None,
        };
        Some(FloorOp { phase, call })
    }

    /// Makes the call; results are ignored (the floor measures the call, not its outcome).
    fn run(self) {
        let map = if self.phase == Phase::Request {
            MapType::HttpRequestHeaders
        } else {
            MapType::HttpResponseHeaders
        };
        match self.call {
            FloorCall::Time => {
                let _ = hostcalls::get_current_time();
            }
            FloorCall::Route => {
                let _ = hostcalls::get_property(vec!["xds", "route_name"]);
            }
            FloorCall::Upstream => {
                let _ = hostcalls::get_property(vec!["upstream", "address"]);
            }
            FloorCall::Header => {
                let _ = hostcalls::get_map_value(map, "x-api-key");
            }
            FloorCall::Headers => {
                let _ = hostcalls::get_map(map);
            }
            FloorCall::Status => {
                let _ = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
            }
            FloorCall::Shared => {
                if let Ok((value, cas)) = hostcalls::get_shared_data("keel/floor") {
                    let value = value.unwrap_or_else(|| vec![0; 16]);
                    let _ = hostcalls::set_shared_data("keel/floor", Some(&value), cas);
                }
            }
            FloorCall::SharedGet => {
                if let Ok((value, cas)) = hostcalls::get_shared_data("keel/floor") {
                    FLOOR_READ.with(|r| *r.borrow_mut() = (value, cas));
                }
            }
            FloorCall::SharedSet => {
                let (value, cas) = FLOOR_READ.with(|r| r.borrow_mut().clone());
                let value = value.unwrap_or_else(|| vec![0; 16]);
                let _ = hostcalls::set_shared_data("keel/floor", Some(&value), cas);
            }
            FloorCall::SetHeader => {
                let _ = hostcalls::set_map_value(map, "x-floor", Some("1"));
            }
            FloorCall::SetProperty => {
                let _ = hostcalls::set_property(vec!["keel.floor"], Some(b"127.0.0.1:1"));
            }
            FloorCall::Counter => {
                if let Ok(id) = floor_counter() {
                    let _ = hostcalls::increment_metric(id, 1);
                }
            }
            FloorCall::ResponseHeader => {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "x-floor", "1");
            }
        }
    }
}

/// Runs the floor's ops of `phase`; false when the probe is not in floor mode.
fn run_floor(phase: Phase) -> bool {
    FLOOR.with(|f| {
        f.borrow().as_ref().is_some_and(|ops| {
            for op in ops.iter().filter(|op| op.phase == phase) {
                op.run();
            }
            true
        })
    })
}

thread_local! {
    static FLOOR_COUNTER: RefCell<Option<u32>> = const { RefCell::new(None) };
    /// What the last `shared-get` read: the value and version `shared-set` writes back.
    static FLOOR_READ: RefCell<(Option<Vec<u8>>, Option<u32>)> = const { RefCell::new((None, None)) };
}

/// The floor's counter, defined once per VM.
fn floor_counter() -> Result<u32, Status> {
    if let Some(id) = FLOOR_COUNTER.with(|c| *c.borrow()) {
        return Ok(id);
    }
    let id = hostcalls::define_metric(MetricType::Counter, "probe.floor")?;
    FLOOR_COUNTER.with(|c| *c.borrow_mut() = Some(id));
    Ok(id)
}

#[derive(Default)]
struct ProbeRoot {
    root_callout: Option<String>,
    ticks: u64,
}

impl Context for ProbeRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _: usize) {
        if headers == 0 {
            // A failed call: Envoy lends no response map, reading it would be refused.
            log(LogLevel::Warn, &format!("root callout {token}: failed"));
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        log(
            LogLevel::Info,
            &format!("root callout {token}: headers={headers} status={status} body={body}"),
        );
    }
}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let vm = self
            .get_vm_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        CONFIGS.with(|c| c.borrow_mut().0 = vm);
        QUEUE.with(|q| *q.borrow_mut() = Some(self.register_shared_queue("probe-queue")));
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        CONFIGS.with(|c| c.borrow_mut().1 = config.clone());
        for word in config.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "refuse" => {
                    log(LogLevel::Error, "probe: configuration refused");
                    return false;
                }
                "tick_ms" => match value.parse::<u64>() {
                    Ok(ms) => self.set_tick_period(Duration::from_millis(ms)),
                    Err(_) => return false,
                },
                "root_callout" => self.root_callout = Some(value.to_string()),
                "floor" => {
                    let mut ops = Vec::new();
                    for name in value.split(',').filter(|n| !n.is_empty()) {
                        match FloorOp::parse(name) {
                            Some(op) => ops.push(op),
                            None => {
                                log(
                                    LogLevel::Error,
                                    &format!("probe: unknown floor op {name:?}"),
                                );
                                return false;
                            }
                        }
                    }
                    FLOOR.with(|f| *f.borrow_mut() = Some(ops));
                }
                _ => return false,
            }
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        log(LogLevel::Debug, &format!("tick {}", self.ticks));
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, "probe.ticks") {
            let _ = hostcalls::increment_metric(id, 1);
        }
        for id in PAUSED.with(|p| std::mem::take(&mut *p.borrow_mut())) {
            if hostcalls::set_effective_context(id).is_ok() {
                let _ = hostcalls::resume_http_request();
            }
        }
        if let Some(upstream) = self.root_callout.take() {
            let headers = vec![
                (":method", "GET"),
                (":path", "/root"),
                (":authority", "probe"),
            ];
            let sent =
                self.dispatch_http_call(&upstream, headers, None, vec![], Duration::from_secs(1));
            log(LogLevel::Info, &format!("root callout sent: {sent:?}"));
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(value)) = self.dequeue_shared_queue(queue_id) {
            log(
                LogLevel::Info,
                &format!("dequeued {}", String::from_utf8_lossy(&value)),
            );
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeHttp {
            id: context_id,
            command: String::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeHttp {
    id: u32,
    command: String,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

impl ProbeHttp {
    fn arg(&self, name: &str) -> String {
        self.get_http_request_header(name).unwrap_or_default()
    }

    fn reply(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) -> Action {
        self.send_http_response(status, headers, Some(body));
        Action::Pause
    }

    fn run(&mut self) -> Action {
        match self.command.as_str() {
            "echo-headers" => {
                let mut body = String::new();
                for (name, value) in self.get_http_request_headers() {
                    body.push_str(&format!("{name}: {value}\n"));
                }
                self.reply(200, vec![], body.as_bytes())
            }
            "modify" => {
                self.add_http_request_header("x-added", "1");
                self.set_http_request_header("x-replace", Some("replaced"));
                self.remove_http_request_header("x-remove");
                Action::Continue
            }
            "set-all" => {
                self.set_http_request_headers(vec![(":path", "/rewritten"), ("x-only", "yes")]);
                Action::Continue
            }
            "route" => {
                let target = self.arg("x-target");
                self.set_http_request_header("x-envoy-original-dst-host", Some(&target));
                Action::Continue
            }
            "property" => {
                let path = self.arg("x-path");
                match self.get_property(path.split('.').collect()) {
                    Some(value) => self.reply(200, vec![], &value),
                    None => self.reply(404, vec![], b"absent"),
                }
            }
            "time" => {
                let nanos = self
                    .get_current_time()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                self.reply(200, vec![], nanos.to_string().as_bytes())
            }
            "wasi-time" => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                self.reply(200, vec![], nanos.to_string().as_bytes())
            }
            "shared-get" => match self.get_shared_data(&self.arg("x-key")) {
                (Some(value), cas) => {
                    let cas = cas.unwrap_or(0).to_string();
                    self.reply(200, vec![("x-cas", &cas)], &value)
                }
                (None, Some(cas)) => {
                    let cas = cas.to_string();
                    self.reply(200, vec![("x-cas", &cas)], b"")
                }
                (None, None) => self.reply(404, vec![], b"absent"),
            },
            "shared-set" => {
                let cas = self.arg("x-cas").parse::<u32>().ok();
                let value = self.arg("x-value");
                match self.set_shared_data(&self.arg("x-key"), Some(value.as_bytes()), cas) {
                    Ok(()) => self.reply(200, vec![], b"ok"),
                    Err(Status::CasMismatch) => self.reply(409, vec![], b"cas-mismatch"),
                    Err(other) => self.reply(500, vec![], format!("{other:?}").as_bytes()),
                }
            }
            "metric" => self.metric(),
            "callout" => {
                let upstream = self.arg("x-upstream");
                let path = match self.arg("x-path") {
                    p if p.is_empty() => "/".to_string(),
                    p => p,
                };
                let timeout = self.arg("x-timeout-ms").parse::<u64>().unwrap_or(1000);
                let headers = vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", "probe"),
                ];
                match self.dispatch_http_call(
                    &upstream,
                    headers,
                    Some(b"probe body"),
                    vec![],
                    Duration::from_millis(timeout),
                ) {
                    Ok(_) => Action::Pause,
                    Err(status) => self.reply(502, vec![], format!("{status:?}").as_bytes()),
                }
            }
            "pause" => {
                PAUSED.with(|p| p.borrow_mut().push(self.id));
                Action::Pause
            }
            "effective" => {
                let id = self.arg("x-context").parse::<u32>().unwrap_or(0);
                match hostcalls::set_effective_context(id) {
                    Ok(()) => {
                        let _ = hostcalls::set_effective_context(self.id);
                        self.reply(200, vec![], b"ok")
                    }
                    Err(_) => self.reply(200, vec![], b"bad-argument"),
                }
            }
            "log" => {
                let level = match self.arg("x-level").as_str() {
                    "trace" => LogLevel::Trace,
                    "debug" => LogLevel::Debug,
                    "warn" => LogLevel::Warn,
                    "error" => LogLevel::Error,
                    "critical" => LogLevel::Critical,
                    _ => LogLevel::Info,
                };
                log(level, &self.arg("x-message"));
                Action::Continue
            }
            "log-level" => {
                let level = hostcalls::get_log_level().map(|l| l as u32).unwrap_or(99);
                self.reply(200, vec![], level.to_string().as_bytes())
            }
            "reply" => {
                let status = self.arg("x-status").parse::<u32>().unwrap_or(200);
                let header = self.arg("x-reply-header");
                let mut headers = vec![];
                if !header.is_empty() {
                    headers.push(("x-reply", header.as_str()));
                }
                self.reply(status, headers, self.arg("x-body").as_bytes())
            }
            "config" => {
                let body = CONFIGS.with(|c| {
                    let c = c.borrow();
                    format!("vm={};plugin={}", c.0, c.1)
                });
                self.reply(200, vec![], body.as_bytes())
            }
            "enqueue" => {
                if let Some(queue) = QUEUE.with(|q| *q.borrow()) {
                    let _ = self.enqueue_shared_queue(queue, Some(self.arg("x-value").as_bytes()));
                }
                Action::Continue
            }
            #[allow(clippy::panic)] // the command exists to make the module trap
            "panic" => panic!("probe panic on command"),
            _ => Action::Continue,
        }
    }

    fn metric(&self) -> Action {
        let kind = match self.arg("x-kind").as_str() {
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            _ => MetricType::Counter,
        };
        let value = self.arg("x-value").parse::<i64>().unwrap_or(1);
        let Ok(id) = hostcalls::define_metric(kind, &self.arg("x-name")) else {
            return self.reply(500, vec![], b"define failed");
        };
        let _ = match kind {
            MetricType::Counter => hostcalls::increment_metric(id, value),
            MetricType::Gauge => hostcalls::record_metric(id, value as u64),
            _ => hostcalls::record_metric(id, value as u64),
        };
        match hostcalls::get_metric(id) {
            Ok(v) => self.reply(200, vec![], v.to_string().as_bytes()),
            Err(_) => self.reply(200, vec![], b"n/a"),
        }
    }
}

impl Context for ProbeHttp {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, body: usize, _: usize) {
        if headers == 0 {
            self.send_http_response(502, vec![], Some(b"callout failed"));
            return;
        }
        let status = self
            .get_http_call_response_header(":status")
            .unwrap_or_default();
        let body = self
            .get_http_call_response_body(0, body)
            .unwrap_or_default();
        let mut text = format!("status={status} body=").into_bytes();
        text.extend_from_slice(&body);
        self.send_http_response(200, vec![], Some(&text));
    }
}

impl HttpContext for ProbeHttp {
    fn on_log(&mut self) {
        run_floor(Phase::Log);
    }

    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if run_floor(Phase::Request) {
            return Action::Continue;
        }
        self.command = self.arg("x-probe");
        self.run()
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.command != "body-upper" {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        self.set_http_request_body(0, size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if run_floor(Phase::Response) {
            return Action::Continue;
        }
        if self.command == "late-read" {
            let late = self.get_http_request_header("x-probe");
            log(LogLevel::Info, &format!("late read: {late:?}"));
        }
        if self.command == "stamp-response" {
            let status = self.get_http_response_header(":status").unwrap_or_default();
            self.add_http_response_header("x-probe-status", &status);
        }
        Action::Continue
    }
}
