//! A real Redis behind a real Webdis on loopback, the fleet store of fleet-wide rate limits.
//!
//! [`FleetStore::start`] runs `/usr/bin/redis-server` (Debian's `redis-server` 7.0) and
//! `/usr/bin/webdis` (Debian's `webdis` 0.1.9), both installed by `make setup`, on free loopback
//! ports with their config and logs in a temporary directory, and waits until Webdis answers a
//! `PING` through Redis. Webdis's config is one JSON file (`redis_host`, `redis_port`,
//! `http_host`, `http_port`, `daemonize: false`, `acl`). Tests talk to it as the filter does:
//! `POST /` with a command body.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use keel_host_tests::redis::FleetStore;
//! let store = FleetStore::start()?;
//! assert_eq!(store.command("SET/k/v")?, r#"{"SET":[true,"OK"]}"#);
//! store.stop_redis(); // Webdis answers 503 ...
//! store.start_redis()?; // ... until Redis is back (same port, empty: no scripts, no keys)
//! # Ok(())
//! # }
//! ```
//!
//! Invariants, as for [`crate::etcd`]: every store has its own ports and directory; processes
//! are stopped by their pid (the `Child`), never by name; dropping the store kills both and
//! removes the directory unless the thread is panicking (its path is printed then).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::envoy::{free_port, loopback, make_temp_dir, Client, Request};

/// Webdis's port in the configs of `envoy/` (moved to a test's Webdis by the test).
pub const WEBDIS_PORT: u16 = 7379;
/// How long starting waits for an answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Redis and Webdis, started and stopped independently.
#[derive(Debug)]
pub struct FleetStore {
    dir: PathBuf,
    redis_port: u16,
    webdis_port: u16,
    redis: Mutex<Option<Child>>,
    webdis: Mutex<Option<Child>>,
}

impl FleetStore {
    /// Starts Redis and Webdis on free loopback ports and waits until a `PING` goes through.
    pub fn start() -> anyhow::Result<FleetStore> {
        for binary in ["/usr/bin/redis-server", "/usr/bin/webdis"] {
            if !PathBuf::from(binary).is_file() {
                bail!(
                    "no {binary}: run `make setup` (it installs Debian's redis-server and webdis)"
                );
            }
        }
        let mut last = None;
        for _ in 0..3 {
            let store = FleetStore {
                dir: make_temp_dir("keel-redis")?,
                redis_port: free_port()?,
                webdis_port: free_port()?,
                redis: Mutex::new(None),
                webdis: Mutex::new(None),
            };
            match store.start_redis().and_then(|()| store.start_webdis()) {
                Ok(()) => return Ok(store),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the fleet store did not start")))
    }

    /// Webdis's port.
    pub fn webdis_port(&self) -> u16 {
        self.webdis_port
    }

    /// Redis's port.
    pub fn redis_port(&self) -> u16 {
        self.redis_port
    }

    fn log_file(&self, name: &str) -> anyhow::Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .with_context(|| format!("creating {name}"))
    }

    /// Starts Redis (again, on the same port, empty) and waits until Webdis reaches it (when
    /// Webdis runs) or Redis answers on its port.
    pub fn start_redis(&self) -> anyhow::Result<()> {
        let log = self.log_file("redis.log")?;
        let child = Command::new("/usr/bin/redis-server")
            .args(["--port", &self.redis_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server")?;
        *self.redis.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::net::TcpStream::connect(loopback(self.redis_port)).is_err() {
            if Instant::now() >= deadline {
                bail!(
                    "redis did not listen within {READY_TIMEOUT:?}:\n{}",
                    self.log("redis.log")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        if self
            .webdis
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            self.wait_ping()?;
        }
        Ok(())
    }

    fn start_webdis(&self) -> anyhow::Result<()> {
        let config = serde_json::json!({
            "redis_host": "127.0.0.1",
            "redis_port": self.redis_port,
            "http_host": "127.0.0.1",
            "http_port": self.webdis_port,
            "threads": 2,
            "daemonize": false,
            "database": 0,
            "verbosity": 3,
            "logfile": self.dir.join("webdis.log"),
            "acl": [{"disabled": ["DEBUG", "FLUSHALL", "FLUSHDB", "CONFIG", "SHUTDOWN"]}]
        });
        let path = self.dir.join("webdis.json");
        fs::write(&path, config.to_string()).context("writing webdis.json")?;
        let log = self.log_file("webdis.out")?;
        let child = Command::new("/usr/bin/webdis")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting webdis")?;
        *self.webdis.lock().unwrap_or_else(PoisonError::into_inner) = Some(child);
        self.wait_ping()
    }

    fn wait_ping(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(answer) = self.command("PING") {
                if answer.contains("PONG") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "webdis did not answer PING within {READY_TIMEOUT:?}:\n{}\n{}",
                    self.log("webdis.log"),
                    self.log("redis.log")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one command body to Webdis; its answer (any status).
    pub fn command(&self, body: &str) -> anyhow::Result<String> {
        let response = Client::new(loopback(self.webdis_port))
            .send(Request::post("/", body.to_string()).timeout(Duration::from_secs(2)))?;
        Ok(response.text())
    }

    /// Kills Redis (SIGKILL: a crash). Webdis then answers 503.
    pub fn stop_redis(&self) {
        kill(&self.redis);
    }

    /// Kills Webdis. Calls to it are then refused.
    pub fn stop_webdis(&self) {
        kill(&self.webdis);
    }

    /// One of the logs (`redis.log`, `webdis.log`).
    pub fn log(&self, name: &str) -> String {
        fs::read(self.dir.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

fn kill(child: &Mutex<Option<Child>>) {
    let taken = child.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(mut child) = taken {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for FleetStore {
    fn drop(&mut self) {
        kill(&self.webdis);
        kill(&self.redis);
        if thread::panicking() {
            eprintln!("fleet store logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
