//! Retries fail over along the picker's ring, and breaker state steers the picker, in Keel's
//! wasmtime host: the /users/ filters of `envoy/composed.yaml` (discovery, picker on a ring,
//! retry, per-host breaker; read from the file), each as its own filter with two workers and
//! vm_id `keel`, on a virtual clock. The test plays Envoy: it runs the chain in order, hands the
//! stream's filter state from filter to filter (the picker's `keel.picker.hosts`, the retry's
//! `keel.retry.router_attempt`, the breaker's `keel.circuit_breaker.host`), plays the router and the upstreams (the router's attempt and
//! the retry's callouts to the `ORIGINAL_DST` cluster `picked` go to the host named in
//! `x-envoy-original-dst-host`), and passes local replies back through the filters before the
//! one that sent it, as Envoy does.
//!
//! The scenario of the issue: three upstreams; one answers 500 for 10 s, then refuses
//! connections for 10 s, then recovers. Per request it asserts: the client gets 200; a key of
//! another host is answered by its own host in one attempt; a key of the failing host is
//! answered by the key's next host on the ring (computed from the picker's configuration by
//! keel-core, with the failing host taken out), and the attempts' hosts are the failing host
//! then that one, or that one alone when the picker skipped the failing host; the failing host
//! receives a request only while its breaker is closed or as a half-open probe; no retry goes
//! to it while its breaker is not closed. After recovery every key is back on its host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::circuit_breaker::{BreakerState, Phase};
use keel_core::picker::{hash_key, Endpoint, Pick};
use keel_host_tests::harness::{
    request, response, HeaderList, HealthAnswer, Host, HttpStream, Response, ScriptedEtcd, Vm,
};
use keel_host_tests::repo_root;
use serde_norway::Value;

const DST: &str = "x-envoy-original-dst-host";
const H: [&str; 3] = ["127.0.0.1:18091", "127.0.0.1:18092", "127.0.0.1:18093"];
const NAMES: [&str; 3] = ["users-1", "users-2", "users-3"];
const FAILING: usize = 1;
const HOSTS: &str = "keel.picker.hosts";
const ROUTER_ATTEMPT: &str = "keel.retry.router_attempt";
const JUDGED: &str = "keel.circuit_breaker.host";
const CHAIN: [&str; 4] = [
    "keel.discovery",
    "keel.picker",
    "keel.retry",
    "keel.circuit_breaker",
];

/// How the failing upstream behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    Normal,
    Fails500,
    Refuses,
}

fn name_of(address: &str) -> &'static str {
    H.iter()
        .position(|h| *h == address)
        .map(|i| NAMES[i])
        .unwrap_or("?")
}

