//! The plain values tests exchange with the harness: actions, log entries, local replies,
//! callout responses, metric kinds, header lists and property values.

use std::fmt;
use std::time::Duration;

/// What a filter callback returned, as the host saw it.
///
/// `Pause` is also what a stream reports when the host stopped it: after a local reply
/// (Envoy overrides the filter's return value with StopIteration) or when the VM crashed
/// (Envoy's fail-closed policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The filter chain goes on.
    Continue,
    /// The filter stopped iteration (Pause / StopIteration / StopIterationAndBuffer).
    Pause,
}

/// Where one direction (request or response) of a stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// No callback of this direction has run yet.
    Idle,
    /// The last callback returned Continue.
    Continued,
    /// The last callback returned Pause and nothing resumed the stream since.
    Paused,
    /// The stream was paused, then resumed with `proxy_continue_stream`.
    Resumed,
}

/// A log level of `proxy_log` (numbers as in the ABI: trace 0 ... critical 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// 0
    Trace,
    /// 1
    Debug,
    /// 2
    Info,
    /// 3
    Warn,
    /// 4
    Error,
    /// 5
    Critical,
}

impl LogLevel {
    pub(crate) fn from_abi(value: i32) -> Option<LogLevel> {
        Some(match value {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }

    pub(crate) fn to_abi(self) -> i32 {
        self as i32
    }
}

/// One captured `proxy_log` line (or a line the harness itself logged about the VM, such as a
/// trap, always at `Critical`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The level the module logged at.
    pub level: LogLevel,
    /// The message.
    pub message: String,
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}", self.level, self.message)
    }
}

/// A response sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// The HTTP status code.
    pub status: u32,
    /// The headers the filter added (names lower-cased, as Envoy does).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The gRPC status, `None` when the filter passed -1 (the SDK's default for plain HTTP).
    pub grpc_status: Option<i32>,
    /// The response code details string.
    pub details: String,
}

impl LocalReply {
    /// The first value of a header, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

/// The answer to an HTTP callout, built by a test or a responder.
///
/// `Response::new(200).header("content-type", "application/json").body("{}")`;
/// `Response::reset()` is a failed call (Envoy's `onFailure`: the module gets 0 headers, 0 body,
/// 0 trailers); `.after(d)` delivers it `d` later on the virtual clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub(crate) status: u32,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: Vec<(String, String)>,
    pub(crate) reset: bool,
    pub(crate) delay: Duration,
}

impl Response {
    /// A response with this status (sent as the `:status` header) and nothing else.
    pub fn new(status: u32) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
            reset: false,
            delay: Duration::ZERO,
        }
    }

    /// A call that failed without a response (connection reset): the module's
    /// `on_http_call_response` sees 0 headers, 0 body bytes and 0 trailers, and reading the
    /// call's headers is refused as in Envoy.
    pub fn reset() -> Response {
        Response {
            reset: true,
            ..Response::new(0)
        }
    }

    /// What Envoy's router answers when the callout's timeout passes: 504 with body
    /// `upstream request timeout`. The harness delivers this itself on timeouts.
    pub fn timeout() -> Response {
        Response::new(504)
            .header("content-type", "text/plain")
            .body("upstream request timeout")
    }

    /// What Envoy's router answers when it cannot connect to the upstream: 503 with body
    /// `upstream connect error or disconnect/reset before headers. reset reason: connection
    /// failure`.
    pub fn connect_failure() -> Response {
        Response::new(503).header("content-type", "text/plain").body(
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
        )
    }

    /// Adds a header (name lower-cased).
    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    /// Adds a trailer.
    pub fn trailer(mut self, name: &str, value: &str) -> Response {
        self.trailers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Delivers the response this long after it is given (virtual time).
    pub fn after(mut self, delay: Duration) -> Response {
        self.delay = delay;
        self
    }

    /// The headers the module sees: `:status` first (unless set explicitly), then the others,
    /// plus `content-length` when there is a body, as Envoy's async client reports them.
    pub(crate) fn wire_headers(&self) -> Vec<(String, String)> {
        let mut headers = Vec::with_capacity(self.headers.len() + 2);
        if find_header(&self.headers, ":status").is_none() {
            headers.push((":status".to_string(), self.status.to_string()));
        }
        headers.extend(self.headers.iter().cloned());
        if !self.body.is_empty() && find_header(&self.headers, "content-length").is_none() {
            headers.push(("content-length".to_string(), self.body.len().to_string()));
        }
        headers
    }
}

