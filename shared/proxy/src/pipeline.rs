//! Keel's pipeline: one Envoy filter that runs several Keel filters ("stages") on each request,
//! in the configured order, with the semantics of the same filters as separate Envoy filters in
//! that order (reference: `docs/config/pipeline.md`).
//!
//! Why: each wasm filter instance in an Envoy chain costs a VM crossing per callback and per
//! host call, so five of them cost several times one. The pipeline is one filter instance: one
//! root context, one stream context per request, and the host reads the stages share (the
//! route and cluster names, the response's status, the time: [`Memo`]) made once.
//!
//! How: each stage is the filter's own root context, made by the filter crate's `stage`
//! function with a [`Stage`] whose [`Driver`] is the pipeline. A request's stream holds one
//! stream context per stage and plays Envoy's filter manager over them:
//!
//! - request callbacks run the stages in order, response callbacks in reverse order (Envoy's
//!   encoder order), each only for the stages that saw the request headers;
//! - a stage that returns `Pause` stops the callback there (the host holds the stream). A stage
//!   that answered locally never resumes; one that waits (the rate limiter's shaping, the
//!   retry filter's held response) resumes through its [`Stage`], and the pipeline runs the
//!   remaining stages of that callback first, then resumes the host's stream only if all of
//!   them continued (a later stage may pause again);
//! - body and trailer callbacks of a direction that a stage holds return `Pause` untouched (the
//!   host buffers; Envoy does not deliver them to a filter that stopped at the headers);
//! - ticks: one root context has one tick, so each stage's period is a tick slot; the host's
//!   tick is set to the time until the earliest stage is due, and a tick runs the stages that
//!   are due;
//! - callout answers come to the root (or the stream that sent them) with a token; they are
//!   handed to every stage, and each takes only the tokens it sent.
//!
//! A stage may list `routes`: it runs only on requests of those Envoy routes (the route name is
//! read once per request, only when some stage lists routes).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};

use keel_core::config::{ConfigError, Routes};
use keel_core::routes::{self, Routed};
use keel_core::time::{Duration, Instant};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use serde::Deserialize;

use crate::host::{self, Buffer, StreamType};
use crate::memo::{self, Memo};
use crate::stage::{Driver, Stage};
use crate::{clock, log, routing};

const PIPELINE: &str = "pipeline";

/// Makes a filter's root context as a pipeline stage (each filter crate's `stage` function).
pub type StageFactory = fn(u32, Stage) -> Box<dyn RootContext>;

/// The filters a pipeline can run, by the name its configuration gives them.
pub type Filters = &'static [(&'static str, StageFactory)];

// ----- configuration -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineSpec {
    stages: Vec<StageSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageSpec {
    filter: String,
    #[serde(default)]
    routes: Option<Routes>,
    config: serde_json::Value,
}

/// A validated stage, before its filter has seen its configuration.
struct StageConfig {
    /// The filter's index in the pipeline's [`Filters`].
    filter: usize,
    routes: Option<Vec<String>>,
    config: Vec<u8>,
}

/// Validates the pipeline's own fields against the filters' `names`; each stage's `config` is
/// the filter's to validate.
fn validate(bytes: &[u8], names: &[&str]) -> Result<Vec<StageConfig>, ConfigError> {
    let spec: PipelineSpec = keel_core::config::parse_json(bytes)?;
    if spec.stages.is_empty() {
        return Err(ConfigError::new(
            "stages",
            "expected at least one stage, {\"filter\": ..., \"config\": {...}}",
        ));
    }
    spec.stages
        .into_iter()
        .enumerate()
        .map(|(i, stage)| {
            let Some(filter) = names.iter().position(|name| *name == stage.filter) else {
                return Err(ConfigError::new(
                    format!("stages[{i}].filter"),
                    format!(
                        "expected one of {}, got \"{}\"",
                        names.join(", "),
                        stage.filter
                    ),
                ));
            };
            if !stage.config.is_object() {
                return Err(ConfigError::new(
                    format!("stages[{i}].config"),
                    format!(
                        "expected the {} filter's configuration, a JSON object",
                        stage.filter
                    ),
                ));
            }
            let config = serde_json::to_vec(&stage.config)
                .map_err(|e| ConfigError::new(format!("stages[{i}].config"), e.to_string()))?;
            Ok(StageConfig {
                filter,
                routes: stage.routes.map(|r| r.names().to_vec()),
                config,
            })
        })
        .collect()
}

// ----- ticks -----

