//! A process's lease of one key's tokens, kept in shared data for all its workers.
//!
//! Every worker serves requests from the slot with one compare-and-swap ([`take`]), as the local
//! limiter does. The process's refresher (one VM, elected) refills slots ahead of need on its
//! tick ([`plan`] then [`apply`]); a request that finds the slot empty with nothing in flight
//! sends the call itself and waits for its answer ([`Take::Wait`] with `send`), bounded by the
//! callout timeout.
//!
//! # Layout
//!
//! `keel/rate_limit/<policy>/lease/<slot>`: fourteen little-endian u64 words, 112 bytes.
//!
//! | word | field |
//! |---|---|
//! | 0 | `holder`: fingerprint of the key (0: empty slot) |
//! | 1 | `tokens`: tokens of the lease left |
//! | 2 | `expires`: instant after which `tokens` may not be used (ns) |
//! | 3 | `demand`: requests that came to the slot since the refresher last looked |
//! | 4 | `asked`: tokens asked by the last call |
//! | 5 | `granted`: tokens granted by the last answer |
//! | 6 | `remote`: whole tokens left in the fleet's bucket at the last answer |
//! | 7 | `full_at`: when the fleet's bucket is full again, from the last answer (ns) |
//! | 8 | `pending`: when the call in flight was sent (ns; 0: none) |
//! | 9 | `looked`: when the refresher last measured `demand` (ns) |
//! | 10 | `answered`: when the last answer came (ns; 0: never) |
//! | 11 | `limiter`: which of the policy's limiters (0: its own, `i + 1`: tier `i`) |
//! | 12 | `failed`: when the store last failed for this key alone (ns; 0: it did not) |
//! | 13 | `dropped`: 1 once the refresher dropped the idle slot from its list, until its key's next request |
//!
//! # The lease rule
//!
//! With refill period `P` (the refresher's tick), the refresher measures the slot's demand
//! rate `d` (requests per second that came to it, served or not) and sets the target
//! `L = min(max_lease, ceil(2 * d * P))`: enough for two periods of the process's own traffic,
//! so a process with most of the traffic asks for and gets most of the limit. It asks
//! `L - tokens` once `tokens <= L / 2`. A slot without demand for a whole period gives its
//! tokens back and leaves the refresher's list. Tokens not used by `expires` (`lease_ttl` after
//! the last grant) are given back by the next call and are never used.
//!
//! # Bounds
//!
//! Redis grants atomically from one bucket, so the fleet admits at most what the bucket
//! granted, net of what was given back: from a full bucket with no leases out, at most
//! `burst + rate * t` in the first `t`, exactly. Over any other span the leases already held at
//! its start add to that. Each call asks at most `max_lease - tokens`, and a second call for a
//! slot is sent only once the first is older than the timeout (its answer may still come: the
//! refresher's calls are given a longer callout timeout than requests wait, so that the tokens
//! Redis granted are not lost to a slow answer); an answer never raises a slot above
//! `2 * max_lease`. So the worst case over any span is
//! `burst + rate * span + 2 * processes * max_lease` (with one call at a time, as on an idle
//! machine, `processes * max_lease`).

use alloc::vec::Vec;

use super::remote::BucketGrant;
use crate::codec::{Reader, Writer};
use crate::rate_limit::Claim;
use crate::time::{Duration, Instant};

/// Size of an encoded slot.
pub const LEN: usize = 112;

/// One key's lease in one process (see the module docs for the layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseSlot {
    /// The key's fingerprint; 0 for an empty slot.
    pub holder: u64,
    /// Tokens left.
    pub tokens: u64,
    /// After this instant `tokens` may not be used.
    pub expires: Instant,
    /// Requests since the refresher last looked.
    pub demand: u64,
    /// Tokens asked by the last call.
    pub asked: u64,
    /// Tokens granted by the last answer.
    pub granted: u64,
    /// Whole tokens left in the fleet's bucket at the last answer.
    pub remote: u64,
    /// When the fleet's bucket is full again.
    pub full_at: Instant,
    /// When the call in flight was sent; zero when none.
    pub pending: Instant,
    /// When the refresher last measured `demand`.
    pub looked: Instant,
    /// When the last answer came; zero when never.
    pub answered: Instant,
    /// The holder's limiter (`RateLimitPolicy::limiter_index`).
    pub limiter: u64,
    /// When the store last failed for this key alone ([`key_failed`]); zero when it did not
    /// since its last grant.
    pub failed: Instant,
    /// Whether the refresher dropped the slot from its list (it was idle): the key's next
    /// request puts it back (see [`take`]).
    pub dropped: bool,
}