/// `(filter name, root_id, configuration)` of the Keel filters of envoy/composed.yaml.
fn composed_filters() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_root().join("envoy/composed.yaml")).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let hcm =
        &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|f| f["name"].as_str().unwrap().starts_with("keel."))
        .map(|f| {
            let config = &f["typed_config"]["config"];
            (
                f["name"].as_str().unwrap().to_string(),
                config["root_id"].as_str().unwrap().to_string(),
                config["configuration"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

/// What one request showed.
#[derive(Debug)]
struct Outcome {
    status: u32,
    /// `x-upstream` of the answer: the upstream that answered.
    answered_by: Option<String>,
    /// `x-keel-attempt-hosts`, split.
    attempt_hosts: Vec<String>,
    attempts: String,
    /// Whether the router's attempt reached the failing upstream, and the phase of its
    /// breaker right after the breaker admitted the request.
    reached_failing: Option<Phase>,
    /// The retry callouts that went to the failing upstream.
    retries_to_failing: usize,
    /// The failing upstream's breaker phase before the retries were sent.
    phase_before_retries: Phase,
}

struct Rig {
    host: Host,
    /// The filters a request passes, in order.
    chain: Vec<&'static str>,
    registry: Arc<ScriptedEtcd>,
    filters: BTreeMap<String, Vec<Vm>>,
    mode: Arc<Mutex<Upstream>>,
    /// `(context id, vm, host)` of every retry callout to `picked`.
    callouts: Arc<Mutex<Vec<(u32, usize, String)>>>,
}

impl Rig {
    fn start() -> Rig {
        Rig::with_chain(&CHAIN)
    }

    /// The rig with only the filters of `chain` (in composed.yaml's order).
    fn with_chain(chain: &[&'static str]) -> Rig {
        let host = Host::new();
        let registry = ScriptedEtcd::new(&H).answer_for(&host);
        let mode = Arc::new(Mutex::new(Upstream::Normal));
        let callouts = Arc::new(Mutex::new(Vec::new()));
        {
            let (registry, mode, callouts) = (
                Arc::clone(&registry),
                Arc::clone(&mode),
                Arc::clone(&callouts),
            );
            host.set_responder(move |call| {
                if call.upstream != "picked" {
                    return registry.respond(call);
                }
                let to = call.header(DST).unwrap_or("").to_string();
                callouts
                    .lock()
                    .unwrap()
                    .push((call.context_id, call.vm, to.clone()));
                let failing = to == H[FAILING];
                Some(match (*mode.lock().unwrap(), failing) {
                    (Upstream::Fails500, true) => {
                        Response::new(500).header("x-upstream", NAMES[FAILING])
                    }
                    (Upstream::Refuses, true) => Response::connect_failure(),
                    _ => Response::new(200)
                        .header("x-upstream", name_of(&to))
                        .body(name_of(&to)),
                })
            });
        }
        let mut filters = BTreeMap::new();
        for (name, root_id, config) in composed_filters() {
            if !chain.contains(&name.as_str()) {
                continue;
            }
            let vms = host
                .vm(&root_id)
                .root_id(&root_id)
                .vm_id("keel")
                .config(config.as_str())
                .start_workers(2)
                .unwrap_or_else(|e| panic!("{name} loads (make build): {e}"));
            for vm in &vms {
                assert!(vm.configured(), "{name}: {:?}", vm.logs());
            }
            filters.insert(name, vms);
        }
        Rig {
            host,
            chain: chain.to_vec(),
            registry,
            filters,
            mode,
            callouts,
        }
    }

    fn breaker_phase(&self) -> Phase {
        let key = format!("keel/circuit_breaker/users-host/host/{}", H[FAILING]);
        self.host
            .shared_data_in("keel", &key)
            .and_then(|(bytes, _)| BreakerState::decode(&bytes))
            .map_or(Phase::Closed, |s| s.phase())
    }

    /// Runs a local reply or the router's response back through `streams` (last first) and
    /// plays the time the retry filter needs; returns the final status and headers.
    fn respond(
        &self,
        streams: &[HttpStream],
        status: u32,
        headers: HeaderList,
    ) -> (u32, Vec<(String, String)>) {
        let retry = self.chain.iter().position(|n| *n == "keel.retry");
        let mut current = headers;
        for (i, s) in streams.iter().enumerate().rev() {
            s.response_headers(current.clone(), true);
            if Some(i) == retry && s.is_paused() {
                // Held for a retry: let the retry filter's ticks and callouts run.
                for _ in 0..2000 {
                    if s.local_reply().is_some() || s.is_resumed() {
                        break;
                    }
                    self.host.advance(Duration::from_millis(1));
                }
                if let Some(reply) = s.local_reply() {
                    let mut list = HeaderList::new().with(":status", &reply.status.to_string());
                    for (k, v) in &reply.headers {
                        list = list.with(k, v);
                    }
                    for earlier in streams[..i].iter().rev() {
                        earlier.response_headers(list.clone(), true);
                    }
                    return (reply.status, reply.headers);
                }
                assert!(
                    s.is_resumed(),
                    "the retry filter neither answered nor resumed"
                );
            }
            // Each filter hands the headers as it left them to the one before it.
            current = s.response_header_list().into();
        }
        (status, current.0)
    }

    /// One /users/ request for `key` on worker `w`.
    fn send(&self, w: usize, key: &str) -> Outcome {
        let callouts_before = self.callouts.lock().unwrap().len();
        let mut current: HeaderList = request("GET", &format!("/users/{key}")).with("x-user", key);
        let mut streams: Vec<HttpStream> = Vec::new();
        let mut hand_off: Option<Vec<u8>> = None;
        let mut refused: Option<(u32, HeaderList)> = None;
        for name in self.chain.clone() {
            let stream = self.filters[name][w].http_stream();
            stream.set_property("xds.route_name", "users");
            stream.set_property("xds.cluster_name", "picked");
            if let Some(hosts) = &hand_off {
                stream.set_property(&[HOSTS], hosts.clone());
            }
            stream.request_headers(current.clone(), true);
            if hand_off.is_none() {
                hand_off = stream.property(&[HOSTS]);
            }
            current = stream.request_header_list().into();
            let reply = stream.local_reply();
            streams.push(stream);
            if let Some(reply) = reply {
                let mut list = HeaderList::new().with(":status", &reply.status.to_string());
                for (k, v) in &reply.headers {
                    list = list.with(k, v);
                }
                refused = Some((reply.status, list));
                break;
            }
        }
        let upstream = current
            .0
            .iter()
            .find(|(k, _)| k == DST)
            .map(|(_, v)| v.clone());
        let mut reached_failing = None;
        let (status, headers) = match refused {
            // The breaker (the last filter) refused: the router never ran.
            Some((status, list)) => self.respond(&streams[..streams.len() - 1], status, list),
            None => {
                let to = upstream.clone().expect("the picker chose a host");
                if to == H[FAILING] {
                    reached_failing = Some(self.breaker_phase());
                }
                let mode = *self.mode.lock().unwrap();
                let failing = to == H[FAILING];
                let (status, list) = match (mode, failing) {
                    (Upstream::Fails500, true) => {
                        (500, response(500).with("x-upstream", NAMES[FAILING]))
                    }
                    (Upstream::Refuses, true) => {
                        for s in &streams {
                            s.set_property(
                                "response.code_details",
                                "upstream_reset_before_response_started{remote_connection_failure}",
                            );
                            s.set_property("response.flags", 0x20u64);
                        }
                        (503, response(503))
                    }
                    _ => (200, response(200).with("x-upstream", name_of(&to))),
                };
                // Envoy knows the host it chose even when the connection was refused.
                for s in &streams {
                    s.set_property("upstream.address", to.as_str());
                }
                self.respond(&streams, status, list)
            }
        };
        let phase_before_retries = self.breaker_phase();
        // on_log: Envoy's final response code, and the filter state the filters left (one per
        // stream in Envoy, shared by its filters).
        let state: Vec<(&str, Vec<u8>)> = [ROUTER_ATTEMPT, JUDGED]
            .into_iter()
            .filter_map(|p| {
                streams
                    .iter()
                    .find_map(|s| s.property(&[p]))
                    .map(|v| (p, v))
            })
            .collect();
        for s in &streams {
            s.set_property("response.code", u64::from(status));
            for (p, v) in &state {
                s.set_property(&[*p], v.clone());
            }
        }
        for s in &streams {
            s.finish();
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let retries_to_failing = self.callouts.lock().unwrap()[callouts_before..]
            .iter()
            .filter(|(_, _, to)| to == H[FAILING])
            .count();
        Outcome {
            status,
            answered_by: header("x-upstream"),
            attempt_hosts: header("x-keel-attempt-hosts")
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            attempts: header("x-keel-attempts").unwrap_or_default(),
            reached_failing,
            retries_to_failing,
            phase_before_retries,
        }
    }

    fn routable(&self) -> usize {
        self.host
            .gauge("keel.discovery.users.endpoints_routable")
            .max(0) as usize
    }
}

/// The key's host and its next host on the ring, by the picker's own configuration in
/// envoy/composed.yaml (keel-core's ring, the failing host taken out for the second).
fn ring_order(keys: &[String]) -> Vec<(String, String)> {
    let (_, _, config) = composed_filters()
        .into_iter()
        .find(|(n, _, _)| n == "keel.picker")
        .unwrap();
    let spec =
        keel_core::config::load::<keel_core::picker::policy::FilterConfig>(config.as_bytes())
            .unwrap();
    let picker_config = &spec.pickers[0];
    let endpoints: Vec<Endpoint> = H.iter().map(|h| Endpoint::new(*h)).collect();
    let full = picker_config.picker(&endpoints);
    let mut without = endpoints.clone();
    without[FAILING].healthy = false;
    let degraded = picker_config.picker(&without);
    let addr =
        |p: &keel_core::picker::Picker, k: &str| match p.pick_hash(hash_key(k.as_bytes()), &[]) {
            Pick::Host(i) => p.endpoints()[i].address.clone(),
            Pick::NoHost => panic!("no host"),
        };
    keys.iter()
        .map(|k| (addr(&full, k), addr(&degraded, k)))
        .collect()
}

#[test]
fn retries_fail_over_along_the_ring_and_breaker_state_steers_the_picker() {
    let rig = Rig::start();
    rig.host.advance(Duration::from_secs(3));
    assert_eq!(rig.routable(), 3);
    let keys: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let order = ring_order(&keys);
    let failing_keys = order.iter().filter(|(home, _)| home == H[FAILING]).count();
    assert!(failing_keys >= 5, "{failing_keys} keys on the failing host");

    // Steady: every key on its ring host, one attempt.
    for (i, (k, (home, _))) in keys.iter().zip(&order).enumerate() {
        let o = rig.send(i % 2, k);
        assert_eq!(o.status, 200, "{k}: {o:?}");
        assert_eq!(o.answered_by.as_deref(), Some(name_of(home)), "{k}");
    }
    // Let the steady calls age out of the breaker's 1 s window.
    rig.host.advance(Duration::from_millis(1500));

    let mut probes = 0;
    let mut failed_over = 0;
    let mut skipped = 0;
    for (phase, mode) in [(1, Upstream::Fails500), (2, Upstream::Refuses)] {
        *rig.mode.lock().unwrap() = mode;
        if mode == Upstream::Refuses {
            rig.registry
                .set_check(H[FAILING], Some(HealthAnswer::Reset));
        }
        // 10 s of traffic: a round over every key every 250 ms.
        for round in 0..40 {
            for (i, (k, (home, next))) in keys.iter().zip(&order).enumerate() {
                let o = rig.send((round + i) % 2, k);
                assert_eq!(o.status, 200, "phase {phase}, {k}: {o:?}");
                if home != H[FAILING] {
                    assert_eq!(
                        o.answered_by.as_deref(),
                        Some(name_of(home)),
                        "{k} moved: {o:?}"
                    );
                    assert_eq!(o.attempts, "1", "{k}: {o:?}");
                    continue;
                }
                assert_eq!(o.answered_by.as_deref(), Some(name_of(next)), "{k}: {o:?}");
                let hosts: Vec<&str> = o.attempt_hosts.iter().map(String::as_str).collect();
                if hosts == [H[FAILING], next.as_str()] {
                    assert_eq!(o.attempts, "2", "{k}: {o:?}");
                    failed_over += 1;
                } else {
                    assert_eq!(hosts, [next.as_str()], "{k}: {o:?}");
                    assert_eq!(o.attempts, "1", "{k}: {o:?}");
                    skipped += 1;
                }
                match o.reached_failing {
                    None | Some(Phase::Closed) => {}
                    Some(Phase::HalfOpen) => probes += 1,
                    Some(Phase::Open) => {
                        panic!("{k} reached the failing host while its breaker was open")
                    }
                }
                if o.phase_before_retries != Phase::Closed {
                    assert_eq!(o.retries_to_failing, 0, "{k}: a retry went to an open host");
                }
            }
            rig.host.advance(Duration::from_millis(250));
        }
    }
    println!(
        "failing host's keys: {failed_over} failed over by a retry, {skipped} skipped by the picker, {probes} half-open probes; opened {}",
        rig.host.counter("keel.circuit_breaker.users-host.opened")
    );
    assert!(rig.host.counter("keel.circuit_breaker.users-host.opened") >= 1);
    assert!(skipped > failed_over, "the picker skipped the open host");
    assert!(probes >= 1, "half-open probes reached the host");
    assert!(rig.host.counter("keel.picker.users.breaker_avoided") > 0);
    assert!(rig.host.counter("keel.retry.users.failovers") > 0);

    // Recovery: its keys come back once its checks pass and its breaker closes.
    *rig.mode.lock().unwrap() = Upstream::Normal;
    rig.registry.set_check(H[FAILING], None);
    let mut back = false;
    for round in 0..120 {
        rig.host.advance(Duration::from_millis(250));
        let all: Vec<Outcome> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| rig.send((round + i) % 2, k))
            .collect();
        assert!(all.iter().all(|o| o.status == 200), "{all:?}");
        if all
            .iter()
            .zip(&order)
            .all(|(o, (home, _))| o.answered_by.as_deref() == Some(name_of(home)))
        {
            back = true;
            break;
        }
    }
    assert!(back, "the failing host's keys never came back");
    assert_eq!(rig.breaker_phase(), Phase::Closed);
    for vms in rig.filters.values() {
        for vm in vms {
            assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
        }
    }
}

/// Keys whose ring host is the failing upstream.
fn failing_keys(n: usize) -> Vec<(String, String)> {
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    keys.iter()
        .cloned()
        .zip(ring_order(&keys))
        .filter(|(_, (home, _))| home == H[FAILING])
        .map(|(k, (_, next))| (k, next))
        .take(n)
        .collect()
}

/// Without a per-host breaker, passive ejection judges the failing host by the router's
/// answer (500), which the retry filter leaves on the stream, not by the 200 the client got
/// from the next host: five rescued requests in a row eject it, and its keys then go to their
/// next host in one attempt.
#[test]
fn passive_ejection_counts_the_routers_answer_of_a_rescued_request() {
    let rig = Rig::with_chain(&["keel.discovery", "keel.picker", "keel.retry"]);
    rig.host.advance(Duration::from_secs(3));
    assert_eq!(rig.routable(), 3);
    *rig.mode.lock().unwrap() = Upstream::Fails500;
    let keys = failing_keys(8);
    assert!(keys.len() >= 6);
    for (i, (k, next)) in keys.iter().enumerate().take(5) {
        let o = rig.send(i % 2, k);
        assert_eq!(o.status, 200, "{k}: {o:?}");
        assert_eq!(o.attempt_hosts, [H[FAILING], next.as_str()], "{k}");
        assert_eq!(o.answered_by.as_deref(), Some(name_of(next)));
    }
    assert_eq!(
        rig.host.counter("keel.discovery.users.ejections"),
        1,
        "five failures in a row (the router's answers) eject the host"
    );
    rig.host.advance(Duration::from_millis(10));
    let (k, next) = &keys[5];
    let o = rig.send(0, k);
    assert_eq!((o.status, o.attempts.as_str()), (200, "1"), "{o:?}");
    assert_eq!(o.attempt_hosts, [next.as_str()]);
}

/// With a per-host breaker on the route, the breaker judges the host: passive ejection leaves
/// the calls it admitted out (one failure, one judge), and its own refusals reach no upstream,
/// so they are not counted either. The breaker opens; discovery never ejects.
#[test]
fn a_per_host_breaker_judges_its_host_and_passive_ejection_stays_out() {
    let rig = Rig::start();
    rig.host.advance(Duration::from_secs(3));
    // Let the start-up checks age out of nothing: the window starts empty.
    *rig.mode.lock().unwrap() = Upstream::Fails500;
    let keys = failing_keys(8);
    for round in 0..40 {
        for (i, (k, next)) in keys.iter().enumerate() {
            let o = rig.send((round + i) % 2, k);
            assert_eq!(o.status, 200, "{k}: {o:?}");
            assert_eq!(o.answered_by.as_deref(), Some(name_of(next)), "{k}: {o:?}");
        }
        rig.host.advance(Duration::from_millis(100));
    }
    assert!(rig.host.counter("keel.circuit_breaker.users-host.opened") >= 1);
    assert!(rig.host.counter("keel.circuit_breaker.users-host.failures") >= 5);
    assert_eq!(rig.host.counter("keel.discovery.users.ejections"), 0);
    assert_eq!(rig.routable(), 3, "the breaker, not discovery, took it out");
}

/// The same hand-off between stages of Keel's pipeline (`keel.wasm`, root_id `pipeline`): the
/// picker stage leaves the host list on the stream, the retry stage sends the retry to the
/// key's next host on the ring. One stream, one filter state: nothing to copy.
#[test]
fn pipeline_stages_fail_over_along_the_ring_too() {
    let picker = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}, {"address": "127.0.0.1:18093"}], "breaker": {"name": "users-host", "half_open_probes": 2}}]}"#;
    let retry = r#"{"policies": [{"name": "users", "cluster": "picked", "breaker": "users-host", "max_attempts": 3, "backoff": {"base": "10ms", "cap": "10ms", "jitter": "none"}, "budget": {"ratio": 1, "min_per_second": 100, "ttl": "10s"}}]}"#;
    let breaker = r#"{"breakers": [{"name": "users-host", "scope": "host", "window": "1s", "min_calls": 50, "failure_rate": 0.5}]}"#;
    let config = format!(
        r#"{{"stages": [{{"filter": "picker", "config": {picker}}}, {{"filter": "retry", "config": {retry}}}, {{"filter": "circuit_breaker", "config": {breaker}}}]}}"#
    );
    let host = Host::new();
    let answered = Arc::new(Mutex::new(Vec::new()));
    {
        let answered = Arc::clone(&answered);
        host.set_responder(move |call| {
            let to = call.header(DST).unwrap_or("").to_string();
            answered.lock().unwrap().push(to.clone());
            Some(if to == H[FAILING] {
                Response::new(500)
            } else {
                Response::new(200).header("x-upstream", name_of(&to))
            })
        });
    }
    let vms = host
        .vm_from_path(keel_host_tests::suite_path())
        .root_id("pipeline")
        .vm_id("keel")
        .config(config)
        .start_workers(2)
        .expect("keel.wasm loads (make build)");
    assert!(vms.iter().all(Vm::configured), "{:?}", vms[0].logs());
    let spec =
        keel_core::config::load::<keel_core::picker::policy::FilterConfig>(picker.as_bytes())
            .unwrap();
    let endpoints: Vec<Endpoint> = H.iter().map(|h| Endpoint::new(*h)).collect();
    let full = spec.pickers[0].picker(&endpoints);
    let mut without = endpoints.clone();
    without[FAILING].healthy = false;
    let degraded = spec.pickers[0].picker(&without);
    let at = |p: &keel_core::picker::Picker, k: &str| match p.pick_hash(hash_key(k.as_bytes()), &[])
    {
        Pick::Host(i) => p.endpoints()[i].address.clone(),
        Pick::NoHost => panic!("no host"),
    };
    let mut checked = 0;
    for i in 0..60 {
        let k = format!("user-{i}");
        if at(&full, &k) != H[FAILING] {
            continue;
        }
        let next = at(&degraded, &k);
        let s = vms[i % 2].http_stream();
        s.set_property("xds.route_name", "users");
        s.set_property("xds.cluster_name", "picked");
        s.request_headers(
            request("GET", &format!("/users/{k}")).with("x-user", &k),
            true,
        );
        assert_eq!(s.request_header(DST).as_deref(), Some(H[FAILING]));
        s.set_property("upstream.address", H[FAILING]);
        s.response_headers(response(500), true);
        for _ in 0..200 {
            if s.local_reply().is_some() {
                break;
            }
            host.advance(Duration::from_millis(1));
        }
        let reply = s.local_reply().expect("the retry stage answered");
        assert_eq!(reply.status, 200, "{k}");
        assert_eq!(reply.header("x-upstream"), Some(name_of(&next)), "{k}");
        assert_eq!(
            reply.header("x-keel-attempt-hosts"),
            Some(format!("{},{next}", H[FAILING]).as_str()),
            "{k}"
        );
        assert_eq!(answered.lock().unwrap().pop(), Some(next));
        s.finish();
        checked += 1;
    }
    assert!(checked >= 5, "{checked} keys of the failing host");
}