/// One stage's share of the root context's tick.
#[derive(Default)]
struct TickSlot {
    period: Cell<Option<Duration>>,
    due: Cell<Instant>,
}

// ----- what the root, the stages' drivers and the streams share -----

/// Which way a held stream goes on.
#[derive(Clone, Copy)]
enum Direction {
    Request,
    Response,
}

struct Pipe {
    root_id: u32,
    /// Streams in flight, by context id.
    lanes: RefCell<BTreeMap<u32, Weak<Lane>>>,
    /// Every stage's tick slot.
    ticks: RefCell<Vec<Weak<TickSlot>>>,
    /// The tick period set on the host, in milliseconds.
    host_tick_ms: Cell<Option<u64>>,
}

impl Pipe {
    /// Sets the host's tick to fire when the earliest stage is due (whole milliseconds, rounded
    /// up), or stops it. `false` when the host has no ticks.
    fn rearm(&self, now: Instant) -> bool {
        let slots: Vec<Rc<TickSlot>> = match self.ticks.try_borrow_mut() {
            Ok(mut ticks) => {
                ticks.retain(|t| t.strong_count() > 0);
                ticks.iter().filter_map(Weak::upgrade).collect()
            }
            Err(_) => return true,
        };
        let next = slots
            .iter()
            .filter(|s| s.period.get().is_some())
            .map(|s| s.due.get())
            .min();
        let want = next.map(|due| {
            due.saturating_since(now)
                .as_nanos()
                .div_ceil(1_000_000)
                .max(1)
        });
        if want == self.host_tick_ms.get() {
            return true;
        }
        let millis = u32::try_from(want.unwrap_or(0)).unwrap_or(u32::MAX);
        let set = host::set_tick_period_ms(millis).is_ok();
        if set {
            self.host_tick_ms.set(want);
        }
        set
    }

    /// Stage `stage` of stage set `set` resumes stream `context_id` (the effective context)
    /// in `direction`: the stages after it run first.
    fn resume(&self, set: u64, stage: usize, context_id: u32, direction: Direction) -> bool {
        let lane = self
            .lanes
            .try_borrow()
            .ok()
            .and_then(|lanes| lanes.get(&context_id).and_then(Weak::upgrade));
        let Some(lane) = lane.filter(|lane| lane.set.id == set) else {
            return false;
        };
        let ran = lane.run(|inner| match direction {
            Direction::Request if inner.request_held == Some(stage) => {
                Some(inner.request_headers_from(&lane.resumed, stage + 1))
            }
            Direction::Response if inner.response_held == Some(stage) => {
                Some(inner.response_headers_below(&lane.resumed, stage))
            }
            _ => None,
        });
        match ran {
            // The stream is running its stages: the stage resumed from inside its own
            // callback, which then counts as a Continue.
            None => {
                lane.resumed.set(true);
                true
            }
            // Not held by this stage: nothing to resume.
            Some(None) => false,
            Some(Some(Action::Continue)) => match direction {
                Direction::Request => host::continue_stream(StreamType::HttpRequest).is_ok(),
                Direction::Response => host::continue_stream(StreamType::HttpResponse).is_ok(),
            },
            // A later stage holds it now, or answered.
            Some(Some(_)) => true,
        }
    }
}

/// The pipeline as a stage's [`Driver`].
struct StageDriver {
    pipe: Rc<Pipe>,
    set: u64,
    index: usize,
    config: Vec<u8>,
    tick: Rc<TickSlot>,
}

impl Driver for StageDriver {
    fn configuration(&self) -> Vec<u8> {
        self.config.clone()
    }

    fn refuse(&self, _filter: &str, error: &ConfigError) {
        let mut path = format!("stages[{}].config", self.index);
        if !error.path.is_empty() {
            path.push('.');
            path.push_str(&error.path);
        }
        let error = ConfigError::new(path, error.message.clone());
        log::error(PIPELINE, &format!("{error}; configuration refused"));
    }

    fn set_tick_period(&self, period: std::time::Duration) -> bool {
        let now = clock::now();
        let nanos = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            self.tick.period.set(None);
        } else {
            let period = Duration::from_nanos(nanos);
            self.tick.period.set(Some(period));
            self.tick.due.set(now.saturating_add(period));
        }
        self.pipe.rearm(now)
    }

    fn resume_request(&self, context_id: u32) -> bool {
        self.pipe
            .resume(self.set, self.index, context_id, Direction::Request)
    }

    fn resume_response(&self, context_id: u32) -> bool {
        self.pipe
            .resume(self.set, self.index, context_id, Direction::Response)
    }
}

// ----- the stages -----

