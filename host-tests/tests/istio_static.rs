//! `examples/istio/` checked statically (there is no Kubernetes here): every file parses; every
//! `WasmPlugin` names a Keel filter, a valid phase and fail strategy, and its `pluginConfig` is
//! accepted by that filter of `dist/keel.wasm` loaded in the wasmtime host; the clusters of the `EnvoyFilter` are
//! valid Envoy clusters (`envoy --mode validate`) and cover every cluster the plugins call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may unwrap

use std::collections::BTreeSet;
use std::path::PathBuf;

use keel_host_tests::envoy::EnvoyConfig;
use keel_host_tests::harness::Host;
use keel_host_tests::Module;
use serde_json::{json, Value};

const FILTERS: [&str; 5] = [
    "rate_limit",
    "circuit_breaker",
    "retry",
    "picker",
    "discovery",
];
const PHASES: [&str; 4] = ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"];

/// Every document of every YAML file in examples/istio, as JSON values, with its file name.
fn documents() -> Vec<(String, Value)> {
    let dir: PathBuf = keel_host_tests::repo_root().join("examples/istio");
    let mut docs = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            docs.push((name.clone(), value));
        }
    }
    assert!(
        docs.len() >= 6,
        "examples/istio holds {} documents",
        docs.len()
    );
    docs
}

fn plugins() -> Vec<(String, Value)> {
    documents()
        .into_iter()
        .filter(|(_, d)| d["kind"] == "WasmPlugin")
        .collect()
}

#[test]
fn every_plugin_names_a_keel_filter_a_phase_and_a_pinned_module() {
    let plugins = plugins();
    let mut seen = BTreeSet::new();
    let mut urls = BTreeSet::new();
    for (file, plugin) in &plugins {
        assert_eq!(
            plugin["apiVersion"], "extensions.istio.io/v1alpha1",
            "{file}"
        );
        let spec = &plugin["spec"];
        let name = spec["pluginName"].as_str().unwrap_or_default();
        assert!(FILTERS.contains(&name), "{file}: pluginName {name:?}");
        assert!(seen.insert(name.to_string()), "{file}: a second {name}");
        let phase = spec["phase"].as_str().unwrap_or_default();
        assert!(PHASES.contains(&phase), "{file}: phase {phase:?}");
        assert!(spec["priority"].is_i64(), "{file}: priority");
        assert!(
            ["FAIL_OPEN", "FAIL_CLOSE"].contains(&spec["failStrategy"].as_str().unwrap_or("")),
            "{file}: failStrategy"
        );
        assert_eq!(spec["type"], "HTTP", "{file}");
        let url = spec["url"].as_str().unwrap_or_default();
        assert!(
            url.starts_with("oci://") && !url.ends_with(":latest") && url.contains(':'),
            "{file}: url {url:?} must be an OCI reference with a version tag"
        );
        urls.insert(url.to_string());
        assert!(
            spec["selector"]["matchLabels"].is_object(),
            "{file}: selector"
        );
    }
    assert_eq!(seen.len(), FILTERS.len(), "one plugin per filter: {seen:?}");
    assert_eq!(
        urls.len(),
        1,
        "every plugin loads the same module: {urls:?}"
    );
}

#[test]
fn every_plugin_config_is_accepted_by_its_filter() {
    let host = Host::new();
    for (file, plugin) in plugins() {
        let spec = &plugin["spec"];
        let root_id = spec["pluginName"].as_str().unwrap();
        let config = spec["pluginConfig"].to_string();
        // The plugins load the suite module: the filter is chosen by pluginName (root_id).
        let vm = host
            .filter(root_id, Module::Suite)
            .config(config.as_str())
            .start()
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert!(
            vm.configured(),
            "{file}: {root_id} refused {config}: {:?}",
            vm.logs()
        );
        assert!(vm.crashed().is_none(), "{file}");
    }
}

#[test]
fn the_envoy_filter_clusters_are_valid_and_cover_what_the_plugins_call() {
    let docs = documents();
    let mut clusters = Vec::new();
    let mut routed = BTreeSet::new();
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "EnvoyFilter") {
        assert_eq!(doc["apiVersion"], "networking.istio.io/v1alpha3", "{file}");
        for patch in doc["spec"]["configPatches"].as_array().unwrap() {
            match patch["applyTo"].as_str().unwrap() {
                "CLUSTER" => {
                    assert_eq!(patch["patch"]["operation"], "ADD", "{file}");
                    clusters.push(patch["patch"]["value"].clone());
                }
                "HTTP_ROUTE" => {
                    routed.insert(
                        patch["patch"]["value"]["route"]["cluster"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    );
                }
                other => panic!("{file}: unexpected applyTo {other}"),
            }
        }
    }
    let names: BTreeSet<String> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    // What the plugins call by name: registries, the active checks' cluster (default
    // keel_health), and the cluster the picker's route goes to.
    let mut needed: BTreeSet<String> = routed;
    for (_, plugin) in plugins() {
        let config = &plugin["spec"]["pluginConfig"];
        for service in config["services"].as_array().into_iter().flatten() {
            if let Some(source) = service["source"].as_object() {
                for registry in source.values() {
                    needed.insert(registry["cluster"].as_str().unwrap().to_string());
                }
            }
            let check = service["health_check"]["cluster"]
                .as_str()
                .unwrap_or("keel_health");
            needed.insert(check.to_string());
        }
    }
    let missing: Vec<_> = needed.difference(&names).collect();
    assert!(missing.is_empty(), "clusters not defined: {missing:?}");

    // The clusters as Envoy sees them: a bootstrap of just these clusters must validate.
    let bootstrap = json!({ "static_resources": { "clusters": clusters } });
    EnvoyConfig::from_yaml("examples/istio clusters", &bootstrap.to_string())
        .validate()
        .unwrap();
}