impl LeaseSlot {
    /// Encodes as [`LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(LEN);
        for word in [
            self.holder,
            self.tokens,
            self.expires.as_nanos(),
            self.demand,
            self.asked,
            self.granted,
            self.remote,
            self.full_at.as_nanos(),
            self.pending.as_nanos(),
            self.looked.as_nanos(),
            self.answered.as_nanos(),
            self.limiter,
            self.failed.as_nanos(),
            u64::from(self.dropped),
        ] {
            w = w.u64(word);
        }
        w.finish()
    }

    /// Decodes; `None` unless exactly [`LEN`] bytes (an empty or foreign slot).
    pub fn decode(bytes: &[u8]) -> Option<LeaseSlot> {
        let mut r = Reader::new(bytes);
        let mut word = || r.u64();
        let slot = LeaseSlot {
            holder: word()?,
            tokens: word()?,
            expires: Instant::from_nanos(word()?),
            demand: word()?,
            asked: word()?,
            granted: word()?,
            remote: word()?,
            full_at: Instant::from_nanos(word()?),
            pending: Instant::from_nanos(word()?),
            looked: Instant::from_nanos(word()?),
            answered: Instant::from_nanos(word()?),
            limiter: word()?,
            failed: Instant::from_nanos(word()?),
            dropped: word()? != 0,
        };
        r.end()?;
        Some(slot)
    }

    /// Tokens that may still be used at `now`.
    pub fn usable(&self, now: Instant) -> u64 {
        if now < self.expires {
            self.tokens
        } else {
            0
        }
    }

    /// Whether a call is in flight at `now` (sent less than `timeout` ago).
    pub fn in_flight(&self, now: Instant, timeout: Duration) -> bool {
        self.pending != Instant::ZERO && now < self.pending.saturating_add(timeout)
    }

    /// Whether another key may take the slot over: no tokens to use, nothing in flight, no
    /// demand since the refresher last looked.
    pub fn is_idle(&self, now: Instant, timeout: Duration) -> bool {
        self.usable(now) == 0 && !self.in_flight(now, timeout) && self.demand == 0
    }
}

/// The parameters of the lease rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRules {
    /// The refresher's period `P`.
    pub refill: Duration,
    /// The most tokens a slot holds.
    pub max_lease: u64,
    /// How long granted tokens may be used.
    pub lease_ttl: Duration,
    /// The callout timeout: a call older than this is lost.
    pub timeout: Duration,
    /// The time one token takes to come back in the fleet's bucket (`period / requests`).
    pub interval: Duration,
}

/// What a request got from its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// A token of the lease: admitted.
    Granted {
        /// The fleet's remaining tokens as far as this process knows: its lease plus the
        /// bucket's remainder at the last answer.
        remaining: u64,
        /// Until the fleet's bucket is full again, at the last answer.
        reset: Duration,
    },
    /// No token yet, and the fleet may have some: wait for an answer. With `send`, no call is
    /// in flight and the caller must send one ([`plan_for_request`]; the slot is marked
    /// pending).
    Wait {
        /// Whether this caller sends the call.
        send: bool,
    },
    /// The fleet's bucket ran short at the last answer: refused.
    Empty {
        /// Until one token is back in the fleet's bucket.
        retry_after: Duration,
        /// Until the fleet's bucket is full again.
        reset: Duration,
    },
    /// Another key holds the slot and is active: try the next candidate.
    Occupied,
    /// The store failed for this key alone at its last answer, less than two refill periods
    /// ago (a key of another type in Redis): the request takes the policy's `on_store_error` at
    /// once, without a call; the refresher's calls probe the key.
    KeyFailed,
}

