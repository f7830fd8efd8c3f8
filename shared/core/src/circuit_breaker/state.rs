//! The breaker's shared state and its binary layout.
//!
//! One [`BreakerState`] per breaker key lives in the host's shared data, so every worker of
//! the process sees the same phase, window and probe permits. Workers change it only through
//! `store::update` (compare-and-swap), so each transition and each probe permit is decided
//! exactly once.
//!
//! # Layout, version 1
//!
//! Little-endian, no padding, `92 + 12 * B` bytes (212 for the default `B = 10`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | layout version, `1` |
//! | 1 | 1 | phase: `0` closed, `1` open, `2` half-open |
//! | 2 | 1 | `B`, the number of window buckets (1..=60) |
//! | 3 | 1 | reserved, `0` |
//! | 4 | 4 | `trips`: u32, consecutive openings since the last clean close |
//! | 8 | 4 | `generation`: u32, number of the current half-open period (names its probes) |
//! | 12 | 8 | `since`: u64 ns, when the current phase began |
//! | 20 | 8 | `open_until`: u64 ns, end of the current (or last) open period |
//! | 28 | 8 | `open_for`: u64 ns, length of that open period; `0` after a clean close |
//! | 36 | 8 | bucket width in ns (a state written under another window shape loses its window) |
//! | 44 | 2 | probes issued in this half-open period (u16) |
//! | 46 | 2 | probe outcomes received |
//! | 48 | 2 | probe outcomes that failed |
//! | 50 | 2 | probe outcomes that were slow |
//! | 52 | 8 | probe deadline: u64 ns after which unanswered permits are reclaimed |
//! | 60 | 8 | window head: u64 absolute number of the newest bucket (`now / width`) |
//! | 68 | 8 | window total calls (u64) |
//! | 76 | 8 | window total failures (u64) |
//! | 84 | 8 | window total slow calls (u64) |
//! | 92 | 12 × B | buckets by slot (slot `i` holds bucket numbers `≡ i mod B`): calls, failures, slow (u32 each) |
//!
//! Decoding refuses (`None`, read as "no state yet": a fresh closed breaker) any other version,
//! phase or length, a non-zero reserved byte, totals that are not the sum of the buckets, and
//! counts that cannot be (more failures than calls, more probe outcomes than probes issued).

use alloc::vec::Vec;

use super::window::{Tally, Totals, Window};
use crate::codec::{Reader, Writer};
use crate::time::{Duration, Instant};

/// The layout version written in the first byte.
pub const LAYOUT_VERSION: u8 = 1;
/// The largest number of window buckets a state can hold.
pub const MAX_BUCKETS: u8 = 60;
const HEADER_LEN: usize = 92;
const BUCKET_LEN: usize = 12;

/// The three phases of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Calls flow; outcomes are counted in the window.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// A few probes are let through; their outcomes decide.
    HalfOpen,
}

impl Phase {
    /// The name used in metrics and logs: `closed`, `open`, `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
    fn code(self) -> u8 {
        match self {
            Phase::Closed => 0,
            Phase::Open => 1,
            Phase::HalfOpen => 2,
        }
    }
    fn from_code(code: u8) -> Option<Phase> {
        match code {
            0 => Some(Phase::Closed),
            1 => Some(Phase::Open),
            2 => Some(Phase::HalfOpen),
            _ => None,
        }
    }
}

impl core::fmt::Display for Phase {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The probe permits of a half-open period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probes {
    /// Permits handed out (and not reclaimed).
    pub issued: u16,
    /// Outcomes received.
    pub done: u16,
    /// Outcomes that failed.
    pub failed: u16,
    /// Outcomes that were slow.
    pub slow: u16,
    /// When unanswered permits may be reclaimed: the last permit's time plus the probe
    /// timeout.
    pub deadline: Instant,
}

/// Everything a breaker shares between workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerState {
    pub(crate) phase: Phase,
    pub(crate) trips: u32,
    pub(crate) generation: u32,
    pub(crate) since: Instant,
    pub(crate) open_until: Instant,
    pub(crate) open_for: Duration,
    pub(crate) bucket_width: Duration,
    pub(crate) probes: Probes,
    pub(crate) window: Window,
}

