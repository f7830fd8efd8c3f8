//! HTTP streams: the test plays the downstream client and the upstream server, the harness
//! keeps the header maps and bodies as the filter leaves them, and tracks pauses, resumes and
//! local replies.
//!
//! What the module may read follows Envoy's lifetimes (Envoy `context.cc`: `decodeHeaders`,
//! `decodeData`, `encodeHeaders`, `continueStream`): request headers are readable from
//! `on_http_request_headers` until the request phase continues (a Continue result or a
//! `proxy_continue_stream`); a body only during its own callback (kept while the filter buffers
//! with Pause); response headers likewise. Reading a map that is not available is refused with
//! BadArgument, which makes the Rust SDK panic, as it does in Envoy; listing its pairs gives an
//! empty list. The test, however, can always read what the filter left.

use std::collections::BTreeMap;

use super::types::{
    find_header, Action, Flow, HeaderList, LocalReply, PropertyPath, PropertyValue,
};
use super::vm::{Callout, Vm};

/// One direction (request or response) of a stream.
#[derive(Debug, Clone)]
pub(crate) struct Direction {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) headers_live: bool,
    /// Body bytes already passed on (Continue).
    pub(crate) forwarded: Vec<u8>,
    /// The body chunk (or buffered chunks) the filter currently sees.
    pub(crate) body: Vec<u8>,
    pub(crate) body_live: bool,
    pub(crate) trailers: Vec<(String, String)>,
    pub(crate) trailers_live: bool,
    pub(crate) flow: Flow,
    pub(crate) resumes: u32,
}

impl Default for Direction {
    fn default() -> Self {
        Direction {
            headers: Vec::new(),
            headers_live: false,
            forwarded: Vec::new(),
            body: Vec::new(),
            body_live: false,
            trailers: Vec::new(),
            trailers_live: false,
            flow: Flow::Idle,
            resumes: 0,
        }
    }
}

impl Direction {
    /// `proxy_continue_stream` for this direction: Envoy continues the filter chain and forgets
    /// the maps it had lent the filter.
    pub(crate) fn resume(&mut self) {
        if self.flow == Flow::Paused {
            self.flow = Flow::Resumed;
        }
        self.resumes += 1;
        self.headers_live = false;
        self.trailers_live = false;
        if self.body_live {
            let body = std::mem::take(&mut self.body);
            self.forwarded.extend_from_slice(&body);
            self.body_live = false;
        }
    }

    fn all_body(&self) -> Vec<u8> {
        let mut all = self.forwarded.clone();
        all.extend_from_slice(&self.body);
        all
    }
}

/// The host's view of one HTTP stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamData {
    pub(crate) request: Direction,
    pub(crate) response: Direction,
    pub(crate) local_reply: Option<LocalReply>,
    pub(crate) reset: bool,
    pub(crate) properties: BTreeMap<Vec<String>, Vec<u8>>,
    pub(crate) request_time: Option<u64>,
    pub(crate) response_code: Option<u32>,
    pub(crate) deleted: bool,
}

impl StreamData {
    /// Whether the host stopped the stream (local reply or reset): no more filter callbacks.
    fn stopped(&self) -> bool {
        self.local_reply.is_some() || self.reset || self.deleted
    }
}

fn lowercase(headers: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// A handle on one HTTP stream of a VM.
///
/// Each phase method calls the filter and returns what it decided; after a local reply, a reset
/// or a crash the filter is not called any more and the methods return [`Action::Pause`].
#[derive(Clone)]
pub struct HttpStream {
    vm: Vm,
    id: u32,
}

impl std::fmt::Debug for HttpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("vm", &self.vm.index())
            .field("id", &self.id)
            .finish()
    }
}

impl HttpStream {
    pub(crate) fn new(vm: Vm, id: u32) -> HttpStream {
        HttpStream { vm, id }
    }

