//! Refresh scheduling, backoff and the age of the data.
//!
//! After RFC 5861's `stale-if-error` and Consul's agent cache: when the registry fails or
//! answers garbage, the last good set keeps serving and the poller keeps trying, spacing its
//! attempts with capped exponential backoff so that a struggling registry is not hammered by
//! every proxy at once.
//!
//! **After `max_stale`** the set is kept and flagged [`Freshness::Expired`] (in the shared set
//! and in the glue's metric and log), not dropped. Envoy keeps the last configuration while
//! its control plane is unreachable; dropping the endpoints would turn a registry outage into
//! an outage of every service behind it, while the old endpoints are usually still right. The
//! flag lets an operator alert on it; active checks and passive ejection keep protecting
//! traffic from endpoints that have died meanwhile.
//!
//! Backoff after `n` consecutive failures: `d = min(cap, refresh × 2^n)`, drawn uniformly in
//! `[d/2, d]` (AWS's "equal jitter": it spreads proxies out while keeping a floor, since a
//! poller, unlike a client retry, gains nothing from asking again at once). `cap` is
//! `refresh × `[`BACKOFF_CAP_FACTOR`] bounded by [`MAX_BACKOFF`], and never below `refresh`:
//! a poller that refreshes every second backs off to at most 10 s, so it notices a registry's
//! return within seconds, while a slow poller is never made slower than its own refresh.
//!
//! A new poller (after a takeover) resumes from the shared set's `refreshed_at`: the data's
//! age carries over, and its first request goes one refresh after the last good answer rather
//! than at once, so a change of poller does not add a request to the registry's load.

use crate::rand::Rng;
use crate::time::{Duration, Instant};

/// The longest wait between two attempts while the registry fails (unless `refresh` is
/// longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The backoff cap as a multiple of `refresh` (then bounded by [`MAX_BACKOFF`]).
pub const BACKOFF_CAP_FACTOR: u64 = 10;

/// How current the served data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Freshness {
    /// The last attempt succeeded.
    Fresh = 0,
    /// The last attempt failed; the last good answer is within `max_stale`.
    Stale = 1,
    /// The last good answer is older than `max_stale`; still served, loudly flagged.
    Expired = 2,
}

impl Freshness {
    /// The value of its byte in the set layout.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Freshness::Fresh),
            1 => Some(Freshness::Stale),
            2 => Some(Freshness::Expired),
            _ => None,
        }
    }
}

/// When to ask the registry next, and how old the data is. Held by the poller, per service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshSchedule {
    refresh: Duration,
    max_stale: Duration,
    request_timeout: Duration,
    last_success: Option<Instant>,
    failures: u32,
    next_at: Instant,
    sent_at: Option<Instant>,
}

impl RefreshSchedule {
    /// A schedule that asks at once. `request_timeout` is the callout's own timeout (a request
    /// outstanding for longer than twice that is taken as lost).
    pub fn new(refresh: Duration, max_stale: Duration, request_timeout: Duration) -> Self {
        RefreshSchedule {
            refresh,
            max_stale,
            request_timeout,
            last_success: None,
            failures: 0,
            next_at: Instant::ZERO,
            sent_at: None,
        }
    }

    /// Resumes from the shared set's `refreshed_at` after a poller takeover: the data's age is
    /// not reset by a change of poller, and the next request is due one refresh after that
    /// answer (at once if that is past), not at once.
    pub fn resume(&mut self, refreshed_at: Option<Instant>) {
        if self.last_success.is_none() {
            if let Some(at) = refreshed_at {
                self.last_success = Some(at);
                self.next_at = at.saturating_add(self.refresh);
            }
        }
    }

    /// Whether a request should be sent at `now`.
    pub fn due(&self, now: Instant) -> bool {
        if let Some(sent) = self.sent_at {
            return now.saturating_since(sent) >= self.request_timeout.saturating_mul(2);
        }
        now >= self.next_at
    }

    /// Records that a request went out at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        self.sent_at = Some(now);
    }

    /// Records a good answer at `now`: the next request goes `refresh` after this one was
    /// sent (for a Consul blocking query that returned after its wait, at once).
    pub fn on_success(&mut self, now: Instant) {
        let sent = self.sent_at.take().unwrap_or(now);
        self.last_success = Some(now);
        self.failures = 0;
        self.next_at = sent.saturating_add(self.refresh).max(now);
    }

    /// Records a failure at `now` (callout failed, non-200 status, body refused) and backs
    /// off. Returns the wait before the next attempt.
    pub fn on_failure(&mut self, now: Instant, rng: &mut impl Rng) -> Duration {
        self.sent_at = None;
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(self.refresh, self.failures, rng);
        self.next_at = now.saturating_add(delay);
        delay
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The age of the served data (time since the last good answer), for the metric; `None`
    /// before the first.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.last_success.map(|t| now.saturating_since(t))
    }

    /// How current the data is at `now`; `None` before the first good answer (nothing is
    /// served).
    pub fn freshness(&self, now: Instant) -> Option<Freshness> {
        let age = self.age(now)?;
        Some(if age > self.max_stale {
            Freshness::Expired
        } else if self.failures > 0 {
            Freshness::Stale
        } else {
            Freshness::Fresh
        })
    }
}