impl BreakerState {
    /// A closed breaker with an empty window of `buckets` buckets of `bucket_width`, as of
    /// `now`.
    pub fn closed(buckets: u8, bucket_width: Duration, now: Instant) -> BreakerState {
        let buckets = buckets.clamp(1, MAX_BUCKETS);
        BreakerState {
            phase: Phase::Closed,
            trips: 0,
            generation: 0,
            since: now,
            open_until: Instant::ZERO,
            open_for: Duration::ZERO,
            bucket_width,
            probes: Probes::default(),
            window: Window::new(usize::from(buckets), bucket_index(now, bucket_width)),
        }
    }

    /// The current phase (an open breaker whose period has ended stays `Open` here until the
    /// next admission moves it to half-open).
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Consecutive openings since the last clean close.
    pub fn trips(&self) -> u32 {
        self.trips
    }
    /// When the current phase began.
    pub fn since(&self) -> Instant {
        self.since
    }
    /// The end of the current (or last) open period.
    pub fn open_until(&self) -> Instant {
        self.open_until
    }
    /// The length of the current (or last) open period; zero after a clean close.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }
    /// The probe permits of the current half-open period.
    pub fn probes(&self) -> Probes {
        self.probes
    }
    /// The sliding window of outcomes.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The encoded length for `buckets` buckets.
    pub const fn encoded_len(buckets: u8) -> usize {
        HEADER_LEN + BUCKET_LEN * buckets as usize
    }

    /// Encodes the state in layout version 1 (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let buckets = self.window.buckets();
        // `closed`, `decode` and the window's constructor keep the count within 1..=60.
        let count = u8::try_from(buckets.len()).unwrap_or(MAX_BUCKETS);
        let totals = self.window.totals();
        let mut w = Writer::with_capacity(Self::encoded_len(count))
            .u8(LAYOUT_VERSION)
            .u8(self.phase.code())
            .u8(count)
            .u8(0)
            .u32(self.trips)
            .u32(self.generation)
            .u64(self.since.as_nanos())
            .u64(self.open_until.as_nanos())
            .u64(self.open_for.as_nanos())
            .u64(self.bucket_width.as_nanos())
            .u16(self.probes.issued)
            .u16(self.probes.done)
            .u16(self.probes.failed)
            .u16(self.probes.slow)
            .u64(self.probes.deadline.as_nanos())
            .u64(self.window.head())
            .u64(totals.calls)
            .u64(totals.failures)
            .u64(totals.slow);
        for b in buckets.iter().take(usize::from(count)) {
            w = w.u32(b.calls).u32(b.failures).u32(b.slow);
        }
        w.finish()
    }

    /// Decodes a layout-version-1 state; `None` for anything else (see the module docs).
    pub fn decode(bytes: &[u8]) -> Option<BreakerState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != LAYOUT_VERSION {
            return None;
        }
        let phase = Phase::from_code(r.u8()?)?;
        let count = r.u8()?;
        if count == 0 || count > MAX_BUCKETS || r.u8()? != 0 {
            return None;
        }
        if bytes.len() != Self::encoded_len(count) {
            return None;
        }
        let trips = r.u32()?;
        let generation = r.u32()?;
        let since = Instant::from_nanos(r.u64()?);
        let open_until = Instant::from_nanos(r.u64()?);
        let open_for = Duration::from_nanos(r.u64()?);
        let bucket_width = Duration::from_nanos(r.u64()?);
        let probes = Probes {
            issued: r.u16()?,
            done: r.u16()?,
            failed: r.u16()?,
            slow: r.u16()?,
            deadline: Instant::from_nanos(r.u64()?),
        };
        if probes.done > probes.issued || probes.failed > probes.done || probes.slow > probes.done {
            return None;
        }
        let head = r.u64()?;
        let totals = Totals {
            calls: r.u64()?,
            failures: r.u64()?,
            slow: r.u64()?,
        };
        let mut buckets = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            buckets.push(Tally {
                calls: r.u32()?,
                failures: r.u32()?,
                slow: r.u32()?,
            });
        }
        r.end()?;
        let window = Window::from_parts(head, totals, buckets)?;
        Some(BreakerState {
            phase,
            trips,
            generation,
            since,
            open_until,
            open_for,
            bucket_width,
            probes,
            window,
        })
    }
}