/// Applies one request of key `fp` at `now` to a slot whose stored value is `bytes`, as far as
/// `claim` allows (the walk of [`KeyTable::steps`](crate::rate_limit::KeyTable::steps)). Returns the
/// slot to write (`None`: unchanged), the outcome, and whether the slot joins the refresher's
/// list (the caller then adds it): the key claimed it anew, or the refresher had dropped it
/// while it was idle. `limiter` is the key's limiter index, recorded when the key claims the
/// slot.
pub fn take(
    bytes: Option<&[u8]>,
    fp: u64,
    limiter: u64,
    now: Instant,
    claim: Claim,
    rules: &LeaseRules,
) -> (Option<LeaseSlot>, Take, bool) {
    take_again(bytes, fp, limiter, now, claim, rules, 1)
}

/// [`take`] for a request already counted in the slot's demand (`demand` 0: one that waited
/// and looks again).
pub fn take_again(
    bytes: Option<&[u8]>,
    fp: u64,
    limiter: u64,
    now: Instant,
    claim: Claim,
    rules: &LeaseRules,
    demand: u64,
) -> (Option<LeaseSlot>, Take, bool) {
    let stored = bytes.and_then(LeaseSlot::decode);
    let (mut slot, claimed) = match stored {
        Some(s) if s.holder == fp => (s, false),
        Some(s) if s.holder != 0 && !s.is_idle(now, rules.timeout) => {
            if claim != Claim::OrShare {
                return (None, Take::Occupied, false);
            }
            (s, false)
        }
        Some(s) if s.holder != 0 && claim == Claim::OwnOrEmpty => {
            return (None, Take::Occupied, false);
        }
        _ => (
            LeaseSlot {
                holder: fp,
                looked: now,
                limiter,
                ..LeaseSlot::default()
            },
            true,
        ),
    };
    let joins = claimed || slot.dropped;
    if slot.dropped {
        // Back from idle: the refresher dropped the slot from its list (its demand had
        // stopped); it measures the demand from now on, and refills ahead of need again.
        slot.dropped = false;
        slot.looked = now;
        slot.demand = 0;
    }
    let claimed = joins;
    slot.demand = slot.demand.saturating_add(demand);
    let reset = slot.full_at.saturating_since(now);
    let usable = slot.usable(now);
    if usable > 0 {
        slot.tokens = usable - 1;
        let remaining = slot.tokens.saturating_add(slot.remote);
        return (Some(slot), Take::Granted { remaining, reset }, claimed);
    }
    if slot.failed != Instant::ZERO
        && now < slot.failed.saturating_add(rules.refill.saturating_mul(2))
    {
        return (Some(slot), Take::KeyFailed, claimed);
    }
    if slot.in_flight(now, rules.timeout) {
        return (Some(slot), Take::Wait { send: false }, claimed);
    }
    // Short at the last answer, and that answer is recent: the fleet has nothing to give
    // before the refresher's next look.
    let recent = slot.answered != Instant::ZERO
        && now < slot.answered.saturating_add(rules.refill.saturating_mul(2));
    if recent && slot.granted < slot.asked {
        let retry_after = rules.interval;
        return (Some(slot), Take::Empty { retry_after, reset }, claimed);
    }
    slot.pending = mark(now);
    (Some(slot), Take::Wait { send: true }, claimed)
}

/// The instant recorded as a pending or answered mark at `now`: never zero, which means
/// "none" in the layout (a virtual clock may start at zero).
pub fn mark(now: Instant) -> Instant {
    now.max(Instant::from_nanos(1))
}

/// A call to make for one slot: tokens to ask for and to give back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// Tokens asked for.
    pub ask: u64,
    /// Tokens given back.
    pub back: u64,
}

/// What the refresher does with one slot on its tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The slot to write (`None`: unchanged).
    pub slot: Option<LeaseSlot>,
    /// The call to send, if any (the slot is then marked pending).
    pub call: Option<Ask>,
    /// The slot is idle and empty: drop it from the refresher's list.
    pub drop: bool,
}

/// The target lease for a demand of `demand` requests over `elapsed`: two periods of it,
/// at most `max_lease`.
pub fn target(demand: u64, elapsed: Duration, rules: &LeaseRules) -> u64 {
    let elapsed = elapsed.as_nanos().max(1);
    let want = (u128::from(demand) * 2 * u128::from(rules.refill.as_nanos()))
        .div_ceil(u128::from(elapsed));
    u64::try_from(want)
        .unwrap_or(u64::MAX)
        .min(rules.max_lease.max(1))
}

