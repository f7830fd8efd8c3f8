//! A scripted etcd registry and the instances' health endpoints, for harness tests of the
//! discovery filter (alone or composed with the picker and the other filters).
//!
//! [`ScriptedEtcd`] is a [`Host`] responder that plays what the discovery filter calls out to in
//! Envoy:
//!
//! - the `etcd` cluster: each call (a `/v3/kv/range` read of the prefix) is answered with the
//!   registered instances as etcd's JSON gateway lists them ([`range_response`]: key
//!   `<prefix><port>`, value `{"address":"<ip>","port":<port>}`, revision 9), or with what
//!   [`ScriptedEtcd::set_answer`] scripts instead: a status, a body, a reset, Envoy's
//!   connect-failure 503 (the registry is down), or noise. Each read is counted with the index
//!   of the VM that made it ([`ScriptedEtcd::reads`]), so tests can see which worker polls;
//! - the `keel_health` cluster: each `/healthz` check is recorded ([`ScriptedEtcd::checks`]) and
//!   answered 200 `ok`, unless [`ScriptedEtcd::set_check`] scripts that instance (named by the
//!   `x-envoy-original-dst-host` header) to answer a status, reset or never answer;
//! - any other cluster: Envoy's connect-failure 503, as for a cluster with nothing behind it.
//!
//! ```no_run
//! use keel_host_tests::harness::{HealthAnswer, Host, ScriptedEtcd};
//!
//! let host = Host::new();
//! let etcd = ScriptedEtcd::install(&host, &["127.0.0.1:18091", "127.0.0.1:18092"]);
//! // ... start discovery workers, advance the clock ...
//! etcd.set_healthy("127.0.0.1:18092", false); // its /healthz answers 503
//! etcd.set_down(true); // every read fails as a connection failure
//! etcd.set_check("127.0.0.1:18091", Some(HealthAnswer::Hang));
//! let reads = etcd.reads(); // the VM index of each registry read
//! # let _ = reads;
//! ```
//!
//! The registry's answers are not tied to the virtual clock: what is scripted holds for every
//! read from then on. The key and revision are what a real etcd would send; the filter reads
//! neither beyond the prefix check.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_core::rand::{Rng, SeededRng};

use super::{CalloutRequest, Host, Response};
use crate::etcd::range_response;

/// The prefix the repository's discovery configurations read (`envoy/*.yaml`).
pub const USERS_PREFIX: &str = "/services/users/";
/// The cluster name of the registry in the configurations.
pub const REGISTRY_CLUSTER: &str = "etcd";
/// The cluster the discovery filter sends its health checks to.
pub const HEALTH_CLUSTER: &str = "keel_health";
/// The header naming the instance a health check is for.
pub const DST_HEADER: &str = "x-envoy-original-dst-host";
/// The revision of the range answers [`ScriptedEtcd`] builds.
pub const REVISION: u64 = 9;

/// What the registry answers each read with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum EtcdAnswer {
    /// The registered hosts, as etcd's gateway would list them (the default).
    #[default]
    Hosts,
    /// This status, empty body.
    Status(u32),
    /// 200 with this body.
    Body(Vec<u8>),
    /// The call fails without a response.
    Reset,
    /// Nothing listens: Envoy's own 503 for a connection failure.
    ConnectFailure,
    /// Noise: a valid answer with one byte changed, random bytes, or a truncated answer, drawn
    /// anew for each read from a generator seeded with 7 (the same sequence every run).
    Noise,
}

/// How one instance answers its health check (an instance not scripted answers 200 `ok`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthAnswer {
    /// This status, empty body.
    Status(u32),
    /// The check fails without a response.
    Reset,
    /// Never answers: the callout's timeout passes.
    Hang,
}