    /// The stream's context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The VM the stream runs in.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    fn data<R>(&self, f: impl FnOnce(&StreamData) -> R) -> Option<R> {
        let id = self.id;
        self.vm.read(|st| st.streams.get(&id).map(f))
    }

    fn headers_phase(&self, side: Side, headers: HeaderList, end_of_stream: bool) -> Action {
        let id = self.id;
        let export = match side {
            Side::Request => "proxy_on_request_headers",
            Side::Response => "proxy_on_response_headers",
        };
        self.vm.with(|inner| {
            let now = inner.state().now();
            let crashed = inner.state().crashed.is_some();
            let Some(stream) = inner.state_mut().streams.get_mut(&id) else {
                return Action::Pause;
            };
            if stream.stopped() {
                return Action::Pause;
            }
            let headers = lowercase(headers);
            let count = headers.len() as i32;
            let dir = match side {
                Side::Request => {
                    stream.request_time.get_or_insert(now);
                    &mut stream.request
                }
                Side::Response => {
                    let status = find_header(&headers, ":status").and_then(|s| s.parse().ok());
                    stream.response_code = status.or(stream.response_code);
                    &mut stream.response
                }
            };
            dir.headers = headers;
            dir.headers_live = true;
            if crashed {
                inner.fail_stream(id);
                return Action::Pause;
            }
            let action =
                inner.stream_callback(id, export, &[id as i32, count, i32::from(end_of_stream)]);
            if let Some(stream) = inner.state_mut().streams.get_mut(&id) {
                let dir = match side {
                    Side::Request => &mut stream.request,
                    Side::Response => &mut stream.response,
                };
                match action {
                    Action::Continue => {
                        dir.headers_live = false;
                        dir.flow = Flow::Continued;
                    }
                    Action::Pause => {
                        if dir.flow != Flow::Resumed {
                            dir.flow = Flow::Paused;
                        }
                    }
                }
            }
            inner.flush_immediate();
            action
        })
    }

    fn body_phase(&self, side: Side, chunk: &[u8], end_of_stream: bool) -> Action {
        let id = self.id;
        let export = match side {
            Side::Request => "proxy_on_request_body",
            Side::Response => "proxy_on_response_body",
        };
        self.vm.with(|inner| {
            let crashed = inner.state().crashed.is_some();
            let Some(stream) = inner.state_mut().streams.get_mut(&id) else {
                return Action::Pause;
            };
            if stream.stopped() {
                return Action::Pause;
            }
            let dir = match side {
                Side::Request => &mut stream.request,
                Side::Response => &mut stream.response,
            };
            if !dir.body_live {
                dir.body.clear();
            }
            dir.body.extend_from_slice(chunk);
            dir.body_live = true;
            let size = dir.body.len() as i32;
            if crashed {
                inner.fail_stream(id);
                return Action::Pause;
            }
            let action =
                inner.stream_callback(id, export, &[id as i32, size, i32::from(end_of_stream)]);
            if let Some(stream) = inner.state_mut().streams.get_mut(&id) {
                let dir = match side {
                    Side::Request => &mut stream.request,
                    Side::Response => &mut stream.response,
                };
                match action {
                    Action::Continue => {
                        let body = std::mem::take(&mut dir.body);
                        dir.forwarded.extend_from_slice(&body);
                        dir.body_live = false;
                        dir.flow = Flow::Continued;
                    }
                    Action::Pause => {
                        if dir.flow != Flow::Resumed {
                            dir.flow = Flow::Paused;
                        }
                    }
                }
            }
            inner.flush_immediate();
            action
        })
    }

    fn trailers_phase(&self, side: Side, trailers: HeaderList) -> Action {
        let id = self.id;
        let export = match side {
            Side::Request => "proxy_on_request_trailers",
            Side::Response => "proxy_on_response_trailers",
        };
        self.vm.with(|inner| {
            let crashed = inner.state().crashed.is_some();
            let Some(stream) = inner.state_mut().streams.get_mut(&id) else {
                return Action::Pause;
            };
            if stream.stopped() {
                return Action::Pause;
            }
            let trailers = lowercase(trailers);
            let count = trailers.len() as i32;
            let dir = match side {
                Side::Request => &mut stream.request,
                Side::Response => &mut stream.response,
            };
            dir.trailers = trailers;
            dir.trailers_live = true;
            if crashed {
                inner.fail_stream(id);
                return Action::Pause;
            }
            let action = inner.stream_callback(id, export, &[id as i32, count]);
            if let Some(stream) = inner.state_mut().streams.get_mut(&id) {
                let dir = match side {
                    Side::Request => &mut stream.request,
                    Side::Response => &mut stream.response,
                };
                match action {
                    Action::Continue => {
                        dir.trailers_live = false;
                        dir.flow = Flow::Continued;
                    }
                    Action::Pause => dir.flow = Flow::Paused,
                }
            }
            inner.flush_immediate();
            action
        })
    }

    // ----- phases -----

    /// `proxy_on_request_headers`: the downstream request's headers (names lower-cased).
    pub fn request_headers(&self, headers: impl Into<HeaderList>, end_of_stream: bool) -> Action {
        self.headers_phase(Side::Request, headers.into(), end_of_stream)
    }

    /// `proxy_on_request_body` with this chunk. After a Pause the chunks accumulate (Envoy's
    /// StopIterationAndBuffer) and the filter sees them all.
    pub fn request_body(&self, chunk: &[u8], end_of_stream: bool) -> Action {
        self.body_phase(Side::Request, chunk, end_of_stream)
    }

    /// `proxy_on_request_trailers`.
    pub fn request_trailers(&self, trailers: impl Into<HeaderList>) -> Action {
        self.trailers_phase(Side::Request, trailers.into())
    }

    /// `proxy_on_response_headers`: the upstream response's headers (include `:status`).
    pub fn response_headers(&self, headers: impl Into<HeaderList>, end_of_stream: bool) -> Action {
        self.headers_phase(Side::Response, headers.into(), end_of_stream)
    }

    /// `proxy_on_response_body` with this chunk (chunks accumulate after a Pause).
    pub fn response_body(&self, chunk: &[u8], end_of_stream: bool) -> Action {
        self.body_phase(Side::Response, chunk, end_of_stream)
    }

    /// `proxy_on_response_trailers`.
    pub fn response_trailers(&self, trailers: impl Into<HeaderList>) -> Action {
        self.trailers_phase(Side::Response, trailers.into())
    }

    /// Ends the stream as Envoy does when it is destroyed: `proxy_on_log`, `proxy_on_done`,
    /// `proxy_on_delete`. Afterwards `proxy_set_effective_context` to it is refused.
    pub fn finish(&self) {
        let id = self.id;
        self.vm.with(|inner| inner.end_stream(id));
    }

    // ----- what happened -----

    /// The local reply the filter sent (or the 503 of a crashed VM), if any.
    pub fn local_reply(&self) -> Option<LocalReply> {
        self.data(|s| s.local_reply.clone()).flatten()
    }

    /// Where the request direction stands.
    pub fn request_flow(&self) -> Flow {
        self.data(|s| s.request.flow).unwrap_or(Flow::Idle)
    }

    /// Where the response direction stands.
    pub fn response_flow(&self) -> Flow {
        self.data(|s| s.response.flow).unwrap_or(Flow::Idle)
    }

    /// Whether either direction is paused and not resumed (and not answered locally).
    pub fn is_paused(&self) -> bool {
        self.data(|s| {
            s.local_reply.is_none()
                && (s.request.flow == Flow::Paused || s.response.flow == Flow::Paused)
        })
        .unwrap_or(false)
    }

    /// Whether the filter resumed a paused direction with `proxy_continue_stream`.
    pub fn is_resumed(&self) -> bool {
        self.data(|s| s.request.flow == Flow::Resumed || s.response.flow == Flow::Resumed)
            .unwrap_or(false)
    }

    /// How many times the filter called `proxy_continue_stream` for (request, response).
    pub fn resume_counts(&self) -> (u32, u32) {
        self.data(|s| (s.request.resumes, s.response.resumes))
            .unwrap_or((0, 0))
    }

    /// Whether the filter reset the stream with `proxy_close_stream`.
    pub fn was_reset(&self) -> bool {
        self.data(|s| s.reset).unwrap_or(false)
    }

    /// Whether the stream was ended with [`HttpStream::finish`].
    pub fn is_finished(&self) -> bool {
        self.data(|s| s.deleted).unwrap_or(true)
    }

    /// The request headers as the filter left them (what goes upstream).
    pub fn request_header_list(&self) -> Vec<(String, String)> {
        self.data(|s| s.request.headers.clone()).unwrap_or_default()
    }

    /// The first value of a request header as the filter left it.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.data(|s| find_header(&s.request.headers, name).map(str::to_string))
            .flatten()
    }

    /// The request body as the filter left it (forwarded plus still buffered bytes).
    pub fn request_body_bytes(&self) -> Vec<u8> {
        self.data(|s| s.request.all_body()).unwrap_or_default()
    }

    /// The request trailers as the filter left them.
    pub fn request_trailer_list(&self) -> Vec<(String, String)> {
        self.data(|s| s.request.trailers.clone())
            .unwrap_or_default()
    }

    /// The response headers as the filter left them (what goes downstream).
    pub fn response_header_list(&self) -> Vec<(String, String)> {
        self.data(|s| s.response.headers.clone())
            .unwrap_or_default()
    }

    /// The first value of a response header as the filter left it.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.data(|s| find_header(&s.response.headers, name).map(str::to_string))
            .flatten()
    }

    /// The response body as the filter left it.
    pub fn response_body_bytes(&self) -> Vec<u8> {
        self.data(|s| s.response.all_body()).unwrap_or_default()
    }

    /// The response trailers as the filter left them.
    pub fn response_trailer_list(&self) -> Vec<(String, String)> {
        self.data(|s| s.response.trailers.clone())
            .unwrap_or_default()
    }

    /// The unanswered callouts this stream made.
    pub fn callouts(&self) -> Vec<Callout> {
        self.vm
            .callouts()
            .into_iter()
            .filter(|c| c.context_id == self.id)
            .collect()
    }

    /// A property of this stream as the module set it (`proxy_set_property`, Envoy's filter
    /// state) or the test did; `None` when there is none. What a test copies to the stream
    /// of the next filter in a chain, as Envoy shares a stream's filter state between filters.
    pub fn property(&self, path: impl PropertyPath) -> Option<Vec<u8>> {
        let (id, segments) = (self.id, path.segments());
        self.vm.with(|inner| {
            inner
                .state_mut()
                .streams
                .get(&id)
                .and_then(|stream| stream.properties.get(&segments).cloned())
        })
    }

    /// Sets a property of this stream (over the VM's and the host's), e.g.
    /// `s.set_property("source.address", "10.0.0.1:5000")`.
    pub fn set_property(&self, path: impl PropertyPath, value: impl PropertyValue) {
        let id = self.id;
        let (segments, bytes) = (path.segments(), value.encode());
        self.vm.with(|inner| {
            if let Some(stream) = inner.state_mut().streams.get_mut(&id) {
                stream.properties.insert(segments, bytes);
            }
        });
    }
}
