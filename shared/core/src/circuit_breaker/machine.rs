//! The state machine: admissions, outcomes and transitions, as pure functions of the shared
//! state.
//!
//! [`BreakerPolicy::admit`] and [`BreakerPolicy::record`] take the encoded state as read from
//! shared data and return the bytes to write back (or `None`: nothing changed, write nothing)
//! with their decision. Their signature is the `change` closure of `store::update`, so a probe
//! permit, a transition and the window update are each committed by one compare-and-swap: if
//! another worker wrote first, the closure runs again on the newer state, and exactly one worker
//! reports each transition.
//!
//! Semantics follow Resilience4j (rates and half-open verdict) and Polly (inclusive thresholds;
//! results that arrive while open are ignored, so they never extend the break):
//!
//! - Closed: every outcome is counted in the window; once it holds at least `min_calls`
//!   outcomes, a failure rate or slow-call rate at or above its threshold opens the breaker.
//!   An admission on a closed breaker reads and never writes.
//! - Open for `open_for × multiplier^(trips - 1)`, capped at `max_open_for`, where `trips` counts
//!   consecutive openings since the last clean close. Outcomes are ignored.
//! - The first admission after the open period moves to half-open (lazily: there is no timer)
//!   and takes a probe permit. Half-open hands out `half_open_probes` permits, then refuses.
//!   Only outcomes of probes of the current half-open period count ([`ProbeTicket`]); once all
//!   permits have reported, the same thresholds over the probes decide: reopen (longer) or
//!   close (window emptied, open period reset).
//! - A probe whose outcome never comes (the stream died with the worker) must not wedge the
//!   breaker: when no permit has been handed out for `probe_timeout`, the unanswered permits are
//!   reclaimed. A probe cancelled by its client ([`Outcome::Ignored`]) returns its permit at
//!   once.
//!
//! Modes: `forced_open` refuses everything and `disabled` allows everything, neither touching
//! the state; `metrics_only` runs the machine and reports its transitions but allows every
//! request, flagging those it would have refused ([`Decision::would_reject`]).

use alloc::vec::Vec;
use core::fmt;

use super::outcome::Outcome;
use super::policy::{BreakerPolicy, Mode};
use super::state::{add_to_closed_head, bucket_index, peek_phase, BreakerState, Phase, Probes};
use super::window::{Totals, Window};
use crate::time::{Duration, Instant};

/// Names a probe: the half-open period that admitted it. Hand it back to
/// [`BreakerPolicy::record`] with the probe's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTicket {
    pub(crate) generation: u32,
}

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Forward it.
    Allow,
    /// Forward it as a half-open probe; record its outcome with this ticket.
    Probe(ProbeTicket),
    /// Answer locally (open reply or fallback); the upstream receives nothing.
    Reject {
        /// Time left open, for `Retry-After`. `None` when no time is known: half-open with every
        /// permit out (the probes, not the clock, decide) or `forced_open`.
        retry_after: Option<Duration>,
    },
}

/// The result of an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What to do with the request.
    pub admission: Admission,
    /// The transition this admission made (open to half-open), to log and count.
    pub transition: Option<Transition>,
    /// `metrics_only`: the request is allowed, but normal mode would have refused it.
    pub would_reject: bool,
}

impl Decision {
    fn new(admission: Admission, transition: Option<Transition>) -> Decision {
        Decision {
            admission,
            transition,
            would_reject: false,
        }
    }
}

/// Why a transition happened, with the counts that decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The window's failure rate reached the threshold.
    FailureRate {
        /// Failures in the window.
        failures: u64,
        /// Calls in the window.
        calls: u64,
    },
    /// The window's slow-call rate reached the threshold.
    SlowCallRate {
        /// Slow calls in the window.
        slow: u64,
        /// Calls in the window.
        calls: u64,
    },
    /// The open period ended and a request arrived.
    OpenElapsed,
    /// The probes' failure or slow-call rate reached a threshold.
    ProbesFailed {
        /// Probes that failed.
        failed: u16,
        /// Probes that were slow.
        slow: u16,
        /// Probes that reported.
        probes: u16,
    },
    /// The probes stayed below both thresholds.
    ProbesPassed {
        /// Probes that failed.
        failed: u16,
        /// Probes that were slow.
        slow: u16,
        /// Probes that reported.
        probes: u16,
    },
}

impl Reason {
    /// A short label for metrics: `failure_rate`, `slow_call_rate`, `open_elapsed`,
    /// `probes_failed`, `probes_passed`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Reason::FailureRate { .. } => "failure_rate",
            Reason::SlowCallRate { .. } => "slow_call_rate",
            Reason::OpenElapsed => "open_elapsed",
            Reason::ProbesFailed { .. } => "probes_failed",
            Reason::ProbesPassed { .. } => "probes_passed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::FailureRate { failures, calls } => {
                write!(f, "{failures} of {calls} calls failed")
            }
            Reason::SlowCallRate { slow, calls } => write!(f, "{slow} of {calls} calls were slow"),
            Reason::OpenElapsed => f.write_str("open period ended"),
            Reason::ProbesFailed {
                failed,
                slow,
                probes,
            }
            | Reason::ProbesPassed {
                failed,
                slow,
                probes,
            } => write!(f, "{failed} of {probes} probes failed, {slow} slow"),
        }
    }
}

