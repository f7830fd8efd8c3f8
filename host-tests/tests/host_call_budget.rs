//! The host-call budget: how often each of the Envoy benchmark's wasm scenarios enters the VM
//! and calls the host per request, counted by Keel's wasmtime host, written as the table
//! `bench-results/host-calls.md`.
//!
//! The scenarios are read from the benchmark's own Envoy configs (`bench/envoy/*.yaml`: each
//! wasm filter's module, root_id and configuration) and the floor instrument's host calls from
//! `bench/floors.txt`, and each is driven with the benchmark's request (`GET /`, `x-api-key:
//! bench`, route `bench`, answered 200 `ok`: the common path, where the limiter allows, the
//! breaker is closed, retry has nothing to retry and the picker picks).
//!
//! The test fails when the checked-in table differs from what the code does now, so that a
//! change that adds a host call (or a crossing into the VM) on the common path shows up in
//! review as a change of the budget. `KEEL_UPDATE_HOST_CALLS=1 cargo test -p keel-host-tests
//! --test host_call_budget` (or `make host-calls`) rewrites the table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel_host_tests::harness::{request, response, Host, Vm};
use keel_host_tests::repo_root;
use serde_norway::Value;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// Requests counted per scenario, after one that warms caches (the root's first-use work).
const REQUESTS: u64 = 10;

/// One wasm filter of a benchmark config: its module, root_id, vm_id and configuration.
#[derive(Debug)]
struct WasmFilter {
    module: PathBuf,
    root_id: String,
    vm_id: String,
    config: String,
}

/// Every wasm filter of an Envoy config, in filter-chain order.
fn wasm_filters(yaml: &Path, substitutions: &[(&str, &str)]) -> Vec<WasmFilter> {
    let mut text = std::fs::read_to_string(yaml).unwrap();
    for (from, to) in substitutions {
        text = text.replace(from, to);
    }
    let value: Value = serde_norway::from_str(&text).unwrap();
    let mut found = Vec::new();
    collect(&value, &mut found);
    assert!(!found.is_empty(), "{}: no wasm filter", yaml.display());
    found
}

fn collect(value: &Value, found: &mut Vec<WasmFilter>) {
    match value {
        Value::Mapping(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_TYPE) {
                let config = &map["config"];
                let text = |v: &Value| v.as_str().unwrap_or_default().trim().to_string();
                found.push(WasmFilter {
                    module: repo_root()
                        .join(text(&config["vm_config"]["code"]["local"]["filename"])),
                    root_id: text(&config["root_id"]),
                    vm_id: text(&config["vm_config"]["vm_id"]),
                    config: text(&config["configuration"]["value"]),
                });
                return;
            }
            for (_, v) in map {
                collect(v, found);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| collect(v, found)),
        _ => {}
    }
}

/// The floor scenarios of `bench/floors.txt`: (name, ops, what they stand for).
fn floors() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_root().join("bench/floors.txt")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let fields: Vec<&str> = l.split('|').map(str::trim).collect();
            assert_eq!(
                fields.len(),
                3,
                "bench/floors.txt: `name | ops | what`: {l}"
            );
            (
                fields[0].to_string(),
                fields[1].to_string(),
                fields[2].to_string(),
            )
        })
        .collect()
}

/// What one request costs in crossings: callbacks by export, allocations, host calls by name.
#[derive(Default, Clone, PartialEq)]
struct Budget {
    callbacks: BTreeMap<String, u64>,
    allocations: u64,
    host_calls: BTreeMap<String, u64>,
    properties: BTreeMap<String, u64>,
}