struct Slot {
    /// The routes the stage runs on (`None`: every route).
    routes: Option<Vec<String>>,
    root: RefCell<Box<dyn RootContext>>,
    tick: Rc<TickSlot>,
}

/// The stages of one configuration.
struct StageSet {
    id: u64,
    slots: Vec<Slot>,
    /// Whether some stage lists routes: only then is the route name read.
    by_route: bool,
}

// ----- one request -----

/// One request's way through the stages.
struct Lane {
    set: Rc<StageSet>,
    inner: RefCell<LaneInner>,
    /// A stage asked to resume the stream from inside its own callback.
    resumed: Cell<bool>,
}

struct LaneInner {
    /// One stream context per stage; `None` for a stage that does not apply to the request.
    streams: Vec<Option<Box<dyn HttpContext>>>,
    /// How many stages (in order) saw the request headers: those see the response.
    entered: usize,
    /// The stage that holds the request headers.
    request_held: Option<usize>,
    /// The stage that holds the response headers.
    response_held: Option<usize>,
    /// The arguments of the headers callbacks, for stages run on a resume.
    request_headers: (usize, bool),
    response_headers: (usize, bool),
    /// The stream's host reads, once read.
    memo: Option<Memo>,
}

impl Lane {
    /// Runs `f` on the lane with its memo installed; `None` when the lane is already running.
    fn run<R>(&self, f: impl FnOnce(&mut LaneInner) -> R) -> Option<R> {
        let mut inner = self.inner.try_borrow_mut().ok()?;
        let mut memo = inner.memo.take().unwrap_or_default();
        memo.new_callback();
        let outer = memo::swap(Some(memo));
        let result = f(&mut inner);
        inner.memo = memo::swap(outer);
        Some(result)
    }
}

/// Whether a stage's `Pause` holds the stream (it did not resume it from inside the call).
fn holds(action: Action, resumed: &Cell<bool>) -> bool {
    action == Action::Pause && !resumed.take()
}

impl LaneInner {
    /// Drops the stages that do not apply to the request's route.
    fn select(&mut self, set: &StageSet) {
        if !set.by_route {
            return;
        }
        let route = routing::route_name();
        for (stream, slot) in self.streams.iter_mut().zip(&set.slots) {
            if !slot.routes.applies_to(route.as_deref()) {
                *stream = None;
            }
        }
    }

    /// Runs the request headers through the stages from `from` on.
    fn request_headers_from(&mut self, resumed: &Cell<bool>, from: usize) -> Action {
        let (headers, end_of_stream) = self.request_headers;
        for i in from..self.streams.len() {
            let Some(Some(stream)) = self.streams.get_mut(i) else {
                continue;
            };
            self.entered = i + 1;
            resumed.set(false);
            if holds(
                stream.on_http_request_headers(headers, end_of_stream),
                resumed,
            ) {
                self.request_held = Some(i);
                return Action::Pause;
            }
        }
        self.request_held = None;
        Action::Continue
    }

    /// Runs the response headers through the stages below `below`, last first.
    fn response_headers_below(&mut self, resumed: &Cell<bool>, below: usize) -> Action {
        let (headers, end_of_stream) = self.response_headers;
        for i in (0..below.min(self.entered)).rev() {
            let Some(Some(stream)) = self.streams.get_mut(i) else {
                continue;
            };
            resumed.set(false);
            if holds(
                stream.on_http_response_headers(headers, end_of_stream),
                resumed,
            ) {
                self.response_held = Some(i);
                return Action::Pause;
            }
        }
        self.response_held = None;
        Action::Continue
    }

    /// Runs a body or trailers callback through the stages that saw the request, in order
    /// (`reverse` for the response); a stage's `Pause` stops it there.
    fn each(
        &mut self,
        reverse: bool,
        resumed: &Cell<bool>,
        mut call: impl FnMut(&mut dyn HttpContext) -> Action,
    ) -> Action {
        let entered = self.entered.min(self.streams.len());
        for k in 0..entered {
            let i = if reverse { entered - 1 - k } else { k };
            let Some(Some(stream)) = self.streams.get_mut(i) else {
                continue;
            };
            resumed.set(false);
            if holds(call(stream.as_mut()), resumed) {
                return Action::Pause;
            }
        }
        Action::Continue
    }
}

/// The pipeline's stream context.
struct PipelineStream {
    context_id: u32,
    pipe: Rc<Pipe>,
    lane: Rc<Lane>,
}