/// One outcome added to the head bucket of an encoded closed state, in place: the bytes that
/// decoding, [`Window::add`] at bucket `index` and encoding would give, without the decode and
/// the encode (the breaker's common case, on every response). Returns the window's new
/// totals; `None`, leaving `bytes` untouched, unless `bytes` is a state [`BreakerState::decode`]
/// accepts, closed, in `buckets` buckets of `width` (else loading it restarts the window), with
/// `index` not after its head (else the window advances first), an outcome to count, and room
/// in the head bucket: the caller then takes the full decode.
pub(crate) fn add_to_closed_head(
    bytes: &mut [u8],
    buckets: u8,
    width: Duration,
    index: u64,
    outcome: super::outcome::Outcome,
) -> Option<Totals> {
    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_le_bytes(*b.get(at..)?.first_chunk::<2>()?))
    }
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(*b.get(at..)?.first_chunk::<4>()?))
    }
    fn u64_at(b: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(*b.get(at..)?.first_chunk::<8>()?))
    }
    fn put_u32(b: &mut [u8], at: usize, v: u32) -> Option<()> {
        b.get_mut(at..at + 4)?.copy_from_slice(&v.to_le_bytes());
        Some(())
    }
    fn put_u64(b: &mut [u8], at: usize, v: u64) -> Option<()> {
        b.get_mut(at..at + 8)?.copy_from_slice(&v.to_le_bytes());
        Some(())
    }
    if outcome == super::outcome::Outcome::Ignored {
        return None;
    }
    // What `decode` checks, in its order, then what `load` and `Window::add` need.
    let [LAYOUT_VERSION, phase, count, 0, ..] = *bytes else {
        return None;
    };
    if Phase::from_code(phase)? != Phase::Closed
        || count == 0
        || count > MAX_BUCKETS
        || bytes.len() != BreakerState::encoded_len(count)
    {
        return None;
    }
    let (issued, done) = (u16_at(bytes, 44)?, u16_at(bytes, 46)?);
    let (failed, slow) = (u16_at(bytes, 48)?, u16_at(bytes, 50)?);
    if done > issued || failed > done || slow > done {
        return None;
    }
    let head = u64_at(bytes, 60)?;
    let totals = Totals {
        calls: u64_at(bytes, 68)?,
        failures: u64_at(bytes, 76)?,
        slow: u64_at(bytes, 84)?,
    };
    let mut sum = Totals::default();
    for bucket in bytes.get(HEADER_LEN..)?.chunks_exact(BUCKET_LEN) {
        let (calls, failures, slow) = (u32_at(bucket, 0)?, u32_at(bucket, 4)?, u32_at(bucket, 8)?);
        if failures > calls || slow > calls {
            return None;
        }
        sum.calls += u64::from(calls);
        sum.failures += u64::from(failures);
        sum.slow += u64::from(slow);
    }
    if sum != totals || count != buckets || u64_at(bytes, 36)? != width.as_nanos() || index > head {
        return None;
    }
    // The head bucket's slot, as `Window::slot` computes it.
    let at = HEADER_LEN + BUCKET_LEN * usize::try_from(head % u64::from(count)).ok()?;
    let calls = u32_at(bytes, at)?;
    if calls == u32::MAX {
        return None;
    }
    let failure = u32::from(outcome.is_failure());
    let slow_call = u32::from(outcome.is_slow());
    let new = Totals {
        calls: totals.calls + 1,
        failures: totals.failures + u64::from(failure),
        slow: totals.slow + u64::from(slow_call),
    };
    put_u32(bytes, at, calls + 1)?;
    put_u32(bytes, at + 4, u32_at(bytes, at + 4)? + failure)?;
    put_u32(bytes, at + 8, u32_at(bytes, at + 8)? + slow_call)?;
    put_u64(bytes, 68, new.calls)?;
    put_u64(bytes, 76, new.failures)?;
    put_u64(bytes, 84, new.slow)?;
    Some(new)
}

/// The phase byte of an encoded state, reading nothing else: `None` when the bytes are not
/// layout version 1. A full [`BreakerState::decode`] can still refuse what this accepts.
pub(crate) fn peek_phase(bytes: &[u8]) -> Option<Phase> {
    match bytes {
        [LAYOUT_VERSION, phase, ..] => Phase::from_code(*phase),
        _ => None,
    }
}