/// A change of phase, reported once (by the worker whose write won) for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The phase left.
    pub from: Phase,
    /// The phase entered.
    pub to: Phase,
    /// Why.
    pub reason: Reason,
    /// For a transition to open: how long it stays open.
    pub open_for: Option<Duration>,
}

impl fmt::Display for Transition {
    /// `closed -> open: 12 of 20 calls failed; open for 5s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)?;
        match self.open_for {
            Some(d) => write!(f, "; open for {d}"),
            None => Ok(()),
        }
    }
}

impl BreakerPolicy {
    /// Decides whether a request may go upstream, given the shared state read from shared data
    /// (`None` or undecodable: a fresh closed breaker). Returns the state to write back, if it
    /// changed, and the decision. Use it as the `change` closure of `store::update`.
    pub fn admit(&self, state: Option<&[u8]>, now: Instant) -> (Option<Vec<u8>>, Decision) {
        self.admit_with(state, || now)
    }

    /// [`BreakerPolicy::admit`] that asks for the time only when it needs it: a closed breaker
    /// (the common case) and the `disabled` and `forced_open` modes decide without it, which
    /// spares the glue a host call per request.
    pub fn admit_with(
        &self,
        state: Option<&[u8]>,
        now: impl FnOnce() -> Instant,
    ) -> (Option<Vec<u8>>, Decision) {
        match self.mode {
            Mode::Disabled => return (None, Decision::new(Admission::Allow, None)),
            Mode::ForcedOpen => {
                let refuse = Admission::Reject { retry_after: None };
                return (None, Decision::new(refuse, None));
            }
            Mode::Normal | Mode::MetricsOnly => {}
        }
        // The common case: a closed breaker admits on its phase byte alone. Bytes that are not
        // a state read as a fresh closed breaker, which admits too, so the shortcut decides
        // exactly as the full decode would.
        if state
            .and_then(peek_phase)
            .is_none_or(|phase| phase == Phase::Closed)
        {
            return (None, Decision::new(Admission::Allow, None));
        }
        let now = now();
        let mut s = self.load(state, now);
        let mut changed = false;
        let mut transition = None;
        let admission = match s.phase {
            Phase::Closed => Admission::Allow,
            Phase::Open if now < s.open_until => Admission::Reject {
                retry_after: Some(s.open_until.saturating_since(now)),
            },
            Phase::Open | Phase::HalfOpen => {
                if s.phase == Phase::Open {
                    s.phase = Phase::HalfOpen;
                    s.since = now;
                    s.generation = s.generation.wrapping_add(1);
                    s.probes = Probes::default();
                    changed = true;
                    transition = Some(Transition {
                        from: Phase::Open,
                        to: Phase::HalfOpen,
                        reason: Reason::OpenElapsed,
                        open_for: None,
                    });
                }
                // Permits whose outcome never came back are reclaimed once no permit has been
                // handed out for a whole probe timeout.
                if now >= s.probes.deadline && s.probes.issued > s.probes.done {
                    s.probes.issued = s.probes.done;
                    changed = true;
                }
                if s.probes.done >= self.half_open_probes {
                    // Only after a reload lowered `half_open_probes`: decide now rather than
                    // wait for outcomes that will never come.
                    transition = self.settle(&mut s, now).or(transition);
                    changed = true;
                    if s.phase == Phase::Closed {
                        Admission::Allow
                    } else {
                        Admission::Reject {
                            retry_after: Some(s.open_until.saturating_since(now)),
                        }
                    }
                } else if s.probes.issued < self.half_open_probes {
                    s.probes.issued += 1;
                    s.probes.deadline = now.saturating_add(self.probe_timeout);
                    changed = true;
                    Admission::Probe(ProbeTicket {
                        generation: s.generation,
                    })
                } else {
                    Admission::Reject { retry_after: None }
                }
            }
        };
        let mut decision = Decision::new(admission, transition);
        if self.mode == Mode::MetricsOnly {
            if let Admission::Reject { .. } = admission {
                decision.admission = Admission::Allow;
                decision.would_reject = true;
            }
        }
        (changed.then(|| s.encode()), decision)
    }

    /// The encoded state of a fresh closed breaker as of `now`: what the glue writes under a
    /// key that does not exist yet, before traffic, so that every later write is an exact
    /// compare-and-swap (Envoy's shared data has no "create if absent").
    pub fn initial_state(&self, now: Instant) -> Vec<u8> {
        BreakerState::closed(self.buckets, self.bucket_width, now).encode()
    }

    /// Records the outcome of a call admitted earlier (`probe`: the ticket if it was admitted
    /// as a probe). Returns the state to write back, if it changed, and the transition it made.
    /// Use it as the `change` closure of `store::update`.
    ///
    /// Closed: the outcome is counted (a late probe too: the call did happen). Open: ignored,
    /// so a burst of late failures never extends the break. Half-open: only a probe of the
    /// current period counts; an ignored outcome gives its permit back.
    pub fn record(
        &self,
        state: Option<&[u8]>,
        now: Instant,
        outcome: Outcome,
        probe: Option<ProbeTicket>,
    ) -> (Option<Vec<u8>>, Option<Transition>) {
        if matches!(self.mode, Mode::Disabled | Mode::ForcedOpen) {
            return (None, None);
        }
        // The common case: a closed breaker counts the outcome in its current bucket, and the
        // window does not trip. Patched in place, to the bytes the full path below writes.
        if let Some(bytes) = state {
            let mut patched = bytes.to_vec();
            let index = bucket_index(now, self.bucket_width);
            if let Some(totals) = add_to_closed_head(
                &mut patched,
                self.buckets,
                self.bucket_width,
                index,
                outcome,
            ) {
                if self.trip_reason(&totals).is_none() {
                    return (Some(patched), None);
                }
            }
        }
        self.record_decoded(state, now, outcome, probe)
    }

