//! Self-registration in etcd: an upstream puts its endpoint under a key attached to a lease,
//! keeps the lease alive, registers again when etcd lost it, and revokes it when it stops.
//!
//! This is etcd's own service-registration pattern (a lease is the heartbeat; the key vanishes
//! one TTL after the last keepalive, or at once on revoke), spoken through etcd 3.4's JSON
//! gateway exactly as `docs/config/discovery.md` describes it and as the discovery filter reads
//! it: `POST /v3/lease/grant {"TTL": n}`, `POST /v3/kv/put {"key": b64, "value": b64, "lease":
//! id}`, `POST /v3/lease/keepalive {"ID": id}` every third of the TTL, `POST /v3/lease/revoke`.
//! The value is the endpoint document `{"address": "127.0.0.1", "port": 18091}`.
//!
//! Invariants:
//! - one request at a time, each on a fresh connection with a timeout ([`REQUEST_TIMEOUT`]),
//!   so an etcd that hangs delays the next keepalive but never blocks shutdown for long;
//! - an etcd that is down is retried every period: the registration comes back by itself;
//! - a keepalive answered without a TTL means the lease is gone (it expired while etcd or this
//!   process was unreachable): the next step grants a new lease and puts the key again at once;
//! - on shutdown the current lease is revoked (at most one attempt, bounded by the timeout),
//!   so the key disappears now instead of one TTL later.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// The timeout of one request to etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read from etcd (gateway answers here are a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// An etcd lease id.
pub type LeaseId = i64;

/// What the registration loop reports, for the process's log.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The key was put under a new lease.
    Registered {
        /// The lease.
        lease: LeaseId,
    },
    /// etcd no longer knows the lease (it expired); registering again.
    LeaseLost {
        /// The lost lease.
        lease: LeaseId,
    },
    /// A request to etcd failed; retried at the next period.
    Failed {
        /// What failed.
        error: String,
    },
    /// The lease was revoked at shutdown: the key is gone.
    Revoked {
        /// The lease.
        lease: LeaseId,
    },
}

/// What to register where.
#[derive(Clone, Debug)]
pub struct Registration {
    /// etcd's client address, `host:port` (a host name is resolved at each connection).
    pub etcd: String,
    /// The key, e.g. `/services/users/users-1`.
    pub key: String,
    /// The value, the endpoint document.
    pub value: String,
    /// The lease's TTL, whole seconds (etcd's unit), at least 1.
    pub ttl: Duration,
}

impl Registration {
    /// Registration of `endpoint` under `prefix` + `name` in the etcd at `url`
    /// (`http://host:port`, the form etcd's `--advertise-client-urls` uses).
    ///
    /// The TTL is rounded up to whole seconds. The error names the argument.
    pub fn new(
        url: &str,
        prefix: &str,
        name: &str,
        endpoint: SocketAddr,
        ttl: Duration,
    ) -> Result<Registration, String> {
        let etcd = parse_url(url)?;
        if !prefix.starts_with('/') {
            return Err(format!(
                "--register: expected a key prefix like /services/users/, got {prefix:?}"
            ));
        }
        if endpoint.ip().is_unspecified() {
            return Err(format!(
                "--advertise: {} cannot be registered; give the address clients reach, e.g. --advertise 10.0.0.7",
                endpoint.ip()
            ));
        }
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        if seconds == 0 {
            return Err("--ttl: expected at least 1s".to_string());
        }
        Ok(Registration {
            etcd,
            key: format!("{prefix}{name}"),
            value: endpoint_value(endpoint.ip(), endpoint.port()),
            ttl: Duration::from_secs(seconds),
        })
    }

