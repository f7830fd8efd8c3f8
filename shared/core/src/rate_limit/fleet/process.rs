//! One process's side of a fleet limit, run against its shared data: a request's take, the
//! refresher's look at its active slots, and applying answers. Everything the filter's glue
//! and the tests run is here, so the two run the same code.
//!
//! Keys, under the policy's prefix `keel/rate_limit/<policy>/`:
//!
//! | key | value |
//! |---|---|
//! | `lease/<slot>` | a [`LeaseSlot`], one per slot of the policy's `max_keys` |
//! | `active` | the refresher's list ([`lease::active`]) |
//! | `store` | the store's health ([`health`]) |

use alloc::string::String;
use alloc::vec::Vec;

use super::health::{self, Transition};
use super::lease::{self, active, Applied, Ask, LeaseRules, LeaseSlot, Take};
use super::remote::BucketGrant;
use crate::rate_limit::{slot_key, Claim, KeyTable};
use crate::store::{update, SharedStore, UpdateError};
use crate::time::Instant;

/// The shared-data key of lease slot `slot`.
pub fn lease_key(prefix: &str, slot: u32) -> String {
    let mut base = String::from(prefix.trim_end_matches('/'));
    base.push_str("/lease");
    slot_key(&base, slot)
}

/// The shared-data key of the refresher's list.
pub fn active_key(prefix: &str) -> String {
    let mut key = String::from(prefix.trim_end_matches('/'));
    key.push_str("/active");
    key
}

/// The shared-data key of the store's health.
pub fn health_key(prefix: &str) -> String {
    let mut key = String::from(prefix.trim_end_matches('/'));
    key.push_str("/store");
    key
}

/// Creates every lease slot, the list and the health before traffic (Envoy's shared data
/// cannot create a key only if absent: only writes to existing keys are exact).
pub fn prepare<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    table: &KeyTable,
) -> Result<(), crate::store::StoreError> {
    for slot in 0..table.slots() {
        let key = lease_key(prefix, slot);
        if store.get(&key)?.is_none() {
            store.set(&key, KeyTable::EMPTY_SLOT, None)?;
        }
    }
    for key in [active_key(prefix), health_key(prefix)] {
        if store.get(&key)?.is_none() {
            store.set(&key, &[], None)?;
        }
    }
    Ok(())
}

/// A call this process must send for one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refill {
    /// The slot.
    pub slot: u32,
    /// The key holding it.
    pub holder: u64,
    /// The holder's limiter index.
    pub limiter: u64,
    /// When the call was planned (the slot's pending mark).
    pub sent: Instant,
    /// What to ask and give back.
    pub ask: Ask,
}

/// A request's outcome with where it was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The outcome (never [`Take::Occupied`]).
    pub take: Take,
    /// The slot.
    pub slot: u32,
    /// With [`Take::Wait`] `send`: the call the request must send.
    pub refill: Option<Refill>,
}

/// Applies a request of key `fp` (limiter index `limiter`) at `now`: the walk of the policy's
/// table over its lease slots, one compare-and-swap per slot tried. A key that claims a slot,
/// or whose slot the refresher dropped while it was idle, joins the refresher's list.
#[allow(clippy::too_many_arguments)] // One request's context plus where its slots are.
pub fn acquire<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    table: &KeyTable,
    fp: u64,
    limiter: u64,
    now: Instant,
    rules: &LeaseRules,
    attempts: u32,
) -> Result<Taken, UpdateError> {
    for (slot, claim) in table.steps(fp) {
        let (take, joins, written) = update(store, &lease_key(prefix, slot), attempts, |old| {
            let (next, take, joins) = lease::take(old, fp, limiter, now, claim, rules);
            (next.map(|s| s.encode()), (take, joins, next))
        })?;
        if take == Take::Occupied {
            continue;
        }
        if joins {
            // A key that claims a slot, or comes back to one the refresher dropped while it
            // was idle, joins the list. Best effort: a full or contended list only means the
            // refresher does not refill this key ahead of need; its requests still send their
            // own calls.
            let _ = update(store, &active_key(prefix), attempts, |old| {
                (active::add(old, slot, table.slots() as usize), ())
            });
        }
        let refill = match (take, written) {
            (Take::Wait { send: true }, Some(s)) => Some(Refill {
                slot,
                holder: s.holder,
                limiter: s.limiter,
                sent: lease::mark(now),
                ask: lease::plan_for_request(&s, now, rules),
            }),
            _ => None,
        };
        return Ok(Taken { take, slot, refill });
    }
    // The walk's last step shares, so it always decides.
    Err(UpdateError::Host)
}

/// Looks again for a request of key `fp` that waits on `slot` (already counted in its demand):
/// a token, a refusal, still waiting, or a call it must now send (the one it waited for was
/// answered, and the tokens went to other requests).
#[allow(clippy::too_many_arguments)] // As `acquire`.
pub fn retake<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    slot: u32,
    fp: u64,
    limiter: u64,
    now: Instant,
    rules: &LeaseRules,
    attempts: u32,
) -> Result<Taken, UpdateError> {
    let (take, written) = update(store, &lease_key(prefix, slot), attempts, |old| {
        let (next, take, _) = lease::take_again(old, fp, limiter, now, Claim::OrShare, rules, 0);
        (next.map(|s| s.encode()), (take, next))
    })?;
    let refill = match (take, written) {
        (Take::Wait { send: true }, Some(s)) => Some(Refill {
            slot,
            holder: s.holder,
            limiter: s.limiter,
            sent: lease::mark(now),
            ask: lease::plan_for_request(&s, now, rules),
        }),
        _ => None,
    };
    Ok(Taken { take, slot, refill })
}