    /// [`BreakerPolicy::record`] through the decoded state: every case.
    fn record_decoded(
        &self,
        state: Option<&[u8]>,
        now: Instant,
        outcome: Outcome,
        probe: Option<ProbeTicket>,
    ) -> (Option<Vec<u8>>, Option<Transition>) {
        let mut s = self.load(state, now);
        let transition = match s.phase {
            Phase::Open => return (None, None),
            Phase::Closed => {
                if outcome == Outcome::Ignored {
                    return (None, None);
                }
                s.window.add(bucket_index(now, self.bucket_width), outcome);
                self.trip_reason(&s.window.totals())
                    .map(|reason| self.open(&mut s, now, Phase::Closed, reason))
            }
            Phase::HalfOpen => {
                let current = probe.is_some_and(|t| t.generation == s.generation);
                if !current || s.probes.done >= s.probes.issued {
                    return (None, None);
                }
                if outcome == Outcome::Ignored {
                    s.probes.issued -= 1;
                    None
                } else {
                    s.probes.done += 1;
                    s.probes.failed += u16::from(outcome.is_failure());
                    s.probes.slow += u16::from(outcome.is_slow());
                    self.settle(&mut s, now)
                }
            }
        };
        (Some(s.encode()), transition)
    }

    /// Decodes the shared state, or starts a closed one. A state written under another window
    /// shape (a reloaded configuration) keeps its phase but restarts its window.
    fn load(&self, state: Option<&[u8]>, now: Instant) -> BreakerState {
        let Some(mut s) = state.and_then(BreakerState::decode) else {
            return BreakerState::closed(self.buckets, self.bucket_width, now);
        };
        if s.window.buckets().len() != usize::from(self.buckets)
            || s.bucket_width != self.bucket_width
        {
            s.bucket_width = self.bucket_width;
            s.window = Window::new(
                usize::from(self.buckets),
                bucket_index(now, self.bucket_width),
            );
        }
        s
    }

    /// Why `totals` opens the breaker, if it does: never below `min_calls`; the failure rate
    /// is reported first when both rates trip.
    fn trip_reason(&self, t: &Totals) -> Option<Reason> {
        if t.calls < u64::from(self.min_calls) {
            return None;
        }
        if self.failure_rate.reached(t.failures, t.calls) {
            return Some(Reason::FailureRate {
                failures: t.failures,
                calls: t.calls,
            });
        }
        self.slow_rate
            .filter(|r| r.reached(t.slow, t.calls))
            .map(|_| Reason::SlowCallRate {
                slow: t.slow,
                calls: t.calls,
            })
    }

    /// The half-open verdict, once every permit has reported.
    fn settle(&self, s: &mut BreakerState, now: Instant) -> Option<Transition> {
        let p = s.probes;
        if s.phase != Phase::HalfOpen || p.done < self.half_open_probes {
            return None;
        }
        let (done, failed, slow) = (u64::from(p.done), u64::from(p.failed), u64::from(p.slow));
        let reopen = self.failure_rate.reached(failed, done)
            || self.slow_rate.is_some_and(|r| r.reached(slow, done));
        let (failed, slow, probes) = (p.failed, p.slow, p.done);
        if reopen {
            let reason = Reason::ProbesFailed {
                failed,
                slow,
                probes,
            };
            return Some(self.open(s, now, Phase::HalfOpen, reason));
        }
        s.phase = Phase::Closed;
        s.since = now;
        s.trips = 0;
        s.open_for = Duration::ZERO;
        s.probes = Probes::default();
        s.window.clear(bucket_index(now, self.bucket_width));
        Some(Transition {
            from: Phase::HalfOpen,
            to: Phase::Closed,
            reason: Reason::ProbesPassed {
                failed,
                slow,
                probes,
            },
            open_for: None,
        })
    }

