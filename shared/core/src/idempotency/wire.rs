//! The idempotency filter's configuration as written: serde structs that mirror the JSON
//! (`deny_unknown_fields`), each field read with the kit's field types
//! ([`crate::config::fields`]) so that its own rule is checked, at its path, while the JSON is
//! read. The `policy` module validates them into [`super::policy::IdempotencyPolicy`] values.

use super::policy::{
    FailureMode, StoreResponses, MAX_MAX_BODY, MAX_MAX_ENTRIES, MAX_MAX_REQUEST_BODY,
};
use crate::config::{Bounded, HeaderName, Name, PositiveDuration, Routes};
use crate::fleet::RedisSpec;
use alloc::string::String;
use alloc::vec::Vec;
use serde::Deserialize;

/// The JSON document: `{"policies": [...]}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySpec {
    /// The policies; for a request the first that applies to its route wins.
    pub policies: Vec<PolicySpec>,
}

/// One policy as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Names metrics and shared-data keys.
    pub name: Name,
    /// Envoy route names; absent: all routes.
    #[serde(default)]
    pub routes: Option<Routes>,
    /// Methods a key applies to.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// The key's request header.
    #[serde(default)]
    pub header: Option<HeaderName>,
    /// The longest accepted key.
    #[serde(default)]
    pub max_key_length: Option<Bounded<1, 4096>>,
    /// Whether a request of `methods` without a key is refused with `400`.
    #[serde(default)]
    pub required: bool,
    /// The client identity selector that scopes keys.
    #[serde(default)]
    pub client: Option<String>,
    /// Request headers that are part of the fingerprint.
    #[serde(default)]
    pub fingerprint_headers: Vec<HeaderName>,
    /// How long a completed answer is kept.
    #[serde(default)]
    pub ttl: Option<PositiveDuration>,
    /// How long an unfinished request holds its key.
    #[serde(default)]
    pub in_flight_timeout: Option<PositiveDuration>,
    /// The `Retry-After` of a `409`.
    #[serde(default)]
    pub retry_after: Option<PositiveDuration>,
    /// Largest stored response body, bytes.
    #[serde(default)]
    pub max_body: Option<Bounded<0, MAX_MAX_BODY>>,
    /// Largest request body read for the fingerprint, bytes.
    #[serde(default)]
    pub max_request_body: Option<Bounded<0, MAX_MAX_REQUEST_BODY>>,
    /// `all` (default) or `success` (2xx only).
    #[serde(default)]
    pub store_responses: Option<StoreResponses>,
    /// Where records live.
    #[serde(default)]
    pub store: Option<StoreSpec>,
    /// `allow` (default) or `deny` when the store fails.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// The marker header set on replays.
    #[serde(default)]
    pub replay_header: Option<HeaderName>,
}

/// Where records live: exactly one member.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Per Envoy process.
    #[serde(default)]
    pub shared_data: Option<SharedDataSpec>,
    /// Fleet-wide, Redis through Webdis (the fleet store's fields: `cluster`, `authority`,
    /// `timeout`).
    #[serde(default)]
    pub redis: Option<RedisSpec>,
}

/// The shared-data store's bounds.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SharedDataSpec {
    /// Records kept; the oldest is reused first.
    #[serde(default)]
    pub max_entries: Option<Bounded<1, { MAX_MAX_ENTRIES as u64 }>>,
    /// Bytes all records may use together.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}