/// The refresher's tick for one policy: plans every slot of the list (`rules_of` gives each
/// holder's rules by limiter index), marks the calls pending, drops idle slots from the list
/// (a dropped slot's next request puts it back). With `probe` (the store is down) calls in
/// flight do not hold a slot's call back ([`lease::plan`]).
pub fn refresh<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    now: Instant,
    rules_of: impl Fn(u64) -> LeaseRules,
    probe: bool,
    attempts: u32,
) -> Result<Vec<Refill>, UpdateError> {
    let list = store
        .get(&active_key(prefix))
        .map_err(|_| UpdateError::Host)?
        .map(|(bytes, _)| active::decode(&bytes))
        .unwrap_or_default();
    let mut calls = Vec::new();
    let mut gone = Vec::new();
    for slot in list {
        let planned = update(store, &lease_key(prefix, slot), attempts, |old| {
            let limiter = old.and_then(LeaseSlot::decode).map_or(0, |s| s.limiter);
            let plan = lease::plan(old, now, &rules_of(limiter), probe);
            (
                plan.slot.map(|s| s.encode()),
                (plan, old.and_then(LeaseSlot::decode)),
            )
        });
        let Ok((plan, before)) = planned else {
            continue;
        };
        if plan.drop {
            gone.push(slot);
        }
        if let (Some(ask), Some(s)) = (plan.call, plan.slot.or(before)) {
            calls.push(Refill {
                slot,
                holder: s.holder,
                limiter: s.limiter,
                sent: lease::mark(now),
                ask,
            });
        }
    }
    if !gone.is_empty() {
        let _ = update(store, &active_key(prefix), attempts, |old| {
            (active::remove(old, &gone), ())
        });
        // A request may have put a slot back between its plan and the list's update (it saw
        // the slot dropped and added it to the list, which the update above then removed it
        // from): put those back.
        let max = usize::try_from(u32::MAX).unwrap_or(usize::MAX);
        for slot in gone {
            let back = store
                .get(&lease_key(prefix, slot))
                .ok()
                .flatten()
                .and_then(|(bytes, _)| LeaseSlot::decode(&bytes))
                .is_some_and(|s| s.holder != 0 && !s.dropped);
            if back {
                let _ = update(store, &active_key(prefix), attempts, |old| {
                    (active::add(old, slot, max), ())
                });
            }
        }
    }
    Ok(calls)
}

/// Applies the answer to `refill` at `now`.
pub fn answered<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    refill: &Refill,
    grant: &BucketGrant,
    now: Instant,
    rules: &LeaseRules,
    attempts: u32,
) -> Result<Applied, UpdateError> {
    update(store, &lease_key(prefix, refill.slot), attempts, |old| {
        let (next, applied) = lease::apply(
            old,
            refill.holder,
            refill.sent,
            refill.ask,
            grant,
            now,
            rules,
        );
        (next.map(|s| s.encode()), applied)
    })
}

/// The store failed for `refill`'s key alone at `now` (its place in the answer holds an error):
/// marks the slot failed, so that its requests take `on_store_error` without a call until a
/// later call succeeds. Whether the key was not failed before (log the change once).
pub fn key_failed<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    refill: &Refill,
    now: Instant,
    attempts: u32,
) -> Result<bool, UpdateError> {
    update(store, &lease_key(prefix, refill.slot), attempts, |old| {
        let (next, newly) = lease::key_failed(old, refill.holder, refill.sent, now);
        (next.map(|s| s.encode()), newly)
    })
}

/// A failed call for `refill`: clears its pending mark.
pub fn call_failed<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    refill: &Refill,
    attempts: u32,
) -> Result<(), UpdateError> {
    update(store, &lease_key(prefix, refill.slot), attempts, |old| {
        (
            lease::failed(old, refill.holder, refill.sent).map(|s| s.encode()),
            (),
        )
    })
}

/// Records a call's outcome in the store's health; the transition, if this write made one.
pub fn record_health<S: SharedStore + ?Sized>(
    store: &S,
    prefix: &str,
    ok: bool,
    now: Instant,
    attempts: u32,
) -> Result<Option<Transition>, UpdateError> {
    update(store, &health_key(prefix), attempts, |old| {
        let (next, transition) = health::record(old, ok, now);
        (next.map(|h| h.encode()), transition)
    })
}

/// Whether the store is down for this process.
pub fn store_down<S: SharedStore + ?Sized>(store: &S, prefix: &str) -> bool {
    store
        .get(&health_key(prefix))
        .ok()
        .flatten()
        .is_some_and(|(bytes, _)| health::is_down(Some(&bytes)))
}