impl PipelineStream {
    fn run(&self, f: impl FnOnce(&mut LaneInner, &Lane) -> Action) -> Action {
        let lane = &self.lane;
        // Never busy here: the host calls a stream's callbacks one at a time.
        lane.run(|inner| f(inner, lane)).unwrap_or(Action::Continue)
    }
}

impl Context for PipelineStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        self.lane.run(|inner| {
            for stream in inner.streams.iter_mut().flatten() {
                stream.on_http_call_response(token_id, num_headers, body_size, num_trailers);
            }
        });
    }

    fn on_done(&mut self) -> bool {
        self.lane.run(|inner| {
            for stream in inner.streams.iter_mut().flatten() {
                stream.on_done();
            }
        });
        if let Ok(mut lanes) = self.pipe.lanes.try_borrow_mut() {
            lanes.remove(&self.context_id);
        }
        true
    }
}

impl HttpContext for PipelineStream {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.run(|inner, lane| {
            inner.request_headers = (num_headers, end_of_stream);
            inner.select(&lane.set);
            inner.request_headers_from(&lane.resumed, 0)
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|inner, lane| {
            if inner.request_held.is_some() {
                return Action::Pause;
            }
            inner.each(false, &lane.resumed, |s| {
                s.on_http_request_body(body_size, end_of_stream)
            })
        })
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        self.run(|inner, lane| {
            if inner.request_held.is_some() {
                return Action::Pause;
            }
            inner.each(false, &lane.resumed, |s| {
                s.on_http_request_trailers(num_trailers)
            })
        })
    }

    fn on_http_response_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.run(|inner, lane| {
            memo::forget_status();
            inner.response_headers = (num_headers, end_of_stream);
            let all = inner.entered;
            inner.response_headers_below(&lane.resumed, all)
        })
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|inner, lane| {
            if inner.response_held.is_some() {
                return Action::Pause;
            }
            inner.each(true, &lane.resumed, |s| {
                s.on_http_response_body(body_size, end_of_stream)
            })
        })
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        self.run(|inner, lane| {
            if inner.response_held.is_some() {
                return Action::Pause;
            }
            inner.each(true, &lane.resumed, |s| {
                s.on_http_response_trailers(num_trailers)
            })
        })
    }

    fn on_log(&mut self) {
        self.lane.run(|inner| {
            for stream in inner.streams.iter_mut().flatten() {
                stream.on_log();
            }
        });
    }
}

impl Drop for PipelineStream {
    fn drop(&mut self) {
        if let Ok(mut lanes) = self.pipe.lanes.try_borrow_mut() {
            lanes.remove(&self.context_id);
        }
    }
}

// ----- the root -----

/// The pipeline's root context (root_id `pipeline` in `keel.wasm`), running `filters`.
pub fn root(context_id: u32, filters: Filters) -> Box<dyn RootContext> {
    Box::new(PipelineRoot {
        pipe: Rc::new(Pipe {
            root_id: context_id,
            lanes: RefCell::new(BTreeMap::new()),
            ticks: RefCell::new(Vec::new()),
            host_tick_ms: Cell::new(None),
        }),
        filters,
        set: Rc::new(StageSet {
            id: 0,
            slots: Vec::new(),
            by_route: false,
        }),
        retired: Vec::new(),
    })
}

struct PipelineRoot {
    pipe: Rc<Pipe>,
    filters: Filters,
    set: Rc<StageSet>,
    /// Stage sets replaced by a new configuration while streams still run them: they keep
    /// their ticks and callout answers until the last of those streams is gone.
    retired: Vec<Rc<StageSet>>,
}

impl PipelineRoot {
    fn sets(&self) -> impl Iterator<Item = &Rc<StageSet>> {
        std::iter::once(&self.set).chain(self.retired.iter())
    }

    fn each_root(&self, mut f: impl FnMut(&mut dyn RootContext)) {
        for set in self.sets() {
            for slot in &set.slots {
                if let Ok(mut root) = slot.root.try_borrow_mut() {
                    f(root.as_mut());
                }
            }
        }
    }
}

impl Context for PipelineRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        self.each_root(|root| {
            root.on_http_call_response(token_id, num_headers, body_size, num_trailers);
        });
    }

    fn on_done(&mut self) -> bool {
        self.each_root(|root| {
            root.on_done();
        });
        true
    }
}