/// When every listed host was tried, the retry filter says so instead of going round again:
/// two hosts, both failing, three attempts allowed: two attempts (one per host), then the
/// client gets the last answer with `x-keel-attempts: 2; hosts-exhausted`.
#[test]
fn a_retry_with_no_untried_host_left_is_not_made() {
    let picker = r#"{"pickers": [{"name": "users", "key": "header:x-user", "algorithm": "ring", "endpoints": [{"address": "127.0.0.1:18091"}, {"address": "127.0.0.1:18092"}]}]}"#;
    let retry = r#"{"policies": [{"name": "users", "cluster": "picked", "max_attempts": 3, "backoff": {"base": "10ms", "cap": "10ms", "jitter": "none"}, "budget": {"ratio": 1, "min_per_second": 100, "ttl": "10s"}}]}"#;
    let config = format!(
        r#"{{"stages": [{{"filter": "picker", "config": {picker}}}, {{"filter": "retry", "config": {retry}}}]}}"#
    );
    let host = Host::new();
    let sent = Arc::new(Mutex::new(Vec::new()));
    {
        let sent = Arc::clone(&sent);
        host.set_responder(move |call| {
            sent.lock()
                .unwrap()
                .push(call.header(DST).unwrap_or("").to_string());
            Some(Response::new(503).body("down"))
        });
    }
    let vm = host
        .vm_from_path(keel_host_tests::suite_path())
        .root_id("pipeline")
        .vm_id("keel")
        .config(config)
        .start()
        .expect("keel.wasm loads (make build)");
    assert!(vm.configured(), "{:?}", vm.logs());
    let s = vm.http_stream();
    s.set_property("xds.route_name", "users");
    s.set_property("xds.cluster_name", "picked");
    s.request_headers(request("GET", "/users/bob").with("x-user", "bob"), true);
    let first = s.request_header(DST).unwrap();
    s.set_property("upstream.address", first.as_str());
    s.response_headers(response(500), true);
    for _ in 0..500 {
        if s.local_reply().is_some() || s.is_resumed() {
            break;
        }
        host.advance(Duration::from_millis(1));
    }
    let reply = s.local_reply().expect("the retry filter answered");
    let other = if first == H[0] { H[1] } else { H[0] };
    assert_eq!(
        *sent.lock().unwrap(),
        [other.to_string()],
        "one retry, to the other host"
    );
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-keel-attempts"), Some("2; hosts-exhausted"));
    assert_eq!(
        reply.header("x-keel-attempt-hosts"),
        Some(format!("{first},{other}").as_str())
    );
    assert_eq!(host.counter("keel.retry.users.hosts_exhausted"), 1);
    host.advance(Duration::from_secs(1));
    assert_eq!(sent.lock().unwrap().len(), 1, "no third attempt");
}