    /// The time between two keepalives: a third of the TTL.
    pub fn period(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    /// Grants a lease and puts the key on it; returns the lease.
    pub async fn register(&self) -> anyhow::Result<LeaseId> {
        let answer = self
            .post("/v3/lease/grant", &json!({"TTL": self.ttl.as_secs()}))
            .await?;
        let lease =
            int64(&answer["ID"]).ok_or_else(|| anyhow!("lease grant: no ID in {answer}"))?;
        self.post(
            "/v3/kv/put",
            &json!({
                "key": STANDARD.encode(self.key.as_bytes()),
                "value": STANDARD.encode(self.value.as_bytes()),
                "lease": lease.to_string(),
            }),
        )
        .await?;
        Ok(lease)
    }

    /// Refreshes a lease: `true` while etcd knows it, `false` once it is gone.
    pub async fn keepalive(&self, lease: LeaseId) -> anyhow::Result<bool> {
        let answer = self
            .post("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))
            .await?;
        if let Some(error) = answer.get("error") {
            bail!("lease keepalive: {error}");
        }
        // The gateway answers `{"result": {"ID": ..., "TTL": "3"}}`; a lease it no longer knows
        // comes back without a TTL (zero fields are left out).
        Ok(int64(&answer["result"]["TTL"]).unwrap_or(0) > 0)
    }

    /// Revokes a lease: its key is deleted now.
    pub async fn revoke(&self, lease: LeaseId) -> anyhow::Result<()> {
        self.post("/v3/lease/revoke", &json!({"ID": lease.to_string()}))
            .await
            .map(drop)
    }

    /// Registers, keeps the lease alive every [`Registration::period`], registers again when
    /// the lease is lost, and revokes it when `shutdown` completes. Reports through `event`.
    pub async fn run(&self, shutdown: impl Future<Output = ()>, mut event: impl FnMut(Event)) {
        tokio::pin!(shutdown);
        let mut lease: Option<LeaseId> = None;
        loop {
            let step = match lease {
                None => self.register().await.map(|new| {
                    lease = Some(new);
                    event(Event::Registered { lease: new });
                }),
                Some(current) => self.keepalive(current).await.map(|alive| {
                    if !alive {
                        lease = None;
                        event(Event::LeaseLost { lease: current });
                    }
                }),
            };
            let failed = step.is_err();
            if let Err(error) = step {
                event(Event::Failed {
                    error: format!("{error:#}"),
                });
            }
            // A lost lease is replaced at once; otherwise wait a period (or stop).
            let wait = if lease.is_none() && !failed {
                Duration::ZERO
            } else {
                self.period()
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(lease) = lease {
            match self.revoke(lease).await {
                Ok(()) => event(Event::Revoked { lease }),
                Err(error) => event(Event::Failed {
                    error: format!("{error:#}"),
                }),
            }
        }
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        post_json(&self.etcd, path, body).await
    }
}

/// `POST` a JSON body to a path of the etcd gateway at `etcd` (`host:port`), on a fresh
/// connection, within [`REQUEST_TIMEOUT`]; the answer's JSON, an error unless 200.
pub async fn post_json(etcd: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    tokio::time::timeout(REQUEST_TIMEOUT, post_unbounded(etcd, path, body))
        .await
        .map_err(|_| anyhow!("etcd {etcd}{path}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn post_unbounded(etcd: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let context = || format!("etcd {etcd}{path}");
    let stream = TcpStream::connect(etcd).await.with_context(context)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(context)?;
    // The connection task ends when the request is answered and `sender` is dropped.
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, etcd)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .with_context(context)?;
    let response = sender.send_request(request).await.with_context(context)?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow!("{}: reading the answer: {e}", context()))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        bail!(
            "{}: status {status}: {}",
            context(),
            String::from_utf8_lossy(&bytes)
        );
    }
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not JSON: {}",
            context(),
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// The endpoint document of `docs/config/discovery.md`.
pub fn endpoint_value(address: IpAddr, port: u16) -> String {
    json!({"address": address.to_string(), "port": port}).to_string()
}

/// `http://host:port[/]` to `host:port`; the error names `--etcd`.
pub fn parse_url(url: &str) -> Result<String, String> {
    let expected = || format!("--etcd: expected a URL like http://127.0.0.1:2379, got {url:?}");
    let rest = url.strip_prefix("http://").ok_or_else(expected)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').ok_or_else(expected)?;
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    if !valid_host || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(expected());
    }
    Ok(authority.to_string())
}

/// An int64 of the gateway: a string of digits (or a JSON number).
fn int64(value: &Value) -> Option<i64> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn endpoint(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn urls_parse_to_an_authority() {
        assert_eq!(
            parse_url("http://127.0.0.1:2379"),
            Ok("127.0.0.1:2379".into())
        );
        assert_eq!(parse_url("http://etcd:2379/"), Ok("etcd:2379".into()));
        for bad in [
            "127.0.0.1:2379",
            "https://etcd:2379",
            "http://etcd",
            "http://:2379",
            "http://etcd:0",
            "http://et cd:1",
        ] {
            assert!(parse_url(bad).unwrap_err().starts_with("--etcd:"), "{bad}");
        }
    }

    #[test]
    fn a_registration_names_its_key_and_value_and_rounds_the_ttl_up() {
        let r = Registration::new(
            "http://127.0.0.1:2379",
            "/services/users/",
            "users-1",
            endpoint(18091),
            Duration::from_millis(2500),
        )
        .unwrap();
        assert_eq!(r.key, "/services/users/users-1");
        assert_eq!(r.value, r#"{"address":"127.0.0.1","port":18091}"#);
        assert_eq!(r.ttl, Duration::from_secs(3));
        assert_eq!(r.period(), Duration::from_secs(1));
    }

    #[test]
    fn bad_registrations_name_the_argument() {
        let new = |prefix: &str, addr: SocketAddr, ttl: Duration| {
            Registration::new("http://127.0.0.1:2379", prefix, "n", addr, ttl).unwrap_err()
        };
        let one = Duration::from_secs(1);
        assert!(new("services/", endpoint(1), one).starts_with("--register:"));
        assert!(
            new("/s/", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 1)), one)
                .starts_with("--advertise:")
        );
        assert!(new("/s/", endpoint(1), Duration::ZERO).starts_with("--ttl:"));
    }

    #[test]
    fn gateway_int64s_are_strings_or_numbers() {
        assert_eq!(
            int64(&json!("7587870453916416516")),
            Some(7_587_870_453_916_416_516)
        );
        assert_eq!(int64(&json!(3)), Some(3));
        assert_eq!(int64(&json!(null)), None);
        assert_eq!(int64(&json!("x")), None);
    }
}