/// A callout request as a responder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutRequest {
    /// The token the host returned to the module.
    pub token: u32,
    /// The upstream (Envoy cluster) name.
    pub upstream: String,
    /// The request headers.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// The request trailers.
    pub trailers: Vec<(String, String)>,
    /// The timeout the module asked for (`None` for 0, which Envoy reads as no timeout).
    pub timeout: Option<Duration>,
    /// The context that was current when the module made the call.
    pub context_id: u32,
    /// The index of the VM that made the call.
    pub vm: usize,
}

impl CalloutRequest {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// `:path`, or "".
    pub fn path(&self) -> &str {
        self.header(":path").unwrap_or("")
    }
}

/// The kind of a metric (`proxy_define_metric`'s type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricKind {
    /// A counter: only goes up.
    Counter,
    /// A gauge: set, or moved up and down.
    Gauge,
    /// A histogram: recorded samples.
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_abi(value: i32) -> Option<MetricKind> {
        Some(match value {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return None,
        })
    }
}

/// A metric as the host holds it: all VMs of a host that define the same kind and name share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// The name the module defined.
    pub name: String,
    /// Its kind.
    pub kind: MetricKind,
    /// Counter or gauge value (a histogram's sample count).
    pub value: i64,
    /// A histogram's recorded samples, in order.
    pub samples: Vec<u64>,
}

/// A list of headers, built fluently: `request("GET", "/orders").with("x-api-key", "k1")`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList(pub Vec<(String, String)>);

impl HeaderList {
    /// An empty list.
    pub fn new() -> HeaderList {
        HeaderList(Vec::new())
    }

    /// Adds a header.
    pub fn with(mut self, name: &str, value: &str) -> HeaderList {
        self.0.push((name.to_string(), value.to_string()));
        self
    }

    /// Removes every header of this name.
    pub fn without(mut self, name: &str) -> HeaderList {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for HeaderList {
    fn from(pairs: [(K, V); N]) -> HeaderList {
        pairs.into_iter().collect()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> From<Vec<(K, V)>> for HeaderList {
    fn from(pairs: Vec<(K, V)>) -> HeaderList {
        pairs.into_iter().collect()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for HeaderList {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> HeaderList {
        HeaderList(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
                .collect(),
        )
    }
}

impl IntoIterator for HeaderList {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Request headers as Envoy hands them to filters: `:method`, `:path`, `:authority`
/// (`example.com`), `:scheme` (`http`) and `x-request-id`-less.
pub fn request(method: &str, path: &str) -> HeaderList {
    HeaderList::new()
        .with(":method", method)
        .with(":path", path)
        .with(":authority", "example.com")
        .with(":scheme", "http")
}

/// Response headers with this `:status`.
pub fn response(status: u32) -> HeaderList {
    HeaderList::new().with(":status", &status.to_string())
}

/// A property value in Envoy's encoding: strings and bytes as raw bytes, integers as 8-byte
/// little-endian int64 (unsigned as uint64), booleans as one byte, durations and timestamps as
/// int64 nanoseconds.
pub trait PropertyValue {
    /// The bytes `proxy_get_property` returns.
    fn encode(self) -> Vec<u8>;
}

impl PropertyValue for &str {
    fn encode(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl PropertyValue for String {
    fn encode(self) -> Vec<u8> {
        self.into_bytes()
    }
}

impl PropertyValue for &[u8] {
    fn encode(self) -> Vec<u8> {
        self.to_vec()
    }
}

impl PropertyValue for Vec<u8> {
    fn encode(self) -> Vec<u8> {
        self
    }
}

impl PropertyValue for i64 {
    fn encode(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl PropertyValue for u64 {
    fn encode(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl PropertyValue for bool {
    fn encode(self) -> Vec<u8> {
        vec![u8::from(self)]
    }
}

impl PropertyValue for Duration {
    fn encode(self) -> Vec<u8> {
        (self.as_nanos() as i64).to_le_bytes().to_vec()
    }
}

/// A property path: `"source.address"` (split on dots) or `&["wasm.key"]` (segments as given,
/// for names that contain a dot).
pub trait PropertyPath {
    /// The path's segments.
    fn segments(&self) -> Vec<String>;
}

impl PropertyPath for &str {
    fn segments(&self) -> Vec<String> {
        self.split('.').map(str::to_string).collect()
    }
}

impl PropertyPath for &[&str] {
    fn segments(&self) -> Vec<String> {
        self.iter().map(|s| s.to_string()).collect()
    }
}

impl<const N: usize> PropertyPath for &[&str; N] {
    fn segments(&self) -> Vec<String> {
        self.iter().map(|s| s.to_string()).collect()
    }
}