impl Budget {
    fn add(&mut self, other: &Budget) {
        for (k, v) in &other.callbacks {
            *self.callbacks.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.host_calls {
            *self.host_calls.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.properties {
            *self.properties.entry(k.clone()).or_default() += v;
        }
        self.allocations += other.allocations;
    }
}

fn snapshot(vm: &Vm) -> Budget {
    Budget {
        callbacks: vm.callback_counts(),
        allocations: vm.entries().1,
        host_calls: vm
            .host_calls_by_callback()
            .into_iter()
            .map(|((callback, name), n)| (format!("{callback}/{name}"), n))
            .collect(),
        properties: vm
            .property_read_counts()
            .into_iter()
            .map(|(path, n)| (path.join("."), n))
            .collect(),
    }
}

/// `after - before`, over `n` requests, per request (to one decimal when not a whole number).
fn per_request(before: &Budget, after: &Budget, n: u64) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |key: String, delta: u64| {
        if delta > 0 {
            let text = if delta.is_multiple_of(n) {
                (delta / n).to_string()
            } else {
                format!("{:.1}", delta as f64 / n as f64)
            };
            out.insert(key, text);
        }
    };
    for (k, v) in &after.callbacks {
        put(
            format!("cb:{k}"),
            v - before.callbacks.get(k).copied().unwrap_or(0),
        );
    }
    for (k, v) in &after.host_calls {
        put(
            format!("host:{k}"),
            v - before.host_calls.get(k).copied().unwrap_or(0),
        );
    }
    for (k, v) in &after.properties {
        put(
            format!("prop:{k}"),
            v - before.properties.get(k).copied().unwrap_or(0),
        );
    }
    put("alloc".into(), after.allocations - before.allocations);
    out
}

/// One request as the benchmark sends it, through every callback a direct response passes.
fn one_request(vm: &Vm) {
    let s = vm.http_stream();
    s.set_property("xds.route_name", "bench");
    s.request_headers(request("GET", "/").with("x-api-key", "bench"), true);
    assert!(
        s.local_reply().is_none() && !s.is_paused(),
        "the benchmark's request must pass: {:?}",
        vm.logs()
    );
    s.response_headers(response(200), false);
    s.response_body(b"ok", true);
    s.finish();
}

/// The per-request figures of the filters of one config, each in its own VM, all of them
/// seeing every request (a composition of several modules is the sum of its filters).
fn measure(filters: &[WasmFilter]) -> BTreeMap<String, String> {
    let host = Host::new();
    let vms: Vec<Vm> = filters
        .iter()
        .map(|f| {
            let vm = host
                .vm_from_path(&f.module)
                .root_id(&f.root_id)
                .vm_id(&f.vm_id)
                .config(f.config.as_str())
                .start()
                .unwrap_or_else(|e| {
                    panic!("{}: {e:#} (run `make build` first)", f.module.display())
                });
            assert!(
                vm.configured(),
                "{} refused its configuration: {:?}",
                f.root_id,
                vm.logs()
            );
            vm
        })
        .collect();
    let total = |vms: &[Vm]| {
        let mut b = Budget::default();
        for vm in vms {
            b.add(&snapshot(vm));
        }
        b
    };
    vms.iter().for_each(one_request);
    let before = total(&vms);
    let fuel_before: Vec<_> = vms.iter().map(Vm::fuel).collect();
    let seg_before: Vec<_> = vms.iter().map(Vm::fuel_segments).collect();
    for _ in 0..REQUESTS {
        vms.iter().for_each(one_request);
    }
    let after = total(&vms);
    if std::env::var_os("KEEL_FUEL").is_some() {
        // The module's own work per request (wasmtime fuel, about one unit per wasm
        // instruction), by callback: a deterministic guide to the logic's cost.
        for ((f, vm), before) in filters.iter().zip(&vms).zip(&fuel_before) {
            let per: Vec<String> = vm
                .fuel()
                .iter()
                .map(|(k, v)| (k, (v - before.get(k).copied().unwrap_or(0)) / REQUESTS))
                .filter(|(_, v)| *v > 0)
                .map(|(k, v)| format!("{}={v}", k.trim_start_matches("proxy_on_")))
                .collect();
            let total: u64 = vm
                .fuel()
                .iter()
                .map(|(k, v)| v - before.get(k).copied().unwrap_or(0))
                .sum::<u64>()
                / REQUESTS;
            eprintln!(
                "fuel {} {} {}: {total} [{}]",
                f.module.display(),
                f.root_id,
                f.config.len(),
                per.join(" ")
            );
            if std::env::var_os("KEEL_FUEL_SEGMENTS").is_some() {
                let before = &seg_before[vms.iter().position(|v| std::ptr::eq(v, vm)).unwrap()];
                for (k, v) in vm.fuel_segments() {
                    let n = (v - before.get(&k).copied().unwrap_or(0)) / REQUESTS;
                    if n > 40 {
                        eprintln!(
                            "fuelseg {} {} {}: {} -> {}: {n}",
                            f.root_id,
                            f.config.len(),
                            k.0.trim_start_matches("proxy_on_"),
                            k.1.trim_start_matches("proxy_"),
                            k.2.trim_start_matches("proxy_")
                        );
                    }
                }
            }
        }
    }
    for vm in &vms {
        assert!(vm.crashed().is_none(), "{:?}", vm.crashed());
    }
    per_request(&before, &after, REQUESTS)
}

fn sum(cells: &BTreeMap<String, String>, prefix: &str) -> String {
    let total: f64 = 0.0
        + cells
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.parse::<f64>().unwrap())
            .sum::<f64>();
    if total.fract() == 0.0 {
        format!("{total:.0}")
    } else {
        format!("{total:.1}")
    }
}