/// The refresher's look at one slot at `now` (see the module docs' lease rule). With `probe`
/// (the store is down for the process) a call in flight does not hold the look back: the
/// refresher's calls are the probes that bring the store back, and requests send none while
/// it is down.
pub fn plan(bytes: Option<&[u8]>, now: Instant, rules: &LeaseRules, probe: bool) -> Plan {
    let Some(mut slot) = bytes.and_then(LeaseSlot::decode) else {
        return Plan {
            slot: None,
            call: None,
            drop: true,
        };
    };
    if slot.holder == 0 {
        return Plan {
            slot: None,
            call: None,
            drop: true,
        };
    }
    if slot.in_flight(now, rules.timeout) && !probe {
        return Plan {
            slot: None,
            call: None,
            drop: false,
        };
    }
    let usable = slot.usable(now);
    let expired = slot.tokens - usable;
    let elapsed = now.saturating_since(slot.looked).max(rules.refill);
    let demand = slot.demand;
    slot.demand = 0;
    slot.looked = now;
    slot.pending = Instant::ZERO;
    let mut call = Ask {
        ask: 0,
        back: expired,
    };
    slot.tokens = usable;
    if demand == 0 {
        // Idle for a whole period: give everything back.
        call.back = slot.tokens.saturating_add(expired);
        slot.tokens = 0;
    } else {
        let want = target(demand, elapsed, rules);
        if usable.saturating_mul(2) <= want {
            call.ask = want - usable;
        }
    }
    let send = call.ask > 0 || call.back > 0;
    if send {
        slot.pending = mark(now);
    }
    let drop = demand == 0 && !send;
    if drop {
        slot.dropped = true;
    }
    Plan {
        slot: Some(slot),
        call: send.then_some(call),
        drop,
    }
}

/// The call a request sends after [`Take::Wait`] with `send`: the refresher's target from the
/// demand seen so far, at least 1 token.
pub fn plan_for_request(slot: &LeaseSlot, now: Instant, rules: &LeaseRules) -> Ask {
    let elapsed = now.saturating_since(slot.looked).max(rules.refill);
    let want = target(slot.demand, elapsed, rules).max(1);
    Ask {
        ask: want.saturating_sub(slot.usable(now)).max(1),
        back: slot.tokens - slot.usable(now),
    }
}

/// What an answer did to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The tokens joined the lease.
    Leased,
    /// The slot is held by another key now: the granted tokens are lost to this process (they
    /// were never used; Redis refills them in time).
    Lost,
    /// The tokens joined the lease, and the store answers again for a key it had failed for
    /// (see [`key_failed`]).
    Recovered,
}

/// Applies the answer `grant` to the call sent at `sent` for key `fp` asking `ask`. Returns
/// the slot to write (`None`: unchanged) and what happened.
pub fn apply(
    bytes: Option<&[u8]>,
    fp: u64,
    sent: Instant,
    ask: Ask,
    grant: &BucketGrant,
    now: Instant,
    rules: &LeaseRules,
) -> (Option<LeaseSlot>, Applied) {
    let Some(mut slot) = bytes.and_then(LeaseSlot::decode).filter(|s| s.holder == fp) else {
        return (None, Applied::Lost);
    };
    let usable = slot.usable(now);
    // Given-back tokens were taken out when the call was planned; expired ones are gone.
    slot.tokens = usable
        .saturating_add(grant.granted)
        .min(rules.max_lease.saturating_mul(2).max(usable));
    slot.expires = now.saturating_add(rules.lease_ttl);
    slot.asked = ask.ask;
    slot.granted = grant.granted;
    slot.remote = grant.remaining;
    slot.full_at = now.saturating_add(grant.full_in);
    slot.answered = mark(now);
    if slot.pending == sent {
        slot.pending = Instant::ZERO;
    }
    let applied = if slot.failed == Instant::ZERO {
        Applied::Leased
    } else {
        Applied::Recovered
    };
    slot.failed = Instant::ZERO;
    (Some(slot), applied)
}

