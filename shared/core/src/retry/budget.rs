//! The retry budget: retries may add at most `ratio` of the requests plus `min_per_second`.
//!
//! Follows Finagle's `RetryBudget`, as ported to tower (`TpsBudget`) and used by Linkerd: every
//! request *deposits*, every retry *withdraws*, and a retry is allowed only while the balance
//! over the last `ttl` covers it. A constant reserve of `min_per_second * ttl` retries lets a
//! quiet service retry at all. Defaults are tower's and Linkerd's: `ttl` 10 s, 10 retries per
//! second, 20 %. Per-request attempt caps cannot stop a retry storm (every client retrying 3x
//! under an outage quadruples the load); a budget shared by the whole proxy can.
//!
//! Arithmetic is in integer *units*: a retry costs [`UNITS_PER_RETRY`] (a million), a request
//! deposits `round(ratio * 1_000_000)`, so the ratio is honoured to a millionth, without the
//! rounding of tower's `1 / ratio` withdrawal (0.3 would become a third there).
//!
//! The balance is kept in a ring of [`SLOTS`] slots of `ttl / 10` each; slot `e % 10` holds the
//! net units (deposits minus withdrawals) of the `e`-th slot period since the clock's origin.
//! Moving to a new period clears the slots that fell out of the window, so a deposit expires
//! between `0.9 ttl` and `ttl` after it was made.
//!
//! Invariant: at the moment of any withdrawal, the retries recorded in the window (the current
//! slot and the nine before it) are at most `ratio * requests + min_per_second * ttl`, counting
//! the requests recorded in the same window. Balances saturate instead of overflowing.
//!
//! # Shared-data layout (`keel/retry/<policy>/budget`, [`STATE_LEN`] = 96 bytes, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `u64` slot length in nanoseconds (`ttl / 10`); a different value means no state |
//! | 8 | 8 | `u64` epoch: the newest slot period, `now_nanos / slot length` |
//! | 16 | 80 | 10 x `i64` net balance of slot period `e` at index `e % 10`, in units |
//!
//! All worker threads update the one value through [`crate::store::update`]: deposits and
//! withdrawals are exact across workers. A value of another length or slot length decodes to
//! no state, and the budget starts empty (the reserve alone), never panicking.

use alloc::vec::Vec;
use core::fmt;

use crate::codec::{Reader, Writer};
use crate::store::{update, SharedStore, UpdateError};
use crate::time::{Duration, Instant};

/// Slots in the ring.
pub const SLOTS: usize = 10;
/// What one retry costs, in units.
pub const UNITS_PER_RETRY: i64 = 1_000_000;
/// The largest ratio: with at most 5 attempts a request never makes more than 4 retries, so a
/// larger ratio could never bind.
pub const MAX_RATIO: f64 = 4.0;
/// The largest `min_per_second`.
pub const MAX_MIN_PER_SECOND: u32 = 1_000_000;
/// The shortest `ttl` (Finagle's bound).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest `ttl` (Finagle's bound).
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// Bytes of the shared-data value.
pub const STATE_LEN: usize = 16 + 8 * SLOTS;
/// Compare-and-swap attempts of the shared operations before they report contention: the
/// one budget of every shared value ([`crate::store::ATTEMPTS`]).
pub const CAS_ATTEMPTS: u32 = crate::store::ATTEMPTS;

/// Why [`RetryBudget::new`] refused its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidBudget {
    /// `ratio` is not a number in `[0, MAX_RATIO]`.
    Ratio,
    /// `min_per_second` is above [`MAX_MIN_PER_SECOND`].
    MinPerSecond,
    /// `ttl` is outside `[MIN_TTL, MAX_TTL]`.
    Ttl,
}

impl fmt::Display for InvalidBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidBudget::Ratio => write!(f, "must be a number from 0 to {MAX_RATIO}"),
            InvalidBudget::MinPerSecond => write!(f, "must be at most {MAX_MIN_PER_SECOND}"),
            InvalidBudget::Ttl => write!(f, "must be from {MIN_TTL} to {MAX_TTL}"),
        }
    }
}