    /// Opens the breaker: the open period grows by the multiplier on each consecutive opening,
    /// within `[open_for, max_open_for]`.
    fn open(&self, s: &mut BreakerState, now: Instant, from: Phase, reason: Reason) -> Transition {
        let open_for = if s.trips == 0 || s.open_for.is_zero() {
            self.open_for
        } else {
            // `as` saturates a float too large for u64, and the cap bounds it anyway.
            let grown = (s.open_for.as_nanos() as f64 * self.open_for_multiplier) as u64;
            Duration::from_nanos(grown)
        };
        // `max` then `min` rather than `clamp`, which panics if the bounds were ever inverted.
        let open_for = open_for.max(self.open_for).min(self.max_open_for);
        s.phase = Phase::Open;
        s.since = now;
        s.trips = s.trips.saturating_add(1);
        s.open_for = open_for;
        s.open_until = now.saturating_add(open_for);
        s.probes = Probes::default();
        s.window.clear(bucket_index(now, self.bucket_width));
        Transition {
            from,
            to: Phase::Open,
            reason,
            open_for: Some(open_for),
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::circuit_breaker::outcome::Response;
    use crate::circuit_breaker::Breakers;
    use crate::rand::{Rng, SeededRng};
    use crate::store::testing::MemoryStore;
    use crate::store::{update, SharedStore};
    use alloc::format;
    use alloc::vec;

    use Outcome::{Failure as F, Success as S};

    fn policy(fields: &str) -> BreakerPolicy {
        let json = format!(r#"{{"breakers": [{{"name": "orders", {fields}}}]}}"#);
        crate::config::load::<Breakers>(json.as_bytes())
            .unwrap()
            .policies()[0]
            .clone()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// One breaker with its shared state in a plain buffer and a hand-driven clock.
    struct Bench {
        policy: BreakerPolicy,
        state: Option<Vec<u8>>,
        now: Instant,
    }

    impl Bench {
        fn new(fields: &str) -> Bench {
            Bench {
                policy: policy(fields),
                state: None,
                now: Instant::from_nanos(1_000_000_000_000),
            }
        }
        fn admit(&mut self) -> Decision {
            let (new, d) = self.policy.admit(self.state.as_deref(), self.now);
            if let Some(n) = new {
                self.state = Some(n);
            }
            d
        }
        fn record_as(&mut self, o: Outcome, probe: Option<ProbeTicket>) -> Option<Transition> {
            let (new, t) = self
                .policy
                .record(self.state.as_deref(), self.now, o, probe);
            if let Some(n) = new {
                self.state = Some(n);
            }
            t
        }
        fn record(&mut self, o: Outcome) -> Option<Transition> {
            self.record_as(o, None)
        }
        /// Admits a probe, panicking if the breaker does not hand one out.
        fn probe(&mut self) -> ProbeTicket {
            match self.admit().admission {
                Admission::Probe(t) => t,
                other => panic!("expected a probe, got {other:?}"),
            }
        }
        fn state(&self) -> BreakerState {
            BreakerState::decode(self.state.as_deref().unwrap()).unwrap()
        }
        fn wait(&mut self, d: Duration) {
            self.now = self.now.saturating_add(d);
        }
        fn rejected(&mut self) -> bool {
            matches!(self.admit().admission, Admission::Reject { .. })
        }
    }

    /// The in-place update of a closed state's head bucket writes exactly what the decoded
    /// path writes, and reports the same transitions: random outcomes at random times (same
    /// bucket, the next ones, far later, earlier), through opening, half-open and closing
    /// again, plus states the shortcut must refuse (another window shape, damaged bytes).
    #[test]
    fn recording_in_place_writes_what_the_decoded_path_writes() {
        let outcomes = [
            Outcome::Success,
            Outcome::Failure,
            Outcome::SlowSuccess,
            Outcome::SlowFailure,
            Outcome::Ignored,
        ];
        let shapes = [
            r#""failure_rate": 0.5, "min_calls": 20, "open_for": "5s", "half_open_probes": 3"#,
            r#""window": "3s", "buckets": 3, "failure_rate": 0.3, "min_calls": 4, "slow_call": {"duration": "1s", "rate": 0.5}, "open_for": "1s""#,
            r#""window": "60s", "buckets": 60, "failure_rate": 0.9, "min_calls": 100"#,
        ];
        let mut rng = SeededRng::new(17);
        let mut shortcut = 0;
        for fields in shapes {
            let mut b = Bench::new(fields);
            let other = policy(r#""window": "20s", "buckets": 4, "failure_rate": 0.5"#);
            for step in 0..4000 {
                match rng.below(10) {
                    0 => b.wait(Duration::from_millis(rng.below(3000))),
                    1 => {
                        b.now = Instant::from_nanos(
                            b.now.as_nanos().saturating_sub(rng.below(2_000_000_000)),
                        )
                    }
                    _ => {}
                }
                let probe = match b.admit().admission {
                    Admission::Probe(t) => Some(t),
                    _ => None,
                };
                let o = outcomes[rng.below(5) as usize];
                let mut state = b.state.clone();
                if step % 97 == 0 {
                    // Damaged bytes: one byte flipped somewhere.
                    if let Some(bytes) = state.as_mut() {
                        let at = rng.below(bytes.len() as u64) as usize;
                        bytes[at] ^= 1 << rng.below(8);
                    }
                }
                let fast = b.policy.record(state.as_deref(), b.now, o, probe);
                let slow = b.policy.record_decoded(state.as_deref(), b.now, o, probe);
                assert_eq!(fast, slow, "step {step} of {fields}");
                if let Some(bytes) = state.as_deref() {
                    // Another window shape: the shortcut refuses, both restart the window.
                    let mut copy = bytes.to_vec();
                    let index = bucket_index(b.now, other.bucket_width);
                    if add_to_closed_head(&mut copy, other.buckets, other.bucket_width, index, o)
                        .is_some()
                    {
                        panic!("step {step}: another shape's state taken in place");
                    }
                    let mut copy = bytes.to_vec();
                    let index = bucket_index(b.now, b.policy.bucket_width);
                    if add_to_closed_head(
                        &mut copy,
                        b.policy.buckets,
                        b.policy.bucket_width,
                        index,
                        o,
                    )
                    .is_some()
                    {
                        shortcut += 1;
                    }
                }
                if let (Some(n), false) = (fast.0, step % 97 == 0) {
                    b.state = Some(n);
                }
            }
        }
        assert!(shortcut > 1000, "the shortcut was taken {shortcut} times");
    }

    /// 4 permits, opened once by 3 failures + 2 successes.
    fn open_with_four_probes() -> Bench {
        let mut b = Bench::new(
            r#""failure_rate": 0.5, "min_calls": 5, "open_for": "5s", "half_open_probes": 4"#,
        );
        for o in [F, F, F, S, S] {
            b.record(o);
        }
        assert_eq!(b.state().phase(), Phase::Open);
        b.wait(secs(5));
        b
    }

    #[test]
    fn three_failures_and_two_successes_open_on_the_fifth_call() {
        let mut b = Bench::new(r#""failure_rate": 0.5, "min_calls": 5"#);
        for o in [F, F, F, S] {
            assert_eq!(b.admit().admission, Admission::Allow);
            assert_eq!(b.record(o), None, "no verdict below min_calls");
        }
        assert_eq!(b.admit().admission, Admission::Allow);
        let t = b.record(S).unwrap();
        assert_eq!(
            t,
            Transition {
                from: Phase::Closed,
                to: Phase::Open,
                reason: Reason::FailureRate {
                    failures: 3,
                    calls: 5
                },
                open_for: Some(secs(5)),
            }
        );
        assert_eq!(
            alloc::string::ToString::to_string(&t),
            "closed -> open: 3 of 5 calls failed; open for 5s"
        );
        assert_eq!(
            b.admit().admission,
            Admission::Reject {
                retry_after: Some(secs(5))
            }
        );
    }

    #[test]
    fn half_open_with_four_permits_rejects_the_fifth_and_sixth() {
        let mut b = open_with_four_probes();
        let first = b.admit();
        assert!(matches!(first.admission, Admission::Probe(_)));
        assert_eq!(
            first.transition,
            Some(Transition {
                from: Phase::Open,
                to: Phase::HalfOpen,
                reason: Reason::OpenElapsed,
                open_for: None
            })
        );
        for _ in 0..3 {
            let d = b.admit();
            assert!(matches!(d.admission, Admission::Probe(_)));
            assert_eq!(d.transition, None);
        }
        for _ in 0..2 {
            assert_eq!(b.admit().admission, Admission::Reject { retry_after: None });
        }
        assert_eq!(b.state().probes().issued, 4);
    }

    #[test]
    fn three_of_four_failing_probes_reopen() {
        let mut b = open_with_four_probes();
        let tickets: Vec<_> = (0..4).map(|_| b.probe()).collect();
        // Decided only when all four have reported, even though two failures already reach 50%.
        for (t, o) in tickets.iter().zip([F, F, F]) {
            assert_eq!(b.record_as(o, Some(*t)), None);
        }
        let t = b.record_as(S, Some(tickets[3])).unwrap();
        assert_eq!((t.from, t.to), (Phase::HalfOpen, Phase::Open));
        assert_eq!(
            t.reason,
            Reason::ProbesFailed {
                failed: 3,
                slow: 0,
                probes: 4
            }
        );
        assert_eq!(t.open_for, Some(secs(10)), "second consecutive opening");
        assert!(b.rejected());
    }

    #[test]
    fn one_of_four_failing_probes_closes_and_resets_the_window() {
        let mut b = open_with_four_probes();
        let tickets: Vec<_> = (0..4).map(|_| b.probe()).collect();
        let mut last = None;
        for (t, o) in tickets.iter().zip([S, F, S, S]) {
            last = b.record_as(o, Some(*t));
        }
        let t = last.unwrap();
        assert_eq!((t.from, t.to), (Phase::HalfOpen, Phase::Closed));
        assert_eq!(
            t.reason,
            Reason::ProbesPassed {
                failed: 1,
                slow: 0,
                probes: 4
            }
        );
        let s = b.state();
        assert_eq!(s.window().totals(), Totals::default());
        assert_eq!((s.trips(), s.open_for()), (0, Duration::ZERO));
        assert_eq!(s.probes(), Probes::default());
        // A fresh window: four failures are below min_calls again.
        for _ in 0..4 {
            assert_eq!(b.record(F), None);
        }
        assert!(b.record(F).is_some());
    }

    #[test]
    fn ten_of_a_hundred_at_a_tenth_trips_inclusively() {
        let mut b = Bench::new(r#""failure_rate": 0.1, "min_calls": 100"#);
        for _ in 0..90 {
            assert_eq!(b.record(S), None);
        }
        for _ in 0..9 {
            assert_eq!(b.record(F), None);
        }
        let t = b.record(F).unwrap();
        assert_eq!(
            t.reason,
            Reason::FailureRate {
                failures: 10,
                calls: 100
            }
        );

        let mut b = Bench::new(r#""failure_rate": 0.1, "min_calls": 100"#);
        for _ in 0..91 {
            b.record(S);
        }
        for _ in 0..9 {
            assert_eq!(b.record(F), None, "9 of 100 stays closed");
        }
    }

    #[test]
    fn the_open_period_grows_is_capped_and_resets_after_a_clean_close() {
        let mut b = Bench::new(
            r#""min_calls": 1, "open_for": "1s", "open_for_multiplier": 2.0, "max_open_for": "5s""#,
        );
        assert_eq!(b.record(F).unwrap().open_for, Some(secs(1)));
        let mut periods = Vec::new();
        for _ in 0..4 {
            b.wait(b.state().open_for());
            let t = b.probe();
            let tr = b.record_as(F, Some(t)).unwrap();
            assert_eq!(tr.to, Phase::Open);
            periods.push(tr.open_for.unwrap());
        }
        assert_eq!(periods, vec![secs(2), secs(4), secs(5), secs(5)]);
        assert_eq!(b.state().trips(), 5);
        b.wait(secs(5));
        let t = b.probe();
        assert_eq!(b.record_as(S, Some(t)).unwrap().to, Phase::Closed);
        assert_eq!(b.record(F).unwrap().open_for, Some(secs(1)));
        assert_eq!(b.state().trips(), 1);
    }

    #[test]
    fn the_slow_call_rate_trips() {
        let mut b = Bench::new(
            r#""failure_rate": 1.0, "min_calls": 4, "slow_call": {"duration": "1s", "rate": 0.5}"#,
        );
        let classifier = policy(r#""slow_call": {"duration": "1s"}"#);
        let classify = |ms| {
            classifier
                .failure()
                .classify(Response::Status(200), Duration::from_millis(ms))
        };
        let fast = classify(20);
        let slow = classify(1500);
        assert_eq!((fast, slow), (Outcome::Success, Outcome::SlowSuccess));
        assert_eq!(b.record(slow), None);
        assert_eq!(b.record(fast), None);
        assert_eq!(b.record(fast), None);
        let t = b.record(slow).unwrap();
        assert_eq!(t.reason, Reason::SlowCallRate { slow: 2, calls: 4 });

        // Slow probes reopen too.
        b.wait(secs(5));
        let ticket = b.probe();
        let t = b.record_as(slow, Some(ticket)).unwrap();
        assert_eq!(
            t.reason,
            Reason::ProbesFailed {
                failed: 0,
                slow: 1,
                probes: 1
            }
        );
    }

    #[test]
    fn results_while_open_do_not_extend_the_break() {
        let mut b = Bench::new(r#""min_calls": 1, "open_for": "5s""#);
        b.record(F);
        let before = b.state.clone();
        for _ in 0..4 {
            b.wait(secs(1));
            assert_eq!(
                b.policy.record(b.state.as_deref(), b.now, F, None),
                (None, None)
            );
        }
        assert_eq!(b.state, before);
        b.wait(secs(1));
        b.probe();
    }

    #[test]
    fn a_failure_burst_older_than_the_window_no_longer_counts() {
        let mut b = Bench::new(r#""window": "10s", "buckets": 10, "min_calls": 5"#);
        for _ in 0..4 {
            b.record(F);
        }
        assert_eq!(b.state().window().totals().failures, 4);
        b.wait(secs(10));
        // Without eviction this would be 5 failures in 9 calls.
        for o in [S, S, S, S, F] {
            assert_eq!(b.record(o), None);
        }
        assert_eq!(
            b.state().window().totals(),
            Totals {
                calls: 5,
                failures: 1,
                slow: 0
            }
        );
        // Within the window, the burst still counts: 9 s later it trips.
        let mut b = Bench::new(r#""window": "10s", "buckets": 10, "min_calls": 5"#);
        for _ in 0..4 {
            b.record(F);
        }
        b.wait(secs(9));
        assert!(b.record(S).is_some());
    }

    #[test]
    fn forced_open_rejects_and_disabled_allows_without_touching_state() {
        let b = Bench::new(r#""mode": "forced_open", "min_calls": 1"#);
        for _ in 0..3 {
            let (new, d) = b.policy.admit(None, b.now);
            assert_eq!(new, None);
            assert_eq!(d.admission, Admission::Reject { retry_after: None });
            assert_eq!(b.policy.record(None, b.now, F, None), (None, None));
        }
        let mut b = Bench::new(r#""mode": "disabled", "min_calls": 1"#);
        for _ in 0..3 {
            assert_eq!(b.admit().admission, Admission::Allow);
            assert_eq!(b.record(F), None);
        }
        assert_eq!(b.state, None);
    }

    #[test]
    fn metrics_only_reports_transitions_but_always_allows() {
        let mut b = Bench::new(r#""mode": "metrics_only", "min_calls": 2, "open_for": "5s""#);
        assert_eq!(b.record(F), None);
        let t = b.record(F).unwrap();
        assert_eq!(t.to, Phase::Open);
        let d = b.admit();
        assert_eq!(d.admission, Admission::Allow);
        assert!(d.would_reject);
        b.wait(secs(5));
        let d = b.admit();
        assert!(matches!(d.admission, Admission::Probe(_)));
        assert_eq!(d.transition.unwrap().to, Phase::HalfOpen);
        let d = b.admit();
        assert_eq!((d.admission, d.would_reject), (Admission::Allow, true));
    }

    #[test]
    fn admitting_on_a_closed_breaker_writes_nothing() {
        let mut b = Bench::new(r#""min_calls": 50"#);
        b.record(S);
        let (new, d) = b.policy.admit(b.state.as_deref(), b.now);
        assert_eq!((new, d.admission), (None, Admission::Allow));
        let (new, _) = b.policy.admit(None, b.now);
        assert_eq!(new, None);
        // Bytes that are not a state read as a fresh closed breaker, whatever their phase byte.
        for junk in [&[1u8, 1][..], &[1, 2, 0], &[9, 1], &[1, 7], &[]] {
            let (new, d) = b.policy.admit(Some(junk), b.now);
            assert_eq!((new, d.admission), (None, Admission::Allow), "{junk:?}");
        }
        // Nor does it need the time.
        let no_clock = || -> Instant { panic!("a closed breaker asked for the time") };
        let (new, d) = b.policy.admit_with(b.state.as_deref(), no_clock);
        assert_eq!((new, d.admission), (None, Admission::Allow));
        let mut open = Bench::new(r#""min_calls": 1"#);
        open.record(F);
        let mut asked = false;
        let (_, d) = open.policy.admit_with(open.state.as_deref(), || {
            asked = true;
            open.now
        });
        assert!(asked && matches!(d.admission, Admission::Reject { .. }));
    }

    #[test]
    fn the_initial_state_is_a_closed_breaker_with_this_window() {
        let mut b = Bench::new(r#""min_calls": 1, "window": "5s", "buckets": 5"#);
        b.state = Some(b.policy.initial_state(b.now));
        let s = b.state();
        assert_eq!(s.phase(), Phase::Closed);
        assert_eq!(s.window().buckets().len(), 5);
        assert_eq!(s.window().totals(), Totals::default());
        let (new, d) = b.policy.admit(b.state.as_deref(), b.now);
        assert_eq!((new, d.admission), (None, Admission::Allow));
        assert_eq!(b.record(F).unwrap().to, Phase::Open);
    }

    #[test]
    fn expired_probe_permits_are_reclaimed() {
        let mut b = Bench::new(r#""min_calls": 1, "open_for": "5s", "probe_timeout": "2s""#);
        b.record(F);
        b.wait(secs(5));
        let lost = b.probe();
        b.wait(Duration::from_millis(1999));
        assert!(b.rejected(), "the permit is still out");
        b.wait(Duration::from_millis(1));
        let second = b.probe();
        assert_eq!(lost, second, "same half-open period");
        assert!(b.rejected());
        // The lost probe's late outcome still counts for this period; the verdict is reached.
        assert_eq!(b.record_as(S, Some(lost)).unwrap().to, Phase::Closed);
    }

    #[test]
    fn a_cancelled_probe_gives_its_permit_back() {
        let mut b = Bench::new(r#""min_calls": 1, "open_for": "5s""#);
        b.record(F);
        b.wait(secs(5));
        let t = b.probe();
        assert!(b.rejected());
        assert_eq!(b.record_as(Outcome::Ignored, Some(t)), None);
        assert_eq!(b.state().probes().issued, 0);
        let t = b.probe();
        assert_eq!(b.record_as(S, Some(t)).unwrap().to, Phase::Closed);
    }

    #[test]
    fn stale_and_plain_outcomes_do_not_decide_half_open() {
        let mut b = Bench::new(r#""min_calls": 1, "open_for": "1s", "half_open_probes": 2"#);
        b.record(F);
        b.wait(secs(1));
        let old = b.probe();
        let other = b.probe();
        assert_eq!(b.record_as(F, Some(old)), None);
        assert_eq!(b.record_as(F, Some(other)).unwrap().to, Phase::Open);
        b.wait(b.state().open_for());
        let fresh = b.probe();
        assert_ne!(fresh, old, "a new half-open period");
        let before = b.state.clone();
        // A probe of the previous period, and a plain call, report now: neither counts.
        assert_eq!(
            b.policy.record(b.state.as_deref(), b.now, F, Some(old)),
            (None, None)
        );
        assert_eq!(
            b.policy.record(b.state.as_deref(), b.now, F, None),
            (None, None)
        );
        assert_eq!(b.state, before);
        assert_eq!(
            b.record_as(S, Some(fresh)),
            None,
            "one of two permits reported"
        );
    }

    #[test]
    fn a_reload_with_another_window_keeps_the_phase() {
        let mut b = Bench::new(r#""min_calls": 1, "buckets": 10"#);
        b.record(F);
        let other = policy(r#""min_calls": 1, "buckets": 5"#);
        let (new, d) = other.admit(b.state.as_deref(), b.now);
        assert_eq!(new, None);
        assert!(matches!(d.admission, Admission::Reject { .. }));
        let mut c = Bench::new(r#""min_calls": 3, "buckets": 10"#);
        c.record(F);
        c.record(F);
        let (new, _) = other.record(c.state.as_deref(), c.now, S, None);
        let s = BreakerState::decode(&new.unwrap()).unwrap();
        assert_eq!(s.window().buckets().len(), 5);
        assert_eq!(s.window().totals().calls, 1);
    }

    #[test]
    fn a_lowered_probe_count_does_not_wedge_half_open() {
        let mut b = Bench::new(r#""min_calls": 1, "open_for": "1s", "half_open_probes": 3"#);
        b.record(F);
        b.wait(secs(1));
        let t = b.probe();
        b.probe();
        b.record_as(S, Some(t));
        // Reloaded with one probe: the one outcome in decides at the next admission.
        b.policy = policy(r#""min_calls": 1, "open_for": "1s", "half_open_probes": 1"#);
        let d = b.admit();
        assert_eq!(d.admission, Admission::Allow);
        assert_eq!(d.transition.unwrap().to, Phase::Closed);
    }

    /// Two workers share one store; worker B's admission lands between worker A's read and
    /// write at random. However the writes interleave, no more than `half_open_probes` probes
    /// of one half-open period are ever out at once.
    #[test]
    fn two_workers_never_hold_more_probes_than_permitted() {
        const KEY: &str = "keel/circuit_breaker/orders";
        let p = policy(
            r#""min_calls": 2, "open_for": "1s", "half_open_probes": 3, "probe_timeout": "1h""#,
        );
        for seed in 0..20 {
            let store = MemoryStore::default();
            let mut rng = SeededRng::new(seed);
            let mut now = Instant::from_nanos(1);
            let mut out: Vec<ProbeTicket> = Vec::new();
            let mut max_out = 0;
            for _ in 0..300 {
                now = now.saturating_add(Duration::from_millis(rng.below(300)));
                match rng.below(3) {
                    0 | 1 => {
                        let mut interfere = rng.below(2) == 0;
                        let mut nested = None;
                        let d = update(&store, KEY, 8, |old| {
                            if interfere {
                                interfere = false;
                                nested = update(&store, KEY, 8, |o| p.admit(o, now)).ok();
                            }
                            p.admit(old, now)
                        })
                        .unwrap();
                        for admitted in [Some(d), nested].into_iter().flatten() {
                            if let Admission::Probe(t) = admitted.admission {
                                out.push(t);
                            }
                        }
                    }
                    _ => {
                        let o = if rng.below(2) == 0 { F } else { S };
                        let probe = if out.is_empty() {
                            None
                        } else {
                            Some(out.remove(rng.below(out.len() as u64) as usize))
                        };
                        update(&store, KEY, 8, |old| p.record(old, now, o, probe)).unwrap();
                    }
                }
                let stored = store.get(KEY).unwrap().map(|(v, _)| v);
                let s = BreakerState::decode(stored.as_deref().unwrap_or(&[]));
                if let Some(s) = s.filter(|s| s.phase() == Phase::HalfOpen) {
                    let current = out.iter().filter(|t| t.generation == s.generation).count();
                    assert!(current <= 3, "seed {seed}: {current} probes out");
                    assert_eq!(current, usize::from(s.probes().issued - s.probes().done));
                    max_out = max_out.max(current);
                }
            }
            assert!(max_out > 0, "seed {seed}: half-open never reached");
        }
    }

    /// Property: over random admissions, outcomes and clock jumps the shared state always
    /// decodes, its totals equal the sum of its buckets, and its counts stay within bounds.
    #[test]
    fn the_state_stays_consistent_over_random_traffic() {
        let mut seen = [0u32; 3];
        for seed in 0..20u64 {
            let mut rng = SeededRng::new(seed);
            let fields = format!(
                r#""min_calls": {}, "buckets": {}, "window": "{}s", "open_for": "{}ms",
                   "half_open_probes": {}, "probe_timeout": "2s", "slow_call": {{"duration": "1s", "rate": 0.8}}"#,
                1 + rng.below(20),
                1 + rng.below(20),
                1 + rng.below(30),
                1 + rng.below(3000),
                1 + rng.below(5),
            );
            let mut b = Bench::new(&fields);
            let mut out = Vec::new();
            for _ in 0..1000 {
                b.wait(Duration::from_millis(rng.below(700)));
                let mut transition = None;
                if rng.below(2) == 0 {
                    let d = b.admit();
                    transition = d.transition;
                    match d.admission {
                        Admission::Probe(t) => out.push(Some(t)),
                        Admission::Allow => out.push(None),
                        Admission::Reject { .. } => {}
                    }
                } else if !out.is_empty() {
                    let i = rng.below(out.len() as u64) as usize;
                    let probe = out.swap_remove(i);
                    let o = match rng.below(6) {
                        0 => Outcome::Ignored,
                        1 | 2 => F,
                        3 => Outcome::SlowSuccess,
                        _ => S,
                    };
                    transition = b.record_as(o, probe);
                }
                if let Some(t) = transition {
                    seen[t.to as usize] += 1;
                }
                let Some(bytes) = b.state.as_deref() else {
                    continue;
                };
                let s = BreakerState::decode(bytes).expect("the state always decodes");
                let mut sum = Totals::default();
                for t in s.window().buckets() {
                    sum.calls += u64::from(t.calls);
                    sum.failures += u64::from(t.failures);
                    sum.slow += u64::from(t.slow);
                }
                assert_eq!(s.window().totals(), sum, "seed {seed}");
                assert!(s.probes().issued <= b.policy.half_open_probes());
                let (base, _, cap) = b.policy.open_for();
                match s.phase() {
                    Phase::Closed => assert_eq!(s.trips(), 0),
                    Phase::Open | Phase::HalfOpen => {
                        assert!(s.trips() >= 1);
                        assert!(s.open_for() >= base && s.open_for() <= cap);
                    }
                }
            }
        }
        assert!(seen.iter().all(|n| *n > 0), "every phase entered: {seen:?}");
    }
}