/// The store failed for key `fp` alone (its place in the answer to the call sent at `sent`
/// holds an error, e.g. `WRONGTYPE`): marks the slot failed at `now` and clears the pending
/// mark. Returns the slot to write (`None`: the slot is another key's now) and whether the key
/// was not failed before (the caller logs the change once).
pub fn key_failed(
    bytes: Option<&[u8]>,
    fp: u64,
    sent: Instant,
    now: Instant,
) -> (Option<LeaseSlot>, bool) {
    let Some(mut slot) = bytes.and_then(LeaseSlot::decode).filter(|s| s.holder == fp) else {
        return (None, false);
    };
    let newly = slot.failed == Instant::ZERO;
    slot.failed = mark(now);
    if slot.pending == sent {
        slot.pending = Instant::ZERO;
    }
    (Some(slot), newly)
}

/// A failed call for key `fp` sent at `sent`: clears its pending mark so the next request or
/// tick sends again.
pub fn failed(bytes: Option<&[u8]>, fp: u64, sent: Instant) -> Option<LeaseSlot> {
    let mut slot = bytes
        .and_then(LeaseSlot::decode)
        .filter(|s| s.holder == fp)?;
    (slot.pending == sent).then(|| {
        slot.pending = Instant::ZERO;
        slot
    })
}

/// The refresher's list of a policy's active slots, `keel/rate_limit/<policy>/active`: slot
/// numbers as little-endian u32, in the order they joined.
pub mod active {
    use alloc::vec::Vec;

    /// Decodes the list (a trailing partial entry is ignored).
    pub fn decode(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| match c {
                [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
                _ => 0,
            })
            .collect()
    }

    /// Encodes the list.
    pub fn encode(slots: &[u32]) -> Vec<u8> {
        slots.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    /// The list with `slot` added (`None`: already there or the list has `max` entries).
    pub fn add(bytes: Option<&[u8]>, slot: u32, max: usize) -> Option<Vec<u8>> {
        let mut list = bytes.map(decode).unwrap_or_default();
        if list.contains(&slot) || list.len() >= max {
            return None;
        }
        list.push(slot);
        Some(encode(&list))
    }

    /// The list without `gone` (`None`: none of them were there).
    pub fn remove(bytes: Option<&[u8]>, gone: &[u32]) -> Option<Vec<u8>> {
        let list = bytes.map(decode).unwrap_or_default();
        let kept: Vec<u32> = list.iter().copied().filter(|s| !gone.contains(s)).collect();
        (kept.len() != list.len()).then(|| encode(&kept))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000)
    }

    const RULES: LeaseRules = LeaseRules {
        refill: Duration::from_millis(100),
        max_lease: 20,
        lease_ttl: Duration::from_secs(1),
        timeout: Duration::from_millis(100),
        interval: Duration::from_millis(10),
    };

    fn grant(granted: u64, remaining: u64) -> BucketGrant {
        BucketGrant {
            granted,
            remaining,
            full_in: Duration::from_millis(500),
        }
    }

    #[test]
    fn layout_round_trips() {
        let slot = LeaseSlot {
            holder: 1,
            tokens: 2,
            expires: ms(3),
            demand: 4,
            asked: 5,
            granted: 6,
            remote: 7,
            full_at: ms(8),
            pending: ms(9),
            looked: ms(10),
            answered: ms(11),
            limiter: 12,
            failed: ms(13),
            dropped: true,
        };
        let bytes = slot.encode();
        assert_eq!(bytes.len(), LEN);
        assert_eq!(LeaseSlot::decode(&bytes), Some(slot));
        assert_eq!(LeaseSlot::decode(&bytes[1..]), None);
        assert_eq!(LeaseSlot::decode(&[0]), None);
    }

    #[test]
    fn a_fresh_key_claims_the_slot_and_sends_one_call() {
        let (slot, take1, claimed) = take(Some(&[0]), 7, 0, ms(0), Claim::OwnOrEmpty, &RULES);
        assert_eq!(take1, Take::Wait { send: true });
        assert!(claimed);
        let bytes = slot.unwrap().encode();
        // A second request while the call is in flight waits without sending.
        let (slot, take2, claimed) = take(Some(&bytes), 7, 0, ms(5), Claim::OwnOrEmpty, &RULES);
        assert_eq!((take2, claimed), (Take::Wait { send: false }, false));
        let slot = slot.unwrap();
        assert_eq!(slot.demand, 2);
        let ask = plan_for_request(&slot, ms(5), &RULES);
        assert!(ask.ask >= 1 && ask.ask <= RULES.max_lease);
        let (slot, applied) = apply(
            Some(&slot.encode()),
            7,
            mark(ms(0)),
            ask,
            &grant(ask.ask, 50),
            ms(6),
            &RULES,
        );
        assert_eq!(applied, Applied::Leased);
        let slot = slot.unwrap();
        assert_eq!(slot.pending, Instant::ZERO);
        let (_, took, _) = take(Some(&slot.encode()), 7, 0, ms(7), Claim::OwnOrEmpty, &RULES);
        assert!(matches!(took, Take::Granted { remaining, .. } if remaining == ask.ask - 1 + 50));
    }

