//! A real etcd on loopback for discovery tests, and services that register in it.
//!
//! [`Etcd::start`] runs `/usr/bin/etcd` (Debian's `etcd-server` 3.4, installed by `make setup`;
//! `$KEEL_ETCD` names another binary) as a one-member cluster on free loopback client and peer
//! ports with its own temporary data directory, and waits until `/health` says so. Tests talk
//! to it through its JSON gateway (`/v3/...`, keys and values in base64, int64 as strings),
//! exactly as the discovery filter does through Envoy:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel_host_tests::etcd::{Etcd, RegisteredService};
//!
//! // etcd plus three upstreams registered under /services/users/ with 3 s leases.
//! let mut users = RegisteredService::start("users", 3, Duration::from_secs(3))?;
//! let etcd: Arc<Etcd> = users.etcd().clone();
//! assert_eq!(etcd.get_prefix("/services/users/")?.len(), 3);
//! users.instance_mut(0).registration.lapse(); // its lease runs out within 3 s
//! etcd.stop(); // the registry vanishes (same ports, same data) ...
//! etcd.restart()?; // ... and comes back
//! users.add()?; // a fourth instance registers
//! # Ok(())
//! # }
//! ```
//!
//! Invariants, so that tests run in parallel and clean up:
//! - every etcd gets its own ports and directory; [`Etcd::stop`] and [`Etcd::restart`] keep
//!   both, so a restarted etcd has the same address and the same keys and leases (etcd extends
//!   every lease by its TTL when it comes back);
//! - dropping an [`Etcd`] kills the process and removes the directory, unless the thread is
//!   panicking (a failed test), in which case the path is printed so its log can be read;
//! - a [`Registration`] keeps its lease alive from a thread of its own, every third of the TTL,
//!   as a service's sidecar would; it re-registers if etcd says the lease is gone (after an
//!   outage longer than the TTL), and stops when told to [`Registration::lapse`] (the instance
//!   died: the key vanishes one TTL after the last keepalive) or is dropped.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};

use crate::envoy::{free_port, loopback, make_temp_dir, Client, EnvoyConfig, Request};
use crate::upstream::Upstream;

/// etcd's client port in the configs of `envoy/` (moved to a test's etcd by
/// [`RegisteredService::remap`]).
pub const ETCD_PORT: u16 = 2379;
/// The etcd binary when `$KEEL_ETCD` is not set.
pub const DEFAULT_BINARY: &str = "/usr/bin/etcd";
/// How long [`Etcd::start`] and [`Etcd::restart`] wait for `/health`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The timeout of one gateway request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An etcd lease id.
pub type LeaseId = i64;

/// A running (or stopped) etcd. Methods take `&self`, so tests and keepalive threads share it
/// through an `Arc`.
#[derive(Debug)]
pub struct Etcd {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Mutex<Option<Child>>,
    client: Mutex<Client>,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory and waits until healthy.
    pub fn start() -> anyhow::Result<Etcd> {
        let binary = match std::env::var_os("KEEL_ETCD") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(DEFAULT_BINARY),
        };
        if !binary.is_file() {
            bail!(
                "no etcd at {}: run `make setup` (it installs Debian's etcd-server), or set KEEL_ETCD",
                binary.display()
            );
        }
        let mut last_error = None;
        // A port picked as free may be taken before etcd binds it: try a few pairs.
        for _ in 0..3 {
            let etcd = Etcd {
                binary: binary.clone(),
                dir: make_dir()?,
                client_port: free_port()?,
                peer_port: free_port()?,
                child: Mutex::new(None),
                client: Mutex::new(Client::new(loopback(0))),
            };
            match etcd
                .launch()
                .and_then(|()| etcd.wait_healthy(READY_TIMEOUT))
            {
                Ok(()) => return Ok(etcd),
                // Dropping it kills the process and removes its directory.
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    fn launch(&self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .context("creating the etcd log")?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg("keel")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("keel={peer}")])
            .args(["--initial-cluster-token", "keel-test"])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("creating the etcd log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        *self.child.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        // A fresh client: pooled connections to the previous process are dead.
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) =
            Client::new(loopback(self.client_port));
        Ok(())
    }

