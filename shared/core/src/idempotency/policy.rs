//! The idempotency filter's configuration: JSON in, validated [`IdempotencyPolicy`] values out.
//!
//! ```json
//! {"policies": [{"name": "orders", "routes": ["orders"], "required": true,
//!   "client": "header:x-api-key", "ttl": "24h", "in_flight_timeout": "30s",
//!   "store": {"shared_data": {"max_entries": 1024}}}]}
//! ```
//!
//! Serde structs mirror the JSON (`deny_unknown_fields`); `config::load::<Vec<IdempotencyPolicy>>`
//! reads them and turns them into typed values, each error naming its field path (`policies[0].ttl: expected a duration ...`). The
//! full reference is `docs/config/idempotency.md`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::Deserialize;

use super::wire::{IdempotencySpec, PolicySpec, SharedDataSpec, StoreSpec};
use crate::config::{validate_each, ConfigError, FieldPath, HeaderName, Selector, Validate};
use crate::fleet::RedisStore;
use crate::time::Duration;

/// The default key header (IETF draft-ietf-httpapi-idempotency-key-header).
pub const DEFAULT_HEADER: &str = "idempotency-key";
/// The default longest key, as Stripe's.
pub const DEFAULT_MAX_KEY_LENGTH: usize = 255;
/// The default methods a key applies to: the draft's non-idempotent ones.
pub const DEFAULT_METHODS: [&str; 2] = ["POST", "PATCH"];
/// The default time a completed answer is kept: 24 h, as Stripe's.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The default time an unfinished request holds its key.
pub const DEFAULT_IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(60);
/// The default largest stored response body: 64 KiB.
pub const DEFAULT_MAX_BODY: u64 = 64 * 1024;
/// The largest `max_body`: 1 MiB (a stored answer is copied through a VM per replay).
pub const MAX_MAX_BODY: u64 = 1024 * 1024;
/// The largest request body the filter reads to fingerprint (and holds while it decides).
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// The largest `max_request_body`: 16 MiB, held while the filter decides.
pub const MAX_MAX_REQUEST_BODY: u64 = 16 * 1024 * 1024;
/// The default number of records of the shared-data store.
pub const DEFAULT_MAX_ENTRIES: u32 = 1024;
/// The largest number of records of the shared-data store.
pub const MAX_MAX_ENTRIES: u32 = 1 << 20;
/// The bytes a record may use for its stored response headers.
pub const MAX_STORED_HEADER_BYTES: usize = 8 * 1024;
/// The smallest record budget (`max_bytes / max_entries`).
pub const MIN_RECORD_BYTES: u64 = 1024;
/// The default `Retry-After` of a `409` (capped by what is left of the in-flight timeout).
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Which responses are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreResponses {
    /// Every final response, 5xx included (Stripe's behaviour).
    All,
    /// Only 2xx; any other answer releases the key.
    Success,
}

impl StoreResponses {
    /// Whether a response of `status` is stored.
    pub fn stores(self, status: u16) -> bool {
        match self {
            StoreResponses::All => true,
            StoreResponses::Success => (200..300).contains(&status),
        }
    }
}

/// What a failing store does to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Send it upstream untracked.
    Allow,
    /// Refuse it with `503`.
    Deny,
}

/// A validated store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Store {
    /// Per process: at most `max_entries` records of at most `record_bytes` each.
    SharedData {
        /// Record slots.
        max_entries: u32,
        /// Bytes of all records.
        max_bytes: u64,
    },
    /// Redis through Webdis: the fleet store (cluster, authority, callout timeout).
    Redis(RedisStore),
}

impl Store {
    /// The largest encoded record this store keeps.
    pub fn record_budget(&self, max_body: u64) -> u64 {
        let full =
            max_body + super::record::RECORD_OVERHEAD as u64 + MAX_STORED_HEADER_BYTES as u64;
        match self {
            Store::SharedData {
                max_entries,
                max_bytes,
            } => full.min(max_bytes / u64::from((*max_entries).max(1))),
            Store::Redis(_) => full.min(super::redis::MAX_RECORD_BYTES as u64),
        }
    }
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyPolicy {
    /// The policy's name.
    pub name: String,
    /// Envoy route names; `None`: all.
    pub routes: Option<Vec<String>>,
    /// Upper-case methods.
    pub methods: Vec<String>,
    /// Lower-case key header.
    pub header: String,
    /// Longest key.
    pub max_key_length: usize,
    /// Missing key refused with `400`.
    pub required: bool,
    /// Client identity.
    pub client: Selector,
    /// Lower-case header names in the fingerprint.
    pub fingerprint_headers: Vec<String>,
    /// Completed answers' lifetime.
    pub ttl: Duration,
    /// In-flight records' lifetime.
    pub in_flight_timeout: Duration,
    /// `Retry-After` of a `409`.
    pub retry_after: Duration,
    /// Largest stored body.
    pub max_body: u64,
    /// Largest request body fingerprinted.
    pub max_request_body: u64,
    /// Which answers are stored.
    pub store_responses: StoreResponses,
    /// The store.
    pub store: Store,
    /// On store failure.
    pub failure_mode: FailureMode,
    /// Marker header of replays (lower case).
    pub replay_header: String,
}

impl IdempotencyPolicy {
    /// Whether `method` is one the key applies to.
    pub fn applies_to_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// The shared-data prefix of the policy: `keel/idempotency/<name>`.
    pub fn prefix(&self) -> String {
        format!("keel/idempotency/{}", self.name)
    }

