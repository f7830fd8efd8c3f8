//! Real upstream HTTP/1.1 servers on loopback whose behaviour tests switch on command.
//!
//! An [`Upstream`] answers `200` with its name as the body and an `x-upstream: <name>` header
//! (and `x-upstream-seq: <n>`, the request's arrival number, so two answers always differ),
//! until the test switches its [`Mode`]: fail with a status (and headers such as
//! `Retry-After`), fail the first attempts of each request identity, fail at random, stall,
//! close the connection without answering, or answer late. It counts what it receives (in
//! total, per path, per method, per `x-request-id`) and keeps a log of arrivals with their time,
//! so a test can assert on the gap between two attempts of a retry. It can be stopped (its port
//! and connections close, as when a host vanishes) and restarted on the same port.
//!
//! Each upstream serves on its own tokio runtime (one worker thread), so upstreams and tests
//! share nothing. The same module backs the `keel-upstream` binary used by the demo and the
//! `envoy/*.yaml` examples, which switch modes over HTTP on the same port (see [`control`]).
//!
//! Invariants:
//! - `/healthz` answers `200` while the upstream is healthy and `503` after
//!   `set_healthy(false)`, whatever the mode; health checks are counted apart
//!   ([`Upstream::health_checks`]), not in the totals or the log;
//! - paths under `/__keel/` are the control interface and are never counted;
//! - the identity of a request for [`Mode::FailFirst`] is its `x-request-id` (Envoy keeps it
//!   across retries); requests without one share the empty identity;
//! - the log keeps the newest [`LOG_CAPACITY`] arrivals and the per-identity counts at most
//!   [`IDENTITY_CAPACITY`] identities (then starts over), so a long demo does not grow memory.

pub mod capacity;
pub mod control;
pub mod registry;
mod server;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel_core::rand::SeededRng;
use tokio::runtime::Runtime;

/// How many arrivals the log keeps (the newest).
pub const LOG_CAPACITY: usize = 100_000;
/// How many distinct `x-request-id`s are counted before the counts start over.
pub const IDENTITY_CAPACITY: usize = 1_000_000;

/// How the upstream answers requests (other than `/healthz` and `/__keel/...`).
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// `200`, body = the upstream's name.
    Normal,
    /// Every request gets `status` with `headers`.
    Fail {
        /// The status to answer.
        status: u16,
        /// Extra headers, e.g. `("retry-after", "2")`.
        headers: Vec<(String, String)>,
    },
    /// The first `attempts` requests of each identity (`x-request-id`) get `status`; later
    /// ones are answered normally.
    FailFirst {
        /// How many attempts of each identity fail.
        attempts: u32,
        /// The status of a failed attempt.
        status: u16,
        /// Extra headers on a failed attempt.
        headers: Vec<(String, String)>,
    },
    /// Each request fails with probability `rate` (seeded, so runs repeat).
    FailRate {
        /// The probability of failing, in `[0, 1]`.
        rate: f64,
        /// The status of a failed request.
        status: u16,
    },
    /// Accept the request, never answer, and close the connection after the duration.
    Stall(Duration),
    /// Close the connection at once without answering.
    Close,
    /// Answer normally after the duration.
    Delay(Duration),
}

impl Mode {
    /// Every request fails with `status`.
    pub fn fail(status: u16) -> Mode {
        Mode::Fail {
            status,
            headers: Vec::new(),
        }
    }

    /// The first `attempts` requests of each `x-request-id` fail with `status`.
    pub fn fail_first(attempts: u32, status: u16) -> Mode {
        Mode::FailFirst {
            attempts,
            status,
            headers: Vec::new(),
        }
    }

    /// Adds a header to the failure answers of [`Mode::Fail`] and [`Mode::FailFirst`];
    /// other modes are returned unchanged.
    pub fn with_header(mut self, name: &str, value: &str) -> Mode {
        if let Mode::Fail { headers, .. } | Mode::FailFirst { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    /// When its headers arrived.
    pub at: Instant,
    /// The method.
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Its headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// How many requests of the same identity (`x-request-id`) had arrived before, plus one.
    pub attempt: u64,
    /// How the upstream answered: a status, or `None` for a stall or close.
    pub answered: Option<u16>,
}

impl Received {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The request's `x-request-id`.
    pub fn request_id(&self) -> Option<&str> {
        self.header("x-request-id")
    }
}

/// What the upstream counts and how it behaves; shared with the serving tasks.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) mode: Mode,
    pub(crate) healthy: bool,
    pub(crate) total: u64,
    pub(crate) health_checks: u64,
    pub(crate) by_path: BTreeMap<String, u64>,
    pub(crate) by_method: BTreeMap<String, u64>,
    pub(crate) by_status: BTreeMap<u16, u64>,
    pub(crate) by_identity: HashMap<String, u64>,
    pub(crate) log: VecDeque<Received>,
    pub(crate) rng: SeededRng,
}

impl State {
    fn new() -> State {
        State {
            mode: Mode::Normal,
            healthy: true,
            total: 0,
            health_checks: 0,
            by_path: BTreeMap::new(),
            by_method: BTreeMap::new(),
            by_status: BTreeMap::new(),
            by_identity: HashMap::new(),
            log: VecDeque::new(),
            rng: SeededRng::new(0x6b65_656c),
        }
    }