/// `request_headers: get_header_map_value 1, ...; response_headers: ...`: the host calls grouped
/// by the callback they are made in (callbacks in the order a request passes them).
fn by_callback(cells: &BTreeMap<String, String>) -> String {
    const ORDER: [&str; 7] = [
        "proxy_on_context_create",
        "proxy_on_request_headers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
    ];
    let mut groups: Vec<(usize, String, Vec<String>)> = Vec::new();
    for (key, n) in cells {
        let Some((callback, name)) = key.strip_prefix("host:").and_then(|k| k.split_once('/'))
        else {
            continue;
        };
        let rank = ORDER
            .iter()
            .position(|c| *c == callback)
            .unwrap_or(ORDER.len());
        let call = format!("{} {n}", name.strip_prefix("proxy_").unwrap_or(name));
        match groups.iter_mut().find(|g| g.1 == callback) {
            Some(group) => group.2.push(call),
            None => groups.push((rank, callback.to_string(), vec![call])),
        }
    }
    groups.sort();
    if groups.is_empty() {
        return "—".into();
    }
    groups
        .into_iter()
        .map(|(_, callback, calls)| {
            format!(
                "{}: {}",
                callback.strip_prefix("proxy_on_").unwrap_or(&callback),
                calls.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn list(cells: &BTreeMap<String, String>, prefix: &str, strip: &str) -> String {
    let items: Vec<String> = cells
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|name| (name, v)))
        .map(|(name, v)| format!("{} {v}", name.strip_prefix(strip).unwrap_or(name)))
        .collect();
    if items.is_empty() {
        "—".into()
    } else {
        items.join(", ")
    }
}

/// The table, scenario by scenario, in the benchmark's order.
fn table() -> String {
    let bench = repo_root().join("bench/envoy");
    let mut rows: Vec<(String, String, BTreeMap<String, String>)> = Vec::new();
    for (name, file, what) in [
        ("empty", "empty.yaml", "one empty wasm filter"),
        (
            "keel-rate-limit",
            "keel-rate-limit.yaml",
            "the limiter, allowed",
        ),
        (
            "keel-rate-limit-no-headers",
            "keel-rate-limit-no-headers.yaml",
            "the limiter, allowed, no RateLimit headers",
        ),
        (
            "keel-circuit-breaker",
            "keel-circuit-breaker.yaml",
            "the breaker, closed",
        ),
        ("keel-retry", "keel-retry.yaml", "retry, nothing to retry"),
        ("keel-picker", "keel-picker.yaml", "the picker, picked"),
        (
            "keel-discovery",
            "keel-discovery.yaml",
            "discovery, static set published",
        ),
        (
            "keel-five-modules",
            "keel-five-modules.yaml",
            "the five as five modules (the sum of the five)",
        ),
        (
            "keel-five-pipeline",
            "keel-five-pipeline.yaml",
            "the five as the stages of one pipeline",
        ),
    ] {
        rows.push((
            name.into(),
            what.into(),
            measure(&wasm_filters(&bench.join(file), &[])),
        ));
    }
    for (name, ops, what) in floors() {
        let filters = wasm_filters(&bench.join("floor.yaml"), &[("@FLOOR_OPS@", &ops)]);
        rows.push((
            format!("floor-{name}"),
            format!("floor: {what} (`{ops}`)"),
            measure(&filters),
        ));
    }
    let mut out = String::from(
        "# Host-call budget per request\n\
         \n\
         Generated by `KEEL_UPDATE_HOST_CALLS=1 cargo test -p keel-host-tests --test host_call_budget`\n\
         (`make host-calls`), which fails while this file differs from what the code does: the\n\
         benchmark's wasm scenarios (`bench/envoy/*.yaml`, the floors of `bench/floors.txt`) in Keel's\n\
         wasmtime host, with the benchmark's request (`GET /`, `x-api-key: bench`, route `bench`,\n\
         answered 200 `ok`: allowed, closed, nothing to retry, picked), counted over 10 requests after one.\n\
         \n\
         - **VM entries** = callbacks (exports of the module the host calls) + allocations (the host\n  \
           asks the module for memory to hand it data: a header value, a property, shared data).\n\
         - **host calls** = calls of proxy-wasm host functions by the module (WASI calls not counted).\n\
         \n\
         | scenario | what | VM entries | callbacks | allocations | host calls | host calls, by the callback they are made in | properties read | callbacks by export |\n\
         |---|---|---:|---:|---:|---:|---|---|---|\n",
    );
    for (name, what, cells) in &rows {
        let callbacks = sum(cells, "cb:");
        let allocations = cells.get("alloc").cloned().unwrap_or_else(|| "0".into());
        let entries = callbacks.parse::<f64>().unwrap() + allocations.parse::<f64>().unwrap();
        out.push_str(&format!(
            "| `{name}` | {what} | {entries} | {callbacks} | {allocations} | {} | {} | {} | {} |\n",
            sum(cells, "host:"),
            by_callback(cells),
            list(cells, "prop:", ""),
            list(cells, "cb:", "proxy_on_"),
        ));
    }
    out
}

fn table_path() -> PathBuf {
    repo_root().join("bench-results/host-calls.md")
}

#[test]
fn the_checked_in_host_call_table_is_what_the_code_does() {
    let now = table();
    if std::env::var_os("KEEL_UPDATE_HOST_CALLS").is_some() {
        std::fs::write(table_path(), &now).unwrap();
        eprintln!("wrote {}", table_path().display());
        return;
    }
    let checked_in = std::fs::read_to_string(table_path()).unwrap_or_default();
    assert!(
        checked_in == now,
        "bench-results/host-calls.md is not what the code does now; if the change is meant, \
         regenerate it with `make host-calls` and review the diff.\n--- now ---\n{now}"
    );
}

/// Each filter's floor makes the host calls the filter makes on the common path, no more, no
/// fewer: otherwise "filter over its floor" in the instruction benchmark compares unlike things.
#[test]
fn each_floor_makes_the_host_calls_of_its_filter() {
    let bench = repo_root().join("bench/envoy");
    let floors: BTreeMap<String, String> =
        floors().into_iter().map(|(n, ops, _)| (n, ops)).collect();
    for (floor, file) in [
        ("limiter", "keel-rate-limit.yaml"),
        ("breaker", "keel-circuit-breaker.yaml"),
        ("retry", "keel-retry.yaml"),
        ("picker", "keel-picker.yaml"),
        ("discovery", "keel-discovery.yaml"),
        ("pipeline", "keel-five-pipeline.yaml"),
    ] {
        let ops = floors
            .get(floor)
            .unwrap_or_else(|| panic!("bench/floors.txt has no `{floor}`"));
        // The same host functions in the same callbacks, the same properties.
        let calls = |cells: BTreeMap<String, String>| -> BTreeMap<String, String> {
            cells
                .into_iter()
                .filter(|(k, _)| k.starts_with("host:") || k.starts_with("prop:"))
                .collect()
        };
        let filter = calls(measure(&wasm_filters(&bench.join(file), &[])));
        let probe = calls(measure(&wasm_filters(
            &bench.join("floor.yaml"),
            &[("@FLOOR_OPS@", ops)],
        )));
        assert_eq!(probe, filter, "floor-{floor} (`{ops}`) vs {file}");
    }
}