impl RootContext for PipelineRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes =
            host::get_buffer(Buffer::PluginConfiguration, 0, usize::MAX).unwrap_or_default();
        let names: Vec<&str> = self.filters.iter().map(|(name, _)| *name).collect();
        let stages = match validate(&bytes, &names) {
            Ok(stages) => stages,
            Err(e) => {
                log::error(PIPELINE, &format!("{e}; configuration refused"));
                return false;
            }
        };
        let id = self.set.id + 1;
        let mut slots = Vec::with_capacity(stages.len());
        let mut described = Vec::with_capacity(stages.len());
        for (index, stage) in stages.into_iter().enumerate() {
            let tick = Rc::new(TickSlot::default());
            if let Ok(mut ticks) = self.pipe.ticks.try_borrow_mut() {
                ticks.push(Rc::downgrade(&tick));
            }
            let size = stage.config.len();
            let driver = StageDriver {
                pipe: Rc::clone(&self.pipe),
                set: id,
                index,
                config: stage.config,
                tick: Rc::clone(&tick),
            };
            let Some((name, factory)) = self.filters.get(stage.filter) else {
                return false;
            };
            let mut root = factory(self.pipe.root_id, Stage::driven_by(Rc::new(driver)));
            // The stage logs why it refuses, with the path inside the pipeline's configuration.
            if !root.on_configure(size) {
                return false;
            }
            described.push(match &stage.routes {
                Some(routes) => format!("{name} (routes {})", routes.join(", ")),
                None => name.to_string(),
            });
            slots.push(Slot {
                routes: stage.routes,
                root: RefCell::new(root),
                tick,
            });
        }
        log::info(
            PIPELINE,
            &format!("configured stages: {}", described.join(", ")),
        );
        let by_route = routes::any_listed(&slots, |s| &s.routes);
        let old = std::mem::replace(
            &mut self.set,
            Rc::new(StageSet {
                id,
                slots,
                by_route,
            }),
        );
        if Rc::strong_count(&old) > 1 {
            self.retired.push(old);
        }
        true
    }

    fn on_tick(&mut self) {
        let now = clock::now();
        self.retired.retain(|set| Rc::strong_count(set) > 1);
        for set in self.sets() {
            for slot in &set.slots {
                let Some(period) = slot.tick.period.get() else {
                    continue;
                };
                if slot.tick.due.get() > now {
                    continue;
                }
                slot.tick.due.set(now.saturating_add(period));
                if let Ok(mut root) = slot.root.try_borrow_mut() {
                    root.on_tick();
                }
            }
        }
        self.pipe.rearm(now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let set = Rc::clone(&self.set);
        let streams = set
            .slots
            .iter()
            .map(|slot| {
                slot.root
                    .try_borrow()
                    .ok()
                    .and_then(|root| root.create_http_context(context_id))
            })
            .collect();
        let lane = Rc::new(Lane {
            set,
            inner: RefCell::new(LaneInner {
                streams,
                entered: 0,
                request_held: None,
                response_held: None,
                request_headers: (0, false),
                response_headers: (0, false),
                memo: None,
            }),
            resumed: Cell::new(false),
        });
        if let Ok(mut lanes) = self.pipe.lanes.try_borrow_mut() {
            lanes.insert(context_id, Rc::downgrade(&lane));
        }
        Some(Box::new(PipelineStream {
            context_id,
            pipe: Rc::clone(&self.pipe),
            lane,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 2] = ["rate_limit", "retry"];

    fn error(json: &str) -> String {
        match validate(json.as_bytes(), &NAMES) {
            Ok(_) => String::from("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_field_in_the_pipeline() {
        assert_eq!(
            error(
                r#"{"stages": [{"filter": "retry", "config": {}}, {"filter": "ratelimit", "config": {}}]}"#
            ),
            "stages[1].filter: expected one of rate_limit, retry, got \"ratelimit\""
        );
        assert!(error(r#"{"stages": []}"#).starts_with("stages: expected at least one stage"));
        // The config kit's rule for a required field: reported at its own path.
        assert_eq!(
            error(r#"{"stages": [{"filter": "retry"}]}"#),
            "stages[0].config: required"
        );
        assert_eq!(
            error(r#"{"stages": [{"filter": "retry", "config": []}]}"#),
            "stages[0].config: expected the retry filter's configuration, a JSON object"
        );
        assert!(
            error(r#"{"stages": [{"filter": "retry", "config": {}, "route": ["a"]}]}"#)
                .starts_with("stages[0].route: unknown field")
        );
        assert!(
            error(r#"{"stages": [{"filter": "retry", "config": {}, "routes": []}]}"#)
                .starts_with("stages[0].routes: an empty list matches no route")
        );
        assert_eq!(
            error(r#"{"stages": [{"filter": "retry", "routes": ["a"], "config": {"x": 1}}]}"#),
            "accepted"
        );
    }
}