    #[test]
    fn a_short_answer_refuses_until_the_next_look_and_a_lost_call_is_resent() {
        let base = LeaseSlot {
            holder: 7,
            looked: ms(0),
            ..LeaseSlot::default()
        };
        let (slot, _) = apply(
            Some(&base.encode()),
            7,
            ms(0),
            Ask { ask: 10, back: 0 },
            &grant(0, 0),
            ms(10),
            &RULES,
        );
        let bytes = slot.unwrap().encode();
        let (_, t, _) = take(Some(&bytes), 7, 0, ms(20), Claim::OwnOrEmpty, &RULES);
        assert!(matches!(t, Take::Empty { retry_after, .. } if retry_after == RULES.interval));
        // Long after the short answer, a request asks again.
        let (_, t, _) = take(Some(&bytes), 7, 0, ms(300), Claim::OwnOrEmpty, &RULES);
        assert_eq!(t, Take::Wait { send: true });
        // A call that never came back stops counting as in flight after the timeout.
        let pending = LeaseSlot {
            pending: ms(50),
            ..base
        };
        assert!(pending.in_flight(ms(149), RULES.timeout));
        assert!(!pending.in_flight(ms(150), RULES.timeout));
        assert_eq!(
            failed(Some(&pending.encode()), 7, ms(50)).map(|s| s.pending),
            Some(Instant::ZERO)
        );
        assert_eq!(failed(Some(&pending.encode()), 7, ms(49)), None);
    }

    #[test]
    fn a_key_the_store_failed_for_falls_back_at_once_until_a_grant() {
        let sent = mark(ms(0));
        let base = LeaseSlot {
            holder: 7,
            looked: ms(0),
            pending: sent,
            ..LeaseSlot::default()
        };
        let (slot, newly) = key_failed(Some(&base.encode()), 7, sent, ms(5));
        let slot = slot.unwrap();
        assert!(newly);
        assert_eq!((slot.pending, slot.failed), (Instant::ZERO, ms(5)));
        // For two refill periods its requests take on_store_error without a call.
        let (_, t, _) = take(
            Some(&slot.encode()),
            7,
            0,
            ms(10),
            Claim::OwnOrEmpty,
            &RULES,
        );
        assert_eq!(t, Take::KeyFailed);
        let (_, t, _) = take(
            Some(&slot.encode()),
            7,
            0,
            ms(205),
            Claim::OwnOrEmpty,
            &RULES,
        );
        assert_eq!(t, Take::Wait { send: true });
        // Tokens still leased are used.
        let held = LeaseSlot {
            tokens: 1,
            expires: ms(1000),
            ..slot
        };
        let (_, t, _) = take(
            Some(&held.encode()),
            7,
            0,
            ms(10),
            Claim::OwnOrEmpty,
            &RULES,
        );
        assert!(matches!(t, Take::Granted { .. }));
        // A second failure is not a change; a grant ends it.
        let (again, newly) = key_failed(Some(&slot.encode()), 7, ms(99), ms(100));
        assert!(!newly);
        let (after, applied) = apply(
            Some(&again.unwrap().encode()),
            7,
            ms(99),
            Ask { ask: 5, back: 0 },
            &grant(5, 0),
            ms(120),
            &RULES,
        );
        assert_eq!(applied, Applied::Recovered);
        assert_eq!(after.unwrap().failed, Instant::ZERO);
        // The slot went to another key meanwhile: nothing to mark.
        assert_eq!(
            key_failed(Some(&base.encode()), 8, sent, ms(5)),
            (None, false)
        );
    }