    /// Waits until `GET /health` says healthy, the process exits, or `timeout` passes.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                bail!("etcd exited:\n{}", self.log());
            }
            let healthy = self
                .client()
                .send(Request::get("/health").timeout(Duration::from_secs(1)))
                .ok()
                .filter(|r| r.status == 200)
                .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                .is_some_and(|v| v["health"] == "true");
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("etcd not healthy within {timeout:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The client port (the gateway and `/health`).
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The client address, `127.0.0.1:<client port>`.
    pub fn client_addr(&self) -> SocketAddr {
        loopback(self.client_port)
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.client_addr())
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// etcd's log (stderr) so far.
    pub fn log(&self) -> String {
        fs::read(self.dir.join("etcd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the process runs.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// Kills etcd (SIGKILL, as a crash or a lost machine); ports and data are kept for
    /// [`Etcd::restart`].
    pub fn stop(&self) {
        self.kill();
    }

    fn kill(&self) {
        let child = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data, and waits until healthy. Does
    /// nothing if it runs.
    pub fn restart(&self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.launch()?;
            let result = self.wait_healthy(READY_TIMEOUT);
            // The old process's ports can take a moment to be released.
            let port_busy = result.is_err() && self.log().contains("address already in use");
            if result.is_ok() || !port_busy || Instant::now() >= deadline {
                return result;
            }
            self.kill();
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `POST` a JSON body to a gateway path; the answer's JSON, an error unless 200.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .client()
            .send(
                Request::post(path, body.to_string())
                    .header("content-type", "application/json")
                    .timeout(REQUEST_TIMEOUT),
            )
            .with_context(|| format!("etcd {path}"))?;
        if response.status != 200 {
            bail!(
                "etcd {path}: status {}: {}",
                response.status,
                response.text()
            );
        }
        serde_json::from_slice(&response.body)
            .with_context(|| format!("etcd {path}: not JSON: {}", response.text()))
    }

    /// Grants a lease of `ttl` (whole seconds, at least etcd's minimum of 2 s).
    pub fn grant_lease(&self, ttl: Duration) -> anyhow::Result<LeaseId> {
        let answer = self.post("/v3/lease/grant", &json!({"TTL": ttl.as_secs()}))?;
        int64(&answer["ID"]).ok_or_else(|| anyhow!("lease grant: no ID in {answer}"))
    }

    /// Refreshes a lease; its TTL, or `None` when etcd no longer knows it.
    pub fn keepalive(&self, lease: LeaseId) -> anyhow::Result<Option<Duration>> {
        let answer = self.post("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))?;
        if let Some(error) = answer.get("error") {
            bail!("lease keepalive: {error}");
        }
        // The gateway streams `{"result": {...}}`; zero fields are left out.
        let ttl = int64(&answer["result"]["TTL"]).unwrap_or(0);
        Ok((ttl > 0).then(|| Duration::from_secs(ttl.unsigned_abs())))
    }

    /// The time a lease has left, or `None` when it is gone.
    pub fn time_to_live(&self, lease: LeaseId) -> anyhow::Result<Option<Duration>> {
        let answer = self.post("/v3/lease/timetolive", &json!({"ID": lease.to_string()}))?;
        let ttl = int64(&answer["TTL"]).unwrap_or(-1);
        Ok((ttl >= 0).then(|| Duration::from_secs(ttl.unsigned_abs())))
    }

    /// Revokes a lease: its keys vanish now.
    pub fn revoke(&self, lease: LeaseId) -> anyhow::Result<()> {
        self.post("/v3/lease/revoke", &json!({"ID": lease.to_string()}))?;
        Ok(())
    }

    /// Puts `key = value`, attached to `lease` if given.
    pub fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> anyhow::Result<()> {
        let mut body =
            json!({"key": base64_encode(key.as_bytes()), "value": base64_encode(value.as_bytes())});
        if let Some(lease) = lease {
            body["lease"] = Value::String(lease.to_string());
        }
        self.post("/v3/kv/put", &body)?;
        Ok(())
    }

    /// Deletes one key; how many keys were deleted (0 or 1).
    pub fn delete(&self, key: &str) -> anyhow::Result<u64> {
        let answer = self.post(
            "/v3/kv/deleterange",
            &json!({"key": base64_encode(key.as_bytes())}),
        )?;
        Ok(int64(&answer["deleted"]).unwrap_or(0).unsigned_abs())
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let answer = self.post(
            "/v3/kv/range",
            &json!({
                "key": base64_encode(prefix.as_bytes()),
                "range_end": base64_encode(&prefix_end(prefix.as_bytes())),
            }),
        )?;
        let Some(kvs) = answer.get("kvs").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        kvs.iter()
            .map(|kv| {
                let text = |field: &str| -> anyhow::Result<String> {
                    let encoded = kv[field].as_str().unwrap_or("");
                    let bytes = base64_decode(encoded)
                        .ok_or_else(|| anyhow!("etcd range: {field} is not base64: {encoded}"))?;
                    Ok(String::from_utf8_lossy(&bytes).into_owned())
                };
                Ok((text("key")?, text("value")?))
            })
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "keel etcd rig: the test failed; kept {} (etcd.log)",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// An int64 of the gateway: a string of digits, or a number.
fn int64(value: &Value) -> Option<i64> {
    match value {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The end of the key range of every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn make_dir() -> anyhow::Result<PathBuf> {
    make_temp_dir("keel-etcd")
}

// ----- registrations -----

/// The value an instance registers: `{"address": ip, "port": port}` plus optional fields.
pub fn endpoint_value(addr: SocketAddr, weight: Option<u32>, zone: Option<&str>) -> String {
    let mut value = json!({"address": addr.ip().to_string(), "port": addr.port()});
    if let Some(weight) = weight {
        value["weight"] = json!(weight);
    }
    if let Some(zone) = zone {
        value["zone"] = json!(zone);
    }
    value.to_string()
}

/// A key registered with a lease that a background thread keeps alive.
#[derive(Debug)]
pub struct Registration {
    etcd: Arc<Etcd>,
    key: String,
    value: String,
    ttl: Duration,
    shared: Arc<KeepaliveState>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct KeepaliveState {
    stop: AtomicBool,
    lease: Mutex<LeaseId>,
    last_keepalive: Mutex<Instant>,
}

impl Registration {
    /// Grants a lease of `ttl`, puts `key = value` on it, and keeps it alive every `ttl / 3`.
    pub fn register(
        etcd: &Arc<Etcd>,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> anyhow::Result<Registration> {
        let lease = etcd.grant_lease(ttl)?;
        etcd.put(key, value, Some(lease))?;
        let shared = Arc::new(KeepaliveState {
            stop: AtomicBool::new(false),
            lease: Mutex::new(lease),
            last_keepalive: Mutex::new(Instant::now()),
        });
        let thread = {
            let (etcd, shared) = (Arc::clone(etcd), Arc::clone(&shared));
            let (key, value) = (key.to_string(), value.to_string());
            thread::Builder::new()
                .name(format!("keepalive {key}"))
                .spawn(move || keepalive_loop(&etcd, &shared, &key, &value, ttl))
                .context("starting a keepalive thread")?
        };
        Ok(Registration {
            etcd: Arc::clone(etcd),
            key: key.to_string(),
            value: value.to_string(),
            ttl,
            shared,
            thread: Some(thread),
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The current lease (it changes if the registration had to be renewed).
    pub fn lease(&self) -> LeaseId {
        *self
            .shared
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// When the lease was last granted or refreshed.
    pub fn last_keepalive(&self) -> Instant {
        *self
            .shared
            .last_keepalive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether keepalives still run.
    pub fn is_kept_alive(&self) -> bool {
        self.thread.is_some()
    }

    /// Stops the keepalives, as when the instance dies: etcd deletes the key one TTL after
    /// [`Registration::last_keepalive`]. Returns that last keepalive.
    pub fn lapse(&mut self) -> Instant {
        self.stop_thread();
        self.last_keepalive()
    }

    /// Stops the keepalives and revokes the lease: the key is gone at once (a clean shutdown).
    pub fn deregister(&mut self) -> anyhow::Result<()> {
        self.stop_thread();
        self.etcd.revoke(self.lease())
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn keepalive_loop(etcd: &Etcd, state: &KeepaliveState, key: &str, value: &str, ttl: Duration) {
    let period = ttl / 3;
    let mut next = Instant::now() + period;
    while !state.stop.load(Ordering::SeqCst) {
        if Instant::now() < next {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        next = Instant::now() + period;
        let lease = *state.lease.lock().unwrap_or_else(PoisonError::into_inner);
        let alive = match etcd.keepalive(lease) {
            Ok(Some(_)) => true,
            // The lease is gone (an outage longer than the TTL): register again.
            Ok(None) => match etcd.grant_lease(ttl) {
                Ok(new) => {
                    *state.lease.lock().unwrap_or_else(PoisonError::into_inner) = new;
                    etcd.put(key, value, Some(new)).is_ok()
                }
                Err(_) => false,
            },
            // etcd is down: try again at the next period.
            Err(_) => false,
        };
        if alive && !state.stop.load(Ordering::SeqCst) {
            *state
                .last_keepalive
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
    }
}

/// One instance of a service: a real upstream and its registration.
#[derive(Debug)]
pub struct Instance {
    /// The upstream server (its `/healthz` answers the filter's checks).
    pub upstream: Upstream,
    /// Its key in etcd.
    pub registration: Registration,
}

impl Instance {
    /// `127.0.0.1:<port>`, as the discovery filter publishes it.
    pub fn address(&self) -> String {
        self.upstream.addr().to_string()
    }

    /// The upstream's name (`<service>-<n>`, the body of its answers).
    pub fn name(&self) -> &str {
        self.upstream.name()
    }
}

/// A service for discovery tests: an etcd and instances that each run a real upstream and
/// register it under `/services/<service>/<service>-<n>` with a lease of `ttl`.
#[derive(Debug)]
pub struct RegisteredService {
    etcd: Arc<Etcd>,
    service: String,
    ttl: Duration,
    instances: Vec<Instance>,
    next: usize,
}

impl RegisteredService {
    /// Starts etcd and `n` registered instances.
    pub fn start(service: &str, n: usize, ttl: Duration) -> anyhow::Result<RegisteredService> {
        RegisteredService::with_etcd(Arc::new(Etcd::start()?), service, n, ttl)
    }

    /// `n` registered instances in an etcd that runs already.
    pub fn with_etcd(
        etcd: Arc<Etcd>,
        service: &str,
        n: usize,
        ttl: Duration,
    ) -> anyhow::Result<RegisteredService> {
        let mut registered = RegisteredService {
            etcd,
            service: service.to_string(),
            ttl,
            instances: Vec::new(),
            next: 1,
        };
        for _ in 0..n {
            registered.add()?;
        }
        Ok(registered)
    }

    /// Starts one more instance and registers it; returns it.
    pub fn add(&mut self) -> anyhow::Result<&Instance> {
        let name = format!("{}-{}", self.service, self.next);
        self.next += 1;
        let upstream = Upstream::start(&name)?;
        let registration = Registration::register(
            &self.etcd,
            &format!("{}{name}", self.prefix()),
            &endpoint_value(upstream.addr(), None, None),
            self.ttl,
        )?;
        self.instances.push(Instance {
            upstream,
            registration,
        });
        self.instances
            .last()
            .ok_or_else(|| anyhow!("no instance after adding one"))
    }

    /// The key prefix, `/services/<service>/`.
    pub fn prefix(&self) -> String {
        format!("/services/{}/", self.service)
    }

    /// The etcd.
    pub fn etcd(&self) -> &Arc<Etcd> {
        &self.etcd
    }

    /// The lease TTL of the registrations.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The instances, in the order they were added.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Instance `i` (panics if out of range: a test bug).
    pub fn instance(&self, i: usize) -> &Instance {
        &self.instances[i]
    }

    /// Instance `i`, mutable (to lapse or deregister it).
    pub fn instance_mut(&mut self, i: usize) -> &mut Instance {
        &mut self.instances[i]
    }

    /// Every instance's address, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.instances.iter().map(Instance::address).collect()
    }

    /// Points a config of `envoy/` at this service: etcd's fixed port 2379 to this etcd, and
    /// each of `fixed` (e.g. `[18091, 18092, 18093]`, a static cluster of the same upstreams)
    /// to the port of the instance in the same position.
    pub fn remap(&self, mut config: EnvoyConfig, fixed: &[u16]) -> EnvoyConfig {
        config = config.port(ETCD_PORT, self.etcd.client_port());
        for (port, instance) in fixed.iter().zip(&self.instances) {
            config = config.port(*port, instance.upstream.port());
        }
        config
    }
}

// ----- what the discovery filter published -----

/// The discovery filter's status document (its `admin_path`, e.g. `/keel/discovery`), read
/// through a client of the listener (`envoy.client()`).
pub fn discovery_status(client: &Client, admin_path: &str) -> anyhow::Result<Value> {
    let response = client.send(Request::get(admin_path).timeout(REQUEST_TIMEOUT))?;
    if response.status != 200 {
        bail!(
            "{admin_path}: status {}: {}",
            response.status,
            response.text()
        );
    }
    serde_json::from_slice(&response.body)
        .with_context(|| format!("{admin_path}: not JSON: {}", response.text()))
}

/// The status of one service in a status document (`Value::Null` if absent).
pub fn service_status<'a>(status: &'a Value, service: &str) -> &'a Value {
    status["services"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == service))
        .unwrap_or(&Value::Null)
}

/// The addresses of `service` whose endpoints pass `filter`, in the document's order.
fn addresses_where(status: &Value, service: &str, filter: impl Fn(&Value) -> bool) -> Vec<String> {
    service_status(status, service)["endpoints"]
        .as_array()
        .map(|endpoints| {
            endpoints
                .iter()
                .filter(|e| filter(e))
                .filter_map(|e| e["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every address the service's published set knows.
pub fn known_addresses(status: &Value, service: &str) -> Vec<String> {
    addresses_where(status, service, |_| true)
}

/// The addresses that get traffic: healthy by the registry and the checks, not ejected.
pub fn routable_addresses(status: &Value, service: &str) -> Vec<String> {
    addresses_where(status, service, |e| e["routable"] == true)
}

// ----- base64 (the gateway's encoding of keys and values) -----

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` if it is not.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text
        .trim_end_matches('=')
        .bytes()
        .map(|c| ALPHABET.iter().position(|a| *a == c).map(|p| p as u8))
        .collect::<Option<_>>()?;
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// A JSON gateway answer to a range request, as etcd 3.4 writes it: `kvs` of `(key, value)`
/// (omitted when empty, as etcd does), int64 fields as strings. For harness tests that play
/// the registry.
pub fn range_response(kvs: &[(&str, &str)], revision: u64) -> String {
    let mut out = format!(
        r#"{{"header":{{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"{revision}","raft_term":"2"}}"#
    );
    if !kvs.is_empty() {
        out.push_str(r#","kvs":["#);
        for (i, (key, value)) in kvs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                r#"{{"key":"{}","create_revision":"2","mod_revision":"{revision}","version":"1","value":"{}","lease":"7587870453916416516"}}"#,
                base64_encode(key.as_bytes()),
                base64_encode(value.as_bytes())
            );
        }
        let _ = write!(out, r#"],"count":"{}""#, kvs.len());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("/services/users/", "L3NlcnZpY2VzL3VzZXJzLw=="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("Zg"), Some(b"f".to_vec()));
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Z!=="), None);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn range_responses_parse_as_json() {
        let body = range_response(
            &[("/services/users/1", r#"{"address":"127.0.0.1","port":1}"#)],
            9,
        );
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["header"]["revision"], "9");
        assert_eq!(doc["kvs"][0]["key"], base64_encode(b"/services/users/1"));
        let empty: Value = serde_json::from_str(&range_response(&[], 3)).unwrap();
        assert!(empty.get("kvs").is_none());
    }
}