/// etcd and the instances' health endpoints, played by a responder. See the module docs.
pub struct ScriptedEtcd {
    prefix: String,
    /// The registered instances (`ip:port`), in registration order.
    hosts: Mutex<Vec<String>>,
    answer: Mutex<EtcdAnswer>,
    /// The VM index of each registry read.
    reads: Mutex<Vec<usize>>,
    /// Scripted health answers by instance address.
    health: Mutex<BTreeMap<String, HealthAnswer>>,
    /// Every health check, in order.
    checks: Mutex<Vec<CalloutRequest>>,
    rng: Mutex<SeededRng>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding a lock has failed already; its data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptedEtcd {
    /// A registry under [`USERS_PREFIX`] listing `hosts` (`ip:port`), answering nobody yet:
    /// see [`ScriptedEtcd::answer_for`], or build answers with [`ScriptedEtcd::range_body`].
    pub fn new(hosts: &[&str]) -> ScriptedEtcd {
        let etcd = ScriptedEtcd {
            prefix: USERS_PREFIX.to_string(),
            hosts: Mutex::default(),
            answer: Mutex::default(),
            reads: Mutex::default(),
            health: Mutex::default(),
            checks: Mutex::default(),
            rng: Mutex::new(SeededRng::new(7)),
        };
        etcd.set_hosts(hosts);
        etcd
    }

    /// The same under another key prefix.
    pub fn with_prefix(mut self, prefix: &str) -> ScriptedEtcd {
        self.prefix = prefix.to_string();
        self
    }

    /// Makes this the responder of `host`'s callouts (replacing any other).
    pub fn answer_for(self, host: &Host) -> Arc<ScriptedEtcd> {
        let etcd = Arc::new(self);
        let responder = Arc::clone(&etcd);
        host.set_responder(move |call| responder.respond(call));
        etcd
    }

    /// A registry listing `hosts`, answering `host`'s callouts.
    pub fn install(host: &Host, hosts: &[&str]) -> Arc<ScriptedEtcd> {
        ScriptedEtcd::new(hosts).answer_for(host)
    }

    /// Replaces the registered instances (`ip:port`), as registrations and lapsed leases do.
    pub fn set_hosts(&self, hosts: &[&str]) {
        *lock(&self.hosts) = hosts.iter().map(|h| h.to_string()).collect();
    }

    /// What every read answers from now on.
    pub fn set_answer(&self, answer: EtcdAnswer) {
        *lock(&self.answer) = answer;
    }

    /// etcd down (every read gets Envoy's connect-failure 503) or back (the registered hosts).
    pub fn set_down(&self, down: bool) {
        self.set_answer(if down {
            EtcdAnswer::ConnectFailure
        } else {
            EtcdAnswer::Hosts
        });
    }

    /// How `address`'s health check answers; `None`: 200 `ok` again.
    pub fn set_check(&self, address: &str, check: Option<HealthAnswer>) {
        let mut health = lock(&self.health);
        match check {
            Some(c) => health.insert(address.to_string(), c),
            None => health.remove(address),
        };
    }

    /// `address`'s health check answers 200 `ok` (healthy) or 503.
    pub fn set_healthy(&self, address: &str, healthy: bool) {
        self.set_check(address, (!healthy).then_some(HealthAnswer::Status(503)));
    }

    /// The VM index of each registry read so far, in order.
    pub fn reads(&self) -> Vec<usize> {
        lock(&self.reads).clone()
    }

    /// Every health check so far, in order.
    pub fn checks(&self) -> Vec<CalloutRequest> {
        lock(&self.checks).clone()
    }

    /// The range answer listing the registered instances (the body of [`EtcdAnswer::Hosts`]).
    pub fn range_body(&self) -> Vec<u8> {
        let values: Vec<(String, String)> = lock(&self.hosts)
            .iter()
            .map(|h| {
                let (ip, port) = h.rsplit_once(':').unwrap_or((h.as_str(), "0"));
                (
                    format!("{}{port}", self.prefix),
                    format!(r#"{{"address":"{ip}","port":{port}}}"#),
                )
            })
            .collect();
        let kvs: Vec<(&str, &str)> = values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        range_response(&kvs, REVISION).into_bytes()
    }

    fn noise(&self) -> Vec<u8> {
        let valid = self.range_body();
        let mut rng = lock(&self.rng);
        match rng.below(3) {
            0 => {
                let mut b = valid;
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next_u64() as u8;
                b
            }
            1 => (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect(),
            _ => valid[..rng.below(valid.len() as u64) as usize].to_vec(),
        }
    }

    /// The answer to one callout (`None`: it never answers). What [`ScriptedEtcd::answer_for`]
    /// installs; usable in a responder of a test's own that plays more clusters.
    pub fn respond(&self, call: &CalloutRequest) -> Option<Response> {
        match call.upstream.as_str() {
            REGISTRY_CLUSTER => {
                lock(&self.reads).push(call.vm);
                let answer = lock(&self.answer).clone();
                Some(match answer {
                    EtcdAnswer::Hosts => Response::new(200)
                        .header("content-type", "application/json")
                        .body(self.range_body()),
                    EtcdAnswer::Status(s) => Response::new(s),
                    EtcdAnswer::Body(b) => Response::new(200).body(b),
                    EtcdAnswer::Reset => Response::reset(),
                    EtcdAnswer::ConnectFailure => Response::connect_failure(),
                    EtcdAnswer::Noise => Response::new(200).body(self.noise()),
                })
            }
            HEALTH_CLUSTER => {
                lock(&self.checks).push(call.clone());
                let address = call.header(DST_HEADER).unwrap_or("");
                match lock(&self.health).get(address).cloned() {
                    None => Some(Response::new(200).body("ok")),
                    Some(HealthAnswer::Status(s)) => Some(Response::new(s)),
                    Some(HealthAnswer::Reset) => Some(Response::reset()),
                    Some(HealthAnswer::Hang) => None,
                }
            }
            _ => Some(Response::connect_failure()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn the_range_body_lists_the_registered_hosts() {
        let etcd = ScriptedEtcd::new(&["127.0.0.1:18091", "127.0.0.1:18092"]);
        let doc: Value = serde_json::from_slice(&etcd.range_body()).unwrap();
        assert_eq!(doc["header"]["revision"], "9");
        assert_eq!(doc["count"], "2");
        assert_eq!(
            doc["kvs"][1]["key"],
            crate::etcd::base64_encode(b"/services/users/18092")
        );
        let value = crate::etcd::base64_decode(doc["kvs"][0]["value"].as_str().unwrap()).unwrap();
        assert_eq!(value, br#"{"address":"127.0.0.1","port":18091}"#);
        etcd.set_hosts(&[]);
        let doc: Value = serde_json::from_slice(&etcd.range_body()).unwrap();
        assert!(doc.get("kvs").is_none());
    }
}
