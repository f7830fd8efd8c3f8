//! The `keel-upstream` binary registering itself in a real etcd (Debian's `etcd-server`,
//! `/usr/bin/etcd` or `$KEEL_ETCD`, from `make setup`) through the JSON gateway: the key
//! appears with the endpoint document under a lease, survives past the TTL (keepalives),
//! comes back under a new lease when the lease is revoked behind its back, and vanishes at once
//! on SIGTERM. etcd runs on free loopback ports with its own directory.
//!
//! (host-tests has the full etcd rig; this crate cannot depend on it, so a minimal launcher.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use keel_upstream::registry::post_json;
use serde_json::{json, Value};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-member etcd, killed and its directory removed on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    authority: String,
    runtime: tokio::runtime::Runtime,
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_on(free_port())
    }

    fn start_on(client: u16) -> Etcd {
        let binary = std::env::var_os("KEEL_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        assert!(
            binary.is_file(),
            "no etcd at {}: run `make setup`",
            binary.display()
        );
        let peer = free_port();
        let dir = std::env::temp_dir().join(format!(
            "keel-upstream-etcd-{}-{client}",
            std::process::id()
        ));
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(binary)
            .args(["--name", "keel", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("keel={peer_url}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = Etcd {
            child,
            dir,
            authority: format!("127.0.0.1:{client}"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while etcd.post("/v3/kv/range", &json!({"key": "AA=="})).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    fn url(&self) -> String {
        format!("http://{}", self.authority)
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.runtime
            .block_on(post_json(&self.authority, path, body))
    }

    /// `(value, lease)` of a key, if present.
    fn get(&self, key: &str) -> Option<(String, String)> {
        let answer = self
            .post("/v3/kv/range", &json!({"key": STANDARD.encode(key)}))
            .unwrap();
        let kv = answer["kvs"].get(0)?;
        let value = STANDARD.decode(kv["value"].as_str()?).ok()?;
        Some((
            String::from_utf8(value).ok()?,
            kv["lease"].as_str()?.to_string(),
        ))
    }

    /// Polls `get(key)` until `done` holds, for at most `timeout`.
    fn wait(
        &self,
        key: &str,
        timeout: Duration,
        done: impl Fn(&Option<(String, String)>) -> bool,
    ) -> Option<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.get(key);
            if done(&now) || Instant::now() >= deadline {
                return now;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binary under test, killed on drop if still running.
struct Upstream(Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_registers_keeps_alive_re_registers_and_revokes_on_sigterm() {
    let etcd = Etcd::start();
    let port = free_port();
    let mut upstream = Upstream(
        Command::new(env!("CARGO_BIN_EXE_keel-upstream"))
            .args(["--name", "users-7", "--port", &port.to_string()])
            .args(["--etcd", &etcd.url(), "--register", "/services/users/"])
            .args(["--ttl", "2s"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let key = "/services/users/users-7";
    let (value, lease) = etcd
        .wait(key, Duration::from_secs(10), Option::is_some)
        .expect("registered within 10 s");
    let doc: Value = serde_json::from_str(&value).unwrap();
    assert_eq!(doc, json!({"address": "127.0.0.1", "port": port}));
    assert_ne!(lease, "0", "the key is attached to a lease");

    // Three TTLs later it is still there, on the same lease: keepalives every third of the TTL.
    thread::sleep(Duration::from_secs(6));
    assert_eq!(etcd.get(key), Some((value.clone(), lease.clone())));

    // The lease vanishes behind its back (as after an etcd outage longer than the TTL): the
    // next keepalive notices and the key comes back under a new lease.
    etcd.post("/v3/lease/revoke", &json!({"ID": lease}))
        .unwrap();
    let again = etcd
        .wait(key, Duration::from_secs(5), |kv| {
            kv.as_ref().is_some_and(|(_, l)| *l != lease)
        })
        .expect("registered again within 5 s");
    assert_eq!(again.0, value);

    // SIGTERM: the lease is revoked and the key is gone at once, not one TTL later.
    let status = Command::new("kill")
        .args(["-TERM", &upstream.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = upstream.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit within 5 s of SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    assert_eq!(etcd.get(key), None, "the key outlived the process");
}

#[test]
fn an_upstream_started_before_etcd_serves_and_registers_once_etcd_is_up() {
    let client = free_port();
    let port = free_port();
    let _upstream = Upstream(
        Command::new(env!("CARGO_BIN_EXE_keel-upstream"))
            .args(["--name", "users-8", "--port", &port.to_string()])
            .args(["--etcd", &format!("http://127.0.0.1:{client}")])
            .args(["--register", "/services/users/", "--ttl", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    thread::sleep(Duration::from_millis(700));
    let etcd = Etcd::start_on(client);
    let registered = etcd.wait(
        "/services/users/users-8",
        Duration::from_secs(10),
        Option::is_some,
    );
    assert!(
        registered.is_some(),
        "not registered within 10 s of etcd starting"
    );
}

#[test]
fn bad_registration_arguments_are_refused_with_the_argument_named() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_keel-upstream"))
            .args(["--name", "x", "--port", "1"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--etcd", "127.0.0.1:2379", "--register", "/s/"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--etcd: expected a URL"), "{err}");
    let (code, err) = run(&["--etcd", "http://127.0.0.1:2379"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--etcd and --register go together"), "{err}");
    let (code, err) = run(&[
        "--etcd",
        "http://127.0.0.1:2379",
        "--register",
        "/s/",
        "--bind",
        "0.0.0.0",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--advertise"), "{err}");
}
