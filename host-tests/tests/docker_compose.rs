//! `envoy/docker-compose.yaml`, checked without Docker (no engine runs here or in CI): it parses
//! as YAML, every image (also in the Dockerfiles it builds) is pinned to a version, every host
//! path it mounts or builds from exists in the repository (or is `dist/`, which `make build`
//! writes), and the Envoy config it mounts passes `envoy --mode validate` and stays the same as
//! `envoy/composed.yaml` apart from the listener and admin addresses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Component, Path, PathBuf};

use keel_host_tests::repo_root;
use serde_norway::Value;

const COMPOSE: &str = "envoy/docker-compose.yaml";

fn compose() -> Value {
    let text = std::fs::read_to_string(repo_root().join(COMPOSE)).unwrap();
    let mut doc: Value = serde_norway::from_str(&text).expect("docker-compose.yaml is YAML");
    // `<<: *users` merge keys, as Compose applies them.
    doc.apply_merge().unwrap();
    doc
}

fn services(doc: &Value) -> Vec<(String, &Value)> {
    doc["services"]
        .as_mapping()
        .expect("a services mapping")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v))
        .collect()
}

/// A host path of the compose file (relative to its directory) inside the repository.
fn host_path(relative: &str) -> PathBuf {
    let base = repo_root().join("envoy");
    let mut path = base.clone();
    for part in Path::new(relative).components() {
        match part {
            Component::ParentDir => {
                path.pop();
            }
            Component::CurDir => {}
            other => path.push(other),
        }
    }
    assert!(
        path.starts_with(repo_root()),
        "{relative} leaves the repository"
    );
    path
}

/// `name:tag` (registry and path allowed) with a tag that names a version.
fn assert_pinned(image: &str, whence: &str) {
    let last = image.rsplit('/').next().unwrap();
    let (_, tag) = last
        .split_once(':')
        .unwrap_or_else(|| panic!("{whence}: image {image} has no tag"));
    assert!(
        !tag.is_empty() && tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
        "{whence}: image {image} is not pinned to a version"
    );
}

#[test]
fn every_image_is_pinned_and_every_mounted_path_exists() {
    let doc = compose();
    let services = services(&doc);
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "envoy", "etcd", "redis", "webdis", "static", "users-1", "users-2", "users-3",
    ] {
        assert!(names.contains(&wanted), "no service {wanted}: {names:?}");
    }
    for (name, service) in &services {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no image"));
        assert_pinned(image, name);
        if let Some(build) = service.get("build") {
            let context = host_path(build["context"].as_str().unwrap());
            assert!(context.is_dir(), "{name}: build context {context:?}");
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap());
            let text = std::fs::read_to_string(&dockerfile)
                .unwrap_or_else(|e| panic!("{name}: {dockerfile:?}: {e}"));
            let froms: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("FROM "))
                .map(|l| l.split_whitespace().next().unwrap())
                .collect();
            assert!(!froms.is_empty(), "{dockerfile:?} has no FROM");
            for from in froms {
                assert_pinned(from, &dockerfile.display().to_string());
            }
        }
        for volume in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let spec = volume.as_str().unwrap();
            let source = spec.split(':').next().unwrap();
            let path = host_path(source);
            let produced_by_make_build = path == repo_root().join("dist");
            assert!(
                path.exists() || produced_by_make_build,
                "{name}: mounts {source}, which does not exist"
            );
        }
        // Everything but Envoy shares Envoy's network namespace (addresses stay 127.0.0.1).
        if *name != "envoy" {
            assert_eq!(
                service["network_mode"].as_str(),
                Some("service:envoy"),
                "{name}"
            );
        }
    }
}

/// The Envoy config the compose file mounts, as a path in the repository.
fn mounted_envoy_config(doc: &Value) -> String {
    let envoy = &doc["services"]["envoy"];
    let command: Vec<&str> = envoy["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let config = command[command.iter().position(|a| *a == "-c").unwrap() + 1];
    let volume = envoy["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .find(|v| v.split(':').nth(1) == Some(config))
        .unwrap_or_else(|| panic!("no volume mounts {config}"));
    let source = host_path(volume.split(':').next().unwrap());
    source
        .strip_prefix(repo_root())
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn the_mounted_envoy_config_validates_and_matches_envoy_composed_yaml() {
    let doc = compose();
    let config = mounted_envoy_config(&doc);
    assert_eq!(config, "envoy/docker/composed.yaml");
    // The modules resolve as in the container: working_dir + dist/ mounted beside the config.
    assert_eq!(
        doc["services"]["envoy"]["working_dir"].as_str(),
        Some("/etc/keel")
    );
    keel_host_tests::envoy::validate(&config).unwrap_or_else(|e| panic!("{config}: {e}"));

    let strip = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| {
                l.replace(
                    "address: 0.0.0.0, port_value: 10000",
                    "address: 127.0.0.1, port_value: 10000",
                )
                .replace(
                    "address: 0.0.0.0, port_value: 9901",
                    "address: 127.0.0.1, port_value: 9901",
                )
            })
            .collect()
    };
    let docker = std::fs::read_to_string(repo_root().join(&config)).unwrap();
    let local = std::fs::read_to_string(repo_root().join("envoy/composed.yaml")).unwrap();
    assert!(docker.contains("address: 0.0.0.0, port_value: 10000"));
    assert!(docker.contains("address: 0.0.0.0, port_value: 9901"));
    assert_eq!(
        strip(&docker),
        strip(&local),
        "envoy/docker/composed.yaml drifted from envoy/composed.yaml"
    );
}