/// The absolute bucket number of `now` for buckets of `width` (a zero width counts every
/// nanosecond apart, never divides by zero).
pub(crate) fn bucket_index(now: Instant, width: Duration) -> u64 {
    now.as_nanos() / width.as_nanos().max(1)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::circuit_breaker::outcome::Outcome;
    use crate::rand::{Rng, SeededRng};

    fn sample(seed: u64) -> BreakerState {
        let mut rng = SeededRng::new(seed);
        let buckets = 1 + rng.below(u64::from(MAX_BUCKETS)) as u8;
        let width = Duration::from_millis(1 + rng.below(1000));
        let mut s = BreakerState::closed(buckets, width, Instant::from_nanos(rng.next_u64() >> 4));
        s.phase = Phase::from_code(rng.below(3) as u8).unwrap();
        s.trips = rng.next_u64() as u32;
        s.generation = rng.next_u64() as u32;
        s.open_until = Instant::from_nanos(rng.next_u64());
        s.open_for = Duration::from_nanos(rng.next_u64());
        let issued = rng.below(100) as u16;
        let done = rng.below(u64::from(issued) + 1) as u16;
        s.probes = Probes {
            issued,
            done,
            failed: rng.below(u64::from(done) + 1) as u16,
            slow: rng.below(u64::from(done) + 1) as u16,
            deadline: Instant::from_nanos(rng.next_u64()),
        };
        let mut index = s.window.head();
        for _ in 0..rng.below(300) {
            index += rng.below(2);
            let o = Outcome::from_flags(rng.below(2) == 0, rng.below(3) == 0);
            s.window.add(index, o);
        }
        s
    }

    #[test]
    fn layout_is_as_documented() {
        let s = BreakerState::closed(10, Duration::from_secs(1), Instant::from_nanos(5));
        let bytes = s.encode();
        assert_eq!(bytes.len(), 212);
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[1], 0);
        assert_eq!(bytes[2], 10);
        assert_eq!(&bytes[12..20], &5u64.to_le_bytes());
        assert_eq!(&bytes[36..44], &1_000_000_000u64.to_le_bytes());
    }

    #[test]
    fn round_trips() {
        for seed in 0..200 {
            let s = sample(seed);
            let bytes = s.encode();
            assert_eq!(
                bytes.len(),
                BreakerState::encoded_len(s.window.buckets().len() as u8)
            );
            assert_eq!(BreakerState::decode(&bytes), Some(s), "seed {seed}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_state() {
        let good = sample(1).encode();
        assert!(BreakerState::decode(&[]).is_none());
        assert!(BreakerState::decode(&good[..good.len() - 1]).is_none());
        let mut long = good.clone();
        long.push(0);
        assert!(BreakerState::decode(&long).is_none());
        for (offset, value) in [(0, 2), (1, 3), (2, 0), (2, 61), (3, 1)] {
            let mut bad = good.clone();
            bad[offset] = value;
            assert!(
                BreakerState::decode(&bad).is_none(),
                "byte {offset} = {value}"
            );
        }
    }

    /// Property: decoding arbitrary or corrupted bytes never panics, and whatever decodes
    /// satisfies the invariants and re-encodes to the same bytes.
    #[test]
    fn never_decodes_to_garbage() {
        let mut rng = SeededRng::new(99);
        for round in 0..3000 {
            let mut bytes = sample(round).encode();
            match round % 3 {
                0 => {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
                1 => {
                    // Half the time exactly the length of a one-bucket state, so that the
                    // checks past the length are reached.
                    let len = if rng.below(2) == 0 {
                        BreakerState::encoded_len(1)
                    } else {
                        rng.below(400) as usize
                    };
                    bytes = (0..len).map(|_| rng.next_u64() as u8).collect();
                    if len > 3 {
                        bytes[0] = LAYOUT_VERSION;
                        bytes[1] = 0;
                        bytes[2] = 1;
                        bytes[3] = 0;
                    }
                }
                _ => {}
            }
            if let Some(s) = BreakerState::decode(&bytes) {
                let t = s.window.totals();
                let mut sum = Totals::default();
                for b in s.window.buckets() {
                    assert!(b.failures <= b.calls && b.slow <= b.calls);
                    sum.calls += u64::from(b.calls);
                    sum.failures += u64::from(b.failures);
                    sum.slow += u64::from(b.slow);
                }
                assert_eq!(t, sum);
                assert!(s.probes.done <= s.probes.issued);
                assert_eq!(s.encode(), bytes);
            }
        }
    }
}