    /// The largest encoded record kept.
    pub fn record_budget(&self) -> u64 {
        self.store.record_budget(self.max_body)
    }
}

impl Validate for Vec<IdempotencyPolicy> {
    type Wire = IdempotencySpec;
    /// Validates the document.
    fn validate(spec: &IdempotencySpec) -> Result<Vec<IdempotencyPolicy>, ConfigError> {
        validate_each(
            &FieldPath::root().field("policies"),
            "policy",
            &spec.policies,
            |p| p.name.as_str(),
            validate_policy,
        )
    }
}

fn validate_policy(path: &FieldPath, p: &PolicySpec) -> Result<IdempotencyPolicy, ConfigError> {
    let methods = match &p.methods {
        None => DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
        Some(list) if list.is_empty() => {
            return Err(path.field("methods").error("expected at least one method"))
        }
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(path.field("methods").index(i).error(format!(
                        "expected an HTTP method like \"POST\", got \"{m}\""
                    )));
                }
                out.push(m.to_ascii_uppercase());
            }
            out
        }
    };
    let header = p
        .header
        .as_ref()
        .map_or(DEFAULT_HEADER, HeaderName::as_str)
        .to_string();
    let max_key_length = p
        .max_key_length
        .map_or(DEFAULT_MAX_KEY_LENGTH, |n| n.get() as usize);
    let client = match &p.client {
        Some(s) => Selector::parse(&path.field("client"), s)?,
        None => Selector::Header("authorization".to_string()),
    };
    let fingerprint_headers = p
        .fingerprint_headers
        .iter()
        .map(|h| h.as_str().to_string())
        .collect();
    let ttl = p.ttl.map_or(DEFAULT_TTL, |d| d.0);
    let in_flight_timeout = p
        .in_flight_timeout
        .map_or(DEFAULT_IN_FLIGHT_TIMEOUT, |d| d.0);
    let retry_after = p.retry_after.map_or(DEFAULT_RETRY_AFTER, |d| d.0);
    let max_body = p.max_body.map_or(DEFAULT_MAX_BODY, |n| n.get());
    let max_request_body = p
        .max_request_body
        .map_or(DEFAULT_MAX_REQUEST_BODY, |n| n.get());
    let store_responses = p.store_responses.unwrap_or(StoreResponses::All);
    let failure_mode = p.failure_mode.unwrap_or(FailureMode::Allow);
    let replay_header = p
        .replay_header
        .as_ref()
        .map_or("idempotent-replayed", HeaderName::as_str)
        .to_string();
    let store = validate_store(&path.field("store"), p.store.as_ref(), max_body)?;
    Ok(IdempotencyPolicy {
        name: p.name.as_str().to_string(),
        routes: p.routes.as_ref().map(|r| r.names().to_vec()),
        methods,
        header,
        max_key_length,
        required: p.required,
        client,
        fingerprint_headers,
        ttl,
        in_flight_timeout,
        retry_after,
        max_body,
        max_request_body,
        store_responses,
        store,
        failure_mode,
        replay_header,
    })
}