/// The longest backoff for `refresh` (see the module docs).
pub fn backoff_cap(refresh: Duration) -> Duration {
    refresh
        .saturating_mul(BACKOFF_CAP_FACTOR)
        .min(MAX_BACKOFF)
        .max(refresh)
}

/// The wait after `failures` consecutive failures (see the module docs).
pub fn backoff(refresh: Duration, failures: u32, rng: &mut impl Rng) -> Duration {
    let cap = backoff_cap(refresh);
    let exp = failures.min(32);
    let ceiling = refresh.saturating_mul(1u64 << exp).min(cap);
    let half = ceiling.div(2);
    let jitter = rng.below(ceiling.as_nanos() - half.as_nanos() + 1);
    half.saturating_add(Duration::from_nanos(jitter))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::rand::SeededRng;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    fn at(n: u64) -> Instant {
        Instant::from_nanos(n * 1_000_000_000)
    }

    #[test]
    fn backoff_grows_within_bounds_and_is_capped() {
        let mut rng = SeededRng::new(5);
        assert_eq!(backoff_cap(s(1)), s(10));
        assert_eq!(backoff_cap(s(5)), s(50));
        assert_eq!(backoff_cap(s(30)), MAX_BACKOFF);
        assert_eq!(backoff_cap(s(120)), s(120));
        for failures in 1..40u32 {
            let ceiling = s(1).saturating_mul(1u64 << failures.min(32)).min(s(10));
            for _ in 0..50 {
                let d = backoff(s(1), failures, &mut rng);
                assert!(d >= ceiling.div(2) && d <= ceiling, "{failures}: {d}");
            }
        }
        // A refresh above the cap is never shortened.
        assert!(backoff(s(120), 5, &mut rng) >= s(60));
        assert!(backoff(s(120), 5, &mut rng) <= s(120));
    }

    #[test]
    fn serves_stale_then_flags_expired_and_keeps_trying() {
        let mut rng = SeededRng::new(8);
        let mut sched = RefreshSchedule::new(s(1), s(60), s(5));
        assert!(sched.due(at(0)));
        assert_eq!(sched.freshness(at(0)), None);
        sched.on_sent(at(0));
        assert!(!sched.due(at(1)));
        sched.on_success(at(0));
        assert_eq!(sched.freshness(at(0)), Some(Freshness::Fresh));
        assert!(!sched.due(Instant::from_nanos(999_999_999)));
        assert!(sched.due(at(1)));
        // The registry goes away.
        let mut now = at(1);
        let mut waits = alloc::vec::Vec::new();
        while now < at(600) {
            sched.on_sent(now);
            let wait = sched.on_failure(now, &mut rng);
            waits.push(wait);
            assert!(!sched.due(now));
            now = now.saturating_add(wait);
            assert!(sched.due(now));
            let age = sched.age(now).unwrap();
            let expect = if age > s(60) {
                Freshness::Expired
            } else {
                Freshness::Stale
            };
            assert_eq!(sched.freshness(now), Some(expect));
        }
        assert!(waits.windows(2).take(4).all(|w| w[1] >= w[0].div(2)));
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
        assert!(sched.failures() > 5);
        // It comes back: fresh again, normal pace.
        sched.on_sent(now);
        sched.on_success(now);
        assert_eq!(sched.freshness(now), Some(Freshness::Fresh));
        assert_eq!(sched.age(now), Some(Duration::ZERO));
        assert!(sched.due(now.saturating_add(s(1))));
    }

    #[test]
    fn blocking_queries_go_again_at_once_and_lost_requests_are_resent() {
        let mut sched = RefreshSchedule::new(s(1), s(300), s(37));
        sched.on_sent(at(0));
        // A blocking query returns after its 30 s wait: ask again right away.
        sched.on_success(at(30));
        assert!(sched.due(at(30)));
        // One that never comes back is taken as lost after twice its timeout.
        sched.on_sent(at(30));
        assert!(!sched.due(at(100)));
        assert!(sched.due(at(104)));
    }

    #[test]
    fn a_new_poller_resumes_the_age() {
        let mut sched = RefreshSchedule::new(s(1), s(10), s(5));
        sched.resume(Some(at(5)));
        assert_eq!(sched.age(at(8)), Some(s(3)));
        // The first request of the new poller goes one refresh after the last answer.
        assert!(!sched.due(Instant::from_nanos(5_999_999_999)));
        assert!(sched.due(at(6)));
        // A second resume (or one with nothing to resume) changes nothing.
        sched.resume(Some(at(7)));
        assert_eq!(sched.age(at(8)), Some(s(3)));
        let mut fresh = RefreshSchedule::new(s(1), s(10), s(5));
        fresh.resume(None);
        assert!(fresh.due(at(0)));
        assert_eq!(fresh.age(at(0)), None);
        assert_eq!(sched.freshness(at(20)), Some(Freshness::Expired));
        assert_eq!(Freshness::from_u8(2), Some(Freshness::Expired));
        assert_eq!(Freshness::from_u8(3), None);
    }
}
