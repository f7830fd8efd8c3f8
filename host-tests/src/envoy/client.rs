//! A small blocking HTTP/1.1 client for tests, on hyper and one shared tokio runtime.
//!
//! Each [`Client`] talks to one address and keeps a pool of keep-alive connections, so a test
//! that sends a thousand requests does not open a thousand sockets. Every request has a timeout
//! (10 s unless the request says otherwise) so a stalled upstream fails a test instead of
//! hanging it. A request is never retried by the client: tests count what reaches upstreams.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

/// The timeout of a request that does not set its own.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Client::send_all`] keeps starting requests.
pub const DEFAULT_LOAD_DEADLINE: Duration = Duration::from_secs(60);

/// The runtime of every client in the process: connection tasks live here. Tests call the
/// blocking functions from plain threads, which `Handle::block_on` allows.
fn runtime() -> anyhow::Result<&'static Runtime> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("keel-test-client")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| anyhow!("cannot start the client runtime: {e}"))
}

/// An HTTP request to send.
#[derive(Clone, Debug)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The request target: path and query, e.g. `/orders?id=3`.
    pub path: String,
    /// Headers in order; a `host` header is added when absent.
    pub headers: Vec<(String, String)>,
    /// The body (empty for none).
    pub body: Bytes,
    /// How long to wait for the whole response, body included.
    pub timeout: Duration,
}

impl Request {
    /// A request with any method.
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A `GET`.
    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    /// A `POST` with a body.
    pub fn post(path: &str, body: impl Into<Bytes>) -> Request {
        Request::new("POST", path).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Request {
        self.body = body.into();
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }
}

/// A response received in full.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers in order, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl Response {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A pooled HTTP/1.1 client for one address. Cloning shares the pool.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Client {
    /// A client for `addr`; connects on first use.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            inner: Arc::new(Inner {
                addr,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The address requests go to.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Sends one request and reads the whole response, within the request's timeout.
    pub fn send(&self, request: Request) -> anyhow::Result<Response> {
        let inner = Arc::clone(&self.inner);
        runtime()?.block_on(send(inner, request))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.send(Request::get(path))
    }

    /// Sends every request with at most `concurrency` in flight and returns the results in
    /// the order of `requests`. Stops starting requests after [`DEFAULT_LOAD_DEADLINE`].
    pub fn send_all(
        &self,
        requests: impl IntoIterator<Item = Request>,
        concurrency: usize,
    ) -> Vec<anyhow::Result<Response>> {
        self.send_all_within(requests, concurrency, DEFAULT_LOAD_DEADLINE)
    }

    /// [`Client::send_all`] with its own deadline: requests not started by then fail with
    /// "not sent".
    pub fn send_all_within(
        &self,
        requests: impl IntoIterator<Item = Request>,
        concurrency: usize,
        deadline: Duration,
    ) -> Vec<anyhow::Result<Response>> {
        let queue: VecDeque<(usize, Request)> = requests.into_iter().enumerate().collect();
        let count = queue.len();
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => return (0..count).map(|_| Err(anyhow!("{e}"))).collect(),
        };
        let inner = Arc::clone(&self.inner);
        rt.block_on(send_all(inner, queue, count, concurrency.max(1), deadline))
    }
}

async fn send_all(
    inner: Arc<Inner>,
    queue: VecDeque<(usize, Request)>,
    count: usize,
    concurrency: usize,
    deadline: Duration,
) -> Vec<anyhow::Result<Response>> {
    let queue = Arc::new(Mutex::new(queue));
    let stop_at = Instant::now() + deadline;
    let mut workers = Vec::new();
    for _ in 0..concurrency.min(count) {
        let queue = Arc::clone(&queue);
        let inner = Arc::clone(&inner);
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop_front();
                let Some((index, request)) = next else { break };
                let result = if Instant::now() >= stop_at {
                    Err(anyhow!(
                        "not sent: the load deadline of {deadline:?} passed"
                    ))
                } else {
                    send(Arc::clone(&inner), request).await
                };
                done.push((index, result));
            }
            done
        }));
    }
    let mut results: Vec<Option<anyhow::Result<Response>>> = (0..count).map(|_| None).collect();
    for worker in workers {
        if let Ok(done) = worker.await {
            for (index, result) in done {
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(result);
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("not sent: a load worker failed"))))
        .collect()
}

async fn send(inner: Arc<Inner>, request: Request) -> anyhow::Result<Response> {
    let timeout = request.timeout;
    let what = format!("{} {} to {}", request.method, request.path, inner.addr);
    match tokio::time::timeout(timeout, exchange(&inner, request)).await {
        Ok(result) => result.with_context(|| what),
        Err(_) => Err(anyhow!("{what}: no complete response within {timeout:?}")),
    }
}

async fn exchange(inner: &Inner, request: Request) -> anyhow::Result<Response> {
    let mut sender = match idle_connection(inner).await {
        Some(sender) => sender,
        None => connect(inner.addr).await?,
    };
    let mut builder = hyper::Request::builder()
        .method(request.method.as_str())
        .uri(request.path.as_str());
    if !request
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        builder = builder.header("host", inner.addr.to_string());
    }
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let http_request = builder
        .body(Full::new(request.body))
        .context("building the request")?;
    let started = Instant::now();
    let response = sender.send_request(http_request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let elapsed = started.elapsed();
    if !sender.is_closed() {
        inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
    }
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Ok(Response {
        status: parts.status.as_u16(),
        headers,
        body,
        elapsed,
    })
}

/// An idle pooled connection that is still open and ready for a request.
async fn idle_connection(inner: &Inner) -> Option<SendRequest<Full<Bytes>>> {
    loop {
        let candidate = inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut sender = candidate?;
        if !sender.is_closed() && sender.ready().await.is_ok() {
            return Some(sender);
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends when the peer closes it or the sender is dropped; either way
        // the error, if any, reaches the request that was in flight.
        let _ = connection.await;
    });
    Ok(sender)
}