/// A validated budget: the parameters and the unit amounts derived from them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    ttl: Duration,
    deposit: i64,
    reserve: i64,
    slot: Duration,
}

impl Default for RetryBudget {
    /// tower's `TpsBudget` default and Linkerd's: 20 % plus 10 per second over 10 s.
    fn default() -> Self {
        RetryBudget::from_parts(0.2, 10, Duration::from_secs(10))
    }
}

/// The budget's state: what lives in shared data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetState {
    slot_nanos: u64,
    epoch: u64,
    slots: [i64; SLOTS],
}

impl BudgetState {
    /// Encodes the state in the documented 96-byte layout.
    pub fn encode(&self) -> Vec<u8> {
        let writer = Writer::with_capacity(STATE_LEN)
            .u64(self.slot_nanos)
            .u64(self.epoch);
        self.slots
            .iter()
            .fold(writer, |w, slot| w.i64(*slot))
            .finish()
    }

    /// Decodes the layout; `None` for any other length.
    pub fn decode(bytes: &[u8]) -> Option<BudgetState> {
        let mut reader = Reader::new(bytes);
        let slot_nanos = reader.u64()?;
        let epoch = reader.u64()?;
        let mut slots = [0; SLOTS];
        for slot in &mut slots {
            *slot = reader.i64()?;
        }
        reader.end()?;
        Some(BudgetState {
            slot_nanos,
            epoch,
            slots,
        })
    }

    /// The net units of the window.
    fn sum(&self) -> i64 {
        self.slots.iter().fold(0i64, |a, b| a.saturating_add(*b))
    }

    fn current_slot(&mut self) -> &mut i64 {
        // `% SLOTS` keeps the index in range.
        &mut self.slots[(self.epoch % SLOTS as u64) as usize]
    }
}

impl RetryBudget {
    /// A budget allowing retries of `ratio` of the requests plus `min_per_second`, counted over
    /// `ttl`.
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Result<Self, InvalidBudget> {
        // `contains` is false for NaN.
        if !(0.0..=MAX_RATIO).contains(&ratio) {
            return Err(InvalidBudget::Ratio);
        }
        if min_per_second > MAX_MIN_PER_SECOND {
            return Err(InvalidBudget::MinPerSecond);
        }
        if ttl < MIN_TTL || ttl > MAX_TTL {
            return Err(InvalidBudget::Ttl);
        }
        Ok(RetryBudget::from_parts(ratio, min_per_second, ttl))
    }

    /// Derives the unit amounts from checked parameters.
    fn from_parts(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        // Rounded to the nearest unit (no `f64::round` in core); in range by the checks above.
        let deposit = (ratio * UNITS_PER_RETRY as f64 + 0.5) as i64;
        // min_per_second * ttl retries, exactly, in units: at most 1e6 * 60e9 * 1e6 / 1e9.
        let reserve =
            u128::from(min_per_second) * u128::from(ttl.as_nanos()) * 1_000_000 / 1_000_000_000;
        RetryBudget {
            ratio,
            min_per_second,
            ttl,
            deposit,
            reserve: i64::try_from(reserve).unwrap_or(i64::MAX),
            slot: ttl.div(SLOTS as u64),
        }
    }

    /// The share of requests that retries may add.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Retries per second allowed whatever the traffic.
    pub fn min_per_second(&self) -> u32 {
        self.min_per_second
    }

    /// How long a deposit counts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A state with nothing deposited, its window ending at `now`.
    pub fn empty_state(&self, now: Instant) -> BudgetState {
        BudgetState {
            slot_nanos: self.slot.as_nanos(),
            epoch: self.epoch_at(now),
            slots: [0; SLOTS],
        }
    }

    fn epoch_at(&self, now: Instant) -> u64 {
        now.as_nanos() / self.slot.as_nanos().max(1)
    }

