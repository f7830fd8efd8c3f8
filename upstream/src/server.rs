//! Serving an [`Upstream`](super::Upstream): hyper's HTTP/1.1 server on a one-thread runtime.
//!
//! Closing a connection without an answer (modes `Close` and `Stall`) is done by the
//! connection task, not by hyper: the request handler signals the task, which drops the
//! connection, so the client sees the socket close with no response at all.

use std::convert::Infallible;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use crate::{control, Mode, Received, Shared, State, IDENTITY_CAPACITY, LOG_CAPACITY};
use keel_core::rand::Rng as _;

/// The largest request body read (a larger one is cut short and still answered).
const MAX_BODY: usize = 1 << 20;

/// The response type of every handler.
pub(crate) type Reply = hyper::Response<Full<Bytes>>;

/// Binds `addr` and serves on a new runtime; returns the runtime and the bound address.
pub(crate) fn serve(shared: Arc<Shared>, addr: SocketAddr) -> io::Result<(Runtime, SocketAddr)> {
    // Bound here, synchronously, so a port in use is an error of `start` and port 0 resolves.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("upstream-{}", shared.name))
        .enable_all()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener)?
    };
    runtime.spawn(accept_loop(listener, shared));
    Ok((runtime, local))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let hang_up = Arc::new(Notify::new());
            let signal = Arc::clone(&hang_up);
            let service = service_fn(move |request| {
                handle(Arc::clone(&shared), Arc::clone(&signal), request)
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = hang_up.notified() => {}
            }
        });
    }
}

/// What to do with a request, decided under the lock when it arrives.
enum Plan {
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        delay: Option<Duration>,
    },
    HangUp {
        after: Duration,
    },
}

async fn handle(
    shared: Arc<Shared>,
    hang_up: Arc<Notify>,
    request: hyper::Request<Incoming>,
) -> Result<Reply, Infallible> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if path.starts_with("/__keel/") {
        return Ok(control::handle(
            &shared,
            parts.method.as_str(),
            &path,
            &body,
        ));
    }
    if path == "/healthz" {
        let mut state = shared.state();
        state.health_checks += 1;
        let status = if state.healthy { 200 } else { 503 };
        drop(state);
        return Ok(reply(
            status,
            &[],
            Bytes::from(if status == 200 { "ok" } else { "down" }),
        ));
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let method = parts.method.as_str().to_string();
    // Capacity mode: a slot now, a place in the queue, or a refusal (crate::capacity).
    let entry = shared.gate.enter();
    let full = matches!(entry, crate::capacity::Entry::Full);
    let (plan, attempt, seq) = {
        let mut state = shared.state();
        let identity = parts
            .headers
            .get("x-request-id")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let attempt = count(&mut state, &method, &path, identity);
        let seq = state.total;
        let plan = if full {
            Plan::Answer {
                status: 503,
                headers: vec![("x-keel-capacity".to_string(), "full".to_string())],
                delay: None,
            }
        } else {
            decide(&mut state, attempt)
        };
        let answered = match &plan {
            Plan::Answer { status, .. } => {
                *state.by_status.entry(*status).or_insert(0) += 1;
                Some(*status)
            }
            Plan::HangUp { .. } => None,
        };
        if state.log.len() >= LOG_CAPACITY {
            state.log.pop_front();
        }
        state.log.push_back(Received {
            at,
            method,
            path,
            query: parts.uri.query().map(str::to_string),
            headers,
            attempt,
            answered,
        });
        (plan, attempt, seq)
    };
    match plan {
        Plan::Answer {
            status,
            headers,
            delay,
        } => {
            // Held until the answer is built: the slot is the request's for its service time.
            let _slot = match entry {
                crate::capacity::Entry::Now(slot, service) => {
                    tokio::time::sleep(service).await;
                    Some(slot)
                }
                crate::capacity::Entry::Queued(waiting) => match waiting.await {
                    Ok(slot) => {
                        tokio::time::sleep(slot.service).await;
                        Some(slot)
                    }
                    // The gate was dropped: the upstream is stopping.
                    Err(_) => None,
                },
                crate::capacity::Entry::Unlimited | crate::capacity::Entry::Full => None,
            };
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let body = if status == 200 {
                Bytes::from(shared.name.clone())
            } else {
                Bytes::from(format!("{} answers {status}\n", shared.name))
            };
            let mut all = vec![
                ("x-upstream".to_string(), shared.name.clone()),
                ("x-upstream-attempt".to_string(), attempt.to_string()),
                // The arrival's number: tells one answer from another byte for byte.
                ("x-upstream-seq".to_string(), seq.to_string()),
            ];
            all.extend(headers);
            Ok(reply(status, &all, body))
        }
        Plan::HangUp { after } => {
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            // The connection task drops the connection: the socket closes with no answer.
            hang_up.notify_one();
            pending().await
        }
    }
}

/// Counts an arrival; returns its attempt number within its identity.
fn count(state: &mut State, method: &str, path: &str, identity: String) -> u64 {
    state.total += 1;
    *state.by_path.entry(path.to_string()).or_insert(0) += 1;
    *state.by_method.entry(method.to_string()).or_insert(0) += 1;
    if state.by_identity.len() >= IDENTITY_CAPACITY && !state.by_identity.contains_key(&identity) {
        state.by_identity.clear();
    }
    let seen = state.by_identity.entry(identity).or_insert(0);
    *seen += 1;
    *seen
}

fn decide(state: &mut State, attempt: u64) -> Plan {
    let normal = Plan::Answer {
        status: 200,
        headers: Vec::new(),
        delay: None,
    };
    match &state.mode {
        Mode::Normal => normal,
        Mode::Fail { status, headers } => Plan::Answer {
            status: *status,
            headers: headers.clone(),
            delay: None,
        },
        Mode::FailFirst {
            attempts,
            status,
            headers,
        } => {
            if attempt <= u64::from(*attempts) {
                Plan::Answer {
                    status: *status,
                    headers: headers.clone(),
                    delay: None,
                }
            } else {
                normal
            }
        }
        Mode::FailRate { rate, status } => {
            let (rate, status) = (*rate, *status);
            if state.rng.unit_f64() < rate {
                Plan::Answer {
                    status,
                    headers: Vec::new(),
                    delay: None,
                }
            } else {
                normal
            }
        }
        Mode::Stall(after) => Plan::HangUp { after: *after },
        Mode::Close => Plan::HangUp {
            after: Duration::ZERO,
        },
        Mode::Delay(delay) => Plan::Answer {
            status: 200,
            headers: Vec::new(),
            delay: Some(*delay),
        },
    }
}

/// A response; a status or header hyper refuses becomes a plain 500 saying so.
pub(crate) fn reply(status: u16, headers: &[(String, String)], body: Bytes) -> Reply {
    let mut builder = hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain");
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    match builder.body(Full::new(body)) {
        Ok(response) => response,
        Err(e) => {
            let mut response = hyper::Response::new(Full::new(Bytes::from(format!(
                "keel-upstream: cannot build the response: {e}\n"
            ))));
            *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}