    #[test]
    fn the_refresher_sizes_leases_to_demand_and_gives_back_when_idle() {
        let slot = LeaseSlot {
            holder: 7,
            tokens: 2,
            expires: ms(1000),
            demand: 50,
            looked: ms(0),
            ..LeaseSlot::default()
        };
        // 50 requests in 100 ms: two periods are 100 tokens, capped at max_lease.
        let p = plan(Some(&slot.encode()), ms(100), &RULES, false);
        assert_eq!(p.call, Some(Ask { ask: 18, back: 0 }));
        assert_eq!(p.slot.unwrap().demand, 0);
        assert_eq!(p.slot.unwrap().pending, mark(ms(100)));
        // 3 requests in 100 ms: target 6; 2 tokens left (<= 3): ask 4.
        let slot3 = LeaseSlot { demand: 3, ..slot };
        assert_eq!(
            plan(Some(&slot3.encode()), ms(100), &RULES, false).call,
            Some(Ask { ask: 4, back: 0 })
        );
        // Enough left: no call.
        let full = LeaseSlot { tokens: 5, ..slot3 };
        assert_eq!(
            plan(Some(&full.encode()), ms(100), &RULES, false).call,
            None
        );
        // No demand: everything goes back, then the slot leaves the list.
        let idle = LeaseSlot { demand: 0, ..slot };
        let p = plan(Some(&idle.encode()), ms(100), &RULES, false);
        assert_eq!(p.call, Some(Ask { ask: 0, back: 2 }));
        assert!(!p.drop);
        let after = LeaseSlot {
            pending: Instant::ZERO,
            ..p.slot.unwrap()
        };
        let p = plan(Some(&after.encode()), ms(300), &RULES, false);
        assert!(p.drop && p.call.is_none());
        // Expired tokens are given back and not used.
        let stale = LeaseSlot {
            expires: ms(50),
            ..slot
        };
        let p = plan(Some(&stale.encode()), ms(100), &RULES, false);
        assert_eq!(p.call.unwrap().back, 2);
        let (_, t, _) = take(
            Some(&stale.encode()),
            7,
            0,
            ms(60),
            Claim::OwnOrEmpty,
            &RULES,
        );
        assert_eq!(t, Take::Wait { send: true });
    }

    #[test]
    fn other_keys_share_only_when_told_and_take_over_idle_slots() {
        let busy = LeaseSlot {
            holder: 7,
            tokens: 3,
            expires: ms(1000),
            demand: 1,
            ..LeaseSlot::default()
        }
        .encode();
        assert_eq!(
            take(Some(&busy), 8, 0, ms(1), Claim::OwnOrEmpty, &RULES).1,
            Take::Occupied
        );
        assert_eq!(
            take(Some(&busy), 8, 0, ms(1), Claim::OrIdle, &RULES).1,
            Take::Occupied
        );
        let (slot, t, claimed) = take(Some(&busy), 8, 0, ms(1), Claim::OrShare, &RULES);
        assert!(matches!(t, Take::Granted { .. }) && !claimed);
        assert_eq!(slot.unwrap().holder, 7);
        let idle = LeaseSlot::decode(&busy)
            .map(|s| LeaseSlot {
                tokens: 0,
                demand: 0,
                ..s
            })
            .unwrap()
            .encode();
        assert_eq!(
            take(Some(&idle), 8, 0, ms(1), Claim::OwnOrEmpty, &RULES).1,
            Take::Occupied
        );
        let (slot, _, claimed) = take(Some(&idle), 8, 0, ms(1), Claim::OrIdle, &RULES);
        assert!(claimed);
        assert_eq!(slot.unwrap().holder, 8);
        // An answer for the old holder is lost.
        assert_eq!(
            apply(
                Some(&slot.unwrap().encode()),
                7,
                ms(0),
                Ask::default(),
                &grant(3, 0),
                ms(2),
                &RULES
            )
            .1,
            Applied::Lost
        );
    }

    #[test]
    fn the_active_list() {
        let one = active::add(None, 5, 4).unwrap();
        assert_eq!(active::add(Some(&one), 5, 4), None);
        let two = active::add(Some(&one), 9, 4).unwrap();
        assert_eq!(active::decode(&two), [5, 9]);
        assert_eq!(active::add(Some(&two), 1, 2), None);
        assert_eq!(
            active::decode(&active::remove(Some(&two), &[5]).unwrap()),
            [9]
        );
        assert_eq!(active::remove(Some(&two), &[3]), None);
    }
}