    /// Moves the window of `state` to `now`, clearing the slots that left it. A state of another
    /// slot length, or one whose window lies wholly ahead of `now` (a clock set back), starts
    /// over. A window only slightly ahead (another worker read a later clock) is kept.
    fn advance(&self, state: &mut BudgetState, now: Instant) {
        let now_epoch = self.epoch_at(now);
        if state.slot_nanos != self.slot.as_nanos()
            || state.epoch.saturating_sub(now_epoch) >= SLOTS as u64
        {
            *state = self.empty_state(now);
            return;
        }
        if now_epoch <= state.epoch {
            return;
        }
        if now_epoch - state.epoch >= SLOTS as u64 {
            state.slots = [0; SLOTS];
        } else {
            for epoch in state.epoch + 1..=now_epoch {
                state.slots[(epoch % SLOTS as u64) as usize] = 0;
            }
        }
        state.epoch = now_epoch;
    }

    /// Records one request at `now`.
    pub fn deposit(&self, state: &mut BudgetState, now: Instant) {
        self.advance(state, now);
        let slot = state.current_slot();
        *slot = slot.saturating_add(self.deposit);
    }

    /// Takes one retry at `now` if the window's balance plus the reserve covers it.
    pub fn withdraw(&self, state: &mut BudgetState, now: Instant) -> bool {
        self.advance(state, now);
        if self.reserve.saturating_add(state.sum()) < UNITS_PER_RETRY {
            return false;
        }
        let slot = state.current_slot();
        *slot = slot.saturating_sub(UNITS_PER_RETRY);
        true
    }

    /// How many retries `state` allows at `now` (for a gauge).
    pub fn available(&self, state: &BudgetState, now: Instant) -> u64 {
        let mut state = *state;
        self.advance(&mut state, now);
        let units = self.reserve.saturating_add(state.sum()).max(0);
        (units / UNITS_PER_RETRY) as u64
    }

    fn state_from(&self, bytes: Option<&[u8]>, now: Instant) -> BudgetState {
        bytes
            .and_then(BudgetState::decode)
            .unwrap_or_else(|| self.empty_state(now))
    }

    /// [`RetryBudget::deposit`] on encoded state: the bytes to store, `None` when nothing
    /// changes (a zero ratio deposits nothing, so requests cost no write).
    pub fn deposit_bytes(&self, old: Option<&[u8]>, now: Instant) -> Option<Vec<u8>> {
        if self.deposit == 0 {
            return None;
        }
        let mut state = self.state_from(old, now);
        self.deposit(&mut state, now);
        Some(state.encode())
    }

    /// [`RetryBudget::withdraw`] on encoded state: the bytes to store (`None` when the retry is
    /// refused: a refusal changes nothing that the next reader would not recompute) and whether
    /// the retry may go.
    pub fn withdraw_bytes(&self, old: Option<&[u8]>, now: Instant) -> (Option<Vec<u8>>, bool) {
        let mut state = self.state_from(old, now);
        if self.withdraw(&mut state, now) {
            (Some(state.encode()), true)
        } else {
            (None, false)
        }
    }

