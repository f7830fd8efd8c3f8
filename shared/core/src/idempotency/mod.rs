//! Idempotency keys at the proxy: a repeated request has the effect of the first.
//!
//! The pure core of `keel_idempotency.wasm`, after the IETF draft
//! draft-ietf-httpapi-idempotency-key-header-07 and Stripe's API. A client sends an
//! `Idempotency-Key`; the first request with a key is recorded as in flight and goes upstream;
//! its answer is stored with the request's fingerprint; a repeat with the same fingerprint gets
//! the stored answer (marked `idempotent-replayed: true`) without reaching the upstream; a
//! repeat while the first is in flight gets `409` with `Retry-After` (the draft's MUST); the
//! same key with another request gets `422`; a missing key where one is required gets `400`.
//!
//! - [`wire`]: the JSON configuration as written.
//! - [`policy`]: its validation into policies, with field-path errors.
//! - [`record`]: a key's record (in flight, completed), its binary layout, the request
//!   fingerprint, the scoped key (policy, route, client identity) and [`decide`].
//! - [`ring`]: the per-process store in shared data: a fixed ring of slots, oldest reused first,
//!   with a directory of buckets; bounded in keys and bytes whatever the number of keys.
//! - [`redis`]: the fleet-wide store: one Redis key per scoped key through Webdis (`SET NX PX`
//!   claims, `SET PX` answers, `GET` for repeats), decided by the same [`decide`].
//!
//! Invariants: a key's record is found only with both 64-bit hashes of its scoped key; a
//! record counts only until its `expires_at`; the shared-data store never holds more than
//! [`SharedRing::max_keys`] keys and [`SharedRing::max_bytes`] bytes.

pub mod policy;
pub mod record;
pub mod redis;
pub mod ring;
pub mod wire;

pub use policy::{FailureMode, IdempotencyPolicy, Store, StoreResponses};
pub use record::{
    decide, problem, Decision, Fingerprint, Record, ScopedKey, State, StoredResponse,
};
pub use ring::{Begin, Completion, RingError, SharedRing, Ticket};
pub use wire::IdempotencySpec;

impl crate::routes::Routed for IdempotencyPolicy {
    fn routes(&self) -> Option<&[alloc::string::String]> {
        self.routes.as_deref()
    }
}
