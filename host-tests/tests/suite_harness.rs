//! `keel.wasm`, every filter in one module, in Keel's wasmtime host: the root_id chooses the
//! filter. Each filter's key behaviours run through keel.wasm in the filter's own harness tests
//! (`Module::BOTH`); this file checks the choosing itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keel_host_tests::harness::{request, Host, LogLevel};
use keel_host_tests::suite_path;

const RATE_LIMIT: &str = r#"{"policies": [{"name": "per-key", "key": "header:x-api-key", "limit": {"requests": 2, "per": "1s"}}]}"#;

#[test]
fn an_unknown_root_id_is_refused_naming_the_known_ones() {
    let host = Host::new();
    for root_id in ["ratelimit", ""] {
        let vm = host
            .vm_from_path(suite_path())
            .root_id(root_id)
            .vm_id("keel")
            .config(RATE_LIMIT)
            .start()
            .unwrap();
        assert!(!vm.configured(), "root_id {root_id:?} accepted");
        assert!(vm.crashed().is_none());
        let line = format!(
            "keel suite: unknown root_id \"{root_id}\"; keel.wasm has the root_ids \
             circuit_breaker, retry, rate_limit, picker, discovery, idempotency, adaptive, pipeline; configuration refused"
        );
        let errors = vm.logs_at_least(LogLevel::Error);
        assert!(
            errors.iter().any(|l| l.message == line),
            "{line} not in {errors:?}"
        );
    }
}

#[test]
fn the_root_id_chooses_the_filter_and_its_configuration_contract() {
    let host = Host::new();
    // The rate limiter's configuration is the rate limiter's under root_id rate_limit ...
    let vm = host
        .vm_from_path(suite_path())
        .root_id("rate_limit")
        .vm_id("keel")
        .config(RATE_LIMIT)
        .start()
        .unwrap();
    assert!(vm.configured(), "{:?}", vm.logs());
    assert!(vm.has_log("keel rate_limit: configured policies: per-key"));
    let admitted = (0..5)
        .filter(|_| {
            let s = vm.send_request(request("GET", "/").with("x-api-key", "a"));
            s.local_reply().is_none()
        })
        .count();
    assert_eq!(admitted, 2);
    // ... and refused by the breaker under root_id circuit_breaker, which names its own field.
    let vm = host
        .vm_from_path(suite_path())
        .root_id("circuit_breaker")
        .vm_id("keel")
        .config(RATE_LIMIT)
        .start()
        .unwrap();
    assert!(!vm.configured());
    assert!(
        vm.has_log("keel circuit_breaker: policies: unknown field"),
        "{:?}",
        vm.logs()
    );
}