fn validate_store(
    path: &FieldPath,
    spec: Option<&StoreSpec>,
    max_body: u64,
) -> Result<Store, ConfigError> {
    let default_shared = SharedDataSpec::default();
    let (shared, redis) = match spec {
        None => (Some(&default_shared), None),
        Some(s) => (s.shared_data.as_ref(), s.redis.as_ref()),
    };
    match (shared, redis) {
        (Some(s), None) => {
            let at = path.field("shared_data");
            let max_entries = s.max_entries.map_or(DEFAULT_MAX_ENTRIES, |n| n.get_u32());
            let full =
                max_body + super::record::RECORD_OVERHEAD as u64 + MAX_STORED_HEADER_BYTES as u64;
            let max_bytes = s
                .max_bytes
                .unwrap_or(u64::from(max_entries).saturating_mul(full));
            if max_bytes / u64::from(max_entries) < MIN_RECORD_BYTES {
                return Err(at.field("max_bytes").error(format!(
                    "leaves {} bytes per record ({max_bytes} / {max_entries} entries); at least {MIN_RECORD_BYTES}",
                    max_bytes / u64::from(max_entries)
                )));
            }
            Ok(Store::SharedData {
                max_entries,
                max_bytes,
            })
        }
        (None, Some(r)) => Ok(Store::Redis(RedisStore::from_spec(
            &path.field("redis"),
            r,
        )?)),
        _ => Err(path.error("expected exactly one of \"shared_data\" or \"redis\"")),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use alloc::vec;

    fn load(json: &str) -> Result<Vec<IdempotencyPolicy>, ConfigError> {
        crate::config::load(json.as_bytes())
    }

    #[test]
    fn defaults_follow_the_draft_and_stripe() {
        let p = load(r#"{"policies": [{"name": "orders"}]}"#)
            .unwrap()
            .remove(0);
        assert_eq!(p.methods, vec!["POST".to_string(), "PATCH".to_string()]);
        assert_eq!(p.header, "idempotency-key");
        assert_eq!(p.max_key_length, 255);
        assert!(!p.required);
        assert_eq!(p.ttl, Duration::from_secs(86_400));
        assert_eq!(p.max_body, 65_536);
        assert_eq!(p.store_responses, StoreResponses::All);
        assert_eq!(p.failure_mode, FailureMode::Allow);
        assert_eq!(p.client, Selector::Header("authorization".into()));
        assert_eq!(p.prefix(), "keel/idempotency/orders");
        match p.store {
            Store::SharedData { max_entries, .. } => assert_eq!(max_entries, 1024),
            other => panic!("{other:?}"),
        }
        assert!(p.record_budget() >= 65_536);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |json: &str| load(json).unwrap_err().to_string();
        assert!(err(r#"{"policies": [{"name": "a", "ttl": "soon"}]}"#)
            .starts_with("policies[0].ttl: expected a duration"));
        assert!(
            err(r#"{"policies": [{"name": "a", "methods": ["PO ST"]}]}"#)
                .starts_with("policies[0].methods[0]:")
        );
        assert!(err(r#"{"policies": [{"name": "a", "max_body": 9999999}]}"#)
            .starts_with("policies[0].max_body:"));
        assert!(err(
            r#"{"policies": [{"name": "a", "store": {"shared_data": {"max_entries": 0}}}]}"#
        )
        .starts_with("policies[0].store.shared_data.max_entries:"));
        assert!(err(
            r#"{"policies": [{"name": "a", "store": {"shared_data": {"max_entries": 10, "max_bytes": 100}}}]}"#
        )
        .starts_with("policies[0].store.shared_data.max_bytes:"));
        assert!(err(r#"{"policies": [{"name": "a", "store": {}}]}"#)
            .starts_with("policies[0].store: expected exactly one"));
        assert!(err(r#"{"policies": [{"name": "a", "client": "ip"}]}"#)
            .starts_with("policies[0].client:"));
        assert!(
            err(r#"{"policies": [{"name": "a", "store_responses": "ok"}]}"#)
                .starts_with("policies[0].store_responses:")
        );
        assert!(
            err(r#"{"policies": [{"name": "a", "failure_mode": "open"}]}"#)
                .starts_with("policies[0].failure_mode:")
        );
        assert!(err(r#"{"policies": [{"name": "a", "tll": "1s"}]}"#)
            .starts_with("policies[0].tll: unknown field"));
        assert!(err(r#"{"policies": []}"#).starts_with("policies: must list at least one policy"));
        assert!(
            err(r#"{"policies": [{"name": "a"}, {"name": "a"}]}"#).starts_with("policies[1].name:")
        );
    }

    #[test]
    fn a_small_byte_budget_caps_each_record() {
        let p = load(
            r#"{"policies": [{"name": "a", "store": {"shared_data": {"max_entries": 100, "max_bytes": 409600}}}]}"#,
        )
        .unwrap()
        .remove(0);
        assert_eq!(p.record_budget(), 4096);
        let r = load(r#"{"policies": [{"name": "a", "store": {"redis": {"cluster": "webdis"}}}]}"#)
            .unwrap()
            .remove(0);
        assert!(matches!(r.store, Store::Redis(_)));
        assert!(r.record_budget() <= super::super::redis::MAX_RECORD_BYTES as u64);
        let e = load(r#"{"policies": [{"name": "a", "store": {"redis": {"cluster": "webdis", "timeout": "1m"}}}]}"#)
            .unwrap_err();
        assert_eq!(e.path, "policies[0].store.redis.timeout");
        let e = load(
            r#"{"policies": [{"name": "a", "store": {"redis": {"cluster": "w", "tls": true}}}]}"#,
        )
        .unwrap_err();
        assert!(e.path.starts_with("policies[0].store.redis"), "{}", e.path);
    }
}