    /// Creates the budget under `key` if it is absent or unreadable, leaving a good one alone.
    /// Call it before traffic (when the configuration loads): a host writes a value that does
    /// not exist yet unconditionally (version 0), so two workers creating the key with their
    /// first operations could lose one of them. Two workers running this at once both write the
    /// same empty state, which is harmless.
    pub fn ensure_shared<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        key: &str,
        now: Instant,
    ) -> Result<(), UpdateError> {
        update(store, key, CAS_ATTEMPTS, |old| {
            (self.ensure_bytes(old, now), ())
        })
    }

    /// What [`RetryBudget::ensure_shared`] writes over the stored bytes `old`: an empty state
    /// if they are absent, unreadable or of another slot length; nothing for a good one.
    pub fn ensure_bytes(&self, old: Option<&[u8]>, now: Instant) -> Option<Vec<u8>> {
        let usable = old
            .and_then(BudgetState::decode)
            .is_some_and(|s| s.slot_nanos == self.slot.as_nanos());
        (!usable).then(|| self.empty_state(now).encode())
    }

    /// Deposits one request in the budget stored under `key`, by compare-and-swap.
    pub fn deposit_shared<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        key: &str,
        now: Instant,
    ) -> Result<(), UpdateError> {
        update(store, key, CAS_ATTEMPTS, |old| {
            (self.deposit_bytes(old, now), ())
        })
    }

    /// Withdraws one retry from the budget stored under `key`, by compare-and-swap. On an
    /// error the glue should not retry (fail closed): a budget exists to stop storms, and
    /// contention is a sign of one.
    pub fn withdraw_shared<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        key: &str,
        now: Instant,
    ) -> Result<bool, UpdateError> {
        update(store, key, CAS_ATTEMPTS, |old| {
            self.withdraw_bytes(old, now)
        })
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::{Rng, SeededRng};
    use crate::store::testing::MemoryStore;

    const KEY: &str = "keel/retry/default/budget";

    fn at_ms(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    fn budget(ratio: f64, min: u32, ttl_secs: u64) -> RetryBudget {
        RetryBudget::new(ratio, min, Duration::from_secs(ttl_secs)).unwrap()
    }

    fn drain(budget: &RetryBudget, state: &mut BudgetState, now: Instant) -> u64 {
        let mut n = 0;
        while budget.withdraw(state, now) {
            n += 1;
        }
        n
    }

    #[test]
    fn validates_its_parameters() {
        let ttl = Duration::from_secs(10);
        assert_eq!(RetryBudget::new(-0.1, 10, ttl), Err(InvalidBudget::Ratio));
        assert_eq!(
            RetryBudget::new(f64::NAN, 10, ttl),
            Err(InvalidBudget::Ratio)
        );
        assert_eq!(RetryBudget::new(4.5, 10, ttl), Err(InvalidBudget::Ratio));
        assert_eq!(
            RetryBudget::new(0.2, MAX_MIN_PER_SECOND + 1, ttl),
            Err(InvalidBudget::MinPerSecond)
        );
        assert_eq!(
            RetryBudget::new(0.2, 10, Duration::from_millis(999)),
            Err(InvalidBudget::Ttl)
        );
        assert_eq!(
            RetryBudget::new(0.2, 10, Duration::from_secs(61)),
            Err(InvalidBudget::Ttl)
        );
        assert!(RetryBudget::new(0.0, 0, MIN_TTL).is_ok());
        assert!(RetryBudget::new(MAX_RATIO, MAX_MIN_PER_SECOND, MAX_TTL).is_ok());
        assert_eq!(RetryBudget::default(), budget(0.2, 10, 10));
    }

    #[test]
    fn allows_the_ratio_of_requests_plus_the_reserve() {
        let b = budget(0.2, 10, 10);
        let mut state = b.empty_state(at_ms(0));
        assert_eq!(b.available(&state, at_ms(0)), 100);
        for _ in 0..100 {
            b.deposit(&mut state, at_ms(0));
        }
        assert_eq!(b.available(&state, at_ms(0)), 120);
        assert_eq!(drain(&b, &mut state, at_ms(0)), 120);
        assert_eq!(b.available(&state, at_ms(0)), 0);
    }

    #[test]
    fn the_ratio_is_exact_where_one_over_ratio_is_not_an_integer() {
        // tower would withdraw 1/0.3 = 3 (rounded down) per retry: 33 retries, not 30.
        let b = budget(0.3, 0, 10);
        let mut state = b.empty_state(at_ms(0));
        for _ in 0..100 {
            b.deposit(&mut state, at_ms(0));
        }
        assert_eq!(drain(&b, &mut state, at_ms(0)), 30);
    }

    #[test]
    fn deposits_expire_after_ttl() {
        let b = budget(0.5, 0, 10);
        let mut state = b.empty_state(at_ms(0));
        for _ in 0..100 {
            b.deposit(&mut state, at_ms(0));
        }
        // Still in the window just before ttl ...
        assert_eq!(b.available(&state, at_ms(9_999)), 50);
        // ... gone at ttl.
        assert_eq!(b.available(&state, at_ms(10_000)), 0);
        assert!(!b.withdraw(&mut state, at_ms(10_000)));
        // Expired slot by slot: deposits at 1.5 s leave 1 s after those at 0.5 s.
        let mut state = b.empty_state(at_ms(0));
        for _ in 0..10 {
            b.deposit(&mut state, at_ms(500));
        }
        for _ in 0..10 {
            b.deposit(&mut state, at_ms(1_500));
        }
        assert_eq!(b.available(&state, at_ms(9_999)), 10);
        assert_eq!(b.available(&state, at_ms(10_000)), 5);
        assert_eq!(b.available(&state, at_ms(11_000)), 0);
    }

    #[test]
    fn the_reserve_alone_refills_each_window() {
        let b = budget(0.0, 2, 1);
        let mut state = b.empty_state(at_ms(0));
        assert_eq!(drain(&b, &mut state, at_ms(0)), 2);
        assert_eq!(drain(&b, &mut state, at_ms(500)), 0);
        assert_eq!(drain(&b, &mut state, at_ms(1_000)), 2);
        // A long quiet gap clears everything.
        assert_eq!(drain(&b, &mut state, at_ms(100_000)), 2);
    }

    #[test]
    fn a_clock_set_back_past_the_window_starts_over() {
        let b = budget(0.2, 0, 1);
        let mut state = b.empty_state(at_ms(50_000));
        for _ in 0..50 {
            b.deposit(&mut state, at_ms(50_000));
        }
        // Slightly behind: another worker's later clock; the window is kept.
        assert_eq!(b.available(&state, at_ms(49_900)), 10);
        // Far behind: start over rather than write into a window that never comes.
        assert_eq!(b.available(&state, at_ms(1_000)), 0);
        b.deposit(&mut state, at_ms(1_000));
        assert_eq!(state.epoch, 10);
    }

    /// One event of the simulated traffic: a request or a retry attempt at a time.
    struct Event {
        at: Instant,
        retry: bool,
        allowed: bool,
    }

    /// Checks, at every allowed retry, that the window's retries stay within the bound.
    fn check_bound(b: &RetryBudget, events: &[Event], label: &str) {
        let slot = b.ttl().div(SLOTS as u64).as_nanos();
        let reserve_retries = f64::from(b.min_per_second()) * b.ttl().as_secs_f64();
        for (i, e) in events.iter().enumerate() {
            if !(e.retry && e.allowed) {
                continue;
            }
            let epoch = e.at.as_nanos() / slot;
            let first = epoch.saturating_sub(SLOTS as u64 - 1);
            // Events are in time order: walk back from this one to the window's first slot.
            let window = events[..=i]
                .iter()
                .rev()
                .take_while(|x| x.at.as_nanos() / slot >= first);
            let (mut requests, mut retries) = (0u64, 0u64);
            for x in window {
                if x.retry {
                    retries += u64::from(x.allowed);
                } else {
                    requests += 1;
                }
            }
            let bound = b.ratio() * requests as f64 + reserve_retries;
            assert!(
                retries as f64 <= bound + 1e-9,
                "{label}: event {i}: {retries} retries for {requests} requests, bound {bound}"
            );
        }
    }

    /// Random arrivals over several windows: a request or a retry attempt every 0-40 ms, in
    /// stretches of 200 events whose share of retries is drawn anew, so that the budget both
    /// allows and refuses.
    fn arrivals(seed: u64) -> Vec<(Instant, bool)> {
        let mut rng = SeededRng::new(seed);
        let mut now = 0u64;
        let mut retry_share = 50;
        (0..3000)
            .map(|i| {
                if i % 200 == 0 {
                    retry_share = rng.below(100);
                }
                now += rng.below(40);
                (at_ms(now), rng.below(100) < retry_share)
            })
            .collect()
    }

    fn assert_exercised(events: &[Event], label: &str) {
        let allowed = events.iter().filter(|e| e.retry && e.allowed).count();
        let refused = events.iter().filter(|e| e.retry && !e.allowed).count();
        assert!(
            allowed > 0 && refused > 0,
            "{label}: {allowed} allowed, {refused} refused"
        );
    }

    #[test]
    fn never_allows_more_than_the_bound_in_a_window() {
        for (seed, (ratio, min, ttl)) in [
            (0.2, 10, 10),
            (0.2, 0, 1),
            (0.0, 3, 2),
            (1.0, 1, 5),
            (0.05, 0, 3),
            (2.5, 0, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let b = budget(ratio, min, ttl);
            let mut state = b.empty_state(Instant::ZERO);
            let events: Vec<Event> = arrivals(seed as u64)
                .into_iter()
                .map(|(at, retry)| {
                    let allowed = if retry {
                        b.withdraw(&mut state, at)
                    } else {
                        b.deposit(&mut state, at);
                        true
                    };
                    Event { at, retry, allowed }
                })
                .collect();
            let label = alloc::format!("ratio {ratio}, min {min}/s, ttl {ttl}s");
            assert_exercised(&events, &label);
            check_bound(&b, &events, &label);
        }
    }

    #[test]
    fn two_workers_sharing_one_budget_stay_within_the_bound() {
        for seed in 0..4 {
            let b = budget(0.2, 2, 2);
            let store = MemoryStore::default();
            // As the glue does when the configuration loads: every later write is versioned.
            b.ensure_shared(&store, KEY, Instant::ZERO).unwrap();
            let mut interleave = SeededRng::new(seed + 100);
            let mut events = Vec::new();
            let mut rereads = 0;
            for (at, retry) in arrivals(seed) {
                // One time in three, worker B's whole operation lands between worker A's read
                // and A's write: A's compare-and-swap fails and A recomputes on B's result.
                let b_cuts_in = interleave.below(3) == 0;
                let b_retries = interleave.below(2) == 0;
                let mut b_event = None;
                let mut runs = 0;
                let a_allowed = update(&store, KEY, CAS_ATTEMPTS, |old| {
                    runs += 1;
                    if b_cuts_in && b_event.is_none() {
                        let allowed = if b_retries {
                            b.withdraw_shared(&store, KEY, at).unwrap()
                        } else {
                            b.deposit_shared(&store, KEY, at).unwrap();
                            true
                        };
                        b_event = Some(Event {
                            at,
                            retry: b_retries,
                            allowed,
                        });
                    }
                    if retry {
                        b.withdraw_bytes(old, at)
                    } else {
                        (b.deposit_bytes(old, at), true)
                    }
                })
                .unwrap();
                rereads += runs - 1;
                events.extend(b_event);
                events.push(Event {
                    at,
                    retry,
                    allowed: a_allowed,
                });
            }
            // A refused withdrawal writes nothing, so only some cut-ins force a re-read.
            assert!(rereads > 300, "seed {seed}: {rereads}");
            assert_exercised(&events, "two workers");
            check_bound(&b, &events, "two workers");
        }
    }

    #[test]
    fn encoding_round_trips_and_refuses_other_lengths() {
        let b = budget(0.2, 10, 10);
        let mut state = b.empty_state(at_ms(12_345));
        b.deposit(&mut state, at_ms(12_345));
        b.withdraw(&mut state, at_ms(12_345));
        b.withdraw(&mut state, at_ms(13_345));
        let bytes = state.encode();
        assert_eq!(bytes.len(), STATE_LEN);
        assert_eq!(BudgetState::decode(&bytes), Some(state));
        // Layout: slot length, epoch, then slot `epoch % 10` at 16 + 8 * index.
        assert_eq!(bytes[0..8], 1_000_000_000u64.to_le_bytes());
        assert_eq!(bytes[8..16], 13u64.to_le_bytes());
        let slot2 = 16 + 8 * 2;
        assert_eq!(
            bytes[slot2..slot2 + 8],
            (200_000 - UNITS_PER_RETRY).to_le_bytes()
        );
        let slot3 = 16 + 8 * 3;
        assert_eq!(bytes[slot3..slot3 + 8], (-UNITS_PER_RETRY).to_le_bytes());
        assert_eq!(BudgetState::decode(&bytes[..STATE_LEN - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(BudgetState::decode(&longer), None);
        assert_eq!(BudgetState::decode(&[]), None);
    }

    #[test]
    fn foreign_or_resized_state_starts_empty() {
        let b = budget(0.2, 0, 10);
        // Garbage bytes: empty state, then the deposit.
        let bytes = b.deposit_bytes(Some(&[1, 2, 3]), at_ms(0)).unwrap();
        let state = BudgetState::decode(&bytes).unwrap();
        assert_eq!(state.sum(), 200_000);
        // A state written with another ttl (a configuration reload) is not reused.
        let other = budget(0.2, 0, 20);
        let mut state = other.empty_state(at_ms(0));
        for _ in 0..100 {
            other.deposit(&mut state, at_ms(0));
        }
        assert_eq!(
            b.withdraw_bytes(Some(&state.encode()), at_ms(0)),
            (None, false)
        );
    }

    #[test]
    fn ensure_shared_creates_once_and_keeps_a_good_state() {
        let b = budget(0.2, 0, 10);
        let store = MemoryStore::default();
        let version = |store: &MemoryStore| store.map.borrow().get(KEY).map(|(_, v)| *v);
        b.ensure_shared(&store, KEY, at_ms(0)).unwrap();
        assert!(version(&store).is_some());
        b.deposit_shared(&store, KEY, at_ms(0)).unwrap();
        let deposited = version(&store);
        b.ensure_shared(&store, KEY, at_ms(0)).unwrap();
        assert_eq!(version(&store), deposited);
        // Garbage, or a state of another ttl, is replaced.
        store
            .map
            .borrow_mut()
            .insert(KEY.into(), (alloc::vec![9; 7], 50));
        b.ensure_shared(&store, KEY, at_ms(0)).unwrap();
        let stored = store.map.borrow().get(KEY).cloned().unwrap().0;
        assert_eq!(BudgetState::decode(&stored), Some(b.empty_state(at_ms(0))));
    }

    #[test]
    fn zero_ratio_deposits_write_nothing() {
        let b = budget(0.0, 1, 1);
        assert_eq!(b.deposit_bytes(None, at_ms(0)), None);
        let store = MemoryStore::default();
        b.deposit_shared(&store, KEY, at_ms(0)).unwrap();
        assert!(store.map.borrow().is_empty());
        assert_eq!(b.withdraw_shared(&store, KEY, at_ms(0)), Ok(true));
        assert_eq!(b.withdraw_shared(&store, KEY, at_ms(0)), Ok(false));
    }

    #[test]
    fn balances_saturate() {
        let b = budget(MAX_RATIO, MAX_MIN_PER_SECOND, 60);
        let mut state = b.empty_state(at_ms(0));
        state.slots = [i64::MAX; SLOTS];
        b.deposit(&mut state, at_ms(0));
        assert_eq!(
            b.available(&state, at_ms(0)),
            (i64::MAX / UNITS_PER_RETRY) as u64
        );
        assert!(b.withdraw(&mut state, at_ms(0)));
        state.slots = [i64::MIN; SLOTS];
        assert!(!b.withdraw(&mut state, at_ms(0)));
        b.deposit(&mut state, at_ms(0));
        assert_eq!(b.available(&state, at_ms(0)), 0);
    }

    #[test]
    fn shared_operations_match_the_local_ones() {
        let b = budget(0.2, 1, 1);
        let store = MemoryStore::default();
        let mut local = b.empty_state(at_ms(0));
        let mut rng = SeededRng::new(11);
        for i in 0..500 {
            let at = at_ms(i * 7);
            if rng.below(2) == 0 {
                b.deposit(&mut local, at);
                b.deposit_shared(&store, KEY, at).unwrap();
            } else {
                assert_eq!(
                    b.withdraw_shared(&store, KEY, at),
                    Ok(b.withdraw(&mut local, at))
                );
            }
        }
        // A refused withdrawal writes nothing: compare both windows moved to the same time.
        let end = at_ms(499 * 7);
        let stored = store.map.borrow().get(KEY).cloned().unwrap().0;
        let mut shared = BudgetState::decode(&stored).unwrap();
        b.advance(&mut shared, end);
        b.advance(&mut local, end);
        assert_eq!(shared, local);
    }
}