    fn reset_counts(&mut self) {
        self.total = 0;
        self.health_checks = 0;
        self.by_path.clear();
        self.by_method.clear();
        self.by_status.clear();
        self.by_identity.clear();
        self.log.clear();
    }
}

/// The part of an upstream its serving tasks see.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    state: Mutex<State>,
    /// Capacity mode's slots and queue (see [`capacity`]).
    pub(crate) gate: capacity::Gate,
}

impl Shared {
    /// The state; a panic elsewhere while it was held does not make it unreadable.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running (or stopped) upstream server. Methods take `&self`, so a test can share it.
#[derive(Debug)]
pub struct Upstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: Mutex<Option<Runtime>>,
}

impl Upstream {
    /// Starts an upstream named `name` on a free loopback port.
    pub fn start(name: &str) -> anyhow::Result<Upstream> {
        Upstream::start_at(name, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Starts an upstream on `127.0.0.1:port`.
    pub fn start_on_port(name: &str, port: u16) -> anyhow::Result<Upstream> {
        Upstream::start_at(name, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// Starts an upstream on any address (port 0 = a free one).
    pub fn start_at(name: &str, addr: SocketAddr) -> anyhow::Result<Upstream> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            state: Mutex::new(State::new()),
            gate: capacity::Gate::default(),
        });
        let (runtime, addr) = server::serve(Arc::clone(&shared), addr)
            .with_context(|| format!("starting upstream {name} on {addr}"))?;
        Ok(Upstream {
            shared,
            addr,
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// Its name (the body of a normal answer).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Switches how it answers from the next request on.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.state().mode = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.state().mode.clone()
    }

    /// Switches `/healthz` between `200` (up) and `503` (down).
    pub fn set_healthy(&self, up: bool) {
        self.shared.state().healthy = up;
    }

    /// Requests received (health checks and control requests excluded).
    pub fn total(&self) -> u64 {
        self.shared.state().total
    }

    /// Requests received on a path (without query).
    pub fn count_path(&self, path: &str) -> u64 {
        self.shared.state().by_path.get(path).copied().unwrap_or(0)
    }

    /// Requests received with a method.
    pub fn count_method(&self, method: &str) -> u64 {
        let method = method.to_ascii_uppercase();
        self.shared
            .state()
            .by_method
            .get(&method)
            .copied()
            .unwrap_or(0)
    }

    /// Requests answered with a status.
    pub fn count_status(&self, status: u16) -> u64 {
        self.shared
            .state()
            .by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    /// Requests received with an `x-request-id`.
    pub fn count_request_id(&self, id: &str) -> u64 {
        self.shared
            .state()
            .by_identity
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// `/healthz` requests received.
    pub fn health_checks(&self) -> u64 {
        self.shared.state().health_checks
    }

    /// The log of arrivals, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.shared.state().log.iter().cloned().collect()
    }

    /// Clears counters and the log (the mode and health stay).
    pub fn reset(&self) {
        self.shared.state().reset_counts();
    }

    /// Waits until `total()` is at least `n`, for up to `timeout`; returns the last total.
    pub fn wait_for_total(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let total = self.total();
            if total >= n || Instant::now() >= deadline {
                return total;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether it is serving.
    pub fn is_running(&self) -> bool {
        self.runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Stops serving: the port and every open connection close (a vanished host). Counters,
    /// mode and log are kept. Call from a plain thread, not from async code.
    pub fn stop(&self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            // Shutting down drops every task, so the listener and the connections they own
            // are closed when this returns.
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }

    /// Serves again on the same address after [`Upstream::stop`]; does nothing if running.
    pub fn restart(&self) -> anyhow::Result<()> {
        let mut slot = self.runtime.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            let (runtime, _) = server::serve(Arc::clone(&self.shared), self.addr)
                .with_context(|| format!("restarting upstream {} on {}", self.name(), self.addr))?;
            *slot = Some(runtime);
        }
        Ok(())
    }

    /// Switches capacity mode on (`Some`) or off (`None`) from the next arrival on; waiters
    /// are admitted at once when it rises (see [`capacity`]).
    pub fn set_capacity(&self, capacity: Option<capacity::Capacity>) {
        self.shared.gate.set(capacity);
    }

    /// The capacity set now.
    pub fn capacity(&self) -> Option<capacity::Capacity> {
        self.shared.gate.capacity()
    }

    /// Requests in service, waiting and refused by capacity mode.
    pub fn capacity_counts(&self) -> capacity::GateCounts {
        self.shared.gate.counts()
    }

    /// The counters as JSON, as `GET /__keel/stats` answers.
    pub fn stats_json(&self) -> serde_json::Value {
        control::stats(&self.shared)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            // Blocking inside async code is not allowed; there, let the runtime end by itself.
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}
